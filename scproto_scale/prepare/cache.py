"""The training cache: the kept cells' model-gene counts, reordered so that neighbours share chunks.

Training reads every anchor with ``V−1`` KNN neighbours: random reads that decode a whole zarr
chunk per cell from the raw store. The cache makes them cheap:

* it holds only the model genes (HVGs; ~10–40 % of the non-zeros), uncompressed, in small
  chunks, as an AnnData zarr CSR (``X``; obs ``store_row``; var = the model genes);
* rows are in a locality order: k-means on the PCA scores (FAISS, ``~cluster_cells`` cells per
  cluster), clusters chained greedily nearest-centroid-next, cells within a cluster sorted by
  their first PC. A cell's neighbours are then mostly a few rows away, and a sampler with a
  chunk-level shuffle (``StudyStratifiedSampler(block_size=...)``) reads few chunks per step.

It is written out of core: the projection pass appends the model-gene rows (store order) to flat
spill files; the rows are then scattered into partitions of ``partition_rows`` cache rows, and
each partition is sorted in memory and appended to the zarr store. Memory: one partition.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scproto_scale.data.writers import ZarrCSRWriter

log = logging.getLogger(__name__)

CACHE_NAME = "train_cache.zarr"


def locality_order(scores: np.ndarray, cluster_cells: int = 1_000, seed: int = 0,
                   batch: int = 65_536, groups: np.ndarray | None = None) -> np.ndarray:
    """A permutation of the rows of ``scores`` that keeps PCA neighbours close.

    Args:
        scores: ``(n, d)`` float32 PCA scores.
        cluster_cells: target cells per k-means cluster.
        seed: seed of the k-means.
        groups: ``(n,)`` int study code per row, or None. Within a cluster, rows are sorted
            by study first: the study-stratified sampler walks each study's cells in cache
            order in blocks, and a block of one study then lies in one contiguous run of a
            cluster instead of being spread over ``n / study size`` rows (which grows with n).

    Returns:
        ``(n,)`` int64 ``order``: cache row ``i`` holds cell ``order[i]``.
    """
    X = np.ascontiguousarray(scores, dtype=np.float32)
    n, d = X.shape
    n_clusters = int(max(1, min(n // max(1, cluster_cells), 16_384)))
    if n_clusters == 1:
        keys = (X[:, 0],) if groups is None else (X[:, 0], np.asarray(groups))
        return np.lexsort(keys).astype(np.int64)
    km = faiss.Kmeans(d, n_clusters, niter=10, seed=seed, max_points_per_centroid=64,
                      verbose=False)
    km.train(X)
    label = np.empty(n, dtype=np.int64)
    for a in range(0, n, batch):
        label[a:a + batch] = km.index.search(X[a:a + batch], 1)[1][:, 0]
    # Greedy chain over centroids: start at the one with the smallest first coordinate and
    # always step to the nearest unvisited one, so adjacent clusters are similar.
    C = km.centroids.astype(np.float64)
    d2 = ((C[:, None, :] - C[None, :, :]) ** 2).sum(-1) if n_clusters <= 4096 else None
    rank = np.empty(n_clusters, dtype=np.int64)
    seen = np.zeros(n_clusters, dtype=bool)
    cur = int(np.argmin(C[:, 0]))
    for r in range(n_clusters):
        rank[cur], seen[cur] = r, True
        if r + 1 == n_clusters:
            break
        dist = d2[cur] if d2 is not None else ((C - C[cur]) ** 2).sum(1)
        dist = np.where(seen, np.inf, dist)
        cur = int(np.argmin(dist))
    keys = (X[:, 0], rank[label]) if groups is None else (X[:, 0], np.asarray(groups),
                                                          rank[label])
    return np.lexsort(keys).astype(np.int64)


class SpillWriter:
    """Append CSR rows to flat binary files (data float32, indices int32, row nnz int64)."""

    def __init__(self, directory: Path):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._files = {k: open(directory / f"{k}.bin", "wb")
                       for k in ("data", "indices", "nnz", "pos")}

    def append(self, X: sp.csr_matrix, pos: np.ndarray | None = None) -> None:
        X = sp.csr_matrix(X)
        X.data.astype(np.float32, copy=False).tofile(self._files["data"])
        X.indices.astype(np.int32, copy=False).tofile(self._files["indices"])
        np.diff(X.indptr).astype(np.int64).tofile(self._files["nnz"])
        if pos is not None:
            np.asarray(pos, dtype=np.int64).tofile(self._files["pos"])

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _read_spill(directory: Path, n_cols: int, row_lo: int = 0, row_hi: int | None = None,
                nnz_offsets: np.ndarray | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
    nnz = np.fromfile(directory / "nnz.bin", dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(nnz)]) if nnz_offsets is None else nnz_offsets
    row_hi = len(nnz) if row_hi is None else row_hi
    a, b = int(offsets[row_lo]), int(offsets[row_hi])
    data = np.fromfile(directory / "data.bin", dtype=np.float32, count=b - a, offset=4 * a)
    indices = np.fromfile(directory / "indices.bin", dtype=np.int32, count=b - a, offset=4 * a)
    indptr = offsets[row_lo:row_hi + 1] - a
    pos_file = directory / "pos.bin"
    pos = (np.fromfile(pos_file, dtype=np.int64, count=row_hi - row_lo, offset=8 * row_lo)
           if pos_file.stat().st_size else np.empty(0, dtype=np.int64))
    return sp.csr_matrix((data, indices, indptr), shape=(row_hi - row_lo, n_cols)), pos


def iter_spill(directory: Path, n_cols: int, chunk_rows: int):
    """Yield ``(start, stop, X[start:stop])`` over a spill directory's rows, in order."""
    nnz = np.fromfile(directory / "nnz.bin", dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(nnz)])
    for a in range(0, len(nnz), chunk_rows):
        b = min(len(nnz), a + chunk_rows)
        yield a, b, _read_spill(directory, n_cols, a, b, offsets)[0]


def write_training_cache(spill: Path, order: np.ndarray, cells: np.ndarray, genes: list[str],
                         out: Path, partition_rows: int = 100_000,
                         chunk_elems: int = 1 << 16) -> Path:
    """Reorder the spilled model-gene rows (kept-cell order) into the cache at ``out``.

    Args:
        spill: directory written by :class:`SpillWriter` (rows = kept cells, in order).
        order: ``(n,)`` cache row → kept-cell index (:func:`locality_order`).
        cells: ``(n,)`` store row of each kept cell.
        genes: the model genes (the cache's var).
        out: the cache store (``…/train_cache.zarr``).
        partition_rows: cache rows sorted in memory at a time.
        chunk_elems: zarr chunk length (non-zeros) of the cache.

    Returns:
        ``out``.
    """
    n, G = len(order), len(genes)
    new_pos = np.empty(n, dtype=np.int64)
    new_pos[order] = np.arange(n)
    parts_dir = spill / "parts"
    n_parts = max(1, -(-n // partition_rows))
    writers = [SpillWriter(parts_dir / str(p)) for p in range(n_parts)]
    nnz = np.fromfile(spill / "nnz.bin", dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(nnz)])
    step = partition_rows
    for a in range(0, n, step):  # scatter: sequential reads, one append per partition
        b = min(n, a + step)
        X, _ = _read_spill(spill, G, a, b, offsets)
        pos = new_pos[a:b]
        part = pos // partition_rows
        for p in np.unique(part):
            sel = np.flatnonzero(part == p)
            writers[p].append(X[sel], pos[sel])
    for w in writers:
        w.close()
    var = pd.DataFrame(index=pd.Index(genes))
    zw = ZarrCSRWriter(out, var, chunk_elems=chunk_elems, compress=False, overwrite=True)
    for p in range(n_parts):  # gather: each partition sorted in memory
        X, pos = _read_spill(parts_dir / str(p), G)
        zw.append(X[np.argsort(pos)])
        shutil.rmtree(parts_dir / str(p))
    obs = pd.DataFrame({"store_row": np.asarray(cells)[order]},
                       index=pd.Index(np.arange(n).astype(str)))
    zw.finish(obs)
    log.info("training cache: %d cells × %d genes in %d partitions → %s", n, G, n_parts, out)
    return out


@dataclass
class LoaderSource:
    """What the view loader reads: a store, its training cells and per-row arrays.

    Attributes:
        store: the raw store, or the training cache (rows = cache positions).
        cells: ``(n,)`` rows of ``store`` of the training cells.
        study: ``(n,)`` study code of each training cell.
        knn_indices, knn_distances: ``(n, k)`` neighbours as rows of ``store``, and distances.
        library_size: total counts (all genes) per row of ``store``.
        condition: study code per row of ``store``.
        gene_columns: ``(G,)`` columns of ``store`` of the model genes.
        block_size: chunk-level shuffle block for the sampler (``None`` for the raw store).
    """

    store: object
    cells: np.ndarray
    study: np.ndarray
    knn_indices: np.ndarray
    knn_distances: np.ndarray
    library_size: np.ndarray
    condition: np.ndarray
    gene_columns: np.ndarray
    block_size: int | None = None
