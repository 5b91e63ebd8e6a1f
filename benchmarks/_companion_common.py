"""Shared helpers of the companion benchmarks: dataset table, baselines, JSON/markdown output."""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path

import anndata as ad
import numpy as np

RESULTS = Path(__file__).parent / "results"


def data_dir() -> Path:
    d = os.environ.get("SCPROTO_DATA_DIR", str(Path(__file__).resolve().parents[1] / "../shared/data"))
    p = Path(d).resolve()
    if not p.is_dir():
        raise SystemExit(f"SCPROTO_DATA_DIR={d} is not a directory")
    return p


def read_labelled(name: str, label_key: str = "cell_type", drop: tuple[str, ...] = ("?",)
                  ) -> ad.AnnData:
    """Read ``$SCPROTO_DATA_DIR/NAME/NAME.h5ad`` without cells whose label is in ``drop``."""
    a = ad.read_h5ad(data_dir() / name / f"{name}.h5ad")
    keep = ~a.obs[label_key].astype(str).isin(drop).to_numpy()
    return a[keep].copy()


def scvi_latent(counts: np.ndarray, seed: int, max_epochs: int, batch: np.ndarray | None = None,
                n_latent: int = 10, num_threads: int = 1) -> np.ndarray:
    """scVI (scvi-tools, Lopez et al. 2018) latent mean of ``(n, G)`` counts."""
    import anndata as ad_
    import scipy.sparse as sp
    import scvi

    scvi.settings.seed = seed
    scvi.settings.num_threads = num_threads
    logging.getLogger("scvi").setLevel(logging.WARNING)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    a = ad_.AnnData(X=sp.csr_matrix(counts))
    if batch is not None:
        a.obs["batch"] = np.asarray(batch).astype(str)
    scvi.model.SCVI.setup_anndata(a, batch_key="batch" if batch is not None else None)
    m = scvi.model.SCVI(a, n_latent=n_latent)
    m.train(max_epochs=max_epochs, accelerator="cpu", enable_progress_bar=False, batch_size=256)
    return np.asarray(m.get_latent_representation(), dtype=np.float32)


def scproto_embed(X, batch: np.ndarray, var_names, seed: int, epochs: int, workdir: Path,
                  overrides: list[str], threads: int = 1) -> ad.AnnData:
    """Train scProto through the pipeline (``pipelines/atlas_job.py``) on counts ``X`` (cells ×
    genes) with ``batch`` as the study key; labels are never given. Returns the exported
    ``embeddings.h5ad`` (``obsm["X_scproto"]``, ``obs["scproto_prototype"]``, ``obs["store_row"]``:
    row in ``X`` of each exported cell)."""
    from pipelines.atlas_job import run as run_job
    from scproto_scale.config import load_config

    sub = ad.AnnData(X=X, obs={"batch": np.asarray(batch).astype(str)})
    sub.var_names = [str(g) for g in var_names]
    path = workdir / "input.h5ad"
    sub.write_h5ad(path)
    cfg = load_config(None, [f"data.path={path}", "data.batch_key=batch", f"seed={seed}",
                             f"train.epochs={epochs}", f"train.num_threads={threads}",
                             "train.progress=false", "evaluate.enabled=false",
                             f"prepare.n_top_genes={len(var_names)}", *overrides])
    run_job(cfg, workdir / "run", resume=False)
    return ad.read_h5ad(workdir / "run" / "embeddings.h5ad")


def mean_sd(rows: list[dict]) -> dict:
    """``{metric: mean, metric_sd: sd}`` over seeds/splits for every numeric key."""
    out: dict = {}
    for k in rows[0]:
        vals = [r[k] for r in rows if isinstance(r.get(k), int | float)]
        if len(vals) == len(rows):
            out[k] = float(np.mean(vals))
            out[f"{k}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    out["n_runs"] = len(rows)
    return out


def machine() -> dict:
    import torch

    return {"host": platform.node(), "cpu_count": os.cpu_count(), "torch_threads":
            torch.get_num_threads(), "note": "shared 2-core box: nice'd background load possible"}


def merge_json(path: Path, update: dict) -> dict:
    """Update a results JSON key by key (runs per dataset/setting can be split), atomically."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two benchmark processes may write the same file
        cur = json.loads(path.read_text()) if path.exists() else {}
        cur.update(update)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cur, indent=1))
        tmp.replace(path)
    return cur
