"""Streaming writers: a count matrix appended in row blocks to a zarr or TileDB-SOMA store.

Neither writer holds the matrix: each :meth:`append` writes one CSR row block and forgets it.
Both write under a temporary name and rename on :meth:`finish`, so a crash never leaves a
store that looks whole. The SOMA writer uses the CELLxGENE Census layout (measurement ``RNA``,
X layer ``raw``, var ``feature_id`` / ``feature_name``, obs ``soma_joinid``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import zarr

from scproto_scale.errors import ScprotoInputError


def _tmp_of(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path) -> Path:
    """Write ``adata`` to ``path`` under a temporary name in the same directory, then rename.

    Readers never see a partial file, and a failed write leaves nothing behind. Parent
    directories are created; an existing file is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_of(path)
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextmanager
def atomic_directory(path: str | Path, mkdir: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside ``path``; rename it there on success.

    Yields the temporary path (created when ``mkdir``, else left for the writer to create). On
    a clean exit an existing ``path`` is replaced; on an exception ``path`` is left as it was.
    The temporary directory never outlives the block.
    """
    path = Path(path)
    tmp = _tmp_of(path)
    shutil.rmtree(tmp, ignore_errors=True)
    if mkdir:
        tmp.mkdir(parents=True)
    try:
        yield tmp
        _commit(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prepare_target(path: Path, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise ScprotoInputError(f"target store {path} exists; pass overwrite=True")
    tmp = _tmp_of(path)
    shutil.rmtree(tmp, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def _commit(tmp: Path, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


class ZarrCSRWriter:
    """Append CSR row blocks to an AnnData zarr (format 3) store.

    Args:
        path: target directory (``.zarr``).
        var: the var table (index = unique gene ids).
        chunk_elems: zarr chunk length of ``X/data`` and ``X/indices`` (non-zeros).
        compress: zstd chunks (default) or raw bytes (faster random reads, bigger on disk).
        overwrite: replace an existing store.

    Raises:
        ScprotoInputError: the target exists and ``overwrite`` is false; a block with the wrong
            number of columns.
    """

    def __init__(self, path: str | Path, var: pd.DataFrame, chunk_elems: int = 1 << 18,
                 compress: bool = True, overwrite: bool = False):
        self.path = Path(path)
        self._tmp = _prepare_target(self.path, overwrite)
        self._root = zarr.open_group(str(self._tmp), mode="w", zarr_format=3)
        self.var = var
        self.n_vars = len(var)
        self._kwargs: dict = {"chunks": (chunk_elems,)}
        if not compress:
            self._kwargs["compressors"] = None
        self._X = None
        self.n_obs = 0

    def append(self, block: sp.csr_matrix) -> None:
        """Append ``(m, n_vars)`` float32 CSR rows."""
        if block.shape[1] != self.n_vars:
            raise ScprotoInputError(
                f"{self.path}: block has {block.shape[1]} columns, the store has {self.n_vars}")
        block = sp.csr_matrix(block, dtype=np.float32)
        if self._X is None:
            ad.io.write_elem(self._root, "X", block, dataset_kwargs=self._kwargs)
            self._X = ad.io.sparse_dataset(self._root["X"])
        else:
            self._X.append(block)
        self.n_obs += block.shape[0]

    def finish(self, obs: pd.DataFrame, uns: dict | None = None) -> Path:
        """Write obs (``n_obs`` rows), var and uns, then rename the store into place."""
        if self._X is None:
            raise ScprotoInputError(f"{self.path}: no rows were written")
        if len(obs) != self.n_obs:
            raise ScprotoInputError(f"{self.path}: obs has {len(obs)} rows, X has {self.n_obs}")
        obs = obs.copy()
        obs.index = obs.index.astype(str)
        ad.io.write_elem(self._root, "obs", obs)
        ad.io.write_elem(self._root, "var", self.var)
        for empty in ("obsm", "varm", "obsp", "varp", "layers"):
            ad.io.write_elem(self._root, empty, {})
        ad.io.write_elem(self._root, "uns", uns or {})
        self._root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        _commit(self._tmp, self.path)
        return self.path


def _arrow_schema(df: pd.DataFrame) -> pa.Schema:
    fields = [pa.field("soma_joinid", pa.int64())]
    for c in df.columns:
        s = df[c]
        if s.dtype == bool:
            t = pa.bool_()
        elif pd.api.types.is_integer_dtype(s):
            t = pa.int64()
        elif pd.api.types.is_float_dtype(s):
            t = pa.float64()
        else:
            t = pa.large_string()
        fields.append(pa.field(c, t))
    return pa.schema(fields)


def _arrow_table(df: pd.DataFrame, schema: pa.Schema, offset: int = 0) -> pa.Table:
    cols = {"soma_joinid": np.arange(offset, offset + len(df), dtype=np.int64)}
    for f in schema:
        if f.name != "soma_joinid":
            s = df[f.name]
            cols[f.name] = s.astype(str).to_numpy() if pa.types.is_large_string(f.type) else s.to_numpy()
    return pa.Table.from_pydict(cols, schema=schema)


class SomaWriter:
    """Append CSR row blocks to a TileDB-SOMA experiment with the Census layout.

    Rows get ``soma_joinid`` 0, 1, … in write order. var must have ``feature_id`` and
    ``feature_name`` columns (Census); obs columns are written as given.

    Args:
        path: experiment directory (``.soma``).
        var: var table with ``feature_id`` and ``feature_name``.
        n_obs: number of rows that will be written (the shape of X).
        overwrite: replace an existing experiment.
    """

    def __init__(self, path: str | Path, var: pd.DataFrame, n_obs: int, overwrite: bool = False):
        import tiledbsoma

        missing = [c for c in ("feature_id", "feature_name") if c not in var.columns]
        if missing:
            raise ScprotoInputError(f"{path}: var lacks the Census columns {missing}")
        self.path = Path(path)
        self._tmp = _prepare_target(self.path, overwrite)
        self.n_obs, self.n_vars = int(n_obs), len(var)
        self._exp = tiledbsoma.Experiment.create(str(self._tmp))
        ms = self._exp.add_new_collection("ms")
        rna = ms.add_new_collection("RNA", tiledbsoma.Measurement)
        var = var.reset_index(drop=True)
        vschema = _arrow_schema(var)
        vdf = rna.add_new_dataframe("var", schema=vschema, index_column_names=["soma_joinid"],
                                    domain=[(0, self.n_vars - 1)])
        vdf.write(_arrow_table(var, vschema))
        xc = rna.add_new_collection("X")
        # One tile spans all genes, so row-major CSR order *is* TileDB's global order and
        # blocks are written without a sort (~10× faster than letting TileDB sort them).
        tiles = {"tiledb": {"create": {"dims": {"soma_dim_0": {"tile": 128},
                                                "soma_dim_1": {"tile": self.n_vars}}}}}
        self._X = xc.add_new_sparse_ndarray("raw", type=pa.float32(),
                                            shape=(self.n_obs, self.n_vars), platform_config=tiles)
        self._row = 0
        # Blocks arrive in row-major order: TileDB need not sort them again.
        self._write_opts = tiledbsoma.TileDBWriteOptions(sort_coords=False)

    def append(self, block: sp.csr_matrix) -> None:
        """Append ``(m, n_vars)`` float32 CSR rows as one write (one fragment)."""
        csr = sp.csr_matrix(block, dtype=np.float32)
        csr.sort_indices()
        coo = csr.tocoo()
        self._X.write(pa.Table.from_pydict({
            "soma_dim_0": coo.row.astype(np.int64) + self._row,
            "soma_dim_1": coo.col.astype(np.int64),
            "soma_data": coo.data.astype(np.float32),
        }), platform_config=self._write_opts)
        self._row += block.shape[0]

    def finish(self, obs: pd.DataFrame) -> Path:
        """Write obs (soma_joinid 0…n−1), consolidate nothing, rename into place."""
        if self._row != self.n_obs or len(obs) != self.n_obs:
            raise ScprotoInputError(
                f"{self.path}: wrote {self._row} rows and {len(obs)} obs rows, expected {self.n_obs}")
        obs = obs.reset_index(drop=True)
        oschema = _arrow_schema(obs)
        odf = self._exp.add_new_dataframe("obs", schema=oschema, index_column_names=["soma_joinid"],
                                          domain=[(0, self.n_obs - 1)])
        odf.write(_arrow_table(obs, oschema))
        self._exp.close()
        _commit(self._tmp, self.path)
        return self.path
