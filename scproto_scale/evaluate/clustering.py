"""Clustering and annotation metrics of the companion methods (method.md §10).

Clustering: NMI and ARI (scikit-learn), clustering accuracy and macro F1 after the
Hungarian matching of clusters to labels (scipy's ``linear_sum_assignment``), as in scDeepCluster /
scGPCL. Annotation: top-1 / top-3 accuracy and macro F1.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import (
    adjusted_rand_score,
    f1_score,
    normalized_mutual_info_score,
    top_k_accuracy_score,
)


def hungarian_match(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Map each predicted cluster to a true label by maximum-weight matching.

    Args:
        y_true: ``(n,)`` labels (any hashable dtype).
        y_pred: ``(n,)`` cluster ids.

    Returns:
        ``(n,)`` predicted labels in ``y_true``'s label space; clusters left unmatched
        (more clusters than labels) get a label no true cell has (``"<unmatched>"`` / -1).
    """
    t_codes, t_uniq = _codes(y_true)
    p_codes, p_uniq = _codes(y_pred)
    w = np.zeros((len(p_uniq), len(t_uniq)), dtype=np.int64)
    np.add.at(w, (p_codes, t_codes), 1)
    rows, cols = linear_sum_assignment(w, maximize=True)
    mapping = np.full(len(p_uniq), -1, dtype=np.int64)
    mapping[rows] = cols
    mapped = mapping[p_codes]
    out = np.empty(len(y_true), dtype=object)
    out[mapped >= 0] = t_uniq[mapped[mapped >= 0]]
    out[mapped < 0] = "<unmatched>"
    return out


def _codes(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, codes = np.unique(np.asarray(y).astype(str), return_inverse=True)
    return codes, uniq


def clustering_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """NMI, ARI, Hungarian accuracy and macro F1 of a clustering.

    Args:
        y_true: ``(n,)`` true labels; y_pred: ``(n,)`` cluster ids.

    Returns:
        ``{"nmi", "ari", "acc", "macro_f1"}`` in [0, 1] (ARI may be negative).
    """
    y_true = np.asarray(y_true).astype(str)
    y_pred = np.asarray(y_pred).astype(str)
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels vs {len(y_pred)} predictions")
    matched = hungarian_match(y_true, y_pred).astype(str)
    return {
        "nmi": float(normalized_mutual_info_score(y_true, y_pred)),
        "ari": float(adjusted_rand_score(y_true, y_pred)),
        "acc": float((matched == y_true).mean()),
        "macro_f1": float(f1_score(y_true, matched, labels=np.unique(y_true), average="macro",
                                   zero_division=0)),
    }


def annotation_scores(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """Top-1 / top-3 accuracy and macro F1 of class probabilities.

    Args:
        y_true: ``(n,)`` true labels, all in ``classes``.
        proba: ``(n, C)`` class probabilities (columns in ``classes`` order).
        classes: ``(C,)`` class names.

    Returns:
        ``{"top1", "top3", "macro_f1"}``.
    """
    classes = np.asarray(classes)
    pred = classes[np.argmax(proba, axis=1)]
    k = min(3, len(classes))
    return {
        "top1": float((pred == np.asarray(y_true)).mean()),
        "top3": float(top_k_accuracy_score(y_true, proba, k=k, labels=classes))
        if len(classes) > 2 else float((pred == np.asarray(y_true)).mean()),
        "macro_f1": float(f1_score(y_true, pred, labels=classes, average="macro", zero_division=0)),
    }
