"""A synthetic atlas at atlas scale, streamed to zarr and/or TileDB-SOMA in row blocks.

The in-memory generator (:mod:`scproto_scale.simulate`) draws every (cell, gene) entry; at
20k genes × millions of cells that is too slow and too big. This one costs O(UMIs), never holds
the matrix, and gives realistic sparsity (median ≈ 1,000–2,000 non-zeros per cell over 20k genes):

* genes: baseline log-means ``Normal(0, 1.5)``; lineage, cell-type and rare-type marker
  programmes (fold changes log-uniform 2–10×, 4–15× for rare types) as in ``simulate.py``;
  a shared "activation" programme applied at ``n_activation_levels`` levels (per-cell
  ``Beta(2, 5)`` score, quantised).
* studies: ``n_studies`` sizes log-spaced over ``study_size_ratio`` (default 100×: two orders
  of magnitude), in random order; each has its own cell-type proportions (Dirichlet), a
  gene-wise log-scaling on 15 % of genes (sd 0.4), a median library size (log-spaced over
  ``library_median_range``), an assay and a tissue label; a few are ``is_primary_data=False``.
* rare types (``rare_fractions``, e.g. 0.2 % and 0.05 % of all cells) occur in a random
  third of the studies.
* counts: cell ``c`` has library ``L_c ~ LogNormal(log median_s, 0.35)`` UMIs, drawn
  multinomially over genes from its (study, type, activation level) profile. The UMI gene ids
  are drawn as sorted uniforms per cell (normalised exponential spacings) mapped through the
  profile's CDF with a guide table, so counting them is a run-length pass: no per-(cell, gene)
  work at all. Within-cell noise is therefore multinomial (Poisson-like); over-dispersion across
  cells comes from library size, cell type and activation state.

Cells are grouped by study, in random order within a study. All randomness comes from one
``np.random.default_rng(seed)`` and the fixed block size: same arguments, same store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scproto_scale.data.writers import SomaWriter, ZarrCSRWriter
from scproto_scale.simulate import _letters, _log_uniform

__all__ = ["ScaledAtlasSpec", "write_scaled_atlas"]

_BLOCK_CELLS = 8_192  # rows generated and written per block (fixed: the stream depends on it)
_ASSAYS = ["10x 3' v3", "10x 3' v2", "10x 5' v2", "Smart-seq2"]
_TISSUES = ["blood", "lung", "liver", "kidney", "brain", "gut"]


class ScaledAtlasSpec:
    """The atlas parameters (drawn once from the seed); profiles are built per study on demand.

    Args: see :func:`write_scaled_atlas`.
    """

    def __init__(self, n_cells: int, n_genes: int, n_studies: int, n_cell_types: int,
                 rare_fractions: tuple[float, ...], study_size_ratio: float,
                 library_median_range: tuple[float, float], n_activation_levels: int, seed: int):
        if n_cells < 10 * n_studies:
            raise ValueError(f"n_cells={n_cells} must be ≥ 10 × n_studies={n_studies}")
        if n_genes < 200:
            raise ValueError(f"n_genes={n_genes} must be ≥ 200")
        n_rare = len(rare_fractions)
        n_common = n_cell_types - n_rare
        if n_common < 2:
            raise ValueError(f"n_cell_types={n_cell_types} leaves fewer than 2 common types "
                             f"beside {n_rare} rare types")
        if study_size_ratio < 1:
            raise ValueError(f"study_size_ratio must be ≥ 1, got {study_size_ratio}")
        self.rng = rng = np.random.default_rng(seed)
        self.n_cells, self.n_genes, self.n_studies = n_cells, n_genes, n_studies
        self.type_names = [f"type_{_letters(i)}" for i in range(n_common)] + [
            f"rare_{i}" for i in range(n_rare)]
        self.study_names = [f"study_{i:03d}" for i in range(n_studies)]
        self.feature_ids = [f"ENSSIM{i:011d}" for i in range(1, n_genes + 1)]
        self.feature_names = [f"GENE{i:05d}" for i in range(1, n_genes + 1)]

        # Gene programmes: baseline, lineages (3), types, rare types, activation.
        base = rng.normal(0.0, 1.5, n_genes)
        n_lin = min(3, n_common)
        sizes = [60] * n_lin + [50] * n_common + [40] * n_rare + [40]
        perm = rng.permutation(n_genes)
        bounds = np.cumsum([0, *sizes])
        if bounds[-1] > n_genes:
            raise ValueError(f"n_genes={n_genes} too small for {bounds[-1]} marker genes")
        sets = [perm[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
        self.type_log = np.tile(base, (n_cell_types, 1))
        lineage = [i % n_lin for i in range(n_common)] + [0] * n_rare
        for t in range(n_cell_types):
            lin = sets[lineage[t]]
            self.type_log[t, lin] += np.log(_log_uniform(rng, 2.0, 10.0, len(lin)))
            lo, hi = (4.0, 15.0) if t >= n_common else (2.0, 10.0)
            own = sets[n_lin + t]
            self.type_log[t, own] += np.log(_log_uniform(rng, lo, hi, len(own)))
        self.activation = np.zeros(n_genes)
        self.activation[sets[-1]] = np.log(3.0) * rng.uniform(0.5, 1.0, len(sets[-1]))
        self.n_levels = n_activation_levels
        affected = rng.random(n_genes) < 0.15
        self.study_log = rng.normal(0.0, 0.4, (n_studies, n_genes)) * affected

        # Study sizes over study_size_ratio (log-spaced, shuffled), libraries, labels.
        w = np.exp(np.linspace(0.0, np.log(study_size_ratio), n_studies))[rng.permutation(n_studies)]
        self.study_sizes = 10 + rng.multinomial(n_cells - 10 * n_studies, w / w.sum())
        lo, hi = library_median_range
        self.lib_median = np.exp(np.linspace(np.log(lo), np.log(hi), n_studies))[
            rng.permutation(n_studies)]
        self.assay = rng.choice(len(_ASSAYS), n_studies, p=[0.6, 0.2, 0.15, 0.05])
        self.tissue = rng.integers(0, len(_TISSUES), n_studies)
        self.primary = rng.random(n_studies) > 0.05

        # Per-study type counts: Dirichlet proportions over common types, rare types in a third.
        base_p = rng.dirichlet(np.full(n_common, 3.0))
        has_rare = rng.random((n_studies, n_rare)) < 1 / 3
        has_rare[rng.integers(0, n_studies, n_rare), np.arange(n_rare)] = True
        self.type_counts = np.zeros((n_studies, n_cell_types), dtype=np.int64)
        for r, frac in enumerate(rare_fractions):
            hosts = np.flatnonzero(has_rare[:, r])
            p = self.study_sizes[hosts] / self.study_sizes[hosts].sum()
            self.type_counts[hosts, n_common + r] = rng.multinomial(round(frac * n_cells), p)
        self.type_counts[:, n_common:] = np.minimum(self.type_counts[:, n_common:],
                                                    (self.study_sizes // 2)[:, None])
        for s in range(n_studies):
            free = int(self.study_sizes[s] - self.type_counts[s, n_common:].sum())
            props = rng.dirichlet(5.0 * base_p + 1e-2)
            self.type_counts[s, :n_common] = rng.multinomial(free, props)

    def study_cdfs(self, s: int) -> np.ndarray:
        """``(n_types, n_levels, G)`` float64 CDFs over genes of study ``s``'s profiles."""
        levels = (np.arange(self.n_levels) + 0.5) / self.n_levels
        logq = (self.type_log[:, None, :] + self.study_log[s][None, None, :]
                + levels[None, :, None] * self.activation[None, None, :])
        logq -= logq.max(axis=2, keepdims=True)
        q = np.exp(logq)
        cdf = np.cumsum(q, axis=2)
        cdf /= cdf[:, :, -1:]
        cdf[:, :, -1] = 1.0
        return cdf


def _guide_tables(cdfs: np.ndarray, m: int) -> np.ndarray:
    """Guide tables of CDFs ``(..., G)`` → ``(..., m)`` int64, in O(G + m) each.

    ``guide[j]`` ≤ the first gene whose CDF exceeds ``j / m`` (counts genes with
    ``ceil(cdf·m) + 1 ≤ j``; the +1 keeps it a lower bound under float rounding), so the lookup
    of any ``u ≥ j/m`` may start there and only step forward.
    """
    flat = cdfs.reshape(-1, cdfs.shape[-1])
    bins = np.minimum(np.ceil(flat * m).astype(np.int64) + 1, m)
    key = (np.arange(len(flat))[:, None] * (m + 1) + bins).ravel()
    hist = np.bincount(key, minlength=len(flat) * (m + 1)).reshape(len(flat), m + 1)
    return np.cumsum(hist, axis=1)[:, :m].reshape(*cdfs.shape[:-1], m)


def _draw_genes(u: np.ndarray, cdf: np.ndarray, guide: np.ndarray) -> np.ndarray:
    """Inverse-CDF lookup ``first g with cdf[g] > u`` via a guide table (O(1) expected)."""
    g = guide[np.minimum((u * len(guide)).astype(np.int64), len(guide) - 1)]
    todo = np.flatnonzero(cdf[g] <= u)
    while len(todo):
        g[todo] += 1
        todo = todo[cdf[g[todo]] <= u[todo]]
    return np.minimum(g, len(cdf) - 1)


def _sorted_uniforms(rng: np.random.Generator, lengths: np.ndarray) -> np.ndarray:
    """Concatenated sorted Uniform(0,1) samples, ``lengths[i]`` of them for segment i.

    Normalised cumulative sums of ``lengths[i] + 1`` exponential spacings (order statistics).
    """
    n = len(lengths)
    e = rng.standard_exponential(int(lengths.sum()) + n)
    cs = np.cumsum(e)
    ends = np.cumsum(lengths + 1) - 1  # index of each segment's extra (closing) spacing
    starts = ends - lengths
    before = np.concatenate([[0.0], cs[ends[:-1]]])
    total = cs[ends] - before
    seg = np.repeat(np.arange(n), lengths)
    keep = np.ones(len(cs), dtype=bool)
    keep[ends] = False
    del starts
    return (cs[keep] - before[seg]) / total[seg]


def _block_counts(rng, spec: ScaledAtlasSpec, cdfs, guides, types, levels, libs) -> sp.csr_matrix:
    """CSR counts of one block of cells (one study), rows in the given order."""
    G = spec.n_genes
    order = np.lexsort((levels, types))
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    ts, ls, L = types[order], levels[order], libs[order]
    key_parts, row_offsets = [], []
    bounds = np.flatnonzero((np.diff(ts) != 0) | (np.diff(ls) != 0)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [len(ts)]])
    for a, b in zip(starts, stops, strict=True):
        t, lv = int(ts[a]), int(ls[a])
        u = _sorted_uniforms(rng, L[a:b])
        genes = _draw_genes(u, cdfs[t, lv], guides[t, lv])
        cell = np.repeat(np.arange(a, b, dtype=np.int64), L[a:b])
        key_parts.append(cell * G + genes)
        row_offsets.append(a)
    key = np.concatenate(key_parts)  # nondecreasing: cells in order, genes sorted per cell
    change = np.flatnonzero(np.diff(key)) + 1
    run_start = np.concatenate([[0], change])
    counts = np.diff(np.concatenate([run_start, [len(key)]])).astype(np.float32)
    uk = key[run_start]
    rows, cols = uk // G, (uk % G).astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(ts)))])
    X = sp.csr_matrix((counts, cols, indptr), shape=(len(ts), G))
    return X[inv]


def write_scaled_atlas(
    zarr_path: str | Path | None = None,
    soma_path: str | Path | None = None,
    n_cells: int = 1_000_000,
    n_genes: int = 20_000,
    n_studies: int = 120,
    n_cell_types: int = 22,
    rare_fractions: tuple[float, ...] = (0.002, 0.0005),
    study_size_ratio: float = 100.0,
    library_median_range: tuple[float, float] = (1_500.0, 4_000.0),
    n_activation_levels: int = 4,
    seed: int = 0,
    zarr_chunk_elems: int = 1 << 18,
    overwrite: bool = False,
) -> dict:
    """Stream a synthetic atlas to a zarr store and/or a SOMA experiment (the same cells).

    Memory is bounded by one block of 8,192 cells (O(block UMIs)) plus obs; X is never held.

    Args:
        zarr_path: AnnData zarr (v3) store to write (``None``: skip).
        soma_path: TileDB-SOMA experiment to write, Census layout (``None``: skip).
        n_cells: total cells (≥ 10 × n_studies).
        n_genes: genes (≥ 200; ~20k is realistic).
        n_studies: studies (obs ``study`` = ``dataset_id``).
        n_cell_types: types including the rare ones.
        rare_fractions: fraction of all cells of each rare type (``rare_0``, ``rare_1``, …).
        study_size_ratio: largest / smallest expected study size.
        library_median_range: per-study median UMIs per cell (log-spaced over studies).
        n_activation_levels: quantisation of the activation score.
        seed: the random seed.
        zarr_chunk_elems: chunk length of the zarr ``X/data`` and ``X/indices``.
        overwrite: replace existing stores.

    Returns:
        Summary: ``n_cells``, ``n_genes``, ``nnz``, ``median_nnz_per_cell``, ``study_sizes``
        (min/median/max), ``type_counts`` per type, and the paths written.

    Raises:
        ValueError: bad sizes; ScprotoInputError: an existing target without ``overwrite``.
    """
    if zarr_path is None and soma_path is None:
        raise ValueError("give zarr_path and/or soma_path")
    spec = ScaledAtlasSpec(n_cells, n_genes, n_studies, n_cell_types, tuple(rare_fractions),
                           study_size_ratio, library_median_range, n_activation_levels, seed)
    rng = spec.rng
    var = pd.DataFrame({"feature_id": spec.feature_ids, "feature_name": spec.feature_names},
                       index=pd.Index(spec.feature_ids))
    writers = []
    if zarr_path is not None:
        writers.append(ZarrCSRWriter(zarr_path, var, chunk_elems=zarr_chunk_elems,
                                     overwrite=overwrite))
    if soma_path is not None:
        writers.append(SomaWriter(soma_path, var, n_cells, overwrite=overwrite))
    obs_study, obs_type, nnz_per_cell = [], [], []
    n_levels = spec.n_levels
    guide_m = 4 * n_genes
    for s in range(n_studies):
        cdfs = spec.study_cdfs(s)
        guides = _guide_tables(cdfs, guide_m)
        types_s = rng.permutation(np.repeat(np.arange(len(spec.type_names)), spec.type_counts[s]))
        score = rng.beta(2.0, 5.0, len(types_s))
        levels_s = np.minimum((score * n_levels).astype(np.int64), n_levels - 1)
        libs_s = np.maximum(1, np.round(np.exp(rng.normal(np.log(spec.lib_median[s]), 0.35,
                                                          len(types_s))))).astype(np.int64)
        for a in range(0, len(types_s), _BLOCK_CELLS):
            sl = slice(a, a + _BLOCK_CELLS)
            X = _block_counts(rng, spec, cdfs, guides, types_s[sl], levels_s[sl], libs_s[sl])
            nnz_per_cell.append(np.diff(X.indptr))
            for w in writers:
                w.append(X)
        obs_study.append(np.full(len(types_s), s))
        obs_type.append(types_s)
    study = np.concatenate(obs_study)
    ctype = np.concatenate(obs_type)
    width = len(str(n_cells))
    obs = pd.DataFrame({
        "study": pd.Categorical.from_codes(study, spec.study_names),
        "dataset_id": pd.Categorical.from_codes(study, spec.study_names),
        "assay": pd.Categorical.from_codes(spec.assay[study], _ASSAYS),
        "tissue": pd.Categorical.from_codes(spec.tissue[study], _TISSUES),
        "cell_type": pd.Categorical.from_codes(ctype, spec.type_names),
        "is_primary_data": spec.primary[study],
    }, index=pd.Index([f"cell_{i:0{width}d}" for i in range(n_cells)]))
    paths = {}
    for w in writers:
        if isinstance(w, ZarrCSRWriter):
            paths["zarr"] = str(w.finish(obs, uns={"simulation_seed": seed}))
        else:
            paths["soma"] = str(w.finish(obs))
    nnz = np.concatenate(nnz_per_cell)
    return {
        "n_cells": n_cells, "n_genes": n_genes, "n_studies": n_studies, "nnz": int(nnz.sum()),
        "median_nnz_per_cell": float(np.median(nnz)),
        "study_size_min_median_max": [int(spec.study_sizes.min()),
                                      int(np.median(spec.study_sizes)),
                                      int(spec.study_sizes.max())],
        "type_counts": dict(zip(spec.type_names, spec.type_counts.sum(0).tolist(), strict=True)),
        "paths": paths,
    }
