"""Reading a labelled / unlabelled cell matrix for the companion methods (in memory)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scproto_scale.data.store import detect_format, open_store
from scproto_scale.errors import ScprotoInputError
from scproto_scale.prepare.normalize import log_normalize

log = logging.getLogger(__name__)


def read_cells(path: str | Path) -> ad.AnnData:
    """Read an h5ad file, AnnData zarr store or TileDB-SOMA experiment into memory.

    The companion methods run on datasets of up to ~10⁵ cells, so the whole matrix is read
    (stores through :class:`~scproto_scale.data.store.CellStore` chunks).

    Returns:
        AnnData with CSR float32 counts in X.

    Raises:
        ScprotoInputError: missing path or unknown format.
    """
    fmt = detect_format(path)
    if fmt == "h5ad":
        adata = ad.read_h5ad(path)
    else:
        store = open_store(path)
        X = sp.vstack([c for _, _, c in store.iter_chunks()], format="csr")
        obs = pd.DataFrame({k: store.obs_column(k).to_numpy() for k in store.obs_columns},
                           index=[str(i) for i in range(store.n_obs)])
        adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=store.var_names))
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def check_counts(X: sp.csr_matrix, where: str) -> None:
    """Raise :class:`ScprotoInputError` unless ``X`` holds non-negative counts with no empty cell."""
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ScprotoInputError(f"{where}: empty matrix {X.shape}")
    if X.data.size and (X.data.min() < 0 or not np.all(np.isfinite(X.data))):
        raise ScprotoInputError(f"{where}: X must hold non-negative finite counts")
    lib = np.asarray(X.sum(1)).ravel()
    if (lib <= 0).any():
        raise ScprotoInputError(
            f"{where}: {int((lib <= 0).sum())} cells have zero total counts (e.g. row "
            f"{int(np.flatnonzero(lib <= 0)[0])}); filter them first"
        )


@dataclass
class CountInput:
    """Model inputs of one dataset.

    Attributes:
        x: ``(n, G)`` float32 scaled log-normalised expression (z-scored genes, clipped at 10).
        counts: ``(n, G)`` float32 raw counts of the same genes (ZINB target).
        size_factor: ``(n,)`` float32 library size / median library size.
        genes: the G gene names used.
        logx: ``(n, G)`` float32 CSR ``log1p(x / l · 1e4)`` (l over all genes): the edge
            weights and cell inputs of the graph encoder; None if not computed.
        gene_sd: ``(G,)`` float32 standard deviation of ``logx`` per gene (1 where constant),
            the scale of ``x``; None if not computed.
    """

    x: np.ndarray
    counts: np.ndarray
    size_factor: np.ndarray
    genes: pd.Index
    logx: sp.csr_matrix | None = None
    gene_sd: np.ndarray | None = None


def _top_variable_genes(X: sp.csr_matrix, genes: pd.Index, n_top: int, where: str) -> np.ndarray:
    """Indices of scanpy's seurat_v3 HVGs; the loess fit can be singular on some count
    matrices (worm neuron: many genes with identical low means), so retry with a wider span."""
    import scanpy as sc

    tmp = ad.AnnData(X=X, var=pd.DataFrame(index=genes.astype(str)))
    for span in (0.3, 0.5, 0.8):
        try:
            hv = sc.pp.highly_variable_genes(tmp, flavor="seurat_v3", n_top_genes=n_top,
                                             span=span, inplace=False)
            if span != 0.3:
                log.warning("%s: seurat_v3 loess needed span=%.1f", where, span)
            return np.flatnonzero(hv["highly_variable"].to_numpy())
        except ValueError as e:  # skmisc's loess: "reciprocal condition number …"
            last = e
    raise ScprotoInputError(f"{where}: highly variable gene selection failed ({last})")


def prepare_counts(adata: ad.AnnData, n_top_genes: int | None, where: str = "input") -> CountInput:
    """Select genes (scanpy seurat_v3 HVG on counts if more than ``n_top_genes``), normalise, scale.

    The transform follows scDeepCluster / scGPCL: size factor l / median(l) (l over all genes),
    ``log1p(x / l · 1e4)``, per-gene z-score clipped at 10.
    """
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    check_counts(X, where)
    lib = np.asarray(X.sum(1)).ravel()
    genes = adata.var_names
    if n_top_genes is not None and X.shape[1] > n_top_genes:
        keep = _top_variable_genes(X, genes, n_top_genes, where)
        X, genes = X[:, keep], genes[keep]
        log.info("%s: %d highly variable genes of %d", where, len(keep), adata.n_vars)
    logx_sp = log_normalize(X, lib)
    logx_sp.sort_indices()
    logx = logx_sp.toarray()
    mean, sd = logx.mean(0), logx.std(0)
    sd[sd == 0] = 1.0
    x = np.clip((logx - mean) / sd, -10, 10).astype(np.float32)
    return CountInput(x=x, counts=X.toarray(), size_factor=(lib / np.median(lib)).astype(np.float32),
                      genes=pd.Index(genes), logx=logx_sp, gene_sd=sd.astype(np.float32))
