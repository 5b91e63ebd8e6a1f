"""The per-worker training loop: sampler → loader → scProto → optimiser, checkpoint each epoch.

Single process here; the loop only talks to the model, the loader and the checkpoint
directory, so DDP / Ray launchers wrap it without changing it (the sampler already takes
rank and world size).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from scproto_scale.config import ModelConfig, TrainConfig
from scproto_scale.data.loader import ViewLoader
from scproto_scale.data.sampler import StudyStratifiedSampler, merge_small_studies
from scproto_scale.data.store import CellStore
from scproto_scale.errors import ScprotoInputError
from scproto_scale.model.scproto import ScProto
from scproto_scale.model.swav import StudyQueue
from scproto_scale.prepare.artefacts import Prepared
from scproto_scale.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from scproto_scale.train.optim import build_optimizer, lr_at

log = logging.getLogger(__name__)
LOSS_TERMS = ("loss", "swav", "prop", "cvae")


@dataclass
class TrainResult:
    """The trained model, per-epoch mean losses and where checkpoints are."""

    model: ScProto
    history: list[dict] = field(default_factory=list)
    checkpoint_dir: Path | None = None
    group_names: list[str] = field(default_factory=list)
    runtime_s: float = 0.0


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
        prefetch = 0 if (os.cpu_count() or 1) <= 2 else 2
    loader = ViewLoader(
        src.store, src.cells, src.knn_indices, src.knn_distances, src.library_size,
        src.condition, src.gene_columns, sampler, cfg.n_views,
        cfg.neighbor_weighting, seed, prefetch=prefetch,
    )
    return loader, names


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch, 0x70C4]).integers(2**62))


def _model_signature(model_cfg: ModelConfig, prepared: Prepared) -> dict:
    return {"model": model_cfg.model_dump(), "genes": prepared.genes, "studies": prepared.studies}


def train(
    store: CellStore, prepared: Prepared, model_cfg: ModelConfig, train_cfg: TrainConfig,
    checkpoint_dir: str | Path, seed: int = 0, resume: bool = False,
    console: Console | None = None,
) -> TrainResult:
    """Train scProto on the prepared store.

    Args:
        store: the counts.
        prepared: HVGs, KNN table, library sizes, study codes (:func:`prepare`).
        model_cfg, train_cfg: configuration.
        checkpoint_dir: one checkpoint per epoch goes here.
        seed: seeds prototypes, sampler, views, dropout and reparameterisation noise.
        resume: continue from the latest checkpoint in ``checkpoint_dir``.
        console: rich console for the progress bar.

    Returns:
        :class:`TrainResult`.

    Raises:
        ScprotoInputError: resuming from a checkpoint of a different model, genes or studies.
        FloatingPointError: a non-finite loss (names epoch and step).
    """
    t0 = time.perf_counter()
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    # Multi-threaded index/scatter backward kernels sum in a varying order (~1e-8 drift per
    # run); deterministic kernels make reruns and resumed runs bit-identical.
    torch.use_deterministic_algorithms(train_cfg.deterministic)
    checkpoint_dir = Path(checkpoint_dir)
    loader, group_names = build_loader(store, prepared, train_cfg, seed)
    torch.manual_seed(seed)
    model = ScProto(len(prepared.genes), len(prepared.studies), model_cfg, seed=seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    optimizer = build_optimizer(model, train_cfg)
    queue = (StudyQueue(len(group_names), model_cfg.queue_length, model_cfg.latent_dim)
             if model_cfg.queue_length else None)
    signature = _model_signature(model_cfg, prepared)
    history: list[dict] = []
    start_epoch = 0
    if resume and (ckpt_path := latest_checkpoint(checkpoint_dir)) is not None:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["signature"] != signature:
            raise ScprotoInputError(
                f"cannot resume from {ckpt_path}: it was trained with another model config, "
                "gene list or study list")
        model.load_state_dict({k: v.to(device) for k, v in ckpt["model"].items()})
        optimizer.load_state_dict(ckpt["optimizer"])
        history = ckpt["history"]
        if queue is not None:
            queue.load_state_dict(ckpt["queue"])
        start_epoch = ckpt["epoch"] + 1
        log.info("resuming from %s (epoch %d done)", ckpt_path, ckpt["epoch"])

    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * train_cfg.epochs
    warmup_steps = steps_per_epoch * train_cfg.warmup_epochs
    console = console or Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
        MofNCompleteColumn(), TextColumn("{task.fields[losses]}"), TimeElapsedColumn(),
        console=console, disable=not train_cfg.progress, transient=False,
    )
    with progress:
        task = progress.add_task("train", total=total_steps, completed=start_epoch * steps_per_epoch,
                                 epoch=start_epoch, epochs=train_cfg.epochs, losses="")
        for epoch in range(start_epoch, train_cfg.epochs):
            torch.manual_seed(_epoch_seed(seed, epoch))
            model.train()
            sums = dict.fromkeys(LOSS_TERMS, 0.0)
            beta = model_cfg.kl_weight
            if model_cfg.kl_anneal_epochs:
                beta *= min(1.0, epoch / model_cfg.kl_anneal_epochs)
            usage = torch.zeros(model_cfg.n_prototypes, dtype=torch.long)
            for step, batch in enumerate(loader.epoch(epoch)):
                batch = batch.to(device, non_blocking=True)
                global_step = epoch * steps_per_epoch + step
                for g in optimizer.param_groups:
                    g["lr"] = lr_at(global_step, total_steps, warmup_steps, train_cfg.lr,
                                    train_cfg.final_lr_fraction)
                model.prototypes.normalize_()
                out = model(batch, kl_weight=beta, queue=queue,
                            use_queue=epoch >= model_cfg.queue_start_epoch)
                if not torch.isfinite(out["loss"]):
                    raise FloatingPointError(
                        f"non-finite loss at epoch {epoch} step {step}: "
                        + ", ".join(f"{k}={out[k].item():.4g}" for k in (*LOSS_TERMS, "recon", "kl")))
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                if global_step < train_cfg.freeze_prototypes_steps:
                    model.prototypes.weight.grad = None
                optimizer.step()
                usage += torch.bincount(out["assign"].cpu(), minlength=len(usage))
                values = {k: out[k].item() for k in LOSS_TERMS}  # one device sync per term
                for k, v in values.items():
                    sums[k] += v
                progress.update(task, advance=1, epoch=epoch + 1,
                                losses=" ".join(f"{k}={v:.3f}" for k, v in values.items()))
            model.prototypes.normalize_()
            record = {"epoch": epoch, **{k: v / steps_per_epoch for k, v in sums.items()},
                      "lr": optimizer.param_groups[0]["lr"],
                      "prototypes_used": int((usage > 0).sum())}
            history.append(record)
            save_checkpoint(checkpoint_dir, epoch, {
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "history": history, "signature": signature, "seed": seed,
                "train_config": train_cfg.model_dump(), "torch_rng": torch.get_rng_state(),
                "queue": queue.state_dict() if queue is not None else None,
            })
            if not console.is_terminal and train_cfg.progress:  # batch jobs: one line per epoch
                console.log(f"epoch {epoch + 1}/{train_cfg.epochs} " + " ".join(
                    f"{k}={record[k]:.3f}" for k in LOSS_TERMS)
                    + f" prototypes_used={record['prototypes_used']}")
            log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in record.items()})
    model.cpu().eval()
    return TrainResult(model, history, checkpoint_dir, group_names,
                       runtime_s=time.perf_counter() - t0)
