"""Cell-type annotation on frozen embeddings: optional contrastive head, then a classifier.

method.md §10. :class:`Annotator` = standardise z → (MLP-CL | MLS-CL | nothing) → logistic
regression or a small MLP (scikit-learn). :func:`balanced_splits` draws the benchmark's
train/validation/test splits (default ~500 cells per type, data-scarce ~60).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

from scproto_scale.companion.heads import ContrastiveHead, fit_head, transform
from scproto_scale.config import AnnotateHeadConfig
from scproto_scale.errors import ScprotoInputError
from scproto_scale.evaluate.clustering import annotation_scores


class Annotator:
    """Classifier on (optionally head-transformed) frozen embeddings.

    Args:
        cfg: head kind, classifier and head training settings.
        seed: seeds the head and the classifier.
    """

    def __init__(self, cfg: AnnotateHeadConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.classes_: np.ndarray | None = None
        self.head: ContrastiveHead | None = None

    def _features(self, z: np.ndarray) -> np.ndarray:
        zs = self.scaler.transform(np.asarray(z, dtype=np.float32)).astype(np.float32)
        return zs if self.head is None else transform(self.head, zs)

    def fit(self, z: np.ndarray, labels: np.ndarray, head_from: Annotator | None = None
            ) -> Annotator:
        """Train on ``(n, d)`` embeddings and ``(n,)`` string labels.

        ``head_from``: an annotator already fitted on the same cells whose scaler and head are
        reused (only the classifier is trained), e.g. to compare classifiers on one head.

        Raises:
            ScprotoInputError: shape mismatch, fewer than 2 classes, or a class with 1 cell.
        """
        labels = np.asarray(labels).astype(str)
        if len(z) != len(labels):
            raise ScprotoInputError(f"{len(z)} embeddings but {len(labels)} labels")
        self.classes_, y = np.unique(labels, return_inverse=True)
        if len(self.classes_) < 2:
            raise ScprotoInputError(f"need ≥ 2 cell types to train, got {list(self.classes_)}")
        counts = np.bincount(y)
        if counts.min() < 2:
            raise ScprotoInputError(
                f"cell type {self.classes_[counts.argmin()]!r} has only {counts.min()} training "
                "cell; a supervised contrastive head needs ≥ 2 per type"
            )
        if head_from is not None:
            self.scaler, self.head = head_from.scaler, head_from.head
        else:
            self.scaler = StandardScaler().fit(z)
        zs = self.scaler.transform(z).astype(np.float32)
        if self.cfg.head != "none" and head_from is None:
            self.head = fit_head(zs, y, len(self.classes_), self.cfg.head, self.cfg, self.seed)
        feats = zs if self.head is None else transform(self.head, zs)
        if self.cfg.classifier == "logreg":
            self.clf = LogisticRegression(max_iter=1000, random_state=self.seed)
        else:
            # Early stopping on an internal 10% hold-out of the training cells.
            self.clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=200, early_stopping=True,
                                     n_iter_no_change=10, random_state=self.seed)
        self.clf.fit(feats, y)
        return self

    def predict_proba(self, z: np.ndarray) -> np.ndarray:
        """``(n, C)`` class probabilities, columns in ``classes_`` order."""
        if self.classes_ is None:
            raise ScprotoInputError("annotator is not trained: call fit first")
        return self.clf.predict_proba(self._features(z))

    def predict(self, z: np.ndarray) -> np.ndarray:
        """``(n,)`` predicted labels (strings)."""
        return self.classes_[self.predict_proba(z).argmax(1)]

    def score(self, z: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Top-1 / top-3 accuracy and macro F1 on labelled cells.

        Cells whose label was never seen in training cannot be scored: they are left out with a
        warning naming the labels, and counted in ``n_unknown``.

        Raises:
            ScprotoInputError: no cell has a known label.
        """
        labels = np.asarray(labels).astype(str)
        known = np.isin(labels, self.classes_)
        if not known.all():
            unknown = sorted(set(labels[~known]))
            warnings.warn(f"{int((~known).sum())} cells have labels unseen in training "
                          f"({unknown}); they are left out of the scores", stacklevel=2)
        if not known.any():
            raise ScprotoInputError(
                f"none of the query labels {sorted(set(labels))[:10]} occur in training "
                f"({list(self.classes_)}); harmonise the label names first"
            )
        scores = annotation_scores(labels[known], self.predict_proba(z[known]), self.classes_)
        return {**scores, "n_scored": int(known.sum()), "n_unknown": int((~known).sum())}


@dataclass
class Split:
    """Indices into the full dataset."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def balanced_splits(labels: np.ndarray, cells_per_type: int | None, n_splits: int = 5,
                    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                    seed: int = 0) -> list[Split]:
    """Stratified random splits after capping every type at ``cells_per_type`` cells.

    Each split draws (independently, from ``seed + i``) up to ``cells_per_type`` cells of each
    type and divides them 80/10/10 within the type.

    Args:
        labels: ``(n,)`` cell types.
        cells_per_type: cap per type (None: all cells).
        n_splits: number of random splits.
        fractions: train / validation / test fractions (sum 1).
        seed: base seed.

    Returns:
        ``n_splits`` :class:`Split`.

    Raises:
        ScprotoInputError: a type has too few cells to put one in every part (names the type).
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise ScprotoInputError(f"split fractions must be positive and sum to 1, got {fractions}")
    labels = np.asarray(labels).astype(str)
    need = 4  # ≥ 2 training cells (a SupCon positive) and one each for validation and test
    types, counts = np.unique(labels, return_counts=True)
    small = [(str(t), int(c)) for t, c in zip(types, counts, strict=True) if c < need]
    if small:
        raise ScprotoInputError(
            f"cell types with fewer than {need} cells cannot be split "
            f"{'/'.join(f'{f:.0%}' for f in fractions)}: "
            + ", ".join(f"{t!r} ({c})" for t, c in small) + "; drop or merge them first"
        )
    splits = []
    for i in range(n_splits):
        rng = np.random.default_rng(seed + i)
        parts: list[list[np.ndarray]] = [[], [], []]
        for t in types:
            idx = rng.permutation(np.flatnonzero(labels == t))
            if cells_per_type is not None:
                idx = idx[:max(cells_per_type, need)]
            n_val = max(1, round(fractions[1] * len(idx)))
            n_test = max(1, round(fractions[2] * len(idx)))
            n_val, n_test = min(n_val, (len(idx) - 2) // 2), min(n_test, (len(idx) - 2) // 2)
            parts[0].append(idx[n_val + n_test:])
            parts[1].append(idx[:n_val])
            parts[2].append(idx[n_val:n_val + n_test])
        splits.append(Split(*(np.sort(np.concatenate(p)) for p in parts)))
    return splits
