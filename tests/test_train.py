"""Training: loss goes down, checkpoints every epoch, resume gives the same parameters."""

import os

import numpy as np
import pytest
import torch

from scproto_scale.config import ModelConfig, PrepareConfig, TrainConfig
from scproto_scale.data.ingest import ingest
from scproto_scale.data.store import open_store
from scproto_scale.errors import ScprotoInputError
from scproto_scale.prepare.run import prepare
from scproto_scale.train.checkpoint import latest_checkpoint
from scproto_scale.train.loop import build_loader, default_threads, train

MODEL = ModelConfig(n_prototypes=20, latent_dim=8)
TRAIN = TrainConfig(epochs=3, batch_size=256, min_cells_per_study=64, progress=False,
                    n_views=4)


@pytest.fixture(scope="module")
def prepared(tiny_h5ad, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    store = open_store(ingest(tiny_h5ad, root / "tiny.zarr"))
    prep = prepare(store, root / "prepared", "study",
                   PrepareConfig(n_top_genes=200, n_pcs=20, n_neighbors=15))
    return store, prep


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_reaches_the_same_parameters(prepared, tmp_path):
    """With the per-study queue (filled in epoch 0, used from epoch 1, saved in checkpoints)."""
    store, prep = prepared
    model = MODEL.model_copy(update={"queue_length": 128, "queue_start_epoch": 1})
    full = train(store, prep, model, TRAIN, tmp_path / "full", seed=3)
    assert sorted(p.name for p in (tmp_path / "full").glob("epoch_*.pt")) == [
        "epoch_0001.pt", "epoch_0002.pt"]  # one per epoch, last two kept
    part = train(store, prep, model, TRAIN, tmp_path / "part", seed=3)
    # interrupt after epoch 1: drop the last checkpoint and resume
    (tmp_path / "part" / "epoch_0002.pt").unlink()
    assert latest_checkpoint(tmp_path / "part").name == "epoch_0001.pt"
    resumed = train(store, prep, model, TRAIN, tmp_path / "part", seed=3, resume=True)
    a, b = _params(full.model), _params(resumed.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical on CPU
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert part.history[0]["loss"] == full.history[0]["loss"]


def test_mid_epoch_resume_is_bit_identical(prepared, tmp_path):
    """Checkpoint every 2 steps; drop the epoch checkpoint and resume from step 4 of epoch 1."""
    store, prep = prepared
    model = MODEL.model_copy(update={"queue_length": 128, "queue_start_epoch": 0})
    cfg = TRAIN.model_copy(update={"epochs": 2, "checkpoint_every_steps": 2})
    full = train(store, prep, model, cfg, tmp_path / "full", seed=4)
    train(store, prep, model, cfg, tmp_path / "part", seed=4)
    assert sorted(p.name for p in (tmp_path / "part").glob("*.pt")) == [
        "epoch_0001.pt", "epoch_0001_step_0000004.pt"]
    (tmp_path / "part" / "epoch_0001.pt").unlink()
    resumed = train(store, prep, model, cfg, tmp_path / "part", seed=4, resume=True)
    for k, v in _params(full.model).items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.history[-1]["loss"] == full.history[-1]["loss"]
    assert resumed.history[-1]["prototypes_used"] == full.history[-1]["prototypes_used"]


def test_resume_with_other_settings_starts_afresh_and_keeps_the_old_checkpoints(
        prepared, tmp_path):
    """Like prepare: a checkpoint of another model or prepare config is never continued; it
    is set aside (warning) and the run equals a fresh one. An explicit checkpoint refuses."""
    store, prep = prepared
    one = TRAIN.model_copy(update={"epochs": 1})
    train(store, prep, MODEL, one, tmp_path / "run", seed=0)
    old = latest_checkpoint(tmp_path / "run")
    other = MODEL.model_copy(update={"n_prototypes": 30})
    with pytest.warns(UserWarning, match="trained with other settings"):
        res = train(store, prep, other, one, tmp_path / "run", seed=0, resume=True)
    fresh = train(store, prep, other, one, tmp_path / "fresh", seed=0)
    for k, v in _params(fresh.model).items():
        assert torch.equal(v, res.model.state_dict()[k]), k
    assert (tmp_path / "run" / "stale" / old.name).exists()
    assert latest_checkpoint(tmp_path / "run").name == "epoch_0000.pt"
    with pytest.raises(ScprotoInputError, match="cannot resume"):
        train(store, prep, MODEL, TRAIN, tmp_path / "x", seed=0,
              resume_from=latest_checkpoint(tmp_path / "run"))


def test_training_lowers_the_loss_and_uses_many_prototypes(prepared, tmp_path):
    store, prep = prepared
    res = train(store, prep, MODEL, TRAIN.model_copy(update={"epochs": 6}), tmp_path, seed=0)
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    assert all(np.isfinite(losses))


@pytest.mark.parametrize(("likelihood", "optimizer"),
                         [("nb", "lars"), ("zinb", "adamw"), ("mse", "lars")])
def test_every_likelihood_and_optimizer_trains(prepared, tmp_path, likelihood, optimizer):
    store, prep = prepared
    cfg = TRAIN.model_copy(update={"epochs": 1, "optimizer": optimizer,
                                   "lr": 0.3 if optimizer == "lars" else 1e-3})
    res = train(store, prep, MODEL.model_copy(update={"likelihood": likelihood}), cfg, tmp_path,
                seed=0)
    assert np.isfinite(res.history[0]["loss"])


@pytest.mark.parametrize("weighting", ["uniform", "snn", "distance"])
def test_loader_builds_views_from_the_knn_table(prepared, weighting):
    store, prep = prepared
    cfg = TRAIN.model_copy(update={"n_views": 5, "neighbor_weighting": weighting})
    loader, _ = build_loader(store, prep, cfg, seed=0)
    if weighting == "snn":  # the SNN weights are an artefact beside the KNN table
        assert np.load(prep.path / "knn_snn.npy").shape == prep.knn_indices.shape
    draw = loader.sampler.epoch(0)[0]
    batch = loader.build(draw, 0, 0)
    V, B, G = batch.counts.shape
    assert (V, G) == (5, len(prep.genes)) and B == len(draw.anchors)
    anchors = np.asarray(prep.cells)[draw.anchors]
    X = store.read_rows_unsorted(anchors)[:, prep.gene_columns].toarray()
    assert np.array_equal(batch.counts[0].numpy(), X)  # view 0 = the anchors themselves
    # every other view is one of the anchor's KNN neighbours, distinct per anchor
    lib = np.asarray(prep.library_size)
    knn = np.asarray(prep.knn_indices)[draw.anchors]
    for b in range(0, B, 17):
        libs = batch.library[1:, b].numpy()
        assert set(np.round(libs)).issubset(set(np.round(lib[knn[b]])))
    assert torch.equal(batch.group, torch.from_numpy(draw.groups))


def test_default_threads_respects_omp_num_threads(monkeypatch):
    """A user who caps OpenMP threads shares the cores: training must not take them all."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    cpus = len(os.sched_getaffinity(0))
    assert default_threads() == cpus
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cpus))
    assert default_threads() == 1
