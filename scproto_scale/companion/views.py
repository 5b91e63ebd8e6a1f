"""Stochastic views of a cell for contrastive learning."""

from __future__ import annotations

import torch


def mask_features(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Feature-masking view: each entry is set to 0 independently with probability ``p``.

    scGPCL (Lee et al. 2023, Bioinformatics) builds its two views this way (p = 0.2).

    Args:
        x: ``(n, G)`` float input (normalised expression or node features).
        p: masking probability in ``[0, 1)``.
        generator: torch RNG (seeded by the caller).

    Returns:
        ``(n, G)`` tensor, same dtype/device as ``x``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"masking probability must be in [0, 1), got {p}")
    if p == 0.0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep.to(x.dtype)
