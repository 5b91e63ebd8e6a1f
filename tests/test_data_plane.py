"""The atlas-scale data plane: streaming generator, Census-schema SOMA, training cache,
randomized PCA, KNN index choices, and faults (corrupt chunks, gene coverage, dead workers)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scproto_scale.config import PrepareConfig, TrainConfig
from scproto_scale.data.loader import ViewLoader, align_store_genes
from scproto_scale.data.sampler import StudyStratifiedSampler
from scproto_scale.data.soma_store import SomaCellStore
from scproto_scale.data.store import CellStore, PrefixStore, open_store
from scproto_scale.data.zarr_store import ZarrCellStore
from scproto_scale.errors import ScprotoInputError
from scproto_scale.prepare.cache import locality_order
from scproto_scale.prepare.knn import knn, knn_recall
from scproto_scale.prepare.pca import fit_pca
from scproto_scale.prepare.run import prepare
from scproto_scale.simulate_scale import write_scaled_atlas
from scproto_scale.train.loop import build_loader


@pytest.fixture(scope="module")
def scaled(tmp_path_factory) -> dict:
    """3,000 cells × 20,000 genes, 12 studies: the same cells as zarr and Census-layout SOMA."""
    d = tmp_path_factory.mktemp("scaled")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = write_scaled_atlas(d / "a.zarr", d / "a.soma", n_cells=3_000, n_genes=20_000,
                                     n_studies=12, rare_fractions=(0.01, 0.004), seed=3)
    return {"dir": d, "summary": summary, "zarr": d / "a.zarr", "soma": d / "a.soma"}


# ---------------------------------------------------------------------------- generator

def test_scaled_generator_sparsity_studies_rare_types(scaled):
    s = scaled["summary"]
    assert 1_000 <= s["median_nnz_per_cell"] <= 2_000  # realistic sparsity over 20k genes
    lo, _, hi = s["study_size_min_median_max"]
    assert hi / lo >= 20  # study sizes spread widely (100× in expectation)
    assert s["type_counts"]["rare_0"] == 30 and 0 < s["type_counts"]["rare_1"] <= 12
    z = open_store(scaled["zarr"])
    assert z.n_obs == 3_000 and z.n_vars == 20_000
    X = z.read_slice(0, 3_000)
    assert X.nnz == s["nnz"] and (X.data > 0).all() and (X.data == np.round(X.data)).all()
    assert (np.asarray(X.sum(1)).ravel() > 0).all()
    obs = {c: z.obs_column(c) for c in ("study", "dataset_id", "assay", "tissue", "cell_type",
                                         "is_primary_data")}
    assert obs["study"].nunique() == 12 and (obs["study"] == obs["dataset_id"]).all()


def test_scaled_generator_is_seeded(scaled, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_scaled_atlas(tmp_path / "b.zarr", None, n_cells=3_000, n_genes=20_000,
                           n_studies=12, rare_fractions=(0.01, 0.004), seed=3)
    a, b = open_store(scaled["zarr"]), open_store(tmp_path / "b.zarr")
    rows = np.arange(0, 3_000, 7)
    assert (a.read_rows(rows) != b.read_rows(rows)).nnz == 0


# ---------------------------------------------------------------------------- Census SOMA

def test_census_schema_soma_query(scaled):
    """obs value_filter + a gene list, as a Census axis_query, equals the filtered zarr rows."""
    import tiledbsoma

    with tiledbsoma.Experiment.open(str(scaled["soma"])) as exp:
        obs_cols = {f.name for f in exp.obs.schema}
        var_cols = {f.name for f in exp.ms["RNA"].var.schema}
        assert {"soma_joinid", "dataset_id", "assay", "tissue", "cell_type",
                "is_primary_data"} <= obs_cols
        assert {"feature_id", "feature_name"} <= var_cols and "raw" in exp.ms["RNA"].X
    z = open_store(scaled["zarr"])
    tissue = z.obs_column("tissue").astype(str)
    primary = z.obs_column("is_primary_data").to_numpy()
    t = tissue.value_counts().index[0]
    want = np.flatnonzero((tissue.to_numpy() == t) & primary)
    genes = list(z.var_names[[5, 17, 400, 12_000, 19_999, 3]])  # not in store order
    flt = f"tissue == '{t}' and is_primary_data == True"
    s = SomaCellStore(scaled["soma"], obs_value_filter=flt, genes=genes)
    assert s.n_obs == len(want) and list(s.var_names) == genes
    cols = z.var_names.get_indexer(genes)
    expected = z.read_rows(want)[:, cols]
    got = s.read_rows(np.arange(s.n_obs))
    assert abs(got - expected).max() == 0
    assert (s.obs_column("cell_type").astype(str).to_numpy()
            == z.obs_column("cell_type").astype(str).to_numpy()[want]).all()
    with pytest.raises(ScprotoInputError, match="matches no cell"):
        SomaCellStore(scaled["soma"], obs_value_filter="tissue == 'nowhere'")
    with pytest.raises(ScprotoInputError, match="requested genes not in var"):
        SomaCellStore(scaled["soma"], genes=["ENSNOPE"])


# ---------------------------------------------------------------------------- prepare at scale

@pytest.fixture(scope="module")
def cached(scaled):
    store = open_store(scaled["zarr"])
    cfg = PrepareConfig(n_top_genes=500, n_neighbors=15, training_cache="on",
                        cache_cluster_cells=200, exact_knn_max_cells=1_000, chunk_size=1_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prep = prepare(store, scaled["dir"] / "prep", "study", cfg, seed=0)
    return store, prep


def test_training_cache_is_a_locality_ordered_copy(cached):
    store, prep = cached
    assert prep.has_cache and prep.meta["stage_seconds"]["cache_s"] >= 0
    rows = np.load(prep.path / "cache_rows.npy")
    assert np.array_equal(np.sort(rows), np.asarray(prep.cells))
    cache = ZarrCellStore(prep.path / "train_cache.zarr")
    assert list(cache.var_names) == prep.genes
    pick = np.array([0, 5, 999, 2_000, len(rows) - 1])
    expected = store.read_rows_unsorted(rows[pick])[:, prep.gene_columns]
    assert abs(cache.read_rows(pick) - expected).max() == 0
    # cache KNN = the store-row KNN table, renumbered
    ck = np.load(prep.path / "cache_knn_indices.npy")
    kept = np.searchsorted(np.asarray(prep.cells), rows)
    assert np.array_equal(rows[ck], np.asarray(prep.knn_indices)[kept])
    # locality: neighbours are much closer in the cache than in the store
    gap_cache = np.median(np.abs(ck - np.arange(len(ck))[:, None]))
    gap_store = np.median(np.abs(kept[ck] - kept[:, None]))
    assert gap_cache < gap_store / 2


def test_training_reads_the_cache(cached):
    store, prep = cached
    cfg = TrainConfig(batch_size=256, min_cells_per_study=32, n_views=4, prefetch=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader, _ = build_loader(store, prep, cfg, seed=0)
    assert isinstance(loader.store, ZarrCellStore) and loader.sampler.block_size == 64
    batch = next(loader.epoch(0))
    rows = np.load(prep.path / "cache_rows.npy")
    # the anchor view equals the raw store's model-gene counts of those cells
    anchors = loader.sampler.epoch(0)[0].anchors
    X = store.read_rows_unsorted(rows[anchors])[:, prep.gene_columns].toarray()
    np.testing.assert_array_equal(batch.counts[0].numpy(), X)


def test_prefix_store_prepares(scaled):
    store = PrefixStore(open_store(scaled["zarr"]), 1_000)
    assert store.n_obs == 1_000 and len(store.obs_column("study")) == 1_000
    with pytest.raises(IndexError):
        store.read_rows(np.array([1_000]))
    with pytest.raises(ScprotoInputError, match="out of range"):
        PrefixStore(store, 5_000)


def test_randomized_pca_matches_exact_on_low_rank_data():
    rng = np.random.default_rng(0)
    n, G, r = 3_000, 300, 8
    X = np.maximum(rng.normal(size=(n, r)) @ (3 * rng.normal(size=(r, G)))
                   + rng.normal(size=(n, G)), 0)
    X[X < 1.0] = 0  # sparse, non-negative
    Xs = sp.csr_matrix(X.astype(np.float32))

    def chunks():
        return (Xs[a:a + 700] for a in range(0, n, 700))

    exact = fit_pca(chunks, G, 10, method="exact")
    rand = fit_pca(chunks, G, 10, method="randomized", seed=1)
    np.testing.assert_allclose(rand.explained_variance[:r], exact.explained_variance[:r],
                               rtol=1e-3)
    cos = np.abs((rand.components[:r] * exact.components[:r]).sum(1))
    assert cos.min() > 0.999
    assert fit_pca(chunks, G, 10).explained_variance.shape == (10,)  # auto → exact (G ≤ 4096)


def test_knn_methods_memmap_and_recall(tmp_path):
    rng = np.random.default_rng(1)
    X = ((4 * rng.normal(size=(15, 20)))[rng.integers(0, 15, 6_000)]
         + rng.normal(size=(6_000, 20))).astype(np.float32)
    for method in ("hnsw", "ivf"):
        d = tmp_path / method
        d.mkdir()
        idx, _ = knn(X, k=10, method=method, out_dir=d, batch=1_000)
        assert isinstance(idx, np.memmap) and idx.dtype == np.int32 and idx.shape == (6_000, 10)
        assert np.array_equal(np.load(d / "knn_indices.npy"), idx)
        assert not (idx == np.arange(6_000)[:, None]).any()
        assert knn_recall(X, idx, n_sample=1_000) >= 0.95
    flat, _ = knn(X, k=10, method="flat")
    assert knn_recall(X, flat, n_sample=500) == 1.0
    with pytest.raises(ValueError, match="unknown KNN method"):
        knn(X, k=10, method="annoy")


def test_locality_order_is_a_permutation_grouping_neighbours():
    rng = np.random.default_rng(2)
    centers = 10 * rng.normal(size=(30, 5))
    lab = rng.integers(0, 30, 9_000)
    X = (centers[lab] + rng.normal(size=(9_000, 5))).astype(np.float32)
    order = locality_order(X, cluster_cells=300, seed=0)
    assert np.array_equal(np.sort(order), np.arange(9_000))
    runs = 1 + np.count_nonzero(np.diff(lab[order]))
    assert runs < 200  # each true cluster is a few contiguous runs, not thousands


# ---------------------------------------------------------------------------- faults

def _copy_cache_store(prep, tmp_path) -> Path:
    dst = tmp_path / "cache.zarr"
    shutil.copytree(prep.path / "train_cache.zarr", dst)
    return dst


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_corrupt_chunk_names_store_and_rows(cached, tmp_path, damage):
    _, prep = cached
    path = _copy_cache_store(prep, tmp_path)
    chunk = path / "X" / "data" / "c" / "1"
    assert chunk.exists()
    if damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:100])
    elif damage == "garbage":
        chunk.write_bytes(np.random.default_rng(0).bytes(len(chunk.read_bytes()) - 8))
    else:
        chunk.unlink()
    store = ZarrCellStore(path)
    with pytest.raises(ScprotoInputError, match=r"cache\.zarr: X/data chunk 1 .*rows \d+–\d+"):
        store.read_slice(0, store.n_obs)


def test_loader_read_of_a_corrupt_chunk_names_store_and_rows(cached, tmp_path):
    """The loader's dense read (pread of the raw chunk files) reports damage like zarr's path."""
    _, prep = cached
    path = _copy_cache_store(prep, tmp_path)
    store = ZarrCellStore(path)
    assert store._data._raw_dir is not None  # the uncompressed cache takes the raw path
    rows = np.arange(store.n_obs)
    clean = store.read_dense(rows, np.arange(store.n_vars))
    np.testing.assert_array_equal(clean, store.read_slice(0, store.n_obs).toarray())
    chunk = path / "X" / "data" / "c" / "1"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(ScprotoInputError, match=r"cache\.zarr: X/data chunk 1 .*rows \d+–\d+"):
        ZarrCellStore(path).read_dense(rows, np.arange(store.n_vars))
    # the memory-mapped row reader shares the size check and its message
    with pytest.raises(ScprotoInputError, match=r"X/data chunk 1 .*100 bytes.*truncated"):
        ZarrCellStore(path).read_rows(rows)
    chunk.unlink()
    with pytest.raises(ScprotoInputError, match=r"X/data chunk 1 .*missing"):
        ZarrCellStore(path).read_dense(rows, np.arange(store.n_vars))


def test_released_knn_pages_read_back(cached):
    """release_mapped_pages drops a memory map's resident pages; reads after it are unchanged."""
    from scproto_scale.data.store import release_mapped_pages as release_pages

    _, prep = cached
    table = np.load(prep.path / "cache_knn_indices.npy", mmap_mode="r")
    before = np.array(table[::7])
    release_pages(table)
    release_pages(table[3:10])  # a view finds its base map
    release_pages(np.zeros(3))  # plain arrays: nothing to do
    np.testing.assert_array_equal(table[::7], before)


def test_released_chunk_maps_read_back(cached, tmp_path):
    """Every raw chunk map stays open (count-bounded, not byte-bounded); releasing their pages
    leaves later reads unchanged."""
    _, prep = cached
    store = ZarrCellStore(_copy_cache_store(prep, tmp_path), cache_bytes=1)
    rows = np.sort(np.random.default_rng(0).choice(store.n_obs, store.n_obs // 2, replace=False))
    before = store.read_rows(rows)  # the CSR gather maps the raw chunk files
    n_chunks = -(-store._data.array.shape[0] // store._data.chunk)
    assert n_chunks > 2 and len(store._data._cache) == n_chunks  # a 1-byte budget evicts none
    store.release_pages()
    assert (store.read_rows(rows) != before).nnz == 0


def test_knn_table_rows_are_read_with_pread(cached, tmp_path):
    """The loader reads memory-mapped .npy tables by row (no map); same rows, clear errors."""
    from scproto_scale.data.pread import NpyRows, row_reader

    _, prep = cached
    table = np.load(prep.path / "cache_knn_indices.npy", mmap_mode="r")
    reader = row_reader(table)
    assert isinstance(reader, NpyRows) and reader.shape == table.shape
    rows = np.concatenate([np.arange(10, 40), np.random.default_rng(0).integers(0, len(table),
                                                                                 500), [0, 0]])
    np.testing.assert_array_equal(reader[rows], table[rows])
    assert row_reader(np.zeros((3, 2))) is not None and not isinstance(row_reader(np.zeros(3)),
                                                                       NpyRows)
    with pytest.raises(IndexError, match="out of range"):
        reader[np.array([len(table)])]
    cut = tmp_path / "cut.npy"
    raw = (prep.path / "cache_knn_indices.npy").read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ScprotoInputError, match=r"cut\.npy: shorter than its \.npy header"):
        NpyRows(cut)


def test_gene_coverage_is_reported_and_refused(cached):
    store, prep = cached
    model_genes = prep.genes[:100] + [f"ENSMISSING{i}" for i in range(10)]
    cols = align_store_genes(store, model_genes, min_overlap=0.8)
    assert (cols[:100] >= 0).all() and (cols[100:] == -1).all()
    # the loader zero-fills the missing genes and keeps the present ones
    cells = np.asarray(prep.cells)
    sampler = StudyStratifiedSampler(np.zeros(len(cells), dtype=int), 64, 32)
    loader = ViewLoader(store, cells, prep.knn_indices, prep.knn_distances, prep.library_size,
                        prep.study_codes, cols, sampler, n_views=2, prefetch=0)
    draw = sampler.epoch(0)[0]
    b = loader.build(draw, 0, 0)
    assert (b.counts[:, :, 100:] == 0).all()
    want = store.read_rows_unsorted(cells[draw.anchors])[:, prep.gene_columns[:100]].toarray()
    np.testing.assert_array_equal(b.counts[0, :, :100].numpy(), want)
    with pytest.raises(ScprotoInputError, match=r"only 100/200 atlas genes \(50.0%\)"):
        align_store_genes(store, prep.genes[:100] + [f"X{i}" for i in range(100)], 0.8)


class FlakyStore(CellStore):
    """A real store whose reads fail on chosen calls (a loader worker dying mid-read)."""

    def __init__(self, base: CellStore, fail_calls: set[int]):
        self.base, self.fail_calls, self.calls, self.path = base, fail_calls, 0, base.path

    @property
    def n_obs(self):
        return self.base.n_obs

    @property
    def var(self) -> pd.DataFrame:
        return self.base.var

    def obs_columns(self):
        return self.base.obs_columns()

    def _read_obs_column(self, key):
        return self.base.obs_column(key)

    def read_rows(self, rows):
        self.calls += 1
        if self.calls in self.fail_calls:
            raise OSError(f"worker died during read call {self.calls}")
        return self.base.read_rows(rows)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_dead_worker_does_not_shorten_the_epoch(cached, prefetch):
    store, prep = cached
    src = prep.loader_source(store)
    groups = np.asarray(src.study)

    def make(s):
        sampler = StudyStratifiedSampler(groups, 256, 32, block_size=src.block_size)
        return ViewLoader(s, src.cells, src.knn_indices, src.knn_distances, src.library_size,
                          src.condition, src.gene_columns, sampler, n_views=3, prefetch=prefetch)

    clean = [b.counts for b in make(src.store).epoch(0)]
    flaky = FlakyStore(src.store, {2, 5})
    got = [b.counts for b in make(flaky).epoch(0)]
    assert len(got) == len(clean) and flaky.calls >= len(clean) + 2
    for a, b in zip(clean, got, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())
    always = FlakyStore(src.store, set(range(1, 1_000)))
    with pytest.raises(RuntimeError, match="failed 3 times; stopping rather than shortening"):
        list(make(always).epoch(0))
