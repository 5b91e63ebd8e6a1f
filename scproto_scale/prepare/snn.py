"""Shared-nearest-neighbour (SNN) weights of the KNN table's edges.

The weight of the edge i → j is the Jaccard index of the two cells' neighbourhoods, each cell
counted in its own (``N⁺(i) = {i} ∪ N(i)``), as in Seurat's SNN graph and PhenoGraph:
``|N⁺(i) ∩ N⁺(j)| / |N⁺(i) ∪ N⁺(j)|``. An edge inside a population shares many neighbours; an
edge from a small population into a large one (the large one's cells do not list the small
one's) shares few. Drawing the KNN views ∝ these weights (``train.neighbor_weighting="snn"``)
keeps the views of a rare cell type inside it, where uniform draws over k=50 neighbours would
mostly pick cells of the type around it and teach the encoder to merge the two.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np


def snn_jaccard(knn_indices: np.ndarray, cells: np.ndarray, chunk: int = 2048,
                out: np.ndarray | None = None) -> np.ndarray:
    """Jaccard index of every KNN edge's two neighbourhoods (self included).

    Args:
        knn_indices: ``(n, k)`` int neighbour ids, in the id space of ``cells``.
        cells: ``(n,)`` int ids of the rows of ``knn_indices`` (e.g. store rows).
        chunk: rows per vectorised block (memory ≈ ``chunk · k² · 16`` bytes).
        out: optional ``(n, k)`` float32 array (e.g. a memory map) to fill.

    Returns:
        ``(n, k)`` float32 in ``[1/(2k+1), 1]``, aligned with ``knn_indices``.

    Raises:
        ValueError: a neighbour id that is not one of ``cells``.
    """
    knn = np.asarray(knn_indices)
    n, k = knn.shape
    cells = np.asarray(cells, dtype=np.int64)
    position = np.full(int(max(cells.max(), knn.max())) + 1, -1, dtype=np.int64)
    position[cells] = np.arange(n)
    out = np.empty((n, k), np.float32) if out is None else out
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        nbr = position[np.asarray(knn[rows], dtype=np.int64)]  # (c, k) positions
        if (nbr < 0).any():
            bad = np.asarray(knn[rows])[nbr < 0][0]
            raise ValueError(f"KNN neighbour id {bad} is not a training cell")
        own = np.concatenate([rows[:, None], nbr], axis=1)  # N⁺(i), (c, k+1)
        keys = np.sort((rows[:, None] * n + own).ravel())
        # N⁺(j) for every neighbour j of i, keyed by i: (c, k, k+1)
        theirs = np.concatenate([nbr[:, :, None], position[np.asarray(knn)[nbr]]], axis=2)
        probe = (rows[:, None, None] * n + theirs).ravel()
        at = np.minimum(np.searchsorted(keys, probe), len(keys) - 1)
        shared = (keys[at] == probe).reshape(len(rows), k, k + 1).sum(axis=2)
        out[rows] = shared / (2 * (k + 1) - shared)
    return out


def snn_sampling_weights(jaccard: np.ndarray, prune: float) -> np.ndarray:
    """View-sampling weights from SNN Jaccard: edges with Jaccard ≤ ``prune`` get 0.

    ``prune`` = 1/15 is Seurat's ``prune.SNN``. Same shape and dtype as ``jaccard``.
    """
    jaccard = np.asarray(jaccard)
    return np.where(jaccard > prune, jaccard, 0.0)


def cached_snn_jaccard(path: Path, knn_indices: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """:func:`snn_jaccard`, computed once and kept as a ``.npy`` beside the prepared artefacts.

    Written to a unique temporary name and renamed, so concurrent workers (DDP ranks) and
    crashes never leave a partial file; a cached file of the wrong shape is recomputed.

    Returns:
        ``(n, k)`` float32, memory-mapped from ``path``.
    """
    path = Path(path)
    if path.exists():
        cached = np.load(path, mmap_mode="r")
        if cached.shape == tuple(knn_indices.shape):
            return cached
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.npy")
    try:
        mm = np.lib.format.open_memmap(tmp, "w+", np.float32, tuple(knn_indices.shape))
        snn_jaccard(knn_indices, cells, out=mm)
        mm.flush()
        del mm
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")
