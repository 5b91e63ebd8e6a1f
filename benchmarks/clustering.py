"""Clustering benchmark of scGPCL (method.md §10) against Leiden, k-means on PCA / scVI and scProto.

    python benchmarks/clustering.py [--quick] [--datasets 10x_pbmc mouse_bladder ...] [--seeds 3]
    python benchmarks/clustering.py --markdown-only   # clustering.md from clustering.json

K = number of labels. Every method sees the same genes (seurat_v3 HVGs, ≤ 2,000) of the same
cells: at most ``--max-cells`` per dataset, drawn with ``--subsample-seed`` (recorded in the JSON's
``_dataset``; affordability on a shared 2-core box). Methods (all in the same run, same seeds):

- ``scgpcl_mlp`` / ``scgpcl_graph``: this repo's scGPCL with the MLP encoder or the bipartite
  cell–gene graph encoder (``--encoders``), ``--pretrain-epochs`` / ``--dec-epochs`` caps.
- ``leiden_pca``: scanpy Leiden (igraph) on a 15-NN graph of 50 PCs of the scaled log data,
  resolution bisected until it gives K clusters (the closest count is kept otherwise).
- ``kmeans_pca``: k-means (K, 10 restarts) on the same PCs.
- ``kmeans_scvi``: k-means on the scVI latent (10-d, ``--scvi-epochs``).
- ``scproto_merged``: the scProto pipeline (``pipelines/atlas_job.py``, ``--scproto-epochs``, 100
  prototypes); the cells' prototypes are merged to K clusters by size-weighted k-means on the
  prototype centroids of X_scproto.
- ``published_scgpcl``: NMI / ACC / ARI from the scGPCL paper (data README); not re-run. Each
  dataset's ``_vs_published`` holds ours − published for the scGPCL rows.

Compute is single-threaded (``--threads``) and nice'd: wall times are measured under contention.

Writes ``benchmarks/results/clustering.json`` (``{dataset: {method: {nmi, ari, acc, macro_f1,
*_sd, wall_s}}}`` plus ``_meta``) and ``clustering.md``. Results of several invocations (e.g. one
dataset each) are merged into the same file.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
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
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from scproto_scale.companion.inputs import CountInput, prepare_counts
from scproto_scale.companion.scgpcl import fit_scgpcl
from scproto_scale.config import ScGPCLConfig
from scproto_scale.evaluate.baselines import scanpy_sparray_shim
from scproto_scale.evaluate.clustering import clustering_scores

DATASETS = {
    "10x_pbmc": "scdcc_10x_pbmc_4271_top2000",
    "mouse_bladder": "scdcc_mouse_bladder_2746_top2000",
    "worm_neuron": "scdeepcluster_worm_neuron_4186",
    "cite_cbmc": "scdcc_cite_cbmc_8617_top2000",
    "pbmc4k": "pbmc4k_soupx",
    "kang_8donors": "kang2018_pbmc_ctrl_8donors",
}
PUBLISHED = {  # scGPCL paper via the data README (their gene sets / cell counts differ slightly)
    "10x_pbmc": {"nmi": 0.747, "acc": 0.734, "ari": 0.681},
    "mouse_bladder": {"nmi": 0.730, "acc": 0.602, "ari": 0.456},
    "worm_neuron": {"nmi": 0.755, "acc": 0.726, "ari": 0.585},
}
METRICS = ("nmi", "ari", "acc", "macro_f1")


def leiden_k(pcs: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Leiden clusters with the resolution bisected to give ``k`` clusters (closest count kept)."""
    scanpy_sparray_shim()  # sc.pp.neighbors fails above 4,096 cells without it
    a = ad.AnnData(obsm={"X_pca": pcs}, obs={"i": np.arange(len(pcs))})
    sc.pp.neighbors(a, n_neighbors=15, use_rep="X_pca", random_state=seed)
    lo, hi, best = 0.01, 5.0, None
    for _ in range(20):
        r = (lo + hi) / 2
        sc.tl.leiden(a, resolution=r, flavor="igraph", n_iterations=2, random_state=seed)
        lab = a.obs["leiden"].to_numpy()
        n = len(np.unique(lab))
        if best is None or abs(n - k) < abs(best[0] - k):
            best = (n, lab)
        if n == k:
            break
        lo, hi = (r, hi) if n < k else (lo, r)
    return best[1]


def scproto_merged(a: ad.AnnData, genes, k: int, seed: int, epochs: int, workdir: Path,
                   threads: int) -> np.ndarray:
    """Train scProto through the pipeline and merge its prototypes to ``k`` clusters."""
    e = scproto_embed(a[:, genes].X.copy(), np.asarray(a.obs["batch"]), genes, seed, epochs,
                      workdir, ["train.batch_size=256", "train.min_cells_per_study=64",
                                "model.n_prototypes=100", "model.latent_dim=32", "train.lr=0.01"],
                      threads)
    rows = e.obs["store_row"].to_numpy()
    proto = e.obs["scproto_prototype"].astype(int).to_numpy()
    used, inv, sizes = np.unique(proto, return_inverse=True, return_counts=True)
    cent = np.stack([e.obsm["X_scproto"][inv == j].mean(0) for j in range(len(used))])
    km = KMeans(n_clusters=min(k, len(used)), n_init=10, random_state=seed).fit(cent, sample_weight=sizes)
    labels = np.full(a.n_obs, -1)
    labels[rows] = km.labels_[inv]
    return labels


def run_dataset(name: str, args: argparse.Namespace, save) -> dict:
    a = read_labelled(DATASETS[name])
    n_file = a.n_obs
    if args.max_cells and a.n_obs > args.max_cells:
        keep = np.sort(np.random.default_rng(args.subsample_seed).choice(a.n_obs, args.max_cells,
                                                                         replace=False))
        a = a[keep].copy()
    y = a.obs["cell_type"].astype(str).to_numpy()
    k = len(np.unique(y))
    data: CountInput = prepare_counts(a, 2000, name)
    genes = data.genes
    per: dict[str, list[dict]] = {}

    def record(method: str, labels: np.ndarray, t0: float) -> None:
        s = clustering_scores(y, labels)
        s["wall_s"] = time.perf_counter() - t0
        per.setdefault(method, []).append(s)
        print(f"{name:14s} {method:15s} seed {seed}: " + " ".join(f"{m}={s[m]:.3f}" for m in METRICS)
              + f" ({s['wall_s']:.0f}s)", flush=True)

    def summary() -> dict:
        r = summarise(name, a, genes, k, per)
        r["_dataset"].update(n_cells_file=n_file, subsample_seed=args.subsample_seed
                             if a.n_obs < n_file else None)
        return r

    for seed in range(args.seeds):
        for enc in args.encoders:
            cfg = ScGPCLConfig(encoder=enc, pretrain_epochs=args.pretrain_epochs,
                               warmup_epochs=args.warmup_epochs, dec_max_epochs=args.dec_epochs,
                               num_threads=args.threads)
            t0 = time.perf_counter()
            res = fit_scgpcl(data, k, cfg, seed=seed)
            record(f"scgpcl_{enc}", res.labels, t0)
            per[f"scgpcl_{enc}"][-1].update(pretrain_epochs=res.pretrain_epochs,
                                            dec_epochs=res.dec_epochs)
        t0 = time.perf_counter()
        pcs = PCA(50, random_state=seed).fit_transform(data.x).astype(np.float32)
        t_pca = time.perf_counter() - t0
        t0 = time.perf_counter() - t_pca
        record("leiden_pca", leiden_k(pcs, k, seed), t0)
        t0 = time.perf_counter() - t_pca
        record("kmeans_pca", KMeans(k, n_init=10, random_state=seed).fit_predict(pcs), t0)
        if args.scvi_epochs > 0 and seed < args.baseline_seeds:
            t0 = time.perf_counter()
            z = scvi_latent(data.counts, seed, args.scvi_epochs, num_threads=args.threads)
            record("kmeans_scvi", KMeans(k, n_init=10, random_state=seed).fit_predict(z), t0)
        if args.scproto_epochs > 0 and seed < args.baseline_seeds:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=args.workdir) as wd:
                record("scproto_merged", scproto_merged(a, genes, k, seed, args.scproto_epochs,
                                                        Path(wd), args.threads), t0)
        save(summary())  # after every seed: partial results survive
    return summary()


LOG_LINE = re.compile(r"^(\S+)\s+(\S+)\s+seed (\d+): nmi=(\S+) ari=(\S+) acc=(\S+) "
                      r"macro_f1=(\S+) \((\d+)s\)$")


def from_logs(paths: list[str]) -> dict[str, dict[str, list[dict]]]:
    """Per-seed scores printed by earlier runs (``dataset method seed s: nmi=…``), so that a run
    stopped before it saved (or run by an older version that saved once per dataset) still counts.
    A (dataset, method, seed) seen twice keeps its last line."""
    runs: dict[tuple[str, str, int], dict] = {}
    for p in paths:
        for line in Path(p).read_text().splitlines():
            m = LOG_LINE.match(line.strip())
            if m:
                ds, meth, seed, *vals = m.groups()
                runs[(ds, meth, int(seed))] = dict(zip((*METRICS, "wall_s"), map(float, vals),
                                                       strict=True))
    per: dict[str, dict[str, list[dict]]] = {}
    for (ds, meth, _), v in sorted(runs.items()):
        per.setdefault(ds, {}).setdefault(meth, []).append(v)
    return per


def summarise(name: str, a: ad.AnnData, genes, k: int, per: dict[str, list[dict]]) -> dict:
    out = {m: mean_sd(rows) for m, rows in per.items()}
    if name in PUBLISHED:
        pub = out["published_scgpcl"] = dict(PUBLISHED[name])
        out["_vs_published"] = {m: {x: out[m][x] - pub[x] for x in pub} for m in out
                                if m.startswith("scgpcl")}
    out["_dataset"] = {"file": DATASETS[name], "n_cells": int(a.n_obs), "n_genes_used": len(genes),
                       "n_clusters": k}
    return out


def write_markdown(res: dict, path: Path) -> None:
    lines = ["# Clustering benchmark (scGPCL companion)", "",
             f"Settings: {res.get('_meta', {}).get('settings')}", "",
             "mean ± sd over seeds; K = number of labels; published = scGPCL paper (not re-run; "
             "their gene sets / cell counts differ slightly); wall s = seconds per seed, "
             f"{res.get('_meta', {}).get('wall_time_note', '')}", ""]
    for ds, methods in res.items():
        if ds.startswith("_"):
            continue
        info = methods.get("_dataset", {})
        sub = (f" of {info['n_cells_file']}, subsample seed {info['subsample_seed']}"
               if info.get("subsample_seed") is not None else "")
        lines += [f"## {ds} ({info.get('n_cells')} cells{sub}, {info.get('n_genes_used')} genes, "
                  f"K={info.get('n_clusters')})", "",
                  "| method | seeds | NMI | ARI | ACC | macro F1 | wall s |",
                  "|---|---|---|---|---|---|---|"]
        for m, v in methods.items():
            if m.startswith("_"):
                continue
            n = v.get("n_runs", 0)
            cell = [(f"{v[x]:.3f} ± {v[x + '_sd']:.3f}" if n > 1 else f"{v[x]:.3f}") if x in v
                    else "–" for x in METRICS]
            cell.append(f"{v['wall_s']:.0f}" if "wall_s" in v else "–")
            lines.append(f"| {m} | {n or 'paper'} | " + " | ".join(cell) + " |")
        for m, d in methods.get("_vs_published", {}).items():
            lines.append("")
            lines.append(f"{m} − published: " + ", ".join(f"{x.upper()} {v:+.3f}" for x, v in d.items()))
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 datasets, 1 seed, short training")
    ap.add_argument("--datasets", nargs="*", default=None, choices=sorted(DATASETS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--encoders", nargs="*", default=["mlp", "graph"], choices=["mlp", "graph"])
    ap.add_argument("--max-cells", type=int, default=2000, help="subsample larger sets (0: all)")
    ap.add_argument("--subsample-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch / scVI / scProto threads")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite clustering.md from the JSON")
    ap.add_argument("--baseline-seeds", type=int, default=None,
                    help="seeds of the slow baselines (scVI, scProto); default: --seeds")
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--warmup-epochs", type=int, default=5)
    ap.add_argument("--dec-epochs", type=int, default=15)
    ap.add_argument("--scvi-epochs", type=int, default=50)
    ap.add_argument("--scproto-epochs", type=int, default=10)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="scratch for the scProto runs (created if missing)")
    ap.add_argument("--out", default=str(RESULTS / "clustering.json"))
    ap.add_argument("--from-logs", nargs="*", default=None,
                    help="no training: rebuild the JSON from the per-seed lines of earlier runs' logs")
    args = ap.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.seeds, args.pretrain_epochs, args.warmup_epochs, args.dec_epochs = 1, 6, 2, 6
        args.scvi_epochs, args.scproto_epochs = 15, 3
        args.datasets = args.datasets or ["10x_pbmc", "mouse_bladder"]
    if args.baseline_seeds is None:
        args.baseline_seeds = args.seeds
    datasets = args.datasets or ["10x_pbmc", "mouse_bladder", "worm_neuron", "cite_cbmc"]
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.markdown_only:
        write_markdown(json.loads(out.read_text()), out.with_suffix(".md"))
        print(f"wrote {out.with_suffix('.md')} from {out}")
        return
    if args.from_logs:
        for ds, per in from_logs(args.from_logs).items():
            a = read_labelled(DATASETS[ds])
            k = a.obs["cell_type"].astype(str).nunique()
            r = summarise(ds, a, range(min(2000, a.n_vars)), k, per)
            r["_dataset"]["rebuilt_from_logs"] = True
            settings = {k: v for k, v in vars(args).items() if k not in ("out", "workdir", "from_logs")}
            res = merge_json(out, {ds: r, "_meta": {"machine": machine(), "settings": settings}})
        write_markdown(res, out.with_suffix(".md"))
        print(f"wrote {out} and {out.with_suffix('.md')} from {args.from_logs}")
        return
    settings = {k: v for k, v in vars(args).items()
                if k not in ("out", "workdir", "datasets", "markdown_only", "from_logs")}
    note = (f"{args.threads} thread(s) on a shared 2-core box, other jobs running (run nice'd or "
            "under the bench lock): wall times measured under contention")

    for ds in datasets:
        t0 = time.perf_counter()

        def save(r: dict, ds: str = ds, t0: float = t0) -> None:
            r["_dataset"]["wall_s_all_methods"] = time.perf_counter() - t0
            res = merge_json(out, {ds: r, "_meta": {"machine": machine(), "settings": settings,
                                                    "wall_time_note": note}})
            write_markdown(res, out.with_suffix(".md"))

        save(run_dataset(ds, args, save))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
