"""Count likelihoods of the CVAE decoder (log-probabilities, per cell and gene).

Parameterisation as in scVI / scPoli: mean ``mu > 0`` and inverse dispersion ``theta > 0``,
``Var = mu + mu² / theta``; ZINB adds the logit ``pi`` of the zero-inflation probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-8


def nb_log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor,
                lgamma_theta: torch.Tensor | None = None) -> torch.Tensor:
    """Negative binomial log-pmf.

    Args:
        x: ``(n, G)`` counts (float).
        mu: ``(n, G)`` means.
        theta: ``(n, G)`` or ``(G,)`` inverse dispersions.
        lgamma_theta: ``lgamma(theta)`` if already known (θ is shared by all cells of a study,
            so the caller can compute it once per study instead of once per cell).

    Returns:
        ``(n, G)`` log-probabilities (nats).
    """
    log_theta_mu = torch.log(theta + mu + _EPS)
    if lgamma_theta is None:
        lgamma_theta = torch.lgamma(theta)
    return (
        theta * (torch.log(theta + _EPS) - log_theta_mu)
        + x * (torch.log(mu + _EPS) - log_theta_mu)
        + torch.lgamma(x + theta)
        - lgamma_theta
        - torch.lgamma(x + 1)
    )


def zinb_log_prob(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor,
    lgamma_theta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Zero-inflated negative binomial log-pmf.

    ``p(x) = π·[x=0] + (1-π)·NB(x; mu, theta)`` with ``π = sigmoid(pi_logits)``.

    Args:
        x, mu, theta, lgamma_theta: as :func:`nb_log_prob`.
        pi_logits: ``(n, G)`` logits of the dropout probability.

    Returns:
        ``(n, G)`` log-probabilities (nats).
    """
    softplus_neg_pi = F.softplus(-pi_logits)  # -log(1-π)
    log_theta_mu = torch.log(theta + mu + _EPS)
    nb_zero = theta * (torch.log(theta + _EPS) - log_theta_mu)
    case_zero = F.softplus(nb_zero - pi_logits) - softplus_neg_pi
    case_nonzero = -pi_logits - softplus_neg_pi + nb_log_prob(x, mu, theta, lgamma_theta)
    return torch.where(x < 1e-8, case_zero, case_nonzero)
