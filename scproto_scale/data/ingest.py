"""Convert an ``.h5ad`` file to an AnnData zarr (v3) store or a TileDB-SOMA experiment.

The h5ad is opened in backed mode and ``X`` is copied in row chunks, so memory stays bounded by
one chunk (never densified). The target is written under a temporary name and renamed when
complete: a crash leaves no half-written store that looks whole.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import scipy.sparse as sp
import zarr

from scproto_scale.data.validate import check_count_chunk, check_unique_genes
from scproto_scale.data.writers import atomic_directory
from scproto_scale.errors import ScprotoInputError

log = logging.getLogger(__name__)

StoreFormat = Literal["zarr", "soma"]


def _iter_h5ad_chunks(adata: ad.AnnData, chunk_size: int):
    for start in range(0, adata.n_obs, chunk_size):
        stop = min(start + chunk_size, adata.n_obs)
        yield start, stop, sp.csr_matrix(adata.X[start:stop], dtype=np.float32)


def _open_h5ad(path: Path) -> ad.AnnData:
    if not path.exists():
        raise ScprotoInputError(f"input not found: {path}")
    if path.suffix != ".h5ad":
        raise ScprotoInputError(f"{path}: expected an .h5ad file")
    adata = ad.read_h5ad(path, backed="r")
    try:
        if adata.X is None:
            raise ScprotoInputError(f"{path}: X is empty; raw counts are required")
        check_unique_genes(adata.var_names, str(path))
    except ScprotoInputError:
        adata.file.close()
        raise
    return adata


def _write_zarr(adata: ad.AnnData, src: Path, tmp: Path, chunk_size: int) -> None:
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    obs = adata.obs.copy()
    obs.index = obs.index.astype(str)
    ad.io.write_elem(root, "obs", obs)
    ad.io.write_elem(root, "var", adata.var.copy())
    for empty in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
        ad.io.write_elem(root, empty, {})
    X = None
    for start, _stop, block in _iter_h5ad_chunks(adata, chunk_size):
        check_count_chunk(block, source=str(src), row_offset=start, require_integer=False)
        if X is None:
            ad.io.write_elem(root, "X", block, dataset_kwargs={"chunks": (1 << 18,)})
            X = ad.io.sparse_dataset(root["X"])
        else:
            X.append(block)
    if X is None:
        raise ScprotoInputError(f"{src}: no cells")
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})


def _write_soma(src: Path, tmp: Path) -> None:
    import tiledbsoma.io

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiledbsoma.io.from_h5ad(
            str(tmp), str(src), measurement_name="RNA", X_layer_name="raw", ingest_mode="write"
        )


def ingest(
    input_path: str | Path,
    to: str | Path,
    fmt: StoreFormat | None = None,
    chunk_size: int = 10_000,
    overwrite: bool = False,
) -> Path:
    """Write an h5ad file as a zarr v3 AnnData store or a TileDB-SOMA experiment.

    Args:
        input_path: the ``.h5ad`` file (X = counts, sparse or dense).
        to: target store path; ``.zarr`` suffix → zarr, ``.soma`` → SOMA, unless ``fmt`` is set.
        fmt: ``"zarr"`` or ``"soma"``.
        chunk_size: rows per copied chunk.
        overwrite: replace an existing target.

    Returns:
        The target path.

    Raises:
        ScprotoInputError: missing input, duplicate gene ids, NaN/inf/negative values, or an
            existing target without ``overwrite``.
    """
    src, dst = Path(input_path), Path(to)
    if fmt is None:
        fmt = "soma" if dst.suffix == ".soma" else "zarr"
    if fmt not in ("zarr", "soma"):
        raise ScprotoInputError(f"unknown store format {fmt!r}; use 'zarr' or 'soma'")
    if dst.exists() and not overwrite:
        raise ScprotoInputError(f"target store {dst} exists; pass overwrite=True / --overwrite")
    adata = _open_h5ad(src)
    try:
        with atomic_directory(dst) as tmp:
            if fmt == "zarr":
                _write_zarr(adata, src, tmp, chunk_size)
            else:
                for start, _stop, block in _iter_h5ad_chunks(adata, chunk_size):
                    check_count_chunk(block, source=str(src), row_offset=start,
                                      require_integer=False)
                adata.file.close()
                _write_soma(src, tmp)
    finally:
        if adata.isbacked:
            adata.file.close()
    log.info("ingested %s → %s (%s)", src, dst, fmt)
    return dst
