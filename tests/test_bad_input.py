"""Bad input is a `ScprotoInputError` whose message names the problem (file, column, key, value).

Covers missing inputs, unknown obs columns, non-count values (non-integer, negative, NaN, inf),
duplicate gene ids, cells with zero counts (dropped with a warning, never a neighbour) and
configuration errors. All stores are real (zarr / TileDB-SOMA under ``tmp_path``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from scproto_scale.config import PrepareConfig, load_config
from scproto_scale.data.ingest import ingest
from scproto_scale.data.store import detect_format, open_store
from scproto_scale.data.zarr_store import ZarrCellStore
from scproto_scale.errors import ScprotoInputError
from scproto_scale.prepare.run import prepare
from scproto_scale.simulate import simulate_atlas

pytestmark = pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")

# small enough to be quick, large enough for HVG (loess) and KNN on 3 studies
CFG = PrepareConfig(n_top_genes=100, n_pcs=10, n_neighbors=10, chunk_size=256)


@pytest.fixture(scope="module")
def base_adata() -> ad.AnnData:
    a = simulate_atlas(n_cells=600, n_genes=200, n_studies=3, n_cell_types=4,
                       rare_fraction=0.02, seed=1)
    a.uns = {}
    return a


def write_zarr_direct(a: ad.AnnData, path: Path) -> Path:
    """An AnnData zarr store written by anndata itself (no ingest-time validation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_zarr(path)
    return path


def with_x(a: ad.AnnData, X: sp.csr_matrix) -> ad.AnnData:
    return ad.AnnData(X=sp.csr_matrix(X, dtype=np.float32), obs=a.obs.copy(), var=a.var.copy())


def set_value(a: ad.AnnData, row: int, value: float) -> ad.AnnData:
    """A copy of ``a`` with the first stored value of ``row`` replaced."""
    X = a.X.copy()
    X.data[X.indptr[row]] = value
    return with_x(a, X)


@pytest.fixture(scope="module")
def good_zarr(base_adata, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("good")
    base_adata.write_h5ad(d / "good.h5ad")
    return ingest(d / "good.h5ad", d / "good.zarr")


# --------------------------------------------------------------------------------------------
# missing inputs


@pytest.mark.parametrize("name", ["nope.zarr", "nope.soma", "nope.h5ad", "nope"])
def test_missing_store_path(tmp_path, name):
    missing = tmp_path / name
    for fn in (open_store, detect_format):
        with pytest.raises(ScprotoInputError, match="input not found") as e:
            fn(missing)
        assert str(missing) in str(e.value)


def test_missing_ingest_input(tmp_path):
    missing = tmp_path / "absent.h5ad"
    for fmt in ("zarr", "soma"):
        with pytest.raises(ScprotoInputError, match="input not found") as e:
            ingest(missing, tmp_path / f"out.{fmt}")
        assert str(missing) in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_ingest_input_not_h5ad(tmp_path):
    src = tmp_path / "counts.csv"
    src.write_text("a,b\n1,2\n")
    with pytest.raises(ScprotoInputError, match=r"counts\.csv.*\.h5ad"):
        ingest(src, tmp_path / "out.zarr")


def test_zarr_store_without_x(tmp_path):
    path = tmp_path / "nox.zarr"
    zarr.open_group(str(path), mode="w", zarr_format=3)
    with pytest.raises(ScprotoInputError, match="has no X") as e:
        open_store(path)
    assert str(path) in str(e.value)


def test_zarr_store_with_dense_x(base_adata, tmp_path):
    dense = ad.AnnData(X=base_adata.X.toarray(), obs=base_adata.obs.copy(),
                       var=base_adata.var.copy())
    path = write_zarr_direct(dense, tmp_path / "dense.zarr")
    with pytest.raises(ScprotoInputError, match="expected a CSR matrix"):
        open_store(path)


# --------------------------------------------------------------------------------------------
# obs columns


def test_unknown_obs_column(good_zarr):
    s = open_store(good_zarr)
    with pytest.raises(ScprotoInputError, match="'nope'") as e:
        s.obs_column("nope")
    msg = str(e.value)
    assert str(good_zarr) in msg and "study" in msg  # names the store and lists the columns


def test_prepare_unknown_batch_key(good_zarr, tmp_path):
    out = tmp_path / "prep"
    with pytest.raises(ScprotoInputError, match="obs column 'nope' not found"):
        prepare(open_store(good_zarr), out, batch_key="nope", config=CFG)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_prepare_missing_batch_values(base_adata, tmp_path):
    a = base_adata.copy()
    a.obs["study_gaps"] = a.obs["study"].astype(str)
    a.obs.loc[a.obs_names[[3, 4]], "study_gaps"] = None
    a.write_h5ad(tmp_path / "gaps.h5ad")
    s = open_store(ingest(tmp_path / "gaps.h5ad", tmp_path / "gaps.zarr"))
    with pytest.raises(ScprotoInputError, match=r"obs\['study_gaps'\] has 2 missing values"):
        prepare(s, tmp_path / "prep", batch_key="study_gaps", config=CFG)


@pytest.fixture(scope="module")
def atlas_job():
    return pytest.importorskip("pipelines.atlas_job")


def run_config(path: Path, **data):
    return load_config(base={"data": {"path": str(path), "batch_key": "study", **data}})


def test_open_input_validates_keys(atlas_job, good_zarr, tmp_path):
    store = atlas_job.open_input(run_config(good_zarr, label_key="cell_type"), tmp_path)
    assert store.n_obs == 600
    with pytest.raises(ScprotoInputError, match=r"data\.batch_key='nope'") as e:
        atlas_job.open_input(run_config(good_zarr, batch_key="nope"), tmp_path)
    assert str(good_zarr) in str(e.value) and "cell_type" in str(e.value)
    with pytest.raises(ScprotoInputError, match=r"data\.label_key='celltype'"):
        atlas_job.open_input(run_config(good_zarr, label_key="celltype"), tmp_path)


def test_open_input_missing_path(atlas_job, tmp_path, monkeypatch):
    with pytest.raises(ScprotoInputError, match="input not found") as e:
        atlas_job.open_input(run_config(tmp_path / "absent.h5ad"), tmp_path / "out")
    assert "absent.h5ad" in str(e.value)
    monkeypatch.delenv("SCPROTO_UNSET_VAR_FOR_TEST", raising=False)
    with pytest.raises(ScprotoInputError, match="SCPROTO_UNSET_VAR_FOR_TEST"):
        atlas_job.open_input(run_config("$SCPROTO_UNSET_VAR_FOR_TEST/x.h5ad"), tmp_path)


# --------------------------------------------------------------------------------------------
# values that are not counts


@pytest.fixture(scope="module")
def fractional_zarr(base_adata, tmp_path_factory) -> Path:
    X = base_adata.X.copy()
    X.data = X.data * np.float32(0.5)  # half of the values become x.5
    return write_zarr_direct(with_x(base_adata, X), tmp_path_factory.mktemp("frac") / "f.zarr")


def test_prepare_non_integer_counts(fractional_zarr, tmp_path):
    out = tmp_path / "prep"
    with pytest.raises(ScprotoInputError, match="non-integer values") as e:
        prepare(open_store(fractional_zarr), out, "study", CFG, require_integer=True)
    assert str(fractional_zarr) in str(e.value)
    assert "row " in str(e.value) and "likelihood='mse'" in str(e.value)
    assert not out.exists()


def test_prepare_non_integer_allowed(fractional_zarr, tmp_path):
    with pytest.warns(UserWarning, match="non-integers"):
        p = prepare(open_store(fractional_zarr), tmp_path / "prep", "study", CFG,
                    require_integer=False)
    assert p.pca.shape == (600, CFG.n_pcs)
    assert p.knn_indices.shape == (600, CFG.n_neighbors)


def test_ingest_accepts_non_integer(base_adata, tmp_path):
    """Ingest does not require integers (normalised input is allowed with likelihood=mse)."""
    X = base_adata.X.copy()
    X.data = X.data * np.float32(0.5)
    with_x(base_adata, X).write_h5ad(tmp_path / "f.h5ad")
    s = open_store(ingest(tmp_path / "f.h5ad", tmp_path / "f.zarr"))
    assert (s.read_rows(np.arange(s.n_obs)) != X).nnz == 0


BAD_VALUES = [(-1.0, "negative values"), (np.nan, "NaN/inf values"), (np.inf, "NaN/inf values"),
              (-np.inf, "NaN/inf values")]


@pytest.mark.parametrize("fmt", ["zarr", "soma"])
@pytest.mark.parametrize(("value", "what"), BAD_VALUES, ids=["neg", "nan", "inf", "-inf"])
def test_ingest_rejects_bad_values(base_adata, tmp_path, fmt, value, what):
    src = tmp_path / "bad.h5ad"
    set_value(base_adata, 321, value).write_h5ad(src)
    target = tmp_path / f"bad.{fmt}"
    with pytest.raises(ScprotoInputError, match=what) as e:
        ingest(src, target, chunk_size=100)
    assert str(src) in str(e.value) and "row 321" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5ad"]


@pytest.mark.parametrize("require_integer", [True, False])
@pytest.mark.parametrize(("value", "what"), BAD_VALUES, ids=["neg", "nan", "inf", "-inf"])
def test_prepare_rejects_bad_values(base_adata, tmp_path, value, what, require_integer):
    path = write_zarr_direct(set_value(base_adata, 321, value), tmp_path / "bad.zarr")
    out = tmp_path / "prep"
    with pytest.raises(ScprotoInputError, match=what) as e:
        prepare(open_store(path), out, "study", CFG, require_integer=require_integer)
    assert str(path) in str(e.value) and "row 321" in str(e.value)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zarr"]


# --------------------------------------------------------------------------------------------
# duplicate gene ids


@pytest.fixture(scope="module")
def dup_adata(base_adata) -> ad.AnnData:
    a = base_adata.copy()
    names = list(a.var_names)
    names[10] = names[3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.var_names = names
    return a


@pytest.mark.parametrize("fmt", ["zarr", "soma"])
def test_ingest_duplicate_genes(dup_adata, tmp_path, fmt):
    src = tmp_path / "dup.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dup_adata.write_h5ad(src)
        with pytest.raises(ScprotoInputError, match="duplicate gene ids") as e:
            ingest(src, tmp_path / f"dup.{fmt}")
    assert str(src) in str(e.value) and repr(dup_adata.var_names[3]) in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup.h5ad"]


def test_zarr_store_duplicate_genes(dup_adata, tmp_path):
    path = write_zarr_direct(dup_adata, tmp_path / "dup.zarr")
    for opener in (ZarrCellStore, open_store):
        with pytest.raises(ScprotoInputError, match="duplicate gene ids") as e:
            opener(path)
        assert str(path) in str(e.value) and repr(dup_adata.var_names[3]) in str(e.value)


# --------------------------------------------------------------------------------------------
# cells with zero counts

ZERO_ROWS = np.array([0, 5, 6, 250, 599])


@pytest.fixture(scope="module")
def zero_prepared(base_adata, tmp_path_factory):
    d = tmp_path_factory.mktemp("zero")
    X = base_adata.X.tolil()
    X[ZERO_ROWS] = 0
    X = sp.csr_matrix(X)
    X.eliminate_zeros()
    a = with_x(base_adata, X)
    assert (np.asarray(a.X.sum(axis=1)).ravel() == 0).sum() == len(ZERO_ROWS)
    a.write_h5ad(d / "zero.h5ad")
    store = open_store(ingest(d / "zero.h5ad", d / "zero.zarr"))
    with pytest.warns(UserWarning, match=f"dropping {len(ZERO_ROWS)} cells with zero counts") as w:
        p = prepare(store, d / "prep", "study", CFG)
    return p, store, a, w


def test_zero_count_cells_dropped(zero_prepared):
    p, store, a, w = zero_prepared
    msg = next(str(x.message) for x in w if "zero counts" in str(x.message))
    assert str(store.path) in msg and "[0, 5, 6, 250, 599]" in msg
    assert p.meta["dropped_zero_count_cells"] == len(ZERO_ROWS)
    assert p.meta["n_cells"] == a.n_obs - len(ZERO_ROWS)
    assert p.meta["n_obs"] == a.n_obs
    np.testing.assert_array_equal(p.cells, np.setdiff1d(np.arange(a.n_obs), ZERO_ROWS))
    assert p.pca.shape == (len(p.cells), CFG.n_pcs)
    assert np.all(np.asarray(p.library_size)[ZERO_ROWS] == 0)


def test_knn_never_references_zero_count_cells(zero_prepared):
    p, *_ = zero_prepared
    nn = np.asarray(p.knn_indices)
    assert nn.shape == (len(p.cells), CFG.n_neighbors)
    assert not np.isin(nn, ZERO_ROWS).any()
    assert np.isin(nn, p.cells).all()
    assert not (nn == np.asarray(p.cells)[:, None]).any()


def test_too_few_cells_with_counts(base_adata, tmp_path):
    X = base_adata.X.tolil()
    X[CFG.n_neighbors :] = 0
    path = write_zarr_direct(with_x(base_adata, sp.csr_matrix(X)), tmp_path / "few.zarr")
    with pytest.warns(UserWarning, match="zero counts"), \
            pytest.raises(ScprotoInputError, match=r"10 cells with counts.*n_neighbors=10"):
        prepare(open_store(path), tmp_path / "prep", "study", CFG)


# --------------------------------------------------------------------------------------------
# configuration

BASE = {"data": {"path": "x.zarr", "batch_key": "study"}}


def test_config_valid_and_overrides():
    cfg = load_config(base=BASE, overrides=["train.epochs=3", "prepare.n_top_genes=500",
                                            "data.label_key=cell_type"])
    assert cfg.train.epochs == 3 and cfg.prepare.n_top_genes == 500
    assert cfg.data.label_key == "cell_type"


def test_config_unknown_key():
    with pytest.raises(ScprotoInputError, match=r"train\.epoch: Extra inputs") as e:
        load_config(base=BASE, overrides=["train.epoch=3"])
    assert "train.epochs" not in str(e.value)


def test_config_unknown_section_key_in_base():
    with pytest.raises(ScprotoInputError, match=r"model\.latent: Extra inputs"):
        load_config(base={**BASE, "model": {"latent": 3}})


@pytest.mark.parametrize(("override", "key"), [
    ("train.epochs=abc", "train.epochs"),
    ("train.lr=fast", "train.lr"),
    ("model.likelihood=poisson", "model.likelihood"),
    ("train.epochs=-1", "train.epochs"),
    ("prepare.hvg_span=1.5", "prepare.hvg_span"),
])
def test_config_ill_typed(override, key):
    value = override.split("=", 1)[1]
    with pytest.raises(ScprotoInputError, match="invalid config") as e:
        load_config(base=BASE, overrides=[override])
    assert f"{key}:" in str(e.value) and value in str(e.value)


@pytest.mark.parametrize("override", ["train.epochs", "train.epochs 3", "train.epochs:3"])
def test_config_malformed_override(override):
    with pytest.raises(ScprotoInputError, match=r"key\.sub=value") as e:
        load_config(base=BASE, overrides=[override])
    assert repr(override) in str(e.value)


def test_config_override_into_a_value():
    with pytest.raises(ScprotoInputError, match="'epochs' is not a section"):
        load_config(base=BASE, overrides=["train.epochs=3", "train.epochs.x=1"])


def test_config_missing_required_key():
    with pytest.raises(ScprotoInputError, match=r"data\.batch_key: Field required"):
        load_config(base={"data": {"path": "x.zarr"}})


def test_config_file_errors(tmp_path):
    with pytest.raises(ScprotoInputError, match="config file not found") as e:
        load_config(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(e.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  path: x.zarr\n  batch_key: study\ntrain:\n  epoch: 3\n")
    with pytest.raises(ScprotoInputError, match=r"train\.epoch: Extra inputs") as e:
        load_config(bad)
    assert str(bad) in str(e.value)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ScprotoInputError, match="top level must be a mapping"):
        load_config(listy)


def test_load_config_does_not_mutate_base():
    base = {"data": {"path": "x.zarr", "batch_key": "study"}}
    load_config(base=base, overrides=["data.batch_key=donor"])
    assert base == {"data": {"path": "x.zarr", "batch_key": "study"}}


def test_a_study_with_one_cell_is_named(tmp_path):
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(2.0, size=(120, 50)).astype(np.float32))
    study = ["a"] * 60 + ["b"] * 59 + ["lonely_study"]
    a = ad.AnnData(X=X, obs={"study": study})
    a.obs_names = [f"c{i}" for i in range(120)]
    a.var_names = [f"g{i}" for i in range(50)]
    a.write_h5ad(tmp_path / "x.h5ad")
    store = open_store(ingest(tmp_path / "x.h5ad", tmp_path / "x.zarr"))
    with pytest.raises(ScprotoInputError, match="lonely_study"):
        prepare(store, tmp_path / "p", "study")
