"""`prepare`: streaming gene statistics → HVG → PCA → KNN, saved beside the store.

Passes over the store (each streams row chunks, memory bounded by one chunk):
1. library sizes, count validation, study codes;
2–3. seurat_v3 HVG statistics (batch-aware; two passes);
4. PCA fit (exact Gram matrix over the HVGs, or randomized subspace iteration: more passes);
5. PCA projection into a memory map, spilling the model-gene counts for the training cache;
then FAISS KNN on the scores (int32 memory maps) and, for large stores, the locality-ordered
training cache (:mod:`scproto_scale.prepare.cache`). Cells with zero counts are dropped from
training and reported. Everything is written to a temporary directory and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scproto_scale.config import PrepareConfig
from scproto_scale.data.store import CellStore
from scproto_scale.data.validate import check_count_chunk
from scproto_scale.data.writers import atomic_directory
from scproto_scale.errors import ScprotoInputError
from scproto_scale.prepare.artefacts import FORMAT_VERSION, Prepared
from scproto_scale.prepare.cache import (
    CACHE_NAME,
    SpillWriter,
    iter_spill,
    locality_order,
    write_training_cache,
)
from scproto_scale.prepare.hvg import highly_variable_genes_seurat_v3
from scproto_scale.prepare.knn import knn, knn_per_study, resolve_method, resolve_scope
from scproto_scale.prepare.normalize import log_normalize
from scproto_scale.prepare.pca import fit_pca
from scproto_scale.provenance import versions

log = logging.getLogger(__name__)


def study_codes_of(store: CellStore, batch_key: str) -> tuple[np.ndarray, list[str]]:
    """``(n_obs,)`` int32 study codes and the study names, from obs[batch_key].

    Raises:
        ScprotoInputError: unknown column or missing values in it.
    """
    col = store.obs_column(batch_key)
    if col.isna().any():
        rows = np.flatnonzero(col.isna().to_numpy())[:5].tolist()
        raise ScprotoInputError(
            f"{store.path}: obs[{batch_key!r}] has {int(col.isna().sum())} missing values "
            f"(rows {rows}…)"
        )
    cat = pd.Categorical(col.astype(str))
    return cat.codes.astype(np.int32), [str(c) for c in cat.categories]


def _scan_library_sizes(
    store: CellStore, chunk_size: int, require_integer: bool
) -> np.ndarray:
    lib = np.zeros(store.n_obs, dtype=np.float32)
    for start, stop, X in store.iter_chunks(chunk_size):
        check_count_chunk(X, source=str(store.path), row_offset=start,
                          require_integer=require_integer)
        lib[start:stop] = np.asarray(X.sum(axis=1)).ravel()
    return lib


def _kept_chunks(store: CellStore, cells: np.ndarray, chunk_size: int) -> Iterator[
        tuple[np.ndarray, sp.csr_matrix]]:
    """Yield ``(rows, X[rows])`` over the kept cells, reading contiguous store ranges."""
    for start, stop, X in store.iter_chunks(chunk_size):
        lo, hi = np.searchsorted(cells, [start, stop])
        rows = cells[lo:hi]
        if len(rows):
            yield rows, X[rows - start]


def prepare(
    store: CellStore, out: str | Path, batch_key: str, config: PrepareConfig | None = None,
    require_integer: bool = True, seed: int = 0, overwrite: bool = False,
) -> Prepared:
    """Compute and save library sizes, HVGs, PCA and the KNN table of a store.

    Args:
        store: the cells.
        out: directory for the artefacts (e.g. ``STORE.prepared``).
        batch_key: obs column of the study / batch (HVG selection is batch-aware).
        config: :class:`PrepareConfig`.
        require_integer: counts must be integers (nb / zinb likelihoods).
        seed: seed of the approximate KNN index.
        overwrite: recompute an existing directory.

    Returns:
        The loaded :class:`Prepared` artefacts.

    Raises:
        ScprotoInputError: unknown batch key, invalid counts, or too few cells.
    """
    cfg = config or PrepareConfig()
    out = Path(out)
    if (out / "prepare.json").exists() and not overwrite:
        existing = Prepared.load(out)
        wanted = {"batch_key": batch_key, "config": cfg.model_dump(), "seed": seed,
                  "n_obs": int(store.n_obs)}
        stale = {k: existing.meta.get(k) for k, v in wanted.items() if existing.meta.get(k) != v}
        if not stale:
            log.info("prepare: reusing %s", out)
            return existing
        warnings.warn(f"prepared artefacts at {out} were made with other settings "
                      f"({sorted(stale)}); recomputing", stacklevel=2)
    t0 = time.perf_counter()
    codes, studies = study_codes_of(store, batch_key)

    timings: dict[str, float] = {}
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timings[name] = round(now - tick, 2)
        tick = now

    lib = _scan_library_sizes(store, cfg.chunk_size, require_integer)
    lap("library_s")
    zero = np.flatnonzero(lib <= 0)
    if len(zero):
        warnings.warn(
            f"{store.path}: dropping {len(zero)} cells with zero counts (rows {zero[:5].tolist()}…)",
            stacklevel=2,
        )
    cells = np.flatnonzero(lib > 0).astype(np.int64)
    if len(cells) <= cfg.n_neighbors:
        raise ScprotoInputError(
            f"{store.path}: {len(cells)} cells with counts; need more than n_neighbors="
            f"{cfg.n_neighbors}"
        )

    kept_codes = codes[cells]
    present, per_study = np.unique(kept_codes, return_counts=True)
    if (per_study < 2).any():
        lonely = [studies[c] for c in present[per_study < 2]]
        raise ScprotoInputError(
            f"{store.path}: obs[{batch_key!r}] has studies with a single cell with counts "
            f"({lonely[:10]}); batch-aware HVG selection needs ≥ 2 per study — merge or drop them"
        )
    remap = np.full(len(studies), -1)
    remap[present] = np.arange(len(present))

    def hvg_chunks():
        for rows, X in _kept_chunks(store, cells, cfg.chunk_size):
            yield X, remap[codes[rows]]

    if cfg.n_top_genes >= store.n_vars:
        warnings.warn(
            f"n_top_genes={cfg.n_top_genes} ≥ the store's {store.n_vars} genes: using all genes",
            stacklevel=2,
        )
    n_top = min(cfg.n_top_genes, store.n_vars)
    stats = highly_variable_genes_seurat_v3(
        hvg_chunks, n_vars=store.n_vars, n_batches=len(present), n_top_genes=n_top,
        span=cfg.hvg_span,
    )
    stats.index = store.var_names
    gene_columns = np.flatnonzero(stats["highly_variable"].to_numpy())
    lap("hvg_s")

    use_cache = cfg.training_cache == "on" or (
        cfg.training_cache == "auto" and len(cells) >= cfg.cache_min_cells)
    with atomic_directory(out, mkdir=True) as tmp:
        # The PCA fit's first pass also spills the model-gene counts (store order, kept cells):
        # the projection and the training cache then read the small spill, not the store.
        spill = SpillWriter(tmp / "spill") if use_cache else None
        passes = [0]

        def pca_chunks():
            write = spill is not None and passes[0] == 0
            passes[0] += 1
            for rows, X in _kept_chunks(store, cells, cfg.chunk_size):
                Xg = X[:, gene_columns]
                if write:
                    spill.append(Xg)
                yield log_normalize(Xg, lib[rows])
            if write:
                spill.close()

        model = fit_pca(pca_chunks, n_genes=len(gene_columns), n_pcs=cfg.n_pcs,
                        method=cfg.pca_method, seed=seed)
        lap("pca_fit_s")
        n, n_pcs = len(cells), len(model.explained_variance)
        scores = np.lib.format.open_memmap(tmp / "pca.npy", "w+", np.float32, (n, n_pcs))
        if spill is not None:
            for a, b, Xg in iter_spill(tmp / "spill", len(gene_columns), cfg.chunk_size):
                scores[a:b] = model.transform(log_normalize(Xg, lib[cells[a:b]]))
        else:
            pos = 0
            for rows, X in _kept_chunks(store, cells, cfg.chunk_size):
                scores[pos:pos + len(rows)] = model.transform(
                    log_normalize(X[:, gene_columns], lib[rows]))
                pos += len(rows)
        scores.flush()
        lap("pca_project_s")
        (tmp / "knn").mkdir()
        index_kw = {"exact_max_cells": cfg.exact_knn_max_cells, "nprobe": cfg.ivf_nprobe,
                    "seed": seed, "method": cfg.knn_method, "hnsw_m": cfg.hnsw_m,
                    "ef_search": cfg.hnsw_ef_search, "ef_construction": cfg.hnsw_ef_construction}
        scope, why = resolve_scope(cfg.knn_scope, kept_codes, cfg.n_neighbors)
        log.info("prepare: KNN scope %s (%s)", scope, why)
        if scope == "per_study":
            try:
                nn_pos, nn_dist = knn_per_study(scores, kept_codes, k=cfg.n_neighbors,
                                                out_dir=tmp / "knn", **index_kw)
            except ValueError as e:
                raise ScprotoInputError(f"{store.path}: obs[{batch_key!r}]: {e}") from None
        else:
            nn_pos, nn_dist = knn(scores, k=cfg.n_neighbors, out_dir=tmp / "knn", **index_kw)
        nn_rows = np.lib.format.open_memmap(tmp / "knn_indices.npy", "w+", np.int32,
                                            nn_pos.shape)
        for a in range(0, n, 65_536):
            nn_rows[a:a + 65_536] = cells[nn_pos[a:a + 65_536]]
        nn_rows.flush()
        os.replace(tmp / "knn" / "knn_distances.npy", tmp / "knn_distances.npy")
        lap("knn_s")
        if use_cache:
            order = locality_order(scores, cfg.cache_cluster_cells, seed, groups=codes[cells])
            write_training_cache(tmp / "spill", order, cells,
                                 [str(g) for g in store.var_names[gene_columns]],
                                 tmp / CACHE_NAME)
            new_pos = np.empty(n, dtype=np.int64)
            new_pos[order] = np.arange(n)
            np.save(tmp / "cache_rows.npy", cells[order])
            ck = np.lib.format.open_memmap(tmp / "cache_knn_indices.npy", "w+", np.int32,
                                           nn_pos.shape)
            cd = np.lib.format.open_memmap(tmp / "cache_knn_distances.npy", "w+", np.float32,
                                           nn_pos.shape)
            for a in range(0, n, 65_536):
                sel = order[a:a + 65_536]
                ck[a:a + len(sel)] = new_pos[nn_pos[sel]]
                cd[a:a + len(sel)] = nn_dist[sel]
            ck.flush()
            cd.flush()
            del ck, cd
            shutil.rmtree(tmp / "spill")
            lap("cache_s")
        del nn_pos, nn_dist, nn_rows, scores
        shutil.rmtree(tmp / "knn")
        for name, arr in [("library_size", lib), ("study_codes", codes), ("cells", cells)]:
            np.save(tmp / f"{name}.npy", arr)
        stats.to_csv(tmp / "gene_stats.csv")
        meta = {
            "format_version": FORMAT_VERSION,
            "store": str(store.path),
            "batch_key": batch_key,
            "n_obs": int(store.n_obs),
            "n_cells": len(cells),
            "dropped_zero_count_cells": len(zero),
            "studies": studies,
            "genes": [str(g) for g in store.var_names[gene_columns]],
            "gene_columns": gene_columns.tolist(),
            "pca_explained_variance": model.explained_variance.tolist(),
            "median_library_size": float(np.median(lib[cells])),
            "training_cache": use_cache,
            "knn_index": resolve_method(cfg.knn_method, n, cfg.exact_knn_max_cells),
            "knn_scope": scope,
            "knn_scope_reason": why,
            "stage_seconds": timings,
            "config": cfg.model_dump(),
            "seed": seed,
            "versions": versions(),
            "runtime_s": round(time.perf_counter() - t0, 2),
        }
        (tmp / "prepare.json").write_text(json.dumps(meta, indent=1))
    log.info("prepare: %d cells, %d genes, %.1fs", len(cells), len(gene_columns),
             time.perf_counter() - t0)
    return Prepared.load(out)
