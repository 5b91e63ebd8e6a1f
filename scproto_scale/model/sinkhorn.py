"""Sinkhorn-Knopp equipartition codes (Cuturi 2013; SwAV, Caron et al. 2020).

Distributed form: the total mass and the per-prototype row sums are all-reduced, ``B`` is the
global number of cells of the group; column (cell) normalisation stays local. On one process
the all-reduces are no-ops, so the same code path serves both.
"""

from __future__ import annotations

import math

import torch

from scproto_scale.model.dist import all_reduce_max, all_reduce_sum


def _row_logsumexp(logq: torch.Tensor) -> torch.Tensor:
    """``(K, 1)`` log of each prototype's total mass over the cells of all ranks."""
    local_max = logq.max(dim=1, keepdim=True).values if logq.shape[1] else torch.full_like(
        logq[:, :1], -torch.inf)
    m = all_reduce_max(local_max.clone())
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = all_reduce_sum(torch.exp(logq - m).sum(dim=1, keepdim=True))
    return m + torch.log(total)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.02, n_iters: int = 3) -> torch.Tensor:
    """Soft codes of ``B`` cells over ``K`` prototypes.

    Computed in the log domain, so a small ``epsilon`` cannot underflow ``exp(u/ε)``; the
    iterates are those of the usual Sinkhorn-Knopp (SwAV's ``distributed_sinkhorn``).

    Args:
        scores: ``(b, K)`` cosine similarities of this rank's cells (``b`` may be 0).
        epsilon: entropic regularisation (smaller → sharper codes).
        n_iters: Sinkhorn iterations (each normalises rows, then columns).

    Returns:
        ``(b, K)`` float32 codes; each row sums to 1. Before the final ×B rescaling, the code
        matrix has prototype marginals ≈ 1/K and cell marginals exactly 1/B (B = global cells).
    """
    logq = scores.float().t() / epsilon  # (K, b)
    K = logq.shape[0]
    B = all_reduce_sum(torch.tensor([float(logq.shape[1])], device=logq.device))
    log_k, log_b = math.log(K), torch.log(B)
    for _ in range(n_iters):
        logq = logq - _row_logsumexp(logq) - log_k
        logq = logq - torch.logsumexp(logq, dim=0, keepdim=True) - log_b
    return torch.exp(logq + log_b).t()


def hard_codes(codes: torch.Tensor) -> torch.Tensor:
    """One-hot argmax of ``(b, K)`` codes (the reference code's default)."""
    return torch.nn.functional.one_hot(codes.argmax(dim=1), codes.shape[1]).to(codes.dtype)
