"""CSR rows straight into a dense, gene-aligned batch: the loader's hot path.

A training step asks for ``V·B`` rows (anchors and their KNN neighbours; any order, repeats
allowed) as a dense ``(V·B, G)`` float32 matrix in the model's gene order. Going through
scipy (unique → CSR gather → row fancy-index → column selection → ``toarray``) costs about ten
passes over the step's non-zeros with int64 temporaries; here each stored chunk is visited once
and its runs are written straight into the output by a compiled kernel (numba, GIL released, so
prefetch threads overlap), with the store→model gene map applied on the way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np


@dataclass
class RowRuns:
    """The reads a set of requested rows needs, in storage order.

    Attributes:
        starts, stops: ``(u,)`` int64 non-zero ranges of the unique rows, sorted.
        occ_ptr: ``(u + 1,)`` int64: output rows of unique row ``i`` are
            ``occ_out[occ_ptr[i]:occ_ptr[i + 1]]``.
        occ_out: ``(m,)`` int64 output row of each requested row, grouped by unique row.
        chunks: ``(c,)`` int64 sorted ids of the storage chunks the runs touch.
    """

    starts: np.ndarray
    stops: np.ndarray
    occ_ptr: np.ndarray
    occ_out: np.ndarray
    chunks: np.ndarray


def plan_runs(rows: np.ndarray, indptr: np.ndarray, chunk: int) -> RowRuns:
    """Unique rows, their non-zero ranges and the chunks to fetch, for :func:`scatter_chunk`.

    Args:
        rows: ``(m,)`` requested row positions (any order, repeats allowed).
        indptr: ``(n_obs + 1,)`` int64 CSR row pointer of the store.
        chunk: storage chunk length (non-zeros) of ``data`` and ``indices``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    first = np.ones(len(srt), dtype=bool)
    first[1:] = srt[1:] != srt[:-1]
    uniq = srt[first]
    occ_ptr = np.append(np.flatnonzero(first), len(srt)).astype(np.int64)
    starts, stops = indptr[uniq], indptr[uniq + 1]
    nonempty = stops > starts
    c_lo = starts[nonempty] // chunk
    c_hi = (stops[nonempty] - 1) // chunk + 1
    # Touched chunks: the union of each run's [c_lo, c_hi), without expanding element by element.
    span = np.zeros(int(c_hi.max()) + 1 if len(c_hi) else 1, dtype=np.int64)
    np.add.at(span, c_lo, 1)
    np.add.at(span, c_hi, -1)
    chunks = np.flatnonzero(np.cumsum(span) > 0).astype(np.int64)
    return RowRuns(starts, stops, occ_ptr, order.astype(np.int64), chunks)


@numba.njit(nogil=True, cache=True)
def scatter_chunk(data: np.ndarray, indices: np.ndarray, c0: int, starts: np.ndarray,
                  stops: np.ndarray, occ_ptr: np.ndarray, occ_out: np.ndarray,
                  col_map: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover (compiled)
    """Write the part of every run that lies in one chunk into the dense output.

    Args:
        data, indices: the chunk's values and column ids (``(L,)``, aligned, same chunking).
        c0: global position of the chunk's first element.
        starts, stops, occ_ptr, occ_out: :class:`RowRuns` fields.
        col_map: ``(n_vars,)`` int64 output column of each store column (−1: not a model gene).
        out: ``(m, G)`` float32 output, zero-initialised; written in place.
    """
    c1 = c0 + data.shape[0]
    # Runs are sorted and disjoint: binary-search the first one ending after c0.
    lo, hi = 0, starts.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if stops[mid] <= c0:
            lo = mid + 1
        else:
            hi = mid
    r = lo
    while r < starts.shape[0] and starts[r] < c1:
        a = max(starts[r], c0)
        b = min(stops[r], c1)
        for o in range(occ_ptr[r], occ_ptr[r + 1]):
            dst = out[occ_out[o]]
            for p in range(a - c0, b - c0):
                g = col_map[indices[p]]
                if g >= 0:
                    dst[g] = data[p]
        r += 1


def column_map(columns: np.ndarray, n_vars: int) -> np.ndarray:
    """``(n_vars,)`` int64 output column of each store column, −1 where unused.

    Args:
        columns: ``(G,)`` store column of each output column, −1 for a missing gene (left 0).
        n_vars: store columns.
    """
    columns = np.asarray(columns, dtype=np.int64)
    col_map = np.full(n_vars, -1, dtype=np.int64)
    present = np.flatnonzero(columns >= 0)
    col_map[columns[present]] = present
    return col_map
