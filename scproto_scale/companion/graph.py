"""The bipartite cell–gene graph of scGPCL and a seeded, vectorised neighbour sampler over it.

scGPCL (Lee et al. 2023, Bioinformatics; method.md §10) encodes cells with a heterogeneous
GraphSAGE over a bipartite graph: cell i — gene j is an edge when gene j is expressed in cell i
(count > 0), weighted by the log-normalised expression log1p(x_ij / l_i · 1e4). Training is
mini-batched with neighbour sampling (GraphSAGE, Hamilton et al. 2017): for a batch of target
cells, hop 1 samples up to ``fanouts[0]`` of each cell's genes, hop 2 up to ``fanouts[1]`` of
the cells expressing each of those genes, and so on, alternating node types.

torch-geometric's ``NeighborLoader`` needs pyg-lib or torch-sparse, which have no wheels for
the pinned CPU torch, so the sampler here works on the CSR / CSC arrays directly (numpy only,
deterministic given the ``numpy.random.Generator``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from scproto_scale.errors import ScprotoInputError


@dataclass(frozen=True)
class BipartiteGraph:
    """Edges of positive expression between ``n_cells`` cells and ``n_genes`` genes.

    Attributes:
        cell_indptr: ``(n_cells + 1,)`` int64 CSR row pointers (cells → genes).
        cell_genes: ``(E,)`` int64 gene of each edge, cell-major order.
        cell_w: ``(E,)`` float32 edge weight (log-normalised expression), cell-major order.
        gene_indptr: ``(n_genes + 1,)`` int64 CSC column pointers (genes → cells).
        gene_cells: ``(E,)`` int64 cell of each edge, gene-major order.
        gene_w: ``(E,)`` float32 edge weight, gene-major order.
    """

    n_cells: int
    n_genes: int
    cell_indptr: np.ndarray
    cell_genes: np.ndarray
    cell_w: np.ndarray
    gene_indptr: np.ndarray
    gene_cells: np.ndarray
    gene_w: np.ndarray

    @property
    def n_edges(self) -> int:
        return len(self.cell_genes)


def build_bipartite(logx: sp.spmatrix) -> BipartiteGraph:
    """Bipartite graph of a ``(n_cells, n_genes)`` log-normalised expression matrix.

    Args:
        logx: sparse, non-negative; its stored positive entries become the edges and weights.

    Raises:
        ScprotoInputError: negative entries, or a cell with no expressed gene.
    """
    csr = sp.csr_matrix(logx, dtype=np.float32, copy=True)
    csr.eliminate_zeros()
    if csr.data.size and csr.data.min() < 0:
        raise ScprotoInputError("bipartite graph: edge weights (log-normalised expression) must be ≥ 0")
    empty = np.flatnonzero(np.diff(csr.indptr) == 0)
    if empty.size:
        raise ScprotoInputError(f"bipartite graph: {empty.size} cells express none of the genes "
                                f"(e.g. row {int(empty[0])}); filter them first")
    csr.sort_indices()
    csc = csr.tocsc()
    csc.sort_indices()
    return BipartiteGraph(
        n_cells=csr.shape[0], n_genes=csr.shape[1],
        cell_indptr=csr.indptr.astype(np.int64), cell_genes=csr.indices.astype(np.int64),
        cell_w=csr.data, gene_indptr=csc.indptr.astype(np.int64),
        gene_cells=csc.indices.astype(np.int64), gene_w=csc.data)


def sample_neighbors(indptr: np.ndarray, indices: np.ndarray, nodes: np.ndarray, fanout: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``fanout`` distinct neighbours of each node in ``nodes`` (vectorised).

    Nodes with degree ≤ ``fanout`` keep all neighbours; the others draw ``fanout`` neighbour
    positions uniformly with replacement, de-duplicated (so they keep ≤ ``fanout`` distinct ones:
    exact sampling without replacement would cost a random key per edge of every hub gene).

    Args:
        indptr, indices: CSR adjacency of the source side (``indices`` are neighbour ids).
        nodes: ``(m,)`` int64 node ids.
        fanout: neighbours per node (> 0).
        rng: numpy generator (the only randomness).

    Returns:
        ``(pos, edge)``: ``pos`` ``(k,)`` index into ``nodes`` of each sampled edge's node and
        ``edge`` ``(k,)`` int64 position of the edge in ``indices`` (neighbour = indices[edge]).
    """
    start = indptr[nodes]
    deg = indptr[nodes + 1] - start
    small = np.flatnonzero(deg <= fanout)
    cnt = deg[small]
    pos_a = np.repeat(small, cnt)
    offs = np.arange(int(cnt.sum()), dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    edge_a = np.repeat(start[small], cnt) + offs
    big = np.flatnonzero(deg > fanout)
    draw = (rng.random((len(big), fanout)) * deg[big, None]).astype(np.int64)
    # De-duplicate (node, edge) pairs; the key keeps repeated nodes in ``nodes`` apart.
    key = np.unique((np.arange(len(big), dtype=np.int64)[:, None] * len(indices)
                     + start[big, None] + draw).ravel())
    pos_b, edge_b = big[key // len(indices)], key % len(indices)
    return np.concatenate([pos_a, pos_b]), np.concatenate([edge_a, edge_b])


def _append_nodes(existing: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``existing`` followed by the ids of ``new`` not yet in it (first-seen order), and the
    local index of every entry of ``new`` in the result."""
    allids = np.concatenate([existing, new])
    uniq, first = np.unique(allids, return_index=True)
    order = np.sort(first)  # existing nodes keep their positions
    combined = allids[order]
    local_of_sorted = np.empty(len(uniq), np.int64)
    local_of_sorted[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    local_new = local_of_sorted[np.searchsorted(uniq, new)]
    return combined, local_new


@dataclass
class SubGraph:
    """A sampled neighbourhood of a batch of target cells.

    Attributes:
        cells: ``(n_c,)`` int64 global cell ids; the first ``n_targets`` are the targets in order.
        genes: ``(n_g,)`` int64 global gene ids.
        g2c: ``(2, e1)`` int64 local (gene, cell) index pairs of gene → cell messages.
        g2c_w: ``(e1,)`` float32 weights of those edges.
        c2g: ``(2, e2)`` int64 local (cell, gene) index pairs of cell → gene messages.
        c2g_w: ``(e2,)`` float32 weights.
        n_targets: number of target cells.
    """

    cells: np.ndarray
    genes: np.ndarray
    g2c: np.ndarray
    g2c_w: np.ndarray
    c2g: np.ndarray
    c2g_w: np.ndarray
    n_targets: int


def sample_subgraph(graph: BipartiteGraph, targets: np.ndarray, fanouts: list[int],
                    rng: np.random.Generator) -> SubGraph:
    """Sample the ``len(fanouts)``-hop neighbourhood of ``targets`` (cells → genes → cells …).

    Hop h's frontier is the set of nodes first reached at hop h − 1 (the targets for hop 0), as
    in GraphSAGE / PyG's ``NeighborLoader``; hop h samples ``fanouts[h]`` neighbours per node.

    Raises:
        ScprotoInputError: empty or out-of-range targets, or a fan-out < 1.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if targets.size == 0 or targets.min() < 0 or targets.max() >= graph.n_cells:
        raise ScprotoInputError(f"subgraph targets must be cell ids in [0, {graph.n_cells})")
    if any(f < 1 for f in fanouts):
        raise ScprotoInputError(f"neighbour fan-outs must be ≥ 1, got {fanouts}")
    # nodes[t] / edges[t] / weights[t]: t = 0 cells, 1 genes; edges[0] are gene → cell messages
    # (local (gene, cell) pairs), edges[1] cell → gene messages (local (cell, gene) pairs).
    nodes = [targets.copy(), np.empty(0, np.int64)]
    edges: list[list[np.ndarray]] = [[], []]
    weights: list[list[np.ndarray]] = [[], []]
    adjacency = [(graph.cell_indptr, graph.cell_genes, graph.cell_w),
                 (graph.gene_indptr, graph.gene_cells, graph.gene_w)]
    frontier = np.arange(len(targets))  # local ids of the nodes to expand
    for hop, fan in enumerate(fanouts):
        if frontier.size == 0:
            break
        src, dst = hop % 2, 1 - hop % 2  # expand src-type nodes into dst-type neighbours
        indptr, nbr, w = adjacency[src]
        pos, e = sample_neighbors(indptr, nbr, nodes[src][frontier], fan, rng)
        n_before = len(nodes[dst])
        nodes[dst], local = _append_nodes(nodes[dst], nbr[e])
        edges[src].append(np.stack([local, frontier[pos]]))  # message neighbour → frontier node
        weights[src].append(w[e])
        frontier = np.arange(n_before, len(nodes[dst]))

    def cat(parts: list[np.ndarray], shape: tuple, dtype) -> np.ndarray:
        return np.concatenate(parts, axis=-1).astype(dtype) if parts else np.zeros(shape, dtype)

    return SubGraph(cells=nodes[0], genes=nodes[1], g2c=cat(edges[0], (2, 0), np.int64),
                    g2c_w=cat(weights[0], (0,), np.float32), c2g=cat(edges[1], (2, 0), np.int64),
                    c2g_w=cat(weights[1], (0,), np.float32), n_targets=len(targets))
