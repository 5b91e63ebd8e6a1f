"""The main job: ingest → prepare → train → export the prototype atlas → evaluate.

Every stage writes its artefact under ``OUT`` atomically and is skipped when the artefact is
already complete, so an interrupted run resumes (training from its last epoch checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch.distributed as tdist
from rich.console import Console

from scproto_scale.atlas.atlas import Embedding, PrototypeAtlas
from scproto_scale.atlas.genes import model_stable_ids
from scproto_scale.config import RunConfig
from scproto_scale.data.ingest import ingest
from scproto_scale.data.store import CellStore, detect_format, open_store
from scproto_scale.data.writers import write_h5ad_atomic
from scproto_scale.errors import ScprotoInputError
from scproto_scale.evaluate.metacells import metacell_quality
from scproto_scale.evaluate.report import plot_umap, write_json, write_markdown
from scproto_scale.model import dist
from scproto_scale.prepare.artefacts import Prepared
from scproto_scale.prepare.run import prepare
from scproto_scale.provenance import versions
from scproto_scale.train.launch import launch, resolve_launcher, torchrun_group
from scproto_scale.train.loop import cell_prototype_usage, collapse_message
from scproto_scale.train.worker import TrainJob

log = logging.getLogger(__name__)


def resolve_input(path: str) -> Path:
    """Expand ``$VARS`` and ``~`` in ``data.path``; an unset variable is an error naming it."""
    expanded = os.path.expanduser(os.path.expandvars(path))
    if "$" in expanded:
        raise ScprotoInputError(f"data.path {path!r}: environment variable not set ({expanded})")
    return Path(expanded)


def open_input(cfg: RunConfig, out: Path, store_options: dict | None = None) -> CellStore:
    """The input as a store: h5ad files are ingested once into ``OUT/store.{zarr,soma}``;
    ``store_options`` go to the store (SOMA value filter, genes, TileDB config)."""
    if "://" in cfg.data.path:  # a remote SOMA experiment (the Census)
        src = cfg.data.path
        store = open_store(src, **(store_options or {}))
        return _check_keys(cfg, store, src)
    src = resolve_input(cfg.data.path)
    fmt = detect_format(src)
    if fmt == "h5ad":
        target = out / f"store.{cfg.data.store_format}"
        if not target.exists():
            ingest(src, target, fmt=cfg.data.store_format)
        src = target
    return _check_keys(cfg, open_store(src, **(store_options or {})), src)


def _check_keys(cfg: RunConfig, store: CellStore, src) -> CellStore:
    cols = store.obs_columns()
    for what, key in (("data.batch_key", cfg.data.batch_key), ("data.label_key", cfg.data.label_key)):
        if key is not None and key not in cols:
            raise ScprotoInputError(f"{what}={key!r} is not an obs column of {src}; "
                                    f"available: {cols}")
    return store


def export_atlas(store: CellStore, prepared: Prepared, model, cfg: RunConfig, out: Path
                 ) -> tuple[PrototypeAtlas, ad.AnnData, ad.AnnData, Embedding]:
    """Embed every cell, build the metacells and write ``OUT/atlas`` and ``OUT/embeddings.h5ad``.

    Returns:
        The atlas, the metacells ``(K, G)``, the training cells' embeddings (obs + obsm) and
        their :class:`Embedding` (with one posterior sample's nearest prototype per cell).
    """
    cells = np.asarray(prepared.cells)
    meta = {"median_library_size": prepared.meta["median_library_size"], "latent_norm": 1.0,
            "seed": cfg.seed, "batch_key": cfg.data.batch_key, "run_config": cfg.model_dump(),
            "gene_stable_ids": model_stable_ids(store.var, prepared.genes)}
    atlas = PrototypeAtlas(model, prepared.genes, prepared.studies, meta)
    # one posterior sample per cell as well, for the report's prototype usage (same pass)
    emb = atlas.embed_store(store, cfg.data.batch_key, chunk_size=cfg.prepare.chunk_size,
                            sample_seed=cfg.seed)
    atlas.meta["latent_norm"] = float(np.mean(emb.mu_norm[cells]))
    study = np.asarray(prepared.studies)[np.asarray(prepared.study_codes)[cells]]
    labels = (store.obs_column(cfg.data.label_key).astype(str).to_numpy()[cells]
              if cfg.data.label_key else None)
    kept = Embedding(emb.X_scproto[cells], emb.mu_norm[cells], emb.prototype[cells],
                     emb.confidence[cells], emb.sample_prototype[cells], emb.sample_cosine[cells])
    metacells = atlas.build_metacells(kept, study, labels)
    atlas.save(out / "atlas", metacells)

    obs = pd.DataFrame({cfg.data.batch_key: study}, index=[str(c) for c in cells])
    if labels is not None:
        obs[cfg.data.label_key] = labels
    obs["scproto_prototype"] = pd.Categorical(kept.prototype,
                                              categories=range(len(atlas.prototypes)))
    obs["scproto_confidence"] = kept.confidence
    cells_ad = ad.AnnData(obs=obs, obsm={"X_scproto": kept.X_scproto,
                                         "X_pca_unintegrated": np.asarray(prepared.pca)})
    cells_ad.obs["store_row"] = cells
    write_h5ad_atomic(cells_ad, out / "embeddings.h5ad")
    return atlas, metacells, cells_ad, kept


def evaluate(store: CellStore, prepared: Prepared, atlas: PrototypeAtlas, cells_ad: ad.AnnData,
             metacells: ad.AnnData, cfg: RunConfig, out: Path) -> dict:
    """scIB + scGraph for scProto and the unintegrated PCA; metacell quality; UMAP figure."""
    from scproto_scale.evaluate.scgraph import scgraph
    from scproto_scale.evaluate.scib import scib_scores

    bkey, lkey = cfg.data.batch_key, cfg.data.label_key
    labels = cells_ad.obs[lkey].to_numpy() if lkey else None
    report: dict = {"metacells": metacell_quality(metacells, labels)}
    n = cells_ad.n_obs
    rng = np.random.default_rng(cfg.seed)
    sel = np.sort(rng.choice(n, cfg.evaluate.max_cells, replace=False)) if n > cfg.evaluate.max_cells \
        else np.arange(n)
    sub = cells_ad[sel].copy()
    sub.obs[bkey] = sub.obs[bkey].astype("category")
    keys = {"scproto": "X_scproto", "pca": "X_pca_unintegrated"}
    methods: dict[str, dict] = {m: {} for m in keys}
    if lkey and cfg.evaluate.scib:
        sub.obs[lkey] = sub.obs[lkey].astype("category")
        scores = scib_scores(sub, bkey, lkey, list(keys.values()), "X_pca_unintegrated")
        for m, k in keys.items():
            methods[m].update(scores[k])
    if lkey and cfg.evaluate.scgraph:
        counts = ad.AnnData(X=store.read_rows(np.asarray(sub.obs["store_row"])), obs=sub.obs,
                            obsm=dict(sub.obsm))
        g = scgraph(counts, list(keys.values()), bkey, lkey)
        for m, k in keys.items():
            methods[m].update({f"scgraph_{name}": v for name, v in g[k].items()})
    elif not lkey:
        warnings.warn("data.label_key not set: scIB, scGraph and purity need labels; skipped",
                      stacklevel=2)
    report["methods"] = methods
    if cfg.evaluate.umap:
        import umap

        reducer = umap.UMAP(n_neighbors=15, random_state=cfg.seed, n_jobs=1)
        xy = reducer.fit_transform(sub.obsm["X_scproto"])
        used = metacells.obs["n_cells"].to_numpy() > 0
        pxy = reducer.transform(atlas.prototypes[used])
        plot_umap(xy, pxy, sub.obs[lkey].to_numpy() if lkey else None,
                  sub.obs[bkey].to_numpy(), out / "umap.png", cfg.seed)
    return report


def run(cfg: RunConfig, out: str | Path, resume: bool = True, console: Console | None = None,
        store_options: dict | None = None) -> dict | None:
    """Run the whole job into ``out`` and return the report (also ``report.json`` / ``.md``).

    Training runs in-process, on Ray Train workers, or (started by ``torchrun``) on every rank;
    under torchrun rank 0 alone ingests, prepares, exports and evaluates, and the other ranks
    return None after training.

    Args:
        cfg: validated :class:`RunConfig`.
        out: output directory (created).
        resume: reuse finished stages and continue training from the last checkpoint.
        store_options: keyword arguments of the store (a SOMA ``obs_value_filter``, ``genes``,
            ``var_id_column``, ``tiledb_config``: how ``pipelines/census.py`` selects cells and
            genes of the Census); every training worker reopens the store with them.

    Raises:
        ScprotoInputError: any bad input (missing file, unknown obs column, bad counts…).
    """
    launcher = resolve_launcher(cfg.distributed)
    group = torchrun_group(cfg.distributed) if launcher == "torchrun" else contextlib.nullcontext()
    with group as stage_group:
        return _run(cfg, Path(out), resume, console or Console(stderr=True), launcher,
                    stage_group, store_options or {})


def _run(cfg: RunConfig, out: Path, resume: bool, console: Console, launcher: str,
         stage_group, store_options: dict) -> dict | None:
    main = dist.rank() == 0
    t0 = time.perf_counter()
    stages: dict[str, float] = {}

    def stage(name: str, t: float) -> None:
        stages[name] = round(time.perf_counter() - t, 2)
        console.log(f"[bold green]{name}[/] done in {stages[name]:.1f}s")

    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(json.dumps(cfg.model_dump(), indent=1))
        t = time.perf_counter()
        store = open_input(cfg, out, store_options)
        stage("ingest", t)
        t = time.perf_counter()
        prepared = prepare(store, out / "prepared", cfg.data.batch_key, cfg.prepare,
                           require_integer=cfg.model.likelihood != "mse", seed=cfg.seed,
                           overwrite=not resume)
        stage("prepare", t)
    if stage_group is not None:  # torchrun: the other ranks wait for rank 0's artefacts
        tdist.barrier(group=stage_group)
    if not main:
        store, prepared = open_input(cfg, out, store_options), Prepared.load(out / "prepared")
    t = time.perf_counter()
    job = TrainJob(getattr(store, "uri", str(store.path)), str(prepared.path), cfg.model,
                   cfg.train, str(out / "checkpoints"), seed=cfg.seed, resume=resume,
                   store_options=store_options)
    result = launch(job, cfg.distributed, out / "ray", console=console)
    stage("train", t)
    if not main:
        return None
    t = time.perf_counter()
    atlas, metacells, cells_ad, kept = export_atlas(store, prepared, result.model, cfg, out)
    stage("export", t)
    usage = cell_prototype_usage(kept.prototype, kept.X_scproto, len(atlas.prototypes))
    # training lays the bank out over posterior samples, not means (README, "Known limitation:
    # prototype usage"): how much of it one sample per cell reaches
    usage["used_by_posterior_samples"] = len(np.unique(kept.sample_prototype))
    collapsed = collapse_message(usage, len(atlas.prototypes))
    if collapsed:
        warnings.warn(collapsed, stacklevel=2)
        console.log(f"[bold red]{collapsed}")
    report: dict = {"prototype_usage": usage, "warnings": [collapsed] if collapsed else [],
                    "dataset": str(resolve_input(cfg.data.path)), "n_cells": len(prepared.cells),
                    "n_studies": len(prepared.studies), "n_genes": len(prepared.genes),
                    "dropped_zero_count_cells": prepared.meta["dropped_zero_count_cells"],
                    "seed": cfg.seed, "train_history": result.history,
                    "training": {"launcher": launcher, "world_size": result.world_size}}
    if cfg.evaluate.enabled:
        t = time.perf_counter()
        report.update(evaluate(store, prepared, atlas, cells_ad, metacells, cfg, out))
        stage("evaluate", t)
    report.update({"stages_s": stages, "runtime_s": round(time.perf_counter() - t0, 2),
                   "config": cfg.model_dump(), "versions": versions()})
    write_json(report, out / "report.json")
    write_markdown(report, out / "report.md")
    return report
