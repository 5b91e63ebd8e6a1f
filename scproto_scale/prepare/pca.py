"""Out-of-core PCA of the log-normalised HVG matrix.

Two fits, both streaming row chunks with memory independent of the number of cells:

* ``exact``: the mean and the Gram matrix ``XᵀX`` (G × G, float64) are accumulated over
  chunks; the components are the top eigenvectors of the covariance. One pass, O(G²) memory
  and O(n·G²) work.
* ``randomized``: block subspace (power) iteration on the covariance with implicit centring
  (Halko, Martinsson & Tropp 2011, *Finding structure with randomness*, SIAM Review 53:217,
  Alg. 4.4 / 5.3): each pass computes ``C·Q = (XᵀX Q − n μ μᵀQ) / (n−1)`` chunk by chunk from
  sparse products ``Xᵀ(X Q)``, never centring (densifying) ``X``; then Rayleigh–Ritz on the
  final basis. O(G·l) memory, O(nnz·l) work per pass. The products run in torch, on the GPU
  when CUDA is available.

``method="auto"`` picks exact up to ``exact_max_genes`` genes (HVG-restricted PCA, the
default), randomized above (e.g. all 20k genes). Both densify row blocks of 2,048 cells for
BLAS (float64 accumulation) rather than multiply sparse matrices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)


@dataclass
class PCAModel:
    """A fitted PCA: ``scores = (x - mean) @ components.T``.

    Attributes:
        mean: ``(G,)`` float64 gene means.
        components: ``(n_pcs, G)`` float64, rows orthonormal, sign fixed (largest |loading| > 0).
        explained_variance: ``(n_pcs,)`` float64.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray

    def transform(self, X: sp.csr_matrix | np.ndarray) -> np.ndarray:
        """Project ``(m, G)`` rows → ``(m, n_pcs)`` float32 scores (implicit centring)."""
        proj = np.asarray(X @ self.components.T) - self.mean @ self.components.T
        return proj.astype(np.float32)


def fit_pca(
    chunks: Callable[[], Iterable[sp.csr_matrix]], n_genes: int, n_pcs: int = 50,
    backend: str = "numpy", method: str = "auto", exact_max_genes: int = 4096,
    oversample: int = 30, n_iter: int = 6, seed: int = 0,
) -> PCAModel:
    """Fit PCA from a re-iterable stream of ``(m, G)`` CSR chunks.

    Args:
        chunks: returns a fresh iterator over row chunks of the log-normalised matrix.
        n_genes: G.
        n_pcs: number of components (≤ G).
        backend: ``"numpy"`` (the only one; both fits multiply in torch, on CUDA when
            available).
        method: ``"exact"`` (Gram matrix, one pass), ``"randomized"`` (``n_iter + 2`` passes)
            or ``"auto"`` (exact when ``G ≤ exact_max_genes``: the Gram matrix then fits easily).
        exact_max_genes: threshold of ``"auto"``.
        oversample: extra basis vectors of the randomized fit (l = n_pcs + oversample).
        n_iter: power iterations of the randomized fit.
        seed: seed of the randomized fit's starting basis.

    Raises:
        ValueError: fewer than two cells, an unknown method or backend.
    """
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"unknown PCA method {method!r}; use auto, exact or randomized")
    if method == "auto":
        method = "exact" if n_genes <= exact_max_genes else "randomized"
    if method == "randomized" and n_pcs + oversample < n_genes:
        return fit_pca_randomized(chunks, n_genes, n_pcs, oversample, n_iter, seed)
    if backend != "numpy":
        raise ValueError(f"PCA backend {backend!r} is not available; use 'numpy'")
    n_pcs = min(n_pcs, n_genes)
    gram = np.zeros((n_genes, n_genes))
    total = np.zeros(n_genes)
    n = 0
    for X in chunks():
        for D in _dense_blocks(X, device=_device()):
            D = D.to(_torch().float32)  # float32 BLAS per block, float64 accumulation
            gram += (D.T @ D).double().cpu().numpy()
        total += np.asarray(X.sum(axis=0), dtype=np.float64).ravel()
        n += X.shape[0]
    if n < 2:
        raise ValueError("PCA needs at least two cells")
    mean = total / n
    cov = (gram - n * np.outer(mean, mean)) / (n - 1)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1][:n_pcs]
    comps = evecs[:, order].T
    # Deterministic signs: the largest-magnitude loading of each component is positive.
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])
    comps *= signs[:, None]
    return PCAModel(mean=mean, components=comps, explained_variance=np.maximum(evals[order], 0))


def _torch():
    import torch

    return torch


def _device():
    torch = _torch()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dense_blocks(X: sp.csr_matrix, rows: int = 2048, device=None):
    """Yield ``(≤rows, G)`` float64 torch blocks of a CSR chunk (dense BLAS beats sparse
    products here: the HVG matrix is ~10–40 % dense and the right-hand sides are thin)."""
    import torch

    for a in range(0, X.shape[0], rows):
        D = torch.from_numpy(X[a:a + rows].toarray().astype(np.float64, copy=False))
        yield D if device is None else D.to(device)


def fit_pca_randomized(
    chunks: Callable[[], Iterable[sp.csr_matrix]], n_genes: int, n_pcs: int = 50,
    oversample: int = 30, n_iter: int = 6, seed: int = 0,
) -> PCAModel:
    """Randomized PCA by streaming subspace iteration with implicit centring (see module doc).

    Args:
        chunks: returns a fresh iterator over ``(m, G)`` CSR chunks (``n_iter + 2`` passes).
        n_genes: G.
        n_pcs: components kept.
        oversample: extra basis vectors (l = n_pcs + oversample).
        n_iter: power iterations.
        seed: seed of the Gaussian starting basis.

    Returns:
        :class:`PCAModel` (float64 mean / components / explained variance).

    Raises:
        ValueError: fewer than two cells.
    """
    import torch

    device = _device()
    n_pcs = min(n_pcs, n_genes)
    ell = min(n_genes, n_pcs + oversample)
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(n_genes, ell, generator=g, dtype=torch.float64).to(device)
    Q, _ = torch.linalg.qr(Q)

    def cov_times(Q: torch.Tensor, mean: torch.Tensor | None):
        """(C·Q, column sums, n) from one pass; C uses ``mean`` (or none on the first pass)."""
        acc = torch.zeros(n_genes, Q.shape[1], dtype=torch.float64, device=device)
        total = torch.zeros(n_genes, dtype=torch.float64, device=device)
        n = 0
        Q32 = Q.to(torch.float32)
        for X in chunks():
            for D in _dense_blocks(X, device=device):
                D = D.to(torch.float32)
                acc += (D.T @ (D @ Q32)).to(torch.float64)  # Xᵀ(XQ), uncentred
            total += torch.from_numpy(np.asarray(X.sum(axis=0), dtype=np.float64).ravel()).to(device)
            n += X.shape[0]
        if n < 2:
            raise ValueError("PCA needs at least two cells")
        mu = total / n if mean is None else mean
        acc = (acc - n * torch.outer(mu, mu @ Q)) / (n - 1)
        return acc, total, n

    mean = None
    for _ in range(n_iter):
        Y, total, n = cov_times(Q, mean)
        mean = total / n
        Q, _ = torch.linalg.qr(Y)
    Y, _, _ = cov_times(Q, mean)
    M = Q.T @ Y
    evals, V = torch.linalg.eigh((M + M.T) / 2)
    order = torch.argsort(evals, descending=True)[:n_pcs]
    comps = (Q @ V[:, order]).T.cpu().numpy()
    evals = evals[order].cpu().numpy()
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])
    comps *= signs[:, None]
    log.info("randomized PCA: %d components, l=%d, %d power iterations on %s", n_pcs, ell,
             n_iter, device)
    return PCAModel(mean=mean.cpu().numpy(), components=comps,
                    explained_variance=np.maximum(evals, 0))
