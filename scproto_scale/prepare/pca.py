"""Out-of-core PCA of the log-normalised HVG matrix.

The mean and the Gram matrix ``XᵀX`` (G × G, float64) are accumulated over row chunks; the
components are the top eigenvectors of the covariance. Exact, one pass to fit, one pass to
project, memory O(G²) independent of the number of cells. The seam for a GPU backend (torch /
CuPy Gram accumulation) is :func:`fit_pca`'s ``backend`` argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


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
    backend: str = "numpy",
) -> PCAModel:
    """Fit PCA from a re-iterable stream of ``(m, G)`` CSR chunks (one pass).

    Args:
        chunks: returns a fresh iterator over row chunks of the log-normalised matrix.
        n_genes: G.
        n_pcs: number of components (≤ G).
        backend: ``"numpy"`` (CPU). GPU backends plug in here.

    Raises:
        ValueError: fewer than two cells, or ``n_pcs`` > G.
    """
    if backend != "numpy":
        raise ValueError(f"PCA backend {backend!r} is not available; use 'numpy'")
    n_pcs = min(n_pcs, n_genes)
    gram = np.zeros((n_genes, n_genes))
    total = np.zeros(n_genes)
    n = 0
    for X in chunks():
        Xc = sp.csr_matrix(X, dtype=np.float64)
        gram += (Xc.T @ Xc).toarray()
        total += np.asarray(Xc.sum(axis=0)).ravel()
        n += Xc.shape[0]
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
