"""Embedding new data with a trained atlas: query mapping quality, throughput, memory, resumption.

    python benchmarks/embed.py [--quick]

Writes ``benchmarks/results/embed_quick.json`` / ``embed_full.json`` (``embed_partial.json``
for extra LOSO folds chosen with ``--kang-donors`` / ``--multi-studies``, quick settings) and
``benchmarks/results/embed.json``: each section from the full run when there is one, else the
quick and partial folds pooled (``section_modes``). The summary keys come first:

- **Leave-one-study-out (LOSO) on Kang PBMC, 8 donors**: an atlas is trained on 7 donors
  (``configs/kang_pbmc.yaml``; ``--quick``: 5 epochs; ``train_epochs`` in the JSON) and the 8th donor
  is mapped (a) with an untrained new condition row — what the reference implementation does —
  and (b) after surgery (only the new row and θ column trained, ``surgery_epochs``), plus
  (c) the mean condition embedding (this code's default for unseen studies, no surgery).
  Peer in the same run: a 15-NN vote over the reference cells' embeddings (``knn_*``).
  Labels are transferred through prototypes (``metacells.h5ad`` majority labels); scored
  against the donor's true labels: ``loso_macro_f1_*``, ``loso_accuracy_*``. Mixing of the
  mapped donor with the reference: scib-metrics iLISI on exact FAISS neighbours (k = 90) over
  reference + mapped cells, batch = donor (``loso_ilisi_*``; scaled to [0, 1]) and
  batch = reference / query (``loso_ilisi_query_vs_ref_*``). Means over the folds run
  (``--quick``: one donor; full: all 8).
- **LOSO on the multi-study PBMC set** (``pipelines/pbmc_multi.py``: Kang + PBMC 4k + Ding
  2020, 97 shared genes, coarse labels, batch = study:batch): the same, holding out a study
  (``--quick``: pbmc4k; full: each of the three).
- **Throughput and peak RSS** of ``scproto-scale embed`` (CLI process; Ray workers counted) on
  a synthetic store from ``simulate_scale`` (full: 1M cells × 20k genes; quick: 60k × 20k),
  1 process (2 torch threads) vs 2 Ray workers (1 thread each), chunks of 8,192 cells:
  ``embed_cells_per_s`` (1 worker; chunk phase incl. reading, gene alignment, encoder,
  prototype assignment and label transfer), ``embed_cells_per_s_2_workers`` (incl. Ray start-up),
  ``peak_rss_gib`` (1 worker), and the peak on a 10× smaller store of the same kind
  (``peak_rss_gib_small``: memory is flat in N when the two agree).
- ``resume_identical``: the CLI killed (``os._exit``, fault injection) after half the chunks of
  the smaller store, rerun, and compared bit for bit with the uninterrupted 1-worker result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import psutil

from pipelines.atlas_job import run as run_job
from scproto_scale.atlas.atlas import PrototypeAtlas
from scproto_scale.atlas.embed_job import FAULT_ENV
from scproto_scale.atlas.surgery import add_studies, train_query_studies
from scproto_scale.atlas.transfer import LabelTransfer, load_prototype_labels
from scproto_scale.config import SurgeryConfig, load_config
from scproto_scale.data.ingest import ingest
from scproto_scale.data.store import open_store
from scproto_scale.evaluate.scib import faiss_neighbors
from scproto_scale.provenance import versions
from scproto_scale.simulate_scale import write_scaled_atlas

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore"}
KANG = "kang2018_pbmc_ctrl_8donors"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def data_dir() -> Path:
    d = os.environ.get("SCPROTO_DATA_DIR") or str(ROOT.parent / "shared" / "data")
    if not Path(d).is_dir():
        raise SystemExit(f"SCPROTO_DATA_DIR={d} is not a directory")
    return Path(d)


# ---- leave one study out -------------------------------------------------------------------

def _scores(truth: np.ndarray, pred: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {"macro_f1": round(float(f1_score(truth, pred, average="macro")), 4),
            "accuracy": round(float(accuracy_score(truth, pred)), 4)}


def _ilisi(X: np.ndarray, batches: np.ndarray, k: int = 90) -> float:
    from scib_metrics import ilisi_knn

    return round(float(ilisi_knn(faiss_neighbors(X, k), np.asarray(batches))), 4)


def loso_fold(src: Path, batch_key: str, label_key: str, held: str, base_cfg: dict,
              work: Path, surgery_epochs: int, seed: int = 0, max_ref_cells: int = 8000) -> dict:
    """Train on all studies but ``held``, map ``held`` three ways, score labels and mixing.

    The fold's result is kept in ``work/result.json`` and reused by a rerun with the same
    settings, so a long LOSO run can be continued fold by fold.
    """
    key = {"src": str(src), "held": held, "config": base_cfg, "surgery_epochs": surgery_epochs,
           "seed": seed, "max_ref_cells": max_ref_cells}
    cached = work / "result.json"
    if cached.exists():
        old = json.loads(cached.read_text())
        if old.get("key") == json.loads(json.dumps(key, default=str)):
            log(f"  {held}: reusing {cached}")
            return old["result"]
    full = ad.read_h5ad(src)
    is_q = full.obs[batch_key].astype(str).to_numpy() == held
    work.mkdir(parents=True, exist_ok=True)
    full[~is_q].copy().write_h5ad(work / "ref.h5ad")
    full[is_q].copy().write_h5ad(work / "query.h5ad")
    tree = json.loads(json.dumps(base_cfg))
    tree["data"].update({"path": str(work / "ref.h5ad"), "batch_key": batch_key,
                         "label_key": label_key})
    t = time.perf_counter()
    shutil.rmtree(work / "run", ignore_errors=True)
    run_job(load_config(base=tree), work / "run", resume=False)
    train_s = time.perf_counter() - t
    atlas_dir = work / "run" / "atlas"
    atlas = PrototypeAtlas.load(atlas_dir)
    transfer = LabelTransfer(atlas.prototypes, load_prototype_labels(atlas_dir))
    store = open_store(ingest(work / "query.h5ad", work / "query.zarr", overwrite=True))
    truth = full.obs.loc[is_q, label_key].astype(str).to_numpy()

    t = time.perf_counter()
    surg, hist = train_query_studies(atlas, store, batch_key,
                                     SurgeryConfig(epochs=surgery_epochs), seed=seed)
    surgery_s = time.perf_counter() - t
    new_studies = surg.meta["surgery"]["new_studies"]
    variants = {"no_surgery": add_studies(atlas, new_studies, seed=seed), "surgery": surg,
                "mean_embedding": atlas}
    ref = ad.read_h5ad(work / "run" / "embeddings.h5ad")
    rng = np.random.default_rng(seed)
    sel = np.sort(rng.choice(ref.n_obs, min(max_ref_cells, ref.n_obs), replace=False))
    ref_X = np.asarray(ref.obsm["X_scproto"])[sel]
    ref_b = ref.obs[batch_key].astype(str).to_numpy()[sel]
    from sklearn.neighbors import KNeighborsClassifier

    knn_ref = KNeighborsClassifier(15).fit(np.asarray(ref.obsm["X_scproto"]),
                                           ref.obs[label_key].astype(str).to_numpy())
    out = {"held_out": held, "n_query_cells": int(is_q.sum()), "n_reference_cells": int(ref.n_obs),
           "train_s": round(train_s, 1), "surgery_s": round(surgery_s, 1),
           "surgery_loss_first_last": [round(hist[0]["loss"], 2), round(hist[-1]["loss"], 2)]
           if hist else None}
    embs = {}
    for name, a in variants.items():
        emb = embs[name] = a.embed_store(store, batch_key).X_scproto
        code, unc, _ = transfer.predict(emb)
        s = _scores(truth, transfer.classes[code])
        # peer: 15-NN vote over the reference cells' embeddings (not through prototypes)
        knn = _scores(truth, knn_ref.predict(emb))
        s.update({"knn_macro_f1": knn["macro_f1"], "knn_accuracy": knn["accuracy"]})
        X = np.concatenate([ref_X, emb])
        qb = store.obs_column(batch_key).astype(str).to_numpy()
        out[name] = {**s, "ilisi": _ilisi(X, np.concatenate([ref_b, qb])),
                     "ilisi_query_vs_ref": _ilisi(
                         X, np.r_[np.zeros(len(ref_X), int), np.ones(len(emb), int)]),
                     "mean_uncertainty": round(float(unc.mean()), 4)}
        log(f"  {held} {name}: {out[name]}")
    # how far surgery moves the query's embedding at all (1 − cosine, mean over cells), and why
    out["embedding_shift_surgery_vs_no_surgery"] = float(
        np.mean(1 - (embs["surgery"] * embs["no_surgery"]).sum(1)))
    out["embedding_shift_mean_vs_random_row"] = float(
        np.mean(1 - (embs["mean_embedding"] * embs["no_surgery"]).sum(1)))
    out["encoder_gene_to_condition_input"] = encoder_input_ratio(atlas, store)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "result": out}, default=str))
    os.replace(tmp, cached)
    return out


def encoder_input_ratio(atlas: PrototypeAtlas, store, n_cells: int = 500) -> float:
    """Mean ‖W_x x‖ / mean ‖W_c c‖ of the encoder's first layer over the first query cells and
    the reference condition rows: how much the study embedding can steer the encoder."""
    import torch

    from scproto_scale.atlas.genes import gene_selector
    from scproto_scale.model.scproto import log_normalize_torch

    X = store.read_rows(np.arange(min(n_cells, store.n_obs)))
    lib = torch.from_numpy(np.asarray(X.sum(axis=1), dtype=np.float32).ravel())
    sel = gene_selector(atlas.align(store.var).columns, store.n_vars)
    x = log_normalize_torch(torch.from_numpy((X @ sel).toarray().astype(np.float32)), lib)
    enc = atlas.model.cvae.encoder
    w = atlas.model.cvae.condition_embedding.weight
    with torch.no_grad():
        c = w / w.norm(dim=1, keepdim=True).clamp(min=1.0)
        ratio = enc.first(x).norm(dim=1).mean() / enc.cond(c).norm(dim=1).mean()
    return round(float(ratio), 1)


def loso(src: Path, batch_key: str, label_key: str, held_out: list[str], base_cfg: dict,
         work: Path, surgery_epochs: int) -> dict:
    folds = [loso_fold(src, batch_key, label_key, h, base_cfg, work / f"fold_{h}",
                       surgery_epochs) for h in held_out]
    return {"folds": folds, "mean": fold_means(folds), "held_out": held_out}


def fold_means(folds: list[dict]) -> dict:
    """Mean of each score over the folds, per mapping variant."""
    mean = {}
    for v in ("no_surgery", "surgery", "mean_embedding"):
        for m in ("macro_f1", "accuracy", "knn_macro_f1", "knn_accuracy", "ilisi",
                  "ilisi_query_vs_ref"):
            mean[f"{m}_{v}"] = round(float(np.mean([f[v][m] for f in folds])), 4)
    return mean


# ---- throughput, memory, resumption --------------------------------------------------------

class PeakRSS:
    """Samples the RSS of a process and its descendants (Ray workers included) every 0.2 s."""

    def __init__(self, pid: int):
        self.proc, self.peak_tree, self.peak_single = psutil.Process(pid), 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
                self.peak_tree = max(self.peak_tree, sum(rss))
                self.peak_single = max(self.peak_single, max(rss, default=0))
            except psutil.Error:
                pass
            time.sleep(0.2)

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._t.join()
        return self.peak_single / 2**30, self.peak_tree / 2**30


def cli_embed(atlas: Path, store: Path, out: Path, work: Path, workers: int,
              fault: str | None = None, fresh: bool = True) -> dict:
    cmd = [str(BIN / "scproto-scale"), "embed", str(atlas), str(store), "--batch-key", "study",
           "--out", str(out), "--work-dir", str(work), "--workers", str(workers)]
    cmd += ["--fresh"] if fresh else []
    env = {**ENV, **({FAULT_ENV: fault} if fault else {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    mon = PeakRSS(proc.pid)
    _, err = proc.communicate()
    single, tree = mon.stop()
    wall = time.perf_counter() - t0
    if fault:
        if proc.returncode != 17:
            raise RuntimeError(f"fault run exited {proc.returncode}:\n{err[-3000:]}")
        return {"returncode": proc.returncode}
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    summary = json.loads((work / "summary.json").read_text())
    n = summary["n_cells"]
    return {"workers": workers, "n_cells": n, "wall_s": round(wall, 1),
            "chunks_s": summary["chunks_s"], "total_s": summary["total_s"],
            "cells_per_s": round(n / summary["chunks_s"], 1),
            "cells_per_s_end_to_end": round(n / wall, 1),
            "peak_rss_gib_largest_process": round(single, 3),
            "peak_rss_gib_process_tree": round(tree, 3)}


def synthetic_store(root: Path, n_cells: int, n_genes: int, seed: int = 0) -> tuple[Path, dict]:
    path = root / f"synth_n{n_cells}_g{n_genes}_s{seed}.zarr"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return path, {**json.loads(meta.read_text()), "reused": True}
    t = time.perf_counter()
    s = write_scaled_atlas(zarr_path=path, n_cells=n_cells, n_genes=n_genes, n_studies=120,
                           seed=seed, overwrite=True)
    s["seconds"] = round(time.perf_counter() - t, 1)
    meta.write_text(json.dumps(s))
    return path, {**s, "reused": False}


def throughput(root: Path, n_cells: int, n_genes: int, train_epochs: int) -> dict:
    small_n = max(20_000, n_cells // 10)
    log(f"synthetic stores: {small_n:,} and {n_cells:,} cells × {n_genes:,} genes")
    small, small_meta = synthetic_store(root, small_n, n_genes)
    big, big_meta = synthetic_store(root, n_cells, n_genes)
    # The atlas: trained on a 20k-cell store of the same generator and seed (same genes and
    # studies); its training length does not change the cost of embedding.
    train_store, _ = synthetic_store(root, 20_000, n_genes)
    atlas = root / f"atlas_g{n_genes}_n20000"
    if not (atlas / "atlas" / "atlas.json").exists():
        log("training the throughput atlas")
        cfg = load_config(base={
            "seed": 0, "data": {"path": str(train_store), "batch_key": "study",
                                "label_key": "cell_type"},
            "prepare": {"n_top_genes": 2000, "n_neighbors": 15},
            "model": {"n_prototypes": 300, "latent_dim": 16},
            "train": {"epochs": train_epochs, "batch_size": 512, "min_cells_per_study": 64,
                      "n_views": 4, "progress": False},
            "evaluate": {"enabled": False}})
        run_job(cfg, atlas, resume=True)
    atlas = atlas / "atlas"
    out: dict = {"store_cells": n_cells, "store_genes": n_genes, "small_store_cells": small_n,
                 "generate": {"big": big_meta, "small": small_meta},
                 "atlas_train_epochs": train_epochs, "chunk_size": 8192}
    log("embed, 1 worker, small store (memory flatness peer)")
    out["w1_small"] = cli_embed(atlas, small, root / "e_small.h5ad", root / "w_small", 1)
    log("embed, 1 worker")
    out["w1"] = cli_embed(atlas, big, root / "e1.h5ad", root / "w1", 1)
    log("embed, 2 Ray workers")
    out["w2"] = cli_embed(atlas, big, root / "e2.h5ad", root / "w2", 2)
    a, b = ad.read_h5ad(root / "e1.h5ad"), ad.read_h5ad(root / "e2.h5ad")
    out["max_abs_diff_2_vs_1_workers"] = float(np.abs(a.obsm["X_scproto"] - b.obsm["X_scproto"]).max())
    out["label_transfer"] = "scproto_label" in a.obs
    del a, b
    # resumption: killed after half the chunks, rerun, compared with the uninterrupted result
    # (on the smaller store: the mechanism does not depend on N and it keeps the run short)
    a = ad.read_h5ad(root / "e_small.h5ad")
    n_chunks = -(-small_n // 8192)
    log(f"resume: kill after chunk {n_chunks // 2} of {n_chunks} ({small_n:,} cells)")
    cli_embed(atlas, small, root / "er.h5ad", root / "wr", 1, fault=f"chunk:{n_chunks // 2}")
    out["resume"] = cli_embed(atlas, small, root / "er.h5ad", root / "wr", 1, fresh=False)
    r = ad.read_h5ad(root / "er.h5ad")
    same = np.array_equal(r.obsm["X_scproto"], a.obsm["X_scproto"]) and all(
        np.array_equal(r.obs[c].to_numpy(), a.obs[c].to_numpy())
        for c in ("scproto_prototype", "scproto_confidence", "scproto_label",
                  "scproto_label_uncertainty"))
    out["resume_identical"] = bool(same)
    out["resume_chunks_recomputed"] = json.loads((root / "wr" / "summary.json").read_text())[
        "chunks_computed"]
    for f in ("e_small.h5ad", "e1.h5ad", "e2.h5ad", "er.h5ad"):
        (root / f).unlink(missing_ok=True)
    for w in ("w_small", "w1", "w2", "wr"):
        shutil.rmtree(root / w, ignore_errors=True)
    return out


def summarise(result: dict) -> dict:
    """The headline keys (first in the JSON) from the sections present."""
    summary: dict = {}
    km = result.get("loso_kang", {}).get("mean")
    if km:
        summary.update({"loso_macro_f1_surgery": km["macro_f1_surgery"],
                        "loso_macro_f1_no_surgery": km["macro_f1_no_surgery"],
                        "loso_macro_f1_mean_embedding": km["macro_f1_mean_embedding"],
                        "loso_accuracy_surgery": km["accuracy_surgery"],
                        "loso_accuracy_no_surgery": km["accuracy_no_surgery"],
                        "loso_ilisi_surgery": km["ilisi_surgery"],
                        "loso_ilisi_no_surgery": km["ilisi_no_surgery"],
                        "loso_ilisi_mean_embedding": km["ilisi_mean_embedding"],
                        "loso_knn_macro_f1_surgery": km["knn_macro_f1_surgery"],
                        "loso_knn_macro_f1_no_surgery": km["knn_macro_f1_no_surgery"]})
    mm = result.get("loso_pbmc_multi", {}).get("mean")
    if mm:
        summary.update({f"multi_loso_{k}": v for k, v in mm.items()})
    tp = result.get("throughput")
    if tp:
        summary.update({
            "embed_cells_per_s": tp["w1"]["cells_per_s"],
            "embed_cells_per_s_2_workers": tp["w2"]["cells_per_s"],
            "embed_scaling_2_vs_1": round(tp["w2"]["cells_per_s"] / tp["w1"]["cells_per_s"], 3),
            "peak_rss_gib": tp["w1"]["peak_rss_gib_largest_process"],
            "peak_rss_gib_small": tp["w1_small"]["peak_rss_gib_largest_process"],
            "peak_rss_gib_2_workers_tree": tp["w2"]["peak_rss_gib_process_tree"],
            "resume_identical": tp["resume_identical"], "throughput_store_cells": tp["store_cells"]})
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="< 10 min: 1 fold each, 60k cells")
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "embed_bench")
    ap.add_argument("--part", choices=["all", "loso", "throughput"], default="all",
                    help="run one part and merge it into the existing JSON of the same mode "
                         "(each part fits one bench-lock slot)")
    ap.add_argument("--train-epochs", type=int, default=None,
                    help="LOSO atlas epochs (default: configs/kang_pbmc.yaml's; --quick: 5)")
    ap.add_argument("--n-cells", type=int, default=None,
                    help="throughput store size (default: 60k quick, 1M full)")
    ap.add_argument("--kang-donors", default=None,
                    help="comma-separated held-out donors (with --multi-studies: a 'partial' run "
                         "with the quick settings whose folds are pooled with the quick run's)")
    ap.add_argument("--multi-studies", default=None, help="comma-separated held-out studies")
    args = ap.parse_args()
    t0 = time.perf_counter()
    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    partial = args.kang_donors is not None or args.multi_studies is not None
    quick = args.quick or partial
    mode = "partial" if partial else "quick" if quick else "full"
    # full: the shipped Kang config's epochs (fully trained atlases); quick: few, to stay short
    train_epochs = args.train_epochs or (5 if quick else load_config(
        ROOT / "configs" / "kang_pbmc.yaml", ["data.path=x"]).train.epochs)
    surgery_epochs = 10
    results_dir = ROOT / "benchmarks" / "results"
    keep = results_dir / f"embed_{mode}.json"
    result: dict = {}
    if args.part != "all" and keep.exists():
        result = {k: v for k, v in json.loads(keep.read_text()).items()
                  if k in ("loso_kang", "loso_pbmc_multi", "throughput", "wall_s_parts")}
    result.update({
        "mode": mode,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cores": os.cpu_count(),
                    "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": None,
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                    "shared": "2-core machine shared with other engineers (their jobs nice'd); "
                              "run under flock /work/.bench.lock"},
        "train_epochs": train_epochs, "surgery_epochs": surgery_epochs,
        "note": "quick: atlases trained for few epochs (train_epochs) to keep it short; "
                "LOSO scores of fully trained atlases would differ",
    })
    d = data_dir()
    if args.part in ("all", "loso"):
        kang_cfg = load_config(ROOT / "configs" / "kang_pbmc.yaml", [
            "data.path=x", f"train.epochs={train_epochs}", "train.progress=false",
            "evaluate.enabled=false"]).model_dump()
        donors = (["1015", "1256", "1488", "1244", "1016", "101", "107", "1039"] if not quick
                  else args.kang_donors.split(",") if args.kang_donors else
                  [] if partial else ["1244"])
        log(f"LOSO Kang: held-out donors {donors}")
        if donors:
            result["loso_kang"] = loso(d / KANG / f"{KANG}.h5ad", "batch", "cell_type",
                                       donors, kang_cfg, root / "loso_kang", surgery_epochs)
        try:
            from pipelines.pbmc_multi import assemble_multi_pbmc
        except ImportError:
            result["loso_pbmc_multi"] = {"run": False,
                                         "why": "pipelines/pbmc_multi.py not present"}
        else:
            multi = assemble_multi_pbmc(d, root / "pbmc_multi.h5ad")
            held = (["kang2018", "pbmc4k", "ding2020"] if not quick
                    else args.multi_studies.split(",") if args.multi_studies else
                    [] if partial else ["pbmc4k"])
            n_multi = ad.read_h5ad(multi, backed="r").n_obs
            cfg = json.loads(json.dumps(kang_cfg))
            cfg["train"]["min_cells_per_study"] = 32
            log(f"LOSO multi-study PBMC: held-out studies {held}")
            # study-level hold-out: the study column is the condition (its batches share a row)
            if held:
                result["loso_pbmc_multi"] = loso(multi, "study", "cell_type", held, cfg,
                                                 root / "loso_multi", surgery_epochs)
                result["loso_pbmc_multi"]["n_cells"] = int(n_multi)
    if args.part in ("all", "throughput"):
        n = args.n_cells or (60_000 if quick else 1_000_000)
        result["throughput"] = throughput(root, n, 20_000, train_epochs=1)
    parts = dict(result.get("wall_s_parts", {}))
    parts[args.part] = round(time.perf_counter() - t0, 1)
    result["wall_s_parts"] = parts
    summary = summarise(result)
    result = {**summary, **result, "versions": versions()}
    keep.write_text(json.dumps(result, indent=1, default=str))
    combined = combine(results_dir)
    (results_dir / "embed.json").write_text(json.dumps(combined, indent=1, default=str))
    print(json.dumps(summarise(combined), indent=1))
    log(f"wrote {keep} and embed.json; this part took {parts[args.part]} s")


def combine(results_dir: Path) -> dict:
    """``embed.json``: each section from the full run when it has it, else from the quick run
    (``section_modes`` says which), with the headline keys recomputed."""
    runs = {m: json.loads((results_dir / f"embed_{m}.json").read_text())
            for m in ("quick", "partial", "full") if (results_dir / f"embed_{m}.json").exists()}
    pooled = {}  # quick + partial folds (same settings), one per held-out study
    for sec in ("loso_kang", "loso_pbmc_multi"):
        folds = {f["held_out"]: f for m in ("quick", "partial")
                 for f in runs.get(m, {}).get(sec, {}).get("folds", [])}
        if folds:
            pooled[sec] = {"folds": list(folds.values()), "held_out": list(folds),
                           "mean": fold_means(list(folds.values()))}
    if pooled:
        runs["quick"] = {**runs.get("quick", runs.get("partial", {})), **pooled}
    out: dict = {"section_modes": {}}
    for sec in ("loso_kang", "loso_pbmc_multi", "throughput"):
        for m in ("full", "quick"):
            if sec in runs.get(m, {}):
                out[sec] = runs[m][sec]
                out["section_modes"][sec] = m
                out.setdefault("machine", runs[m]["machine"])
                out[f"{sec}_train_epochs"] = runs[m]["train_epochs"]
                out[f"{sec}_surgery_epochs"] = runs[m]["surgery_epochs"]
                break
    out["wall_s_parts"] = {m: r.get("wall_s_parts") for m, r in runs.items()}
    out["note"] = next(iter(runs.values()))["note"] if runs else ""
    return {**summarise(out), **out, "versions": versions()}


if __name__ == "__main__":
    main()
