"""Positional reads (``pread``) of the loader's on-disk arrays: cache chunks and KNN tables.

The training cache is written uncompressed (codec ``bytes``), so each chunk file *is* the
array's bytes. Memory-mapping those files made the loader's resident set grow with the cache:
this kernel maps whole page-cache folios (measured here: ~250–400 KiB resident per random
4-byte touch on ext4), and a step of random KNN views touches most chunks of a 1M-cell cache.
``pread`` copies only the bytes of each row into a small private buffer, so the reader's
memory does not depend on the cache size (the page cache holds the files, outside the RSS).
The reads and the scatter run in one compiled call (numba, GIL released) per step. The KNN
tables (``.npy``) are read the same way, one row per anchor (:class:`NpyRows`).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import numba
import numpy as np

from scproto_scale.errors import ScprotoInputError

_libc = ctypes.CDLL(None, use_errno=True)
_pread = _libc.pread
_pread.restype = ctypes.c_ssize_t
_pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]

# Runs of one step closer than SPAN_GAP elements are read together, in spans of at most
# SPAN_ELEMENTS (the scratch buffers' length; 1 MiB per 4-byte array).
SPAN_GAP = 1024
SPAN_ELEMENTS = 1 << 18


def check_chunk_size(path: Path, size: int, n: int, chunk: int, itemsize: int,
                     what: str) -> None:
    """Raise :class:`ScprotoInputError` naming ``what`` and ``path`` unless an uncompressed
    chunk file of ``n`` valid elements has ``size`` bytes: zarr v3 writes edge chunks at full
    size (``chunk`` elements), so anything else is a truncated or corrupt file."""
    if size not in (n * itemsize, chunk * itemsize):
        raise ScprotoInputError(f"{what}: chunk file {path} has {size} bytes, expected "
                                f"{n * itemsize} (truncated or corrupt)")


class RawChunkFiles:
    """Open file descriptors of a 1-D uncompressed zarr v3 array's chunk files.

    Files are opened on first use and their sizes checked (a short file is truncated, a missing
    one an error: the array's values are never the fill value in a CSR store).

    Args:
        directory: the array's chunk directory (``…/X/data/c``).
        n_elements: array length; chunk: chunk length (elements); itemsize: bytes per element.
        describe: ``describe(chunk_index)`` names the chunk (store, array, row range) for errors.

    Raises:
        ScprotoInputError: (from :meth:`fds`) a missing or truncated chunk file, named.
    """

    def __init__(self, directory: Path, n_elements: int, chunk: int, itemsize: int, describe):
        self.directory, self.n, self.chunk, self.itemsize = directory, n_elements, chunk, itemsize
        self.describe = describe
        self._fds = np.full(-(-n_elements // chunk) if n_elements else 0, -1, dtype=np.int32)
        self._lock = threading.Lock()

    def fds(self, chunks: np.ndarray) -> np.ndarray:
        """The descriptor table with every chunk in ``chunks`` opened; ``(n_chunks,)`` int32."""
        missing = chunks[self._fds[chunks] < 0]
        if len(missing):
            with self._lock:
                for c in missing.tolist():
                    if self._fds[c] < 0:
                        self._fds[c] = self._open(c)
        return self._fds

    def _open(self, c: int) -> int:
        path = self.directory / str(c)
        n = min(self.chunk, self.n - c * self.chunk)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ScprotoInputError(f"{self.describe(c)}: chunk file {path} is missing") from None
        try:
            check_chunk_size(path, os.fstat(fd).st_size, n, self.chunk, self.itemsize,
                             self.describe(c))
        except ScprotoInputError:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds[self._fds >= 0].tolist():
                os.close(fd)
            self._fds[:] = -1

    def __del__(self):  # pragma: no cover (interpreter-dependent timing)
        try:
            self.close()
        except Exception:
            pass


# not cached on disk: numba cannot cache functions that call a ctypes pointer (compiles ~1 s)
@numba.njit(nogil=True)
def _read_run(fds, chunk, buf, a, b) -> int:  # pragma: no cover (compiled)
    """``array[a:b]`` into ``buf[:b-a]`` across chunk files; −1 on success, else the chunk
    whose read came back short (the module's kernels' convention)."""
    isz = buf.itemsize
    pos, filled = a, 0
    while pos < b:
        c = pos // chunk
        end = min(b, (c + 1) * chunk)
        want = (end - pos) * isz
        got = _pread(fds[c], buf.ctypes.data + filled * isz, want, (pos - c * chunk) * isz)
        if got != want:
            return c
        filled += end - pos
        pos = end
    return -1


@numba.njit(nogil=True, cache=True)
def _open_between(fds_data, fds_indices, chunk, a, b) -> bool:  # pragma: no cover (compiled)
    """Whether the chunks under the gap ``[a, b)`` are open (a gap can cross a chunk no run
    touches, whose file was never opened)."""
    for c in range(a // chunk, (b - 1) // chunk + 1 if b > a else a // chunk):
        if fds_data[c] < 0 or fds_indices[c] < 0:
            return False
    return True


@numba.njit(nogil=True)
def pread_scatter(fds_data, fds_indices, chunk, starts, stops, occ_ptr, occ_out, col_map,
                  out, buf_data, buf_indices, max_gap) -> int:  # pragma: no cover (compiled)
    """Read every run of ``data``/``indices`` and scatter it into the dense output.

    Runs closer than ``max_gap`` elements are read as one span (one ``pread`` per array) as
    long as the span fits the buffers: a locality-ordered cache puts a step's anchors, and many
    of their neighbours, in a few stretches, and a syscall costs more than a page of copying.

    Args:
        fds_data, fds_indices: ``(n_chunks,)`` int32 open descriptors of the chunk files.
        chunk: chunk length (elements; both arrays chunked alike).
        starts, stops, occ_ptr, occ_out: :class:`~scproto_scale.data.dense_rows.RowRuns`.
        col_map: ``(n_vars,)`` int64 output column of each store column (−1: unused).
        out: ``(m, G)`` float32, zero-initialised; written in place.
        buf_data, buf_indices: scratch (array dtypes), at least the longest run.
        max_gap: largest gap (elements) read through between two runs of one span.

    Returns:
        −1 when every read was complete, else the index of the first run that came back short.
    """
    n_runs, cap = starts.shape[0], buf_data.shape[0]
    r = 0
    while r < n_runs:
        lo, hi, last = starts[r], stops[r], r + 1
        while (last < n_runs and starts[last] - hi <= max_gap
               and stops[last] - lo <= cap and _open_between(fds_data, fds_indices, chunk,
                                                             hi, starts[last])):
            hi = max(hi, stops[last])
            last += 1
        if hi > lo:
            if _read_run(fds_data, chunk, buf_data, lo, hi) >= 0 or \
                    _read_run(fds_indices, chunk, buf_indices, lo, hi) >= 0:
                return r
        for q in range(r, last):
            for o in range(occ_ptr[q], occ_ptr[q + 1]):
                dst = out[occ_out[o]]
                for p in range(starts[q] - lo, stops[q] - lo):
                    g = col_map[buf_indices[p]]
                    if g >= 0:
                        dst[g] = buf_data[p]
        r = last
    return -1


@numba.njit(nogil=True)
def _pread_rows(fd, offset, row_bytes, rows, out) -> int:  # pragma: no cover (compiled)
    """Rows ``rows`` of a row-major file into ``out``; consecutive rows in one read. −1 or the
    index of the first short read."""
    n, i = rows.shape[0], 0
    while i < n:
        j = i + 1
        while j < n and rows[j] == rows[j - 1] + 1:
            j += 1
        want = (j - i) * row_bytes
        got = _pread(fd, out.ctypes.data + i * row_bytes, want, offset + rows[i] * row_bytes)
        if got != want:
            return i
        i = j
    return -1


class NpyRows:
    """Row reads of a 2-D C-order ``.npy`` file with ``pread``: ``table[rows]`` without a map.

    A memory map of a KNN table maps whole page-cache folios per touched row, so its resident
    set grows to the table's size (N × k × 4 bytes) within a few steps; this reads ``k`` values
    per requested row into a fresh array.

    Args:
        path: the ``.npy`` file.

    Raises:
        ScprotoInputError: the file is not a 2-D C-order ``.npy`` array, or (on reads) shorter
            than its header says, naming the file and row.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:  # shape, dtype and data offset from the header; maps nothing resident
            header = np.load(self.path, mmap_mode="r")
        except ValueError as exc:  # numpy: "mmap length is greater than file size"
            raise ScprotoInputError(f"{self.path}: shorter than its .npy header says "
                                    f"(truncated): {exc}") from exc
        if header.ndim != 2 or not header.flags.c_contiguous:
            raise ScprotoInputError(f"{self.path}: expected a 2-D C-order array, got shape "
                                    f"{header.shape}")
        self.shape, self.dtype, self.offset = header.shape, header.dtype, int(header.offset)
        del header
        self._row_bytes = self.shape[1] * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        """``(len(rows), k)`` array of the requested rows (1-D integer index, any order)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise IndexError(f"{self.path}: NpyRows takes a 1-D integer row index")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"{self.path}: row index out of range [0, {self.shape[0]})")
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        bad = _pread_rows(self._fd, self.offset, self._row_bytes, rows, out)
        if bad >= 0:
            raise ScprotoInputError(f"{self.path}: short read at row {int(rows[bad])} "
                                    "(file truncated or replaced while reading)")
        return out

    def __del__(self):  # pragma: no cover (interpreter-dependent timing)
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            os.close(fd)
            self._fd = -1


def row_reader(table):
    """``table`` as :class:`NpyRows` when it is a read-only memory map of a 2-D C-order
    ``.npy`` file (what :func:`numpy.load` with ``mmap_mode="r"`` gives), else unchanged."""
    if (isinstance(table, np.memmap) and table.ndim == 2 and table.flags.c_contiguous
            and getattr(table, "filename", None) and table.mode == "r"
            and str(table.filename).endswith(".npy")):
        return NpyRows(table.filename)
    return table
