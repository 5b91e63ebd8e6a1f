"""Does a cell type form a neighbourhood? Same-type fraction among its cells' k nearest neighbours.

    SCPROTO_DATA_DIR=... python benchmarks/rare_neighbourhood.py \\
        --h5ad $SCPROTO_DATA_DIR/kang2018_pbmc_ctrl_8donors/kang2018_pbmc_ctrl_8donors.h5ad \\
        --label-key cell_type --cell-type Megakaryocytes \\
        [--embeddings uniform=runs/kang/embeddings.h5ad --embeddings snn=runs/kang_snn/...] \\
        [--prepared runs/kang/prepared]

Spaces: PCA (50) of log-normalised counts, the same after gene scaling (scanpy's standard
pipeline), the authors' tSNE when obs has ``tsne1/tsne2``, and the scProto embedding of a run.
A type whose neighbours are mostly other types cannot get a prototype from KNN views alone.
Per space: the same-type fraction among k (50) and 10 neighbours, and the "core": cells with
≥ 50 % of their 10 neighbours of their own type. Also how separable the type is at all (a
class-balanced logistic regression on all log-normalised genes, 3-fold cross-validated) and,
with ``--prepared``, the expected same-type fraction of the training views drawn from the KNN
table uniformly and ∝ SNN Jaccard (``train.neighbor_weighting``), for all and for core cells.
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


def core_cells(X: np.ndarray, labels: np.ndarray, cell_type: str) -> np.ndarray:
    """Cells of ``cell_type`` with ≥ 50 % of their 10 nearest neighbours of the same type."""
    nn = faiss_neighbors(np.asarray(X, dtype=np.float32), 11).indices[:, 1:]
    mine = labels == cell_type
    return mine & ((labels[nn] == cell_type).mean(axis=1) >= 0.5)


def space_summary(X: np.ndarray, labels: np.ndarray, cell_type: str, k: int) -> dict:
    return {f"same_type_fraction_k{k}": same_type_fraction(X, labels, cell_type, k),
            "same_type_fraction_k10": same_type_fraction(X, labels, cell_type, 10),
            "core_cells": int(core_cells(X, labels, cell_type).sum())}


def separability(X, labels: np.ndarray, cell_type: str) -> dict:
    """3-fold cross-validated, class-balanced logistic regression of the type vs the rest."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score, roc_auc_score
    from sklearn.model_selection import cross_val_predict

    y = labels == cell_type
    p = cross_val_predict(LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced"),
                          X, y, cv=3, method="predict_proba")[:, 1]
    return {"auc": float(roc_auc_score(y, p)), "f1": float(f1_score(y, p > 0.5))}


def view_fractions(prepared: Path, labels: np.ndarray, core: np.ndarray, cell_type: str,
                   n_views: int = 7) -> dict:
    """Expected same-type fraction of a cell's KNN views, uniform vs ∝ pruned SNN Jaccard."""
    from scproto_scale.config import TrainConfig
    from scproto_scale.data.loader import draw_neighbours
    from scproto_scale.prepare.artefacts import Prepared
    from scproto_scale.prepare.snn import snn_jaccard, snn_sampling_weights

    prep = Prepared.load(prepared)
    cells = np.asarray(prep.cells)
    pos = np.full(int(cells.max()) + 1, -1)
    pos[cells] = np.arange(len(cells))
    knn = pos[np.asarray(prep.knn_indices)]
    lab = labels[cells]
    jaccard = snn_jaccard(knn, np.arange(len(cells)))
    prune = TrainConfig().snn_prune
    weights = {"uniform": None, "snn": snn_sampling_weights(jaccard, prune)}
    out = {}
    for who, mask in (("all", lab == cell_type), ("core", core[cells])):
        anchors = np.where(mask)[0].repeat(20)
        for name, w in weights.items():
            views = draw_neighbours(knn[anchors], n_views, np.random.default_rng(0),
                                    None if w is None else w[anchors])
            out[f"{who}_{name}"] = float((lab[views] == cell_type).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--h5ad", required=True)
    ap.add_argument("--label-key", default="cell_type")
    ap.add_argument("--cell-type", required=True)
    ap.add_argument("--embeddings", action="append", default=[],
                    help="NAME=embeddings.h5ad of a run (repeatable)")
    ap.add_argument("--prepared", type=Path, default=None, help="a run's prepared/ directory")
    ap.add_argument("--k", type=int, default=50)
    args = ap.parse_args()
    a = ad.read_h5ad(args.h5ad)
    labels = a.obs[args.label_key].astype(str).to_numpy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    out = {"cell_type": args.cell_type, "n_cells": int((labels == args.cell_type).sum()),
           "k": args.k, "fraction_of_all_cells": float((labels == args.cell_type).mean())}
    out["separability_all_genes"] = separability(a.X, labels, args.cell_type)
    b = a.copy()
    sc.pp.pca(b, n_comps=50)
    out["pca"] = space_summary(b.obsm["X_pca"], labels, args.cell_type, args.k)
    core = core_cells(b.obsm["X_pca"], labels, args.cell_type)
    sc.pp.scale(a, max_value=10)
    sc.pp.pca(a, n_comps=50)
    out["pca_scaled_genes"] = space_summary(a.obsm["X_pca"], labels, args.cell_type, args.k)
    if {"tsne1", "tsne2"} <= set(a.obs):
        out["authors_tsne"] = space_summary(a.obs[["tsne1", "tsne2"]].to_numpy(), labels,
                                            args.cell_type, args.k)
    for spec in args.embeddings:
        name, _, path = spec.partition("=")
        e = ad.read_h5ad(path)
        out[f"scproto_{name}"] = space_summary(
            e.obsm["X_scproto"], e.obs[args.label_key].astype(str).to_numpy(), args.cell_type,
            args.k)
    if args.prepared:
        out["view_same_type_fraction"] = view_fractions(args.prepared, labels, core,
                                                        args.cell_type)
    dest = Path(__file__).parent / "results" / f"rare_neighbourhood_{args.cell_type}.json"
    dest.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
