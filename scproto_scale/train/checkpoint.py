"""Per-epoch training checkpoints, written atomically; the latest one resumes a run."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_NAME = re.compile(r"epoch_(\d+)\.pt$")


def save_checkpoint(directory: Path, epoch: int, state: dict, keep: int = 2) -> Path:
    """Write ``state`` as ``epoch_NNNN.pt`` (temporary name, then rename); keep the last ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"epoch_{epoch:04d}.pt"
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(directory.glob("epoch_*.pt"))[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint of the highest completed epoch in ``directory``, or None."""
    if not directory.exists():
        return None
    found = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.search(p.name)))
    return found[-1][1] if found else None


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (CPU tensors)."""
    return torch.load(path, map_location="cpu", weights_only=False)
