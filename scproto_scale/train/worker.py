"""The one training function every launcher runs: a picklable job → :func:`train` on a worker."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from scproto_scale.config import ModelConfig, TrainConfig
from scproto_scale.data.store import open_store
from scproto_scale.prepare.artefacts import Prepared
from scproto_scale.train.loop import CheckpointHook, FaultInjection, TrainResult, train


@dataclass(frozen=True)
class TrainJob:
    """What a worker needs to train, by value (paths and configs, no open handles).

    Attributes:
        store_path: zarr store or SOMA experiment with the counts.
        prepared_path: the prepare directory (HVGs, KNN table, library sizes, study codes).
        model, train: configuration (``train.batch_size`` is per worker).
        checkpoint_dir: where rank 0 writes checkpoints (shared storage on multi-node).
        seed: the run's seed.
        resume: continue from the latest checkpoint in ``checkpoint_dir``.
        fault_injection: ``"RANK:EPOCH:STEP:MARKER"`` kills one worker once (tests only).
        store_options: keyword arguments to reopen the store on a worker (SOMA
            ``obs_value_filter``, ``genes``, ``var_id_column``, ``tiledb_config``: a Census query).
    """

    store_path: str
    prepared_path: str
    model: ModelConfig
    train: TrainConfig
    checkpoint_dir: str
    seed: int = 0
    resume: bool = False
    fault_injection: str | None = None
    store_options: dict = field(default_factory=dict)


def run_worker(job: TrainJob, resume_from: Path | None = None,
               on_checkpoint: CheckpointHook | None = None, device: torch.device | None = None,
               console: Console | None = None) -> TrainResult:
    """Open the store and the artefacts on this worker and train (see :func:`train`)."""
    store = open_store(job.store_path, **job.store_options)
    prepared = Prepared.load(job.prepared_path)
    fault = FaultInjection.parse(job.fault_injection) if job.fault_injection else None
    return train(store, prepared, job.model, job.train, job.checkpoint_dir, seed=job.seed,
                 resume=job.resume, console=console, resume_from=resume_from,
                 on_checkpoint=on_checkpoint, device=device, fault=fault)
