"""The prototype head: prototype bank, per-study SwAV loss and propagation loss.

Per-study SwAV (scProto, Hashemi G. et al. 2025, method.md §3): the step's cells are split by
study, Sinkhorn and the swapped-prediction loss run inside every study group, and the group
losses are averaged with equal weight. Equipartition within each study forbids prototypes that
belong to one study.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scproto_scale.model.sinkhorn import hard_codes, sinkhorn


class PrototypeBank(nn.Module):
    """``K`` prototypes on the unit sphere of ``R^d``.

    Args:
        n_prototypes: K.
        dim: d (latent size).
        generator: seeds the random initialisation.
    """

    def __init__(self, n_prototypes: int, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        w = torch.randn(n_prototypes, dim, generator=generator)
        self.weight = nn.Parameter(F.normalize(w, dim=1))

    @torch.no_grad()
    def normalize_(self) -> None:
        """Re-project the prototypes onto the unit sphere (before every step, as SwAV)."""
        self.weight.data = F.normalize(self.weight.data, dim=1)

    def scores(self, z_unit: torch.Tensor) -> torch.Tensor:
        """``(…, d)`` unit embeddings → ``(…, K)`` cosine similarities."""
        return z_unit @ self.weight.t()


def swapped_prediction_loss(
    scores: torch.Tensor, temperature: float = 0.05, epsilon: float = 0.02, n_iters: int = 3,
    hard: bool = True, assign_views: tuple[int, ...] = (0, 1),
) -> torch.Tensor:
    """SwAV swapped prediction for one group of cells.

    Args:
        scores: ``(V, b, K)`` cosine similarities of V views of b cells.
        temperature: τ of the prediction softmax.
        epsilon, n_iters: Sinkhorn settings.
        hard: one-hot codes instead of soft Sinkhorn codes.
        assign_views: the views whose codes are predicted from every other view.

    Returns:
        Scalar: ``−Σ_k q_a^k log softmax(u_v/τ)^k`` averaged over cells, the (V−1) predicting
        views and the assignment views.
    """
    V = scores.shape[0]
    log_p = F.log_softmax(scores / temperature, dim=-1)  # (V, b, K)
    total = scores.new_zeros(())
    for a in assign_views:
        q = sinkhorn(scores[a].detach(), epsilon, n_iters)
        if hard:
            q = hard_codes(q)
        for v in range(V):
            if v != a:
                total = total - (q * log_p[v]).sum(-1).mean()
    return total / (len(assign_views) * (V - 1))


def per_study_swav_loss(
    scores: torch.Tensor, groups: torch.Tensor, group_ids: list[int] | None = None, **kwargs
) -> torch.Tensor:
    """Per-study SwAV: Sinkhorn and swapped prediction inside each study group, averaged.

    Args:
        scores: ``(V, B, K)`` cosine similarities.
        groups: ``(B,)`` int64 study-group code of each anchor (all its views share it).
        group_ids: the groups to process, in an order identical on every rank (DDP all-reduces
            inside Sinkhorn per group); default: the sorted unique ``groups``.
        **kwargs: passed to :func:`swapped_prediction_loss`.

    Returns:
        Scalar mean of the group losses (equal weight per group).
    """
    if group_ids is None:
        group_ids = torch.unique(groups).tolist()
    losses = [
        swapped_prediction_loss(scores[:, groups == g], **kwargs) for g in group_ids
    ]
    return torch.stack(losses).mean()


def propagation_loss(scores: torch.Tensor) -> torch.Tensor:
    """``max_i min_k (1 − cos(z_i, c_k))``: the worst-covered cell's distance to its prototype.

    Args:
        scores: ``(n, K)`` cosine similarities.
    """
    return (1.0 - scores.max(dim=1).values).max()


def propagation_dual_loss(scores: torch.Tensor) -> torch.Tensor:
    """``max_k min_i (1 − cos(z_i, c_k))``: the loneliest prototype's distance to a cell."""
    return (1.0 - scores.max(dim=0).values).max()
