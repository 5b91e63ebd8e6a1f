"""Embedding new data with a trained atlas: streaming, resumable, crash-safe, distributed;
gene alignment by stable id; query mapping by surgery; label transfer (method.md §8)."""

import json
import os
import subprocess
import sys
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.atlas_job import run
from scproto_scale.atlas.atlas import PrototypeAtlas
from scproto_scale.atlas.embed_job import FAULT_ENV, EmbedJob, run_embed
from scproto_scale.atlas.genes import align_to_model
from scproto_scale.atlas.surgery import add_studies, train_query_studies
from scproto_scale.atlas.transfer import LabelTransfer, load_prototype_labels
from scproto_scale.config import EmbedConfig, SurgeryConfig, load_config
from scproto_scale.data.ingest import ingest
from scproto_scale.data.store import open_store
from scproto_scale.data.zarr_store import ZarrCellStore
from scproto_scale.errors import ScprotoInputError

CFG = {
    "seed": 0,
    "data": {"batch_key": "study", "label_key": "cell_type"},
    "prepare": {"n_top_genes": 200, "n_pcs": 20, "n_neighbors": 15},
    "model": {"n_prototypes": 24, "latent_dim": 8},
    # lr pinned: the fixture's atlas is a tiny 3-epoch model, independent of package defaults
    "train": {"epochs": 3, "batch_size": 256, "min_cells_per_study": 64, "n_views": 4,
              "lr": 1e-3, "progress": False},
    "evaluate": {"enabled": False},
}


@pytest.fixture(scope="module")
def ref_and_query(tiny_h5ad, tmp_path_factory):
    """An atlas trained on studies 0 and 1 of the tiny atlas; study 2 is the query."""
    d = tmp_path_factory.mktemp("embed")
    full = ad.read_h5ad(tiny_h5ad)
    ref = full[full.obs["study"] != "study_2"].copy()
    query = full[full.obs["study"] == "study_2"].copy()
    ref.write_h5ad(d / "ref.h5ad")
    query.write_h5ad(d / "query.h5ad")
    tree = json.loads(json.dumps(CFG))
    tree["data"]["path"] = str(d / "ref.h5ad")
    run(load_config(base=tree), d / "run")
    return d, d / "run" / "atlas", query


def _job(atlas, store, work, **kw):
    return EmbedJob(str(atlas), str(store), str(work), EmbedConfig(batch_key="study", **kw))


def test_atlas_records_stable_ids_and_labels(ref_and_query):
    _, atlas_dir, _ = ref_and_query
    atlas = PrototypeAtlas.load(atlas_dir)
    assert atlas.meta["gene_stable_ids"][0].startswith("ENSSIM")
    labels = load_prototype_labels(atlas_dir)
    assert labels is not None and len(labels) == 24 and (labels != "").sum() >= 3


def test_embed_resumes_after_kill_and_survives_a_crash_mid_commit(ref_and_query, tmp_path):
    """Real interruptions: a CLI process exits hard after chunk 1, a second one mid-commit
    (after the first element is moved into the store); a third finishes. The store stays
    readable throughout and the results equal an uninterrupted run's."""
    d, atlas_dir, query = ref_and_query
    store = ingest(d / "query.h5ad", tmp_path / "q.zarr")
    X_before = ad.read_zarr(store).X.toarray()
    cmd = [sys.executable, "-m", "scproto_scale.cli", "embed", str(atlas_dir), str(store),
           "--batch-key", "study", "--chunk-size", "100"]
    for fault in ("chunk:1", "commit:1"):
        r = subprocess.run(cmd, env={**os.environ, FAULT_ENV: fault}, capture_output=True,
                           text=True)
        assert r.returncode == 17, r.stderr[-2000:]
        if fault == "chunk:1":  # chunks 0 and 1 done, nothing written into the store yet
            done = sorted(p.name for p in (tmp_path / "q.zarr.embed" / "chunks").glob("*.npz"))
            assert done == ["chunk_000000.npz", "chunk_000001.npz"]
        mid = ad.read_zarr(store)  # readable, original data intact
        assert np.array_equal(mid.X.toarray(), X_before)
        assert "scproto_label" not in mid.obs  # the column order is only updated at the end
        ZarrCellStore(store).read_slice(0, 10)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "q.zarr.embed" / "summary.json").read_text())
    assert summary["chunks_computed"] == 0  # everything came from the interrupted runs
    got = ad.read_zarr(store)
    assert np.array_equal(got.X.toarray(), X_before)

    ref = run_embed(_job(atlas_dir, store, tmp_path / "w2", chunk_size=100),
                    out=tmp_path / "uninterrupted.h5ad")
    want = ad.read_h5ad(ref["target"])
    assert np.array_equal(got.obsm["X_scproto"], want.obsm["X_scproto"])
    for col in ("scproto_prototype", "scproto_confidence", "scproto_label",
                "scproto_label_uncertainty"):
        assert np.array_equal(got.obs[col].to_numpy(), want.obs[col].to_numpy()), col
    # Labels transferred through prototypes agree with the truth well above chance (5 types).
    acc = (want.obs["scproto_label"].astype(str).to_numpy()
           == query.obs["cell_type"].astype(str).to_numpy()).mean()
    assert acc > 0.5
    assert want.obs["scproto_label_uncertainty"].between(0, 1).all()
    assert not list(tmp_path.glob(".q.zarr.scproto_*"))


def test_embed_soma_in_place_and_work_dir_mismatch(ref_and_query, tmp_path):
    d, atlas_dir, _ = ref_and_query
    soma = ingest(d / "query.h5ad", tmp_path / "q.soma", fmt="soma")
    job = _job(atlas_dir, soma, tmp_path / "w", chunk_size=150)
    run_embed(job)
    zjob = _job(atlas_dir, ingest(d / "query.h5ad", tmp_path / "q.zarr"), tmp_path / "wz")
    want = ad.read_h5ad(run_embed(zjob, out=tmp_path / "z.h5ad")["target"])
    import tiledbsoma

    with tiledbsoma.Experiment.open(str(soma)) as exp:
        obs = exp.obs.read().concat().to_pandas().sort_values("soma_joinid")
        X = exp.ms["RNA"]["obsm"]["X_scproto"].read().tables().concat()
    emb = np.zeros(want.obsm["X_scproto"].shape, dtype=np.float32)
    emb[X["soma_dim_0"].to_numpy(), X["soma_dim_1"].to_numpy()] = X["soma_data"].to_numpy()
    np.testing.assert_allclose(emb, want.obsm["X_scproto"], atol=1e-6)
    assert (obs["scproto_label"].astype(str).to_numpy()
            == want.obs["scproto_label"].astype(str).to_numpy()).mean() > 0.99
    # the chunk results of another chunk size are not mixed in
    with pytest.raises(ScprotoInputError, match="chunk_size"):
        run_embed(_job(atlas_dir, soma, tmp_path / "w", chunk_size=100))


def test_embed_on_two_ray_workers_equals_one_process(ref_and_query, tmp_path):
    d, atlas_dir, _ = ref_and_query
    store = ingest(d / "query.h5ad", tmp_path / "q.zarr")
    one = run_embed(_job(atlas_dir, store, tmp_path / "w1", chunk_size=100),
                    out=tmp_path / "one.h5ad")
    two = run_embed(_job(atlas_dir, store, tmp_path / "w2", chunk_size=100, workers=2),
                    out=tmp_path / "two.h5ad")
    assert two["workers"] == 2 and two["chunks_computed"] == one["chunks_computed"] == 5
    a, b = ad.read_h5ad(one["target"]), ad.read_h5ad(two["target"])
    np.testing.assert_allclose(a.obsm["X_scproto"], b.obsm["X_scproto"], atol=1e-6)
    assert (a.obs["scproto_prototype"].to_numpy() == b.obs["scproto_prototype"].to_numpy()).all()


def test_gene_alignment_by_stable_id_report_and_refusals(ref_and_query, tmp_path):
    _, atlas_dir, query = ref_and_query
    atlas = PrototypeAtlas.load(atlas_dir)
    var = query.var.copy()
    # symbols renamed (another annotation release): matched by feature_id all the same
    var.index = pd.Index([f"SYM{i}" for i in range(len(var))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        al = align_to_model(var, atlas.genes, atlas.meta["gene_stable_ids"], source="q")
    assert al.method == "stable_id" and al.overlap == 1.0
    # no stable ids: symbol fallback with a warning
    with pytest.warns(UserWarning, match="matched by symbol"):
        al = align_to_model(query.var[[]], atlas.genes, atlas.meta["gene_stable_ids"])
    assert al.method == "symbol" and al.overlap == 1.0
    # 30 % of the model genes missing: refused at the default 80 %, zero-filled at 50 %
    keep = ~pd.Index(query.var["feature_id"]).isin(atlas.meta["gene_stable_ids"][:60])
    part = query.var[keep]
    with pytest.raises(ScprotoInputError, match=r"140/200 atlas genes \(70\.0%\).*80%"):
        align_to_model(part, atlas.genes, atlas.meta["gene_stable_ids"], source="q")
    with pytest.warns(UserWarning, match="60 of 200 atlas genes missing"):
        al = align_to_model(part, atlas.genes, atlas.meta["gene_stable_ids"], 0.5, source="q")
    rep = json.loads(al.write_report(tmp_path / "genes.json").read_text())
    assert rep["n_present"] == 140 and rep["n_missing"] == 60 and len(rep["missing"]) == 60
    # another species: mouse Ensembl ids, refused with the overlap and both namespaces named
    mouse = query.var.copy()
    mouse["feature_id"] = [f"ENSMUSG{i:011d}" for i in range(len(mouse))]
    mouse.index = mouse.index.str.capitalize()
    with pytest.raises(ScprotoInputError, match=r"0/200 atlas genes \(0\.0%\).*ENSMUSG.*ENSSIM"):
        align_to_model(mouse, atlas.genes, atlas.meta["gene_stable_ids"], source="mouse")


def test_incompatible_atlas_version_is_refused(ref_and_query, tmp_path):
    import shutil

    _, atlas_dir, _ = ref_and_query
    old = tmp_path / "old_atlas"
    shutil.copytree(atlas_dir, old)
    meta = json.loads((old / "atlas.json").read_text())
    meta["format_version"] = 99
    (old / "atlas.json").write_text(json.dumps(meta))
    with pytest.raises(ScprotoInputError, match=r"atlas format 99 .*format 1"):
        PrototypeAtlas.load(old)


def test_surgery_trains_only_new_rows_and_improves_the_fit(ref_and_query, tmp_path):
    d, atlas_dir, query = ref_and_query
    ref = PrototypeAtlas.load(atlas_dir)
    on_disk = torch.load(atlas_dir / "model.pt", weights_only=True)
    store = open_store(ingest(d / "query.h5ad", tmp_path / "q.zarr"))
    cfg = SurgeryConfig(epochs=8, batch_size=128, lambda_swav=0.1)
    new, hist = train_query_studies(ref, store, "study", cfg, seed=0)
    assert new.studies == ["study_0", "study_1", "study_2"]
    assert hist[-1]["cvae"] < hist[0]["cvae"]
    untrained = add_studies(ref, ["study_2"], seed=0)
    sd, su = new.model.state_dict(), untrained.model.state_dict()
    S = 2
    for k, v in on_disk.items():  # the reference part is bit-identical
        if k == "cvae.condition_embedding.weight":
            assert torch.equal(sd[k][:S], v)
            assert not torch.equal(sd[k][S:], su[k][S:])  # the new row was trained
        elif k == "cvae.log_theta":
            assert torch.equal(sd[k][:S], v) and not torch.equal(sd[k][S:], su[k][S:])
        else:
            assert torch.equal(sd[k], v), k
    # saved and reloaded, the extended atlas maps the query study with its own row
    new.save(tmp_path / "mapped")
    back = PrototypeAtlas.load(tmp_path / "mapped")
    assert torch.equal(back.model.state_dict()["cvae.condition_embedding.weight"][:S],
                       on_disk["cvae.condition_embedding.weight"])
    emb = back.embed_adata(query.copy(), "study").obsm["X_scproto"]
    labels = load_prototype_labels(atlas_dir)
    lt = LabelTransfer(back.prototypes, labels)
    code, unc, proba = lt.predict(emb)
    pred = lt.classes[code]
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(unc, 1 - proba.max(1), atol=1e-6)
    assert (pred == query.obs["cell_type"].astype(str).to_numpy()).mean() > 0.5
    with pytest.raises(ScprotoInputError, match="already in the atlas"):
        train_query_studies(new, store, "study", cfg)


def test_atlas_stable_ids_need_one_valid_id_per_gene():
    from scproto_scale.atlas.genes import model_stable_ids

    ids = [f"ENSG{i:011d}" for i in range(19)] + ["nan"]
    ids[5] = ids[4]
    var = pd.DataFrame({"ensembl_id": ids}, index=[f"G{i}" for i in range(20)])
    assert model_stable_ids(var, ["G0", "G1"]) == ids[:2]
    assert model_stable_ids(var, ["G0", "G19"]) is None  # missing id: match by symbol instead
    assert model_stable_ids(var, ["G4", "G5"]) is None  # shared id would merge two genes


def test_embed_store_samples_the_posterior_in_the_same_pass(ref_and_query, tmp_path):
    d, atlas_dir, _ = ref_and_query
    atlas = PrototypeAtlas.load(atlas_dir)
    store = open_store(ingest(d / "ref.h5ad", tmp_path / "ref.zarr"))
    plain = atlas.embed_store(store, "study")
    assert plain.sample_prototype is None and plain.sample_cosine is None
    emb = atlas.embed_store(store, "study", sample_seed=3)
    np.testing.assert_array_equal(emb.prototype, plain.prototype)  # the means are untouched
    mu_nearest, nearest, cos = emb.prototype, emb.sample_prototype, emb.sample_cosine
    assert nearest.shape == cos.shape == (store.n_obs,)
    assert 0 <= nearest.min() and nearest.max() < atlas.prototypes.shape[0]
    assert np.all(cos <= 1 + 1e-6) and np.all(cos > -1)
    again = atlas.embed_store(store, "study", sample_seed=3).sample_prototype
    other = atlas.embed_store(store, "study", sample_seed=4).sample_prototype
    np.testing.assert_array_equal(nearest, again)
    assert (nearest != other).any()  # a fresh sample of a wide posterior moves some cells
    # a near-zero posterior variance (σ ≈ 0.01): every sample sits on its mean
    with torch.no_grad():
        atlas.model.cvae.logvar.weight.zero_()
        atlas.model.cvae.logvar.bias.fill_(-30.0)
    tight = atlas.embed_store(store, "study", sample_seed=3)
    assert np.median(tight.sample_cosine) > 0.99 > np.median(cos)
    assert (tight.sample_prototype == mu_nearest).mean() > 0.95 > (nearest == mu_nearest).mean()
