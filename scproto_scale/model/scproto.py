"""scProto: the CVAE backbone jointly trained with a per-study SwAV prototype head.

``L = L_batchSwAV + λ_prop · L_prop + λ_cvae · L_CVAE`` (method.md §5). Pure torch: no I/O and
no distributed calls except through :mod:`scproto_scale.model.dist` (inside Sinkhorn).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from scproto_scale.config import ModelConfig
from scproto_scale.data.batch import ViewBatch
from scproto_scale.model.cvae import CVAE, kl_normal
from scproto_scale.model.swav import (
    PrototypeBank,
    StudyQueue,
    per_study_swav_loss,
    propagation_dual_loss,
    propagation_loss,
)

TARGET_SUM = 1e4


def log_normalize_torch(counts: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
    """``log1p(x / l · 1e4)`` for ``counts (n, G)`` and ``library (n,)`` (all-gene totals)."""
    return torch.log1p(counts * (TARGET_SUM / library.clamp(min=1.0))[:, None])


def _autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class ScProto(nn.Module):
    """CVAE + prototype bank.

    Args:
        n_genes: G (model genes).
        n_conditions: S (studies).
        config: :class:`~scproto_scale.config.ModelConfig`.
        seed: seeds the prototype initialisation.
    """

    def __init__(self, n_genes: int, n_conditions: int, config: ModelConfig, seed: int = 0):
        super().__init__()
        self.config = config
        self.cvae = CVAE(
            n_genes, n_conditions, latent_dim=config.latent_dim, hidden_dims=config.hidden_dims,
            embedding_dim=config.embedding_dim, dropout=config.dropout,
            likelihood=config.likelihood,
        )
        gen = torch.Generator().manual_seed(seed)
        self.prototypes = PrototypeBank(config.n_prototypes, config.latent_dim, generator=gen)

    def forward(self, batch: ViewBatch, kl_weight: float | None = None,
                queue: StudyQueue | None = None, use_queue: bool = True,
                amp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Loss terms of one step: ``loss`` (total), ``swav``, ``prop``, ``cvae``, ``recon``, ``kl``.

        With a ``queue``, the assignment views of this step are pushed into it, and when
        ``use_queue`` (after the warm-up) Sinkhorn stacks each study's queued embeddings before
        the batch. ``amp_dtype`` (e.g. ``torch.bfloat16``) autocasts the encoder and decoder
        networks only: likelihoods, KL, Sinkhorn and the softmaxes stay in float32.
        """
        cfg = self.config
        V, B, G = batch.counts.shape
        counts = batch.counts.reshape(V * B, G)
        library = batch.library.reshape(V * B)
        condition = batch.condition.reshape(V * B)
        x_in = log_normalize_torch(counts, library)
        with _autocast(counts.device.type, amp_dtype):
            cond_emb = self.cvae.embed_condition(condition)
            mu, var = self.cvae.encode(x_in, cond_emb)
        mu, var = mu.float(), var.float()
        z = mu + var.sqrt() * torch.randn_like(mu)
        with _autocast(counts.device.type, amp_dtype):
            dec = self.cvae.decode(z, cond_emb, condition)
        dec = dec.float()
        recon = self.cvae.reconstruction_nll(dec, counts, x_in, library).mean()
        kl = kl_normal(mu, var).mean()
        beta = cfg.kl_weight if kl_weight is None else kl_weight
        cvae = recon + beta * kl

        z_unit = F.normalize(z, dim=1)
        scores = self.prototypes.scores(z_unit)  # (V·B, K)
        assign = z_unit.reshape(V, B, -1)[:2].reshape(2 * B, -1)  # the two assignment views
        assign_groups = batch.group.repeat(2)
        swav = per_study_swav_loss(
            scores.reshape(V, B, -1), batch.group, batch.group_ids,
            queue_scores=(queue.scores(self.prototypes.weight, batch.group_ids,
                                       assign if cfg.queue_recenter else None, assign_groups)
                          if queue is not None and use_queue else None),
            temperature=cfg.temperature, epsilon=cfg.sinkhorn_epsilon,
            n_iters=cfg.sinkhorn_iterations, hard=cfg.hard_codes,
        )
        if queue is not None:
            queue.push(assign, assign_groups)
        prop = propagation_loss(scores if cfg.prop_pulls == "both"
                                else self.prototypes.scores(z_unit.detach()))
        total = swav + cfg.lambda_prop * prop + cfg.lambda_cvae * cvae
        out = {"loss": total, "swav": swav, "prop": prop, "cvae": cvae, "recon": recon, "kl": kl,
               # anchors' nearest prototypes: the loop tracks prototype usage per epoch
               "assign": scores[:B].argmax(dim=1).detach()}
        if cfg.lambda_prop_dual > 0:
            dual = propagation_dual_loss(scores)
            out["prop_dual"] = dual
            out["loss"] = total + cfg.lambda_prop_dual * dual
        return out
