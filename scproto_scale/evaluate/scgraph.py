"""scGraph: agreement of an embedding's cell-type geometry with a batch-wise PCA consensus.

Implements the scGraph metric of Wang, Leskovec & Regev (2024), *Metric mirages in cell
embeddings*, bioRxiv, doi:10.1101/2024.04.02.587824 (published as *Limitations of cell embedding
metrics assessed using drifting islands*, Nat. Biotechnol. 2025, doi:10.1038/s41587-025-02702-z;
reference code Genentech/Islander, pip package ``scgraph-eval``), reproducing ``scgraph.scGraph(..., only_umap=False).main()`` of
``scgraph-eval==0.1.2``:

1. **Cell types.** A cell type is kept if it has ``>= min_type_cells`` cells in the whole
   dataset (cells without a label are never used for centroids).
2. **Reference (per batch).** For every batch with ``>= min_batch_cells`` cells: counts (as
   float32) are normalised to 10,000 per cell and ``log1p``-transformed (``sc.pp.normalize_total`` +
   ``sc.pp.log1p``; the package expects this already done to its input), ``n_hvg``
   highly-variable genes are chosen with scanpy's default ``flavor="seurat"``, and a PCA with
   ``n_pcs`` components is taken on them (``sc.pp.pca`` defaults: implicit zero-centring, no
   scaling, float32 scores). Every kept type present in the batch gets a centroid, the
   per-coordinate trimmed mean cutting ``int(trim * n)`` cells at each end (as
   ``scipy.stats.trim_mean``); centroid distances are Euclidean and each column is divided by
   its maximum.
3. **Consensus.** Entry ``(i, j)`` is the mean of the batch matrices over the batches where both
   types occur; each column is then divided by its maximum again.
4. **Embedding.** The same centroids (all cells, no batch split) and column-normalised distances
   are computed in ``adata.obsm[key]``, whatever its dimension (the package skips non-2-D
   embeddings unless ``only_umap=False``).
5. **Scores.** Per reference cell type (column ``j``), over the rows where both matrices are
   defined (self-distance included): Spearman (``"rank"``, the paper's Rank-PCA), Pearson
   (``"corr"``, Corr-PCA) and Pearson weighted by ``1 / consensus distance`` with weight 0 on zero
   distances, i.e. the self-distance (``"corr_weighted"``, Corr-Weighted, the headline). Each
   score is the mean over the cell types where it is defined (NaN skipped).

Deliberate differences from the package (only the first changes its numbers where it runs):

- Centroids are accumulated in float64 (the package averages float32 values, i.e. scanpy's PCA
  scores and float32 embeddings, with a naive float32 sum); scores then differ by ~1e-6 at
  most (measured <= 1.6e-6 absolute on Kang 2018 PBMC). With the package's accumulation
  (``_CENTROID_ACCUMULATOR = None``) they agree to ~1e-16: the normalisation, HVG/PCA,
  consensus and correlations are otherwise the same computation.
- A kept type that occurs in no qualifying batch has no reference column: it is skipped (the
  package raises ``KeyError``). Unlabelled cells are ignored for centroids but still take part
  in the per-batch HVG/PCA. If a batch has too few cells or genes for ``n_pcs`` components,
  fewer are used (the package would fail).
- Degenerate inputs (no qualifying batch, fewer than 3 usable cell types) emit a warning and
  give NaN scores instead of failing.
"""

from __future__ import annotations

import itertools
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from scipy.spatial.distance import cdist
from scipy.stats import rankdata

from scproto_scale.errors import ScprotoInputError

__all__ = ["SCORE_NAMES", "scgraph"]

SCORE_NAMES = ("rank", "corr", "corr_weighted")
_MIN_TYPES = 3
# Accumulator of the trimmed means. None: the points' own dtype, as scgraph-eval does (float32
# for scanpy PCA scores; numpy then sums naively in float32). float64 is exact to ~1e-16 and does
# not depend on the embedding's dtype; the two settings differ by ~1e-7 (tests switch to None to
# check bit-level agreement with the package).
_CENTROID_ACCUMULATOR: type[np.floating] | None = np.float64


def scgraph(
    adata: ad.AnnData,
    embedding_keys: list[str],
    batch_key: str,
    label_key: str,
    *,
    n_hvg: int = 1000,
    n_pcs: int = 10,
    trim: float = 0.05,
    min_batch_cells: int = 100,
    min_type_cells: int = 10,
    layer: str | None = None,
    per_type: bool = False,
) -> dict[str, dict]:
    """scGraph scores of embeddings against a batch-wise PCA consensus (Wang et al. 2024).

    See the module docstring for the exact procedure.

    Args:
        adata: ``n_obs x n_vars`` AnnData whose ``X`` (or ``layer``) holds raw counts (dense or
            scipy sparse, any numeric dtype; non-negative). It is not modified.
        embedding_keys: keys of ``adata.obsm``, each an ``(n_obs, d)`` array (any ``d >= 1``,
            finite values).
        batch_key: ``adata.obs`` column of batch labels (cells with a missing batch are used for
            the embedding centroids only).
        label_key: ``adata.obs`` column of cell-type labels (cells with a missing label are not
            used for centroids).
        n_hvg: highly-variable genes per batch (``flavor="seurat"``).
        n_pcs: principal components per batch.
        trim: proportion cut at each end for the per-coordinate trimmed-mean centroids,
            in ``[0, 0.5)``.
        min_batch_cells: batches with fewer cells are not used for the reference.
        min_type_cells: cell types with fewer cells (whole dataset) are ignored.
        layer: ``adata.layers`` key holding the counts instead of ``X``.
        per_type: also return ``"corr_weighted_per_type"``: ``{cell type: its column's
            weighted Pearson}`` (the terms Corr-Weighted averages; NaN for a type the
            reference lacks), to see which types' neighbourhoods an embedding distorts.

    Returns:
        ``{key: {"rank": Rank-PCA, "corr": Corr-PCA, "corr_weighted": Corr-Weighted}}`` with
        Python floats in ``[-1, 1]``, NaN where the metric is undefined (see Warns).

    Raises:
        ScprotoInputError: a missing ``batch_key``/``label_key`` column, ``layer`` or embedding
            key; an embedding that is not 2-D with ``n_obs`` rows or has non-finite values;
            negative counts; an out-of-range parameter.

    Warns:
        UserWarning: when no batch has ``>= min_batch_cells`` cells, or fewer than 3 cell types
            have ``>= min_type_cells`` cells (and occur in a qualifying batch); all scores are
            then NaN.
    """
    _check_params(n_hvg, n_pcs, trim, min_batch_cells, min_type_cells)
    for key, what in ((batch_key, "batch_key"), (label_key, "label_key")):
        if key not in adata.obs.columns:
            raise ScprotoInputError(
                f"{what} {key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})"
            )
    embeddings = {key: _get_embedding(adata, key) for key in embedding_keys}
    counts = _get_counts(adata, layer)

    labels = pd.Categorical(adata.obs[label_key].to_numpy())
    type_sizes = np.bincount(labels.codes[labels.codes >= 0], minlength=len(labels.categories))
    kept = np.flatnonzero(type_sizes >= min_type_cells)
    # codes[i] in [0, len(kept)) for cells of a kept type, -1 otherwise.
    remap = np.full(len(labels.categories) + 1, -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    codes = remap[labels.codes]  # labels.codes == -1 (missing) picks remap[-1] == -1

    nan_result = {key: dict.fromkeys(SCORE_NAMES, float("nan")) for key in embedding_keys}
    if len(kept) < _MIN_TYPES:
        warnings.warn(
            f"scgraph: only {len(kept)} cell type(s) in {label_key!r} have >= {min_type_cells} "
            f"cells (need {_MIN_TYPES}); returning NaN",
            UserWarning,
            stacklevel=2,
        )
        return nan_result

    batch_codes, _ = pd.factorize(adata.obs[batch_key], use_na_sentinel=True)  # NaN -> -1
    order = np.argsort(batch_codes, kind="stable")
    starts = np.searchsorted(batch_codes[order], np.arange(batch_codes.max() + 2))
    batch_rows = [
        order[lo:hi] for lo, hi in itertools.pairwise(starts) if hi - lo >= min_batch_cells
    ]
    if not batch_rows:
        warnings.warn(
            f"scgraph: no batch in {batch_key!r} has >= {min_batch_cells} cells; returning NaN",
            UserWarning,
            stacklevel=2,
        )
        return nan_result

    reference = _reference_distances(counts, batch_rows, codes, len(kept), n_hvg, n_pcs, trim)
    n_ref_types = int(np.sum(~np.all(np.isnan(reference), axis=0)))
    if n_ref_types < _MIN_TYPES:
        warnings.warn(
            f"scgraph: only {n_ref_types} cell type(s) with >= {min_type_cells} cells occur in "
            f"batches with >= {min_batch_cells} cells (need {_MIN_TYPES}); returning NaN",
            UserWarning,
            stacklevel=2,
        )
        return nan_result

    results = {}
    for key, emb in embeddings.items():
        dist = _embedding_distances(emb, codes, len(kept), trim)
        columns = _correlation_columns(dist, reference)
        results[key] = {name: _nanmean(values) for name, values in columns.items()}
        if per_type:
            results[key]["corr_weighted_per_type"] = {
                str(labels.categories[t]): float(v)
                for t, v in zip(kept, columns["corr_weighted"], strict=True)}
    return results


# ----------------------------------------------------------------------------------------------
# input checks


def _check_params(n_hvg: int, n_pcs: int, trim: float, min_batch: int, min_type: int) -> None:
    """Raise ``ScprotoInputError`` for an out-of-range numeric parameter."""
    if n_hvg < 1 or n_pcs < 1:
        raise ScprotoInputError(f"n_hvg ({n_hvg}) and n_pcs ({n_pcs}) must be >= 1")
    if not 0.0 <= trim < 0.5:
        raise ScprotoInputError(f"trim must be in [0, 0.5), got {trim}")
    if min_batch < 1 or min_type < 1:
        raise ScprotoInputError(
            f"min_batch_cells ({min_batch}) and min_type_cells ({min_type}) must be >= 1"
        )


def _get_embedding(adata: ad.AnnData, key: str) -> np.ndarray:
    """``adata.obsm[key]`` as an ``(n_obs, d)`` float array (no copy when already one)."""
    if key not in adata.obsm:
        raise ScprotoInputError(
            f"embedding key {key!r} is not in adata.obsm (keys: {list(adata.obsm.keys())})"
        )
    emb = np.asarray(adata.obsm[key])
    if emb.ndim != 2 or emb.shape[0] != adata.n_obs or emb.shape[1] < 1:
        raise ScprotoInputError(
            f"adata.obsm[{key!r}] must be (n_obs={adata.n_obs}, d>=1), got shape {emb.shape}"
        )
    if not np.issubdtype(emb.dtype, np.floating):
        emb = emb.astype(np.float64)
    if not np.isfinite(emb).all():
        raise ScprotoInputError(f"adata.obsm[{key!r}] has non-finite values")
    return emb


def _get_counts(adata: ad.AnnData, layer: str | None) -> np.ndarray | sp.csr_matrix:
    """The raw count matrix (``X`` or ``layers[layer]``) as CSR or a dense array, not copied."""
    if layer is None:
        x, where = adata.X, "adata.X"
    elif layer in adata.layers:
        x, where = adata.layers[layer], f"adata.layers[{layer!r}]"
    else:
        raise ScprotoInputError(
            f"layer {layer!r} is not in adata.layers (layers: {list(adata.layers.keys())})"
        )
    if x is None:
        raise ScprotoInputError(f"{where} is empty; scgraph needs raw counts")
    x = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)
    values = x.data if sp.issparse(x) else x
    if values.size and values.min() < 0:
        raise ScprotoInputError(f"{where} has negative values; scgraph needs raw counts")
    return x


# ----------------------------------------------------------------------------------------------
# centroids and distances


def _trimmed_centroids(
    points: np.ndarray, codes: np.ndarray, n_types: int, trim: float
) -> np.ndarray:
    """Per-type, per-coordinate trimmed means.

    Args:
        points: ``(n, d)`` float array.
        codes: ``(n,)`` int, type index in ``[0, n_types)`` or -1 (cell not used).
        n_types: number of types.
        trim: proportion cut at each end; a type with ``m`` cells drops its ``int(trim * m)``
            smallest and largest values of every coordinate (``scipy.stats.trim_mean``).
            The kept values are averaged in ``_CENTROID_ACCUMULATOR`` precision.

    Returns:
        ``(n_types, d)`` float64; NaN rows for types without cells.
    """
    centroids = np.full((n_types, points.shape[1]), np.nan)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(n_types + 1))
    for t in range(n_types):
        rows = order[bounds[t] : bounds[t + 1]]
        m = len(rows)
        if m == 0:
            continue
        lo = int(trim * m)
        hi = m - lo
        part = np.partition(points[rows], (lo, hi - 1), axis=0)
        centroids[t] = part[lo:hi].mean(axis=0, dtype=_CENTROID_ACCUMULATOR or points.dtype)
    return centroids


def _normalised_distances(centroids: np.ndarray) -> np.ndarray:
    """Euclidean centroid distances, each column divided by its maximum.

    Args:
        centroids: ``(k, d)`` float, NaN rows for absent types.

    Returns:
        ``(k, k)`` float64; NaN in the rows/columns of absent types, and in a column whose
        maximum is 0 (e.g. a single present type).
    """
    k = centroids.shape[0]
    present = ~np.isnan(centroids).any(axis=1)
    dist = np.full((k, k), np.nan)
    dist[np.ix_(present, present)] = cdist(centroids[present], centroids[present])
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns of absent types
        return dist / np.nanmax(dist, axis=0, keepdims=True)


def _batch_pca(counts: np.ndarray | sp.csr_matrix, n_hvg: int, n_pcs: int) -> np.ndarray:
    """PCA of one batch's log-normalised expression on its highly-variable genes.

    Args:
        counts: ``(n, n_vars)`` raw counts of one batch (a private copy; CSR or dense).
        n_hvg: number of ``flavor="seurat"`` highly-variable genes.
        n_pcs: components (reduced to ``min(n, n_selected_genes) - 1`` if larger).

    Returns:
        ``(n, n_pcs)`` float32 PCA scores (``sc.pp.pca`` defaults).
    """
    batch = ad.AnnData(counts.astype(np.float32, copy=False))
    sc.pp.normalize_total(batch, target_sum=1e4)
    sc.pp.log1p(batch)
    hvg = sc.pp.highly_variable_genes(batch, n_top_genes=n_hvg, inplace=False)
    mask = hvg["highly_variable"].to_numpy()
    n_comps = min(n_pcs, batch.n_obs - 1, int(mask.sum()) - 1)
    sc.pp.pca(batch, n_comps=n_comps, mask_var=mask)
    return batch.obsm["X_pca"]


def _reference_distances(
    counts: np.ndarray | sp.csr_matrix,
    batch_rows: list[np.ndarray],
    codes: np.ndarray,
    n_types: int,
    n_hvg: int,
    n_pcs: int,
    trim: float,
) -> np.ndarray:
    """Consensus of the per-batch, column-normalised PCA centroid distances.

    Args:
        counts: ``(n_obs, n_vars)`` raw counts (read only).
        batch_rows: row indices of each qualifying batch.
        codes: ``(n_obs,)`` int type index in ``[0, n_types)`` or -1.
        n_types: number of kept cell types.
        n_hvg, n_pcs, trim: see :func:`scgraph`.

    Returns:
        ``(n_types, n_types)`` float64: per entry the mean over the batches where it is defined,
        then each column divided by its maximum. Rows/columns of types found in no batch are NaN.
    """
    total = np.zeros((n_types, n_types))
    seen = np.zeros((n_types, n_types), dtype=np.int64)
    for rows in batch_rows:
        scores = _batch_pca(counts[rows], n_hvg, n_pcs)
        dist = _normalised_distances(_trimmed_centroids(scores, codes[rows], n_types, trim))
        defined = ~np.isnan(dist)
        total[defined] += dist[defined]
        seen += defined
    with np.errstate(invalid="ignore", divide="ignore"):
        consensus = total / seen  # 0 / 0 -> NaN where no batch defines the entry
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return consensus / np.nanmax(consensus, axis=0, keepdims=True)


def _embedding_distances(
    embedding: np.ndarray, codes: np.ndarray, n_types: int, trim: float
) -> np.ndarray:
    """Column-normalised centroid distances in an embedding (all cells, no batch split).

    Args:
        embedding: ``(n_obs, d)`` float.
        codes: ``(n_obs,)`` int type index in ``[0, n_types)`` or -1.
        n_types: number of kept cell types.
        trim: see :func:`scgraph`.

    Returns:
        ``(n_types, n_types)`` float64.
    """
    return _normalised_distances(_trimmed_centroids(embedding, codes, n_types, trim))


# ----------------------------------------------------------------------------------------------
# correlations


def _weighted_pearson_columns(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Column-wise weighted Pearson correlation.

    Args:
        x, y: ``(k, m)`` float; entries with weight 0 may hold anything (NaN included).
        w: ``(k, m)`` non-negative weights.

    Returns:
        ``(m,)`` float64; NaN for a column with zero total weight or zero weighted variance.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        w = w / w.sum(axis=0, keepdims=True)
        x = np.where(w > 0, x, 0.0)
        y = np.where(w > 0, y, 0.0)
        dx = x - (w * x).sum(axis=0, keepdims=True)
        dy = y - (w * y).sum(axis=0, keepdims=True)
        cov = (w * dx * dy).sum(axis=0)
        return cov / np.sqrt((w * dx * dx).sum(axis=0) * (w * dy * dy).sum(axis=0))


def _rank_columns(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties averaged) of each column among its ``valid`` entries.

    Args:
        x: ``(k, m)`` float.
        valid: ``(k, m)`` bool.

    Returns:
        ``(k, m)`` float64, NaN where not valid.
    """
    return rankdata(np.where(valid, x, np.nan), axis=0, nan_policy="omit")


def _correlation_columns(embedding: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray]:
    """The three scGraph scores of one embedding, per reference cell type.

    Column ``j`` (a reference cell type) is compared over the rows where both matrices are
    defined; each score is the NaN-skipping mean of its ``(k,)`` columns (:func:`_nanmean`).

    Args:
        embedding: ``(k, k)`` column-normalised embedding centroid distances.
        reference: ``(k, k)`` consensus distances (same type order).

    Returns:
        ``{"rank": Spearman, "corr": Pearson, "corr_weighted": Pearson weighted by 1 /
        reference distance (weight 0 at distance 0)}``, each ``(k,)`` float64, NaN for a column
        without enough defined rows.
    """
    valid = ~np.isnan(embedding) & ~np.isnan(reference)
    ones = valid.astype(np.float64)
    rank = _weighted_pearson_columns(
        _rank_columns(embedding, valid), _rank_columns(reference, valid), ones
    )
    corr = _weighted_pearson_columns(embedding, reference, ones)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(valid & (reference != 0), 1.0 / reference, 0.0)
    corr_weighted = _weighted_pearson_columns(embedding, reference, inv)
    return dict(zip(SCORE_NAMES, (rank, corr, corr_weighted), strict=True))


def _nanmean(values: np.ndarray) -> float:
    """Mean of the finite entries, NaN (without a warning) when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")
