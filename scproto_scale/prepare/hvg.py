"""Streaming, batch-aware ``seurat_v3`` highly-variable-gene (HVG) selection.

The method is the variance-stabilising selection of Seurat v3 (``FindVariableFeatures(method=
"vst")`` / ``SelectIntegrationFeatures``; Stuart et al. 2019, *Comprehensive Integration of
Single-Cell Data*, Cell 177:1888) with the semantics of scanpy's ``flavor="seurat_v3"``
(``sc.pp.highly_variable_genes(adata, flavor="seurat_v3", batch_key=..., n_top_genes=...)``):

1. per batch ``b`` with ``N_b`` cells: gene means ``mu`` and unbiased variances ``s2``;
2. a loess (degree 2, ``span``) of ``log10 s2`` on ``log10 mu`` over the genes that are not
   constant in ``b``; ``sigma = sqrt(10 ** fitted)`` (``sigma = 1`` for constant genes);
3. counts are clipped at ``mu + sqrt(N_b) * sigma`` and the normalised variance
   ``sum_i (min(x_i, clip) - mu)^2 / ((N_b - 1) * sigma^2)`` is computed;
4. per batch genes are ranked by normalised variance (rank 0 = most variable); a rank
   ``>= n_top_genes`` counts as "not selected in this batch";
5. ``highly_variable_rank`` is the median of the in-batch ranks over the batches that selected the
   gene (NaN if none did), ``highly_variable_nbatches`` the number of those batches; genes are
   sorted by median rank (ascending, NaN last), then by ``nbatches`` (descending), then by gene
   position (scanpy ``flavor="seurat_v3"``; ``"seurat_v3_paper"`` would sort by ``nbatches``
   first), and the first ``n_top_genes`` are highly variable. ``variances_norm`` is the mean
   of the normalised variances over batches.

Nothing here holds the count matrix: the data are read as row chunks, twice. Pass 1 accumulates
per-batch sums and sums of squares (float64); pass 2 accumulates per-batch sums and sums of
squares of the *clipped* counts. Because counts are non-negative and the clip value is
``>= mu >= 0``, zeros are never clipped, so pass 2 only touches the stored nonzeros and adds the
zeros' contribution in closed form. Memory is ``O(n_batches * n_vars)`` float64 plus one chunk.

Batches are the codes that actually occur in the data: a code in ``[0, n_batches)`` without any
cell is ignored (scanpy iterates over the batch labels present), so it does not dilute the
median rank.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scproto_scale.errors import ScprotoInputError

ChunkSource = Callable[[], Iterable[tuple[sp.csr_matrix, np.ndarray]]]

__all__ = ["BatchMoments", "batch_moments", "highly_variable_genes_seurat_v3"]


@dataclass(frozen=True)
class BatchMoments:
    """Per-batch first and second moments of a count matrix (pass-1 statistics).

    Attributes:
        n_cells: ``(n_batches,)`` int64, cells per batch code.
        sums: ``(n_batches, n_vars)`` float64, per-batch gene sums ``sum_i x_ig``.
        sums_sq: ``(n_batches, n_vars)`` float64, per-batch sums of squares ``sum_i x_ig^2``.
    """

    n_cells: np.ndarray
    sums: np.ndarray
    sums_sq: np.ndarray

    @property
    def n_vars(self) -> int:
        return int(self.sums.shape[1])

    def batch_means(self) -> np.ndarray:
        """``(n_batches, n_vars)`` float64 per-batch means (0 for empty batches)."""
        n = self.n_cells.astype(np.float64)[:, None]
        return np.divide(self.sums, n, out=np.zeros_like(self.sums), where=n > 0)

    def batch_variances(self) -> np.ndarray:
        """``(n_batches, n_vars)`` float64 per-batch unbiased (ddof=1) variances.

        NaN for batches with fewer than two cells. Computed as
        ``(N * sum_sq - sum^2) / (N (N - 1))``, which is exact (hence exactly 0 for genes that are
        constant in the batch) for integer counts while the products stay below ``2**53``.
        """
        return _unbiased_var(self.n_cells.astype(np.float64)[:, None], self.sums, self.sums_sq)

    def means(self) -> np.ndarray:
        """``(n_vars,)`` float64 gene means over all cells."""
        n = float(self.n_cells.sum())
        return self.sums.sum(axis=0) / n if n > 0 else np.full(self.n_vars, np.nan)

    def variances(self) -> np.ndarray:
        """``(n_vars,)`` float64 unbiased (ddof=1) gene variances over all cells."""
        return _unbiased_var(
            np.float64(self.n_cells.sum()), self.sums.sum(axis=0), self.sums_sq.sum(axis=0)
        )


def _unbiased_var(n: np.ndarray | np.float64, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    num = np.maximum(n * s2 - s1 * s1, 0.0)
    den = n * (n - 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = num / den
    return np.where(den > 0, var, np.nan)


def _check_chunk(
    x: sp.csr_matrix, codes: np.ndarray, n_vars: int, n_batches: int, i_chunk: int
) -> tuple[sp.csr_matrix, np.ndarray]:
    if not sp.issparse(x):
        raise ScprotoInputError(f"chunk {i_chunk}: expected a scipy CSR matrix, got {type(x)}")
    if x.format != "csr":
        x = sp.csr_matrix(x)
    if x.ndim != 2 or x.shape[1] != n_vars:
        raise ScprotoInputError(
            f"chunk {i_chunk}: matrix has shape {x.shape}, expected (m, n_vars={n_vars})"
        )
    codes = np.asarray(codes)
    if codes.shape != (x.shape[0],):
        raise ScprotoInputError(
            f"chunk {i_chunk}: batch codes have shape {codes.shape}, expected ({x.shape[0]},)"
        )
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        raise ScprotoInputError(
            f"chunk {i_chunk}: batch codes must be integers, got dtype {codes.dtype}"
        )
    codes = codes.astype(np.int64, copy=False)
    if codes.size and (codes.min() < 0 or codes.max() >= n_batches):
        raise ScprotoInputError(
            f"chunk {i_chunk}: batch code out of range [0, {n_batches}): "
            f"min {codes.min()}, max {codes.max()}"
        )
    return x, codes


def _flat_bins(x: sp.csr_matrix, codes: np.ndarray, n_vars: int) -> np.ndarray:
    """``batch * n_vars + gene`` of every stored value of a CSR chunk (int64)."""
    row_of_nz = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    return codes[row_of_nz].astype(np.int64) * n_vars + x.indices.astype(np.int64)


def batch_moments(chunks: ChunkSource, n_vars: int, n_batches: int) -> BatchMoments:
    """Pass 1: per-batch cell counts, gene sums and sums of squares, streamed over row chunks.

    Args:
        chunks: zero-argument callable returning a fresh iterable of ``(X_chunk, codes)``:
            ``X_chunk`` an ``(m, n_vars)`` CSR matrix of raw counts (any float/int dtype; float32
            typical), ``codes`` an ``(m,)`` integer array of batch codes in ``[0, n_batches)``.
        n_vars: number of genes (columns).
        n_batches: number of batch codes.

    Returns:
        :class:`BatchMoments` with float64 accumulators.

    Raises:
        ScprotoInputError: on a chunk of the wrong shape or type, batch codes out of range,
            negative or non-finite values.

    Warns:
        UserWarning: once if non-integer values are seen (``seurat_v3`` expects raw counts).
    """
    if n_vars < 1 or n_batches < 1:
        raise ScprotoInputError(f"need n_vars >= 1 and n_batches >= 1, got {n_vars}, {n_batches}")
    n_cells = np.zeros(n_batches, dtype=np.int64)
    sums = np.zeros((n_batches, n_vars), dtype=np.float64)
    sums_sq = np.zeros((n_batches, n_vars), dtype=np.float64)
    warned = False
    for i, (x_raw, codes_raw) in enumerate(chunks()):
        x, codes = _check_chunk(x_raw, codes_raw, n_vars, n_batches, i)
        if x.shape[0] == 0:
            continue
        n_cells += np.bincount(codes, minlength=n_batches)
        data = x.data.astype(np.float64)
        if data.size:
            if not np.isfinite(data).all():
                raise ScprotoInputError(f"chunk {i}: counts contain NaN or infinite values")
            if data.min() < 0:
                raise ScprotoInputError(
                    f"chunk {i}: counts contain negative values (min {data.min()}); "
                    "seurat_v3 HVG selection needs raw counts"
                )
            if not warned and np.any(data != np.round(data)):
                warnings.warn(
                    "seurat_v3 HVG selection expects raw counts, but non-integers were found",
                    UserWarning,
                    stacklevel=2,
                )
                warned = True
        # (batch, gene) bins of the nonzeros: O(nnz) bincounts, exact for integer counts
        flat = _flat_bins(x, codes, n_vars)
        size = n_batches * n_vars
        sums += np.bincount(flat, weights=data, minlength=size).reshape(n_batches, n_vars)
        sums_sq += np.bincount(flat, weights=data * data, minlength=size).reshape(n_batches, n_vars)
    return BatchMoments(n_cells=n_cells, sums=sums, sums_sq=sums_sq)


def _clipped_moments(
    chunks: ChunkSource, n_vars: int, n_batches: int, clip: np.ndarray, n_cells: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2: per-batch sums and sums of squares of ``min(x, clip[b, g])`` over the nonzeros.

    Values above the clip all equal ``clip[b, g]``, so they are only counted; the unclipped values
    are summed. For integer counts every accumulator is then exact, which makes the result
    independent of the chunking (and of the row order).

    Returns:
        ``(sums, sums_sq)``, each ``(n_batches, n_vars)`` float64.
    """
    kept_sum = np.zeros((n_batches, n_vars), dtype=np.float64)
    kept_sq = np.zeros((n_batches, n_vars), dtype=np.float64)
    n_clipped = np.zeros((n_batches, n_vars), dtype=np.float64)
    seen = np.zeros(n_batches, dtype=np.int64)
    clip_flat = clip.ravel()
    for i, (x_raw, codes_raw) in enumerate(chunks()):
        x, codes = _check_chunk(x_raw, codes_raw, n_vars, n_batches, i)
        if x.shape[0] == 0:
            continue
        seen += np.bincount(codes, minlength=n_batches)
        flat = _flat_bins(x, codes, n_vars)
        data = x.data.astype(np.float64)
        above = data > clip_flat[flat]
        kept = np.where(above, 0.0, data)
        size = n_batches * n_vars
        for acc, values in (
            (kept_sum, kept),
            (kept_sq, kept * kept),
            (n_clipped, above.astype(np.float64)),
        ):
            acc += np.bincount(flat, weights=values, minlength=size).reshape(n_batches, n_vars)
    if not np.array_equal(seen, n_cells):
        raise ScprotoInputError(
            "chunks() yielded different data on the second pass: cells per batch "
            f"{seen.tolist()} vs {n_cells.tolist()} on the first; it must return a fresh iterator "
            "over the same rows each time"
        )
    return kept_sum + n_clipped * clip, kept_sq + n_clipped * (clip * clip)


def _loess_log_variance(
    mean: np.ndarray, var: np.ndarray, span: float, batch: int, retry: bool
) -> np.ndarray:
    """Fitted ``log10`` variance (0 for constant genes) from a degree-2 loess on ``log10`` mean.

    skmisc's loess raises on numerically near-singular local fits (R's ``loess`` only warns; the
    usual trigger is many rare genes sharing one mean, scanpy issue #1504). With ``retry`` the
    fit is repeated with the span widened by 0.1 at a time, up to 1, and a warning names the span
    that was used.
    """
    from skmisc.loess import loess  # optional dependency (scikit-misc)

    fitted = np.zeros(mean.shape[0], dtype=np.float64)
    varying = var > 0
    n_varying = int(varying.sum())
    if n_varying == 0:
        return fitted
    x, y = np.log10(mean[varying]), np.log10(var[varying])
    spans = [span]
    while retry and spans[-1] < 1.0:
        spans.append(min(round(spans[-1] + 0.1, 6), 1.0))
    errors = []
    for s in spans:
        model = loess(x, y, span=float(s), degree=2)
        try:
            model.fit()
        except (ValueError, RuntimeError) as e:
            errors.append(f"span={s:g}: {e}")
            continue
        if s != span:
            warnings.warn(
                f"batch code {batch}: loess failed at span={span:g} ({errors[0]}); "
                f"used span={s:g} instead",
                UserWarning,
                stacklevel=3,
            )
        fitted[varying] = model.outputs.fitted_values
        return fitted
    raise ScprotoInputError(
        f"batch code {batch}: loess fit of log-variance on log-mean failed "
        f"({n_varying} non-constant genes): {'; '.join(errors)}"
    )


def highly_variable_genes_seurat_v3(
    chunks: ChunkSource,
    n_vars: int,
    n_batches: int,
    n_top_genes: int = 2000,
    span: float = 0.3,
    *,
    loess_retry: bool = True,
) -> pd.DataFrame:
    """Batch-aware ``seurat_v3`` HVG selection over row chunks of a raw-count matrix.

    Matches scanpy's ``sc.pp.highly_variable_genes(adata, flavor="seurat_v3",
    batch_key=..., n_top_genes=n_top_genes, span=span)`` (Stuart et al. 2019, Cell) up to
    floating-point summation order (for integer counts the float64 sums are exact, so the result
    does not depend on the chunking). Exact ties in normalised variance are ordered by numpy's
    default ``argsort``, as in scanpy, so the selections agree gene for gene. See the module
    docstring for the algorithm. ``chunks()`` is called twice.

    Args:
        chunks: zero-argument callable returning a fresh iterable over ``(X_chunk, codes)``
            pairs, the same rows each call: ``X_chunk`` an ``(m, n_vars)`` CSR matrix of raw
            counts (float32 typical), ``codes`` an ``(m,)`` int array in ``[0, n_batches)``.
        n_vars: number of genes (columns of every chunk).
        n_batches: number of batch codes; codes with no cells are ignored. Use 1 (and all-zero
            codes) for an unbatched selection.
        n_top_genes: number of genes to select, ``1 <= n_top_genes <= n_vars``.
        span: loess span (fraction of genes in each local fit).
        loess_retry: if the loess fit of a batch fails at ``span`` (skmisc raises where R only
            warns, e.g. ``near singularities``; scanpy then fails), refit that batch with the
            span widened by 0.1 at a time up to 1 and warn. ``False``: raise instead.

    Warns:
        UserWarning: non-integer counts; a batch whose loess needed a wider span.

    Returns:
        DataFrame indexed ``0 … n_vars-1`` (gene positions) with columns ``means`` and
        ``variances`` (float64, over all cells, ddof=1), ``highly_variable_rank`` (float64,
        median in-batch rank over the batches selecting the gene; NaN if none does),
        ``highly_variable_nbatches`` (int64), ``highly_variable`` (bool, exactly
        ``n_top_genes`` True) and ``variances_norm`` (float64, mean over batches).

    Raises:
        ScprotoInputError: bad arguments, malformed chunks (see :func:`batch_moments`), no cells,
            a batch with exactly one cell, a failing loess fit (after any retries), or a second
            pass that does not see the same cells.
        ImportError: if ``scikit-misc`` (``skmisc.loess``) is not installed.
    """
    if not 1 <= n_top_genes <= n_vars:
        raise ScprotoInputError(f"n_top_genes must be in [1, n_vars={n_vars}], got {n_top_genes}")
    if not 0 < span <= 1:
        raise ScprotoInputError(f"span must be in (0, 1], got {span}")
    try:
        import skmisc.loess  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "seurat_v3 HVG selection needs scikit-misc: pip install scikit-misc"
        ) from e

    mom = batch_moments(chunks, n_vars, n_batches)
    present = np.flatnonzero(mom.n_cells > 0)
    if present.size == 0:
        raise ScprotoInputError("chunks() yielded no cells")
    singletons = present[mom.n_cells[present] < 2]
    if singletons.size:
        raise ScprotoInputError(
            f"batch codes {singletons.tolist()} have a single cell; seurat_v3 needs at least "
            "two cells per batch (drop or merge those cells)"
        )

    mean_b = mom.batch_means()
    var_b = mom.batch_variances()
    reg_std = np.ones((n_batches, n_vars), dtype=np.float64)
    clip = np.zeros((n_batches, n_vars), dtype=np.float64)
    for b in present:
        reg_std[b] = np.sqrt(
            10.0 ** _loess_log_variance(mean_b[b], var_b[b], span, int(b), loess_retry)
        )
        clip[b] = mean_b[b] + np.sqrt(float(mom.n_cells[b])) * reg_std[b]

    csum, csum_sq = _clipped_moments(chunks, n_vars, n_batches, clip, mom.n_cells)

    # sum over all cells of (min(x, clip) - mu)^2; zeros (never clipped) contribute mu^2 each,
    # which the closed form n*mu^2 - 2*mu*sum + sum_sq already includes.
    n = mom.n_cells[present].astype(np.float64)[:, None]
    mu = mean_b[present]
    ssd = n * mu * mu - 2.0 * mu * csum[present] + csum_sq[present]
    norm_var = ssd / ((n - 1.0) * np.square(reg_std[present]))  # (n_present, n_vars)

    # in-batch ranks, 0 = most variable. Exact ties are common (e.g. all genes seen once with
    # count 1 in a batch share one value) and can straddle the top-n cut; numpy's default
    # argsort is used on purpose: it orders them as scanpy does (tested), whereas a stable sort
    # would favour low gene positions.
    order = np.argsort(-norm_var, axis=1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(n_vars)[None, :], axis=1)
    selected = ranks < n_top_genes
    nbatches = selected.sum(axis=0).astype(np.int64)
    masked = np.where(selected, ranks.astype(np.float64), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN genes -> NaN median
        median_rank = np.nanmedian(masked, axis=0)

    # sort: median rank ascending (NaN last), nbatches descending, then gene position
    rank_key = np.where(np.isnan(median_rank), np.inf, median_rank)
    final_order = np.lexsort((np.arange(n_vars), -nbatches, rank_key))
    hv = np.zeros(n_vars, dtype=bool)
    hv[final_order[:n_top_genes]] = True

    return pd.DataFrame(
        {
            "means": mom.means(),
            "variances": mom.variances(),
            "highly_variable_rank": median_rank,
            "highly_variable_nbatches": nbatches,
            "highly_variable": hv,
            "variances_norm": norm_var.mean(axis=0),
        },
        index=pd.RangeIndex(n_vars),
    )
