"""The Census pipeline on a local SOMA experiment with the Census schema (no network): cells by
obs value_filter, genes by feature_id, dataset_id as the study, the ordinary launcher."""

import json

import anndata as ad
import numpy as np
import pytest
import tiledbsoma

from pipelines.census import census_source, run_census
from scproto_scale.atlas.atlas import PrototypeAtlas
from scproto_scale.config import CensusConfig, load_config
from scproto_scale.config import CensusRunConfig as Cfg
from scproto_scale.errors import ScprotoInputError
from scproto_scale.simulate_scale import write_scaled_atlas


@pytest.fixture(scope="module")
def census_like(tmp_path_factory):
    path = tmp_path_factory.mktemp("census") / "census.soma"
    write_scaled_atlas(soma_path=path, n_cells=3000, n_genes=600, n_studies=6, n_cell_types=6,
                       study_size_ratio=4.0, seed=3)
    return path


def test_census_pipeline_on_a_local_census_schema_experiment(census_like, tmp_path):
    with tiledbsoma.Experiment.open(str(census_like)) as exp:
        obs = exp.obs.read().concat().to_pandas()
        var = exp.ms["RNA"].var.read().concat().to_pandas()
    drop = obs["tissue"].value_counts().index[-1]  # the rarest tissue is filtered out
    flt = f"is_primary_data == True and tissue != '{drop}'"
    keep = obs["is_primary_data"] & (obs["tissue"] != drop)
    genes = var["feature_id"].tolist()[50:550]
    tree = {"seed": 0,
            "census": {"uri": str(census_like), "obs_value_filter": flt, "genes": genes,
                       "study_key": "dataset_id", "label_key": "cell_type"},
            "prepare": {"n_top_genes": 200, "n_pcs": 20, "n_neighbors": 15},
            "model": {"n_prototypes": 16, "latent_dim": 8},
            "train": {"epochs": 1, "batch_size": 256, "min_cells_per_study": 32, "n_views": 4,
                      "progress": False},
            "evaluate": {"enabled": False}}
    report = run_census(load_config(base=tree, model=Cfg), tmp_path / "out")
    assert report["n_cells"] == int(keep.sum())
    atlas = PrototypeAtlas.load(tmp_path / "out" / "atlas")
    assert sorted(atlas.studies) == sorted(obs.loc[keep, "dataset_id"].astype(str).unique())
    assert set(atlas.genes) <= set(genes) and len(atlas.genes) == 200
    assert atlas.meta["gene_stable_ids"] == atlas.genes  # feature_ids: stable ids
    emb = ad.read_h5ad(tmp_path / "out" / "embeddings.h5ad")
    assert emb.n_obs == int(keep.sum()) and np.isfinite(emb.obsm["X_scproto"]).all()
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["census"]["obs_value_filter"] == flt


def test_census_without_the_package_or_with_bad_options_is_refused(census_like, tmp_path):
    try:
        import cellxgene_census  # noqa: F401
    except ImportError:
        with pytest.raises(ScprotoInputError, match=r"\[census\]"):
            census_source(CensusConfig())
    bad = CensusConfig(uri=str(census_like), obs_value_filter="tissue == 'moon'")
    with pytest.raises(ScprotoInputError, match="matches no cell"):
        run_census(Cfg(census=bad), tmp_path / "o")
    with pytest.raises(ScprotoInputError, match="not in var"):
        run_census(Cfg(census=CensusConfig(uri=str(census_like), genes=["ENSG00000000003"])),
                   tmp_path / "o2")
    with pytest.raises(ScprotoInputError, match="donor_id"):
        run_census(Cfg(census=CensusConfig(uri=str(census_like), study_key="donor_id")),
                   tmp_path / "o3")
