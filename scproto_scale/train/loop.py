"""The per-worker training loop: sampler → loader → scProto → optimiser, checkpoints.

The same function runs in-process, under ``torchrun`` and in Ray Train workers: it reads rank
and world size from :mod:`scproto_scale.model.dist` (whoever launched it set up the process
group), wraps the model in DDP when there is more than one worker, and only rank 0 writes
checkpoints. The loop never knows the storage format or the launcher.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.nn.parallel import DistributedDataParallel

from scproto_scale.config import ModelConfig, TrainConfig
from scproto_scale.data.loader import ViewLoader
from scproto_scale.data.sampler import StudyStratifiedSampler, merge_small_studies
from scproto_scale.data.store import CellStore
from scproto_scale.errors import ScprotoInputError
from scproto_scale.model import dist
from scproto_scale.model.scproto import ScProto
from scproto_scale.model.swav import StudyQueue
from scproto_scale.prepare.artefacts import Prepared
from scproto_scale.prepare.snn import cached_snn_jaccard
from scproto_scale.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_aside_checkpoints,
)
from scproto_scale.train.optim import build_optimizer, lr_at

log = logging.getLogger(__name__)
LOSS_TERMS = ("loss", "swav", "prop", "cvae")

# Called on every rank after each checkpoint: (path on rank 0 / None elsewhere, metrics).
CheckpointHook = Callable[[Path | None, dict], None]


@dataclass
class TrainResult:
    """The trained model, per-epoch records and where checkpoints are."""

    model: ScProto
    history: list[dict] = field(default_factory=list)
    checkpoint_dir: Path | None = None
    group_names: list[str] = field(default_factory=list)
    runtime_s: float = 0.0
    world_size: int = 1


@dataclass(frozen=True)
class FaultInjection:
    """Kill one worker abruptly (``os._exit``) once, to exercise restarts in tests/benchmarks.

    The worker of ``rank`` dies right after step ``step`` of ``epoch`` unless ``marker``
    exists; it creates ``marker`` first, so the restarted run goes through.
    """

    rank: int
    epoch: int
    step: int
    marker: Path

    @classmethod
    def parse(cls, spec: str) -> FaultInjection:
        """``"RANK:EPOCH:STEP:MARKER_PATH"`` (the ``SCPROTO_FAULT_INJECTION`` variable)."""
        rank, epoch, step, marker = spec.split(":", 3)
        return cls(int(rank), int(epoch), int(step), Path(marker))

    def maybe_fire(self, rank: int, epoch: int, step: int) -> None:
        if (rank, epoch, step) == (self.rank, self.epoch, self.step) and not self.marker.exists():
            self.marker.touch()
            log.warning("fault injection: rank %d exits at epoch %d step %d", rank, epoch, step)
            os._exit(17)


def build_loader(
    store: CellStore, prepared: Prepared, cfg: TrainConfig, seed: int, rank: int = 0,
    world_size: int = 1,
) -> tuple[ViewLoader, list[str]]:
    """Sampler (study-stratified; small studies merged or dropped) and loader over the store."""
    src = prepared.loader_source(store)  # the locality-ordered training cache, if prepared
    groups, names = merge_small_studies(src.study, prepared.studies, cfg.min_cells_per_study,
                                        cfg.small_studies)
    if cfg.n_views - 1 > prepared.knn_indices.shape[1]:
        raise ScprotoInputError(
            f"train.n_views={cfg.n_views} needs ≥ {cfg.n_views - 1} neighbours; the KNN table "
            f"has {prepared.knn_indices.shape[1]} (prepare.n_neighbors)")
    sampler = StudyStratifiedSampler(groups, cfg.batch_size, cfg.min_cells_per_study,
                                     cfg.study_alpha, seed, rank, world_size,
                                     block_size=src.block_size)
    prefetch = cfg.prefetch
    if prefetch is None:  # on two cores a loader thread slows the torch step more than it saves
        prefetch = 0 if usable_cpus() <= 2 else 2
    snn = None
    if cfg.neighbor_weighting == "snn":  # an input artefact: computed once, beside the KNN table
        name = "cache_knn_snn.npy" if prepared.has_cache else "knn_snn.npy"
        snn = cached_snn_jaccard(prepared.path / name, src.knn_indices, src.cells)
    loader = ViewLoader(
        src.store, src.cells, src.knn_indices, src.knn_distances, src.library_size,
        src.condition, src.gene_columns, sampler, cfg.n_views,
        cfg.neighbor_weighting, seed, prefetch=prefetch, snn_weights=snn,
        snn_prune=cfg.snn_prune,
    )
    return loader, names


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    # rank 0 keeps the single-process stream, so one-worker results do not depend on DDP
    key = [seed, epoch, 0x70C4, *([rank] if rank else [])]
    return int(np.random.default_rng(key).integers(2**62))


def _model_signature(model_cfg: ModelConfig, prepared: Prepared) -> dict:
    # the prepare settings too: a checkpoint trained on another KNN graph or cell set is stale
    return {"model": model_cfg.model_dump(), "genes": prepared.genes, "studies": prepared.studies,
            "prepare": {"config": prepared.meta.get("config"), "seed": prepared.meta.get("seed"),
                        "n_cells": len(prepared.cells)}}


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; all cores where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads() -> int:
    """Torch threads of one worker: ``OMP_NUM_THREADS`` when set, else the CPUs this process
    may run on shared among the workers of this node (torchrun sets ``LOCAL_WORLD_SIZE``).

    ``OMP_NUM_THREADS`` wins because a user who sets it shares the cores with other jobs: two
    processes whose OpenMP pools each span every core spin-wait on each other (measured on the
    2-core box: Kang 8 donors trained 6 × slower beside a second job).
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) %
                            torch.cuda.device_count())
    return torch.device("cpu")


def prototype_perplexity(usage: torch.Tensor) -> float:
    """``exp(H)`` of the prototype assignment frequencies: the effective number of prototypes."""
    p = usage.double() / max(int(usage.sum()), 1)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def mean_resultant_length(x_unit: torch.Tensor) -> float:
    """``‖mean_i x_i‖`` of ``(n, d)`` unit vectors (directional statistics' R̄), in [0, 1].

    1 means every cell's embedding points the same way: the normalised embedding has collapsed
    onto one direction and no prototype bank can tell the cells apart; a spread embedding is
    far below 1. Nearest-prototype usage is only meaningful when this is well below 1.
    """
    x = torch.as_tensor(x_unit, dtype=torch.float64)
    return float(x.mean(dim=0).norm()) if len(x) else float("nan")


def cell_prototype_usage(prototype: np.ndarray, x_unit: np.ndarray,
                         n_prototypes: int) -> dict[str, float]:
    """How an atlas's cells use its prototypes: ``perplexity`` and ``used`` of the ``(n,)``
    nearest-prototype ids, and the ``mean_resultant`` of the ``(n, d)`` unit embeddings."""
    usage = torch.bincount(torch.from_numpy(np.asarray(prototype, dtype=np.int64)),
                           minlength=n_prototypes)
    return {"perplexity": round(prototype_perplexity(usage), 1), "used": int((usage > 0).sum()),
            "mean_resultant": round(mean_resultant_length(torch.from_numpy(x_unit)), 3)}


# Trained atlases sit far below this (Kang 8 donors 0.60, the 9-type synthetic set 0.50–0.86);
# collapsed runs measured 0.99–1.000 (README, "Known limitation: prototype usage").
COLLAPSED_RESULTANT = 0.98


def collapse_message(usage: dict[str, float], n_prototypes: int) -> str | None:
    """A warning text when ``usage`` (:func:`cell_prototype_usage`) shows a collapsed embedding.

    Collapsed means the mean resultant length of the unit embeddings is ≥
    :data:`COLLAPSED_RESULTANT`: every cell points nearly the same way, so nearest prototypes,
    metacells and any score read from the embedding say little. Returns None otherwise.
    """
    if not usage["mean_resultant"] >= COLLAPSED_RESULTANT:
        return None
    return (f"scProto embedding collapsed: the cells' unit embeddings have mean resultant "
            f"length {usage['mean_resultant']:.3f} (≥ {COLLAPSED_RESULTANT}: nearly one "
            f"direction) and use {usage['used']} of {n_prototypes} prototypes. Train longer, "
            f"lower train.lr, or give each study group more cells per step than it has cell "
            f"states (README, \"Known limitation: prototype usage\").")


@dataclass
class _Progress:
    """Position in the run and the running sums of the current epoch (per rank)."""

    epoch: int = 0
    step: int = 0
    sums: dict = field(default_factory=lambda: dict.fromkeys(LOSS_TERMS, 0.0))
    usage: torch.Tensor | None = None
    data_wait_s: float = 0.0
    compute_s: float = 0.0


def train(
    store: CellStore, prepared: Prepared, model_cfg: ModelConfig, train_cfg: TrainConfig,
    checkpoint_dir: str | Path, seed: int = 0, resume: bool = False,
    console: Console | None = None, resume_from: Path | None = None,
    on_checkpoint: CheckpointHook | None = None, device: torch.device | None = None,
    fault: FaultInjection | None = None,
) -> TrainResult:
    """Train scProto on the prepared store (one worker of ``dist.world_size()``).

    Args:
        store: the counts.
        prepared: HVGs, KNN table, library sizes, study codes (:func:`prepare`).
        model_cfg, train_cfg: configuration (``train_cfg.batch_size`` is per worker).
        checkpoint_dir: rank 0 writes a checkpoint per epoch (and every
            ``checkpoint_every_steps`` steps) here.
        seed: seeds prototypes, sampler, views, dropout and reparameterisation noise.
        resume: continue from the latest checkpoint in ``checkpoint_dir``; one written with
            another model config, gene or study list or prepare config is moved to
            ``checkpoint_dir/stale`` with a warning and training starts afresh.
        console: rich console for the progress bar (rank 0 only).
        resume_from: continue from this checkpoint file (Ray's restored checkpoint); raises
            :class:`ScprotoInputError` when it was written with other settings.
        on_checkpoint: called on every rank after each checkpoint (Ray reports through it).
        device: default ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
        fault: kill this worker once at a given step (tests of the restart path).

    Returns:
        :class:`TrainResult` (the model on CPU, in eval mode).

    Raises:
        ScprotoInputError: resuming from a checkpoint of another model, genes or studies, or
            mid-epoch with another world size; workers that disagree on config, genes,
            prototype count or steps per epoch (on every rank, before any training step).
        FloatingPointError: a non-finite loss on any rank (names epoch and step; every rank).
    """
    t0 = time.perf_counter()
    rank, world = dist.rank(), dist.world_size()
    # Always set: results depend on the thread count, and other libraries change it behind our
    # back (numba's OpenMP layer, used by UMAP in evaluation, resets the shared OpenMP pool).
    torch.set_num_threads(train_cfg.num_threads or default_threads())
    device = device or _default_device()
    if train_cfg.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Multi-threaded index/scatter backward kernels sum in a varying order (~1e-8 drift per
    # run); deterministic kernels make reruns and resumed runs bit-identical.
    torch.use_deterministic_algorithms(train_cfg.deterministic, warn_only=device.type == "cuda")
    checkpoint_dir = Path(checkpoint_dir)
    loader, group_names = build_loader(store, prepared, train_cfg, seed, rank, world)
    signature = _model_signature(model_cfg, prepared)
    ckpt_path = resume_from or (latest_checkpoint(checkpoint_dir) if resume else None)
    stale = resume_from is None and ckpt_path is not None and (
        load_checkpoint(ckpt_path)["signature"] != signature)
    if stale:  # like prepare: other settings → recompute, never continue someone else's run
        ckpt_path = None
    dist.check_consistent({
        "checkpoint to resume from": ckpt_path.name if ckpt_path is not None else None,
        "model config": signature["model"], "train config": train_cfg.model_dump(),
        "gene list": signature["genes"], "study list": signature["studies"],
        "prototype count": model_cfg.n_prototypes, "seed": seed,
        "steps per epoch": len(loader),
    })
    if stale and rank == 0:
        set_aside = set_aside_checkpoints(checkpoint_dir)
        warnings.warn(f"checkpoints in {checkpoint_dir} were trained with other settings "
                      f"(model, genes, studies or prepare); moved to {set_aside}, training "
                      "from scratch", UserWarning, stacklevel=2)
    torch.manual_seed(seed)
    model = ScProto(len(prepared.genes), len(prepared.studies), model_cfg, seed=seed).to(device)
    optimizer = build_optimizer(model, train_cfg)
    queue = (StudyQueue(len(group_names), model_cfg.queue_length, model_cfg.latent_dim)
             if model_cfg.queue_length else None)
    history: list[dict] = []
    pos = _Progress(usage=torch.zeros(model_cfg.n_prototypes, dtype=torch.long))
    if ckpt_path is not None:
        history = _restore(ckpt_path, signature, model, optimizer, queue, pos, rank, world,
                           device)
    step_model: torch.nn.Module = model
    if world > 1:
        # mse has no dispersion: its θ never gets a gradient
        step_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=model_cfg.likelihood == "mse")
    if train_cfg.compile:
        step_model = torch.compile(step_model)
    bf16 = train_cfg.precision == "bf16" or (train_cfg.precision == "auto" and device.type == "cuda")
    # bf16 is a GPU path: CPU oneDNN bf16 kernels fail or crash on some machines (this one)
    if bf16 and not (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        raise ScprotoInputError(
            f"train.precision=bf16 needs a GPU with bf16 support; training runs on {device}: "
            "use precision=auto or fp32")

    steps_per_epoch = len(loader)
    acc = train_cfg.accumulate_steps
    opt_steps_per_epoch = math.ceil(steps_per_epoch / acc)
    total_opt_steps = opt_steps_per_epoch * train_cfg.epochs
    warmup_opt_steps = opt_steps_per_epoch * train_cfg.warmup_epochs
    anchors_per_step = train_cfg.batch_size * world

    def checkpoint(epoch: int, step: int | None, record: dict) -> None:
        """Gather per-rank state, rank 0 writes, then every rank runs the hook."""
        per_rank = dist.all_gather_object({
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "queue": queue.state_dict() if queue is not None else None,
            "sums": dict(pos.sums), "usage": pos.usage.clone(),
        })
        path = None
        if rank == 0:
            path = save_checkpoint(checkpoint_dir, epoch, {
                "epoch": epoch, "step": step, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "history": history,
                "signature": signature, "seed": seed, "world_size": world,
                "train_config": train_cfg.model_dump(), "group_names": group_names,
                "ranks": per_rank,
            }, step=step)
        dist.barrier()
        if on_checkpoint is not None:
            on_checkpoint(path, record)

    console = console or Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
        MofNCompleteColumn(), TextColumn("{task.fields[losses]}"), TimeElapsedColumn(),
        console=console, disable=not train_cfg.progress or rank != 0, transient=False,
    )
    with progress:
        task = progress.add_task(
            "train", total=steps_per_epoch * train_cfg.epochs,
            completed=pos.epoch * steps_per_epoch + pos.step, epoch=pos.epoch,
            epochs=train_cfg.epochs, losses="")
        for epoch in range(pos.epoch, train_cfg.epochs):
            if pos.step == 0:  # a fresh epoch (a mid-epoch resume restored the RNG instead)
                torch.manual_seed(_epoch_seed(seed, epoch, rank))
            model.train()
            beta = model_cfg.kl_weight
            if model_cfg.kl_anneal_epochs:
                beta *= min(1.0, epoch / model_cfg.kl_anneal_epochs)
            epoch_t0 = time.perf_counter()
            start_step = pos.step
            batches = loader.epoch(epoch, start_step)
            for step in range(start_step, steps_per_epoch):
                t_wait = time.perf_counter()
                batch = next(batches)
                if device.type == "cuda":
                    batch = batch.pin_memory()
                batch = batch.to(device, non_blocking=True)
                t_step = time.perf_counter()
                pos.data_wait_s += t_step - t_wait
                micro = step % acc
                last_micro = micro == acc - 1 or step == steps_per_epoch - 1
                if micro == 0:
                    for g in optimizer.param_groups:
                        g["lr"] = lr_at(epoch * opt_steps_per_epoch + step // acc,
                                        total_opt_steps, warmup_opt_steps, train_cfg.lr,
                                        train_cfg.final_lr_fraction)
                    model.prototypes.normalize_()
                    optimizer.zero_grad(set_to_none=True)
                n_micro = min(acc, steps_per_epoch - (step - micro))
                sync = (contextlib.nullcontext() if world == 1 or last_micro
                        else step_model.no_sync())
                with sync:
                    out = step_model(batch, kl_weight=beta, queue=queue,
                                     use_queue=epoch >= model_cfg.queue_start_epoch,
                                     amp_dtype=torch.bfloat16 if bf16 else None)
                    # the ranks' mean loss terms: one small all-reduce and one device sync;
                    # every rank sees the same values, so a NaN stops all of them together
                    terms = torch.stack([out[k].detach().float() for k in LOSS_TERMS])
                    values = dict(zip(LOSS_TERMS, (dist.all_reduce_sum(terms) / world).tolist(),
                                      strict=True))
                    if not all(math.isfinite(v) for v in values.values()):
                        raise FloatingPointError(
                            f"non-finite loss at epoch {epoch} step {step}: " + ", ".join(
                                f"{k}={v:.4g}" for k, v in values.items()))
                    (out["loss"] / n_micro).backward()
                if last_micro:
                    if epoch * opt_steps_per_epoch + step // acc < train_cfg.freeze_prototypes_steps:
                        model.prototypes.weight.grad = None
                    optimizer.step()
                pos.usage += torch.bincount(out["assign"].cpu(), minlength=len(pos.usage))
                for k, v in values.items():
                    pos.sums[k] += v
                pos.step = step + 1
                pos.compute_s += time.perf_counter() - t_step
                progress.update(task, advance=1, epoch=epoch + 1,
                                losses=" ".join(f"{k}={v:.3f}" for k, v in values.items()))
                every = train_cfg.checkpoint_every_steps
                if every and pos.step % every == 0 and last_micro and pos.step < steps_per_epoch:
                    checkpoint(epoch, pos.step, {"epoch": epoch, "step": pos.step, **values})
                if fault is not None:
                    fault.maybe_fire(rank, epoch, step)
            model.prototypes.normalize_()
            usage = dist.all_reduce_sum(pos.usage.clone())
            wait = dist.all_reduce_max(torch.tensor([pos.data_wait_s, pos.compute_s]))
            elapsed = time.perf_counter() - epoch_t0
            record = {"epoch": epoch, **{k: v / steps_per_epoch for k, v in pos.sums.items()},
                      "lr": optimizer.param_groups[0]["lr"],
                      "prototypes_used": int((usage > 0).sum()),
                      "prototype_perplexity": round(prototype_perplexity(usage), 2),
                      "anchor_cells_per_s": round(
                          anchors_per_step * (steps_per_epoch - start_step) / elapsed, 1),
                      "data_wait_fraction": round(float(wait[0] / wait.sum().clamp(min=1e-9)), 4),
                      "world_size": world}
            history.append(record)
            pos.epoch, pos.step = epoch + 1, 0
            pos.sums, pos.data_wait_s, pos.compute_s = dict.fromkeys(LOSS_TERMS, 0.0), 0.0, 0.0
            pos.usage.zero_()
            checkpoint(epoch, None, record)
            if rank == 0 and not console.is_terminal and train_cfg.progress:  # batch jobs
                console.log(f"epoch {epoch + 1}/{train_cfg.epochs} " + " ".join(
                    f"{k}={record[k]:.3f}" for k in LOSS_TERMS)
                    + f" prototypes_used={record['prototypes_used']}")
            log.info("epoch %d: %s", epoch, record)
    model.cpu().eval()
    return TrainResult(model, history, checkpoint_dir, group_names,
                       runtime_s=time.perf_counter() - t0, world_size=world)


def _restore(path: Path, signature: dict, model: ScProto, optimizer: torch.optim.Optimizer,
             queue: StudyQueue | None, pos: _Progress, rank: int, world: int,
             device: torch.device) -> list[dict]:
    """Load a checkpoint into the model, optimiser, queue and position; returns the history."""
    ckpt = load_checkpoint(path)
    if ckpt["signature"] != signature:
        raise ScprotoInputError(
            f"cannot resume from {path}: it was trained with another model config, gene list "
            "or study list")
    model.load_state_dict({k: v.to(device) for k, v in ckpt["model"].items()})
    optimizer.load_state_dict(ckpt["optimizer"])
    mine = ckpt["ranks"][rank] if ckpt["world_size"] == world else None
    if ckpt["step"] is None:
        pos.epoch, pos.step = ckpt["epoch"] + 1, 0
    else:
        if mine is None:
            raise ScprotoInputError(
                f"cannot resume mid-epoch from {path} with {world} workers: it was written by "
                f"{ckpt['world_size']} (the sampler's partition depends on it); resume from an "
                "epoch checkpoint instead")
        pos.epoch, pos.step = ckpt["epoch"], ckpt["step"]
        pos.sums, pos.usage = dict(mine["sums"]), mine["usage"].clone()
        torch.set_rng_state(mine["torch_rng"])
        if mine["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], device)
    if queue is not None:
        if mine is not None and mine["queue"] is not None:
            queue.load_state_dict(mine["queue"])
        else:
            log.warning("queue not restored from %s (written by %d workers, now %d): it refills",
                        path, ckpt["world_size"], world)
    log.info("resuming from %s (epoch %d, step %s)", path, ckpt["epoch"], ckpt["step"])
    return list(ckpt["history"])
