"""Optimisers and the learning-rate schedule (method.md §5).

LARS (You et al. 2017) as SwAV uses it: SGD with momentum whose per-tensor step is scaled by the
trust ratio ``η·‖w‖ / (‖g‖ + wd·‖w‖)``; biases and 1-D parameters are excluded from the
adaptation and from weight decay.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scproto_scale.config import TrainConfig


class LARS(torch.optim.Optimizer):
    """SGD + momentum with layer-wise adaptive rate scaling.

    Args:
        params: parameter groups; a group with ``lars=False`` is plain SGD without decay.
        lr: base learning rate.
        momentum: heavy-ball momentum.
        weight_decay: L2 decay of adapted tensors.
        trust_coefficient: η.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 trust_coefficient: float = 1e-3):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["lars"] and p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = p.norm(), g.norm()
                    if w_norm > 0 and g_norm > 0:
                        g = g.mul(group["trust_coefficient"] * w_norm / g_norm)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (default, robust) or LARS-SGD (the reference) over the model's parameters."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return LARS(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float,
          final_fraction: float = 0.0) -> float:
    """Linear warm-up to ``base_lr``, then cosine decay to ``final_fraction · base_lr``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    floor = base_lr * final_fraction
    return floor + 0.5 * (base_lr - floor) * (1 + math.cos(math.pi * t))
