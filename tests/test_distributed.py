"""Distributed training on real gloo process groups (spawned ranks) and real Ray Train workers."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from scproto_scale.config import DistributedConfig, ModelConfig, PrepareConfig, TrainConfig
from scproto_scale.data.ingest import ingest
from scproto_scale.data.store import open_store
from scproto_scale.errors import ScprotoInputError
from scproto_scale.model import dist
from scproto_scale.model.swav import group_codes
from scproto_scale.prepare.run import prepare
from scproto_scale.train.launch import launch, launch_ray, resolve_launcher
from scproto_scale.train.spawn import run_ranks
from scproto_scale.train.worker import TrainJob, run_worker

MODEL = ModelConfig(n_prototypes=20, latent_dim=8, queue_length=64, queue_start_epoch=1)
TRAIN = TrainConfig(epochs=2, batch_size=128, min_cells_per_study=32, progress=False,
                    n_views=4, num_threads=1)


# ---- per-study Sinkhorn: W ranks == one rank holding the concatenated batch ----------------

def _split_case(seed: int = 0):
    """Scores of 3 study groups with uneven cells per rank, plus per-rank queues."""
    g = torch.Generator().manual_seed(seed)
    K, world = 40, 2
    cells = {0: (7, 5), 1: (3, 9), 2: (16, 16)}  # group → cells on rank 0, rank 1
    queue = {0: (10, 6), 1: (0, 0), 2: (4, 12)}
    def unit(n):
        return torch.nn.functional.normalize(torch.randn(n, K, generator=g), dim=1)
    scores = {k: [unit(n) for n in v] for k, v in cells.items()}
    queues = {k: [unit(n) for n in v] for k, v in queue.items()}
    return scores, queues, world


def _sinkhorn_rank(seed: int) -> dict:
    scores, queues, _ = _split_case(seed)
    r = dist.rank()
    return {k: group_codes(scores[k][r], queues[k][r], epsilon=0.05, n_iters=3)
            for k in sorted(scores)}


def test_distributed_sinkhorn_equals_one_rank_on_the_concatenated_batch():
    scores, queues, world = _split_case(0)
    per_rank = run_ranks(_sinkhorn_rank, world, 0)
    for k in sorted(scores):
        one = group_codes(torch.cat(scores[k]), torch.cat(queues[k]), epsilon=0.05, n_iters=3)
        two = torch.cat([per_rank[r][k] for r in range(world)])
        assert two.shape == one.shape
        assert torch.allclose(one, two, atol=1e-5, rtol=0), (k, (one - two).abs().max())
        assert torch.allclose(one.sum(1), torch.ones(len(one)), atol=1e-5)


def _recentred_queue_rank(seed: int) -> dict:
    from scproto_scale.model.swav import StudyQueue

    zs, cur, protos = _recentre_case(seed)
    r = dist.rank()
    q = StudyQueue(n_groups=2, length=16, dim=4)
    q.push(zs[r], torch.zeros(len(zs[r]), dtype=torch.long))
    return q.scores(protos, [0, 1], cur[r], torch.zeros(len(cur[r]), dtype=torch.long))


def _recentre_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    zs = [torch.randn(n, 4, generator=g) for n in (5, 9)]  # each rank's queue
    cur = [torch.randn(n, 4, generator=g) + 1.0 for n in (3, 7)]  # each rank's cells, drifted
    return zs, cur, torch.randn(6, 4, generator=g)


def test_recentred_queue_uses_the_drift_over_all_ranks():
    zs, cur, protos = _recentre_case(1)
    per_rank = run_ranks(_recentred_queue_rank, 2, 1)
    drift = torch.cat(cur).mean(0) - torch.cat(zs).mean(0)
    for r in range(2):
        assert set(per_rank[r]) == {0}
        torch.testing.assert_close(per_rank[r][0], (zs[r] + drift) @ protos.t())


# ---- DDP training on spawned gloo ranks ------------------------------------------------------

@pytest.fixture(scope="module")
def job(tiny_h5ad, tmp_path_factory) -> TrainJob:
    root = tmp_path_factory.mktemp("dist")
    store = open_store(ingest(tiny_h5ad, root / "tiny.zarr"))
    prep = prepare(store, root / "prepared", "study",
                   PrepareConfig(n_top_genes=200, n_pcs=20, n_neighbors=15))
    return TrainJob(str(store.path), str(prep.path), MODEL, TRAIN, str(root / "ckpt"), seed=5)


def _train_rank(job: TrainJob, overrides: dict | None = None) -> dict:
    if overrides and dist.rank() in overrides:
        job = dataclasses.replace(job, **overrides[dist.rank()])
    res = run_worker(job)
    return {"params": {k: v.clone() for k, v in res.model.state_dict().items()},
            "history": res.history}


def test_ddp_ranks_end_with_identical_parameters_and_one_checkpoint(job, tmp_path):
    job = dataclasses.replace(job, checkpoint_dir=str(tmp_path))
    r0, r1 = run_ranks(_train_rank, 2, job)
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
    assert [h["world_size"] for h in r0["history"]] == [2, 2]
    assert r0["history"][-1]["loss"] == r1["history"][-1]["loss"]  # the ranks' mean
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["epoch_0000.pt", "epoch_0001.pt"]


def test_workers_that_disagree_fail_fast_on_every_rank(job, tmp_path):
    bad = {1: {"model": MODEL.model_copy(update={"n_prototypes": 21}),
               "checkpoint_dir": str(tmp_path)}}
    job = dataclasses.replace(job, checkpoint_dir=str(tmp_path))
    errors = run_ranks(_train_rank, 2, job, bad, raise_errors=False, timeout_s=30)
    for e in errors:
        assert e.kind == "ScprotoInputError" and "disagree on 'model config'" in e.message


# ---- Ray Train: two workers, one killed mid-epoch, restarted from the last checkpoint --------

@pytest.mark.slow
def test_ray_restarts_a_killed_worker_and_matches_an_uninterrupted_run(job, tmp_path):
    pytest.importorskip("ray")
    cfg = DistributedConfig(workers=2, max_failures=1, cpus_per_worker=1, timeout_s=120)
    train_cfg = TRAIN.model_copy(update={"checkpoint_every_steps": 2})
    marker = tmp_path / "fault_fired"
    faulty = dataclasses.replace(job, train=train_cfg, checkpoint_dir=str(tmp_path / "a"),
                                 fault_injection=f"1:1:2:{marker}")
    res = launch_ray(faulty, cfg, str(tmp_path / "ray"))
    assert marker.exists()  # rank 1 really died (os._exit) at epoch 1, step 2
    clean = dataclasses.replace(job, train=train_cfg, checkpoint_dir=str(tmp_path / "b"))
    ref = run_ranks(_train_rank, 2, clean)[0]
    diff = max((res.model.state_dict()[k] - v).abs().max().item() for k, v in ref["params"].items())
    assert diff == 0.0  # bit-identical on CPU: same seeds, deterministic kernels, 1 thread
    assert [h["epoch"] for h in res.history] == [0, 1]


# ---- launcher choice and bad input -----------------------------------------------------------

def test_launcher_resolution_and_clear_errors(job, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_launcher(DistributedConfig()) == "local"
    assert resolve_launcher(DistributedConfig(workers=2)) == "ray"
    with pytest.raises(ScprotoInputError, match="not started by torchrun"):
        resolve_launcher(DistributedConfig(launcher="torchrun"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_launcher(DistributedConfig(workers=4)) == "torchrun"
    monkeypatch.delenv("WORLD_SIZE")
    if not torch.cuda.is_available():
        with pytest.raises(ScprotoInputError, match="CUDA is not available"):
            launch(job, DistributedConfig(use_gpu=True), "unused")


def test_an_unreachable_ray_cluster_is_a_clear_error(job, tmp_path):
    pytest.importorskip("ray")
    with pytest.raises(ScprotoInputError, match=r"cannot reach the Ray cluster at '127\.0\.0\.1:1'"):
        launch_ray(job, DistributedConfig(workers=2, ray_address="127.0.0.1:1"), str(tmp_path))


@pytest.mark.slow
def test_ray_refuses_more_cpus_than_the_cluster_has(job, tmp_path):
    pytest.importorskip("ray")
    cpus = os.cpu_count() or 1
    with pytest.raises(ScprotoInputError, match="CPUs; the Ray cluster has"):
        launch_ray(job, DistributedConfig(workers=cpus + 1, cpus_per_worker=1), str(tmp_path))


def test_gradient_accumulation_and_bf16_autocast(job, tmp_path):
    acc = TRAIN.model_copy(update={"epochs": 1, "accumulate_steps": 2})
    res = run_worker(dataclasses.replace(job, train=acc, checkpoint_dir=str(tmp_path)))
    assert np.isfinite(res.history[0]["loss"])
    bf16 = dataclasses.replace(job, train=acc.model_copy(update={"precision": "bf16"}),
                               checkpoint_dir=str(tmp_path / "bf16"))
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        res = run_worker(bf16)
        assert np.isfinite(res.history[0]["loss"])
        assert res.model.cvae.mu.weight.dtype == torch.float32  # autocast, weights stay fp32
    else:
        with pytest.raises(ScprotoInputError, match="bf16 needs a GPU"):
            run_worker(bf16)
