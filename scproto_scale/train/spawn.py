"""Run a function on W local processes joined in a gloo process group.

The cheap way to exercise the distributed code paths (all-reduces inside Sinkhorn, DDP,
rank-0 checkpoints) on one CPU machine: tests and ``benchmarks/distributed.py`` use it; jobs
use ``torchrun`` or Ray Train (:mod:`scproto_scale.train.launch`).
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

_ERROR = "__scproto_rank_error__"


class RankError(RuntimeError):
    """An exception raised on one rank, carried back to the parent by :func:`run_ranks`."""

    def __init__(self, rank: int, kind: str, message: str, tb: str):
        super().__init__(f"rank {rank} raised {kind}: {message}")
        self.rank, self.kind, self.message, self.traceback = rank, kind, message, tb


def _entry(rank: int, world: int, init_file: str, out_dir: str, timeout_s: float,
           threads: int, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(threads)
    os.environ["LOCAL_WORLD_SIZE"] = str(world)  # as torchrun: workers share the node's cores
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                             world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result: Any = fn(*args)
    except Exception as e:  # carried to the parent, which decides what a failure means
        result = {_ERROR: (rank, type(e).__name__, str(e), traceback.format_exc())}
    finally:
        tdist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank_{rank}.pt")


def run_ranks(fn: Callable, world_size: int, *args, timeout_s: float = 120.0,
              threads: int = 1, raise_errors: bool = True) -> list[Any]:
    """Call ``fn(*args)`` on ``world_size`` spawned processes sharing a gloo process group.

    Args:
        fn: a module-level (picklable) function; it may use :mod:`scproto_scale.model.dist`.
        world_size: number of ranks.
        timeout_s: collective timeout (a rank waiting longer raises instead of hanging).
        threads: torch threads per rank.
        raise_errors: raise the first rank's error; otherwise return :class:`RankError` s.

    Returns:
        ``[result of rank 0, result of rank 1, …]`` (results must be picklable by torch.save).

    Raises:
        RankError: a rank raised (with ``raise_errors``).
    """
    with tempfile.TemporaryDirectory(prefix="scproto-ranks-") as tmp:
        init_file = Path(tmp) / "init"
        mp.start_processes(_entry, args=(world_size, str(init_file), tmp, timeout_s, threads,
                                         fn, args),
                           nprocs=world_size, join=True, start_method="spawn")
        results = [torch.load(Path(tmp) / f"rank_{r}.pt", weights_only=False)
                   for r in range(world_size)]
    results = [RankError(*r[_ERROR]) if isinstance(r, dict) and _ERROR in r else r
               for r in results]
    errors = [r for r in results if isinstance(r, RankError)]
    if errors and raise_errors:
        raise errors[0]
    return results
