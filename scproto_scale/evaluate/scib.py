"""scIB metrics through scib-metrics' Benchmarker, with exact FAISS neighbours.

Bio conservation: isolated labels, KMeans NMI/ARI, silhouette label, cLISI. Batch correction:
BRAS (scib-metrics ≥ 0.5's default, not silhouette-batch), iLISI, kBET, graph connectivity, PCR
comparison. Total = 0.6 · bio + 0.4 · batch, unscaled (Luecken et al. 2022, Nat. Methods).
"""

from __future__ import annotations

import logging

import anndata as ad
import faiss
import numpy as np
from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation
from scib_metrics.nearest_neighbors import NeighborsResults

log = logging.getLogger(__name__)
AGGREGATES = {"Batch correction": "scib_batch", "Bio conservation": "scib_bio",
              "Total": "scib_total"}


def faiss_neighbors(X: np.ndarray, k: int) -> NeighborsResults:
    """Exact Euclidean KNN (self included) in the form scib-metrics expects."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    index = faiss.IndexFlatL2(X.shape[1])
    index.add(X)
    dist, idx = index.search(X, k)
    return NeighborsResults(indices=idx, distances=np.sqrt(np.maximum(dist, 0)))


def scib_scores(adata: ad.AnnData, batch_key: str, label_key: str, embedding_keys: list[str],
                unintegrated_key: str, batch_metrics: bool = True) -> dict[str, dict[str, float]]:
    """scIB metrics of several embeddings of the same cells.

    Args:
        adata: cells with ``obs[batch_key]``, ``obs[label_key]`` and the embeddings in obsm.
        batch_key, label_key: obs columns.
        embedding_keys: obsm keys to score (never ``"X_pca"``: scib-metrics overwrites it).
        unintegrated_key: obsm key of the unintegrated PCA (the PCR comparison reference).
        batch_metrics: False skips batch correction (e.g. one batch only: it is undefined);
            the result then has no ``scib_batch`` and ``scib_total``.

    Returns:
        ``{key: {metric: value, "scib_batch", "scib_bio", "scib_total"}}`` (unscaled).
    """
    bm = Benchmarker(
        adata, batch_key=batch_key, label_key=label_key, embedding_obsm_keys=embedding_keys,
        pre_integrated_embedding_obsm_key=unintegrated_key,
        bio_conservation_metrics=BioConservation(),
        batch_correction_metrics=BatchCorrection() if batch_metrics else None, n_jobs=1,
        progress_bar=False,
    )
    bm.prepare(neighbor_computer=faiss_neighbors)
    bm.benchmark()
    table = bm.get_results(min_max_scale=False)  # rows: embeddings (+ "Metric Type")
    return {
        key: {AGGREGATES.get(metric, metric): float(value) for metric, value in table.loc[key].items()}
        for key in embedding_keys
    }
