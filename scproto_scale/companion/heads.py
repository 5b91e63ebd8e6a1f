"""Supervised contrastive annotation heads on a frozen embedding: MLP-CL and MLS-CL.

method.md §10. A head h_ψ is trained with SupCon (Khosla et al. 2020; positives = same label in
the minibatch) on frozen embeddings z; a classifier is then trained on h(z).

- MLP-CL: 2-layer MLP d → d, SupCon on its output.
- MLS-CL: 2-layer MLP d → 2·C, one 2-D unit-norm sub-space per class, the loss summed over the
  class sub-spaces (:func:`~scproto_scale.companion.losses.mls_supcon`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scproto_scale.companion.losses import mls_supcon, supcon
from scproto_scale.config import AnnotateHeadConfig


class ContrastiveHead(nn.Module):
    """h_ψ: ``(n, d)`` → ``(n, d)`` (MLP-CL) or ``(n, 2·C)`` (MLS-CL)."""

    def __init__(self, dim: int, kind: Literal["mlp_cl", "mls_cl"], n_classes: int):
        super().__init__()
        self.kind = kind
        self.n_classes = n_classes
        out = dim if kind == "mlp_cl" else 2 * n_classes
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """Unit-norm head output the classifier sees (per sub-space for MLS-CL)."""
        h = self.net(z)
        if self.kind == "mlp_cl":
            return F.normalize(h, dim=1)
        return F.normalize(h.view(len(h), self.n_classes, 2), dim=2).reshape(len(h), -1)

    def loss(self, z: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
        h = self.net(z)
        if self.kind == "mlp_cl":
            return supcon(h, y, tau)
        return mls_supcon(h, y, self.n_classes, tau)


def fit_head(z: np.ndarray, y: np.ndarray, n_classes: int, kind: Literal["mlp_cl", "mls_cl"],
             cfg: AnnotateHeadConfig, seed: int = 0) -> ContrastiveHead:
    """Train a contrastive head on frozen embeddings.

    Args:
        z: ``(n, d)`` float32 embeddings (standardised by the caller).
        y: ``(n,)`` int64 class codes in ``[0, n_classes)``.
        n_classes: C.
        kind: ``"mlp_cl"`` or ``"mls_cl"``.
        cfg: epochs, batch size, learning rate, temperature.
        seed: seeds initialisation and minibatch order.

    Returns:
        the trained head (eval mode).
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = ContrastiveHead(z.shape[1], kind, n_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    zt, yt = torch.from_numpy(np.asarray(z, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))
    n = len(zt)
    bs = min(cfg.batch_size, n)
    for _ in range(cfg.epochs):
        perm = rng.permutation(n)
        for s in range(0, n - 1, bs):
            idx = torch.from_numpy(perm[s:s + bs])
            if len(idx) < 2:
                continue
            loss = head.loss(zt[idx], yt[idx], cfg.tau)
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    return head


def transform(head: ContrastiveHead, z: np.ndarray) -> np.ndarray:
    """``h(z)`` as ``(n, d_h)`` float32 (no gradient)."""
    with torch.no_grad():
        return head.features(torch.from_numpy(np.asarray(z, dtype=np.float32))).numpy()
