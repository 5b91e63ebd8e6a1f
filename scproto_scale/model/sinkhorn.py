"""Sinkhorn-Knopp equipartition codes (Cuturi 2013; SwAV, Caron et al. 2020).

Distributed form: the total mass and the per-prototype row sums are all-reduced, ``B`` is the
global number of cells of the group; column (cell) normalisation stays local. On one process
the all-reduces are no-ops, so the same code path serves both.
"""

from __future__ import annotations

import torch

from scproto_scale.model.dist import all_reduce_max, all_reduce_sum


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.02, n_iters: int = 3) -> torch.Tensor:
    """Soft codes of ``B`` cells over ``K`` prototypes.

    Args:
        scores: ``(b, K)`` cosine similarities of this rank's cells (``b`` may be 0).
        epsilon: entropic regularisation (smaller → sharper codes).
        n_iters: Sinkhorn iterations (each normalises rows, then columns).

    Returns:
        ``(b, K)`` float32 codes; each row sums to 1. Before the final ×B rescaling, the code
        matrix has prototype marginals ≈ 1/K and cell marginals exactly 1/B (B = global cells).
    """
    scores = scores.float()
    K = scores.shape[1]
    # Shift by the global max for overflow safety; the normalisations cancel it.
    top = scores.max() if scores.numel() else scores.new_tensor(-torch.inf)
    shift = all_reduce_max(top.reshape(1).clone())
    Q = torch.exp((scores - shift) / epsilon).t()  # (K, b)
    B = all_reduce_sum(torch.tensor([float(Q.shape[1])], device=Q.device))
    Q /= all_reduce_sum(Q.sum().reshape(1))
    for _ in range(n_iters):
        Q /= all_reduce_sum(Q.sum(dim=1, keepdim=True))
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    return (Q * B).t()


def hard_codes(codes: torch.Tensor) -> torch.Tensor:
    """One-hot argmax of ``(b, K)`` codes (the reference code's default)."""
    return torch.nn.functional.one_hot(codes.argmax(dim=1), codes.shape[1]).to(codes.dtype)
