"""The model's input transform, shared by PCA, the loader and embedding: log1p(x / l · 1e4)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

TARGET_SUM = 1e4


def log_normalize(X: sp.csr_matrix, library_size: np.ndarray) -> sp.csr_matrix:
    """``log1p(x / l · 1e4)`` of a CSR chunk, with ``l`` the total counts over *all* genes.

    Args:
        X: ``(m, g)`` float32 CSR counts (possibly a gene subset).
        library_size: ``(m,)`` total counts of each cell over all genes (> 0).

    Returns:
        ``(m, g)`` float32 CSR.
    """
    scale = (TARGET_SUM / np.asarray(library_size, dtype=np.float64)).astype(np.float32)
    out = sp.csr_matrix(X, dtype=np.float32, copy=True)
    out.data *= np.repeat(scale, np.diff(out.indptr))
    np.log1p(out.data, out=out.data)
    return out
