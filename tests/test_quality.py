"""Quality harness: the multi-study PBMC set, baselines and the paper's evaluations."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from conftest import data_dir

from pipelines.pbmc_multi import SOURCES, VOCABULARY, assemble_multi_pbmc
from scproto_scale.errors import ScprotoInputError


def test_pbmc_multi_assembles_three_studies(tmp_path):
    out = assemble_multi_pbmc(data_dir(), tmp_path / "multi.h5ad")
    adata = ad.read_h5ad(out)
    assert adata.n_vars == 97 == adata.uns["pbmc_multi"]["n_shared_genes"]
    assert {"TYROBP", "NKG7", "GNLY", "LYZ"} <= set(adata.var_names)
    assert set(adata.obs["study"]) == set(SOURCES)
    assert set(adata.obs["cell_type"].cat.categories) == set(VOCABULARY)
    # PBMC 4k's 20 unassigned cells are dropped; every other cell is kept.
    assert adata.obs["study"].value_counts().to_dict() == {
        "kang2018": 12261, "pbmc4k": 2150, "ding2020": 1242}
    assert adata.obs["batch"].nunique() == 11
    X = adata.X
    assert X.dtype == np.float32 and np.array_equal(X.data, np.round(X.data))
    # Counts are the source's own: Ding's "Cytotoxic T cell" became CD8 T with its row intact.
    src = ad.read_h5ad(data_dir() / SOURCES["ding2020"][0] / f"{SOURCES['ding2020'][0]}.h5ad")
    cell = src.obs_names[0]
    row = adata[f"ding2020:{cell}"]
    assert np.array_equal(row.X.toarray().ravel(),
                          src[cell, list(adata.var_names)].X.toarray().ravel())
    mapped = adata.obs.loc[adata.obs["cell_type_original"] == "Cytotoxic T cell", "cell_type"]
    assert set(mapped) == {"CD8 T"}


def test_pbmc_multi_missing_source_is_named(tmp_path):
    with pytest.raises(ScprotoInputError, match="kang2018_pbmc_ctrl_8donors"):
        assemble_multi_pbmc(tmp_path, tmp_path / "multi.h5ad")
    assert not (tmp_path / "multi.h5ad").exists()
