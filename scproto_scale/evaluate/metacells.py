"""Metacell (prototype) quality: purity, rare-type coverage, cross-study mixing."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd


def metacell_quality(metacells: ad.AnnData, labels: np.ndarray | None, min_type_cells: int = 10
                     ) -> dict:
    """Summary of the metacells built by :meth:`PrototypeAtlas.build_metacells`.

    Args:
        metacells: ``(K, G)`` AnnData with obs ``n_cells``, ``cross_study`` and, with labels,
            ``label`` (majority of the 10 most similar cells), ``majority_label`` and ``purity``.
        labels: ``(n,)`` cell-type labels of the embedded cells, or None.
        min_type_cells: types with at least this many cells must be covered.

    Returns:
        ``n_prototypes``, ``n_used`` (≥ 1 assigned cell), ``cross_study_fraction`` (of used
        prototypes, cells from ≥ 2 studies) and, with labels, ``purity`` (mean over used
        prototypes of the majority-label fraction of their cells), ``rare_type_coverage``
        (fraction of types with ≥ ``min_type_cells`` cells that label ≥ 1 used prototype),
        ``uncovered_types`` and per-type prototype counts.
    """
    obs = metacells.obs
    used = obs["n_cells"].to_numpy() > 0
    out: dict = {
        "n_prototypes": int(metacells.n_obs),
        "n_used": int(used.sum()),
        "cross_study_fraction": float(obs.loc[used, "cross_study"].mean()) if used.any() else 0.0,
        "median_cells_per_used_prototype": float(np.median(obs.loc[used, "n_cells"]))
        if used.any() else 0.0,
    }
    if labels is None:
        return out
    counts = pd.Series(np.asarray(labels).astype(str)).value_counts()
    eligible = sorted(counts[counts >= min_type_cells].index)
    # Only prototypes that some cell is assigned to count as covering a type.
    labelled = set(obs.loc[used, "label"].astype(str))
    by_label = obs.loc[used, "label"].astype(str).value_counts()
    covered = [t for t in eligible if t in labelled]
    out.update({
        "purity": float(obs.loc[used, "purity"].mean()),
        "rare_type_coverage": len(covered) / max(1, len(eligible)),
        "uncovered_types": [t for t in eligible if t not in labelled],
        "prototypes_per_type": {t: int(by_label.get(t, 0)) for t in eligible},
        "type_sizes": {t: int(counts[t]) for t in eligible},
    })
    return out


def partition_quality(assign: np.ndarray, rep: np.ndarray, counts, labels: np.ndarray | None,
                      studies: np.ndarray, min_type_cells: int = 10) -> dict:
    """Quality of a hard cell → metacell partition, the same for every metacell method.

    Definitions follow SEACells (Persad et al. 2023, Nat. Biotechnol.) and the
    MetacellAnalysisToolkit (Bilous et al. 2024): ``purity`` (↑) is the mean over metacells of
    the majority-label fraction of their cells; ``compactness`` (↓) the mean over metacells of the
    per-dimension variance of their cells in ``rep``; ``separation`` (↑) the mean over metacells
    of the Euclidean distance from their centroid in ``rep`` to the nearest other centroid;
    ``inv`` (↓) the mean over metacells with ≥ 2 cells of the 95th percentile over genes of the
    inner normalised variance (variance / mean of counts per 10,000, genes with mean > 0);
    ``cross_study_fraction`` the fraction of metacells drawing cells from ≥ 2 studies;
    ``rare_type_coverage`` the fraction of types with ≥ ``min_type_cells`` cells that are the
    majority of ≥ 1 metacell.

    Args:
        assign: ``(n,)`` int metacell of each cell (only non-empty metacells count).
        rep: ``(n, d)`` representation for compactness / separation (use the same one for
            every method compared, e.g. the unintegrated PCA).
        counts: ``(n, G)`` raw counts (scipy sparse or dense) for INV.
        labels: ``(n,)`` cell types or None; studies: ``(n,)`` study of each cell.

    Returns:
        Dict of the metrics above plus ``n_metacells`` and, with labels, ``uncovered_types``.
    """
    import scipy.sparse as sp

    codes, assign = np.unique(np.asarray(assign), return_inverse=True)
    m = len(codes)
    rep = np.asarray(rep, dtype=np.float64)
    sizes = np.bincount(assign, minlength=m)
    onehot = sp.csr_matrix((np.ones(len(assign)), (assign, np.arange(len(assign)))),
                           shape=(m, len(assign)))
    centroids = (onehot @ rep) / sizes[:, None]
    sq = (onehot @ rep**2) / sizes[:, None]
    compact = (sq - centroids**2).clip(min=0).mean(axis=1)
    if m > 1:
        d2 = (centroids**2).sum(1)[:, None] + (centroids**2).sum(1)[None] - 2 * centroids @ centroids.T
        np.fill_diagonal(d2, np.inf)
        separation = float(np.sqrt(d2.clip(min=0).min(axis=1)).mean())
    else:
        separation = float("nan")
    X = sp.csr_matrix(counts, dtype=np.float64)
    lib = np.asarray(X.sum(axis=1)).ravel()
    Xn = sp.diags(1e4 / np.maximum(lib, 1)) @ X
    mean = (onehot @ Xn).toarray() / sizes[:, None]  # (m, G): small, metacells × genes
    var = ((onehot @ Xn.multiply(Xn)).toarray() / sizes[:, None] - mean**2).clip(min=0)
    inv = [np.percentile(var[k][mean[k] > 0] / mean[k][mean[k] > 0], 95)
           for k in range(m) if sizes[k] >= 2 and (mean[k] > 0).any()]
    n_studies = pd.crosstab(assign, np.asarray(studies).astype(str)).gt(0).sum(axis=1)
    out: dict = {
        "n_metacells": m,
        "compactness": float(compact.mean()),
        "separation": separation,
        "inv": float(np.mean(inv)) if inv else float("nan"),
        "cross_study_fraction": float((n_studies >= 2).mean()),
    }
    if labels is None:
        return out
    tab = pd.crosstab(assign, np.asarray(labels).astype(str))
    out["purity"] = float((tab.max(axis=1) / tab.sum(axis=1)).mean())
    majority = set(tab.idxmax(axis=1))
    counts_per_type = tab.sum(axis=0)
    eligible = sorted(counts_per_type[counts_per_type >= min_type_cells].index)
    out["rare_type_coverage"] = sum(t in majority for t in eligible) / max(1, len(eligible))
    out["uncovered_types"] = [t for t in eligible if t not in majority]
    return out
