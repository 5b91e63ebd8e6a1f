"""Time and memory of the main job, stage by stage (ingest, prepare, train, export, evaluate).

    python benchmarks/pipeline.py --config configs/kang_pbmc.yaml [--set k=v ...] [--name kang]

Writes ``benchmarks/results/pipeline_<name>.json``: stage wall times, training cells/s (anchor
and view cells), peak RSS, the machine, the config and the headline quality numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

from pipelines.atlas_job import run
from scproto_scale.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    name = args.name or Path(args.config).stem
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix=f"bench_{name}_"))
    t0 = time.perf_counter()
    report = run(cfg, out, resume=False)
    wall = time.perf_counter() - t0
    n_cells = report["n_cells"]
    train_s = report["stages_s"]["train"]
    anchors = n_cells * cfg.train.epochs
    result = {
        "name": name,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "n_cells": n_cells, "n_genes": report["n_genes"], "n_studies": report["n_studies"],
        "epochs": cfg.train.epochs,
        "stages_s": report["stages_s"], "wall_s": round(wall, 1),
        "train_anchor_cells_per_s": round(anchors / train_s, 1),
        "train_view_cells_per_s": round(anchors * cfg.train.n_views / train_s, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "methods": report.get("methods"), "metacells": report.get("metacells"),
        "config": cfg.model_dump(),
    }
    dest = Path(__file__).parent / "results" / f"pipeline_{name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps({k: result[k] for k in ("name", "stages_s", "train_anchor_cells_per_s",
                                               "peak_rss_gib")}, indent=1))
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
