"""Annotation benchmark: supervised contrastive heads (MLP-CL / MLS-CL) on frozen embeddings.

    python benchmarks/annotation.py [--quick] [--settings default scarce transfer]

Data: the 8-donor Kang PBMC set (8 types). Embeddings (frozen, unsupervised, computed once on
all cells): ``pca`` (50 PCs of scaled log-normalised counts), ``scvi`` (10-d, donor as batch,
``--scvi-epochs``) and ``scproto`` (this package's model trained through the pipeline with the
model / train / prepare settings of ``configs/kang_pbmc.yaml`` but only ``--scproto-epochs``
epochs, donor as study; labels never seen).
Settings (method.md §10, issue 6):

- ``default``: ≤ 500 cells per type, 5 random stratified 80/10/10 splits;
- ``scarce``: ≤ 60 cells per type (48 training cells per type), 5 splits;
- ``transfer``: train on Kang, test on PBMC 4k (another study) with harmonised coarse labels
  (T_CD4, T_CD8, B, NK, MNP; Kang's Megakaryocytes and PBMC 4k's "?" left out); embeddings on
  the shared genes (PCA fitted on Kang and applied to PBMC 4k; scVI and scProto trained on both,
  donor / study as batch, unsupervised); 5 seeds of the heads / classifiers.

Heads: ``none`` (classifier on z), ``mlp_cl``, ``mls_cl``; classifiers: ``logreg``, ``mlp``. The
head is trained for about ``--head-steps`` minibatch steps whatever the training-set size.
Validation cells are drawn but unused (no tuning). Writes ``benchmarks/results/annotation.json``
(``{setting: {embedding: {head: {top1, top3, macro_f1}}}}``, head key ``<head>+<classifier>``,
plus ``*_sd``) and ``annotation.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp
import torch
from _companion_common import (
    RESULTS,
    machine,
    mean_sd,
    merge_json,
    read_labelled,
    scproto_embed,
    scvi_latent,
)
from sklearn.decomposition import PCA

from scproto_scale.companion.annotate import Annotator, balanced_splits
from scproto_scale.config import AnnotateHeadConfig

KANG = "kang2018_pbmc_ctrl_8donors"
PBMC4K = "pbmc4k_soupx"
HARMONISE = {"CD4 T cells": "T_CD4", "CD8 T cells": "T_CD8", "B cells": "B", "NK cells": "NK",
             "CD14+ Monocytes": "MNP", "FCGR3A+ Monocytes": "MNP", "Dendritic cells": "MNP"}
HEADS = ("none", "mlp_cl", "mls_cl")
EMBEDDINGS = ("pca", "scvi", "scproto")
CLASSIFIERS = ("logreg", "mlp")


def log_scaled(a: ad.AnnData) -> np.ndarray:
    b = a.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    return np.asarray(b.X.toarray() if hasattr(b.X, "toarray") else b.X, dtype=np.float32)


def kang_overrides() -> list[str]:
    """``configs/kang_pbmc.yaml``'s model / train / prepare settings as config overrides."""
    from scproto_scale.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "kang_pbmc.yaml", [])
    return [f"model.likelihood={cfg.model.likelihood}", f"model.n_prototypes={cfg.model.n_prototypes}",
            f"model.latent_dim={cfg.model.latent_dim}", f"train.batch_size={cfg.train.batch_size}",
            f"train.min_cells_per_study={cfg.train.min_cells_per_study}", f"train.lr={cfg.train.lr}",
            f"prepare.n_neighbors={cfg.prepare.n_neighbors}"]


def scproto_latent(X, batch: np.ndarray, genes, args) -> np.ndarray:
    """``(n, latent_dim)`` scProto embedding of every row of ``X`` (short Kang-settings run)."""
    with tempfile.TemporaryDirectory(dir=args.workdir) as wd:
        e = scproto_embed(X, batch, genes, 0, args.scproto_epochs, Path(wd), kang_overrides(),
                          args.threads)
    rows = e.obs["store_row"].to_numpy()
    if len(np.unique(rows)) != X.shape[0]:
        raise SystemExit(f"scProto exported {len(np.unique(rows))} of {X.shape[0]} cells")
    z = np.empty((X.shape[0], e.obsm["X_scproto"].shape[1]), np.float32)
    z[rows] = e.obsm["X_scproto"]
    return z


def evaluate_heads(z_tr, y_tr, z_te, y_te, args, seed: int, results: dict) -> None:
    """Train each head once, then every classifier on it; append scores to ``results``."""
    steps_per_epoch = max(1, math.ceil(len(y_tr) / 128))
    epochs = max(1, math.ceil(args.head_steps / steps_per_epoch))
    for head in args.heads:
        first = None
        for clf in args.classifiers:
            cfg = AnnotateHeadConfig(head=head, classifier=clf, epochs=epochs,
                                     num_threads=args.threads)
            t0 = time.perf_counter()
            ann = Annotator(cfg, seed=seed).fit(z_tr, y_tr, head_from=first)
            first = first or ann
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = ann.score(z_te, y_te)
            s["wall_s"] = time.perf_counter() - t0
            results.setdefault(f"{head}+{clf}", []).append(s)


def within_study(args, embeddings: dict[str, np.ndarray], y: np.ndarray, cap: int) -> dict:
    out = {}
    for emb, z in embeddings.items():
        per: dict = {}
        for i, split in enumerate(balanced_splits(y, cap, n_splits=args.splits, seed=0)):
            evaluate_heads(z[split.train], y[split.train], z[split.test], y[split.test], args, i,
                           per)
        out[emb] = {h: mean_sd(rows) for h, rows in per.items()}
        for h, v in out[emb].items():
            print(f"cap={cap} {emb:5s} {h:16s} top1={v['top1']:.3f}±{v['top1_sd']:.3f} "
                  f"top3={v['top3']:.3f} f1={v['macro_f1']:.3f}±{v['macro_f1_sd']:.3f}", flush=True)
    return out


def transfer(args, kang: ad.AnnData) -> dict:
    q = read_labelled(PBMC4K)
    ref = kang[kang.obs["cell_type"].astype(str).isin(list(HARMONISE)).to_numpy()].copy()
    y_ref = ref.obs["cell_type"].astype(str).map(HARMONISE).to_numpy()
    y_q = q.obs["cell_type"].astype(str).to_numpy()
    genes = ref.var_names.intersection(q.var_names)
    ref, q = ref[:, genes].copy(), q[:, genes].copy()
    embeddings = {}
    if "pca" in args.embeddings:
        xr, xq = log_scaled(ref), log_scaled(q)
        mu, sd = xr.mean(0), xr.std(0) + 1e-6
        pca = PCA(50, random_state=0).fit((xr - mu) / sd)
        embeddings["pca"] = (pca.transform((xr - mu) / sd), pca.transform((xq - mu) / sd))
    if "scvi" in args.embeddings and args.scvi_epochs > 0:
        counts = np.vstack([ref.X.toarray(), q.X.toarray()])
        study = np.r_[np.asarray(ref.obs["batch"]).astype(str), np.array(["pbmc4k"] * q.n_obs)]
        z = scvi_latent(counts, 0, args.scvi_epochs, batch=study, num_threads=args.threads)
        embeddings["scvi"] = (z[:ref.n_obs], z[ref.n_obs:])
    if "scproto" in args.embeddings and args.scproto_epochs > 0:
        study = np.r_[np.asarray(ref.obs["batch"]).astype(str), np.array(["pbmc4k"] * q.n_obs)]
        z = scproto_latent(sp.vstack([sp.csr_matrix(ref.X), sp.csr_matrix(q.X)], format="csr"),
                           study, genes, args)
        embeddings["scproto"] = (z[:ref.n_obs], z[ref.n_obs:])
    out = {"_info": {"n_genes_shared": len(genes), "n_ref": int(ref.n_obs), "n_query": int(q.n_obs)}}
    for emb, (zr, zq) in embeddings.items():
        per: dict = {}
        for seed in range(args.splits):
            rng = np.random.default_rng(seed)
            # ≤ 500 training cells per type, as in the default setting.
            tr = np.concatenate([rng.permutation(np.flatnonzero(y_ref == t))[:500]
                                 for t in np.unique(y_ref)])
            evaluate_heads(zr[tr], y_ref[tr], zq, y_q, args, seed, per)
        out[emb] = {h: mean_sd(rows) for h, rows in per.items()}
        for h, v in out[emb].items():
            print(f"transfer {emb:5s} {h:16s} top1={v['top1']:.3f}±{v['top1_sd']:.3f} "
                  f"f1={v['macro_f1']:.3f}", flush=True)
    return out


def _as_dict(v) -> dict:
    return v if isinstance(v, dict) else ({"earlier_run": v} if v is not None else {})


def write_markdown(res: dict, path: Path) -> None:
    lines = ["# Annotation benchmark (supervised contrastive heads)", "",
             f"Settings: {res.get('_meta', {}).get('settings')}", "", "mean ± sd over splits/seeds", ""]
    for setting, embs in res.items():
        if setting.startswith("_"):
            continue
        lines += [f"## {setting}", ""]
        for emb, st in embs.get("_settings", {}).items():
            if st:
                lines.append(f"- {emb}: splits {st.get('splits')}, head steps {st.get('head_steps')}, "
                             f"scVI epochs {st.get('scvi_epochs')}, scProto epochs "
                             f"{st.get('scproto_epochs', 0)}, threads {st.get('threads', 2)}")
        lines += ["", "| embedding | head+classifier | top-1 | top-3 | macro F1 |",
                  "|---|---|---|---|---|"]
        for emb, heads in embs.items():
            if emb.startswith("_"):
                continue
            for h, v in heads.items():
                lines.append(f"| {emb} | {h} | " + " | ".join(
                    f"{v[m]:.3f} ± {v[m + '_sd']:.3f}" for m in ("top1", "top3", "macro_f1")) + " |")
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="PCA only, 2 splits, short heads, scarce + transfer settings")
    ap.add_argument("--settings", nargs="*", default=None,
                    help="default scarce transfer (all; --quick: scarce transfer)")
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--head-steps", type=int, default=400)
    ap.add_argument("--scvi-epochs", type=int, default=30)
    ap.add_argument("--scproto-epochs", type=int, default=8,
                    help="scProto training epochs (Kang settings otherwise; 0: no scProto)")
    ap.add_argument("--threads", type=int, default=1, help="torch / scVI / scProto threads")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="scratch for the scProto runs (created if missing)")
    ap.add_argument("--embeddings", nargs="*", default=list(EMBEDDINGS), choices=EMBEDDINGS,
                    help="embeddings to (re)compute; the others' results already in --out are kept")
    ap.add_argument("--heads", nargs="*", default=list(HEADS))
    ap.add_argument("--classifiers", nargs="*", default=list(CLASSIFIERS))
    ap.add_argument("--out", default=str(RESULTS / "annotation.json"))
    args = ap.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.splits, args.head_steps, args.scvi_epochs, args.scproto_epochs = 2, 150, 0, 0
        args.settings = args.settings or ["scarce", "transfer"]
    args.settings = args.settings or ["default", "scarce", "transfer"]
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    kang = read_labelled(KANG)
    y = kang.obs["cell_type"].astype(str).to_numpy()
    embeddings: dict[str, np.ndarray] = {}
    if {"default", "scarce"} & set(args.settings):
        if "pca" in args.embeddings:
            x = log_scaled(kang)
            x = (x - x.mean(0)) / (x.std(0) + 1e-6)
            embeddings["pca"] = PCA(50, random_state=0).fit_transform(x).astype(np.float32)
        if "scvi" in args.embeddings and args.scvi_epochs > 0:
            embeddings["scvi"] = scvi_latent(kang.X.toarray(), 0, args.scvi_epochs,
                                             batch=kang.obs["batch"].to_numpy(),
                                             num_threads=args.threads)
        if "scproto" in args.embeddings and args.scproto_epochs > 0:
            embeddings["scproto"] = scproto_latent(sp.csr_matrix(kang.X), kang.obs["batch"].to_numpy(),
                                                   kang.var_names, args)
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}
    note = (f"{args.threads} thread(s) on a shared 2-core box, other jobs running (run nice'd or "
            "under the bench lock): wall times measured under contention")
    for setting in args.settings:
        t0 = time.perf_counter()
        if setting == "transfer":
            r = transfer(args, kang)
        else:
            r = within_study(args, embeddings, y, 500 if setting == "default" else 60)
        wall = time.perf_counter() - t0
        # Merge at the embedding level: results of embeddings not recomputed now are kept, each
        # with the settings it was run with.
        prev_all = json.loads(out.read_text()) if out.exists() else {}
        prev = prev_all.get(setting, {})
        old = prev_all.get("_meta", {}).get("settings")
        names = [e for e in r if not e.startswith("_")]
        r["_settings"] = {**{e: old for e in prev if not e.startswith("_")},
                          **prev.get("_settings", {}), **{e: settings for e in names}}
        r["_wall_s"] = {**_as_dict(prev.get("_wall_s")), "+".join(names): wall}
        r = {**prev, **r}
        res = merge_json(out, {setting: r, "_meta": {"machine": machine(), "settings": settings,
                                                     "wall_time_note": note}})
        write_markdown(res, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
