"""Tests of ``scproto_scale.evaluate.scgraph`` (scGraph; Wang, Leskovec & Regev 2024).

The cross-checks run the reference package ``scgraph-eval==0.1.2`` (``scgraph.scGraph``) with
``only_umap=False`` on the same cells. The package reads an ``.h5ad`` path and expects ``X`` to be
log-normalised already, whereas our function takes raw counts and normalises itself, so the
package gets a temporary h5ad (pytest's ``tmp_path``) whose ``X`` is
``log1p(normalize_total(counts, 1e4))``.

Tolerances. The package averages float32 values (scanpy's PCA scores of the reference, and any
float32 embedding) with a naive float32 sum; we accumulate trimmed means in float64. That moves
the scores by up to ~2e-6 absolute (measured 1.6e-6 on Kang 2018 PBMC, for the float32 random
embedding whose centroids are close to 0; ~1e-8 for the PCA), i.e. more than 1e-6 *relative*
on scores near 0. The default-precision comparison therefore uses an absolute tolerance of 1e-5
(far below the metric's meaningful resolution). With the package's accumulation
(``_CENTROID_ACCUMULATOR = None``) every step is the same computation, and the scores must agree
to 1e-12 relative (measured: <= 2.3e-16).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from scproto_scale.errors import ScprotoInputError
from scproto_scale.evaluate import scgraph as scgraph_module
from scproto_scale.evaluate.scgraph import SCORE_NAMES, scgraph

PACKAGE_COLUMNS = {"rank": "Rank-PCA", "corr": "Corr-PCA", "corr_weighted": "Corr-Weighted"}
KANG = "kang2018_pbmc_ctrl_8donors/kang2018_pbmc_ctrl_8donors.h5ad"
SEED = 0


# ----------------------------------------------------------------------------------------------
# helpers


def _log_normalised(counts: ad.AnnData) -> ad.AnnData:
    """A copy of ``counts`` with ``X = log1p(normalize_total(X, 1e4))``."""
    out = counts.copy()
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


def _add_embeddings(adata: ad.AnnData, n_pcs: int) -> list[str]:
    """Add a PCA of log-normalised data, a noisy copy of it and a random embedding."""
    rng = np.random.default_rng(SEED)
    pca = sc.pp.pca(_log_normalised(adata).X, n_comps=n_pcs)  # float32
    adata.obsm["X_pca"] = pca
    noisy = pca[:, :5].astype(np.float64)
    adata.obsm["X_noisy"] = noisy + 2.0 * noisy.std() * rng.standard_normal(noisy.shape)
    adata.obsm["X_random"] = rng.standard_normal((adata.n_obs, 8)).astype(np.float32)
    return ["X_pca", "X_noisy", "X_random"]


def _run_package(adata: ad.AnnData, keys: list[str], tmp_path: Path) -> pd.DataFrame:
    """scGraph(only_umap=False) of scgraph-eval on a log-normalised h5ad copy of ``adata``."""
    scgraph_pkg = pytest.importorskip("scgraph", reason="scgraph-eval (dev extra) not installed")
    lognorm = _log_normalised(adata)
    package_input = ad.AnnData(
        X=lognorm.X,
        obs=adata.obs[["batch", "cell_type"]].copy(),
        obsm={key: adata.obsm[key] for key in keys},
    )
    path = tmp_path / "scgraph_input.h5ad"
    package_input.write_h5ad(path)
    graph = scgraph_pkg.scGraph(str(path), "batch", "cell_type", only_umap=False)
    return graph.main(keys)


def _compare(ours: dict, package: pd.DataFrame, *, rtol: float, atol: float) -> float:
    """Assert agreement; return the largest absolute difference."""
    worst = 0.0
    for key, scores in ours.items():
        for name in SCORE_NAMES:
            theirs = float(package.loc[key, PACKAGE_COLUMNS[name]])
            assert np.isclose(scores[name], theirs, rtol=rtol, atol=atol), (
                f"{key} {name}: ours {scores[name]!r} vs scgraph-eval {theirs!r}"
            )
            worst = max(worst, abs(scores[name] - theirs))
            print(f"{key:>9} {name:>13}: ours {scores[name]: .12f}  package {theirs: .12f}")
    return worst


def _synthetic_counts(
    n_per_batch: dict[str, int], n_types: int = 5, n_genes: int = 300, seed: int = SEED
) -> ad.AnnData:
    """Poisson counts with type-specific gene programmes and a mild batch effect."""
    rng = np.random.default_rng(seed)
    profiles = rng.gamma(0.5, 1.0, size=(n_types, n_genes))
    blocks, obs = [], []
    for b, (batch, n) in enumerate(n_per_batch.items()):
        types = rng.integers(0, n_types, size=n)
        shift = rng.gamma(20.0, 1.0 / 20.0, size=n_genes)  # per-batch gene scaling
        depth = rng.lognormal(np.log(1000.0 / n_genes), 0.3, size=(n, 1)) * (1 + 0.2 * b)
        blocks.append(rng.poisson(profiles[types] * shift * depth).astype(np.float32))
        obs.append(pd.DataFrame({"batch": batch, "cell_type": [f"type{t}" for t in types]}))
    obs_df = pd.concat(obs, ignore_index=True).astype("category")
    obs_df.index = obs_df.index.astype(str)
    return ad.AnnData(sp.csr_matrix(np.vstack(blocks)), obs=obs_df)


# ----------------------------------------------------------------------------------------------
# cross-check against scgraph-eval


@pytest.fixture(scope="module")
def kang() -> ad.AnnData:
    data_dir = os.environ.get("SCPROTO_DATA_DIR")
    if not data_dir:
        pytest.skip("SCPROTO_DATA_DIR is not set: real-data scGraph cross-check skipped")
    path = Path(data_dir) / KANG
    if not path.exists():
        pytest.skip(f"{path} not found under SCPROTO_DATA_DIR: scGraph cross-check skipped")
    adata = ad.read_h5ad(path)  # 12,261 cells x 1,287 genes, 8 donors: fast enough in full
    adata.obs = adata.obs[["batch", "cell_type"]]
    return adata


@pytest.mark.data
def test_matches_scgraph_eval_on_kang(kang, tmp_path, monkeypatch):
    adata = kang.copy()
    keys = _add_embeddings(adata, n_pcs=20)
    x_before = adata.X.copy()
    obs_before = adata.obs.copy()
    var_before, uns_before = adata.var.copy(), set(adata.uns)

    start = time.perf_counter()
    ours = scgraph(adata, keys, "batch", "cell_type")
    elapsed = time.perf_counter() - start
    package = _run_package(adata, keys, tmp_path)

    worst = _compare(ours, package, rtol=0.0, atol=1e-5)
    print(f"\nscgraph on Kang ({adata.n_obs} cells): {elapsed:.1f} s, max |diff| {worst:.2e}")
    print(pd.DataFrame(ours).T.to_string())
    # sensible ordering: structure-preserving embeddings beat a random one
    assert ours["X_pca"]["corr_weighted"] > 0.9
    assert ours["X_random"]["corr_weighted"] < ours["X_noisy"]["corr_weighted"]
    # the caller's AnnData is untouched
    assert (adata.X != x_before).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    pd.testing.assert_frame_equal(adata.var, var_before)
    assert set(adata.obsm) == set(keys) and not adata.varm and set(adata.uns) == uns_before

    # with the package's float32 accumulation the computation is the same to rounding
    monkeypatch.setattr(scgraph_module, "_CENTROID_ACCUMULATOR", None)
    exact = scgraph(adata, keys, "batch", "cell_type")
    worst_exact = _compare(exact, package, rtol=1e-12, atol=1e-14)
    print(f"package accumulation: max |diff| {worst_exact:.2e}")


def test_matches_scgraph_eval_on_synthetic(tmp_path, monkeypatch):
    """Needs no data: 3 batches, one below min_batch_cells, fewer genes than n_hvg, and two
    types that never share a qualifying batch (a NaN consensus entry the package drops)."""
    adata = _synthetic_counts({"a": 400, "b": 250, "c": 60}, n_types=6)
    obs = adata.obs
    drop = ((obs["batch"] == "a") & (obs["cell_type"] == "type4")) | (
        (obs["batch"] == "b") & (obs["cell_type"] == "type3")
    )
    adata = adata[~drop.to_numpy()].copy()
    keys = _add_embeddings(adata, n_pcs=10)
    package = _run_package(adata, keys, tmp_path)
    _compare(scgraph(adata, keys, "batch", "cell_type"), package, rtol=0.0, atol=1e-5)
    monkeypatch.setattr(scgraph_module, "_CENTROID_ACCUMULATOR", None)
    _compare(scgraph(adata, keys, "batch", "cell_type"), package, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def small() -> ad.AnnData:
    adata = _synthetic_counts({"a": 150, "b": 120}, n_types=4, n_genes=80)
    adata.obsm["emb"] = np.random.default_rng(SEED).standard_normal((adata.n_obs, 3))
    return adata


@pytest.mark.parametrize("which", ["batch", "label"])
def test_missing_obs_key_raises(small, which):
    keys = {"batch": "batch", "label": "cell_type"}
    keys[which] = "no_such_column"
    with pytest.raises(ScprotoInputError, match="no_such_column"):
        scgraph(small, ["emb"], keys["batch"], keys["label"])


def test_missing_embedding_or_layer_raises(small):
    with pytest.raises(ScprotoInputError, match="X_missing"):
        scgraph(small, ["X_missing"], "batch", "cell_type")
    with pytest.raises(ScprotoInputError, match="counts_layer"):
        scgraph(small, ["emb"], "batch", "cell_type", layer="counts_layer")


def test_no_large_batch_warns_and_returns_nan(small):
    with pytest.warns(UserWarning, match=r"no batch .* >= 1000 cells"):
        out = scgraph(small, ["emb"], "batch", "cell_type", min_batch_cells=1000)
    assert set(out["emb"]) == set(SCORE_NAMES)
    assert all(np.isnan(v) for v in out["emb"].values())


def test_too_few_cell_types_warns_and_returns_nan(small):
    small.obs["cell_type"] = np.where(small.obs["cell_type"] == "type0", "type0", "other")
    with pytest.warns(UserWarning, match="cell type"):
        out = scgraph(small, ["emb"], "batch", "cell_type")
    assert all(np.isnan(v) for v in out["emb"].values())


def test_types_only_in_small_batches_warn(small):
    # types 2 and 3 live only in a 30-cell batch: 2 reference types remain (batches a, b
    # keep ~70 cells each, hence min_batch_cells=50)
    rare = small.obs["cell_type"].isin(["type2", "type3"]).to_numpy()
    batch = np.where(rare, "tiny", small.obs["batch"].astype(str))
    small.obs["batch"] = batch
    small.obs["batch"] = small.obs["batch"].astype("category")
    keep = ~rare | (np.cumsum(rare) <= 30)
    small = small[keep].copy()
    with pytest.warns(UserWarning, match=r"occur in batches with >= 50 cells"):
        out = scgraph(small, ["emb"], "batch", "cell_type", min_batch_cells=50)
    assert all(np.isnan(v) for v in out["emb"].values())


def test_per_type_columns_average_to_corr_weighted(small):
    """The per-type terms are the ones Corr-Weighted averages, keyed by the type's name."""
    out = scgraph(small, ["emb"], "batch", "cell_type", per_type=True)["emb"]
    per_type = out["corr_weighted_per_type"]
    assert set(per_type) == set(small.obs["cell_type"].astype(str))
    assert np.nanmean(list(per_type.values())) == pytest.approx(out["corr_weighted"])
    assert "corr_weighted_per_type" not in scgraph(small, ["emb"], "batch", "cell_type")["emb"]
