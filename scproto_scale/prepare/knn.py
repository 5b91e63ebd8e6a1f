"""K nearest neighbours with FAISS: exact (flat L2) for small sets, IVF-Flat above a threshold.

The backend is chosen at run time: ``faiss`` GPU resources when a GPU build is present, the CPU
index otherwise. Self-matches are removed; the table is int32 ``[n, k]`` of row positions.
"""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np

log = logging.getLogger(__name__)


def _use_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def knn(
    X: np.ndarray, k: int = 50, exact_max_cells: int = 200_000, nprobe: int = 32, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Self-KNN graph of the rows of ``X`` (Euclidean).

    Args:
        X: ``(n, d)`` float32 (e.g. 50 PCs).
        k: neighbours per cell, excluding the cell itself.
        exact_max_cells: use an exact flat index up to this many rows, IVF-Flat above.
        nprobe: IVF lists probed per query.
        seed: seed of the IVF k-means.

    Returns:
        ``indices (n, k) int32`` (row positions, nearest first) and
        ``distances (n, k) float32`` (Euclidean, not squared).

    Raises:
        ValueError: if ``n <= k``.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    n, d = X.shape
    if n <= k:
        raise ValueError(f"KNN with k={k} needs more than {k} cells, got {n}")
    if n <= exact_max_cells:
        index = faiss.IndexFlatL2(d)
        kind = "flat"
    else:
        nlist = int(min(65536, max(16, 4 * math.sqrt(n))))
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist)
        index.cp.seed = seed
        n_train = min(n, nlist * 256)
        rng = np.random.default_rng(seed)
        index.train(X[np.sort(rng.choice(n, n_train, replace=False))])
        index.nprobe = nprobe
        kind = f"ivf{nlist}"
    if _use_gpu():
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        kind += "-gpu"
    index.add(X)
    dist, idx = index.search(X, k + 1)
    log.info("knn: %s index, n=%d, k=%d", kind, n, k)
    return _drop_self(idx, dist, k)


def _drop_self(idx: np.ndarray, dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index (or the last column when self was not returned)."""
    n = idx.shape[0]
    is_self = idx == np.arange(n)[:, None]
    # Rows without a self hit (duplicates, approximate search) drop their farthest neighbour.
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    keep = ~is_self
    out_idx = idx[keep].reshape(n, k).astype(np.int32)
    out_dist = np.sqrt(np.maximum(dist[keep].reshape(n, k), 0)).astype(np.float32)
    if (out_idx < 0).any():
        raise RuntimeError("FAISS returned fewer than k neighbours; raise nprobe")
    return out_idx, out_dist
