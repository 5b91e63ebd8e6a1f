"""Encoders and the ZINB decoder of the scGPCL companion (method.md §10).

The cheap encoder is an MLP over log-normalised, scaled expression. The decoder is the ZINB
autoencoder head of DCA / scDeepCluster (Eraslan et al. 2019; Tian et al. 2019): mean =
size factor × exp(·), dispersion θ and dropout logits π per cell and gene, scored with
:func:`scproto_scale.model.likelihoods.zinb_log_prob`.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from scproto_scale.model.likelihoods import zinb_log_prob


def mlp(dims: list[int], *, final_act: bool = False, dropout: float = 0.0) -> nn.Sequential:
    """Linear → BatchNorm → ReLU stack over ``dims`` (last layer linear unless ``final_act``)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2 or final_act:
            layers += [nn.BatchNorm1d(b), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """``(n, G)`` scaled log-expression → ``(n, latent_dim)`` embedding."""

    def __init__(self, n_genes: int, hidden_dims: list[int], latent_dim: int):
        super().__init__()
        self.net = mlp([n_genes, *hidden_dims, latent_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ZINBDecoder(nn.Module):
    """Latent → ZINB parameters (mean, θ, π-logits), each ``(n, G)``."""

    def __init__(self, latent_dim: int, hidden_dims: list[int], n_genes: int):
        super().__init__()
        self.body = mlp([latent_dim, *hidden_dims], final_act=True)
        h = hidden_dims[-1]
        self.mean = nn.Linear(h, n_genes)
        self.theta = nn.Linear(h, n_genes)
        self.pi = nn.Linear(h, n_genes)

    def forward(self, z: torch.Tensor, size_factor: torch.Tensor, genes: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ZINB parameters, ``(n, G)`` each, or ``(n, len(genes))`` for a gene subset.

        Scoring a random gene subset per step is an unbiased estimate of the mean per-gene
        likelihood at a fraction of the cost (the ZINB's lgamma terms dominate a CPU step).
        """
        h = self.body(z)

        def head(layer: nn.Linear) -> torch.Tensor:
            if genes is None:
                return layer(h)
            return F.linear(h, layer.weight[genes], layer.bias[genes])

        # Clamps as in DCA's MeanAct / DispAct: keep exp and softplus finite early in training.
        mean = torch.exp(head(self.mean).clamp(-12.0, 12.0)) * size_factor[:, None]
        theta = F.softplus(head(self.theta)).clamp(1e-4, 1e4)
        return mean, theta, head(self.pi)


def zinb_nll(x: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor,
             pi_logits: torch.Tensor) -> torch.Tensor:
    """ZINB negative log-likelihood per cell, averaged over genes and cells (nats)."""
    return -zinb_log_prob(x, mean, theta, pi_logits).mean()
