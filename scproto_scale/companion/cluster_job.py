"""``scproto-scale cluster``: scGPCL on one dataset, clusters written to ``obs["scgpcl_cluster"]``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from scproto_scale.companion.inputs import prepare_counts, read_cells
from scproto_scale.companion.scgpcl import ClusterResult, fit_scgpcl
from scproto_scale.config import ClusterJobConfig
from scproto_scale.data.writers import write_h5ad_atomic
from scproto_scale.errors import ScprotoInputError
from scproto_scale.evaluate.clustering import clustering_scores

log = logging.getLogger(__name__)


def resolve_n_clusters(adata: ad.AnnData, label_key: str | None, n_clusters: int | None,
                       where: str) -> int:
    """K from the config, else the number of distinct labels.

    Raises:
        ScprotoInputError: unknown label column, neither K nor labels given, or K > cells.
    """
    if label_key is not None and label_key not in adata.obs.columns:
        raise ScprotoInputError(
            f"{where}: obs has no column {label_key!r} (columns: {list(adata.obs.columns)})"
        )
    if n_clusters is None:
        if label_key is None:
            raise ScprotoInputError(f"{where}: set data.n_clusters or data.label_key")
        n_clusters = int(adata.obs[label_key].astype(str).nunique())
    if n_clusters > adata.n_obs:
        raise ScprotoInputError(
            f"{where}: requested {n_clusters} clusters but the input has only {adata.n_obs} cells"
        )
    return n_clusters


def cluster_adata(adata: ad.AnnData, cfg: ClusterJobConfig, where: str = "input"
                  ) -> tuple[ClusterResult, dict[str, float] | None]:
    """Run scGPCL on an in-memory AnnData (X = counts); adds ``obs["scgpcl_cluster"]`` and
    ``obsm["X_scgpcl"]`` in place and returns the result and scores (if labels are known)."""
    k = resolve_n_clusters(adata, cfg.data.label_key, cfg.data.n_clusters, where)
    data = prepare_counts(adata, cfg.scgpcl.n_top_genes, where)
    res = fit_scgpcl(data, k, cfg.scgpcl, seed=cfg.seed)
    adata.obs["scgpcl_cluster"] = pd.Categorical(res.labels.astype(str))
    adata.obsm["X_scgpcl"] = res.embedding
    scores = None
    if cfg.data.label_key is not None:
        scores = clustering_scores(adata.obs[cfg.data.label_key].to_numpy(), res.labels)
    return res, scores


def run_cluster(cfg: ClusterJobConfig, out: str | Path) -> dict:
    """Read ``cfg.data.path``, cluster, write ``out`` (h5ad) and ``out``.json (scores, history).

    Returns:
        the JSON summary (``scores`` is None without labels).
    """
    out = Path(out)
    if out.suffix != ".h5ad":
        raise ScprotoInputError(f"--out must be an .h5ad file, got {out}")
    from pipelines.atlas_job import resolve_input

    adata = read_cells(resolve_input(cfg.data.path))
    res, scores = cluster_adata(adata, cfg, where=str(cfg.data.path))
    summary = {"n_cells": int(adata.n_obs), "n_clusters": len(np.unique(res.labels)),
               "scores": scores, "pretrain_epochs": res.pretrain_epochs,
               "dec_epochs": res.dec_epochs, "wall_s": res.wall_s, "history": res.history,
               "config": cfg.model_dump()}
    write_h5ad_atomic(adata, out)
    js = out.with_suffix(".json")
    tmp_js = js.with_name(f".{js.name}.tmp")
    tmp_js.write_text(json.dumps(summary, indent=1))
    tmp_js.replace(js)
    return summary
