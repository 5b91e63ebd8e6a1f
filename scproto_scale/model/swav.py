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


def group_codes(scores: torch.Tensor, queue_scores: torch.Tensor | None = None,
                epsilon: float = 0.02, n_iters: int = 3) -> torch.Tensor:
    """Soft Sinkhorn codes ``(b, K)`` of one study group's ``b`` cells on this rank.

    With ``queue_scores`` ``(L, K)``, the queued embeddings are stacked before the cells for
    Sinkhorn (their mass enters the equipartition) and only the cells' rows are returned. Under
    DDP every rank calls this for the same group; Sinkhorn all-reduces across ranks, so the
    codes equal those of one process holding all ranks' cells and queues.
    """
    b = scores.shape[0]
    if queue_scores is not None and len(queue_scores):
        scores = torch.cat([queue_scores, scores])
    return sinkhorn(scores, epsilon, n_iters)[scores.shape[0] - b:]


def swapped_prediction_loss(
    scores: torch.Tensor, temperature: float = 0.05, epsilon: float = 0.02, n_iters: int = 3,
    hard: bool = True, assign_views: tuple[int, ...] = (0, 1),
    queue_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """SwAV swapped prediction for one group of cells.

    Args:
        scores: ``(V, b, K)`` cosine similarities of V views of b cells.
        temperature: τ of the prediction softmax.
        epsilon, n_iters: Sinkhorn settings.
        hard: one-hot codes instead of soft Sinkhorn codes.
        assign_views: the views whose codes are predicted from every other view.
        queue_scores: ``(L, K)`` scores of queued embeddings of the same group, stacked before
            the batch for Sinkhorn (only the batch rows become codes).

    Returns:
        Scalar: ``−Σ_k q_a^k log softmax(u_v/τ)^k`` averaged over cells, the (V−1) predicting
        views and the assignment views.
    """
    # −Σ_k q_k log softmax(u/τ)_k = Σ_k q_k · lse(u/τ) − ⟨q, u⟩/τ, and Σ_{v≠a} is linear: sum
    # the views' scores and log-sum-exps once instead of V−1 products per assignment view
    # (exact; halves the head's time at large K).
    V = scores.shape[0]
    u = scores / temperature  # (V, b, K)
    lse = torch.logsumexp(u, dim=-1)  # (V, b)
    u_sum, lse_sum = u.sum(0), lse.sum(0)
    total = scores.new_zeros(())
    for a in assign_views:
        q = group_codes(scores[a].detach(), queue_scores, epsilon, n_iters)
        if hard:
            q = hard_codes(q)
        others_u, others_lse = u_sum - u[a], lse_sum - lse[a]
        total = total + (q.sum(-1) * others_lse - (q * others_u).sum(-1)).mean()
    return total / (len(assign_views) * (V - 1))


def per_study_swav_loss(
    scores: torch.Tensor, groups: torch.Tensor, group_ids: list[int] | None = None,
    queue_scores: dict[int, torch.Tensor] | None = None, **kwargs,
) -> torch.Tensor:
    """Per-study SwAV: Sinkhorn and swapped prediction inside each study group, averaged.

    Args:
        scores: ``(V, B, K)`` cosine similarities.
        groups: ``(B,)`` int64 study-group code of each anchor (all its views share it).
        group_ids: the groups to process, in an order identical on every rank (DDP all-reduces
            inside Sinkhorn per group); default: the sorted unique ``groups``.
        queue_scores: per group, ``(L, K)`` scores of its queued embeddings (see
            :class:`StudyQueue`).
        **kwargs: passed to :func:`swapped_prediction_loss`.

    Returns:
        Scalar mean of the group losses (equal weight per group).
    """
    if group_ids is None:
        group_ids = torch.unique(groups).tolist()
    queue_scores = queue_scores or {}
    losses = [
        swapped_prediction_loss(scores[:, groups == g], queue_scores=queue_scores.get(g), **kwargs)
        for g in group_ids
    ]
    return torch.stack(losses).mean()


class StudyQueue:
    """Per-study FIFO of the last ``length`` detached unit embeddings (queue-augmented Sinkhorn).

    With K prototypes ≫ the cells of a study group in one step, Sinkhorn's equipartition over
    so few cells is noise; stacking the group's recent embeddings before the batch gives it
    enough mass (SwAV's queue, per study as in method.md §3). Each rank keeps its own queue,
    as SwAV does: the all-reduces inside Sinkhorn already pool the ranks' queues per group.

    Args:
        n_groups: number of study groups.
        length: embeddings kept per group.
        dim: latent size d.
    """

    def __init__(self, n_groups: int, length: int, dim: int):
        self.length = length
        self.z = torch.zeros(n_groups, length, dim)
        self.filled = torch.zeros(n_groups, dtype=torch.long)

    def scores(self, prototypes: torch.Tensor, group_ids: list[int]) -> dict[int, torch.Tensor]:
        """``{group: (filled, K)}`` cosine scores of the queued embeddings of the step's groups."""
        return {g: self.z[g, :n].to(prototypes.device) @ prototypes.detach().t()
                for g in group_ids if (n := int(self.filled[g])) > 0}

    @torch.no_grad()
    def push(self, z_unit: torch.Tensor, groups: torch.Tensor) -> None:
        """Add ``(n, d)`` embeddings with their ``(n,)`` groups (newest first, oldest dropped)."""
        z_unit, groups = z_unit.detach().cpu(), groups.cpu()
        for g in torch.unique(groups).tolist():
            new = z_unit[groups == g][: self.length]
            self.z[g] = torch.cat([new, self.z[g]])[: self.length]
            self.filled[g] = min(self.length, int(self.filled[g]) + len(new))

    def state_dict(self) -> dict:
        return {"z": self.z.clone(), "filled": self.filled.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.z, self.filled = state["z"].clone(), state["filled"].clone()


def propagation_loss(scores: torch.Tensor) -> torch.Tensor:
    """``max_i min_k (1 − cos(z_i, c_k))``: the worst-covered cell's distance to its prototype.

    Args:
        scores: ``(n, K)`` cosine similarities.
    """
    return (1.0 - scores.max(dim=1).values).max()


def propagation_dual_loss(scores: torch.Tensor) -> torch.Tensor:
    """``max_k min_i (1 − cos(z_i, c_k))``: the loneliest prototype's distance to a cell."""
    return (1.0 - scores.max(dim=0).values).max()
