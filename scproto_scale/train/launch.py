"""Launchers: in-process, ``torchrun`` and Ray Train, all running :func:`run_worker`.

- ``local``: one worker in this process.
- ``torchrun``: this process is one of ``WORLD_SIZE`` ranks started by ``torchrun``; the
  process group is initialised here from the environment (gloo on CPU, NCCL on GPU).
- ``ray``: a Ray Train ``TorchTrainer`` with ``distributed.workers`` actors (one GPU each when
  ``use_gpu``); Ray sets up the process group, persists the checkpoints reported after every
  epoch (and mid-epoch ones) to ``storage_path``, and restarts the worker group from the latest
  one after a failure, up to ``max_failures`` times.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as tdist
from rich.console import Console

from scproto_scale.config import DistributedConfig
from scproto_scale.errors import ScprotoInputError
from scproto_scale.model import dist
from scproto_scale.model.scproto import ScProto
from scproto_scale.prepare.artefacts import Prepared
from scproto_scale.train.checkpoint import latest_checkpoint, load_checkpoint
from scproto_scale.train.loop import TrainResult
from scproto_scale.train.worker import TrainJob, run_worker

log = logging.getLogger(__name__)
FAULT_ENV = "SCPROTO_FAULT_INJECTION"


def resolve_launcher(cfg: DistributedConfig) -> str:
    """``"local"``, ``"torchrun"`` or ``"ray"`` for this process (see :class:`DistributedConfig`).

    Raises:
        ScprotoInputError: ``launcher="torchrun"`` outside torchrun.
    """
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cfg.launcher == "torchrun" and not under_torchrun:
        raise ScprotoInputError(
            "distributed.launcher=torchrun but this process was not started by torchrun "
            "(WORLD_SIZE unset or 1); run `torchrun --nproc_per_node N -m scproto_scale.cli …`")
    if cfg.launcher != "auto":
        return cfg.launcher
    if under_torchrun:
        return "torchrun"
    return "ray" if cfg.workers > 1 or cfg.ray_address else "local"


def _use_gpu(cfg: DistributedConfig) -> bool:
    """``distributed.use_gpu``, by default whether this machine has CUDA."""
    return cfg.use_gpu if cfg.use_gpu is not None else torch.cuda.is_available()


def _require_local_gpu(cfg: DistributedConfig) -> None:
    if cfg.use_gpu and not torch.cuda.is_available():
        raise ScprotoInputError("distributed.use_gpu=true but CUDA is not available here")


def _backend(cfg: DistributedConfig, use_gpu: bool) -> str:
    return cfg.backend if cfg.backend != "auto" else ("nccl" if use_gpu else "gloo")


@contextlib.contextmanager
def torchrun_group(cfg: DistributedConfig) -> Iterator[tdist.ProcessGroup | None]:
    """Initialise the default process group from torchrun's environment; destroy it at exit.

    Yields a second gloo group with a day-long timeout for waiting on rank 0's ingest and
    prepare stages, which can outlast ``timeout_s`` (the limit for training collectives).
    """
    _require_local_gpu(cfg)
    use_gpu = _use_gpu(cfg)
    if use_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    tdist.init_process_group(_backend(cfg, use_gpu),
                             timeout=datetime.timedelta(seconds=cfg.timeout_s))
    try:
        yield tdist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
    finally:
        tdist.destroy_process_group()


def launch(job: TrainJob, cfg: DistributedConfig, storage_path: str | Path,
           console: Console | None = None) -> TrainResult:
    """Train with the launcher :func:`resolve_launcher` picks.

    Args:
        job: the training job (every worker gets a copy).
        cfg: workers, Ray address, GPUs, failure policy.
        storage_path: Ray run storage when ``cfg.storage_path`` is unset.
        console: progress output (rank 0).

    Returns:
        :class:`TrainResult` on every rank (the trained model is the same on all ranks).

    Raises:
        ScprotoInputError: Ray cannot start or connect, too few CPUs/GPUs for the requested
            workers, workers disagree on config/genes/prototypes, or a worker failed for good.
    """
    if os.environ.get(FAULT_ENV):
        job = dataclasses.replace(job, fault_injection=os.environ[FAULT_ENV])
    mode = resolve_launcher(cfg)
    if mode == "ray":
        return launch_ray(job, cfg, cfg.storage_path or str(storage_path))
    if mode == "local":
        _require_local_gpu(cfg)
    return run_worker(job, console=console)


def launch_ray(job: TrainJob, cfg: DistributedConfig, storage_path: str) -> TrainResult:
    """Run ``job`` on ``cfg.workers`` Ray Train workers; see the module docstring."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as e:
        raise ScprotoInputError(
            f"distributed training with Ray needs ray[train] ({e}); install the "
            "`distributed` extra: pip install 'scproto-scale[distributed]'") from None
    use_gpu = _use_gpu(cfg)
    if job.train.num_threads is None:  # one torch thread pool per worker, sized to its CPUs
        job = dataclasses.replace(job, train=job.train.model_copy(
            update={"num_threads": max(1, int(cfg.cpus_per_worker))}))
    name = "scproto_train"
    storage = Path(storage_path).absolute()
    if not job.resume:  # a Ray run of the same name restores its last checkpoint: start clean
        shutil.rmtree(storage / name, ignore_errors=True)
    started, driver_print = False, builtins.print
    try:
        if not ray.is_initialized():
            _preflight(cfg.ray_address)
            try:
                ray.init(address=cfg.ray_address, include_dashboard=False,
                         log_to_driver=True, configure_logging=False)
            except Exception as e:  # ConnectionError, RuntimeError, ValueError, timeouts…
                raise ScprotoInputError(
                    f"could not {'connect to the Ray cluster at ' + repr(cfg.ray_address) if cfg.ray_address else 'start a local Ray instance'}: "
                    f"{type(e).__name__}: {e}") from None
            started = True
        _check_resources(ray.cluster_resources(), cfg, use_gpu)
        resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        trainer = TorchTrainer(
            _ray_worker_main, train_loop_config={"job": job},
            torch_config=TorchConfig(backend=_backend(cfg, use_gpu), timeout_s=cfg.timeout_s),
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=name, storage_path=str(storage),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise ScprotoInputError(f"Ray training failed: {_root_message(e)}") from e
        if result.checkpoint is None:
            raise ScprotoInputError(f"Ray training finished without a checkpoint in {storage}")
        with result.checkpoint.as_directory() as d:
            return _result_from_checkpoint(latest_checkpoint(Path(d)), job, cfg.workers)
    finally:
        if started:
            ray.shutdown()
        # Ray Train swaps builtins.print for its log redirection; numba-compiled code (UMAP's
        # nearest-neighbour descent, in evaluation) then fails to type `print`
        builtins.print = driver_print


def _preflight(address: str | None, timeout_s: float = 10.0) -> None:
    """Refuse an unreachable ``host:port`` at once (``ray.init`` retries it for minutes)."""
    if not address or address == "auto" or "://" in address or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise ScprotoInputError(
            f"cannot reach the Ray cluster at {address!r} ({type(e).__name__}: {e}); is "
            "`ray start --head` running there, and is the port open?") from None


def _check_resources(have: dict, cfg: DistributedConfig, use_gpu: bool) -> None:
    """Refuse what Ray would otherwise wait for forever (it queues unsatisfiable actors)."""
    need_cpu = cfg.workers * cfg.cpus_per_worker
    if have.get("CPU", 0) < need_cpu:
        raise ScprotoInputError(
            f"{cfg.workers} workers × {cfg.cpus_per_worker} CPUs need {need_cpu} CPUs; the Ray "
            f"cluster has {have.get('CPU', 0)} (lower distributed.cpus_per_worker or workers)")
    if use_gpu and have.get("GPU", 0) < cfg.workers:
        raise ScprotoInputError(
            f"distributed.use_gpu=true needs {cfg.workers} GPUs; the Ray cluster has "
            f"{int(have.get('GPU', 0))}")


def _root_message(e: BaseException) -> str:
    """The innermost worker error's message (Ray wraps it in several layers)."""
    seen = e
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return f"{type(seen).__name__}: {seen}" if seen is not e else str(e)


def _result_from_checkpoint(path: Path | None, job: TrainJob, world: int) -> TrainResult:
    if path is None:
        raise ScprotoInputError("Ray reported a checkpoint without a scProto checkpoint file")
    ckpt = load_checkpoint(path)
    prepared = Prepared.load(job.prepared_path)
    model = ScProto(len(prepared.genes), len(prepared.studies), job.model, seed=job.seed)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return TrainResult(model, ckpt["history"], Path(job.checkpoint_dir), ckpt["group_names"],
                       world_size=world)


def _ray_worker_main(config: dict) -> None:
    """Body of every Ray Train worker: restore Ray's latest checkpoint, train, report."""
    import ray.train
    import ray.train.torch

    job: TrainJob = config["job"]
    scratch = Path(tempfile.mkdtemp(prefix="scproto-ray-"))
    try:
        resume_from = None
        restored = ray.train.get_checkpoint()
        if restored is not None:  # a restart after a failure (or a resumed driver)
            with restored.as_directory() as d:
                found = latest_checkpoint(Path(d))
                if found is not None:
                    resume_from = Path(shutil.copy2(found, scratch / found.name))

        def report(path: Path | None, record: dict) -> None:
            metrics = {k: v for k, v in record.items() if isinstance(v, int | float)}
            if path is None:
                ray.train.report(metrics)
                return
            with tempfile.TemporaryDirectory(dir=scratch) as tmp:
                shutil.copy2(path, Path(tmp) / path.name)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

        run_worker(job, resume_from=resume_from, on_checkpoint=report,
                   device=ray.train.torch.get_device(),
                   console=Console(stderr=True) if dist.rank() == 0 else None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
