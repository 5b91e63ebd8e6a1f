"""The main job end to end on a tiny synthetic atlas: zarr and SOMA give the same atlas."""

import json
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipelines.atlas_job import run
from scproto_scale.atlas.atlas import PrototypeAtlas
from scproto_scale.cli import app
from scproto_scale.config import PrepareConfig, load_config
from scproto_scale.data.store import open_store
from scproto_scale.errors import ScprotoInputError
from scproto_scale.train.checkpoint import load_checkpoint

BASE = {
    "seed": 0,
    "data": {"batch_key": "study", "label_key": "cell_type"},
    "prepare": {"n_top_genes": 200, "n_pcs": 20, "n_neighbors": 15},
    "model": {"n_prototypes": 24, "latent_dim": 8},
    "train": {"epochs": 2, "batch_size": 256, "min_cells_per_study": 64, "n_views": 4,
              "progress": False},
    "evaluate": {"umap": True},
}


def _cfg(path, fmt, **over):
    tree = json.loads(json.dumps(BASE))
    tree["data"].update({"path": str(path), "store_format": fmt})
    for k, v in over.items():
        tree[k].update(v)
    return load_config(base=tree)


@pytest.fixture(scope="module")
def zarr_run(tiny_h5ad, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_zarr")
    return out, run(_cfg(tiny_h5ad, "zarr"), out)


def test_report_has_the_required_fields(zarr_run):
    out, _ = zarr_run
    on_disk = json.loads((out / "report.json").read_text())
    for method in ("scproto", "pca"):
        for key in ("scib_total", "scib_batch", "scib_bio", "scgraph_rank", "scgraph_corr",
                    "scgraph_corr_weighted"):
            assert isinstance(on_disk["methods"][method][key], float), (method, key)
    for key in ("n_prototypes", "purity", "rare_type_coverage"):
        assert key in on_disk["metacells"]
    assert on_disk["runtime_s"] > 0
    # prototype usage of the exported cells, with the collapse check's verdict
    cells = ad.read_h5ad(out / "embeddings.h5ad")
    use = on_disk["prototype_usage"]
    assert use["used"] == cells.obs["scproto_prototype"].astype(int).nunique()
    sampled = PrototypeAtlas.load(out / "atlas").embed_store(
        open_store(out / "store.zarr"), "study", chunk_size=PrepareConfig().chunk_size, sample_seed=0
    ).sample_prototype[cells.obs["store_row"].to_numpy()]
    assert use["used_by_posterior_samples"] == len(np.unique(sampled))
    assert 0 <= use["mean_resultant"] <= 1
    assert isinstance(on_disk["warnings"], list)
    assert (use["mean_resultant"] >= 0.98) == any("collapsed" in w for w in on_disk["warnings"])
    assert (out / "report.md").read_text().startswith("# scProto atlas report")
    assert (out / "umap.png").stat().st_size > 10_000
    assert on_disk["versions"]["torch"].startswith("2.13")


def test_atlas_artefact_and_embedding(zarr_run, tiny_h5ad):
    out, _ = zarr_run
    atlas_dir = out / "atlas"
    for f in ("atlas.json", "model.pt", "genes.tsv", "prototypes.npy", "metacells.h5ad"):
        assert (atlas_dir / f).exists(), f
    assert not list(out.glob(".*tmp*"))  # nothing half-written left behind
    atlas = PrototypeAtlas.load(atlas_dir)
    mc = ad.read_h5ad(atlas_dir / "metacells.h5ad")
    assert mc.shape == (24, len(atlas.genes))
    assert {"n_cells", "n_studies", "label", "purity", "majority_label"} <= set(mc.obs)
    assert np.isfinite(mc.X).all() and (mc.X >= 0).all()
    assert mc.obsm["study_fraction"].shape == (24, 3)
    # The Python API on an in-memory AnnData equals what the run exported for the same cells.
    adata = atlas.embed_adata(ad.read_h5ad(tiny_h5ad), "study")
    cells = ad.read_h5ad(out / "embeddings.h5ad")
    rows = cells.obs["store_row"].to_numpy()
    np.testing.assert_allclose(adata.obsm["X_scproto"][rows], cells.obsm["X_scproto"], atol=1e-5)
    assert (adata.obs["scproto_prototype"].to_numpy()[rows]
            == cells.obs["scproto_prototype"].to_numpy()).mean() > 0.99
    assert adata.obs["scproto_confidence"].between(-1, 1).all()


def _first_difference(a, b) -> str:
    """The first artefact (prepared arrays, then checkpoints in order) where two runs differ."""
    for f in sorted((a / "prepared").glob("*.npy")):
        if not np.array_equal(np.load(f), np.load(b / "prepared" / f.name)):
            return f"prepared/{f.name}"
    for f in sorted((a / "checkpoints").glob("*.pt")):
        sa = load_checkpoint(f)["model"]
        sb = load_checkpoint(b / "checkpoints" / f.name)["model"]
        diff = {k: float((sa[k].double() - sb[k].double()).abs().max()) for k in sa
                if not torch.equal(sa[k], sb[k])}
        if diff:
            return f"checkpoints/{f.name}: {diff}"
    return "none before the embedding"


def test_zarr_and_soma_give_the_same_atlas(tiny_h5ad, tmp_path):
    """Two fresh `scproto-scale train` processes (as users run them), one per store format.

    Fresh processes: inside this long pytest process, libraries used by other tests (jax,
    numba, Ray) leave process-global state behind. Single-threaded (torch, OpenMP, BLAS), so
    thread scheduling cannot reorder a float sum: the two atlases must agree bit for bit.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1"}
    outs = {}
    for fmt in ("zarr", "soma"):
        tree = json.loads(json.dumps(BASE))
        tree["data"].update({"path": str(tiny_h5ad), "store_format": fmt})
        tree["train"]["num_threads"] = 1
        cfg = tmp_path / f"{fmt}.yaml"
        cfg.write_text(json.dumps(tree))  # JSON is YAML
        outs[fmt] = tmp_path / fmt
        subprocess.run([sys.executable, "-m", "scproto_scale.cli", "train", str(cfg), "--out",
                        str(outs[fmt])], check=True, capture_output=True, env=env)
    assert (outs["soma"] / "store.soma").is_dir() and (outs["zarr"] / "store.zarr").is_dir()
    z = ad.read_h5ad(outs["zarr"] / "embeddings.h5ad")
    s = ad.read_h5ad(outs["soma"] / "embeddings.h5ad")
    assert np.array_equal(z.obsm["X_scproto"], s.obsm["X_scproto"]), (
        f"max |diff| {np.abs(z.obsm['X_scproto'] - s.obsm['X_scproto']).max():.3g}; first "
        f"differing artefact: {_first_difference(outs['zarr'], outs['soma'])}")
    assert np.array_equal(np.load(outs["zarr"] / "atlas/prototypes.npy"),
                          np.load(outs["soma"] / "atlas/prototypes.npy"))


def test_cli_run_and_embed(tiny_h5ad, tmp_path, zarr_run):
    import yaml

    cfg = json.loads(json.dumps(BASE))
    cfg["data"]["path"] = str(tiny_h5ad)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(cfg_file), "--out", str(tmp_path / "o"),
                              "--set", "train.epochs=1", "--set", "evaluate.enabled=false"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "atlas" / "atlas.json").exists()
    res = runner.invoke(app, ["run", str(cfg_file), "--out", str(tmp_path / "o"),
                              "--set", "train.epoch=1"])
    assert res.exit_code == 2 and "train.epoch" in res.output
    out, _ = zarr_run
    res = runner.invoke(app, ["embed", str(out / "atlas"), str(out / "store.zarr"),
                              "--batch-key", "study", "--out", str(tmp_path / "e.h5ad")])
    assert res.exit_code == 0, res.output
    e = ad.read_h5ad(tmp_path / "e.h5ad")
    assert e.obsm["X_scproto"].shape[1] == 8 and "scproto_prototype" in e.obs


def test_missing_label_key_is_named(tiny_h5ad, tmp_path):
    cfg = _cfg(tiny_h5ad, "zarr")
    cfg.data.label_key = "celltype"
    with pytest.raises(ScprotoInputError, match=r"data\.label_key=.celltype."):
        run(cfg, tmp_path)


def test_kang_zarr_and_soma_train_identically(tmp_path):
    """Real data: the same seed gives the same atlas from a zarr and a SOMA copy of Kang PBMC."""
    from conftest import data_dir

    src = data_dir() / "kang2018_pbmc_ctrl_8donors" / "kang2018_pbmc_ctrl_8donors.h5ad"
    embeddings = {}
    for fmt in ("zarr", "soma"):
        tree = json.loads(json.dumps(BASE))
        tree["data"] = {"path": str(src), "batch_key": "batch", "label_key": "cell_type",
                        "store_format": fmt}
        tree["prepare"] = {"n_top_genes": 2000, "n_neighbors": 15}
        tree["train"].update({"epochs": 1, "batch_size": 1024, "min_cells_per_study": 128})
        tree["evaluate"] = {"enabled": False}
        with pytest.warns(UserWarning, match="using all genes"):
            run(load_config(base=tree), tmp_path / fmt)
        embeddings[fmt] = ad.read_h5ad(tmp_path / fmt / "embeddings.h5ad").obsm["X_scproto"]
    assert embeddings["zarr"].shape == (12261, 8)
    assert np.array_equal(embeddings["zarr"], embeddings["soma"])
