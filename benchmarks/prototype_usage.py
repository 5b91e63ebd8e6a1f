"""Prototype usage with 256 cells per study group (K = 4,096 unless set), by length and queue.

    python benchmarks/prototype_usage.py --epochs 6 --queue-lengths 0,4096 [--soft-codes] \
        [--n-cells 20000] [--n-types 65] [--model-set lambda_prop=0 ...]

The setting of ``benchmarks/distributed.py``'s queue part (6,000 synthetic cells, 4 studies,
1,024 anchors per step: 6 steps per epoch), trained longer or with other queue lengths. Prints
one JSON line per run and appends it to ``benchmarks/results/prototype_usage.json``:
``mu_perplexity`` / ``used`` are over every cell's nearest prototype of its mean embedding
(what the atlas reports), ``mu_resultant`` the mean resultant length of the unit mean
embeddings (1: every cell points the same way, a collapsed embedding), ``train_perplexity``
the per-epoch perplexity of the training assignments, ``types_with_own_prototype`` the cell
types that are the majority of some used prototype's cells and ``view_same_type_fraction`` how
often a cell's KNN neighbours (its views) share its type. ``--n-types`` simulates more types
than the default 9 (more states than cells of a type per step). ``sample_used`` /
``sample_matches_mu`` are the same count over one posterior sample per cell (what training's
SwAV scores) and how often that sample's nearest prototype is its mean's.

``--head-only`` trains the prototype head alone (the same bank, per-study Sinkhorn, queue,
sampler and KNN views; no CVAE): a conditional MLP maps each cell's PCA coordinates to the
latent, for the same number of steps. It tells the head's own behaviour at this K and group size
apart from the CVAE's. ``--reuse-checkpoints`` resumes finished runs from their last checkpoint
(no training) to add the newer columns to old settings. One thread per run (runs are meant to go
side by side on this 2-core box).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from scproto_scale.atlas.atlas import PrototypeAtlas
from scproto_scale.config import ModelConfig, PrepareConfig, TrainConfig
from scproto_scale.data.ingest import ingest
from scproto_scale.data.loader import draw_neighbours
from scproto_scale.data.sampler import StudyStratifiedSampler
from scproto_scale.data.store import open_store
from scproto_scale.model.swav import PrototypeBank, StudyQueue, per_study_swav_loss
from scproto_scale.prepare.artefacts import Prepared
from scproto_scale.prepare.run import prepare
from scproto_scale.simulate import write_simulated_atlas
from scproto_scale.train.loop import cell_prototype_usage
from scproto_scale.train.optim import lr_at
from scproto_scale.train.worker import TrainJob, run_worker


def train_head_only(prep: Prepared, model_cfg: ModelConfig, train_cfg: TrainConfig,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The SwAV head alone on PCA inputs; returns unit embeddings and nearest prototypes.

    Same sampler, KNN views, per-study loss, queue (from ``queue_start_epoch``, recentred),
    AdamW and learning-rate schedule as the full model; the encoder is Linear(PCs + study one-hot →
    128) → LayerNorm → ReLU → Linear(→ d), the embedding deterministic. Rows are in the
    prepared cells' order.
    """
    torch.manual_seed(seed)
    pcs = torch.from_numpy(np.array(prep.pca, dtype=np.float32))
    pcs = pcs / pcs.std()
    studies = torch.from_numpy(np.asarray(prep.study_codes, dtype=np.int64))
    n_studies = int(studies.max()) + 1
    x = torch.cat([pcs, F.one_hot(studies, n_studies).float()], dim=1)
    # KNN ids are store rows; the sampler and x are in prepared-cell positions
    cells = np.asarray(prep.cells)
    position = np.empty(cells.max() + 1, dtype=np.int64)
    position[cells] = np.arange(len(cells))
    knn = position[np.asarray(prep.knn_indices)]
    d, K = model_cfg.latent_dim, model_cfg.n_prototypes
    encoder = nn.Sequential(nn.Linear(x.shape[1], 128), nn.LayerNorm(128, elementwise_affine=False),
                            nn.ReLU(), nn.Linear(128, d))
    bank = PrototypeBank(K, d, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW([*encoder.parameters(), *bank.parameters()], lr=train_cfg.lr,
                            weight_decay=train_cfg.weight_decay)
    sampler = StudyStratifiedSampler(np.asarray(prep.study_codes), train_cfg.batch_size,
                                     train_cfg.min_cells_per_study, seed=seed)
    queue = (StudyQueue(n_studies, model_cfg.queue_length, d)
             if model_cfg.queue_length else None)
    V, n_steps = train_cfg.n_views, len(sampler) * train_cfg.epochs
    for epoch in range(train_cfg.epochs):
        for step, draw in enumerate(sampler.epoch(epoch)):
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * len(sampler) + step, n_steps,
                                len(sampler) * train_cfg.warmup_epochs, train_cfg.lr,
                                train_cfg.final_lr_fraction)
            rng = np.random.default_rng([seed, epoch, step])
            views = np.concatenate([draw.anchors[None],
                                    draw_neighbours(knn[draw.anchors], V - 1, rng).T])
            bank.normalize_()
            z = F.normalize(encoder(x[torch.from_numpy(views.reshape(-1))]), dim=1)
            B = len(draw.anchors)
            groups = torch.from_numpy(draw.groups).long()
            assign, assign_groups = z.reshape(V, B, d)[:2].reshape(2 * B, d), groups.repeat(2)
            queue_scores = (queue.scores(bank.weight, draw.group_ids, assign, assign_groups)
                            if queue is not None and epoch >= model_cfg.queue_start_epoch
                            else None)
            loss = per_study_swav_loss(
                bank.scores(z).reshape(V, B, K), groups, draw.group_ids,
                queue_scores=queue_scores, temperature=model_cfg.temperature,
                epsilon=model_cfg.sinkhorn_epsilon, n_iters=model_cfg.sinkhorn_iterations,
                hard=model_cfg.hard_codes)
            if queue is not None:
                queue.push(assign, assign_groups)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        z = F.normalize(encoder(x), dim=1)
        nearest = (z @ F.normalize(bank.weight, dim=1).t()).argmax(dim=1)
    return z.numpy(), nearest.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--n-cells", type=int, default=6000)
    ap.add_argument("--n-types", type=int, default=9,
                    help="simulated cell types incl. the rare one (more types: more states "
                         "than cells of a type per step, the regime a queue is meant for)")
    ap.add_argument("--queue-lengths", default="0", help="comma-separated, per study")
    ap.add_argument("--soft-codes", action="store_true")
    ap.add_argument("--lr", type=float, default=0.01,
                    help="peak learning rate (1e-2 collapses the μ direction here; see README)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (prototypes, sampler)")
    ap.add_argument("--root", type=Path, default=Path("runs/prototype_usage"))
    ap.add_argument("--head-only", action="store_true",
                    help="train the prototype head alone on PCA inputs (no CVAE)")
    ap.add_argument("--reuse-checkpoints", action="store_true",
                    help="resume each setting from its last checkpoint instead of retraining")
    ap.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra ModelConfig field, e.g. lambda_prop=0 (repeatable)")
    args = ap.parse_args()
    extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.model_set)}
    torch.set_num_threads(1)
    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    # the 9-type set keeps its old file names (earlier rows of the JSON read them)
    name = f"sim{args.n_cells}" + ("" if args.n_types == 9 else f"_t{args.n_types}")
    store_path = root / f"{name}.zarr"
    if not store_path.exists():
        h5ad = write_simulated_atlas(root / f"{name}.h5ad", n_cells=args.n_cells,
                                     n_genes=1000, n_studies=4, seed=2,
                                     n_cell_types=args.n_types,
                                     rare_fraction=min(0.006, 0.5 / args.n_types))
        ingest(h5ad, store_path)
    store = open_store(store_path)
    prep_path = root / f"{name}.prepared"
    prep = (Prepared.load(prep_path) if prep_path.exists() else
            prepare(store, prep_path, "study",
                    PrepareConfig(n_top_genes=500, n_pcs=30, n_neighbors=15)))
    # how often a cell's views (its KNN neighbours) share its type: swapped prediction pulls
    # a cell toward its views, so a graph of mostly other-type neighbours pulls types together
    labels = store.obs_column("cell_type").astype(str).to_numpy()  # by store row
    cells, knn = np.asarray(prep.cells), np.asarray(prep.knn_indices)  # store rows, self excluded
    view_same_type = round(float((labels[knn] == labels[cells][:, None]).mean()), 3)
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=1024, min_cells_per_study=256,
                            n_views=4, progress=False, lr=args.lr, num_threads=1)
    dest = Path(__file__).parent / "results" / "prototype_usage.json"
    for queue_length in (int(q) for q in args.queue_lengths.split(",")):
        model_cfg = ModelConfig(**{"n_prototypes": 4096, "latent_dim": 32,
                                   "queue_length": queue_length, "queue_start_epoch": 1,
                                   "hard_codes": not args.soft_codes, **extra})
        tag = "_".join(f"{k}{v}" for k, v in {**extra, "lr": args.lr}.items())
        ckpt = (root / f"ck_q{queue_length}_{'soft' if args.soft_codes else 'hard'}{tag}"
                       f"_s{args.seed}")
        if not (args.reuse_checkpoints or args.head_only):  # the head-only run has none
            shutil.rmtree(ckpt, ignore_errors=True)
        t0 = time.perf_counter()
        sample = {}
        if args.head_only:
            x_unit, nearest = train_head_only(prep, model_cfg, train_cfg, args.seed)
            cell_types = labels[cells]
            history = []
        else:
            res = run_worker(TrainJob(str(store.path), str(prep.path), model_cfg, train_cfg,
                                      str(ckpt), seed=args.seed, resume=args.reuse_checkpoints))
            atlas = PrototypeAtlas(res.model, prep.genes, prep.studies, {})
            emb = atlas.embed_store(store, "study", sample_seed=args.seed)
            x_unit, nearest, cell_types, history = emb.X_scproto, emb.prototype, labels, res.history
            sample = {"sample_used": len(np.unique(emb.sample_prototype)),
                      "sample_matches_mu": round(float((emb.sample_prototype == nearest).mean()),
                                                 3),
                      "sample_mu_cosine_median": round(float(np.median(emb.sample_cosine)), 4)}
        train_s = round(time.perf_counter() - t0, 1)
        use = cell_prototype_usage(nearest, x_unit, model_cfg.n_prototypes)
        # a type "has its own prototype" when it is the majority of some used prototype's cells
        types_owning = int(pd.crosstab(nearest, cell_types).idxmax(axis=1).nunique())
        row = {"K": model_cfg.n_prototypes, "cells_per_study_group": 256, "n_cells": args.n_cells,
               "n_cell_types": args.n_types,
               "epochs": args.epochs,
               "queue_length": queue_length, "queue_recenter": model_cfg.queue_recenter,
               "hard_codes": not args.soft_codes, "model": extra, "seed": args.seed,
               "knn_scope": prep.meta.get("knn_scope"),
               "head_only": args.head_only,
               "resumed": bool(args.reuse_checkpoints and not args.head_only),
               "train_s": train_s,
               "lr": args.lr,
               "mu_perplexity": use["perplexity"],
               "mu_resultant": use["mean_resultant"],
               "used": use["used"],
               **sample,
               "types_with_own_prototype": types_owning,
               "view_same_type_fraction": view_same_type,
               "train_perplexity": [h["prototype_perplexity"] for h in history],
               "machine": "2-core shared box, no GPU, 1 thread"}
        print(json.dumps(row), flush=True)
        rows = json.loads(dest.read_text()) if dest.exists() else []
        dest.write_text(json.dumps([*rows, row], indent=1))


if __name__ == "__main__":
    main()
