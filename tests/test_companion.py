"""Companion methods (method.md §10): losses on hand-made cases, DEC target, metrics, a short
scGPCL run and an annotation run on real data, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from conftest import data_dir
from typer.testing import CliRunner

from scproto_scale.cli import app
from scproto_scale.companion.annotate import Annotator, balanced_splits
from scproto_scale.companion.cluster_job import resolve_n_clusters
from scproto_scale.companion.encoders import GraphEncoder
from scproto_scale.companion.graph import build_bipartite, sample_neighbors, sample_subgraph
from scproto_scale.companion.inputs import prepare_counts
from scproto_scale.companion.losses import (
    dec_target,
    mls_supcon,
    nt_xent,
    proto_nce,
    student_t_assign,
    supcon,
)
from scproto_scale.companion.scgpcl import fit_scgpcl
from scproto_scale.companion.views import mask_features
from scproto_scale.config import AnnotateHeadConfig, ClusterJobConfig, ScGPCLConfig, load_config
from scproto_scale.errors import ScprotoInputError
from scproto_scale.evaluate.clustering import annotation_scores, clustering_scores

TAU = 0.25


def test_nt_xent_orthogonal_pairs():
    # Two cells, orthogonal, both views identical: positive sim 1/τ, two negatives at 0.
    e = torch.eye(2)
    expected = -math.log(math.exp(1 / TAU) / (math.exp(1 / TAU) + 2))
    assert nt_xent(e, e.clone(), TAU).item() == pytest.approx(expected, rel=1e-5)
    # Swapping the second view's cells makes every positive orthogonal: loss rises.
    assert nt_xent(e, e.flip(0), TAU).item() > expected + 1


def test_proto_nce_on_centroids():
    c = torch.eye(3)
    z = torch.tensor([[2.0, 0, 0], [0, 3.0, 0]])  # normalised inside: on centroids 0 and 1
    a = torch.tensor([0, 1])
    expected = -math.log(math.exp(1 / TAU) / (math.exp(1 / TAU) + 2))
    assert proto_nce(z, [c], [a], TAU).item() == pytest.approx(expected, rel=1e-5)
    # Averaged over granularities: a second, wrong assignment raises the mean.
    wrong = proto_nce(z, [c, c], [a, torch.tensor([2, 2])], TAU).item()
    assert wrong == pytest.approx((expected - math.log(1 / (math.exp(1 / TAU) + 2))) / 2, rel=1e-5)


def test_supcon_hand_case():
    # Cells 0,1 share a label and point the same way; cell 2 alone (no positive: not an anchor).
    z = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]])
    y = torch.tensor([0, 0, 1])
    t = 0.5
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 1))
    assert supcon(z, y, t).item() == pytest.approx(expected, rel=1e-5)
    assert supcon(z, torch.tensor([0, 1, 2]), t).item() == 0.0


def test_mls_supcon_prefers_separated_subspaces():
    y = torch.tensor([0, 0, 1, 1])
    good = torch.tensor([[1.0, 0, 0, 1], [1.0, 0, 0, 1], [0, 1.0, 1, 0], [0, 1.0, 1, 0]])
    bad = torch.tensor([[1.0, 0, 1, 0], [0, 1.0, 0, 1], [1.0, 0, 1, 0], [0, 1.0, 0, 1]])
    assert mls_supcon(good, y, 2, 0.5) < mls_supcon(bad, y, 2, 0.5)
    with pytest.raises(ValueError, match="dims"):
        mls_supcon(good[:, :3], y, 2)


def test_dec_target_and_student_t():
    q = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    f = q.sum(0)
    w = q**2 / f
    p = dec_target(q)
    assert torch.allclose(p, w / w.sum(1, keepdim=True))
    assert torch.allclose(p.sum(1), torch.ones(3))
    assert p[0, 0] > q[0, 0]  # sharpened toward the confident cluster
    mu = torch.tensor([[1.0, 0], [-1.0, 0]])
    q0 = student_t_assign(torch.zeros(1, 2), mu)
    assert torch.allclose(q0, torch.full((1, 2), 0.5))
    q1 = student_t_assign(torch.tensor([[1.0, 0]]), mu)  # d² = 0 and 4 → 1 vs 1/5
    assert q1[0, 0].item() == pytest.approx(1 / (1 + 0.2))


def test_mask_features_rate():
    x = torch.ones(200, 500)
    m = mask_features(x, 0.2, torch.Generator().manual_seed(0))
    assert abs((m == 0).float().mean().item() - 0.2) < 0.01
    with pytest.raises(ValueError):
        mask_features(x, 1.0)


def test_clustering_scores():
    y = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 2)
    pred = np.array([2] * 5 + [0] * 3 + [1] * 2)  # a relabelling
    s = clustering_scores(y, pred)
    assert s == pytest.approx({"nmi": 1.0, "ari": 1.0, "acc": 1.0, "macro_f1": 1.0})
    pred[0] = 0  # one cell of a put in b's cluster
    s = clustering_scores(y, pred)
    assert s["acc"] == pytest.approx(0.9)
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    a = annotation_scores(np.array(["a", "b", "b"]), proba, np.array(["a", "b", "c"]))
    assert a["top1"] == pytest.approx(1 / 3) and a["top3"] == 1.0


@pytest.mark.data
def test_scgpcl_short_run_on_10x_pbmc(tmp_path):
    # Short honest run: 3 pre-training + 3 DEC epochs on 2,000 cells of the 10X PBMC set.
    src = data_dir() / "scdcc_10x_pbmc_4271_top2000" / "scdcc_10x_pbmc_4271_top2000.h5ad"
    a = ad.read_h5ad(src)
    sc.pp.subsample(a, n_obs=2000, random_state=0)
    path = tmp_path / "pbmc.h5ad"
    a.write_h5ad(path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{path: {path}, label_key: cell_type}}\n"
                   "scgpcl: {pretrain_epochs: 3, warmup_epochs: 1, dec_max_epochs: 3, num_threads: 2}\n")
    out = tmp_path / "out.h5ad"
    r = CliRunner().invoke(app, ["cluster", str(cfg), "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = ad.read_h5ad(out)
    assert res.obs["scgpcl_cluster"].nunique() <= 8
    assert res.obsm["X_scgpcl"].shape == (2000, 32)
    s = clustering_scores(res.obs["cell_type"].to_numpy(), res.obs["scgpcl_cluster"].to_numpy())
    # k-means on 50 PCs of this set reaches NMI ≈ 0.7; 6 epochs already clearly cluster.
    assert s["nmi"] > 0.5 and s["ari"] > 0.35


def _toy_graph(seed: int = 0):
    X = sp.random(300, 120, density=0.15, format="csr", random_state=seed, dtype=np.float32)
    X = (X + sp.eye(300, 120, format="csr", dtype=np.float32)).tocsr()  # no empty cell
    return X, build_bipartite(X)


def test_neighbor_sampler_fanout_and_edges():
    X, g = _toy_graph()
    deg = np.diff(X.indptr)
    nodes = np.array([5, 7, 5, 11])  # a repeated node is sampled independently
    pos, e = sample_neighbors(g.cell_indptr, g.cell_genes, nodes, 3, np.random.default_rng(0))
    for i, c in enumerate(nodes):
        genes = g.cell_genes[e[pos == i]]
        if deg[c] <= 3:
            assert sorted(genes) == sorted(X[c].indices)
        else:
            assert 1 <= len(genes) <= 3 and len(set(genes)) == len(genes)
        assert np.all(X[c, genes].toarray() > 0)  # only real edges
    # A fan-out at least the degree returns every edge of the node, with its weight.
    pos, e = sample_neighbors(g.cell_indptr, g.cell_genes, np.array([5]), 10_000, np.random.default_rng(0))
    assert np.array_equal(np.sort(g.cell_genes[e]), np.sort(X[5].indices))
    assert np.allclose(g.cell_w[e].sum(), X[5].sum())


def test_subgraph_sampler_deterministic_and_consistent():
    X, g = _toy_graph()
    targets = np.array([3, 1, 200, 42])
    a = sample_subgraph(g, targets, [4, 3], np.random.default_rng(7))
    b = sample_subgraph(g, targets, [4, 3], np.random.default_rng(7))
    c = sample_subgraph(g, targets, [4, 3], np.random.default_rng(8))
    for k in ("cells", "genes", "g2c", "g2c_w", "c2g", "c2g_w"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    assert not (np.array_equal(a.g2c, c.g2c) and np.array_equal(a.c2g, c.c2g))
    assert np.array_equal(a.cells[:4], targets) and len(np.unique(a.cells)) == len(a.cells)
    assert len(np.unique(a.genes)) == len(a.genes)
    # Every sampled edge is an expressed (cell, gene) pair carrying its log-expression weight.
    dense = X.toarray()
    assert np.allclose(dense[a.cells[a.g2c[1]], a.genes[a.g2c[0]]], a.g2c_w) and (a.g2c_w > 0).all()
    assert np.allclose(dense[a.cells[a.c2g[0]], a.genes[a.c2g[1]]], a.c2g_w) and (a.c2g_w > 0).all()
    assert set(a.g2c[1]) <= set(range(4))  # hop 1 only expands the targets
    assert np.bincount(a.g2c[1]).max() <= 4 and np.bincount(a.c2g[1]).max() <= 3
    enc = GraphEncoder(120, [32, 16], 8, n_layers=2)
    rows = X[a.cells]
    cell_h = enc.cell_input(torch.from_numpy(rows.indices.astype(np.int64)),
                            torch.from_numpy(rows.indptr[:-1].astype(np.int64)),
                            torch.from_numpy(rows.data))
    edges = {"g2c": (torch.from_numpy(a.g2c), torch.from_numpy(a.g2c_w)),
             "c2g": (torch.from_numpy(a.c2g), torch.from_numpy(a.c2g_w)), "n_targets": 4}
    out = enc(cell_h, torch.from_numpy(a.genes), edges)
    assert out.shape == (4, 8) and torch.isfinite(out).all()
    out.sum().backward()  # gradients reach the cell projection and the gene embeddings
    assert enc.cell_in.weight.grad.abs().sum() > 0 and enc.gene_in.weight.grad.abs().sum() > 0


@pytest.mark.data
def test_scgpcl_graph_encoder_clusters_10x_pbmc():
    # The bipartite-graph encoder on 1,000 real cells (8 types): far above chance (NMI ≈ 0), and
    # the same seed gives the same clusters.
    src = data_dir() / "scdcc_10x_pbmc_4271_top2000" / "scdcc_10x_pbmc_4271_top2000.h5ad"
    a = ad.read_h5ad(src)
    sc.pp.subsample(a, n_obs=1000, random_state=0)
    y = a.obs["cell_type"].astype(str).to_numpy()
    data = prepare_counts(a, 2000, "10x_pbmc")
    cfg = ScGPCLConfig(encoder="graph", pretrain_epochs=3, warmup_epochs=1, dec_max_epochs=2,
                       num_threads=1)  # 1 thread: 2 threads on a loaded 2-core box are far slower
    r1 = fit_scgpcl(data, 8, cfg, seed=0)
    assert r1.embedding.shape == (1000, cfg.latent_dim)
    s = clustering_scores(y, r1.labels)
    print("graph encoder, 1,000 cells:", s)
    assert s["nmi"] > 0.35 and s["ari"] > 0.2, s
    short = cfg.model_copy(update={"pretrain_epochs": 1, "dec_max_epochs": 0, "early_stop_ari": None})
    r2, r3 = fit_scgpcl(data, 8, short, seed=0), fit_scgpcl(data, 8, short, seed=0)
    assert np.array_equal(r2.labels, r3.labels) and np.allclose(r2.embedding, r3.embedding)


@pytest.mark.data
def test_annotation_head_on_kang(tmp_path):
    src = data_dir() / "kang2018_ifnb_muscat_example" / "kang2018_ifnb_muscat_example.h5ad"
    a = ad.read_h5ad(src)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=20, random_state=0)
    z, y = a.obsm["X_pca"], a.obs["cell_type"].astype(str).to_numpy()
    split = balanced_splits(y, cells_per_type=60, n_splits=1, seed=0)[0]
    for head in ("none", "mlp_cl", "mls_cl"):
        ann = Annotator(AnnotateHeadConfig(head=head, epochs=60, num_threads=2), seed=0)
        s = ann.fit(z[split.train], y[split.train]).score(z[split.test], y[split.test])
        # 5 types (chance 0.2), 30 test cells; logistic regression on z alone reaches ~0.97,
        # the heads 0.6–0.97 depending on training length (see benchmarks/annotation.py).
        assert s["top1"] > 0.5 and s["top3"] >= s["top1"] and s["n_scored"] == 30, (head, s)
    # Unknown labels at prediction time: warned about and left out, not a crash.
    y_q = y[split.test].copy()
    y_q[:3] = "never seen"
    with pytest.warns(UserWarning, match="never seen"):
        s = ann.score(z[split.test], y_q)
    assert s["n_unknown"] == 3
    with pytest.raises(ScprotoInputError, match="harmonise"):
        ann.score(z[:2], np.array(["x", "y"]))


def test_bad_input():
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    from scproto_scale.companion.inputs import CountInput

    data = CountInput(x=x, counts=np.ones_like(x), size_factor=np.ones(5, np.float32), genes=None)
    with pytest.raises(ScprotoInputError, match="only 5 cells"):
        fit_scgpcl(data, 6, ScGPCLConfig())
    with pytest.raises(ScprotoInputError, match="log-normalised"):
        fit_scgpcl(data, 2, ScGPCLConfig(encoder="graph"))  # no CountInput.logx
    with pytest.raises(ScprotoInputError, match="express none"):
        build_bipartite(sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)))
    a = ad.AnnData(X=np.ones((4, 2), np.float32))
    a.obs["t"] = ["a", "b", "c", "d"]
    with pytest.raises(ScprotoInputError, match="only 4 cells"):
        resolve_n_clusters(a, None, 9, "x.h5ad")
    with pytest.raises(ScprotoInputError, match="no column 'cell_type'"):
        resolve_n_clusters(a, "cell_type", None, "x.h5ad")
    with pytest.raises(ScprotoInputError, match=r"'rare' \(2\)"):
        balanced_splits(np.array(["big"] * 20 + ["rare"] * 2), cells_per_type=None)
    with pytest.raises(ScprotoInputError, match="only 1 training cell"):
        Annotator(AnnotateHeadConfig()).fit(x, np.array(["a", "a", "b", "b", "c"]))


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs" / "cluster").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_cluster_configs_validate(path):
    cfg = load_config(path, ["scgpcl.pretrain_epochs=2"], model=ClusterJobConfig)
    assert cfg.scgpcl.pretrain_epochs == 2 and cfg.data.label_key
    with pytest.raises(ScprotoInputError, match=r"scgpcl\.tau"):
        load_config(path, ["scgpcl.tau=-1"], model=ClusterJobConfig)
