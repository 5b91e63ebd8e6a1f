"""Distributed training: scaling, Ray's overhead, distributed Sinkhorn, restarts, the queue.

    python benchmarks/distributed.py [--quick] [--only PART ...]

Writes ``benchmarks/results/distributed.json`` (``distributed_quick.json`` with ``--quick``):

- ``scaling_ratio_2_vs_1``: training anchor cells/s of 2 Ray workers (1 CPU each) over 1 Ray
  worker (2 CPUs), same store, same per-worker batch; plus in-process and torchrun peers.
- ``ray_overhead_s``: wall time of the same ``scproto-scale train`` job under Ray (2 workers)
  minus under ``torchrun --nproc_per_node 2``; the per-epoch part is reported separately.
- ``sinkhorn_max_abs_diff_w2_vs_w1``: per-study, queue-augmented Sinkhorn codes on 2 gloo
  ranks vs one rank holding the concatenated batch (K = 3,000, uneven ranks).
- ``resume_max_abs_param_diff``: 2 Ray workers, one killed (``os._exit``) mid-epoch and
  restarted from the last checkpoint, vs the same job uninterrupted on 2 gloo ranks.
- ``prototype_perplexity_with_queue`` / ``_without_queue``: K = 4,096 prototypes, ~256 cells
  per study group per step; the effective number of prototypes the cells' mean embeddings are
  assigned to (``prototype_sample_perplexity_*``: of one posterior sample per cell, what
  training's SwAV scores).
- ``swav_head``: step time and peak memory of the SwAV head (forward + backward) versus K.

``--only sinkhorn launchers resume queue swav_head`` reruns those parts and updates them in the
existing JSON (the rest keeps its old numbers; ``partial_reruns`` lists each rerun, and the
sinkhorn, launchers, resume and queue parts record their ``measured`` date).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from scproto_scale.atlas.atlas import PrototypeAtlas
from scproto_scale.config import DistributedConfig, ModelConfig, PrepareConfig, TrainConfig
from scproto_scale.data.ingest import ingest
from scproto_scale.data.store import open_store
from scproto_scale.model import dist
from scproto_scale.model.swav import StudyQueue, group_codes, per_study_swav_loss
from scproto_scale.prepare.run import prepare
from scproto_scale.provenance import versions
from scproto_scale.simulate import write_simulated_atlas
from scproto_scale.train.launch import launch_ray
from scproto_scale.train.loop import cell_prototype_usage
from scproto_scale.train.spawn import run_ranks
from scproto_scale.train.worker import TrainJob, run_worker

BIN = Path(sys.executable).parent
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- the CLI job under each launcher -------------------------------------------------------

def cli_job(cfg_path: Path, out: Path, launcher: list[str], extra: list[str],
            env: dict | None = None) -> dict:
    """Time one ``scproto-scale train … --resume`` (prepare reused, training from scratch)."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutil.rmtree(out / "ray", ignore_errors=True)
    cmd = [*launcher, "train", str(cfg_path), "--out", str(out), "--resume"]
    for kv in extra:
        cmd += ["--set", kv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env or ENV, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    hist = report["train_history"]
    steady = hist[1:] or hist  # epoch 0 includes worker warm-up
    return {"wall_s": round(wall, 1), "train_stage_s": report["stages_s"]["train"],
            "anchor_cells_per_s": round(float(np.mean([h["anchor_cells_per_s"] for h in steady])), 1),
            "data_wait_fraction": round(float(np.mean([h["data_wait_fraction"] for h in steady])), 4),
            "world_size": report["training"]["world_size"],
            "launcher": report["training"]["launcher"]}


def bench_launchers(root: Path, n_cells: int, epochs: int) -> dict:
    h5ad = write_simulated_atlas(root / "atlas.h5ad", n_cells=n_cells, n_genes=2000,
                                 n_studies=4, seed=0)
    cfg = {"seed": 0, "data": {"path": str(h5ad), "batch_key": "study", "label_key": "cell_type"},
           "prepare": {"n_top_genes": 1000}, "model": {"n_prototypes": 300, "latent_dim": 32},
           "train": {"epochs": epochs, "batch_size": 512, "min_cells_per_study": 64,
                     "lr": 0.01, "progress": False}}
    cfg_path = root / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = root / "job"
    cli = [str(BIN / "scproto-scale")]
    log("prepare (untimed)")
    cli_job(cfg_path, out, cli, ["train.epochs=1"])
    runs = {}
    plan = {
        "local_1x2threads": (cli, ["train.num_threads=2"]),
        "ray_1_worker_2cpus": (cli, ["distributed.launcher=ray", "distributed.workers=1",
                                     "distributed.cpus_per_worker=2"]),
        "ray_2_workers_1cpu": (cli, ["distributed.workers=2", "distributed.cpus_per_worker=1"]),
        "torchrun_2x1thread": ([str(BIN / "torchrun"), "--nproc_per_node", "2", "-m",
                                "scproto_scale.cli"], ["train.num_threads=1"]),
    }
    for name, (launcher, extra) in plan.items():
        log(f"train: {name}")
        runs[name] = cli_job(cfg_path, out, launcher, extra)
        log(f"  {runs[name]}")
    log("train: two Ray nodes started on this machine (the multi-node recipe)")
    runs["ray_two_nodes_2_workers"] = two_node_job(cfg_path, out, cli)
    log(f"  {runs['ray_two_nodes_2_workers']}")
    ray2, tr2 = runs["ray_2_workers_1cpu"], runs["torchrun_2x1thread"]
    epoch_s = {k: n_cells / v["anchor_cells_per_s"] for k, v in runs.items()}
    return {
        "n_cells": n_cells, "epochs": epochs, "batch_size_per_worker": 512, "runs": runs,
        "scaling_ratio_2_vs_1": round(ray2["anchor_cells_per_s"]
                                      / runs["ray_1_worker_2cpus"]["anchor_cells_per_s"], 3),
        "ray_overhead_s": round(ray2["wall_s"] - tr2["wall_s"], 1),
        "ray_overhead_per_epoch_s": round(epoch_s["ray_2_workers_1cpu"]
                                          - epoch_s["torchrun_2x1thread"], 2),
    }


def two_node_job(cfg_path: Path, out: Path, cli: list[str]) -> dict:
    """``ray start --head`` + ``ray start --address`` (1 CPU each), then ``--ray-address``."""
    ray = str(BIN / "ray")
    env = {**ENV, "RAY_AUTH_MODE": "token"}  # Ray ≥ 2.59 local clusters use token auth
    address = "127.0.0.1:6390"
    try:
        subprocess.run([ray, "start", "--head", "--port", address.split(":")[1], "--num-cpus", "1",
                        "--include-dashboard=false", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True)
        subprocess.run([ray, "start", "--address", address, "--num-cpus", "1",
                        "--disable-usage-stats"], env=env, check=True, capture_output=True)
        status = subprocess.run([ray, "status", "--address", address], env=env,
                                capture_output=True, text=True).stdout
        run = cli_job(cfg_path, out, cli, ["distributed.workers=2",
                                           f"distributed.ray_address={address}"], env=env)
        run["ray_nodes"] = status.count("node_")
        return run
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)


# ---- distributed Sinkhorn ------------------------------------------------------------------

def _sinkhorn_case(K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    cells = {0: (100, 156), 1: (256, 0), 2: (37, 219)}  # uneven, one rank empty in group 1
    queue = {0: (512, 512), 1: (300, 724), 2: (0, 1024)}
    def unit(n):
        return torch.nn.functional.normalize(torch.randn(n, K, generator=g), dim=1)
    return ({k: [unit(n) for n in v] for k, v in cells.items()},
            {k: [unit(n) for n in v] for k, v in queue.items()})


def _sinkhorn_rank(K: int, seed: int) -> dict:
    scores, queues = _sinkhorn_case(K, seed)
    r = dist.rank()
    return {k: group_codes(scores[k][r], queues[k][r]) for k in scores}


def bench_sinkhorn(K: int = 3000) -> dict:
    scores, queues = _sinkhorn_case(K, 0)
    per_rank = run_ranks(_sinkhorn_rank, 2, K, 0)
    diffs = []
    for k in scores:
        one = group_codes(torch.cat(scores[k]), torch.cat(queues[k]))
        two = torch.cat([per_rank[0][k], per_rank[1][k]])
        diffs.append(float((one - two).abs().max()))
    return {"K": K, "epsilon": 0.02, "n_iters": 3, "max_abs_diff": max(diffs)}


# ---- restart after a killed worker ---------------------------------------------------------

def _train_rank(job: TrainJob) -> dict:
    return {k: v.clone() for k, v in run_worker(job).model.state_dict().items()}


def bench_resume(root: Path) -> dict:
    h5ad = write_simulated_atlas(root / "small.h5ad", n_cells=3000, n_genes=500, n_studies=3,
                                 seed=1)
    store = open_store(ingest(h5ad, root / "small.zarr"))
    prep = prepare(store, root / "small.prepared", "study",
                   PrepareConfig(n_top_genes=300, n_pcs=20, n_neighbors=15))
    train_cfg = TrainConfig(epochs=3, batch_size=256, min_cells_per_study=64, n_views=4,
                            progress=False, num_threads=1, checkpoint_every_steps=2)
    base = dict(store_path=str(store.path), prepared_path=str(prep.path),
                model=ModelConfig(n_prototypes=50, latent_dim=16, queue_length=256),
                train=train_cfg, seed=7)
    marker = root / "fault_fired"
    t0 = time.perf_counter()
    faulty = launch_ray(TrainJob(**base, checkpoint_dir=str(root / "ck_a"),
                                 fault_injection=f"1:1:3:{marker}"),
                        DistributedConfig(workers=2, max_failures=1), str(root / "ray_resume"))
    ray_s = time.perf_counter() - t0
    ref = run_ranks(_train_rank, 2, TrainJob(**base, checkpoint_dir=str(root / "ck_b")))[0]
    diff = max(float((faulty.model.state_dict()[k] - v).abs().max()) for k, v in ref.items())
    return {"fault": "rank 1 os._exit at epoch 1 step 3 (checkpoints every 2 steps)",
            "fault_fired": marker.exists(), "epochs": 3, "ray_wall_s_with_restart": round(ray_s, 1),
            "max_abs_param_diff": diff}


# ---- the queue at K = 4,096 ----------------------------------------------------------------

QUEUE_LENGTH = 1024  # per study: 4× the group's 256 cells per step (Sinkhorn cost ∝ L + b)
QUEUE_LR = 1e-3


def bench_queue(root: Path, epochs: int, n_cells: int) -> dict:
    h5ad = write_simulated_atlas(root / "queue.h5ad", n_cells=n_cells, n_genes=1000,
                                 n_studies=4, seed=2)
    store = open_store(ingest(h5ad, root / "queue.zarr"))
    prep = prepare(store, root / "queue.prepared", "study",
                   PrepareConfig(n_top_genes=500, n_pcs=30, n_neighbors=15))
    # 4 studies × 256 anchors per step: K = 4,096 ≫ cells per study group. Peak lr 1e-3: at
    # the default 1e-2 this short run collapses the μ direction with or without the queue
    # (mean resultant 1.0), which leaves nothing to compare (README, "Queue").
    train_cfg = TrainConfig(epochs=epochs, batch_size=1024, min_cells_per_study=256, n_views=4,
                            progress=False, lr=QUEUE_LR)
    out = {"K": 4096, "cells_per_study_group_per_step": 256, "epochs": epochs, "lr": QUEUE_LR,
           "n_cells": n_cells, "queue_length": QUEUE_LENGTH, "queue_start_epoch": 1,
           "perplexity": "exp(entropy) of the nearest-prototype frequencies of all cells (μ)"}
    for name, queue_length in (("without_queue", 0), ("with_queue", QUEUE_LENGTH)):
        model_cfg = ModelConfig(n_prototypes=4096, latent_dim=32, queue_length=queue_length,
                                queue_start_epoch=1)
        t0 = time.perf_counter()
        res = run_worker(TrainJob(str(store.path), str(prep.path), model_cfg, train_cfg,
                                  str(root / f"ck_{name}"), seed=0))
        atlas = PrototypeAtlas(res.model, prep.genes, prep.studies, {})
        # one posterior sample per cell too: what training's SwAV scores (README, "Known
        # limitation: prototype usage")
        emb = atlas.embed_store(store, "study", sample_seed=0)
        use = cell_prototype_usage(emb.prototype, emb.X_scproto, 4096)
        sample = cell_prototype_usage(emb.sample_prototype, emb.X_scproto, 4096)
        out[name] = {"train_s": round(time.perf_counter() - t0, 1),
                     "last_epoch_training_perplexity": res.history[-1]["prototype_perplexity"],
                     "cells_nearest_prototype_perplexity": use["perplexity"],
                     "prototypes_used_by_cells": use["used"],
                     "samples_nearest_prototype_perplexity": sample["perplexity"],
                     "prototypes_used_by_samples": sample["used"],
                     "mu_resultant": use["mean_resultant"],
                     "history": res.history}
        log(f"  queue {name}: {out[name]['cells_nearest_prototype_perplexity']}")
    return out


# ---- the SwAV head versus K (each point in a fresh process: clean peak RSS) ----------------

def _rss_gib(field: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process, GiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def swav_head_point(K: int, queue_length: int, steps: int) -> dict:
    torch.manual_seed(0)
    V, B, d, S = 8, 512, 32, 4
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    base = _rss_gib("VmRSS")
    protos = torch.nn.functional.normalize(torch.randn(K, d), dim=1).requires_grad_()
    queue = StudyQueue(S, queue_length, d) if queue_length else None
    groups = torch.arange(B) % S
    times = []
    for i in range(steps + 1):
        z = torch.nn.functional.normalize(torch.randn(V * B, d, requires_grad=True), dim=1)
        t0 = time.perf_counter()
        scores = (z @ protos.t()).reshape(V, B, K)
        qs = queue.scores(protos, list(range(S))) if queue is not None else None
        loss = per_study_swav_loss(scores, groups, list(range(S)), queue_scores=qs)
        loss.backward()
        if queue is not None:
            queue.push(z[: 2 * B].detach(), groups.repeat(2))
        if i:  # the first step fills the allocator
            times.append(time.perf_counter() - t0)
    return {"K": K, "queue_length": queue_length, "V": V, "B": B, "study_groups": S,
            "threads": torch.get_num_threads(),
            "step_ms": round(1000 * float(np.median(times)), 1),
            "peak_rss_delta_gib": round(_rss_gib("VmHWM") - base, 3)}


def bench_swav_head(Ks: list[int], steps: int) -> list[dict]:
    points = []
    for K in Ks:
        for L in (0, 1024):
            proc = subprocess.run([sys.executable, __file__, "--swav-point", str(K), str(L),
                                   str(steps)], env=ENV, capture_output=True, text=True)
            if proc.returncode != 0:
                points.append({"K": K, "queue_length": L, "error": proc.stderr[-500:]})
            else:
                points.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            log(f"  swav head {points[-1]}")
    return points


def markdown(result: dict) -> str:
    """The README's tables, from a results JSON."""
    runs = result["launchers"]["runs"]
    lines = ["| launcher (same store, 512 anchors per worker per step) | workers × threads | "
             "anchor cells/s | data wait | job wall s |", "|---|---|---:|---:|---:|"]
    shape = {"local_1x2threads": "1 × 2", "ray_1_worker_2cpus": "1 × 2",
             "ray_2_workers_1cpu": "2 × 1", "torchrun_2x1thread": "2 × 1",
             "ray_two_nodes_2_workers": "2 nodes × 1"}
    for name, r in runs.items():
        lines.append(f"| {name} | {shape.get(name, '')} | {r['anchor_cells_per_s']:,.0f} | "
                     f"{r['data_wait_fraction']:.1%} | {r['wall_s']} |")
    lines += ["", "| SwAV head, V=8 × B=512, 4 study groups, 1 thread | step ms | peak RSS Δ GiB |",
              "|---|---:|---:|"]
    for p in result["swav_head"]:
        if "error" not in p:
            lines.append(f"| K = {p['K']:,}, queue {p['queue_length']} | {p['step_ms']:,.0f} | "
                         f"{p['peak_rss_delta_gib']} |")
    q = result["queue"]
    lines += ["", f"| K = 4,096, 256 cells per study group, {q['epochs']} epochs | perplexity "
              "(cells' nearest prototype) | prototypes used by cells | used by one posterior "
              "sample each | μ mean resultant (1 = collapsed) | last-epoch training perplexity "
              "| train s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("without_queue", "with_queue"):
        r = q[name]
        lines.append(f"| {name.replace('_', ' ')} | {r['cells_nearest_prototype_perplexity']} | "
                     f"{r['prototypes_used_by_cells']} | {r.get('prototypes_used_by_samples', 'n/a')} | "
                     f"{r.get('mu_resultant', 'n/a')} | "
                     f"{r['last_epoch_training_perplexity']} | {r['train_s']} |")
    return "\n".join(lines)


PARTS = ("sinkhorn", "launchers", "resume", "queue", "swav_head")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (< 10 min here)")
    ap.add_argument("--swav-point", nargs=3, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--table", type=Path, help="print the README tables of a results JSON")
    ap.add_argument("--only", nargs="+", choices=PARTS,
                    help="rerun these parts and update them in the existing results JSON")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    if args.swav_point:
        torch.set_num_threads(1)  # one worker's share of this box; stable under shared load
        print(json.dumps(swav_head_point(*args.swav_point)))
        return
    t_start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    quick = args.quick
    dest = Path(__file__).parent / "results" / f"distributed{'_quick' if quick else ''}.json"
    parts = set(args.only or PARTS)
    result: dict = json.loads(dest.read_text()) if args.only and dest.exists() else {}
    result.update({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "gpu": torch.cuda.is_available(),
                    "note": "shared 2-core development box; other jobs ran nice'd"},
        "quick": quick, "versions": versions()})
    today = time.strftime("%Y-%m-%d")
    try:
        if "sinkhorn" in parts:
            log("distributed Sinkhorn")
            result["sinkhorn"] = {**bench_sinkhorn(), "measured": today}
            result["sinkhorn_max_abs_diff_w2_vs_w1"] = result["sinkhorn"]["max_abs_diff"]
        if "launchers" in parts:
            log("launchers")
            result["launchers"] = {**bench_launchers(root, 10_000 if quick else 30_000,
                                                     2 if quick else 4), "measured": today}
            for k in ("scaling_ratio_2_vs_1", "ray_overhead_s", "ray_overhead_per_epoch_s"):
                result[k] = result["launchers"][k]
        if "resume" in parts:
            log("restart after a killed worker")
            result["resume"] = {**bench_resume(root), "measured": today}
            result["resume_max_abs_param_diff"] = result["resume"]["max_abs_param_diff"]
        if "queue" in parts:
            log("queue at K = 4,096")
            result["queue"] = {**bench_queue(root, 3 if quick else 6, 6_000 if quick else 20_000),
                               "measured": today}
            for name in ("with_queue", "without_queue"):
                result[f"prototype_perplexity_{name}"] = \
                    result["queue"][name]["cells_nearest_prototype_perplexity"]
                result[f"prototype_sample_perplexity_{name}"] = \
                    result["queue"][name]["samples_nearest_prototype_perplexity"]
        if "swav_head" in parts:
            log("SwAV head vs K")
            result["swav_head"] = bench_swav_head(
                [300, 3000, 30_000] if quick else [300, 3000, 30_000, 65_536], 1 if quick else 3)
        wall = round(time.perf_counter() - t_start, 1)
        if args.only:
            result.setdefault("partial_reruns", []).append(
                {"parts": sorted(parts), "date": today, "wall_s": wall})
        else:
            result["wall_s"] = wall
    finally:
        shutil.rmtree(root, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float))
    tmp.replace(dest)
    keys = ["scaling_ratio_2_vs_1", "sinkhorn_max_abs_diff_w2_vs_w1", "resume_max_abs_param_diff",
            "prototype_perplexity_with_queue", "prototype_perplexity_without_queue",
            "ray_overhead_s", "ray_overhead_per_epoch_s", "wall_s"]
    print(json.dumps({k: result.get(k) for k in keys}, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
