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


# Edge types of the bipartite graph (torch-geometric's (src, relation, dst) convention).
G2C = ("gene", "expressed_in", "cell")
C2G = ("cell", "expresses", "gene")


class GraphEncoder(nn.Module):
    """Heterogeneous GraphSAGE over a sampled bipartite cell–gene subgraph (scGPCL's encoder).

    Node inputs: a cell's input is a linear map of its expression row (log-normalised, divided by
    each gene's sd: the MLP encoder's z-scored input up to a constant absorbed in the bias),
    computed as a weighted ``embedding_bag`` sum over the expressed genes only; a gene's input is
    a learned embedding. Each of ``n_layers`` layers is a torch-geometric ``HeteroConv`` with one
    ``GraphConv(aggr="mean")`` per edge type: ``W_root x_i + W_nbr · mean_j(w_ij x_j)``, i.e. the
    GraphSAGE mean aggregator with scGPCL's edge weights (PyG's ``SAGEConv`` takes no edge
    weights), followed by BatchNorm and ReLU per node type. A linear map gives the latent.

    Shapes: ``forward(cell_h, gene_ids, sub)`` with ``cell_h`` ``(n_c, hidden_dims[0])`` from
    :meth:`cell_input`, returns ``(sub.n_targets, latent_dim)``.
    """

    def __init__(self, n_genes: int, hidden_dims: list[int], latent_dim: int, n_layers: int):
        super().__init__()
        from torch_geometric.nn import GraphConv, HeteroConv

        h0, h = hidden_dims[0], hidden_dims[-1]
        self.cell_in = nn.EmbeddingBag(n_genes, h0, mode="sum")
        self.cell_bias = nn.Parameter(torch.zeros(h0))
        self.gene_in = nn.Embedding(n_genes, h0)
        self.in_norm = nn.ModuleDict({"cell": nn.BatchNorm1d(h0), "gene": nn.BatchNorm1d(h0)})
        dims = [h0] + [h] * n_layers
        self.convs = nn.ModuleList(
            HeteroConv({G2C: GraphConv(a, b, aggr="mean"), C2G: GraphConv(a, b, aggr="mean")},
                       aggr="sum")
            for a, b in itertools.pairwise(dims))
        self.norms = nn.ModuleList(
            nn.ModuleDict({"cell": nn.BatchNorm1d(b), "gene": nn.BatchNorm1d(b)}) for b in dims[1:])
        self.out = nn.Linear(h, latent_dim)

    def cell_input(self, genes: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor
                   ) -> torch.Tensor:
        """CSR rows (``genes`` int64 column ids, ``offsets`` ``(n_c,)`` row starts, ``values``
        float32) of the cells' scaled expression → ``(n_c, hidden_dims[0])``."""
        return self.cell_in(genes, offsets, per_sample_weights=values) + self.cell_bias

    def forward(self, cell_h: torch.Tensor, gene_ids: torch.Tensor, edges: dict) -> torch.Tensor:
        """Args: ``cell_h`` from :meth:`cell_input` (sub-graph cells, targets first);
        ``gene_ids`` ``(n_g,)`` global ids of the sub-graph genes; ``edges`` ``{"g2c": (index
        (2, e), weight (e,)), "c2g": …, "n_targets": int}`` in local indices."""
        xs = {"cell": F.relu(self.in_norm["cell"](cell_h)),
              "gene": F.relu(self.in_norm["gene"](self.gene_in(gene_ids)))}
        ei = {G2C: edges["g2c"][0], C2G: edges["c2g"][0]}
        ew = {G2C: edges["g2c"][1], C2G: edges["c2g"][1]}
        for conv, norm in zip(self.convs, self.norms, strict=True):
            out = conv(xs, ei, edge_weight_dict=ew)
            xs = {t: F.relu(norm[t](out[t])) if t in out else xs[t] for t in xs}
        return self.out(xs["cell"][:edges["n_targets"]])
