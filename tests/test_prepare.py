"""Tests of `prepare` (library sizes → seurat_v3 HVG → PCA → KNN) on real zarr / SOMA stores.

The artefacts are checked against independent references computed in memory from the same
counts: scanpy's ``flavor="seurat_v3"`` HVG selection, ``sklearn.decomposition.PCA`` and a
brute-force exact Euclidean KNN.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scproto_scale.config import PrepareConfig
from scproto_scale.data.ingest import ingest
from scproto_scale.data.store import open_store
from scproto_scale.errors import ScprotoInputError
from scproto_scale.prepare.artefacts import FORMAT_VERSION, Prepared
from scproto_scale.prepare.knn import knn, knn_per_study, resolve_scope
from scproto_scale.prepare.run import prepare
from scproto_scale.simulate import simulate_atlas

pytestmark = pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")

N_CELLS, N_GENES = 1500, 400
CFG = PrepareConfig(n_top_genes=150, n_pcs=20, n_neighbors=15, chunk_size=400)
ARRAYS = ["library_size", "study_codes", "cells", "pca", "knn_indices", "knn_distances"]
FILES = ["prepare.json", "gene_stats.csv", *(f"{a}.npy" for a in ARRAYS)]


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> tuple[Path, ad.AnnData]:
    d = tmp_path_factory.mktemp("atlas")
    a = simulate_atlas(n_cells=N_CELLS, n_genes=N_GENES, n_studies=3, n_cell_types=5,
                       rare_fraction=0.01, seed=0)
    a.uns = {}
    a.write_h5ad(d / "atlas.h5ad")
    return d / "atlas.h5ad", a


@pytest.fixture(scope="module")
def stores(atlas, tmp_path_factory):
    h5ad, _ = atlas
    d = tmp_path_factory.mktemp("stores")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return {fmt: open_store(ingest(h5ad, d / f"atlas.{fmt}")) for fmt in ("zarr", "soma")}


ELAPSED: dict[str, float] = {}  # seconds of the first (computing) prepare call


@pytest.fixture(scope="module")
def prepared(stores, tmp_path_factory) -> Prepared:
    out = tmp_path_factory.mktemp("prep_zarr") / "atlas.prepared"
    t0 = time.perf_counter()
    p = prepare(stores["zarr"], out, "study", CFG, seed=0)
    ELAPSED["zarr"] = time.perf_counter() - t0
    return p


@pytest.fixture(scope="module")
def prepared_soma(stores, tmp_path_factory) -> Prepared:
    out = tmp_path_factory.mktemp("prep_soma") / "atlas.prepared"
    return prepare(stores["soma"], out, "study", CFG, seed=0)


@pytest.fixture(scope="module")
def lognorm_hvg(atlas, prepared) -> np.ndarray:
    """Dense float64 log1p(x / l · 1e4) of the kept cells × selected genes (l over all genes)."""
    _, a = atlas
    X = sp.csr_matrix(a.X, dtype=np.float64)[np.asarray(prepared.cells)]
    lib = np.asarray(X.sum(axis=1)).ravel()
    sub = X[:, prepared.gene_columns].toarray()
    return np.log1p(sub / lib[:, None] * 1e4)


# --------------------------------------------------------------------------------------------
# artefacts


def test_artefact_files_and_meta(prepared, stores):
    p = prepared
    assert sorted(f.name for f in p.path.iterdir()) == sorted(FILES)
    meta = json.loads((p.path / "prepare.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["store"] == str(stores["zarr"].path)
    assert meta["batch_key"] == "study"
    assert meta["n_obs"] == meta["n_cells"] == N_CELLS
    assert meta["dropped_zero_count_cells"] == 0
    assert meta["studies"] == ["study_0", "study_1", "study_2"]
    assert meta["config"] == CFG.model_dump()
    assert len(meta["genes"]) == len(meta["gene_columns"]) == CFG.n_top_genes
    assert meta["genes"] == [str(g) for g in stores["zarr"].var_names[meta["gene_columns"]]]
    assert meta["gene_columns"] == sorted(meta["gene_columns"])
    assert len(meta["pca_explained_variance"]) == CFG.n_pcs


def test_artefact_shapes_and_dtypes(prepared, atlas):
    _, a = atlas
    p = prepared
    n, k = N_CELLS, CFG.n_neighbors
    expect = {
        "library_size": ((N_CELLS,), np.float32),
        "study_codes": ((N_CELLS,), np.int32),
        "cells": ((n,), np.int64),
        "pca": ((n, CFG.n_pcs), np.float32),
        "knn_indices": ((n, k), np.int32),
        "knn_distances": ((n, k), np.float32),
    }
    for name, (shape, dtype) in expect.items():
        arr = getattr(p, name)
        assert arr.shape == shape, name
        assert arr.dtype == dtype, name
        assert np.isfinite(arr).all(), name
    np.testing.assert_array_equal(p.cells, np.arange(N_CELLS))
    np.testing.assert_allclose(p.library_size, np.asarray(a.X.sum(axis=1)).ravel(), rtol=1e-6)
    study = np.asarray(p.studies)[np.asarray(p.study_codes)]
    np.testing.assert_array_equal(study, a.obs["study"].astype(str).to_numpy())
    assert p.gene_stats.shape[0] == N_GENES
    assert p.gene_stats.index.tolist() == list(a.var_names)
    assert int(p.gene_stats["highly_variable"].sum()) == CFG.n_top_genes


def test_no_self_in_knn(prepared):
    nn = np.asarray(prepared.knn_indices)
    assert not (nn == np.asarray(prepared.cells)[:, None]).any()
    assert all(len(set(row)) == len(row) for row in nn.tolist())  # no repeated neighbour


def test_knn_is_exact(prepared):
    """Default scope on 3 studies is study-balanced; per row and study, the neighbours drawn
    from that study are its exact nearest cells of the saved PCA (up to ties)."""
    p = prepared
    assert p.meta["knn_scope"] == "per_study"  # auto: 3 studies, ⌈15/3⌉ = 5 from each
    X = np.asarray(p.pca, dtype=np.float64)
    cells = np.asarray(p.cells)
    study = np.asarray(p.study_codes)[cells]
    nn = np.searchsorted(cells, np.asarray(p.knn_indices))  # store rows → positions in pca
    assert np.array_equal(cells[nn], p.knn_indices)
    sq = (X * X).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * X @ X.T, 0.0)
    np.fill_diagonal(d2, np.inf)
    d = np.sqrt(d2)
    got = np.take_along_axis(d, nn, axis=1)
    for i in range(len(X)):
        for s in range(3):
            mine = nn[i][study[nn[i]] == s]
            assert len(mine) == 5, (i, s)
            others = np.flatnonzero(study == s)
            kth = np.sort(d[i, others])[len(mine) - 1]
            tol = 1e-4 * (1.0 + kth)
            # every neighbour from study s is within s's exact share-th distance …
            assert (d[i, mine] <= kth + tol).all(), (i, s)
            # … and every cell of s strictly closer than it was returned
            must = others[d[i, others] < kth - tol]
            assert set(must.tolist()) <= set(mine.tolist()), (i, s)
    # saved distances are Euclidean (not squared), nearest first
    np.testing.assert_allclose(p.knn_distances, got, rtol=1e-3, atol=1e-3)
    assert (np.diff(np.asarray(p.knn_distances), axis=1) >= -1e-5).all()
    assert (np.diff(np.asarray(p.knn_distances), axis=1) >= -1e-4).all()


def test_pca_matches_sklearn(prepared, lognorm_hvg):
    from sklearn.decomposition import PCA

    ref = PCA(n_components=CFG.n_pcs, svd_solver="full").fit(lognorm_hvg)
    np.testing.assert_allclose(prepared.meta["pca_explained_variance"],
                               ref.explained_variance_, rtol=1e-4)
    want = ref.transform(lognorm_hvg)
    got = np.asarray(prepared.pca, dtype=np.float64)
    signs = np.sign((got * want).sum(axis=0))
    assert (signs != 0).all()
    np.testing.assert_allclose(got, want * signs, atol=1e-3)


def test_hvg_matches_scanpy(prepared, atlas):
    sc = pytest.importorskip("scanpy")
    pytest.importorskip("skmisc.loess")
    _, a = atlas
    ref = ad.AnnData(X=sp.csr_matrix(a.X[np.asarray(prepared.cells)]), obs=a.obs.copy(),
                     var=a.var.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hv = sc.pp.highly_variable_genes(ref, flavor="seurat_v3", n_top_genes=CFG.n_top_genes,
                                         batch_key="study", span=CFG.hvg_span, inplace=False)
    want = list(ref.var_names[hv["highly_variable"].to_numpy()])
    assert prepared.genes == want
    stats = prepared.gene_stats
    np.testing.assert_array_equal(stats["highly_variable"].to_numpy(),
                                  hv["highly_variable"].to_numpy())
    np.testing.assert_allclose(stats["variances_norm"].to_numpy(),
                               hv["variances_norm"].to_numpy(), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# atomic write, reuse, overwrite


def test_prepare_atomic_reuse_and_overwrite(stores, prepared, tmp_path):
    out = tmp_path / "atlas.prepared"
    p1 = prepare(stores["zarr"], out, "study", CFG)
    assert [f.name for f in tmp_path.iterdir()] == ["atlas.prepared"]  # no temp dir left
    stamp = (out / "prepare.json").stat().st_mtime_ns
    meta1 = json.loads((out / "prepare.json").read_text())

    t0 = time.perf_counter()
    p2 = prepare(stores["zarr"], out, "study", CFG)
    reuse_s = time.perf_counter() - t0
    assert (out / "prepare.json").stat().st_mtime_ns == stamp
    assert reuse_s < 1.0 and reuse_s < ELAPSED["zarr"]
    assert p2.meta == meta1
    for name in ARRAYS:
        assert np.array_equal(getattr(p1, name), getattr(p2, name)), name
        assert np.array_equal(getattr(p1, name), getattr(prepared, name)), name  # deterministic

    time.sleep(0.01)
    p3 = prepare(stores["zarr"], out, "study", CFG, overwrite=True)
    assert (out / "prepare.json").stat().st_mtime_ns != stamp
    assert [f.name for f in tmp_path.iterdir()] == ["atlas.prepared"]
    for name in ARRAYS:
        assert np.array_equal(getattr(p1, name), getattr(p3, name)), name


def test_prepared_load_errors(tmp_path, prepared):
    with pytest.raises(ScprotoInputError, match=r"missing prepare\.json"):
        Prepared.load(tmp_path / "absent")
    meta = dict(prepared.meta)
    meta["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "prepare.json").write_text(json.dumps(meta))
    with pytest.raises(ScprotoInputError, match="re-run prepare"):
        Prepared.load(tmp_path / "old")
    # a directory that lost an array is reported, naming the file (not a bare FileNotFoundError)
    broken = tmp_path / "broken"
    shutil.copytree(prepared.path, broken)
    (broken / "knn_indices.npy").unlink()
    with pytest.raises(ScprotoInputError, match=r"missing \['knn_indices.npy'\]"):
        Prepared.load(broken)


# --------------------------------------------------------------------------------------------
# zarr and SOMA give the same artefacts


def test_zarr_and_soma_prepare_identical(prepared, prepared_soma):
    for name in ARRAYS:
        a, b = getattr(prepared, name), getattr(prepared_soma, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert prepared.gene_stats.equals(prepared_soma.gene_stats)
    skip = {"store", "runtime_s", "versions", "stage_seconds"}
    strip = lambda m: {k: v for k, v in m.items() if k not in skip}  # noqa: E731
    assert strip(prepared.meta) == strip(prepared_soma.meta)


# --------------------------------------------------------------------------------------------
# knn() directly


def exact_knn(X: np.ndarray, k: int) -> np.ndarray:
    X = X.astype(np.float64)
    sq = (X * X).sum(axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * X @ X.T
    np.fill_diagonal(d2, np.inf)
    return np.argsort(d2, axis=1)[:, :k]


def recall(idx: np.ndarray, ref: np.ndarray) -> float:
    k = ref.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(idx.tolist(), ref.tolist(),
                                                                   strict=True)]))


@pytest.mark.parametrize("kind", ["pca_like", "clustered"])
def test_ivf_knn_recall(kind):
    """IVF path (forced with a small ``exact_max_cells``) vs exact search on 4,000 points.

    ``pca_like``: 50-D Gaussian with decaying per-axis scale, like PCA scores;
    ``clustered``: 20 Gaussian clusters in 20-D, like cell types.
    """
    rng = np.random.default_rng(3)
    n, k = 4000, 15
    if kind == "pca_like":
        X = rng.normal(size=(n, 50)) / np.arange(1, 51) ** 0.75
    else:
        X = (3.0 * rng.normal(size=(20, 20)))[rng.integers(0, 20, n)] + rng.normal(size=(n, 20))
    X = X.astype(np.float32)
    idx, dist = knn(X, k=k, exact_max_cells=100, seed=0)
    assert idx.shape == (n, k) and idx.dtype == np.int32 and dist.dtype == np.float32
    assert not (idx == np.arange(n)[:, None]).any()
    assert ((idx >= 0) & (idx < n)).all()
    assert recall(idx, exact_knn(X, k)) >= 0.95
    # reported distances are the true Euclidean distances of the returned points
    true = np.linalg.norm(X[:, None, :].astype(np.float64) - X[idx].astype(np.float64), axis=2)
    np.testing.assert_allclose(dist, true, rtol=1e-3, atol=1e-3)


def test_exact_knn_matches_brute_force():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(800, 10)).astype(np.float32)
    idx, _ = knn(X, k=12)
    assert recall(idx, exact_knn(X, 12)) == 1.0


def test_knn_with_duplicate_points_has_no_self():
    """Many identical rows: self need not be among the k+1 hits, yet no row lists itself."""
    rng = np.random.default_rng(5)
    X = np.concatenate([np.zeros((40, 5)), rng.normal(size=(200, 5))]).astype(np.float32)
    idx, dist = knn(X, k=10)
    assert not (idx == np.arange(len(X))[:, None]).any()
    assert (dist[:40] == 0).all()
    assert (idx[:40] < 40).all()


def test_knn_too_few_points():
    with pytest.raises(ValueError, match="needs more than 10 cells"):
        knn(np.zeros((10, 3), dtype=np.float32), k=10)


def test_knn_per_study_takes_each_studys_nearest_cells():
    """Study-balanced KNN = brute force within each study, ranks interleaved, self excluded."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 5)).astype(np.float32)
    groups = np.repeat([0, 1, 2], [40, 30, 20])
    X[groups == 2] += 3.0  # a shifted study: a plain KNN would rarely reach it
    idx, dist = knn_per_study(X, groups, k=7, method="flat")
    assert idx.shape == (90, 7) and idx.dtype == np.int32
    d2 = ((X[:, None] - X[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    for i in range(90):
        assert i not in idx[i]
        assert np.all(np.diff(dist[i]) >= -1e-6)  # nearest first
        counts = np.bincount(groups[idx[i]], minlength=3)
        assert counts.min() >= 2 and counts.max() <= 3  # ⌊7/3⌋ or ⌈7/3⌉ per study
        for s in range(3):
            mine = idx[i][groups[idx[i]] == s]
            members = np.flatnonzero(groups == s)
            nearest = members[np.argsort(d2[i, members])[: len(mine)]]
            assert set(mine) == set(nearest)
        np.testing.assert_allclose(dist[i], np.sqrt(d2[i, idx[i]]), rtol=1e-4, atol=1e-4)


def test_knn_per_study_names_a_study_too_small():
    X = np.random.default_rng(0).normal(size=(42, 3)).astype(np.float32)
    groups = np.r_[np.zeros(40, int), np.ones(2, int)]
    with pytest.raises(ValueError, match="study code 1 has 2 cells"):
        knn_per_study(X, groups, k=8, method="flat")
    with pytest.raises(ValueError, match="k ≥ the number of studies"):
        knn_per_study(X, np.arange(42) % 3, k=2, method="flat")


def test_auto_knn_scope_is_study_balanced_only_where_it_describes_a_neighbourhood():
    """auto → per_study for a few well-populated studies; all for one study, too many studies
    or a study too small to give its share; an explicit scope is kept; a typo is named."""
    eight = np.repeat(np.arange(8), 100)
    assert resolve_scope("auto", eight, k=50)[0] == "per_study"  # Kang: 8 donors, 7 from each
    assert resolve_scope("auto", np.zeros(100, int), k=50) == ("all", "one study")
    many = np.repeat(np.arange(30), 100)  # 30 studies > 50 // 2
    assert resolve_scope("auto", many, k=50)[0] == "all"
    small = np.r_[np.zeros(100, int), np.ones(7, int)]  # 7 cells ≤ ⌈50/2⌉
    scope, why = resolve_scope("auto", small, k=50)
    assert scope == "all" and "7 cells" in why
    assert resolve_scope("per_study", many, k=50)[0] == "per_study"
    with pytest.raises(ValueError, match="unknown KNN scope 'studies'"):
        resolve_scope("studies", eight, k=50)
