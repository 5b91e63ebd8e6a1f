"""Cell-type probes: kNN and linear-probe F1 of embeddings, and the marker classification of
the scProto paper's Fig. 2 (Hashemi et al. 2025).

All scores are macro F1 of stratified k-fold cross-validated predictions (sklearn), seeded.
Fig. 2 compares, on the cells of two similar types (NK vs CD8 T with TYROBP vs CD8A; CD4 vs
CD8 T with CD4 / CD8A / CD8B), a classifier on each cell's own log-normalised marker counts, on
the markers of its metacell (the decoded profile of its nearest prototype, or its k-means
cluster's mean) and on the embeddings: metacells denoise the sparse single-cell markers.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

# pair name → (canonical types, marker genes in the paper's order)
MARKER_PAIRS: dict[str, tuple[tuple[str, str], tuple[str, ...]]] = {
    "nk_vs_cd8": (("NK", "CD8 T"), ("TYROBP", "CD8A")),
    "cd4_vs_cd8": (("CD4 T", "CD8 T"), ("CD4", "CD8A", "CD8B")),
}


def _usable(labels: np.ndarray, what: str, min_cells: int = 2) -> np.ndarray:
    """Mask of cells whose label has ≥ ``min_cells`` cells; warns naming the dropped labels."""
    counts = pd.Series(labels).value_counts()
    small = sorted(counts[counts < min_cells].index.astype(str))
    if small:
        warnings.warn(f"{what}: cell types with < {min_cells} cells cannot be cross-validated "
                      f"and are left out: {small}", stacklevel=3)
    return ~pd.Series(labels).isin(small).to_numpy()


def cv_macro_f1(X: np.ndarray, y: np.ndarray, classifier: str, seed: int, n_splits: int = 5,
                what: str = "probe") -> float:
    """Macro F1 of ``n_splits``-fold stratified cross-validated predictions.

    Args:
        X: ``(n, d)`` features; y: ``(n,)`` labels.
        classifier: ``"knn"`` (15 neighbours, Euclidean) or ``"linear"`` (standardised features,
            logistic regression).
        seed: fold shuffling seed; what: name used in warnings.

    Returns:
        Macro F1 over the labels with ≥ 2 cells; NaN (with a warning) if fewer than 2 labels
        remain.
    """
    y = np.asarray(y).astype(str)
    keep = _usable(y, what)
    X, y = np.asarray(X, dtype=np.float32)[keep], y[keep]
    if len(np.unique(y)) < 2:
        warnings.warn(f"{what}: fewer than 2 cell types with ≥ 2 cells; F1 undefined", stacklevel=2)
        return float("nan")
    folds = int(min(n_splits, pd.Series(y).value_counts().min()))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    if classifier == "knn":
        model = KNeighborsClassifier(n_neighbors=min(15, len(y) - len(y) // folds - 1))
    elif classifier == "linear":
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    else:
        raise ValueError(f"classifier must be 'knn' or 'linear', not {classifier!r}")
    pred = cross_val_predict(model, X, y, cv=cv)
    return float(f1_score(y, pred, average="macro"))


def embedding_probes(X: np.ndarray, labels: np.ndarray, seed: int, what: str = "embedding"
                     ) -> dict[str, float]:
    """``{"knn_f1", "linear_f1"}``: macro F1 of cell type from an embedding ``(n, d)``."""
    return {"knn_f1": cv_macro_f1(X, labels, "knn", seed, what=f"{what} kNN"),
            "linear_f1": cv_macro_f1(X, labels, "linear", seed, what=f"{what} linear probe")}


def log_normalise(counts, genes: list[str], all_genes: list[str]) -> np.ndarray:
    """``(n, len(genes))`` log1p counts per 10,000 of the given genes (library over all genes)."""
    X = sp.csr_matrix(counts, dtype=np.float64)
    lib = np.maximum(np.asarray(X.sum(axis=1)).ravel(), 1.0)
    cols = [all_genes.index(g) for g in genes]
    sub = X[:, cols].toarray() if len(cols) else np.zeros((X.shape[0], 0))
    return np.log1p(sub * (1e4 / lib)[:, None]).astype(np.float32)


def marker_classification(
    labels: np.ndarray, type_names: dict[str, str], seed: int, *,
    cell_markers: tuple[np.ndarray, list[str]],
    metacell_markers: dict[str, tuple[np.ndarray, list[str]]],
    embeddings: dict[str, np.ndarray],
) -> dict[str, dict]:
    """Fig. 2 of the scProto paper: macro F1 of two-type classifiers on several feature sets.

    Args:
        labels: ``(n,)`` cell types as named in the dataset.
        type_names: canonical type (``"NK"``, ``"CD8 T"``, ``"CD4 T"``) → dataset label; a
            pair whose types are not both present is skipped with a warning.
        seed: cross-validation seed.
        cell_markers: ``(features (n, g), gene names)``: each cell's log-normalised counts of
            the available marker genes.
        metacell_markers: method → ``(features (n, g'), gene names)``: the log-normalised
            markers of each cell's metacell (e.g. scProto's nearest prototype).
        embeddings: method → ``(n, d)`` embedding.

    Returns:
        ``{pair: {"n_cells", "markers", "missing_markers", "f1": {feature set: macro F1}}}``;
        feature sets are ``"cell_markers"``, ``"metacell_markers:<method>"`` and
        ``"embedding:<method>"`` (logistic regression on standardised features, 5 folds).
    """
    labels = np.asarray(labels).astype(str)
    out: dict[str, dict] = {}
    for pair, (types, markers) in MARKER_PAIRS.items():
        names = [type_names.get(t) for t in types]
        if None in names or not all((labels == n).any() for n in names):
            warnings.warn(f"marker classification {pair}: types {types} not both present "
                          f"(dataset names {names}); skipped", stacklevel=2)
            continue
        mask = np.isin(labels, names)
        y = labels[mask]
        res: dict = {"n_cells": int(mask.sum()), "f1": {}}
        sets = {"cell_markers": cell_markers}
        sets.update({f"metacell_markers:{m}": v for m, v in metacell_markers.items()})
        for name, (feats, genes) in sets.items():
            idx = [genes.index(g) for g in markers if g in genes]
            if name == "cell_markers":
                res["markers"] = [g for g in markers if g in genes]
                res["missing_markers"] = [g for g in markers if g not in genes]
                if res["missing_markers"]:
                    warnings.warn(f"marker classification {pair}: markers "
                                  f"{res['missing_markers']} are not among the genes",
                                  stacklevel=2)
            if not idx:
                warnings.warn(f"marker classification {pair}: no marker of {list(markers)} in "
                              f"{name}; skipped", stacklevel=2)
                continue
            res["f1"][name] = cv_macro_f1(feats[mask][:, idx], y, "linear", seed,
                                          what=f"{pair} {name}")
        for m, Z in embeddings.items():
            res["f1"][f"embedding:{m}"] = cv_macro_f1(Z[mask], y, "linear", seed,
                                                      what=f"{pair} embedding {m}")
        out[pair] = res
    return out
