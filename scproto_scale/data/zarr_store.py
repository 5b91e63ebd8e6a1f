"""AnnData zarr stores (format v2 or v3) read as a :class:`CellStore` without loading ``X``.

``X`` must be a CSR matrix (``encoding-type: csr_matrix``). Row reads go through
:class:`ChunkCache`: the nonzeros of the requested rows are located with the in-memory
``indptr`` and fetched by whole zarr chunks, which are decoded once and kept in an LRU cache,
so batches whose rows share chunks cost one decode per chunk.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from scproto_scale.data.store import CellStore
from scproto_scale.data.validate import check_unique_genes
from scproto_scale.errors import ScprotoInputError


class ChunkCache:
    """LRU cache of decoded chunks of a 1-D zarr array.

    Args:
        array: a 1-D zarr array (e.g. ``X/data`` or ``X/indices``).
        max_bytes: memory budget of decoded chunks kept (bytes).
    """

    def __init__(self, array: zarr.Array, max_bytes: int):
        self.array = array
        self.chunk = int(array.chunks[0])
        self.max_chunks = max(2, max_bytes // max(1, self.chunk * array.dtype.itemsize))
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def _get_chunk(self, c: int) -> np.ndarray:
        with self._lock:
            block = self._cache.get(c)
            if block is not None:
                self._cache.move_to_end(c)
                return block
        # Decode outside the lock so that loader threads decode different chunks in parallel.
        block = self.array[c * self.chunk : (c + 1) * self.chunk]
        with self._lock:
            self._cache[c] = block
            if len(self._cache) > self.max_chunks:
                self._cache.popitem(last=False)
        return block

    def gather(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Concatenate ``array[starts[i]:stops[i]]`` for all i (runs sorted by start)."""
        total = int((stops - starts).sum())
        out = np.empty(total, dtype=self.array.dtype)
        if total == 0:
            return out
        # Coalesce touching runs so that each is copied out of its chunks in one go.
        pos = 0
        for s, e in _coalesce(starts, stops):
            c0, c1 = s // self.chunk, (e - 1) // self.chunk
            for c in range(c0, c1 + 1):
                block = self._get_chunk(c)
                lo = max(s, c * self.chunk) - c * self.chunk
                hi = min(e, (c + 1) * self.chunk) - c * self.chunk
                out[pos : pos + hi - lo] = block[lo:hi]
                pos += hi - lo
        return out


def _coalesce(starts: np.ndarray, stops: np.ndarray) -> list[tuple[int, int]]:
    """Merge runs ``[start, stop)`` (sorted by start, non-overlapping) that touch."""
    keep = starts < stops
    starts, stops = starts[keep], stops[keep]
    if len(starts) == 0:
        return []
    breaks = np.flatnonzero(starts[1:] != stops[:-1]) + 1
    run_starts = np.concatenate([[0], breaks])
    run_stops = np.concatenate([breaks, [len(starts)]])
    return [(int(starts[a]), int(stops[b - 1])) for a, b in zip(run_starts, run_stops, strict=True)]


class ZarrCellStore(CellStore):
    """A :class:`CellStore` over an AnnData zarr group (as written by ``anndata.write_zarr``).

    Args:
        path: the zarr store directory.
        cache_bytes: budget of the decoded-chunk LRU cache for ``X/data`` plus ``X/indices``.

    Raises:
        ScprotoInputError: if the store has no CSR ``X`` or duplicate gene ids.
    """

    def __init__(self, path: str | Path, cache_bytes: int = 512 << 20):
        self.path = Path(path)
        self._root = zarr.open_group(str(self.path), mode="r")
        if "X" not in self._root:
            raise ScprotoInputError(f"zarr store {self.path} has no X")
        xg = self._root["X"]
        enc = xg.attrs.get("encoding-type") if isinstance(xg, zarr.Group) else "array"
        if enc != "csr_matrix":
            raise ScprotoInputError(
                f"zarr store {self.path}: X is {enc!r}, expected a CSR matrix "
                "(re-ingest with `scproto-scale ingest`)"
            )
        self._shape = tuple(int(v) for v in xg.attrs["shape"])
        self._indptr = np.asarray(xg["indptr"][:], dtype=np.int64)
        self._data = ChunkCache(xg["data"], cache_bytes // 2)
        self._indices = ChunkCache(xg["indices"], cache_bytes // 2)
        self._var = ad.io.read_elem(self._root["var"])
        check_unique_genes(self._var.index, f"zarr store {self.path}")
        self._obs_group = self._root["obs"]
        self._obs_cache: dict[str, pd.Series] = {}

    @property
    def n_obs(self) -> int:
        return self._shape[0]

    @property
    def var(self) -> pd.DataFrame:
        return self._var

    def obs_columns(self) -> list[str]:
        return list(self._obs_group.attrs.get("column-order", []))

    def _read_obs_column(self, key: str) -> pd.Series:
        if key not in self._obs_cache:
            values = ad.io.read_elem(self._obs_group[key])
            self._obs_cache[key] = pd.Series(values, name=key)
        return self._obs_cache[key].copy()

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.n_obs):
            raise IndexError(f"row index out of range [0, {self.n_obs}) in {self.path}")
        starts, stops = self._indptr[rows], self._indptr[rows + 1]
        data = self._data.gather(starts, stops).astype(np.float32, copy=False)
        indices = self._indices.gather(starts, stops)
        indptr = np.concatenate([[0], np.cumsum(stops - starts)])
        return sp.csr_matrix((data, indices, indptr), shape=(len(rows), self.n_vars))
