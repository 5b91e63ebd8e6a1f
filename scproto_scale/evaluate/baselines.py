"""Baselines scored by the same code as scProto: integration embeddings and metacells.

Every embedding baseline takes the same cells and genes scProto was trained on (raw counts of
the prepared HVGs, or the prepared unintegrated PCA) and returns a ``(n, d)`` float32 array plus
its wall time. The libraries are optional (``pip install -e ".[bench]"``); a missing one raises
:class:`BaselineUnavailable` naming the package, so callers can skip that method.

- scVI: Lopez et al. 2018, Nat. Methods (scvi-tools ``SCVI``, NB likelihood, 10-d latent).
- scPoli: De Donno et al. 2023, Nat. Methods (scArches ``scPoli``, unsupervised: no labels, as
  scProto), NB reconstruction, 10-d latent.
- Harmony: Korsunsky et al. 2019, Nat. Methods (harmonypy on the unintegrated PCA).
- k-means metacells: k-means (sklearn) on the unintegrated PCA with as many clusters as scProto
  has used prototypes; SEACells (Persad et al. 2023, Nat. Biotechnol.) when installed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger(__name__)


VAE_BATCH_SIZE = 512  # scVI / scPoli mini-batch: fewer, larger steps are faster on CPU


class BaselineUnavailable(RuntimeError):
    """The optional package a baseline needs is not installed (the message names it)."""


@contextlib.contextmanager
def _quiet():
    """Silence the libraries' progress bars and chatter (warnings still reach the log)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _counts_adata(counts: sp.spmatrix, batches: np.ndarray) -> ad.AnnData:
    X = sp.csr_matrix(counts, dtype=np.float32)
    obs = pd.DataFrame({"batch": pd.Categorical(np.asarray(batches).astype(str))},
                       index=[str(i) for i in range(X.shape[0])])
    return ad.AnnData(X=X, obs=obs)


def default_epochs(scproto_epochs: int, n_views: int, hi: int = 400) -> int:
    """scVI / scPoli epochs matched to scProto's training: the same cell passes.

    Each scProto epoch sends every cell and its ``n_views − 1`` KNN views through the CVAE's
    encoder and decoder (forward and backward), so ``scproto_epochs · n_views`` epochs give a
    VAE baseline as many cell passes (30 × 8 = 240 with the defaults), capped at scvi-tools' own
    maximum of 400. The earlier fixed budget of 250k cell passes gave 20 epochs at 12k cells,
    a tenth of scProto's compute; on Kang scGen (seed 0), 400 epochs instead of 100 raised
    scVI's scIB batch score from 0.40 to 0.80 (README, "Baseline budget").
    """
    return int(min(hi, scproto_epochs * n_views))


def scvi_embedding(counts: sp.spmatrix, batches: np.ndarray, seed: int, epochs: int,
                   n_latent: int = 10) -> tuple[np.ndarray, float]:
    """scVI latent means.

    Args:
        counts: ``(n, G)`` raw integer counts (the prepared HVGs).
        batches: ``(n,)`` batch labels (the integrated covariate).
        seed: scvi-tools' global seed; epochs: training epochs (no early stopping).

    Returns:
        ``(n, n_latent)`` float32 embedding and the wall time in seconds (setup + training).
    """
    try:
        import scvi
    except ImportError as e:
        raise BaselineUnavailable("scVI needs scvi-tools (pip install -e '.[bench]')") from e
    t = time.perf_counter()
    adata = _counts_adata(counts, batches)
    with _quiet():
        scvi.settings.seed = seed
        scvi.settings.dl_num_workers = 0
        scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
        model = scvi.model.SCVI(adata, n_latent=n_latent, gene_likelihood="nb")
        model.train(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                    early_stopping=False, logger=False, enable_checkpointing=False,
                    batch_size=VAE_BATCH_SIZE)
        Z = model.get_latent_representation()
    return np.asarray(Z, dtype=np.float32), time.perf_counter() - t


def scpoli_embedding(counts: sp.spmatrix, batches: np.ndarray, seed: int, epochs: int,
                     n_latent: int = 10) -> tuple[np.ndarray, float]:
    """scPoli (scArches) latent means, trained without labels.

    Pretraining takes 80 % of ``epochs`` (scArches' tutorial ratio). scArches 0.6.1 imports
    ``anndata.read``, which anndata 0.12 removed: the alias is set before importing.

    Returns:
        ``(n, n_latent)`` float32 embedding and the wall time in seconds.
    """
    import anndata
    import torch

    if not hasattr(anndata, "read"):
        anndata.read = anndata.read_h5ad  # scArches 0.6.1 still calls it
    try:
        with _quiet():
            from scarches.models.scpoli import scPoli
    except ImportError as e:
        raise BaselineUnavailable("scPoli needs scarches (pip install -e '.[bench]')") from e
    t = time.perf_counter()
    adata = _counts_adata(counts, batches)
    adata.X = adata.X.toarray()  # get_latent needs dense X
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the library draws from the global RNG)
    with _quiet():
        model = scPoli(adata=adata, condition_keys="batch", latent_dim=n_latent,
                       recon_loss="nb")
        model.train(n_epochs=epochs, pretraining_epochs=int(0.8 * epochs), eta=5,
                    unlabeled_prototype_training=False, batch_size=VAE_BATCH_SIZE)
        Z = model.get_latent(adata, mean=True)
    return np.asarray(Z, dtype=np.float32), time.perf_counter() - t


def harmony_embedding(pca: np.ndarray, batches: np.ndarray, seed: int
                      ) -> tuple[np.ndarray, float]:
    """Harmony-corrected PCA.

    Args:
        pca: ``(n, p)`` unintegrated PCA scores; batches: ``(n,)`` batch labels.

    Returns:
        ``(n, p)`` float32 corrected scores (harmonypy 2.x ``Z_corr``, cells × PCs) and seconds.
    """
    try:
        import harmonypy
    except ImportError as e:
        raise BaselineUnavailable("Harmony needs harmonypy (pip install -e '.[bench]')") from e
    t = time.perf_counter()
    meta = pd.DataFrame({"batch": np.asarray(batches).astype(str)})
    logging.getLogger("harmonypy").setLevel(logging.WARNING)
    with _quiet():
        ho = harmonypy.run_harmony(np.asarray(pca, dtype=np.float64), meta, ["batch"],
                                   random_state=seed, verbose=False)
    Z = np.asarray(ho.Z_corr)
    if Z.shape[0] != pca.shape[0]:  # harmonypy < 2 returns PCs × cells
        Z = Z.T
    return np.ascontiguousarray(Z, dtype=np.float32), time.perf_counter() - t


def kmeans_metacells(pca: np.ndarray, n_metacells: int, seed: int) -> tuple[np.ndarray, float]:
    """k-means metacells on the unintegrated PCA.

    Args:
        pca: ``(n, p)`` PCA scores; n_metacells: number of clusters (scProto's used prototypes).

    Returns:
        ``(n,)`` int64 metacell of each cell and seconds.
    """
    from sklearn.cluster import KMeans

    t = time.perf_counter()
    km = KMeans(n_clusters=int(n_metacells), n_init=3, random_state=seed).fit(pca)
    return km.labels_.astype(np.int64), time.perf_counter() - t


def scanpy_sparray_shim() -> None:
    """Let scanpy 1.11's KNN shortcut take scipy sparse *arrays*; idempotent.

    Above 4,096 cells ``sc.pp.neighbors`` (inside SEACells, and the clustering benchmark's
    Leiden) gets a ``csr_array`` from its KNN transformer and calls ``getnnz(axis=1)``, which
    scipy ≥ 1.15 arrays no longer have (AttributeError): the shortcut is handed the same
    matrix as a ``csr_matrix``.
    """
    from scanpy.neighbors import _common

    shortcut = _common._ind_dist_shortcut
    if getattr(shortcut, "takes_sparray", False):
        return

    def takes_sparray(d, /):
        return shortcut(sp.csr_matrix(d) if isinstance(d, sp.sparray) else d)

    takes_sparray.takes_sparray = True
    takes_sparray.__wrapped__ = shortcut
    _common._ind_dist_shortcut = takes_sparray


def seacells_metacells(counts: sp.spmatrix, pca: np.ndarray, n_metacells: int, seed: int,
                       max_iter: int = 30) -> tuple[np.ndarray, float]:
    """SEACells metacells (kernel archetypal analysis on the PCA's diffusion kernel).

    Returns:
        ``(n,)`` int64 hard metacell assignment and seconds.

    Raises:
        BaselineUnavailable: SEACells is not installed or fails to import.
    """
    os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba_cache")
    scanpy_sparray_shim()
    try:
        with _quiet():
            import SEACells
            from SEACells import build_graph
            from tqdm import tqdm
    except Exception as e:  # it imports palantir / jax, which can fail in several ways
        raise BaselineUnavailable(f"SEACells unavailable: {type(e).__name__}: {e}") from e
    # SEACells 0.3.3 uses tqdm.notebook, which fails outside Jupyter without ipywidgets.
    build_graph.tqdm = tqdm
    t = time.perf_counter()
    adata = _counts_adata(counts, np.zeros(counts.shape[0], dtype=int))
    adata.obsm["X_pca"] = np.asarray(pca, dtype=np.float32)
    np.random.seed(seed)  # noqa: NPY002 (the library draws from the global RNG)
    with _quiet():
        model = SEACells.core.SEACells(adata, build_kernel_on="X_pca",
                                       n_SEACells=int(n_metacells), n_waypoint_eigs=10,
                                       convergence_epsilon=1e-5, verbose=False)
        model.construct_kernel_matrix()
        model.initialize_archetypes()
        try:
            model.fit(min_iter=10, max_iter=max_iter)
            converged = True
        except RuntimeWarning:  # raised after the assignments are stored
            converged = False
    if not converged:
        warnings.warn(f"SEACells did not converge in {max_iter} iterations; its assignments "
                      "after the last one are used", stacklevel=2)
    labels = pd.Categorical(adata.obs["SEACell"].astype(str)).codes.astype(np.int64)
    return labels, time.perf_counter() - t
