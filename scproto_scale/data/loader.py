"""Training loader: sampler anchors + KNN neighbour views → one read → tensors.

For each step: the sampler's anchors, ``V−1`` distinct neighbours per anchor drawn from its KNN
row (uniform, ∝ shared-neighbour Jaccard, or ∝ squared distance for parity with the reference
code; weighted draws by Gumbel-top-k), one read of the unique rows from the store (sorted, so
the zarr store fetches coalesced runs of chunks), alignment to the model's gene list (missing genes zero-filled), and tensors shaped
``(V, B, G)``. Batches are built in background threads (``prefetch`` ahead); each is a
deterministic function of (seed, epoch, step, rank), so prefetching never changes results, and
a batch whose worker failed is rebuilt (identically) instead of being skipped: an epoch is never
silently short. Input errors (:class:`ScprotoInputError`, e.g. a corrupt chunk) are not retried.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from scproto_scale.atlas.genes import align_genes
from scproto_scale.data.batch import ViewBatch
from scproto_scale.data.pread import row_reader
from scproto_scale.data.sampler import StepDraw, StudyStratifiedSampler
from scproto_scale.data.store import CellStore, release_mapped_pages
from scproto_scale.errors import ScprotoInputError
from scproto_scale.prepare.snn import snn_sampling_weights

log = logging.getLogger(__name__)


def align_store_genes(store: CellStore, genes: list[str], min_overlap: float = 0.8) -> np.ndarray:
    """Store columns of the model's genes for :class:`ViewLoader` (−1: missing, zero-filled).

    Args:
        store: the store to read.
        genes: the model's gene ids, in model order.
        min_overlap: refuse below this fraction of model genes present.

    Returns:
        ``(len(genes),)`` int64 columns.

    Raises:
        ScprotoInputError: coverage below ``min_overlap``; the message gives the overlap
            (present / total, percentage) and example missing genes.
    """
    return align_genes(store.var_names, genes, min_overlap, source=f"store {store.path}")


def draw_neighbours(knn_rows: np.ndarray, n: int, rng: np.random.Generator,
                    weights: np.ndarray | None = None) -> np.ndarray:
    """Pick ``n`` distinct neighbours per row, uniformly or ∝ ``weights``.

    Args:
        knn_rows: ``(B, k)`` neighbour ids.
        n: neighbours per row (≤ k).
        rng: random source.
        weights: ``(B, k)`` non-negative sampling weights (squared distances for the reference
            code's ``"distance"``, SNN Jaccard for ``"snn"``), or None for uniform.

    Returns:
        ``(B, n)`` chosen neighbour ids.
    """
    B, k = knn_rows.shape
    if n > k:
        raise ValueError(f"need {n} neighbour views but the KNN table has k={k}")
    keys = rng.random((B, k))
    if weights is not None:
        # Gumbel-top-k: sampling without replacement ∝ w equals top-n of log w + Gumbel noise.
        keys = np.log(np.asarray(weights, dtype=np.float64) + 1e-12) - np.log(-np.log(keys))
    pick = np.argpartition(-keys, n - 1, axis=1)[:, :n] if n < k else np.argsort(-keys, axis=1)
    return np.take_along_axis(knn_rows, pick, axis=1)


class ViewLoader:
    """Iterates :class:`ViewBatch` es over an epoch.

    Args:
        store: the counts.
        cells: ``(n,)`` store rows of the training cells (sampler positions index into it).
        knn_indices: ``(n, k)`` int32 store rows of each training cell's neighbours.
        knn_distances: ``(n, k)`` float32 distances.
        library_size: ``(n_obs,)`` total counts of every store row (all genes).
        condition: ``(n_obs,)`` study code of every store row.
        gene_columns: ``(G,)`` store columns of the model genes, −1 for a model gene the store
            lacks (zero-filled; see :func:`scproto_scale.atlas.genes.align_genes`, which
            refuses a store below a coverage threshold).
        sampler: a :class:`StudyStratifiedSampler` over the n training cells.
        n_views: V (anchor + V−1 neighbours).
        neighbor_weighting: ``"uniform"``, ``"distance"`` (∝ squared distance) or ``"snn"``
            (∝ ``snn_weights``).
        snn_weights: ``(n, k)`` SNN Jaccard of each KNN edge
            (:func:`scproto_scale.prepare.snn.snn_jaccard`); required for ``"snn"``.
        snn_prune: edges with Jaccard ≤ this get weight 0 (Seurat's ``prune.SNN``, 1/15); a
            cell with fewer than V−1 edges left draws the rest uniformly from the pruned ones.
        seed: seeds the neighbour draws.
        prefetch: batches built ahead in background threads (0: synchronous).
        max_retries: rebuilds of a batch whose build raised (not for input errors).
        release_every: steps between releases of the pages of tables that stay memory-mapped
            (:func:`~scproto_scale.data.store.release_mapped_pages`; ``.npy`` memory maps are
            read by row with ``pread`` instead) and of the store's chunk maps
            (:meth:`CellStore.release_pages`; the training cache is read with ``pread``).
    """

    def __init__(
        self, store: CellStore, cells: np.ndarray, knn_indices: np.ndarray,
        knn_distances: np.ndarray, library_size: np.ndarray, condition: np.ndarray,
        gene_columns: np.ndarray, sampler: StudyStratifiedSampler, n_views: int = 8,
        neighbor_weighting: str = "uniform", seed: int = 0, prefetch: int = 2,
        max_retries: int = 2, snn_weights: np.ndarray | None = None, snn_prune: float = 1 / 15,
        release_every: int = 16,
    ):
        if neighbor_weighting == "snn" and snn_weights is None:
            raise ValueError('neighbor_weighting="snn" needs snn_weights')
        self.store, self.cells = store, np.asarray(cells)
        # memory-mapped tables are read by row with pread: a map's resident set grows to the
        # whole table within a few steps (see scproto_scale.data.pread)
        self.knn_indices, self.knn_distances = row_reader(knn_indices), row_reader(knn_distances)
        self.library_size = np.asarray(library_size, dtype=np.float32)
        self.condition = np.asarray(condition, dtype=np.int64)
        self.gene_columns = np.asarray(gene_columns, dtype=np.int64)
        self.max_retries = max_retries
        self.sampler, self.n_views = sampler, n_views
        self.neighbor_weighting, self.seed, self.prefetch = neighbor_weighting, seed, prefetch
        self.snn_weights = row_reader(snn_weights)
        self.snn_prune = snn_prune
        self.release_every = release_every

    def __len__(self) -> int:
        return len(self.sampler)

    def build(self, draw: StepDraw, epoch: int, step: int) -> ViewBatch:
        """The :class:`ViewBatch` of one sampler draw."""
        rng = np.random.default_rng([self.seed, epoch, step, self.sampler.rank, 0x5EED])
        pos = draw.anchors
        weights = None
        if self.neighbor_weighting == "distance":
            weights = np.square(np.asarray(self.knn_distances[pos], dtype=np.float64))
        elif self.neighbor_weighting == "snn":
            weights = snn_sampling_weights(self.snn_weights[pos], self.snn_prune)
        nbrs = draw_neighbours(np.asarray(self.knn_indices[pos]), self.n_views - 1, rng, weights)
        rows = np.concatenate([self.cells[pos], nbrs.T.reshape(-1)]).astype(np.int64)
        # One read of the step's rows, dense and in model gene order (missing genes zero).
        X = self.store.read_dense(rows, self.gene_columns)
        V, B = self.n_views, len(pos)
        return ViewBatch(
            counts=torch.from_numpy(X.reshape(V, B, -1)),
            library=torch.from_numpy(self.library_size[rows].reshape(V, B)),
            condition=torch.from_numpy(self.condition[rows].reshape(V, B)),
            group=torch.from_numpy(draw.groups.astype(np.int64)),
            group_ids=draw.group_ids,
        )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[ViewBatch]:
        """Batches of one epoch, from ``start_step`` on."""
        draws = self.sampler.epoch(epoch)
        steps = range(start_step, len(draws))
        if self.prefetch <= 0:
            for s in steps:
                self._release(s)
                yield self._rebuild(draws[s], epoch, s, None)
            return
        with ThreadPoolExecutor(max_workers=self.prefetch) as pool:
            futures: dict[int, Future] = {}
            for s in steps:
                for ahead in range(s, min(s + self.prefetch + 1, len(draws))):
                    if ahead not in futures:
                        futures[ahead] = pool.submit(self.build, draws[ahead], epoch, ahead)
                self._release(s)
                yield self._rebuild(draws[s], epoch, s, futures.pop(s))

    def _release(self, step: int) -> None:
        if self.release_every and step % self.release_every == self.release_every - 1:
            for table in (self.knn_indices, self.knn_distances, self.snn_weights):
                release_mapped_pages(table)
            self.store.release_pages()

    def _rebuild(self, draw: StepDraw, epoch: int, step: int, future: Future | None) -> ViewBatch:
        """The batch of a step: the worker's result, or rebuilt when the worker failed."""
        last: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            try:
                if attempt == 0 and future is not None:
                    return future.result()
                return self.build(draw, epoch, step)
            except ScprotoInputError:
                raise
            except Exception as exc:
                last = exc
                log.warning("loader: building step %d of epoch %d failed (%s: %s); rebuilding",
                            step, epoch, type(exc).__name__, exc)
        raise RuntimeError(f"loader: step {step} of epoch {epoch} failed "
                           f"{self.max_retries + 1} times; stopping rather than shortening the "
                           "epoch") from last
