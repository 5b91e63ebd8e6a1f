"""scPoli-style conditional VAE (De Donno et al. 2023, Nat. Methods; method.md §2).

The study (condition) enters through a learned embedding ``nn.Embedding(S, e, max_norm=1)``
added by a bias-free linear map to the first hidden layer of both encoder and decoder.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scproto_scale.model.likelihoods import nb_log_prob, zinb_log_prob

VAR_EPS = 1e-4


class _ConditionalMLP(nn.Module):
    """Linear(x) + Linear_nobias(c) → LayerNorm(no affine) → ReLU → Dropout, then plain layers."""

    def __init__(self, n_in: int, n_cond: int, hidden: list[int], dropout: float):
        super().__init__()
        self.first = nn.Linear(n_in, hidden[0])
        self.cond = nn.Linear(n_cond, hidden[0], bias=False)
        self.norm = nn.LayerNorm(hidden[0], elementwise_affine=False)
        self.drop = nn.Dropout(dropout)
        rest: list[nn.Module] = []
        for a, b in itertools.pairwise(hidden):
            rest += [nn.Linear(a, b), nn.LayerNorm(b, elementwise_affine=False), nn.ReLU(),
                     nn.Dropout(dropout)]
        self.rest = nn.Sequential(*rest)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.relu(self.norm(self.first(x) + self.cond(c))))
        return self.rest(h)


@dataclass
class DecoderOutput:
    """Decoder parameters for ``n`` cells × ``G`` genes.

    ``rho`` (nb/zinb): normalised expression (rows sum to 1); ``theta``: inverse dispersion;
    ``pi_logits`` (zinb); ``expr`` (mse): predicted log-normalised expression.
    """

    rho: torch.Tensor | None = None
    theta: torch.Tensor | None = None
    pi_logits: torch.Tensor | None = None
    expr: torch.Tensor | None = None
    lgamma_theta: torch.Tensor | None = None

    def float(self) -> DecoderOutput:
        """The same parameters in float32 (after a reduced-precision decoder)."""
        return DecoderOutput(*(None if t is None else t.float() for t in (
            self.rho, self.theta, self.pi_logits, self.expr, self.lgamma_theta)))


class CVAE(nn.Module):
    """Conditional VAE over ``G`` genes and ``S`` studies.

    Args:
        n_genes: G.
        n_conditions: S (studies).
        latent_dim: d.
        hidden_dims: hidden sizes; default ``[ceil(sqrt(G))]``.
        embedding_dim: e, size of the condition embedding (max-norm 1).
        dropout: dropout rate of the hidden layers.
        likelihood: ``"nb"``, ``"zinb"`` or ``"mse"``.
    """

    def __init__(
        self, n_genes: int, n_conditions: int, latent_dim: int = 10,
        hidden_dims: list[int] | None = None, embedding_dim: int = 10, dropout: float = 0.05,
        likelihood: str = "nb",
    ):
        super().__init__()
        if likelihood not in ("nb", "zinb", "mse"):
            raise ValueError(f"unknown likelihood {likelihood!r}")
        hidden = list(hidden_dims or [math.ceil(math.sqrt(n_genes))])
        self.likelihood = likelihood
        self.n_genes, self.latent_dim = n_genes, latent_dim
        self.condition_embedding = nn.Embedding(n_conditions, embedding_dim, max_norm=1.0)
        self.encoder = _ConditionalMLP(n_genes, embedding_dim, hidden, dropout)
        self.mu = nn.Linear(hidden[-1], latent_dim)
        self.logvar = nn.Linear(hidden[-1], latent_dim)
        self.decoder = _ConditionalMLP(latent_dim, embedding_dim, hidden[::-1], dropout)
        self.out = nn.Linear(hidden[0], n_genes)
        if likelihood in ("nb", "zinb"):
            # Inverse dispersion per gene × condition (scPoli's "gene-batch").
            self.log_theta = nn.Parameter(torch.zeros(n_conditions, n_genes))
        if likelihood == "zinb":
            self.pi = nn.Linear(hidden[0], n_genes)

    def embed_condition(self, condition: torch.Tensor) -> torch.Tensor:
        """``(n,)`` int64 study codes → ``(n, e)`` embeddings."""
        return self.condition_embedding(condition)

    def mean_condition_embedding(self) -> torch.Tensor:
        """``(e,)``: the mean of all studies' embeddings (max-norm applied), for study-free decoding."""
        w = self.condition_embedding.weight
        norms = w.norm(dim=1, keepdim=True).clamp(min=1.0)
        return (w / norms).mean(dim=0)

    def encode(self, x_in: torch.Tensor, cond_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_in (n, G)`` log-normalised input → ``mu (n, d)``, ``var (n, d)``."""
        h = self.encoder(x_in, cond_emb)
        return self.mu(h), torch.exp(self.logvar(h)) + VAR_EPS

    def decode(self, z: torch.Tensor, cond_emb: torch.Tensor,
               condition: torch.Tensor | None = None) -> DecoderOutput:
        """``z (n, d)`` → :class:`DecoderOutput`; ``condition`` selects θ's column (nb/zinb)."""
        h = self.decoder(z, cond_emb)
        if self.likelihood == "mse":
            return DecoderOutput(expr=F.relu(self.out(h)))
        out = DecoderOutput(rho=F.softmax(self.out(h), dim=-1))
        if condition is not None:
            out.theta = torch.exp(self.log_theta[condition])
            out.lgamma_theta = torch.lgamma(torch.exp(self.log_theta))[condition]
        if self.likelihood == "zinb":
            out.pi_logits = self.pi(h)
        return out

    def reconstruction_nll(
        self, dec: DecoderOutput, counts: torch.Tensor, x_in: torch.Tensor, library: torch.Tensor
    ) -> torch.Tensor:
        """``(n,)`` negative log-likelihood summed over genes (nats; squared error for mse)."""
        if self.likelihood == "mse":
            return ((dec.expr - x_in) ** 2).sum(-1)
        mean = dec.rho * library[:, None]
        if self.likelihood == "nb":
            return -nb_log_prob(counts, mean, dec.theta, dec.lgamma_theta).sum(-1)
        return -zinb_log_prob(counts, mean, dec.theta, dec.pi_logits, dec.lgamma_theta).sum(-1)


def kl_normal(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``(n,)`` KL(N(mu, var) ‖ N(0, I)) summed over latent dimensions (nats)."""
    return 0.5 * (var + mu**2 - 1.0 - torch.log(var)).sum(-1)
