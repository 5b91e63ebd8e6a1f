"""Tests of the synthetic multi-study atlas (:mod:`scproto_scale.simulate`)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scproto_scale.simulate import simulate_atlas, write_simulated_atlas

SMALL = {
    "n_cells": 1_500,
    "n_genes": 300,
    "n_studies": 3,
    "n_cell_types": 5,
    "rare_fraction": 0.008,
    "seed": 7,
}


@pytest.fixture(scope="module")
def default_atlas() -> ad.AnnData:
    return simulate_atlas()


@pytest.fixture(scope="module")
def small_atlas() -> ad.AnnData:
    return simulate_atlas(**SMALL)


def _totals(adata: ad.AnnData) -> np.ndarray:
    return np.asarray(adata.X.sum(axis=1)).ravel()


def test_shapes_and_dtypes(default_atlas: ad.AnnData) -> None:
    a = default_atlas
    assert a.shape == (10_000, 2_000)
    assert sp.issparse(a.X) and a.X.format == "csr"
    assert a.X.dtype == np.float32
    data = a.X.data
    assert (data >= 0).all()
    assert np.array_equal(data, np.round(data))
    assert (_totals(a) > 0).all()
    assert a.obs_names.is_unique and a.var_names.is_unique
    assert a.var_names[0] == "GENE00001" and a.var_names[-1] == "GENE02000"
    assert a.var["feature_id"].is_unique
    assert a.var["feature_id"].iloc[0] == "ENSSIM00000000001"
    assert a.var["feature_id"].str.fullmatch(r"ENSSIM\d{11}").all()
    for col in ("study", "cell_type", "lineage"):
        assert isinstance(a.obs[col].dtype, pd.CategoricalDtype), col
    assert list(a.obs["study"].cat.categories) == ["study_0", "study_1", "study_2", "study_3"]
    types = list(a.obs["cell_type"].cat.categories)
    assert types[:2] == ["type_A", "type_B"] and types[-1] == "rare_type" and len(types) == 8
    sim = a.uns["simulation"]
    assert sim["seed"] == 0 and sim["n_cells"] == 10_000 and sim["n_genes"] == 2_000


def test_rare_type_and_study_composition(default_atlas: ad.AnnData) -> None:
    obs = default_atlas.obs
    rare = obs["cell_type"] == "rare_type"
    assert 0 < rare.mean() < 0.01
    assert rare.sum() == round(0.006 * 10_000)
    counts = pd.crosstab(obs["study"], obs["cell_type"])
    assert (counts["rare_type"] >= 3).all()  # a handful in every study
    assert (counts.to_numpy() > 0).all()  # every type in every study
    sizes = obs["study"].value_counts()
    assert sizes.nunique() == len(sizes)  # unequal study sizes
    props = counts.div(counts.sum(axis=1), axis=0)
    assert (props.max(axis=0) - props.min(axis=0)).max() > 0.02  # study-specific proportions
    # every type belongs to exactly one lineage
    assert (pd.crosstab(obs["cell_type"], obs["lineage"]) > 0).sum(axis=1).eq(1).all()


def test_study_library_sizes_differ(default_atlas: ad.AnnData) -> None:
    a = default_atlas
    med = pd.Series(_totals(a)).groupby(a.obs["study"].to_numpy()).median()
    assert med.max() / med.min() > 2.5
    assert 1_000 < med.min() and med.max() < 8_000
    expected = np.asarray(a.uns["simulation"]["study_library_median"])
    np.testing.assert_allclose(med.to_numpy(), expected, rtol=0.2)


def test_markers_are_up_regulated(small_atlas: ad.AnnData) -> None:
    a = small_atlas
    x = a.X.multiply(1e4 / _totals(a)[:, None]).tocsr()
    x.data = np.log1p(x.data)
    for ctype, genes in a.uns["simulation"]["marker_genes"].items():
        cols = a.var_names.get_indexer(list(genes))
        assert (cols >= 0).all()
        inside = (a.obs["cell_type"] == ctype).to_numpy()
        sub = x[:, cols]
        assert sub[inside].mean() > sub[~inside].mean() + 0.3, ctype


def test_same_seed_bit_identical(small_atlas: ad.AnnData) -> None:
    b = simulate_atlas(**SMALL)
    a = small_atlas
    for attr in ("data", "indices", "indptr"):
        assert np.array_equal(getattr(a.X, attr), getattr(b.X, attr)), attr
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)


def test_different_seed_differs(small_atlas: ad.AnnData) -> None:
    c = simulate_atlas(**{**SMALL, "seed": 8})
    assert c.shape == small_atlas.shape
    assert (c.X != small_atlas.X).nnz > 0


def test_no_study_effect_and_single_study() -> None:
    a = simulate_atlas(
        n_cells=600,
        n_genes=100,
        n_studies=1,
        n_cell_types=3,
        rare_fraction=0.01,
        study_effect_sd=0.0,
        seed=1,
    )
    assert a.shape == (600, 100)
    assert list(a.obs["study"].cat.categories) == ["study_0"]
    assert (a.obs["cell_type"] == "rare_type").sum() == 6
    assert (_totals(a) > 0).all()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_cells": 0}, "n_cells"),
        ({"n_cells": 2.5}, "n_cells"),
        ({"n_cells": 1_000}, "n_cells"),  # 6 rare cells < 4 studies × 3
        ({"n_cells": 150, "rare_fraction": 0.1}, "n_cells"),  # too few for per-type minimum
        ({"n_genes": 5}, "n_genes"),
        ({"n_studies": 0}, "n_studies"),
        ({"n_cell_types": 1}, "n_cell_types"),
        ({"rare_fraction": 0.0}, "rare_fraction"),
        ({"rare_fraction": 0.2}, "rare_fraction"),  # not rarer than 1 / n_cell_types
        ({"rare_fraction": float("nan")}, "rare_fraction"),
        ({"seed": -1}, "seed"),
        ({"n_lineages": 8}, "n_lineages"),
        ({"n_markers": 3_000}, "n_markers"),
        ({"fold_change_range": (3.0, 2.0)}, "fold_change_range"),
        ({"library_median_range": (0.0, 10.0)}, "library_median_range"),
        ({"dispersion_range": "x"}, "dispersion_range"),
        ({"study_effect_sd": -0.1}, "study_effect_sd"),
        ({"study_effect_fraction": 1.5}, "study_effect_fraction"),
        ({"min_rare_per_study": 0}, "min_rare_per_study"),
    ],
)
def test_validation_errors(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        simulate_atlas(**kwargs)


def test_write_simulated_atlas(tmp_path) -> None:
    target = tmp_path / "sub" / "atlas.h5ad"
    out = write_simulated_atlas(target, **SMALL)
    assert out == target and target.is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["atlas.h5ad"]  # no temp left
    back = ad.read_h5ad(target)
    ref = simulate_atlas(**SMALL)
    assert back.shape == ref.shape
    assert sp.issparse(back.X) and back.X.dtype == np.float32
    assert (back.X != ref.X).nnz == 0
    pd.testing.assert_frame_equal(back.obs, ref.obs)
    assert back.uns["simulation"]["seed"] == SMALL["seed"]
    assert set(back.uns["simulation"]["marker_genes"]) == set(ref.obs["cell_type"].cat.categories)
    # overwriting an existing file works
    write_simulated_atlas(target, **{**SMALL, "seed": 8})
    assert ad.read_h5ad(target).uns["simulation"]["seed"] == 8


def test_write_rejects_bad_suffix(tmp_path) -> None:
    with pytest.raises(ValueError, match="h5ad"):
        write_simulated_atlas(tmp_path / "atlas.zarr", **SMALL)
    assert not any(tmp_path.iterdir())
