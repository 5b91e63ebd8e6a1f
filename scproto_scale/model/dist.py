"""The only door from the model and the loop to torch.distributed: no-ops on a single process.

Whoever launched the workers (torchrun, Ray Train, a test's spawn) initialises the process
group; this module only asks whether there is one.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as tdist

from scproto_scale.errors import ScprotoInputError


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (identity on one process); returns ``t``."""
    if is_distributed():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``t`` over ranks in place (identity on one process)."""
    if is_distributed():
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` (``[obj]`` on one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def check_consistent(what: dict[str, Any]) -> None:
    """Fail fast, on every rank, when ranks disagree on any entry of ``what``.

    Every rank calls this with the same keys (config, gene list, prototype count, steps per
    epoch…); a disagreement otherwise surfaces as a hang in the first mismatched collective.

    Raises:
        ScprotoInputError: naming the first differing key and the ranks' values (on all ranks).
    """
    gathered = all_gather_object({k: json.dumps(v, sort_keys=True, default=str)
                                  for k, v in what.items()})
    for key in what:
        values = [g[key] for g in gathered]
        if any(v != values[0] for v in values):
            diff = [(r, v if len(v) < 200 else v[:200] + "…") for r, v in enumerate(values)
                    if v != values[0]]
            raise ScprotoInputError(
                f"distributed workers disagree on {key!r}: rank 0 has {values[0][:200]}, "
                + ", ".join(f"rank {r} has {v}" for r, v in diff))
