"""Study-stratified, rank-aware sampler of anchor cells (method.md §6).

Every step draws anchors from a set of study groups, at least ``min_cells_per_study`` (global,
over all ranks) from each group it includes, so every per-study Sinkhorn group is large enough.
Groups are included with probability ∝ size^α; the step's anchors are split among the included
groups ∝ size^α, none below the minimum. Each group walks through its own permutation, so every
cell is visited about once per epoch (exactly, for α = 1 when all groups fit in a step). All ranks
compute the same global draw and keep their own slice of every group: the same number of steps
and the same study mix per step on every rank, a deterministic function of
(seed, epoch, rank, world size).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from scproto_scale.errors import ScprotoInputError


@dataclass
class StepDraw:
    """One step for one rank: ``anchors`` (positions into the sampler's cells) and their groups."""

    anchors: np.ndarray
    groups: np.ndarray
    group_ids: list[int]


def merge_small_studies(
    study: np.ndarray, names: list[str], min_cells: int, mode: str = "merge"
) -> tuple[np.ndarray, list[str]]:
    """Map studies with fewer than ``min_cells`` cells to one pooled group, or drop them.

    Args:
        study: ``(n,)`` int study codes of the cells.
        names: study names (``names[code]``).
        min_cells: smallest group the sampler accepts.
        mode: ``"merge"`` pools small studies into one group (itself dropped if still too small);
            ``"drop"`` leaves their cells out (group code −1).

    Returns:
        ``(n,)`` int64 group codes (−1 = not sampled) and the group names.

    Raises:
        ScprotoInputError: if no group reaches ``min_cells``.
    """
    counts = np.bincount(study, minlength=len(names))
    small = [i for i, c in enumerate(counts) if 0 < c < min_cells]
    big = [i for i, c in enumerate(counts) if c >= min_cells]
    groups = np.full(len(study), -1, dtype=np.int64)
    group_names = [names[i] for i in big]
    for g, i in enumerate(big):
        groups[study == i] = g
    if small:
        pooled = int(sum(counts[i] for i in small))
        small_names = [names[i] for i in small]
        if mode == "merge" and pooled >= min_cells:
            mask = np.isin(study, small)
            groups[mask] = len(group_names)
            group_names.append("+".join(small_names) if len(small) <= 3 else
                               f"pooled({len(small)} small studies)")
            warnings.warn(
                f"{len(small)} studies with < {min_cells} cells pooled into one SwAV group: "
                f"{small_names[:10]}", stacklevel=2)
        else:
            warnings.warn(
                f"dropping {pooled} cells of {len(small)} studies with < {min_cells} cells from "
                f"training: {small_names[:10]} (lower train.min_cells_per_study to keep them)",
                stacklevel=2)
    if not group_names:
        raise ScprotoInputError(
            f"no study has ≥ min_cells_per_study={min_cells} cells (largest: {counts.max()})")
    return groups, group_names


class StudyStratifiedSampler:
    """Anchors per step, stratified by study group.

    Args:
        groups: ``(n,)`` int group code of each cell (−1: never sampled).
        batch_size: anchors per step per rank.
        min_cells_per_group: minimum anchors per included group per step, over all ranks.
        alpha: groups are included (and filled) ∝ size^alpha.
        seed: base seed.
        rank, world_size: this worker and the number of workers.
        block_size: chunk-level shuffle (``None``: every group walks a uniform permutation of
            its cells). With a block size, a group's cells (in position order, i.e. the
            locality order of the training cache) are cut into blocks of ``block_size``
            consecutive cells, the blocks are permuted, and cells are shuffled within windows
            of ``shuffle_blocks`` blocks (a shuffle buffer, as tiledbsoma-ml does): each step
            reads few cache chunks, and every cell is still visited once per cycle.
        shuffle_blocks: blocks per shuffle window.
    """

    def __init__(
        self, groups: np.ndarray, batch_size: int, min_cells_per_group: int = 128,
        alpha: float = 1.0, seed: int = 0, rank: int = 0, world_size: int = 1,
        block_size: int | None = None, shuffle_blocks: int = 4,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.groups = np.asarray(groups, dtype=np.int64)
        self.n_groups = int(self.groups.max()) + 1
        self.members = [np.flatnonzero(self.groups == g) for g in range(self.n_groups)]
        self.sizes = np.array([len(m) for m in self.members], dtype=np.float64)
        self.batch_size, self.alpha, self.seed = batch_size, alpha, seed
        self.rank, self.world_size = rank, world_size
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be ≥ 1, got {block_size}")
        self.block_size, self.shuffle_blocks = block_size, max(1, shuffle_blocks)
        global_batch = batch_size * world_size
        # Per-group minimum, rounded up to a multiple of the world size.
        self.min_global = math.ceil(min_cells_per_group / world_size) * world_size
        self.groups_per_step = max(1, min(self.n_groups, global_batch // self.min_global))
        self.global_batch = max(global_batch, self.min_global)
        self.steps_per_epoch = max(1, math.ceil(int(self.sizes.sum()) / self.global_batch))

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _allocate(self, chosen: np.ndarray) -> np.ndarray:
        """Global anchors per chosen group: ∝ size^α, but never below the minimum.

        Water-filling in units of W (one anchor per rank): groups whose proportional share is
        below the minimum get the minimum, the rest is shared ∝ size^α among the others.
        """
        W = self.world_size
        units, floor = self.global_batch // W, self.min_global // W
        w = self.sizes[chosen] ** self.alpha
        fixed = np.zeros(len(chosen), dtype=bool)
        while True:
            free = units - floor * fixed.sum()
            share = np.where(fixed, floor, free * w / w[~fixed].sum())
            newly = ~fixed & (share < floor)
            if not newly.any():
                break
            fixed |= newly
        alloc = np.floor(share).astype(np.int64)
        left = units - alloc.sum()
        alloc[np.argsort(-(share - alloc), kind="stable")[:left]] += 1
        return alloc * W

    def epoch(self, epoch: int) -> list[StepDraw]:
        """All steps of one epoch for this rank."""
        rng = self._rng(epoch)
        cursors = np.zeros(self.n_groups, dtype=np.int64)
        orders: list[list[np.ndarray]] = [[] for _ in range(self.n_groups)]
        steps: list[StepDraw] = []
        p = self.sizes**self.alpha
        p = p / p.sum()
        for _ in range(self.steps_per_epoch):
            chosen = np.sort(rng.choice(self.n_groups, self.groups_per_step, replace=False, p=p))
            alloc = self._allocate(chosen)
            anchors, labels = [], []
            for g, m in zip(chosen, alloc, strict=True):
                draw = self._take(g, int(m), cursors, orders, epoch)
                local = draw.reshape(self.world_size, -1)[self.rank]
                anchors.append(local)
                labels.append(np.full(len(local), g))
            steps.append(StepDraw(np.concatenate(anchors), np.concatenate(labels),
                                  [int(g) for g in chosen]))
        return steps

    def _permutation(self, g: int, rng: np.random.Generator) -> np.ndarray:
        """One cycle's order of group g: a uniform permutation, or the chunk-level shuffle."""
        members = self.members[g]
        if self.block_size is None or len(members) <= self.block_size:
            return rng.permutation(members)
        n_blocks = math.ceil(len(members) / self.block_size)
        blocks = rng.permutation(n_blocks)
        starts = blocks * self.block_size
        lengths = np.minimum(starts + self.block_size, len(members)) - starts
        # positions of the permuted blocks, concatenated
        idx = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        idx += np.arange(len(members))
        order = members[idx]
        window = self.block_size * self.shuffle_blocks
        for a in range(0, len(order), window):
            order[a:a + window] = rng.permutation(order[a:a + window])
        return order

    def _take(self, g: int, m: int, cursors: np.ndarray, orders: list[list[np.ndarray]],
              epoch: int) -> np.ndarray:
        """Next ``m`` cells of group g's permutation stream (a fresh permutation per cycle)."""
        out = []
        while m > 0:
            cycle, pos = divmod(int(cursors[g]), len(self.members[g]))
            while len(orders[g]) <= cycle:
                perm = self._permutation(g, self._rng(epoch, g, len(orders[g])))
                if out:  # cells already drawn in this step go last: no repeats within a step
                    taken = np.isin(perm, np.concatenate(out))
                    perm = np.concatenate([perm[~taken], perm[taken]])
                orders[g].append(perm)
            take = min(m, len(self.members[g]) - pos)
            out.append(orders[g][cycle][pos : pos + take])
            cursors[g] += take
            m -= take
        return np.concatenate(out)
