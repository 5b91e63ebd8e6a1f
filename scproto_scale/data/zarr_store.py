"""AnnData zarr stores (format v2 or v3) read as a :class:`CellStore` without loading ``X``.

``X`` must be a CSR matrix (``encoding-type: csr_matrix``). Row reads go through
:class:`ChunkCache`: the nonzeros of the requested rows are located with the in-memory
``indptr`` and fetched by whole zarr chunks, which are decoded once and kept in an LRU cache,
so batches whose rows share chunks cost one decode per chunk.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from scproto_scale.data.dense_rows import column_map, plan_runs, scatter_chunk
from scproto_scale.data.pread import (
    SPAN_ELEMENTS,
    SPAN_GAP,
    RawChunkFiles,
    check_chunk_size,
    pread_scatter,
)
from scproto_scale.data.store import CellStore, release_mapped_pages
from scproto_scale.data.validate import check_unique_genes
from scproto_scale.errors import ScprotoInputError


class ChunkCache:
    """LRU cache of decoded chunks of a 1-D zarr array.

    Args:
        array: a 1-D zarr array (e.g. ``X/data`` or ``X/indices``).
        max_bytes: memory budget of decoded chunks kept (bytes).
        describe: ``describe(chunk_index)`` names the chunk for error messages (store, array,
            row range).
        nonzero: the array's values are never 0 (CSR count data): a chunk that decodes to all
            zeros is a missing chunk (zarr returns the fill value for it) and an error.
        max_maps: memory maps kept open for an uncompressed array's chunk files (see
            :meth:`_read`); their resident pages are dropped by :meth:`release_pages`.

    Raises:
        ScprotoInputError: (on reads) a chunk that cannot be decoded (truncated, corrupt) or is
            missing, naming the store and the row range it holds.
    """

    def __init__(self, array: zarr.Array, max_bytes: int, describe=None, nonzero: bool = False,
                 directory: Path | None = None, max_maps: int = 16_384):
        self.array = array
        self.describe = describe or (lambda c: f"chunk {c} of {array.name}")
        self.nonzero = nonzero
        self.chunk = int(array.chunks[0])
        self._raw_dir = _raw_chunk_dir(array, directory)
        # A map costs address space, not memory (its pages are released on demand), so raw
        # chunks are bounded by count: at 1M cells a step touches ~1,400 of ~1,900 chunks, and
        # a byte budget below the cache size re-maps most of them every step.
        self.max_chunks = (max_maps if self._raw_dir is not None else
                           max(2, max_bytes // max(1, self.chunk * array.dtype.itemsize)))
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def _read(self, c: int) -> np.ndarray:
        """Chunk ``c`` as stored: zarr's codec pipeline, or the chunk file memory-mapped.

        An uncompressed little-endian zarr v3 chunk (codecs ``[bytes]``, as the training cache
        writes) is its file's bytes. zarr's per-call machinery costs ~0.5–0.8 ms per chunk
        here and decodes the whole chunk; a read-only map costs one ``mmap`` and page faults
        on the runs actually read (from the page cache). Used by :meth:`read_rows`; the
        loader's :meth:`ZarrCellStore.read_dense` uses ``pread`` instead
        (:mod:`scproto_scale.data.pread`), whose memory does not grow with the store.
        """
        if self._raw_dir is None:
            return self.array[c * self.chunk : (c + 1) * self.chunk]
        n = min(self.chunk, int(self.array.shape[0]) - c * self.chunk)
        path = self._raw_dir / str(c)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            if self.nonzero:  # zarr would return the fill value: a missing chunk
                raise ScprotoInputError(f"{self.describe(c)}: chunk file {path} is missing") from None
            return np.zeros(n, dtype=self.array.dtype)
        check_chunk_size(path, size, n, self.chunk, self.array.dtype.itemsize, self.describe(c))
        # mmap + frombuffer: np.memmap resolves the path on every call (~0.3 ms here)
        fd = os.open(path, os.O_RDONLY)
        try:
            m = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        return np.frombuffer(m, dtype=self.array.dtype, count=n)

    def _get_chunk(self, c: int) -> np.ndarray:
        with self._lock:
            block = self._cache.get(c)
            if block is not None:
                self._cache.move_to_end(c)
                return block
        # Decode outside the lock so that loader threads decode different chunks in parallel.
        try:
            block = self._read(c)
        except ScprotoInputError:
            raise
        except Exception as exc:  # codec errors differ by codec and zarr version
            raise ScprotoInputError(
                f"{self.describe(c)}: cannot be decoded (truncated or corrupt chunk): "
                f"{type(exc).__name__}: {exc}") from exc
        if (self.nonzero and self._raw_dir is None  # (a missing raw file is caught above)
                and len(block) and not block.any()):
            raise ScprotoInputError(f"{self.describe(c)}: chunk is missing or zeroed "
                                    "(count data are never 0 in a CSR store)")
        with self._lock:
            self._cache[c] = block
            if len(self._cache) > self.max_chunks:
                self._cache.popitem(last=False)
        return block

    def release_pages(self) -> None:
        """Drop the resident pages of every open chunk map from this process (they stay in the
        page cache; the next read faults them back): :func:`release_mapped_pages` per map."""
        if self._raw_dir is None:
            return
        with self._lock:
            blocks = list(self._cache.values())
        for block in blocks:
            release_mapped_pages(block)

    def gather(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Concatenate ``array[starts[i]:stops[i]]`` for all i (runs sorted by start).

        Vectorised: every element position is computed at once, then copied chunk by chunk,
        so the Python work is per chunk touched, not per run (a step touches thousands of runs
        but, over a locality-ordered cache, only tens to hundreds of chunks).
        """
        pos = expand_ranges(np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64))
        out = np.empty(len(pos), dtype=self.array.dtype)
        if len(pos) == 0:
            return out
        chunk_of = pos // self.chunk
        # pos is increasing (sorted, non-overlapping runs), so each chunk's elements are a slice
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        lo = np.concatenate([[0], bounds])
        hi = np.concatenate([bounds, [len(pos)]])
        for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
            c = int(chunk_of[a])
            out[a:b] = self._get_chunk(c)[pos[a:b] - c * self.chunk]
        return out


def _raw_chunk_dir(array: zarr.Array, directory: Path | None) -> Path | None:
    """The chunk directory of a 1-D uncompressed little-endian local zarr v3 array, else None."""
    if directory is None:
        return None
    meta = array.metadata
    try:
        codecs = meta.codecs
        plain = (meta.zarr_format == 3 and len(codecs) == 1
                 and type(codecs[0]).__name__ == "BytesCodec"
                 and (codecs[0].endian is None or codecs[0].endian.value == "little")
                 and meta.chunk_key_encoding.name == "default"
                 and meta.chunk_key_encoding.separator == "/"
                 and not meta.storage_transformers and array.ndim == 1)
    except AttributeError:  # zarr v2 metadata
        return None
    chunks = directory / "c"
    return chunks if plain and directory.is_dir() else None


def expand_ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, e) for s, e in zip(starts, stops)])`` without a Python loop."""
    lengths = np.maximum(stops - starts, 0)
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(total, dtype=np.int64)


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
        self._data = ChunkCache(xg["data"], cache_bytes // 2, self._chunk_namer("X/data"),
                                nonzero=True, directory=self.path / "X" / "data")
        self._indices = ChunkCache(xg["indices"], cache_bytes // 2,
                                   self._chunk_namer("X/indices"),
                                   directory=self.path / "X" / "indices")
        # An uncompressed store (the training cache) is read with pread, not maps: see data.pread
        self._raw: tuple[RawChunkFiles, RawChunkFiles] | None = None
        if (self._data._raw_dir is not None and self._indices._raw_dir is not None
                and self._data.chunk == self._indices.chunk):
            self._raw = tuple(
                RawChunkFiles(cache._raw_dir, int(cache.array.shape[0]), cache.chunk,
                              cache.array.dtype.itemsize, cache.describe)
                for cache in (self._data, self._indices))
        self._var = ad.io.read_elem(self._root["var"])
        check_unique_genes(self._var.index, f"zarr store {self.path}")
        self._obs_group = self._root["obs"]
        self._obs_cache: dict[str, pd.Series] = {}

    def release_pages(self) -> None:
        """Drop the resident pages of the memory-mapped chunks (see :class:`ChunkCache`)."""
        self._data.release_pages()
        self._indices.release_pages()

    def _chunk_namer(self, name: str):
        def describe(c: int) -> str:
            chunk = int(self._root["X"][name.split("/")[1]].chunks[0])
            lo, hi = c * chunk, (c + 1) * chunk
            r0 = int(np.searchsorted(self._indptr, lo, side="right") - 1)
            r1 = int(np.searchsorted(self._indptr, hi, side="left"))
            return (f"zarr store {self.path}: {name} chunk {c} (non-zeros {lo}–{hi - 1}, "
                    f"rows {max(r0, 0)}–{min(r1, self.n_obs) - 1})")
        return describe

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

    def read_slice(self, start: int, stop: int) -> sp.csr_matrix:
        """Contiguous rows: one ranged read of ``X/data`` and ``X/indices`` (zarr fetches the
        chunks concurrently), bypassing the LRU cache that serves the loader's random reads."""
        start, stop = max(0, int(start)), min(int(stop), self.n_obs)
        a, b = int(self._indptr[start]), int(self._indptr[stop])
        xg = self._root["X"]
        out = []
        for name, cache in (("data", self._data), ("indices", self._indices)):
            try:
                out.append(xg[name][a:b])
            except Exception as exc:
                # Find the chunk that fails, so the error names it and its rows.
                for c in range(a // cache.chunk, (b - 1) // cache.chunk + 1):
                    cache._get_chunk(c)
                raise ScprotoInputError(
                    f"zarr store {self.path}: X/{name} rows {start}–{stop - 1} cannot be read: "
                    f"{type(exc).__name__}: {exc}") from exc
        data, indices = out
        ch = self._data.chunk  # a whole chunk of zeros is a missing chunk (zarr's fill value)
        first, last = -(-a // ch), b // ch
        if last > first:
            empty = ~data[first * ch - a:last * ch - a].reshape(-1, ch).any(axis=1)
            if empty.any():
                raise ScprotoInputError(
                    f"{self._data.describe(first + int(np.flatnonzero(empty)[0]))}: chunk is "
                    "missing or zeroed (count data are never 0 in a CSR store)")
        indptr = self._indptr[start:stop + 1] - a
        return sp.csr_matrix((data.astype(np.float32, copy=False), indices, indptr),
                             shape=(stop - start, self.n_vars))

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.n_obs):
            raise IndexError(f"row index out of range [0, {self.n_obs}) in {self.path}")
        starts, stops = self._indptr[rows], self._indptr[rows + 1]
        data = self._data.gather(starts, stops).astype(np.float32, copy=False)
        indices = self._indices.gather(starts, stops)
        indptr = np.concatenate([[0], np.cumsum(stops - starts)])
        return sp.csr_matrix((data, indices, indptr), shape=(len(rows), self.n_vars))

    def read_dense(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Dense, gene-aligned counts of arbitrary rows (see :meth:`CellStore.read_dense`).

        An uncompressed store (the training cache) is read with ``pread`` of each row's
        non-zeros, nearby rows in one span, scattered in the same compiled call
        (:func:`scproto_scale.data.pread.pread_scatter`); otherwise each touched chunk of
        ``X/data`` and ``X/indices`` is fetched once (through the LRU cache) and its runs are
        scattered into the output (:func:`scproto_scale.data.dense_rows.scatter_chunk`).
        Either way there is no CSR intermediate.

        Raises:
            IndexError: a row outside ``[0, n_obs)``.
            ScprotoInputError: a corrupt or missing chunk (naming the store and rows).
        """
        rows = self._rows_in_range(rows)
        if self._data.chunk != self._indices.chunk:  # kernel needs aligned chunks
            return super().read_dense(rows, columns)
        col_map = column_map(columns, self.n_vars)
        out = np.zeros((len(rows), len(columns)), dtype=np.float32)
        plan = plan_runs(rows, self._indptr, self._data.chunk)
        if self._raw is not None:
            self._pread_dense(plan, col_map, out)
            return out
        for c in plan.chunks.tolist():
            scatter_chunk(self._data._get_chunk(c), self._indices._get_chunk(c),
                          c * self._data.chunk, plan.starts, plan.stops, plan.occ_ptr,
                          plan.occ_out, col_map, out)
        return out

    def _pread_dense(self, plan, col_map: np.ndarray, out: np.ndarray) -> None:
        """The uncompressed path of :meth:`read_dense`: one compiled call reads and scatters."""
        data_files, index_files = self._raw
        longest = int((plan.stops - plan.starts).max()) if len(plan.starts) else 0
        size = max(longest, SPAN_ELEMENTS)
        bad = pread_scatter(
            data_files.fds(plan.chunks), index_files.fds(plan.chunks), self._data.chunk,
            plan.starts, plan.stops, plan.occ_ptr, plan.occ_out, col_map, out,
            np.empty(size, dtype=self._data.array.dtype),
            np.empty(size, dtype=self._indices.array.dtype), SPAN_GAP)
        if bad >= 0:
            c = int(plan.starts[bad]) // self._data.chunk
            raise ScprotoInputError(f"{self._data.describe(c)}: short read (chunk file truncated "
                                    "or replaced while reading)")
