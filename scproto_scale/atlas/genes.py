"""Align a dataset's genes to an atlas's gene list by id."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scproto_scale.errors import ScprotoInputError


def align_genes(var_names: pd.Index, genes: list[str], min_overlap: float = 0.8,
                source: str = "input") -> np.ndarray:
    """Columns of ``var_names`` holding each atlas gene (−1 where missing, zero-filled later).

    Args:
        var_names: the dataset's gene ids.
        genes: the atlas's gene ids (model order).
        min_overlap: refuse when fewer than this fraction of atlas genes are present.
        source: name of the dataset for messages.

    Returns:
        ``(len(genes),)`` int64 column positions, −1 for missing genes.

    Raises:
        ScprotoInputError: overlap below ``min_overlap`` (the message gives the numbers).
    """
    pos = pd.Index(var_names).get_indexer(pd.Index(genes))
    present = int((pos >= 0).sum())
    frac = present / max(1, len(genes))
    if frac < min_overlap:
        raise ScprotoInputError(
            f"{source}: only {present}/{len(genes)} atlas genes ({frac:.1%}) found in var, "
            f"below the required {min_overlap:.0%}; e.g. missing {list(np.asarray(genes)[pos < 0][:5])}"
        )
    if present < len(genes):
        warnings.warn(f"{source}: {len(genes) - present} of {len(genes)} atlas genes missing; "
                      "zero-filled", stacklevel=2)
    return pos.astype(np.int64)


def gene_selector(columns: np.ndarray, n_vars: int) -> sp.csr_matrix:
    """``(n_vars, G)`` 0/1 matrix so that ``X @ S`` puts column ``columns[g]`` at ``g``
    (zeros where ``columns[g] == −1``)."""
    g = np.flatnonzero(columns >= 0)
    return sp.csr_matrix((np.ones(len(g), dtype=np.float32), (columns[g], g)),
                         shape=(n_vars, len(columns)))
