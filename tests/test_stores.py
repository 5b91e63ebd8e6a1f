"""Tests of the on-disk cell stores: h5ad → zarr v3 / TileDB-SOMA ingest and the `CellStore` reads.

Every store is real (zarr v3 and TileDB-SOMA written under pytest's ``tmp_path``); every read is
compared with the h5ad it came from, exactly (counts as CSR, zero differences). The real-data test
needs ``SCPROTO_DATA_DIR`` (the shared data directory) and is skipped without it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scproto_scale.data.ingest import ingest
from scproto_scale.data.soma_store import SomaCellStore
from scproto_scale.data.store import CellStore, detect_format, open_store
from scproto_scale.data.zarr_store import ZarrCellStore
from scproto_scale.errors import ScprotoInputError
from scproto_scale.simulate import simulate_atlas

FORMATS = ["zarr", "soma"]
N_CELLS, N_GENES = 1500, 400
KANG = "kang2018_pbmc_ctrl_8donors"

pytestmark = pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")


def small_atlas() -> ad.AnnData:
    """The small synthetic atlas of these tests, with extra obs columns of other dtypes."""
    a = simulate_atlas(n_cells=N_CELLS, n_genes=N_GENES, n_studies=3, n_cell_types=5,
                       rare_fraction=0.01, seed=0)
    a.obs["n_counts"] = np.asarray(a.X.sum(axis=1)).ravel().astype(np.float64)
    a.obs["position"] = np.arange(a.n_obs, dtype=np.int64)
    a.uns = {}
    return a


def assert_csr_equal(got: sp.spmatrix, want: sp.spmatrix) -> None:
    """Same shape, float32 CSR, and not one differing entry."""
    assert sp.issparse(got) and got.format == "csr", type(got)
    assert got.dtype == np.float32
    assert got.shape == want.shape
    assert (sp.csr_matrix(got) != sp.csr_matrix(want, dtype=np.float32)).nnz == 0


def leftovers(directory: Path) -> list[str]:
    """Hidden entries (temporary store names start with a dot) in a directory."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def write_chunked_anndata_zarr(a: ad.AnnData, path: Path, zarr_format: int, chunk: int) -> None:
    """An AnnData zarr store of ``a`` written by anndata with X/data and X/indices in small
    chunks (as other tools write them), not by our ingest."""
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.io.write_elem(root, "obs", a.obs)
        ad.io.write_elem(root, "var", a.var)
        ad.io.write_elem(root, "X", sp.csr_matrix(a.X), dataset_kwargs={"chunks": (chunk,)})
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> tuple[Path, ad.AnnData]:
    """The h5ad on disk and its in-memory AnnData (CSR X)."""
    d = tmp_path_factory.mktemp("atlas")
    a = small_atlas()
    path = d / "atlas.h5ad"
    a.write_h5ad(path)
    return path, ad.read_h5ad(path)


@pytest.fixture(scope="module")
def stores(atlas, tmp_path_factory) -> dict[str, CellStore]:
    """The atlas ingested once into each format, and opened with `open_store`."""
    h5ad, _ = atlas
    d = tmp_path_factory.mktemp("stores")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fmt in FORMATS:
            target = ingest(h5ad, d / f"atlas.{fmt}")
            assert target == d / f"atlas.{fmt}"
            out[fmt] = open_store(target)
    return out


# --------------------------------------------------------------------------------------------
# format detection


def test_open_store_detects_both_formats(stores):
    assert detect_format(stores["zarr"].path) == "zarr"
    assert detect_format(stores["soma"].path) == "soma"
    assert isinstance(stores["zarr"], ZarrCellStore)
    assert isinstance(stores["soma"], SomaCellStore)


def test_detect_format_h5ad_and_others(atlas, tmp_path):
    h5ad, _ = atlas
    assert detect_format(h5ad) == "h5ad"
    with pytest.raises(ScprotoInputError, match="ingest"):
        open_store(h5ad)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ScprotoInputError, match="neither an AnnData zarr store nor a SOMA"):
        detect_format(tmp_path / "empty_dir")
    (tmp_path / "counts.csv").write_text("a,b\n")
    with pytest.raises(ScprotoInputError, match=r"not \.h5ad"):
        detect_format(tmp_path / "counts.csv")


# --------------------------------------------------------------------------------------------
# reads equal the h5ad


@pytest.mark.parametrize("fmt", FORMATS)
def test_shape_and_var_names(stores, atlas, fmt):
    _, a = atlas
    s = stores[fmt]
    assert s.n_obs == a.n_obs == N_CELLS
    assert s.n_vars == a.n_vars == N_GENES
    pd.testing.assert_index_equal(s.var_names, a.var_names, exact=False)
    assert list(s.var_names) == list(a.var_names)


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_all_rows(stores, atlas, fmt):
    _, a = atlas
    assert_csr_equal(stores[fmt].read_rows(np.arange(a.n_obs)), a.X)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "rows",
    [
        [0],
        [N_CELLS - 1],
        [737],
        [0, N_CELLS - 1],
        [3, 7, 100, 101, 102, 999, 1499],
        list(range(0, N_CELLS, 97)),
        list(range(250, 260)),  # contiguous
        [],
    ],
    ids=["first", "last", "single", "ends", "mixed", "strided", "contiguous", "empty"],
)
def test_read_rows_fixed_subsets(stores, atlas, fmt, rows):
    _, a = atlas
    rows = np.asarray(rows, dtype=np.int64)
    got = stores[fmt].read_rows(rows)
    assert got.shape == (len(rows), N_GENES)
    assert_csr_equal(got, a.X[rows])


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_read_rows_random_sorted_subsets(stores, atlas, fmt, data):
    _, a = atlas
    rows = data.draw(st.sets(st.integers(0, N_CELLS - 1), max_size=300))
    rows = np.array(sorted(rows), dtype=np.int64)
    assert_csr_equal(stores[fmt].read_rows(rows), a.X[rows])


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.integers(0, N_CELLS), length=st.integers(0, 400))
def test_read_slice(stores, atlas, fmt, start, length):
    _, a = atlas
    stop = min(start + length, N_CELLS)
    assert_csr_equal(stores[fmt].read_slice(start, stop), a.X[start:stop])


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.integers(0, N_CELLS - 1), max_size=200))
def test_read_rows_unsorted(stores, atlas, fmt, rows):
    _, a = atlas
    rows = np.asarray(rows, dtype=np.int64)
    assert_csr_equal(stores[fmt].read_rows_unsorted(rows), a.X[rows])


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_rows_unsorted_repeats_and_reverse(stores, atlas, fmt):
    _, a = atlas
    rows = np.array([1499, 5, 5, 5, 0, 1499, 700, 3, 2, 1], dtype=np.int64)
    assert_csr_equal(stores[fmt].read_rows_unsorted(rows), a.X[rows])
    rev = np.arange(N_CELLS)[::-1]
    assert_csr_equal(stores[fmt].read_rows_unsorted(rev), a.X[rev])


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.integers(0, N_CELLS - 1), max_size=300),
       columns=st.lists(st.integers(-1, N_GENES - 1), min_size=1, max_size=60, unique=True))
def test_read_dense_gene_aligned(stores, atlas, fmt, rows, columns):
    """The loader's read: any rows (repeats, any order), model gene order, −1 → zeros."""
    _, a = atlas
    rows = np.asarray(rows, dtype=np.int64)
    columns = np.asarray(columns, dtype=np.int64)
    want = np.zeros((len(rows), len(columns)), dtype=np.float32)
    ok = columns >= 0
    want[:, ok] = a.X[rows][:, columns[ok]].toarray()
    got = stores[fmt].read_dense(rows, columns)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


def test_read_dense_all_genes_many_chunks(atlas, tmp_path):
    """The chunk-scatter path over small chunks and a 2-chunk LRU (runs cross chunk borders)."""
    _, a = atlas
    path = tmp_path / "small_chunks.zarr"
    write_chunked_anndata_zarr(a, path, zarr_format=3, chunk=777)
    s = ZarrCellStore(path, cache_bytes=1)
    rows = np.random.default_rng(1).integers(0, N_CELLS, 2_000)
    np.testing.assert_array_equal(s.read_dense(rows, np.arange(N_GENES)), a.X[rows].toarray())
    with pytest.raises(IndexError):
        s.read_dense(np.array([0, N_CELLS]), np.arange(3))


@pytest.mark.parametrize(("chunk", "span"), [(777, 1 << 18), (777, 300), (50_000, 1 << 18)])
def test_read_dense_pread_path_on_an_uncompressed_store(atlas, tmp_path, monkeypatch, chunk,
                                                         span):
    """An uncompressed store (the training cache) is read with pread: runs crossing chunk files,
    runs merged into spans, spans split by the buffer length, repeats and any order."""
    import scproto_scale.data.zarr_store as zs
    from scproto_scale.data.writers import ZarrCSRWriter

    _, a = atlas
    path = tmp_path / "raw.zarr"
    w = ZarrCSRWriter(path, a.var, chunk_elems=chunk, compress=False)
    w.append(sp.csr_matrix(a.X))
    w.finish(a.obs[["study"]].reset_index(drop=True))
    monkeypatch.setattr(zs, "SPAN_ELEMENTS", span)
    s = ZarrCellStore(path)
    assert s._raw is not None
    rows = np.random.default_rng(2).integers(0, N_CELLS, 3_000)
    rows[:50] = np.arange(100, 150)  # adjacent rows: one span
    columns = np.random.default_rng(3).permutation(N_GENES)[:150]
    columns[:5] = -1
    want = np.zeros((len(rows), len(columns)), dtype=np.float32)
    ok = columns >= 0
    want[:, ok] = a.X[rows][:, columns[ok]].toarray()
    np.testing.assert_array_equal(s.read_dense(rows, columns), want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_rows_out_of_range(stores, fmt):
    with pytest.raises(IndexError):
        stores[fmt].read_rows(np.array([N_CELLS]))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("chunk_size", [1, 333, 512, N_CELLS, 10_000])
def test_iter_chunks(stores, atlas, fmt, chunk_size):
    _, a = atlas
    if chunk_size == 1:  # one row at a time: check only the first rows
        it = stores[fmt].iter_chunks(chunk_size)
        for i, (start, stop, X) in zip(range(5), it, strict=False):
            assert (start, stop) == (i, i + 1)
            assert_csr_equal(X, a.X[i : i + 1])
        return
    chunks = list(stores[fmt].iter_chunks(chunk_size))
    bounds = [(s, e) for s, e, _ in chunks]
    expect = [(s, min(s + chunk_size, N_CELLS)) for s in range(0, N_CELLS, chunk_size)]
    assert bounds == expect
    for s, e, X in chunks:
        assert X.shape == (e - s, N_GENES)
    assert_csr_equal(sp.vstack([X for *_, X in chunks], format="csr"), a.X)


@pytest.mark.parametrize("fmt", FORMATS)
def test_obs_columns_equal(stores, atlas, fmt):
    _, a = atlas
    s = stores[fmt]
    assert set(a.obs.columns) <= set(s.obs_columns())
    for col in a.obs.columns:
        got = s.obs_column(col)
        want = a.obs[col].reset_index(drop=True)
        assert len(got) == s.n_obs
        assert isinstance(got.index, pd.RangeIndex)
        if isinstance(want.dtype, pd.CategoricalDtype):
            assert isinstance(got.dtype, pd.CategoricalDtype), (col, got.dtype)
            assert list(got.cat.categories) == list(want.cat.categories), col
            assert np.array_equal(got.cat.codes.to_numpy(), want.cat.codes.to_numpy()), col
        else:
            assert np.array_equal(got.to_numpy(), want.to_numpy()), col
            assert got.dtype == want.dtype, (col, got.dtype, want.dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_obs_column_returns_a_copy(stores, fmt):
    s = stores[fmt]
    col = s.obs_column("position")
    col.iloc[0] = -1
    assert s.obs_column("position").iloc[0] == 0


# --------------------------------------------------------------------------------------------
# the zarr store is zarr v3 AnnData


def test_zarr_store_is_v3_and_anndata_readable(stores, atlas):
    _, a = atlas
    path = stores["zarr"].path
    assert (path / "zarr.json").is_file()
    assert not (path / ".zgroup").exists()
    g = zarr.open_group(str(path), mode="r")
    assert g.metadata.zarr_format == 3
    assert g["X"]["data"].metadata.zarr_format == 3
    assert g["X"].attrs["encoding-type"] == "csr_matrix"
    back = ad.read_zarr(path)
    assert sp.issparse(back.X)
    assert back.X.dtype == np.float32
    assert_csr_equal(sp.csr_matrix(back.X), a.X)
    pd.testing.assert_frame_equal(back.obs, a.obs)
    pd.testing.assert_frame_equal(back.var, a.var)


def test_zarr_v2_small_chunks_tiny_cache(atlas, tmp_path):
    """A zarr v2 AnnData store with many small chunks, read through a 2-chunk LRU cache."""
    _, a = atlas
    path = tmp_path / "v2.zarr"
    write_chunked_anndata_zarr(a, path, zarr_format=2, chunk=5000)
    assert detect_format(path) == "zarr"
    s = ZarrCellStore(path, cache_bytes=1)
    assert s._data.max_chunks == 2 and s._data.chunk == 5000
    assert_csr_equal(s.read_rows(np.arange(N_CELLS)), a.X)
    rng = np.random.default_rng(0)
    for _ in range(5):  # scattered rows: chunks are evicted and decoded again
        rows = np.sort(rng.choice(N_CELLS, 300, replace=False))
        assert_csr_equal(s.read_rows(rows), a.X[rows])
    rows = rng.integers(0, N_CELLS, 500)
    assert_csr_equal(s.read_rows_unsorted(rows), a.X[rows])


# --------------------------------------------------------------------------------------------
# dense X input


@pytest.mark.parametrize("fmt", FORMATS)
def test_dense_x_ingest(atlas, tmp_path, fmt):
    _, a = atlas
    dense = ad.AnnData(X=a.X.toarray(), obs=a.obs[["study", "cell_type"]].copy(),
                       var=a.var[[]].copy())
    src = tmp_path / "dense.h5ad"
    dense.write_h5ad(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = open_store(ingest(src, tmp_path / f"dense.{fmt}", chunk_size=400))
    assert s.n_obs == a.n_obs
    assert list(s.var_names) == list(a.var_names)
    X = s.read_rows(np.arange(s.n_obs))
    assert_csr_equal(X, a.X)
    assert X.nnz == a.X.nnz  # the zeros of the dense matrix are not stored
    assert list(s.obs_column("study").astype(str)) == list(a.obs["study"].astype(str))
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# atomic writes


@pytest.fixture(scope="module")
def nan_h5ad(atlas, tmp_path_factory) -> Path:
    """The atlas with one NaN in a late row (after several ingest chunks were written)."""
    _, a = atlas
    X = a.X.copy()
    row = 1234
    X.data[X.indptr[row] + 1] = np.nan
    bad = ad.AnnData(X=X, obs=a.obs.copy(), var=a.var.copy())
    path = tmp_path_factory.mktemp("nan") / "nan.h5ad"
    bad.write_h5ad(path)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_ingest_leaves_nothing(nan_h5ad, tmp_path, fmt):
    target = tmp_path / f"out.{fmt}"
    with pytest.raises(ScprotoInputError, match=r"NaN/inf.*row 1234") as e:
        ingest(nan_h5ad, target, chunk_size=200)
    assert str(nan_h5ad) in str(e.value)
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_overwrite_keeps_previous_store(atlas, stores, nan_h5ad, tmp_path, fmt):
    """A failing ``overwrite=True`` ingest leaves the existing store whole and readable."""
    _, a = atlas
    h5ad, _ = atlas
    target = tmp_path / f"out.{fmt}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ingest(h5ad, target)
        with pytest.raises(ScprotoInputError, match="NaN/inf"):
            ingest(nan_h5ad, target, overwrite=True, chunk_size=200)
    assert leftovers(tmp_path) == []
    assert_csr_equal(open_store(target).read_rows(np.arange(N_CELLS)), a.X)


def test_existing_target_needs_overwrite(atlas, tmp_path):
    h5ad, a = atlas
    target = tmp_path / "out.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ingest(h5ad, target)
        with pytest.raises(ScprotoInputError, match=r"exists.*overwrite"):
            ingest(h5ad, target)
        ingest(h5ad, target, overwrite=True)
    assert_csr_equal(open_store(target).read_rows(np.arange(N_CELLS)), a.X)
    assert leftovers(tmp_path) == []


def test_unknown_store_format(atlas, tmp_path):
    h5ad, _ = atlas
    with pytest.raises(ScprotoInputError, match="'parquet'"):
        ingest(h5ad, tmp_path / "out", fmt="parquet")


# --------------------------------------------------------------------------------------------
# real data


def real_h5ad(name: str) -> Path:
    data_dir = os.environ.get("SCPROTO_DATA_DIR")
    if not data_dir:
        pytest.skip("SCPROTO_DATA_DIR is not set: real-data store tests skipped")
    path = Path(data_dir) / name / f"{name}.h5ad"
    if not path.exists():
        pytest.skip(f"{path} not found under SCPROTO_DATA_DIR={data_dir}")
    return path


@pytest.mark.data
def test_real_data_ingest_and_read(tmp_path):
    src = real_h5ad(KANG)
    a = ad.read_h5ad(src)
    X = sp.csr_matrix(a.X, dtype=np.float32)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(a.n_obs, 2000, replace=False))
    shuffled = rng.permutation(np.concatenate([rows[:500], rows[:100]]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fmt in FORMATS:
            s = open_store(ingest(src, tmp_path / f"kang.{fmt}"))
            assert detect_format(s.path) == fmt
            assert (s.n_obs, s.n_vars) == a.shape
            assert list(s.var_names) == list(a.var_names)
            assert_csr_equal(s.read_rows(rows), X[rows])
            assert_csr_equal(s.read_rows_unsorted(shuffled), X[shuffled])
            for col in ("batch", "cell_type"):
                got = s.obs_column(col).astype(str).to_numpy()
                assert np.array_equal(got, a.obs[col].astype(str).to_numpy()), (fmt, col)
    assert leftovers(tmp_path) == []
