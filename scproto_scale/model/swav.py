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

from scproto_scale.model.dist import all_reduce_sum
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

    def scores(self, prototypes: torch.Tensor, group_ids: list[int],
               current: torch.Tensor | None = None, current_groups: torch.Tensor | None = None,
               ) -> dict[int, torch.Tensor]:
        """``{group: (filled, K)}`` scores of the queued embeddings of the step's groups.

        Args:
            prototypes: ``(K, d)`` prototype bank.
            group_ids: the step's study groups (the same list on every rank).
            current, current_groups: ``(n, d)`` unit embeddings of this step's cells and their
                ``(n,)`` groups. When given, each group's queued embeddings are translated by
                the drift ``mean(current) − mean(queue)`` before scoring ("recentred queue";
                the means are over all ranks, so DDP codes still equal one rank's). Why: the
                queue is a few steps old; if the whole embedding moved meanwhile, the fresh
                rows win every prototype on the side it moved to, their codes crowd onto those
                prototypes, and the swapped loss moves them further the same way: a feedback
                that collapsed the embedding's direction (README, "Known limitation: prototype
                usage"). Removing the mean difference removes that bias; the scores are then
                inner products, not cosines.
        """
        drift = (self._drift(group_ids, current, current_groups)
                 if current is not None else {})
        out = {}
        for g in group_ids:
            if (n := int(self.filled[g])) == 0:
                continue
            zq = self.z[g, :n].to(prototypes.device)
            if g in drift:
                zq = zq + drift[g].to(zq)
            out[g] = zq @ prototypes.detach().t()
        return out

    @torch.no_grad()
    def _drift(self, group_ids: list[int], current: torch.Tensor,
               current_groups: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per group, the ``(d,)`` mean of the current cells minus that of the queue (all ranks)."""
        d, dev = self.z.shape[-1], current.device
        # on the cells' device: NCCL all-reduces CUDA tensors only
        stats = torch.zeros(len(group_ids), 2 * d + 2, dtype=torch.float64, device=dev)
        current, current_groups = current.detach().double(), current_groups.to(dev)
        for i, g in enumerate(group_ids):
            n = int(self.filled[g])
            stats[i, :d] = self.z[g, :n].to(dev, torch.float64).sum(0)
            stats[i, d] = n
            mine = current[current_groups == g]
            stats[i, d + 1: 2 * d + 1] = mine.sum(0)
            stats[i, 2 * d + 1] = len(mine)
        stats = all_reduce_sum(stats)  # one call for all groups: every rank makes it
        return {g: (stats[i, d + 1: 2 * d + 1] / stats[i, 2 * d + 1]
                    - stats[i, :d] / stats[i, d]).float()
                for i, g in enumerate(group_ids) if stats[i, d] > 0 and stats[i, 2 * d + 1] > 0}

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
