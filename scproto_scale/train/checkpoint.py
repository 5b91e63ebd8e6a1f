"""Training checkpoints, written atomically; the latest one resumes a run.

``epoch_NNNN.pt`` holds the state after epoch NNNN is complete; ``epoch_NNNN_step_SSSSSSS.pt``
the state after the first SSSSSSS steps of epoch NNNN (mid-epoch, ``train.checkpoint_every_steps``).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import torch

_NAME = re.compile(r"^epoch_(\d+)(?:_step_(\d+))?\.pt$")


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    """File name of the state after ``step`` steps of ``epoch`` (None: the whole epoch)."""
    return f"epoch_{epoch:04d}.pt" if step is None else f"epoch_{epoch:04d}_step_{step:07d}.pt"


def _position(path: Path) -> tuple[int, float] | None:
    m = _NAME.match(path.name)
    if m is None:
        return None
    return int(m.group(1)), (math.inf if m.group(2) is None else int(m.group(2)))


def save_checkpoint(directory: Path, epoch: int, state: dict, keep: int = 2,
                    step: int | None = None) -> Path:
    """Write ``state`` (temporary name, then rename) and keep the ``keep`` latest checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint_name(epoch, step)
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    found = sorted((pos, p) for p in directory.iterdir() if (pos := _position(p)) is not None)
    for _, old in found[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    """The most advanced checkpoint in ``directory`` (by epoch, then step), or None."""
    if not directory.exists():
        return None
    found = sorted((pos, p) for p in directory.iterdir() if (pos := _position(p)) is not None)
    return found[-1][1] if found else None


def set_aside_checkpoints(directory: Path) -> Path:
    """Move every checkpoint of ``directory`` into ``directory/stale`` (replacing an older set)
    so a fresh run neither resumes from nor is pruned in favour of them; returns that folder."""
    stale = directory / "stale"
    shutil.rmtree(stale, ignore_errors=True)
    stale.mkdir(parents=True)
    for p in directory.iterdir():
        if _position(p) is not None:
            os.replace(p, stale / p.name)
    return stale


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (CPU tensors)."""
    return torch.load(path, map_location="cpu", weights_only=False)
