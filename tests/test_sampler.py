"""Study-stratified sampler: determinism, rank agreement, per-study minimum, coverage."""

import warnings

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from scproto_scale.data.sampler import StudyStratifiedSampler, merge_small_studies
from scproto_scale.errors import ScprotoInputError


def _groups(sizes, seed=0):
    g = np.concatenate([np.full(s, i) for i, s in enumerate(sizes)])
    return np.random.default_rng(seed).permutation(g)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(40, 400), min_size=1, max_size=6),
    batch=st.integers(32, 256),
    min_cells=st.integers(8, 64),
    world=st.integers(1, 8),
    alpha=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 10),
    block=st.sampled_from([None, 8, 32]),
)
def test_sampler_guarantees(sizes, batch, min_cells, world, alpha, seed, block):
    groups = _groups(sizes, seed)
    samplers = [StudyStratifiedSampler(groups, batch, min_cells, alpha, seed, r, world,
                                       block_size=block) for r in range(world)]
    epochs = [s.epoch(3) for s in samplers]
    # every rank: same number of steps and the same study mix per step
    assert len({len(e) for e in epochs}) == 1
    for steps in zip(*epochs, strict=True):
        assert len({tuple(s.group_ids) for s in steps}) == 1
        assert len({len(s.anchors) for s in steps}) == 1
        for g in steps[0].group_ids:
            n_global = sum(int((s.groups == g).sum()) for s in steps)
            assert n_global >= min_cells  # per-study minimum over all ranks
            for s in steps:
                assert (groups[s.anchors[s.groups == g]] == g).all()  # anchors are of their group
        # ranks never share an anchor within a step when a group is big enough for the draw
        allc = np.concatenate([s.anchors for s in steps])
        if all(sum(int((s.groups == g).sum()) for s in steps) <= sizes[g]
               for g in steps[0].group_ids):
            assert len(np.unique(allc)) == len(allc)
    # deterministic in (seed, epoch, rank, world size)
    again = StudyStratifiedSampler(groups, batch, min_cells, alpha, seed, world - 1, world,
                                   block_size=block).epoch(3)
    for a, b in zip(epochs[-1], again, strict=True):
        assert np.array_equal(a.anchors, b.anchors)
    other = samplers[0].epoch(4)
    assert any(not np.array_equal(a.anchors, b.anchors)
               for a, b in zip(epochs[0], other, strict=False)) or len(groups) <= batch


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(100, 1500), min_size=2, max_size=8),
    batch=st.integers(64, 256),
    min_cells=st.integers(8, 64),
    world=st.integers(1, 8),
    seed=st.integers(0, 10),
    block=st.sampled_from([None, 16, 64]),
)
@example(sizes=[1000, 1200, 1500], batch=128, min_cells=8, world=2, seed=0, block=16)
@example(sizes=[900, 1400], batch=100, min_cells=16, world=5, seed=1, block=None)
def test_every_cell_about_once_per_epoch(sizes, batch, min_cells, world, seed, block):
    """α = 1, all ranks together: each study is walked as a permutation stream (no cell twice
    before the study is exhausted) and the epoch draws about N anchors. Where the per-study
    minimum does not bind (every study fits in every step with its proportional share ≥ the
    minimum), that is every cell about once; where it binds, small studies are revisited
    (the minimum wins over proportionality, by design)."""
    groups = _groups(sizes, seed)
    epochs = [StudyStratifiedSampler(groups, batch, min_cells, 1.0, seed, r, world,
                                     block_size=block).epoch(0) for r in range(world)]
    streams = {g: [] for g in range(len(sizes))}
    visits = np.zeros(len(groups), dtype=int)
    for steps in zip(*epochs, strict=True):
        for g in steps[0].group_ids:
            for s in steps:  # rank r holds the r-th contiguous slice of the global draw
                streams[g].extend(s.anchors[s.groups == g].tolist())
        for s in steps:
            np.add.at(visits, s.anchors, 1)
    for g, stream in streams.items():
        first = stream[: sizes[g]]
        assert len(set(first)) == len(first)
    sampler = StudyStratifiedSampler(groups, batch, min_cells, 1.0, seed, 0, world)
    total = visits.sum()
    assert len(groups) <= total < len(groups) + sampler.global_batch
    share = np.array(sizes) / len(groups) * sampler.global_batch
    if (sampler.groups_per_step == len(sizes) and share.min() >= sampler.min_global + world
            and sampler.global_batch <= min(sizes)):
        assert (visits > 0).mean() >= 0.95
        assert visits.max() <= 2


def test_each_study_is_walked_without_repeats_before_wrapping():
    sizes = [300, 500, 200]
    groups = _groups(sizes)
    s = StudyStratifiedSampler(groups, batch_size=256, min_cells_per_group=64, alpha=1.0)
    seen = {g: [] for g in range(3)}
    for step in s.epoch(0):
        for g in step.group_ids:
            seen[g].extend(step.anchors[step.groups == g].tolist())
    for g, cells in seen.items():
        first = cells[: sizes[g]]
        assert len(set(first)) == len(first)  # no cell twice before its study is exhausted
    visited = set().union(*map(set, seen.values()))
    assert len(visited) / len(groups) > 0.95  # α = 1, all studies per step: about once per epoch


def test_groups_per_step_and_minimum():
    groups = _groups([1000] * 10)
    s = StudyStratifiedSampler(groups, batch_size=512, min_cells_per_group=128)
    for step in s.epoch(0):
        assert len(step.group_ids) == 4  # 512 // 128
        assert np.bincount(step.groups, minlength=10)[step.group_ids].min() >= 128


def test_merge_and_drop_small_studies():
    study = np.array([0] * 500 + [1] * 50 + [2] * 90 + [3] * 400)
    names = ["a", "b", "c", "d"]
    with pytest.warns(UserWarning, match="pooled"):
        g, gn = merge_small_studies(study, names, 128, "merge")
    assert gn == ["a", "d", "b+c"]
    assert (g[study == 1] == 2).all() and (g[study == 2] == 2).all()
    with pytest.warns(UserWarning, match="dropping 140 cells"):
        g, gn = merge_small_studies(study, names, 128, "drop")
    assert gn == ["a", "d"] and (g[(study == 1) | (study == 2)] == -1).all()
    with pytest.raises(ScprotoInputError, match="no study"), pytest.warns(UserWarning):
        merge_small_studies(np.zeros(10, dtype=int), ["x"], 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_small_studies(np.array([0] * 200), ["x"], 128)  # nothing small: no warning
