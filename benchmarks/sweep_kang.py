"""Short training runs on Kang PBMC for choosing settings (prototype usage, metacell purity).

    SCPROTO_DATA_DIR=... python benchmarks/sweep_kang.py --store runs/kang/store.zarr \\
        --prepared runs/kang/prepared [--only A,D] [--tag _k10]

Each variant trains from the same prepared store and reports: prototypes used by the cells'
nearest-prototype assignment, mean purity of the used prototypes, how many cell types are the
majority of some prototype's cells, which types label a used prototype by the atlas's rule
(majority of its 10 most similar cells), mean assignment cosine, mean ‖mu‖ and the last SwAV
losses.
Writes ``benchmarks/results/sweep_kang.json``. Kang is the only tuning set (issue 7).

    SCPROTO_DATA_DIR=... python benchmarks/sweep_kang.py --scored [--seeds 1] [--only cvae]

``--scored``: the variants of :data:`SCORED`, each a set of config overrides on the shipped
defaults, run through the pipeline on Kang 8 donors and scored by quality.py's harness (scIB,
scGraph, metacells, marker F1; scProto, the unintegrated PCA and k-means metacells only) into
``benchmarks/results/sweep_kang_scored.{json,md}``: the knobs judged by the metrics of issue 7's
targets, not by prototype usage alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from scproto_scale.atlas.atlas import PrototypeAtlas
from scproto_scale.config import ModelConfig, TrainConfig
from scproto_scale.data.store import open_store
from scproto_scale.prepare.artefacts import Prepared
from scproto_scale.train.loop import train

BASE_TRAIN = {"epochs": 8, "batch_size": 512, "min_cells_per_study": 64, "lr": 0.01}
VARIANTS = {
    "A_hard_d10": ({}, {}),
    "B_soft_codes": ({"hard_codes": False}, {}),
    "C_kl0.05": ({"kl_weight": 0.05}, {}),
    "D_d32": ({"latent_dim": 32}, {}),
    "E_d32_kl0.05_b256": ({"latent_dim": 32, "kl_weight": 0.05},
                          {"batch_size": 256, "min_cells_per_study": 32}),
    "F_d32_dual_prop": ({"latent_dim": 32, "lambda_prop_dual": 1.0}, {}),
    "G_d32_20epochs": ({"latent_dim": 32}, {"epochs": 20}),
    "H_d32_b256": ({"latent_dim": 32}, {"batch_size": 256, "min_cells_per_study": 32}),
    "I_d32_kl0.05_K100": ({"latent_dim": 32, "kl_weight": 0.05, "n_prototypes": 100},
                          {"batch_size": 256, "min_cells_per_study": 32}),
    "J_d32_queue1024": ({"latent_dim": 32, "queue_length": 1024}, {}),
    "K_d32_queue3072": ({"latent_dim": 32, "queue_length": 3072}, {}),
    "M_d32_K100_b1024": ({"latent_dim": 32, "n_prototypes": 100},
                         {"batch_size": 1024, "min_cells_per_study": 128}),
    "N_d32_b2048": ({"latent_dim": 32}, {"batch_size": 2048, "min_cells_per_study": 256}),
    # Kang-config length (30 epochs): how much the CVAE term shapes the latent
    "P_d32_cvae0.1_30ep": ({"latent_dim": 32, "lambda_cvae": 0.1}, {"epochs": 30}),
    # the propagation loss's weight (method.md default 1, reference code 0); weight 1 at 30
    # epochs is the shipped Kang run itself (README, "Kang PBMC, 8 donors")
    "R_d32_prop0_30ep": ({"latent_dim": 32, "lambda_prop": 0.0}, {"epochs": 30}),
    "S_d32_prop0.1_30ep": ({"latent_dim": 32, "lambda_prop": 0.1}, {"epochs": 30}),
    # from the current defaults (S), one knob each: Sinkhorn ε at SwAV's 0.05, twice the
    # prototypes, a softer prediction temperature
    "U_eps0.05_30ep": ({"sinkhorn_epsilon": 0.05}, {"epochs": 30}),
    "V_K600_30ep": ({"n_prototypes": 600}, {"epochs": 30}),
    "W_tau0.1_30ep": ({"temperature": 0.1}, {"epochs": 30}),
    # the propagation loss moving only the prototype (k-center on the bank, no pull on cells)
    "T_d32_prop1_protos_30ep": ({"latent_dim": 32, "lambda_prop": 1.0,
                                "prop_pulls": "prototypes"}, {"epochs": 30}),
}


# One knob each (`--scored`), off the defaults as they were when the sweep ran: plain KNN
# (`prepare.knn_scope=all`). The study-balanced KNN won and became the default (`auto`), so
# `neighbours_per_study` is today's defaults on Kang 8 donors.
_KNN_ALL = ["prepare.knn_scope=all"]
SCORED: dict[str, list[str]] = {
    "knn_all": _KNN_ALL,
    "likelihood_zinb": [*_KNN_ALL, "model.likelihood=zinb"],
    "likelihood_mse": [*_KNN_ALL, "model.likelihood=mse"],
    "neighbours_snn": [*_KNN_ALL, "train.neighbor_weighting=snn"],
    "neighbours_distance": [*_KNN_ALL, "train.neighbor_weighting=distance"],
    # views from every donor: ⌈k/S⌉ nearest cells of each study (BBKNN's neighbourhood)
    "neighbours_per_study": ["prepare.knn_scope=per_study"],
    # the two one-knob gains together; and latent 10 on today's defaults (both covered
    # Megakaryocytes in the one-seed sweep)
    "soft_codes+per_study": ["model.hard_codes=false", "prepare.knn_scope=per_study"],
    "latent_10+per_study": ["model.latent_dim=10", "prepare.knn_scope=per_study"],
    "lambda_cvae_0.1": [*_KNN_ALL, "model.lambda_cvae=0.1"],
    "lambda_cvae_1": [*_KNN_ALL, "model.lambda_cvae=1.0"],
    "soft_codes": [*_KNN_ALL, "model.hard_codes=false"],
    "latent_10": [*_KNN_ALL, "model.latent_dim=10"],
    "epochs_60": [*_KNN_ALL, "train.epochs=60"],
    # the head's knobs and the KL weight, one each on today's defaults (study-balanced KNN)
    "tau_0.1": ["model.temperature=0.1"],
    "epsilon_0.05": ["model.sinkhorn_epsilon=0.05"],
    "K_600": ["model.n_prototypes=600"],
    "lambda_prop_0": ["model.lambda_prop=0"],
    "lambda_cvae_0.001": ["model.lambda_cvae=0.001"],
    "kl_1": ["model.kl_weight=1.0"],
    # the plain-KNN rows' likelihood and view-weighting knobs again, on today's defaults
    "mse": ["model.likelihood=mse"],
    "zinb": ["model.likelihood=zinb"],
    "views_snn": ["train.neighbor_weighting=snn"],
    "views_distance": ["train.neighbor_weighting=distance"],
    "cvae_0.1": ["model.lambda_cvae=0.1"],
    "cvae_1": ["model.lambda_cvae=1.0"],
    # training length on today's defaults (the Kang config trains 30 epochs)
    "train_15_epochs": ["train.epochs=15"],
    "train_60_epochs": ["train.epochs=60"],
}


def run_scored(only: str | None, seeds: int) -> None:
    """Each :data:`SCORED` variant on Kang 8 donors, scored as quality.py scores a method."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _companion_common import RESULTS, merge_json
    from quality import run_dataset

    from scproto_scale.evaluate.quality_report import write_quality_markdown

    dest = RESULTS / "sweep_kang_scored.json"
    for name, overrides in SCORED.items():
        if only and not any(name.startswith(p) for p in only.split(",")):
            continue
        result = run_dataset("kang8", seeds, overrides, resume=True, baselines_on=False,
                             figures=False, tag=f"~{name}")
        data = merge_json(dest, {name: result})
        write_quality_markdown(data, dest.with_suffix(".md"))


def top10_coverage(z: np.ndarray, prototypes: np.ndarray, proto: np.ndarray,
                   labels: np.ndarray) -> list[str]:
    """Cell types that are the majority of the 10 most similar cells of some used prototype."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    used = np.unique(proto)
    top10 = np.argsort(-(z @ prototypes[used].T), axis=0)[:10]  # (10, n_used)
    return sorted({pd.Series(labels[col]).value_counts().index[0] for col in top10.T})


def evaluate_variant(store, prep, labels, name, model_kw, train_kw, out_root: Path) -> dict:
    t = time.perf_counter()
    res = train(store, prep, ModelConfig(**model_kw),
                TrainConfig(progress=False, **{**BASE_TRAIN, **train_kw}), out_root / name, seed=0)
    atlas = PrototypeAtlas(res.model, prep.genes, prep.studies,
                           {"latent_norm": 1.0, "median_library_size": 1.0})
    emb = atlas.embed_store(store, "batch")
    cells = np.asarray(prep.cells)
    proto = emb.prototype[cells]
    table = pd.crosstab(proto, labels)
    return {
        "model": model_kw, "train": {**BASE_TRAIN, **train_kw},
        "train_s": round(time.perf_counter() - t, 1),
        "prototypes_used": len(np.unique(proto)),
        "purity": round(float((table.max(1) / table.sum(1)).mean()), 3),
        "types_majority_of_a_prototype": int(table.idxmax(1).nunique()),
        # the atlas's rule (method.md §7): a prototype's label is the majority of its 10 most
        # similar cells; a type is covered when it labels a used prototype
        "types_labelling_a_used_prototype": top10_coverage(emb.X_scproto[cells], atlas.prototypes,
                                                           proto, labels),
        "mean_confidence": round(float(emb.confidence[cells].mean()), 3),
        "mean_mu_norm": round(float(emb.mu_norm[cells].mean()), 2),
        "swav_last_epochs": [round(h["swav"], 3) for h in res.history[-3:]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store")
    ap.add_argument("--prepared")
    ap.add_argument("--scored", action="store_true",
                    help="the SCORED variants through the pipeline and quality.py's scoring")
    ap.add_argument("--seeds", type=int, default=1, help="with --scored")
    ap.add_argument("--only", default=None, help="comma-separated variant prefixes")
    ap.add_argument("--work", default="/tmp/scproto_sweep")
    ap.add_argument("--tag", default="", help="suffix of the result names (e.g. _k10 for a "
                    "store prepared with prepare.n_neighbors=10)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.scored:
        run_scored(args.only, args.seeds)
        return
    if not (args.store and args.prepared):
        ap.error("--store and --prepared are needed without --scored")
    store, prep = open_store(args.store), Prepared.load(args.prepared)
    labels = store.obs_column("cell_type").astype(str).to_numpy()[np.asarray(prep.cells)]
    chosen = {k: v for k, v in VARIANTS.items()
              if not args.only or any(k.startswith(p) for p in args.only.split(","))}
    dest = Path(__file__).parent / "results" / "sweep_kang.json"
    results = json.loads(dest.read_text()) if dest.exists() else {}
    for name, (model_kw, train_kw) in chosen.items():
        row = evaluate_variant(store, prep, labels, name, model_kw, train_kw, Path(args.work))
        results[name + args.tag] = {**row, "prepared": str(args.prepared)}
        print(name + args.tag, json.dumps(results[name + args.tag]), flush=True)
        dest.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
