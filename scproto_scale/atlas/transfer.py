"""Label transfer through prototypes: a cell takes the labels of its most similar prototypes.

Each prototype carries the majority label of the training cells assigned to it
(``metacells.h5ad`` obs ``majority_label``, method.md §7). A cell's label distribution is the
softmax (temperature τ) of its cosines to the labelled prototypes, summed per label; the
transferred label is its mode and the uncertainty ``1 − max probability`` (as scPoli's
prototype-based label transfer reports an uncertainty per cell).
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np

from scproto_scale.errors import ScprotoInputError


def load_prototype_labels(atlas_path: str | Path, column: str = "majority_label"
                          ) -> np.ndarray | None:
    """``(K,)`` str labels of the atlas's prototypes ("" = unlabelled), or None when the atlas
    has no ``metacells.h5ad`` or it has no label column (the atlas was trained without labels).
    """
    path = Path(atlas_path) / "metacells.h5ad"
    if not path.exists():
        return None
    mc = ad.read_h5ad(path, backed="r")
    try:
        if column not in mc.obs.columns:
            return None
        labels = mc.obs[column].astype(str).to_numpy()
        n_cells = mc.obs["n_cells"].to_numpy() if "n_cells" in mc.obs.columns else None
    finally:
        mc.file.close()
    labels = np.where(labels == "nan", "", labels)
    if n_cells is not None:
        labels = np.where(n_cells > 0, labels, "")
    return labels.astype(str)


class LabelTransfer:
    """Prototype-based label transfer.

    Args:
        prototypes: ``(K, d)`` float32 unit prototypes.
        labels: ``(K,)`` str prototype labels, "" for prototypes without cells / labels.
        temperature: τ of the softmax over cosines (the model's SwAV temperature by default).

    Raises:
        ScprotoInputError: no prototype has a label, or lengths differ.
    """

    def __init__(self, prototypes: np.ndarray, labels: np.ndarray, temperature: float = 0.05):
        labels = np.asarray(labels).astype(str)
        if len(labels) != len(prototypes):
            raise ScprotoInputError(f"{len(labels)} prototype labels for {len(prototypes)} prototypes")
        keep = labels != ""
        if not keep.any():
            raise ScprotoInputError("no prototype carries a label (metacells without labels)")
        self.classes, code = np.unique(labels[keep], return_inverse=True)
        self.prototypes = np.asarray(prototypes, dtype=np.float32)[keep]
        self.onehot = np.eye(len(self.classes), dtype=np.float64)[code]  # (K', L)
        self.temperature = float(temperature)

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labels of ``X: (n, d)`` unit embeddings.

        Returns:
            ``(n,)`` int64 codes into :attr:`classes`, ``(n,)`` float32 uncertainty
            ``1 − max_l p(l)`` in [0, 1), and ``(n, L)`` float32 probabilities.
        """
        logits = (np.asarray(X, dtype=np.float64) @ self.prototypes.T) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        w = np.exp(logits)
        p = (w @ self.onehot) / w.sum(axis=1, keepdims=True)
        code = p.argmax(axis=1)
        return code.astype(np.int64), (1.0 - p.max(axis=1)).astype(np.float32), p.astype(np.float32)
