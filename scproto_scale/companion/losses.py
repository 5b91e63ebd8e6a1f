"""Contrastive and clustering losses of the companion methods (method.md §10).

All losses are means over anchors (nats). Embeddings are L2-normalised inside the losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.25) -> torch.Tensor:
    """Instance-wise NT-Xent (SimCLR; Chen et al. 2020), as in scGPCL (τ = 0.25).

    Each of the ``2n`` views has one positive (the other view of its cell) and ``2n - 2``
    negatives (every other view in the batch).

    Args:
        z1, z2: ``(n, d)`` projections of the two views of the same ``n`` cells.
        tau: temperature > 0.

    Returns:
        scalar loss.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"views differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / tau
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def proto_nce(z: torch.Tensor, centroids: list[torch.Tensor], assignments: list[torch.Tensor],
              tau: float = 0.25) -> torch.Tensor:
    """Prototypical contrastive loss against k-means centroids at several granularities.

    PCL (Li et al. 2021, ICLR) as used by scGPCL: for every granularity ``m`` the cell's own
    centroid is the positive and the other centroids are negatives; the loss is averaged over
    granularities.

    Args:
        z: ``(n, d)`` projections.
        centroids: per granularity, ``(K_m, d)`` centroids (normalised here).
        assignments: per granularity, ``(n,)`` int64 index of each cell's centroid.
        tau: temperature > 0.

    Returns:
        scalar loss.
    """
    if not centroids or len(centroids) != len(assignments):
        raise ValueError("need one assignment vector per centroid set (and at least one set)")
    zn = F.normalize(z, dim=1)
    losses = [F.cross_entropy(zn @ F.normalize(c, dim=1).T / tau, a)
              for c, a in zip(centroids, assignments, strict=True)]
    return torch.stack(losses).mean()


def supcon(z: torch.Tensor, labels: torch.Tensor, tau: float = 0.1,
           anchor_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, NeurIPS; the "L_out" form).

    Positives of an anchor: the other cells of its label in the batch; the denominator runs over
    every other cell. Anchors without a positive are skipped.

    Args:
        z: ``(n, d)`` embeddings.
        labels: ``(n,)`` int64 labels.
        tau: temperature > 0.
        anchor_mask: optional ``(n,)`` bool, which cells act as anchors (default all).

    Returns:
        scalar loss (0 if no anchor has a positive).
    """
    zn = F.normalize(z, dim=1)
    n = zn.shape[0]
    logits = zn @ zn.T / tau
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    use = n_pos > 0
    if anchor_mask is not None:
        use = use & anchor_mask
    if not bool(use.any()):
        return z.sum() * 0.0
    mean_log_prob_pos = log_prob.masked_fill(~pos, 0.0).sum(1)[use] / n_pos[use]
    return -mean_log_prob_pos.mean()


def mls_supcon(h: torch.Tensor, labels: torch.Tensor, n_classes: int,
               tau: float = 0.1) -> torch.Tensor:
    """MLS-CL loss: SupCon in one 2-D unit-norm sub-space per class, summed over classes.

    ``h`` has ``2·C`` dims; sub-space ``c`` is ``h[:, 2c:2c+2]``. In sub-space ``c`` the anchors
    are the cells of class ``c``, their positives the other cells of class ``c`` and everything
    else is a negative (a one-vs-rest SupCon), so each class gets its own direction on a circle.

    Args:
        h: ``(n, 2·n_classes)`` head output.
        labels: ``(n,)`` int64 in ``[0, n_classes)``.
        n_classes: C.
        tau: temperature > 0.

    Returns:
        scalar loss (sum over classes present with ≥ 2 cells).
    """
    if h.shape[1] != 2 * n_classes:
        raise ValueError(f"MLS-CL head has {h.shape[1]} dims, expected 2·{n_classes}")
    n = h.shape[0]
    hn = F.normalize(h.view(n, n_classes, 2), dim=2).transpose(0, 1)  # (C, n, 2)
    eye = torch.eye(n, dtype=torch.bool, device=h.device)
    logits = (hn @ hn.transpose(1, 2) / tau).masked_fill(eye, float("-inf"))  # (C, n, n)
    log_prob = logits - torch.logsumexp(logits, dim=2, keepdim=True)
    in_c = labels[None, :] == torch.arange(n_classes, device=h.device)[:, None]  # (C, n)
    pos = in_c[:, :, None] & in_c[:, None, :] & ~eye  # anchor and positive both in class c
    n_pos = pos.sum(2)  # (C, n): > 0 only for anchors of class c with a partner
    anchor = n_pos > 0
    if not bool(anchor.any()):
        return h.sum() * 0.0
    mean_pos = log_prob.masked_fill(~pos, 0.0).sum(2) / n_pos.clamp_min(1)
    per_class = -(mean_pos * anchor).sum(1) / anchor.sum(1).clamp_min(1)
    return per_class.sum()


def student_t_assign(z: torch.Tensor, mu: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """DEC soft assignment q_ij ∝ (1 + ‖z_i − μ_j‖² / α)^(−(α+1)/2) (Xie et al. 2016, ICML).

    Args:
        z: ``(n, d)`` embeddings; mu: ``(K, d)`` cluster centres; alpha: Student-t dof.

    Returns:
        ``(n, K)`` rows summing to 1.
    """
    d2 = torch.cdist(z, mu).pow(2)
    q = (1.0 + d2 / alpha).pow(-(alpha + 1.0) / 2.0)
    return q / q.sum(1, keepdim=True)


def dec_target(q: torch.Tensor) -> torch.Tensor:
    """DEC auxiliary target p_ij ∝ q_ij² / f_j with f_j = Σ_i q_ij (sharpened, size-balanced).

    Args:
        q: ``(n, K)`` soft assignments.

    Returns:
        ``(n, K)`` rows summing to 1 (no gradient).
    """
    q = q.detach()
    w = q.pow(2) / q.sum(0, keepdim=True)
    return w / w.sum(1, keepdim=True)


def dec_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) averaged over cells (the DEC clustering loss)."""
    return F.kl_div(torch.log(q.clamp_min(1e-12)), p, reduction="batchmean")
