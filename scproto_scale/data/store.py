"""The `CellStore` interface: one view of a cell × gene count matrix, whatever the format.

Rows are addressed by position ``0 … n_obs-1`` (for TileDB-SOMA the store maps positions to
``soma_joinid``). Reads return CSR counts with all genes; gene subsetting is the caller's job.
"""

from __future__ import annotations

import abc
import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scproto_scale.errors import ScprotoInputError


def release_mapped_pages(array) -> None:
    """Drop a read-only memory map's resident pages from this process (not from the page cache).

    The loader reads a few rows per step from memory-mapped KNN tables and training-cache
    chunks; left alone, every page touched in an epoch stays mapped and the RSS grows with n.
    ``MADV_DONTNEED`` on a clean shared file mapping just unmaps the pages: a later read faults
    them back from the page cache. Finds the map of an ``np.memmap`` (or a view of one) and of an
    array made by ``np.frombuffer(mmap)``; no-op on a plain array.
    """
    obj = array
    while obj is not None and not isinstance(obj, mmap.mmap):
        obj = (obj.obj if isinstance(obj, memoryview)
               else getattr(obj, "_mmap", None) or getattr(obj, "base", None))
    if obj is not None and hasattr(mmap, "MADV_DONTNEED"):
        obj.madvise(mmap.MADV_DONTNEED)


class CellStore(abc.ABC):
    """Read-only access to an on-disk count matrix ``X: (n_obs, n_vars)`` with obs and var.

    Implementations: :class:`~scproto_scale.data.zarr_store.ZarrCellStore` (AnnData zarr) and
    :class:`~scproto_scale.data.soma_store.SomaCellStore` (TileDB-SOMA experiment).
    """

    path: Path

    @property
    @abc.abstractmethod
    def n_obs(self) -> int:
        """Number of cells (rows)."""

    @property
    @abc.abstractmethod
    def var(self) -> pd.DataFrame:
        """The var table (gene annotations), indexed by the unique gene ids."""

    @property
    def var_names(self) -> pd.Index:
        """Gene ids (unique), in column order of ``X``."""
        return self.var.index

    @abc.abstractmethod
    def obs_columns(self) -> list[str]:
        """Names of the obs (per-cell metadata) columns."""

    @abc.abstractmethod
    def _read_obs_column(self, key: str) -> pd.Series:
        """Read one obs column (no validation)."""

    @abc.abstractmethod
    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Counts of the given rows.

        Args:
            rows: ``(m,)`` int64 row positions, strictly increasing.

        Returns:
            ``(m, n_vars)`` float32 CSR counts, in the order of ``rows``.
        """

    @property
    def n_vars(self) -> int:
        return len(self.var_names)

    def obs_column(self, key: str) -> pd.Series:
        """One obs column as a pandas Series of length ``n_obs``.

        Raises:
            ScprotoInputError: if ``key`` is not an obs column (the message lists those that are).
        """
        cols = self.obs_columns()
        if key not in cols:
            raise ScprotoInputError(
                f"obs column {key!r} not found in store {self.path}; available columns: {cols}"
            )
        s = self._read_obs_column(key)
        s.index = pd.RangeIndex(self.n_obs)
        return s

    def read_slice(self, start: int, stop: int) -> sp.csr_matrix:
        """Counts of the contiguous rows ``start:stop`` as ``(stop-start, n_vars)`` float32 CSR."""
        return self.read_rows(np.arange(start, stop, dtype=np.int64))

    def iter_chunks(self, chunk_size: int = 8192) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """Iterate the whole matrix in row chunks: yields ``(start, stop, X[start:stop])``."""
        for start in range(0, self.n_obs, chunk_size):
            stop = min(start + chunk_size, self.n_obs)
            yield start, stop, self.read_slice(start, stop)

    def read_rows_unsorted(self, rows: np.ndarray) -> sp.csr_matrix:
        """Counts of arbitrary rows (any order, repeats allowed), read once per unique row."""
        rows = np.asarray(rows, dtype=np.int64)
        uniq, inverse = np.unique(rows, return_inverse=True)
        return self.read_rows(uniq)[inverse]

    def _rows_in_range(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` as int64, any order; IndexError naming the store if one is outside the store."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n_obs):
            raise IndexError(f"row index out of range [0, {self.n_obs}) in {self.path}")
        return rows

    def read_dense(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Dense counts of arbitrary rows in a given gene order (the training loader's read).

        Args:
            rows: ``(m,)`` row positions, any order, repeats allowed (read once each).
            columns: ``(G,)`` store column of each output column; −1 for a gene the store
                lacks (left 0).

        Returns:
            ``(m, G)`` float32 C-contiguous counts.
        """
        from scproto_scale.atlas.genes import gene_selector

        X = self.read_rows_unsorted(rows)
        columns = np.asarray(columns, dtype=np.int64)
        if np.array_equal(columns, np.arange(self.n_vars)):
            pass
        elif (columns >= 0).all():
            X = X[:, columns]
        else:
            X = X @ gene_selector(columns, self.n_vars)
        return np.ascontiguousarray(X.toarray(), dtype=np.float32)

    def release_pages(self) -> None:
        """Drop memory-mapped pages this reader holds (the loader calls it every few steps so
        that its memory does not grow with the store). No-op unless the store maps files."""
        return


class PrefixStore(CellStore):
    """The first ``n`` rows of another store, as a store (e.g. a 100k-cell slice of an atlas).

    Args:
        base: the store.
        n: rows kept (``0 < n ≤ base.n_obs``).
    """

    def __init__(self, base: CellStore, n: int):
        if not 0 < n <= base.n_obs:
            raise ScprotoInputError(f"prefix of {n} rows out of range for {base.path} "
                                    f"({base.n_obs} rows)")
        self.base, self._n = base, int(n)
        self.path = Path(f"{base.path}[:{n}]")

    @property
    def n_obs(self) -> int:
        return self._n

    @property
    def var(self) -> pd.DataFrame:
        return self.base.var

    def obs_columns(self) -> list[str]:
        return self.base.obs_columns()

    def _read_obs_column(self, key: str) -> pd.Series:
        return self.base.obs_column(key).iloc[: self._n].reset_index(drop=True)

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and rows[-1] >= self._n:
            raise IndexError(f"row index out of range [0, {self._n}) in {self.path}")
        return self.base.read_rows(rows)

    def read_dense(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        return self.base.read_dense(self._rows_in_range(rows), columns)

    def release_pages(self) -> None:
        self.base.release_pages()


def detect_format(path: str | Path) -> str:
    """Return ``"zarr"``, ``"soma"`` or ``"h5ad"`` for a path, from its layout on disk.

    Raises:
        ScprotoInputError: if the path does not exist or is none of those formats.
    """
    p = Path(path)
    if not p.exists():
        raise ScprotoInputError(f"input not found: {p}")
    if p.is_file():
        if p.suffix == ".h5ad":
            return "h5ad"
        raise ScprotoInputError(f"{p} is a file but not .h5ad; expected an h5ad, zarr or SOMA store")
    if (p / "__tiledb_group.tdb").exists() or (p / "ms").exists():
        return "soma"
    if (p / "zarr.json").exists() or (p / ".zgroup").exists():
        return "zarr"
    raise ScprotoInputError(f"{p} is a directory but neither an AnnData zarr store nor a SOMA experiment")


def open_store(path: str | Path, **kwargs) -> CellStore:
    """Open a zarr or TileDB-SOMA store as a :class:`CellStore`.

    Raises:
        ScprotoInputError: missing path, unknown format, or an h5ad (ingest it first).
    """
    # remote URIs (the Census on S3) are SOMA experiments; they cannot be probed on disk
    fmt = "soma" if "://" in str(path) else detect_format(path)
    if fmt == "zarr":
        from scproto_scale.data.zarr_store import ZarrCellStore

        return ZarrCellStore(path, **kwargs)
    if fmt == "soma":
        from scproto_scale.data.soma_store import SomaCellStore

        return SomaCellStore(path, **kwargs)
    raise ScprotoInputError(
        f"{path} is an h5ad file; convert it with `scproto-scale ingest {path} --to STORE` first"
    )
