"""scGPCL clustering: prototypical contrastive pre-training, then DEC fine-tuning.

Lee et al. 2023 (Bioinformatics), "Single-cell RNA-seq data clustering with graph prototypical
contrastive learning"; method.md §10. Pre-training loss per minibatch:

    NT-Xent(two feature-masked views, τ) + λ_zinb · ZINB(counts | unmasked cell)
        + λ_proto · ProtoNCE(k-means centroids at g·K for g in granularities)   (after warm-up)

The k-means centroids are recomputed on all cells once per epoch. Pre-training may stop early
when consecutive epochs' k-means labels (at K) agree (ARI > ``early_stop_ari``). DEC (Xie et al.
2016) then fine-tunes encoder and cluster centres with KL(p‖q) + ZINB; the target p is refreshed
once per epoch and training stops when fewer than ``dec_tol`` of the labels change.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from torch import nn

from scproto_scale.companion.encoders import GraphEncoder, MLPEncoder, ZINBDecoder, mlp, zinb_nll
from scproto_scale.companion.graph import BipartiteGraph, build_bipartite, sample_subgraph
from scproto_scale.companion.inputs import CountInput
from scproto_scale.companion.losses import (
    dec_kl,
    dec_target,
    nt_xent,
    proto_nce,
    student_t_assign,
)
from scproto_scale.companion.views import mask_features
from scproto_scale.config import ScGPCLConfig
from scproto_scale.errors import ScprotoInputError

log = logging.getLogger(__name__)


@dataclass
class ClusterResult:
    """Output of :func:`fit_scgpcl`.

    Attributes:
        labels: ``(n,)`` int64 cluster of each cell (argmax of the DEC soft assignment).
        embedding: ``(n, latent_dim)`` float32 encoder output after DEC.
        pretrain_epochs: epochs of contrastive pre-training actually run.
        dec_epochs: DEC epochs actually run.
        history: per-epoch losses and label changes.
        wall_s: seconds from start to end of training.
    """

    labels: np.ndarray
    embedding: np.ndarray
    pretrain_epochs: int
    dec_epochs: int
    history: list[dict] = field(default_factory=list)
    wall_s: float = 0.0


def _kmeans(z: np.ndarray, k: int, seed: int, n_init: int = 10) -> KMeans:
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(z)


class _Model(nn.Module):
    def __init__(self, n_genes: int, cfg: ScGPCLConfig):
        super().__init__()
        if cfg.encoder == "mlp":
            self.encoder: nn.Module = MLPEncoder(n_genes, cfg.hidden_dims, cfg.latent_dim)
        else:
            self.encoder = GraphEncoder(n_genes, cfg.hidden_dims, cfg.latent_dim,
                                        len(cfg.graph_neighbors))
        self.projector = mlp([cfg.latent_dim, cfg.latent_dim, cfg.projection_dim])
        self.decoder = ZINBDecoder(cfg.latent_dim, list(reversed(cfg.hidden_dims)), n_genes)


class _MLPFeed:
    """Encoder inputs of the MLP encoder: rows of the scaled expression, masked per view."""

    def __init__(self, model: _Model, data: CountInput, cfg: ScGPCLConfig):
        self.model, self.cfg = model, cfg
        self.x = torch.from_numpy(data.x)

    def encode(self, idx: np.ndarray, masked: tuple[bool, ...], gen: torch.Generator,
               rng: np.random.Generator) -> list[torch.Tensor]:
        xb = self.x[torch.from_numpy(idx)]
        return [self.model.encoder(mask_features(xb, self.cfg.mask_prob, gen) if m else xb)
                for m in masked]

    def embed_all(self, batch: int = 4096) -> torch.Tensor:
        return torch.cat([self.model.encoder(self.x[s:s + batch])
                          for s in range(0, self.x.shape[0], batch)])


class _GraphFeed:
    """Encoder inputs of the graph encoder: one sampled sub-graph per minibatch (shared by the
    views); a view masks entries of the sub-graph cells' input expression."""

    def __init__(self, model: _Model, data: CountInput, cfg: ScGPCLConfig, seed: int):
        if data.logx is None or data.gene_sd is None:
            raise ScprotoInputError("scgpcl.encoder='graph' needs the log-normalised matrix and "
                                    "its gene sd (CountInput.logx, .gene_sd: set by "
                                    "prepare_counts)")
        self.model, self.cfg, self.seed = model, cfg, seed
        self.graph: BipartiteGraph = build_bipartite(data.logx)
        # Cell inputs: log-expression / per-gene sd (sparse; centring is a constant shift).
        logx = sp.csr_matrix(data.logx, dtype=np.float32)
        self.xin = sp.csr_matrix(logx @ sp.diags((1 / data.gene_sd).astype(np.float32)))
        np.minimum(self.xin.data, 10.0, out=self.xin.data)  # clipped at 10 as the MLP's input

    def _cell_h(self, cells: np.ndarray, mask: bool, gen: torch.Generator | None) -> torch.Tensor:
        rows = self.xin[cells]
        vals = torch.from_numpy(rows.data)
        if mask:
            vals = mask_features(vals, self.cfg.mask_prob, gen)
        return self.model.encoder.cell_input(torch.from_numpy(rows.indices.astype(np.int64)),
                                             torch.from_numpy(rows.indptr[:-1].astype(np.int64)),
                                             vals)

    def _forward(self, cell_h: torch.Tensor, sub) -> torch.Tensor:
        edges = {"g2c": (torch.from_numpy(sub.g2c), torch.from_numpy(sub.g2c_w)),
                 "c2g": (torch.from_numpy(sub.c2g), torch.from_numpy(sub.c2g_w)),
                 "n_targets": sub.n_targets}
        return self.model.encoder(cell_h, torch.from_numpy(sub.genes), edges)

    def encode(self, idx: np.ndarray, masked: tuple[bool, ...], gen: torch.Generator,
               rng: np.random.Generator) -> list[torch.Tensor]:
        sub = sample_subgraph(self.graph, idx, self.cfg.graph_neighbors, rng)
        return [self._forward(self._cell_h(sub.cells, m, gen), sub) for m in masked]

    def embed_all(self, batch: int = 256) -> torch.Tensor:
        # Inference: every gene of a cell on hop 1 (no sampling noise where it matters most),
        # the training fan-outs beyond (as with PyG's NeighborLoader), with a fixed seed.
        rng = np.random.default_rng([self.seed, 1])
        fanouts = [self.graph.n_genes, *self.cfg.graph_neighbors[1:]]
        all_h = self._cell_h(np.arange(self.graph.n_cells), False, None)
        outs = []
        for s in range(0, self.graph.n_cells, batch):
            sub = sample_subgraph(self.graph, np.arange(s, min(s + batch, self.graph.n_cells)),
                                  fanouts, rng)
            outs.append(self._forward(all_h[torch.from_numpy(sub.cells)], sub))
        return torch.cat(outs)


def _embed_all(model: _Model, feed, project: bool = False) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        h = feed.embed_all()
        out = model.projector(h) if project else h
    model.train()
    return out


def _zinb_term(model: _Model, h: torch.Tensor, counts: torch.Tensor, sf: torch.Tensor,
               idx: torch.Tensor, cfg: ScGPCLConfig, gen: torch.Generator) -> torch.Tensor:
    n_genes = counts.shape[1]
    if cfg.zinb_genes_per_step is None or cfg.zinb_genes_per_step >= n_genes:
        return zinb_nll(counts[idx], *model.decoder(h, sf[idx]))
    genes = torch.randperm(n_genes, generator=gen)[:cfg.zinb_genes_per_step]
    return zinb_nll(counts[idx][:, genes], *model.decoder(h, sf[idx], genes))


def fit_scgpcl(data: CountInput, n_clusters: int, cfg: ScGPCLConfig, seed: int = 0) -> ClusterResult:
    """Pre-train the contrastive encoder and fine-tune it with DEC.

    Args:
        data: model inputs from :func:`~scproto_scale.companion.inputs.prepare_counts`.
        n_clusters: K (number of clusters; 1 < K ≤ number of cells).
        cfg: hyper-parameters (:class:`~scproto_scale.config.ScGPCLConfig`).
        seed: seeds torch, the masking RNG, minibatch order and k-means.

    Returns:
        :class:`ClusterResult`.

    Raises:
        ScprotoInputError: K < 2 or K larger than the number of cells.
    """
    n, g = data.x.shape
    if n_clusters < 2:
        raise ScprotoInputError(f"number of clusters must be ≥ 2, got {n_clusters}")
    if n_clusters > n:
        raise ScprotoInputError(f"requested {n_clusters} clusters but the input has only {n} cells")
    grans = sorted({min(n, max(2, round(f * n_clusters))) for f in cfg.granularities})
    if max(grans) < round(max(cfg.granularities) * n_clusters):
        warnings.warn(f"prototype granularities capped at {n} clusters (number of cells)",
                      stacklevel=2)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()

    counts = torch.from_numpy(data.counts)
    sf = torch.from_numpy(data.size_factor)
    model = _Model(g, cfg)
    feed = _MLPFeed(model, data, cfg) if cfg.encoder == "mlp" else _GraphFeed(model, data, cfg, seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    bs = min(cfg.batch_size, n)
    history: list[dict] = []

    prev_labels: np.ndarray | None = None
    epoch = 0
    for epoch in range(1, cfg.pretrain_epochs + 1):
        use_proto = cfg.lambda_proto > 0 and epoch > cfg.warmup_epochs
        need_kmeans = use_proto or cfg.early_stop_ari is not None
        protos: list[tuple[torch.Tensor, torch.Tensor]] = []
        labels_k = None
        if need_kmeans:
            zp = _embed_all(model, feed, project=True).numpy()
            zpn = zp / np.maximum(np.linalg.norm(zp, axis=1, keepdims=True), 1e-12)
            for k in grans:
                km = _kmeans(zpn, k, seed, n_init=3)  # every epoch: cheaper restarts
                protos.append((torch.from_numpy(km.cluster_centers_.astype(np.float32)),
                               torch.from_numpy(km.labels_.astype(np.int64))))
                if k == n_clusters or labels_k is None:
                    labels_k = km.labels_
        sums = {"nt_xent": 0.0, "zinb": 0.0, "proto": 0.0}
        perm = rng.permutation(n)
        n_steps = 0
        for s in range(0, n - 1, bs):
            idx_np = perm[s:s + bs]
            if len(idx_np) < 2:
                continue
            idx = torch.from_numpy(idx_np)
            h1, h2, h = feed.encode(idx_np, (True, True, False), gen, rng)
            l_con = nt_xent(model.projector(h1), model.projector(h2), cfg.tau)
            l_rec = _zinb_term(model, h, counts, sf, idx, cfg, gen)
            loss = l_con + cfg.lambda_zinb * l_rec
            if use_proto:
                zp_b = model.projector(h)
                l_pro = proto_nce(zp_b, [c for c, _ in protos], [a[idx] for _, a in protos], cfg.tau)
                loss = loss + cfg.lambda_proto * l_pro
                sums["proto"] += float(l_pro.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sums["nt_xent"] += float(l_con.detach())
            sums["zinb"] += float(l_rec.detach())
            n_steps += 1
        rec = {"stage": "pretrain", "epoch": epoch, **{k: v / max(n_steps, 1) for k, v in sums.items()}}
        if cfg.early_stop_ari is not None and labels_k is not None:
            if prev_labels is not None:
                rec["kmeans_ari_prev"] = float(adjusted_rand_score(prev_labels, labels_k))
            prev_labels = labels_k
        history.append(rec)
        log.info("pretrain %s", rec)
        if rec.get("kmeans_ari_prev", 0.0) > (cfg.early_stop_ari or 2.0) and epoch > cfg.warmup_epochs:
            break
    pretrain_epochs = epoch

    # DEC: centres from k-means on the encoder output, then KL(p‖q) + ZINB.
    h_all = _embed_all(model, feed).numpy()
    km = _kmeans(h_all, n_clusters, seed)
    mu = nn.Parameter(torch.from_numpy(km.cluster_centers_.astype(np.float32)))
    opt = torch.optim.Adam([*model.encoder.parameters(), *model.decoder.parameters(), mu],
                           lr=cfg.dec_lr)
    labels = km.labels_.astype(np.int64)
    dec_epochs = 0
    for dec_epochs in range(1, cfg.dec_max_epochs + 1):
        with torch.no_grad():
            q_all = student_t_assign(_embed_all(model, feed), mu, cfg.dec_alpha)
        p_all = dec_target(q_all)
        new_labels = q_all.argmax(1).numpy()
        changed = float((new_labels != labels).mean())
        labels = new_labels
        if dec_epochs > 1 and changed < cfg.dec_tol:
            history.append({"stage": "dec", "epoch": dec_epochs, "label_change": changed})
            break
        perm = rng.permutation(n)
        kl_sum, rec_sum, n_steps = 0.0, 0.0, 0
        for s in range(0, n - 1, bs):
            idx_np = perm[s:s + bs]
            if len(idx_np) < 2:
                continue
            idx = torch.from_numpy(idx_np)
            (h,) = feed.encode(idx_np, (False,), gen, rng)
            l_kl = dec_kl(p_all[idx], student_t_assign(h, mu, cfg.dec_alpha))
            l_rec = _zinb_term(model, h, counts, sf, idx, cfg, gen)
            loss = cfg.gamma_dec * l_kl + cfg.lambda_zinb * l_rec
            opt.zero_grad()
            loss.backward()
            opt.step()
            kl_sum += float(l_kl.detach())
            rec_sum += float(l_rec.detach())
            n_steps += 1
        history.append({"stage": "dec", "epoch": dec_epochs, "label_change": changed,
                        "kl": kl_sum / max(n_steps, 1), "zinb": rec_sum / max(n_steps, 1)})
    with torch.no_grad():
        z_final = _embed_all(model, feed)
        labels = student_t_assign(z_final, mu, cfg.dec_alpha).argmax(1).numpy().astype(np.int64)
    return ClusterResult(labels=labels, embedding=z_final.numpy().astype(np.float32),
                         pretrain_epochs=pretrain_epochs, dec_epochs=dec_epochs, history=history,
                         wall_s=time.perf_counter() - t0)
