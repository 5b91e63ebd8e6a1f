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
