"""Checks on count matrices; every error names the store and the offending rows or values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scproto_scale.errors import ScprotoInputError


def check_count_chunk(
    X: sp.csr_matrix, *, source: str, row_offset: int = 0, require_integer: bool = True
) -> None:
    """Validate one row chunk of a count matrix.

    Args:
        X: ``(m, n_vars)`` CSR chunk.
        source: file or store name, used in messages.
        row_offset: position of the chunk's first row in the whole matrix.
        require_integer: counts must be non-negative integers (nb / zinb likelihoods).

    Raises:
        ScprotoInputError: NaN/inf values, negative values, or non-integer values when
            ``require_integer``; the message gives the first offending row and value.
    """
    data = X.data
    if data.size == 0:
        return
    problems = [
        (~np.isfinite(data), "NaN/inf values"),
        (data < 0, "negative values"),
    ]
    if require_integer:
        problems.append((np.isfinite(data) & (data != np.round(data)), "non-integer values"))
    for mask, what in problems:
        if mask.any():
            k = int(np.flatnonzero(mask)[0])
            row = int(np.searchsorted(X.indptr, k, side="right") - 1) + row_offset
            hint = (
                " (raw counts are required for the nb/zinb likelihoods; "
                "use likelihood='mse' for normalised input)"
                if what == "non-integer values"
                else ""
            )
            raise ScprotoInputError(
                f"{source}: X contains {what}, e.g. {data[k]!r} in row {row}{hint}"
            )


def check_unique_genes(var_names: pd.Index, source: str) -> None:
    """Raise :class:`ScprotoInputError` naming duplicated gene ids, if any."""
    dup = var_names[var_names.duplicated()]
    if len(dup):
        raise ScprotoInputError(f"{source}: duplicate gene ids in var, e.g. {list(dup[:5])}")
