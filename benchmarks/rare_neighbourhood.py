"""Does a cell type form a neighbourhood? Same-type fraction among its cells' k nearest neighbours.

    SCPROTO_DATA_DIR=... python benchmarks/rare_neighbourhood.py \\
        --h5ad $SCPROTO_DATA_DIR/kang2018_pbmc_ctrl_8donors/kang2018_pbmc_ctrl_8donors.h5ad \\
        --label-key cell_type --cell-type Megakaryocytes [--embeddings runs/kang/embeddings.h5ad]

Spaces: PCA (50) of log-normalised counts, the same after gene scaling (scanpy's standard
pipeline), the authors' tSNE when obs has ``tsne1/tsne2``, and the scProto embedding of a run.
A type whose neighbours are mostly other types cannot get a prototype from KNN views alone.
Writes ``benchmarks/results/rare_neighbourhood_<type>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc

from scproto_scale.evaluate.scib import faiss_neighbors


def same_type_fraction(X: np.ndarray, labels: np.ndarray, cell_type: str, k: int) -> float:
    """Mean fraction of ``cell_type`` among the k nearest neighbours (self excluded) of its cells."""
    nn = faiss_neighbors(np.asarray(X, dtype=np.float32), k + 1).indices[:, 1:]
    mine = labels == cell_type
    return float((labels[nn[mine]] == cell_type).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--h5ad", required=True)
    ap.add_argument("--label-key", default="cell_type")
    ap.add_argument("--cell-type", required=True)
    ap.add_argument("--embeddings", default=None, help="embeddings.h5ad of a run")
    ap.add_argument("--k", type=int, default=50)
    args = ap.parse_args()
    a = ad.read_h5ad(args.h5ad)
    labels = a.obs[args.label_key].astype(str).to_numpy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    out = {"cell_type": args.cell_type, "n_cells": int((labels == args.cell_type).sum()),
           "k": args.k, "fraction_of_all_cells": float((labels == args.cell_type).mean())}
    b = a.copy()
    sc.pp.pca(b, n_comps=50)
    out["pca"] = same_type_fraction(b.obsm["X_pca"], labels, args.cell_type, args.k)
    sc.pp.scale(a, max_value=10)
    sc.pp.pca(a, n_comps=50)
    out["pca_scaled_genes"] = same_type_fraction(a.obsm["X_pca"], labels, args.cell_type, args.k)
    if {"tsne1", "tsne2"} <= set(a.obs):
        out["authors_tsne"] = same_type_fraction(a.obs[["tsne1", "tsne2"]].to_numpy(), labels,
                                                 args.cell_type, args.k)
    if args.embeddings:
        e = ad.read_h5ad(args.embeddings)
        out["scproto"] = same_type_fraction(e.obsm["X_scproto"],
                                            e.obs[args.label_key].astype(str).to_numpy(),
                                            args.cell_type, args.k)
    dest = Path(__file__).parent / "results" / f"rare_neighbourhood_{args.cell_type}.json"
    dest.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
