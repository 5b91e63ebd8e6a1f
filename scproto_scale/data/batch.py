"""The unit the loader hands to the model: V views of B anchor cells as torch tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ViewBatch:
    """One training step's input: ``V`` views of ``B`` anchor cells.

    Attributes:
        counts: ``(V, B, G)`` float32 counts of the model genes (view 0 = anchor).
        library: ``(V, B)`` float32 total counts over all genes.
        condition: ``(V, B)`` int64 study code of each view's own cell.
        group: ``(B,)`` int64 SwAV group (the anchor's study group).
        group_ids: the step's groups, in the sampler's order (identical on every rank).
    """

    counts: torch.Tensor
    library: torch.Tensor
    condition: torch.Tensor
    group: torch.Tensor
    group_ids: list[int]

    def pin_memory(self) -> ViewBatch:
        """Page-locked copies, so the host→GPU copy can overlap compute (``non_blocking``)."""
        return ViewBatch(self.counts.pin_memory(), self.library.pin_memory(),
                         self.condition.pin_memory(), self.group.pin_memory(), self.group_ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ViewBatch:
        return ViewBatch(
            self.counts.to(device, non_blocking=non_blocking),
            self.library.to(device, non_blocking=non_blocking),
            self.condition.to(device, non_blocking=non_blocking),
            self.group.to(device, non_blocking=non_blocking), self.group_ids,
        )
