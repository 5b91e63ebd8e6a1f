"""A synthetic multi-study single-cell atlas with ground truth: the project's default dataset.

:func:`simulate_atlas` draws raw UMI-like counts for ``n_cells`` cells × ``n_genes`` genes, pooled
from ``n_studies`` studies that differ by a batch effect, with known cell types, lineages and
marker genes. It needs no download and is deterministic: all randomness comes from one
``np.random.default_rng(seed)``, so the same arguments give bit-identical output.

Generative model (natural logs throughout)
------------------------------------------
1. **Baseline.** Each gene ``g`` has a baseline log-mean ``b_g ~ Normal(0, base_log_sd)``
   (``base_log_sd=1.5`` puts the central 99 % of gene means across ~3 orders of magnitude).
2. **Cell-type programmes (hierarchical).** The ``n_cell_types - 1`` common types
   (``"type_A"``, ``"type_B"``, …) are dealt round-robin into ``n_lineages`` lineages
   (``"lineage_0"``, …). Each lineage up-regulates ``n_lineage_markers`` genes shared by all its
   types, each type up-regulates its own ``n_markers`` genes, with fold changes log-uniform in
   ``fold_change_range`` (2–10×). Types of one lineage are therefore closer to each other than to
   types of another lineage. The rare type (``"rare_type"``, in ``lineage_0``) has the lineage
   programme plus ``n_rare_markers`` strong markers (fold changes in ``rare_fold_change_range``).
   Marker sets are disjoint when ``n_genes`` allows it; the true sets are stored in ``uns``.
3. **Continuous within-type state.** A shared "activation" programme (``n_markers`` genes, up to
   3× at full activation) is scaled by a per-cell score ``a_c ~ Beta(2, 5)``, so that cell types
   are not point masses.
4. **Study (batch) effects.** (a) Gene-wise multiplicative scaling: for a random fraction
   ``study_effect_fraction`` of genes, study ``s`` multiplies gene ``g`` by
   ``exp(e_sg)``, ``e_sg ~ Normal(0, study_effect_sd)``; (b) library size: study ``s`` has a
   median library size taken from a log-spaced grid over ``library_median_range``
   (1,500–6,000 counts), assigned to studies in random order. Study sizes are unequal
   (Dirichlet weights, mixed half-and-half with uniform) and each study has its own cell-type
   proportions (``Dirichlet(type_concentration · p0)`` around shared proportions ``p0``); every
   type, the rare one included, is present in every study (``min_cells_per_type`` common cells
   and at least ``min_rare_per_study`` rare cells per study).
5. **Counts.** Cell ``c`` of type ``t`` in study ``s`` has normalised expression
   ``q_cg ∝ exp(b_g + lineage/type LFCs + a_c · activation_g + e_sg)`` (rows sum to 1), library
   size ``L_c ~ LogNormal(log median_s, library_log_sd)``, and counts
   ``x_cg ~ NegBinomial(mean = L_c q_cg, dispersion theta_g)`` drawn as gamma–Poisson with
   ``theta_g`` log-uniform in ``dispersion_range`` (2–10). Rows that come out all-zero are redrawn
   (with the default library sizes this essentially never happens).

The defaults give a moderate batch effect: in an unintegrated PCA of log-normalised counts cells
visibly group by study within each cell type, while cell types remain clearly separable.

Cells are grouped by study (study 0 first), in random order within a study.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scproto_scale.data.writers import write_h5ad_atomic

__all__ = ["simulate_atlas", "write_simulated_atlas"]

RARE_TYPE_NAME = "rare_type"
# Cells per dense block when drawing counts: bounds peak memory to a (block, n_genes) float64
# array. Fixed, because the random stream (hence the output) depends on it.
_BLOCK_SIZE = 2_048


def _letters(i: int) -> str:
    """Bijective base-26 label: 0 → "A", 25 → "Z", 26 → "AA", …"""
    out = ""
    i += 1
    while i > 0:
        i, r = divmod(i - 1, 26)
        out = chr(ord("A") + r) + out
    return out


def _check_range(
    name: str, value: tuple[float, float], positive: bool = True
) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a pair (low, high) of numbers, got {value!r}") from exc
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi or (positive and lo <= 0):
        cond = "0 < low <= high" if positive else "low <= high"
        raise ValueError(f"{name} must satisfy {cond} (finite), got {value!r}")
    return lo, hi


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_float(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number, got {value!r}") from exc
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (np.isfinite(v) and ok_low and ok_high):
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lb}{low}, {high}{hb}, got {value!r}")
    return v


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, size: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size=size))


def _draw_counts(rng: np.random.Generator, mean: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Gamma–Poisson (negative binomial) counts with the given ``(m, G)`` means and ``(G,)`` theta."""
    shape = np.broadcast_to(theta[None, :], mean.shape)
    lam = rng.standard_gamma(shape) * (mean / theta[None, :])
    return rng.poisson(lam)


def simulate_atlas(
    n_cells: int = 10_000,
    n_genes: int = 2_000,
    n_studies: int = 4,
    n_cell_types: int = 8,
    rare_fraction: float = 0.006,
    seed: int = 0,
    *,
    n_lineages: int | None = None,
    n_markers: int = 25,
    n_lineage_markers: int = 40,
    n_rare_markers: int = 30,
    fold_change_range: tuple[float, float] = (2.0, 10.0),
    rare_fold_change_range: tuple[float, float] = (4.0, 15.0),
    base_log_sd: float = 1.5,
    study_effect_sd: float = 0.4,
    study_effect_fraction: float = 0.15,
    library_median_range: tuple[float, float] = (1_500.0, 6_000.0),
    library_log_sd: float = 0.35,
    dispersion_range: tuple[float, float] = (2.0, 10.0),
    type_concentration: float = 20.0,
    min_rare_per_study: int = 3,
    min_cells_per_type: int = 5,
) -> ad.AnnData:
    """Simulate a multi-study single-cell count atlas with known cell types and batch effects.

    See the module docstring for the generative model.

    Args:
        n_cells: Total number of cells (>= 1; must leave room for the per-study minimum cells).
        n_genes: Number of genes (>= 10).
        n_studies: Number of studies / batches (>= 1), named ``"study_0"``, ``"study_1"``, ….
        n_cell_types: Number of cell types *including* the rare type (>= 2): ``n_cell_types - 1``
            common types ``"type_A"``, ``"type_B"``, … plus ``"rare_type"``.
        rare_fraction: Fraction of all cells that are ``"rare_type"``, in ``(0, 1 / n_cell_types)``;
            the rare count is ``round(rare_fraction * n_cells)`` exactly.
        seed: Seed for ``np.random.default_rng``; the same arguments give bit-identical output.
        n_lineages: Number of lineages grouping the common types; default
            ``min(3, max(1, (n_cell_types - 1) // 2))``. Must not exceed ``n_cell_types - 1``.
        n_markers: Up-regulated marker genes per common type (also the activation programme size).
        n_lineage_markers: Up-regulated genes per lineage programme.
        n_rare_markers: Up-regulated marker genes of the rare type.
        fold_change_range: ``(low, high)`` fold changes of type and lineage markers (log-uniform).
        rare_fold_change_range: ``(low, high)`` fold changes of rare-type markers.
        base_log_sd: Standard deviation of the gene baseline log-means (>= 0).
        study_effect_sd: Standard deviation of the study × gene log-scaling (>= 0; 0 = no
            gene-wise batch effect).
        study_effect_fraction: Fraction of genes affected by the study scaling, in ``[0, 1]``.
        library_median_range: ``(low, high)`` median total counts of the studies (log-spaced).
        library_log_sd: Per-cell standard deviation of the log library size (>= 0).
        dispersion_range: ``(low, high)`` NB dispersion ``theta`` per gene (log-uniform; larger is
            closer to Poisson).
        type_concentration: Dirichlet concentration of the study-specific type proportions
            (> 0; larger = more similar across studies).
        min_rare_per_study: Minimum rare cells in every study (>= 1).
        min_cells_per_type: Minimum cells of every common type in every study (>= 1).

    Returns:
        AnnData with

        * ``X``: ``(n_cells, n_genes)`` ``scipy.sparse.csr_matrix`` of dtype float32 holding
          non-negative integer counts; every cell has a positive total.
        * ``obs`` (index ``"cell_000000"``, … unique): ``study``, ``cell_type``, ``lineage``
          (all categorical).
        * ``var`` (index ``"GENE00001"``, … unique): ``feature_id`` (unique fake Ensembl ids
          ``"ENSSIM00000000001"``, …), ``sim_base_expression`` (float64 baseline proportion),
          ``sim_dispersion`` (float64 theta).
        * ``uns["simulation"]``: the parameters and seed, plus ground truth (study sizes, library
          medians, per-study type counts, marker gene names per type and lineage).

    Raises:
        ValueError: If an argument is out of range, naming it (e.g. ``n_cells`` too small to give
            every study ``min_rare_per_study`` rare cells and ``min_cells_per_type`` cells of each
            common type).
    """
    n_cells = _check_int("n_cells", n_cells, 1)
    n_genes = _check_int("n_genes", n_genes, 10)
    n_studies = _check_int("n_studies", n_studies, 1)
    n_cell_types = _check_int("n_cell_types", n_cell_types, 2)
    seed = _check_int("seed", seed, 0)
    n_common = n_cell_types - 1
    if n_lineages is None:
        n_lineages = min(3, max(1, n_common // 2))
    n_lineages = _check_int("n_lineages", n_lineages, 1)
    if n_lineages > n_common:
        raise ValueError(
            f"n_lineages ({n_lineages}) must not exceed the number of common cell types "
            f"n_cell_types - 1 = {n_common}"
        )
    rare_fraction = _check_float(
        "rare_fraction", rare_fraction, 0.0, 1.0 / n_cell_types, low_open=True, high_open=True
    )
    n_markers = _check_int("n_markers", n_markers, 1)
    n_lineage_markers = _check_int("n_lineage_markers", n_lineage_markers, 0)
    n_rare_markers = _check_int("n_rare_markers", n_rare_markers, 1)
    for name, k in (
        ("n_markers", n_markers),
        ("n_lineage_markers", n_lineage_markers),
        ("n_rare_markers", n_rare_markers),
    ):
        if k > n_genes:
            raise ValueError(f"{name} ({k}) must not exceed n_genes ({n_genes})")
    fc_lo, fc_hi = _check_range("fold_change_range", fold_change_range)
    rfc_lo, rfc_hi = _check_range("rare_fold_change_range", rare_fold_change_range)
    base_log_sd = _check_float("base_log_sd", base_log_sd, 0.0, np.inf, high_open=True)
    study_effect_sd = _check_float("study_effect_sd", study_effect_sd, 0.0, np.inf, high_open=True)
    study_effect_fraction = _check_float("study_effect_fraction", study_effect_fraction, 0.0, 1.0)
    lib_lo, lib_hi = _check_range("library_median_range", library_median_range)
    library_log_sd = _check_float("library_log_sd", library_log_sd, 0.0, 5.0)
    disp_lo, disp_hi = _check_range("dispersion_range", dispersion_range)
    type_concentration = _check_float(
        "type_concentration", type_concentration, 0.0, np.inf, low_open=True, high_open=True
    )
    min_rare_per_study = _check_int("min_rare_per_study", min_rare_per_study, 1)
    min_cells_per_type = _check_int("min_cells_per_type", min_cells_per_type, 1)

    n_rare = round(rare_fraction * n_cells)
    if n_rare < n_studies * min_rare_per_study:
        raise ValueError(
            f"n_cells={n_cells} with rare_fraction={rare_fraction} gives {n_rare} rare cells, fewer "
            f"than n_studies × min_rare_per_study = {n_studies} × {min_rare_per_study}; increase "
            "n_cells or rare_fraction, or reduce n_studies"
        )
    n_needed = n_rare + n_studies * n_common * min_cells_per_type
    if n_cells < n_needed:
        raise ValueError(
            f"n_cells={n_cells} is too small: need at least {n_needed} ({n_rare} rare cells plus "
            f"min_cells_per_type={min_cells_per_type} cells of each of {n_common} common types in "
            f"each of {n_studies} studies)"
        )

    rng = np.random.default_rng(seed)

    # ---- names ---------------------------------------------------------------------------
    type_names = [f"type_{_letters(i)}" for i in range(n_common)] + [RARE_TYPE_NAME]
    lineage_names = [f"lineage_{i}" for i in range(n_lineages)]
    type_lineage = np.array([i % n_lineages for i in range(n_common)] + [0], dtype=np.int64)
    study_names = [f"study_{i}" for i in range(n_studies)]
    width = max(5, len(str(n_genes)))
    gene_names = np.array([f"GENE{i:0{width}d}" for i in range(1, n_genes + 1)], dtype=object)
    feature_ids = np.array([f"ENSSIM{i:011d}" for i in range(1, n_genes + 1)], dtype=object)

    # ---- gene-level parameters -----------------------------------------------------------
    base_log = rng.normal(0.0, base_log_sd, size=n_genes)
    theta = _log_uniform(rng, disp_lo, disp_hi, n_genes)

    # Marker sets: disjoint blocks of a gene permutation when they fit, else independent draws.
    sizes = [n_lineage_markers] * n_lineages + [n_markers] * n_common + [n_rare_markers, n_markers]
    if sum(sizes) <= n_genes:
        perm = rng.permutation(n_genes)
        bounds = np.cumsum([0, *sizes])
        sets = [np.sort(perm[bounds[i] : bounds[i + 1]]) for i in range(len(sizes))]
    else:
        sets = [np.sort(rng.choice(n_genes, size=k, replace=False)) for k in sizes]
    lineage_sets = sets[:n_lineages]
    type_sets = sets[n_lineages : n_lineages + n_common + 1]  # common types, then the rare type
    activation_set = sets[-1]

    # Type log-expression profiles (n_cell_types, n_genes), before study effects.
    type_log = np.tile(base_log, (n_cell_types, 1))
    lineage_lfc = [np.log(_log_uniform(rng, fc_lo, fc_hi, len(s))) for s in lineage_sets]
    for t in range(n_cell_types):
        genes = lineage_sets[type_lineage[t]]
        type_log[t, genes] += lineage_lfc[type_lineage[t]]
    for t in range(n_cell_types):
        lo, hi = (rfc_lo, rfc_hi) if t == n_common else (fc_lo, fc_hi)
        type_log[t, type_sets[t]] += np.log(_log_uniform(rng, lo, hi, len(type_sets[t])))
    activation = np.zeros(n_genes)
    activation[activation_set] = np.log(3.0) * rng.uniform(0.5, 1.0, size=len(activation_set))

    # ---- study-level parameters ----------------------------------------------------------
    affected = rng.random(n_genes) < study_effect_fraction
    study_log = rng.normal(0.0, study_effect_sd, size=(n_studies, n_genes)) * affected[None, :]
    if n_studies == 1:
        lib_medians = np.array([np.sqrt(lib_lo * lib_hi)])
    else:
        lib_medians = np.exp(np.linspace(np.log(lib_lo), np.log(lib_hi), n_studies))
        lib_medians = lib_medians[rng.permutation(n_studies)]

    study_w = 0.5 * rng.dirichlet(np.full(n_studies, 2.0)) + 0.5 / n_studies
    base_props = rng.dirichlet(np.full(n_common, 3.0))
    # Rare cells per study: a minimum each, the rest proportional to study weights.
    rare_per_study = min_rare_per_study + rng.multinomial(
        n_rare - n_studies * min_rare_per_study, study_w
    )
    study_floor = rare_per_study + n_common * min_cells_per_type
    study_sizes = study_floor + rng.multinomial(n_cells - int(study_floor.sum()), study_w)
    type_counts = np.zeros((n_studies, n_cell_types), dtype=np.int64)
    for s in range(n_studies):
        props = rng.dirichlet(type_concentration * base_props + 1e-3)
        free = int(study_sizes[s] - study_floor[s])
        type_counts[s, :n_common] = min_cells_per_type + rng.multinomial(free, props)
        type_counts[s, n_common] = rare_per_study[s]
    assert int(type_counts.sum()) == n_cells
    assert (type_counts.sum(axis=1) == study_sizes).all()

    # ---- per-cell draws and counts, one dense block at a time ----------------------------
    blocks: list[sp.csr_matrix] = []
    cell_study: list[np.ndarray] = []
    cell_type: list[np.ndarray] = []
    for s in range(n_studies):
        types_s = rng.permutation(np.repeat(np.arange(n_cell_types), type_counts[s]))
        score_s = rng.beta(2.0, 5.0, size=len(types_s))
        lib_s = np.exp(rng.normal(np.log(lib_medians[s]), library_log_sd, size=len(types_s)))
        profile_s = type_log + study_log[s][None, :]  # (n_cell_types, n_genes)
        for start in range(0, len(types_s), _BLOCK_SIZE):
            sl = slice(start, start + _BLOCK_SIZE)
            logq = profile_s[types_s[sl]] + score_s[sl, None] * activation[None, :]
            logq -= logq.max(axis=1, keepdims=True)
            q = np.exp(logq)
            q /= q.sum(axis=1, keepdims=True)
            mean = q * lib_s[sl, None]
            counts = _draw_counts(rng, mean, theta)
            zero = np.flatnonzero(counts.sum(axis=1) == 0)
            for _ in range(100):
                if zero.size == 0:
                    break
                counts[zero] = _draw_counts(rng, mean[zero], theta)
                zero = zero[counts[zero].sum(axis=1) == 0]
            if zero.size:
                raise ValueError(
                    "library_median_range/library_log_sd give cells whose expected counts are too "
                    "low to draw a non-empty cell; increase library_median_range"
                )
            blocks.append(sp.csr_matrix(counts.astype(np.float32)))
        cell_study.append(np.full(len(types_s), s, dtype=np.int64))
        cell_type.append(types_s)

    X = sp.vstack(blocks, format="csr", dtype=np.float32)
    study_idx = np.concatenate(cell_study)
    type_idx = np.concatenate(cell_type)
    assert X.shape == (n_cells, n_genes)
    assert (np.asarray(X.sum(axis=1)).ravel() > 0).all(), "a simulated cell has zero counts"

    obs = pd.DataFrame(
        {
            "study": pd.Categorical.from_codes(study_idx, categories=study_names),
            "cell_type": pd.Categorical.from_codes(type_idx, categories=type_names),
            "lineage": pd.Categorical.from_codes(type_lineage[type_idx], categories=lineage_names),
        },
        index=pd.Index([f"cell_{i:0{max(6, len(str(n_cells)))}d}" for i in range(n_cells)]),
    )
    base_expr = np.exp(base_log - base_log.max())
    var = pd.DataFrame(
        {
            "feature_id": feature_ids,
            "sim_base_expression": base_expr / base_expr.sum(),
            "sim_dispersion": theta,
        },
        index=pd.Index(gene_names),
    )
    simulation: dict[str, Any] = {
        "seed": seed,
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_studies": n_studies,
        "n_cell_types": n_cell_types,
        "rare_fraction": rare_fraction,
        "n_lineages": n_lineages,
        "n_markers": n_markers,
        "n_lineage_markers": n_lineage_markers,
        "n_rare_markers": n_rare_markers,
        "fold_change_range": np.array([fc_lo, fc_hi]),
        "rare_fold_change_range": np.array([rfc_lo, rfc_hi]),
        "base_log_sd": base_log_sd,
        "study_effect_sd": study_effect_sd,
        "study_effect_fraction": study_effect_fraction,
        "library_median_range": np.array([lib_lo, lib_hi]),
        "library_log_sd": library_log_sd,
        "dispersion_range": np.array([disp_lo, disp_hi]),
        "type_concentration": type_concentration,
        "min_rare_per_study": min_rare_per_study,
        "min_cells_per_type": min_cells_per_type,
        # ground truth
        "rare_type": RARE_TYPE_NAME,
        "study_names": np.array(study_names, dtype=object),
        "cell_type_names": np.array(type_names, dtype=object),
        "cell_type_lineage": np.array([lineage_names[i] for i in type_lineage], dtype=object),
        "study_sizes": study_sizes.astype(np.int64),
        "study_library_median": lib_medians,
        "study_type_counts": type_counts,
        "marker_genes": {
            name: gene_names[type_sets[t]].astype(str) for t, name in enumerate(type_names)
        },
        "lineage_marker_genes": {
            name: gene_names[lineage_sets[i]].astype(str) for i, name in enumerate(lineage_names)
        },
        "activation_genes": gene_names[activation_set].astype(str),
    }
    return ad.AnnData(X=X, obs=obs, var=var, uns={"simulation": simulation})


def write_simulated_atlas(path: str | Path, **kwargs: Any) -> Path:
    """Simulate an atlas with :func:`simulate_atlas` and write it to an ``.h5ad`` file atomically.

    The file is written under a temporary name in the same directory and then moved into place
    with :func:`os.replace`, so readers never see a partial file. Parent directories are created.

    Args:
        path: Destination ``.h5ad`` path (an existing file is replaced).
        **kwargs: Passed to :func:`simulate_atlas`.

    Returns:
        The destination path as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``path`` does not end in ``.h5ad``, or on invalid simulation arguments.
    """
    path = Path(path)
    if path.suffix != ".h5ad":
        raise ValueError(f"path must end in .h5ad, got {str(path)!r}")
    return write_h5ad_atomic(simulate_atlas(**kwargs), path)
