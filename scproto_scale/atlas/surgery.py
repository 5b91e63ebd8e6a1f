"""Query mapping of unseen studies by architecture surgery (scArches, Lotfollahi et al. 2022,
Nat. Biotechnol.; as used by scPoli, De Donno et al. 2023, Nat. Methods; method.md §8).

New studies get new condition-embedding rows (and new dispersion θ columns); everything else is
frozen and only the new tensors are trained, for a few epochs, on the CVAE loss of the query
cells (optionally plus per-study SwAV against the frozen prototypes). The reference part of the
atlas — every other weight, the reference rows and columns, the prototypes — is copied, never
touched: the optimiser only ever sees the new tensors (so AdamW's weight decay cannot move a
frozen parameter), and the max-norm of the embedding is applied functionally to the new rows
(``nn.Embedding(max_norm=…)`` would renormalise looked-up rows in place).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scproto_scale.atlas.atlas import PrototypeAtlas
from scproto_scale.atlas.genes import align_to_model, gene_selector
from scproto_scale.config import SurgeryConfig
from scproto_scale.data.store import CellStore
from scproto_scale.errors import ScprotoInputError
from scproto_scale.model.cvae import kl_normal
from scproto_scale.model.scproto import ScProto, log_normalize_torch
from scproto_scale.model.swav import per_study_swav_loss

log = logging.getLogger(__name__)

_EMB = "cvae.condition_embedding.weight"
_THETA = "cvae.log_theta"


def _renorm(w: torch.Tensor, max_norm: float = 1.0) -> torch.Tensor:
    """Rows scaled to norm ≤ max_norm (the embedding's max-norm, without in-place writes)."""
    return w / (w.norm(dim=1, keepdim=True) / max_norm).clamp(min=1.0)


def add_studies(atlas: PrototypeAtlas, new_studies: list[str], seed: int = 0) -> PrototypeAtlas:
    """A copy of the atlas with condition rows (and θ columns) appended for ``new_studies``.

    New embedding rows are drawn as ``nn.Embedding`` initialises them (N(0, 1), seeded) — the
    untrained rows the reference implementation maps queries with; new θ columns start at the
    mean of the reference columns. Reference tensors are copied bit for bit.

    Args:
        atlas: the reference atlas.
        new_studies: study names not yet in ``atlas.studies``.
        seed: seeds the new rows.

    Raises:
        ScprotoInputError: a name already in the atlas, or duplicates.
    """
    clash = sorted(set(new_studies) & set(atlas.studies))
    if clash or len(set(new_studies)) != len(new_studies):
        raise ScprotoInputError(f"new studies must be unseen and unique; already in the atlas or "
                                f"repeated: {clash or new_studies}")
    S, S_new = len(atlas.studies), len(new_studies)
    ref = atlas.model.state_dict()
    model = ScProto(len(atlas.genes), S + S_new, atlas.model.config)
    state = {k: v.clone() for k, v in ref.items()}
    gen = torch.Generator().manual_seed(seed)
    emb = ref[_EMB]
    state[_EMB] = torch.cat([emb, torch.randn(S_new, emb.shape[1], generator=gen, dtype=emb.dtype)])
    if _THETA in ref:
        theta = ref[_THETA]
        state[_THETA] = torch.cat([theta, theta.mean(dim=0, keepdim=True).expand(S_new, -1)])
    model.load_state_dict(state)
    meta = dict(atlas.meta)
    meta["reference_studies"] = list(meta.get("reference_studies", atlas.studies))
    meta["query_studies"] = list(meta.get("query_studies", [])) + list(new_studies)
    return PrototypeAtlas(model, atlas.genes, list(atlas.studies) + list(new_studies), meta)


def _query_batches(store: CellStore, rows: np.ndarray, select, codes: np.ndarray,
                   cfg: SurgeryConfig, rng: np.random.Generator):
    """Shuffled mini-batches of query rows, reading one store chunk at a time."""
    starts = np.arange(0, store.n_obs, cfg.chunk_size)
    for start in rng.permutation(starts):
        stop = min(int(start) + cfg.chunk_size, store.n_obs)
        mine = rows[(rows >= start) & (rows < stop)]
        if len(mine) == 0:
            continue
        X = store.read_rows(mine)
        lib = np.asarray(X.sum(axis=1), dtype=np.float32).ravel()
        Xg = (X @ select).tocsr()
        order = rng.permutation(len(mine))
        for a in range(0, len(order), cfg.batch_size):
            idx = order[a : a + cfg.batch_size]
            if len(idx) < 2:
                continue
            yield (torch.from_numpy(Xg[idx].toarray().astype(np.float32)),
                   torch.from_numpy(lib[idx]), torch.from_numpy(codes[mine[idx]]))


def train_query_studies(atlas: PrototypeAtlas, store: CellStore, batch_key: str,
                        cfg: SurgeryConfig | None = None, seed: int = 0,
                        gene_ids: list[str] | None = None, min_overlap: float = 0.8
                        ) -> tuple[PrototypeAtlas, list[dict]]:
    """Surgery: add the store's unseen studies to the atlas and train only their new rows.

    Loss per mini-batch of query cells (CVAE of method.md §2): NB/ZINB reconstruction with the
    new θ columns + β·KL, plus ``lambda_swav`` × per-study SwAV between two reparameterised
    samples against the frozen prototypes. Encoder, decoder, prototypes, reference rows and θ
    columns are frozen (eval mode: no dropout).

    Args:
        atlas: the reference atlas (not modified).
        store: query counts; ``batch_key`` names each cell's study.
        batch_key: obs column of the study.
        cfg: :class:`SurgeryConfig` (epochs, batch size, lr, optional SwAV weight).
        seed: seeds the new rows, shuffling and the reparameterisation noise.
        gene_ids: the atlas genes' stable ids (default: ``atlas.meta["gene_stable_ids"]``).
        min_overlap: gene overlap below which the store is refused.

    Returns:
        The extended atlas (reference part bit-identical) and per-epoch loss records.

    Raises:
        ScprotoInputError: unknown batch key, too few genes, or no unseen study in the store.
    """
    cfg = cfg or SurgeryConfig()
    studies = store.obs_column(batch_key).astype(str).to_numpy()
    new = sorted(set(studies) - set(atlas.studies))
    if not new:
        raise ScprotoInputError(f"{store.path}: every study in obs[{batch_key!r}] is already in "
                                "the atlas; nothing to map by surgery")
    out = add_studies(atlas, new, seed=seed)
    S = len(atlas.studies)
    lookup = {s: i for i, s in enumerate(out.studies)}
    codes = np.array([lookup[s] for s in studies], dtype=np.int64)
    rows = np.flatnonzero(codes >= S)
    al = align_to_model(store.var, atlas.genes, gene_ids or atlas.meta.get("gene_stable_ids"),
                        min_overlap, source=str(store.path))
    select = gene_selector(al.columns, store.n_vars)

    model = out.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cvae, mcfg = model.cvae, model.config
    new_emb = nn.Parameter(model.state_dict()[_EMB][S:].clone())
    new_theta = (nn.Parameter(model.state_dict()[_THETA][S:].clone())
                 if cvae.likelihood != "mse" else None)
    params = [new_emb] + ([new_theta] if new_theta is not None else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    beta = mcfg.kl_weight if cfg.kl_weight is None else cfg.kl_weight
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    protos = F.normalize(model.prototypes.weight.detach(), dim=1)
    history = []
    for epoch in range(cfg.epochs):
        sums, n = {"loss": 0.0, "cvae": 0.0, "swav": 0.0}, 0
        for x, lib, code in _query_batches(store, rows, select, codes, cfg, rng):
            local = code - S
            emb = _renorm(new_emb)[local]
            x_in = log_normalize_torch(x, lib)
            mu, var = cvae.encode(x_in, emb)
            z = mu + var.sqrt() * torch.randn(mu.shape, generator=gen)
            dec = cvae.decode(z, emb)
            if new_theta is not None:
                dec.theta = torch.exp(new_theta[local])
                dec.lgamma_theta = torch.lgamma(dec.theta)
            cvae_loss = (cvae.reconstruction_nll(dec, x, x_in, lib).mean()
                         + beta * kl_normal(mu, var).mean())
            loss = cvae_loss
            swav = torch.zeros(())
            if cfg.lambda_swav > 0:
                z2 = mu + var.sqrt() * torch.randn(mu.shape, generator=gen)
                scores = torch.stack([F.normalize(z, dim=1) @ protos.T,
                                      F.normalize(z2, dim=1) @ protos.T])
                swav = per_study_swav_loss(scores, local, temperature=mcfg.temperature,
                                           epsilon=mcfg.sinkhorn_epsilon,
                                           n_iters=mcfg.sinkhorn_iterations, hard=mcfg.hard_codes)
                loss = loss + cfg.lambda_swav * swav
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"surgery: non-finite loss at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["loss"] += loss.item()
            sums["cvae"] += cvae_loss.item()
            sums["swav"] += swav.item()
            n += 1
        history.append({"epoch": epoch, **{k: v / max(n, 1) for k, v in sums.items()},
                        "steps": n})
        log.info("surgery epoch %d: %s", epoch, history[-1])
    with torch.no_grad():  # write the trained rows back; reference rows are not assigned to
        cvae.condition_embedding.weight[S:] = _renorm(new_emb.detach())
        if new_theta is not None:
            cvae.log_theta[S:] = new_theta.detach()
    out.meta["surgery"] = {"epochs": cfg.epochs, "config": cfg.model_dump(), "history": history,
                           "n_query_cells": len(rows), "new_studies": new}
    return out, history
