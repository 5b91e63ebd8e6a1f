"""K nearest neighbours with FAISS: exact (flat L2) for small sets, IVF-Flat or HNSW above.

The backend is chosen at run time: ``faiss`` GPU resources when a GPU build is present (flat
and IVF; FAISS has no GPU HNSW), the CPU index otherwise. Queries run in batches so the int64
results FAISS returns never exist for all cells at once; self-matches are removed; the table is
int32 ``[n, k]`` of row positions, optionally written straight into ``.npy`` memory maps.
:func:`knn_recall` checks an approximate table against exact search on a sample.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)


def _use_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_method(method: str, n: int, exact_max_cells: int) -> str:
    """The index ``method="auto"`` picks for ``n`` rows (see :func:`build_index`).

    Raises:
        ValueError: an unknown method.
    """
    if method not in ("auto", "flat", "ivf", "hnsw"):
        raise ValueError(f"unknown KNN method {method!r}; use auto, flat, ivf or hnsw")
    if method != "auto":
        return method
    return "flat" if n <= exact_max_cells else ("ivf" if _use_gpu() else "hnsw")


def resolve_scope(scope: str, groups: np.ndarray, k: int, min_share: int = 2) -> tuple[str, str]:
    """The KNN scope ``scope="auto"`` picks for these studies, and why (for the log and manifest).

    ``auto`` is ``per_study`` (:func:`knn_per_study`) when there are at least two studies, each
    can give ``min_share`` or more of the ``k`` neighbours (``S ≤ k // min_share``) and every
    study has more than ``⌈k/S⌉`` cells; otherwise ``all``. Atlases with more studies than that
    (e.g. the whole Census, hundreds of datasets) keep the plain KNN: one or zero neighbours per
    study no longer describes a neighbourhood, and every query would search S indexes.

    Args:
        scope: ``"auto"``, ``"all"`` or ``"per_study"`` (the last two are returned unchanged).
        groups: ``(n,)`` int study code of each row.
        k: neighbours per cell.

    Raises:
        ValueError: an unknown scope.
    """
    if scope not in ("auto", "all", "per_study"):
        raise ValueError(f"unknown KNN scope {scope!r}; use auto, all or per_study")
    if scope != "auto":
        return scope, "set in the config"
    sizes = np.unique(np.asarray(groups), return_counts=True)[1]
    S = len(sizes)
    if S < 2:
        return "all", "one study"
    if S > k // min_share:
        return "all", f"{S} studies > k // {min_share} = {k // min_share}"
    if sizes.min() <= math.ceil(k / S):
        return "all", f"a study has {sizes.min()} cells ≤ ⌈k/S⌉ = {math.ceil(k / S)}"
    return "per_study", f"{S} studies, ⌈k/S⌉ = {math.ceil(k / S)} neighbours from each"


def build_index(X: np.ndarray, method: str = "auto", exact_max_cells: int = 200_000,
                nprobe: int = 128, hnsw_m: int = 32, ef_search: int = 256, seed: int = 0,
                ef_construction: int = 128):
    """A FAISS index over the rows of ``X`` (already added) and its kind, e.g. ``"ivf2000-gpu"``.

    ``method``: ``"flat"`` (exact), ``"ivf"`` (IVF-Flat, ``4·√n`` lists, ``nprobe`` probed),
    ``"hnsw"`` (HNSW-Flat, ``M = hnsw_m``, ``efConstruction = ef_construction``,
    ``efSearch = ef_search``; CPU only) or ``"auto"`` (flat up to ``exact_max_cells`` rows;
    above, HNSW on CPU and IVF on a GPU). Why HNSW on CPU: on 100k × 50 PCs of the scaled
    synthetic atlas, k=50, IVF with 4·√n lists reached recall 0.92 at nprobe 64 (45 s of
    search) where HNSW (M 32, efSearch 128) reached 0.957 in 18 s build + 29 s search, and
    IVF's probed fraction (hence its work per query) must stay constant as n grows while
    HNSW's grows ~log n (Malkov & Yashunin 2018).
    """
    n, d = X.shape
    method = resolve_method(method, n, exact_max_cells)
    if method == "flat":
        index, kind = faiss.IndexFlatL2(d), "flat"
    elif method == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m)
        index.hnsw.efConstruction = max(ef_construction, 2 * hnsw_m)
        index.hnsw.efSearch = ef_search
        kind = f"hnsw{hnsw_m}"
    else:
        nlist = int(min(65536, max(16, 4 * math.sqrt(n))))
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist)
        index.cp.seed = seed
        index.cp.niter = 10  # coarse k-means: 10 iterations on 64 points per list is plenty
        n_train = min(n, nlist * 64)
        rng = np.random.default_rng(seed)
        index.train(X[np.sort(rng.choice(n, n_train, replace=False))])
        index.nprobe = nprobe
        kind = f"ivf{nlist}"
    if _use_gpu() and method != "hnsw":
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        kind += "-gpu"
    index.add(X)
    return index, kind


def _knn_outputs(n: int, k: int, out_dir: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The ``(n, k)`` int32 index and float32 distance tables: in memory, or ``.npy`` memory
    maps in ``out_dir`` (filled batch by batch, flushed by the caller)."""
    if out_dir is None:
        return np.empty((n, k), dtype=np.int32), np.empty((n, k), dtype=np.float32)
    out_dir = Path(out_dir)
    return (np.lib.format.open_memmap(out_dir / "knn_indices.npy", "w+", np.int32, (n, k)),
            np.lib.format.open_memmap(out_dir / "knn_distances.npy", "w+", np.float32, (n, k)))


def knn(
    X: np.ndarray, k: int = 50, exact_max_cells: int = 200_000, nprobe: int = 128, seed: int = 0,
    method: str = "auto", out_dir: str | Path | None = None, batch: int = 65_536,
    hnsw_m: int = 32, ef_search: int = 256, ef_construction: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """Self-KNN graph of the rows of ``X`` (Euclidean).

    Args:
        X: ``(n, d)`` float32 (e.g. 50 PCs).
        k: neighbours per cell, excluding the cell itself.
        exact_max_cells: ``method="auto"`` uses an exact flat index up to this many rows.
        nprobe: IVF lists probed per query.
        seed: seed of the IVF k-means.
        method: ``"auto"``, ``"flat"``, ``"ivf"`` or ``"hnsw"`` (see :func:`build_index`).
        out_dir: write ``knn_indices.npy`` / ``knn_distances.npy`` there as memory maps
            (filled batch by batch) and return them memory-mapped; ``None``: in memory.
        batch: queries per FAISS search call.
        hnsw_m, ef_search, ef_construction: HNSW graph degree, search and build breadth
            (``ef_search`` is raised to ``k + 1`` when smaller).

    Returns:
        ``indices (n, k) int32`` (row positions, nearest first) and
        ``distances (n, k) float32`` (Euclidean, not squared).

    Raises:
        ValueError: if ``n <= k`` or the method is unknown.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    n, _ = X.shape
    if n <= k:
        raise ValueError(f"KNN with k={k} needs more than {k} cells, got {n}")
    index, kind = build_index(X, method, exact_max_cells, nprobe, hnsw_m,
                              max(ef_search, k + 1), seed, ef_construction)
    idx_out, dist_out = _knn_outputs(n, k, out_dir)
    for a in range(0, n, batch):
        b = min(n, a + batch)
        dist, idx = index.search(X[a:b], k + 1)
        idx_out[a:b], dist_out[a:b] = _drop_self(idx, dist, k, offset=a)
    if out_dir is not None:
        idx_out.flush()
        dist_out.flush()
    log.info("knn: %s index, n=%d, k=%d", kind, n, k)
    return idx_out, dist_out


def knn_recall(X: np.ndarray, indices: np.ndarray, n_sample: int = 10_000, seed: int = 0,
               batch: int = 2_048) -> float:
    """Recall@k of a KNN table against exact (flat L2) search, on a random sample of rows.

    Args:
        X: ``(n, d)`` float32, the points the table was built on.
        indices: ``(n, k)`` int neighbour table (self excluded).
        n_sample: rows checked (exact search of each against all ``n`` rows).
        seed: seed of the sample.

    Returns:
        Mean over the sample of ``|approx ∩ exact| / k``.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    n, k = indices.shape
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n_sample, n), replace=False))
    flat = faiss.IndexFlatL2(X.shape[1])
    flat.add(X)
    hits = 0
    for a in range(0, len(rows), batch):
        q = rows[a:a + batch]
        dist, idx = flat.search(X[q], k + 1)
        exact, _ = _drop_self(idx, dist, k, offset=0, self_rows=q)
        approx = np.asarray(indices[q])
        hits += sum(len(np.intersect1d(e, r)) for e, r in zip(exact, approx, strict=True))
    return hits / (len(rows) * k)


def _drop_self(idx: np.ndarray, dist: np.ndarray, k: int, offset: int = 0,
               self_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index (or the last column when self was not returned).

    The query rows are ``offset + arange(len(idx))`` unless ``self_rows`` gives them.
    """
    n = idx.shape[0]
    me = np.arange(offset, offset + n) if self_rows is None else np.asarray(self_rows)
    is_self = idx == me[:, None]
    # Rows without a self hit (duplicates, approximate search) drop their farthest neighbour.
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    keep = ~is_self
    out_idx = idx[keep].reshape(n, k).astype(np.int32)
    out_dist = np.sqrt(np.maximum(dist[keep].reshape(n, k), 0)).astype(np.float32)
    if (out_idx < 0).any():
        raise RuntimeError("FAISS returned fewer than k neighbours; raise nprobe")
    return out_idx, out_dist


def knn_per_study(
    X: np.ndarray, groups: np.ndarray, k: int = 50, out_dir: str | Path | None = None,
    batch: int = 65_536, **index_kw,
) -> tuple[np.ndarray, np.ndarray]:
    """Study-balanced KNN: about ``k / S`` nearest cells from each of the ``S`` studies.

    BBKNN's neighbourhood (Polański et al., Bioinformatics 2020): every cell's row draws
    ``⌈k/S⌉`` neighbours from each study's own index, so the training views of an anchor cross
    studies and the swapped prediction pulls matching cells of different studies onto the same
    prototype. Ranks are interleaved across studies before the row is cut to ``k``, so each
    study gives ``⌊k/S⌋`` or ``⌈k/S⌉`` neighbours; the kept row is sorted nearest first.

    Args:
        X: ``(n, d)`` float32 (e.g. 50 PCs).
        groups: ``(n,)`` int study code of each row.
        k: neighbours per cell, excluding the cell itself.
        out_dir: write ``knn_indices.npy`` / ``knn_distances.npy`` there as memory maps.
        batch: queries per FAISS search call.
        **index_kw: passed to :func:`build_index` (``method``, ``exact_max_cells``, …), one
            index per study.

    Returns:
        ``indices (n, k) int32`` and ``distances (n, k) float32`` (Euclidean), as :func:`knn`.

    Raises:
        ValueError: ``k`` below the number of studies, or a study with too few cells to give
            its share (the message names the study code and its size).
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    groups = np.asarray(groups)
    n = len(X)
    studies = np.unique(groups)
    S = len(studies)
    if k < S:
        raise ValueError(f"study-balanced KNN needs k ≥ the number of studies ({S}), got k={k}")
    share = math.ceil(k / S)
    members = [np.flatnonzero(groups == s) for s in studies]
    for s, m in zip(studies, members, strict=True):
        if len(m) < share + 1:
            raise ValueError(f"study-balanced KNN: study code {s} has {len(m)} cells, fewer "
                             f"than ⌈k/S⌉ + 1 = {share + 1}; lower n_neighbors or merge studies")
    indexes = [build_index(X[m], **index_kw)[0] for m in members]
    idx_out, dist_out = _knn_outputs(n, k, out_dir)
    for a in range(0, n, batch):
        b = min(n, a + batch)
        rows = np.arange(a, b)
        # (rows, share, S): rank r of study j at [:, r, j], so a C-order reshape interleaves
        cand_idx = np.empty((b - a, share, S), dtype=np.int64)
        cand_dist = np.empty((b - a, share, S), dtype=np.float32)
        for j, (m, index) in enumerate(zip(members, indexes, strict=True)):
            dist, pos = index.search(X[a:b], share + 1)
            found = np.where(pos >= 0, m[np.maximum(pos, 0)], -1)
            # a cell's own study returns the cell itself; the others' extra column goes
            own, dist = _drop_self(found, dist, share, self_rows=rows)
            cand_idx[:, :, j], cand_dist[:, :, j] = own, dist
        cand_idx = cand_idx.reshape(b - a, share * S)[:, :k]
        cand_dist = cand_dist.reshape(b - a, share * S)[:, :k]
        order = np.argsort(cand_dist, axis=1, kind="stable")
        idx_out[a:b] = np.take_along_axis(cand_idx, order, axis=1)
        dist_out[a:b] = np.take_along_axis(cand_dist, order, axis=1)
    if out_dir is not None:
        idx_out.flush()
        dist_out.flush()
    log.info("knn: study-balanced, %d studies × %d, n=%d, k=%d", S, share, n, k)
    return idx_out, dist_out
