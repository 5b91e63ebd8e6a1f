"""Embed a store with a frozen atlas: chunked, resumable, optionally on Ray actors (method.md §8).

Two phases, both restartable:

1. **Chunks.** The store's rows are cut into ``chunk_size`` ranges; each range is read, aligned
   to the atlas genes, encoded, assigned to its nearest prototype and (when the atlas has
   prototype labels) given a transferred label with an uncertainty. Its results go to
   ``WORK/chunks/chunk_NNNNNN.npz`` under a temporary name, renamed when complete: a finished
   chunk is a file, and an interrupted run skips those on restart. Memory is one chunk.
   With ``workers > 1`` the pending chunks are dealt round-robin to Ray actors (one atlas and
   one store handle each), which write into the same work directory (shared storage on a
   multi-node cluster). Every chunk's result depends on its rows only, so a resumed or
   distributed run equals an uninterrupted single-process one.
2. **Commit.** The chunk files are written to the target: a new ``.h5ad`` or AnnData ``.zarr``
   (temporary name, then rename), or back into the input store — zarr: ``obsm/X_scproto``
   streamed chunk by chunk and obs columns, each built in a staging directory beside the store
   and moved into place with an atomic rename, ``obs`` column order updated last (an atomic
   metadata write); SOMA: ``ms/RNA/obsm/X_scproto`` written to a new array registered only once
   complete, obs columns added by schema evolution (TileDB commits each write atomically).
   A crash at any point leaves the store readable with its original contents; re-running
   finishes the job.

``WORK/manifest.json`` records what the chunks were computed from (atlas checksum, store, rows,
chunk size, batch key, options); resuming with anything different is refused, naming the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from scproto_scale.atlas.atlas import PrototypeAtlas
from scproto_scale.atlas.genes import gene_selector
from scproto_scale.atlas.transfer import LabelTransfer, load_prototype_labels
from scproto_scale.config import EmbedConfig
from scproto_scale.data.store import CellStore, detect_format, open_store
from scproto_scale.data.writers import atomic_directory, write_h5ad_atomic
from scproto_scale.errors import ScprotoInputError

log = logging.getLogger(__name__)
FAULT_ENV = "SCPROTO_EMBED_FAULT"  # "chunk:N" or "commit:N": os._exit(17) after that step
OBS_FIELDS = ("scproto_prototype", "scproto_confidence", "scproto_label",
              "scproto_label_uncertainty")


@dataclass(frozen=True)
class EmbedJob:
    """What an embedding worker needs, by value.

    Attributes:
        atlas_path: the prototype atlas directory.
        store_path: zarr store or SOMA experiment to embed.
        work_dir: chunk results and progress (``STORE.embed/`` by default in the CLI).
        cfg: :class:`~scproto_scale.config.EmbedConfig`.
        store_options: keyword arguments of the store (SOMA ``obs_value_filter``, ``layer``…).
    """

    atlas_path: str
    store_path: str
    work_dir: str
    cfg: EmbedConfig
    store_options: dict = field(default_factory=dict)


def _fault(step: str, i: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec == f"{step}:{i}":
        log.warning("fault injection: exiting after %s %d", step, i)
        os._exit(17)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ChunkEmbedder:
    """One process's view of the job: the atlas, the store, gene map, study codes, labels.

    Raises:
        ScprotoInputError: unknown batch key, too few atlas genes (see
            :func:`~scproto_scale.atlas.genes.align_to_model`), unreadable atlas.
    """

    def __init__(self, job: EmbedJob, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.job, cfg = job, job.cfg
        self.atlas = PrototypeAtlas.load(job.atlas_path)
        self.store: CellStore = open_store(job.store_path, **job.store_options)
        self.alignment = self.atlas.align(self.store.var, cfg.min_overlap, str(self.store.path))
        self.select = gene_selector(self.alignment.columns, self.store.n_vars)
        study = self.store.obs_column(cfg.batch_key).astype(str).to_numpy()
        self.codes = self.atlas._condition_codes(study)
        labels = load_prototype_labels(job.atlas_path, cfg.label_column)
        self.transfer = (LabelTransfer(self.atlas.prototypes, labels, cfg.label_temperature)
                         if labels is not None and (labels != "").any() else None)
        self.n_chunks = -(-self.store.n_obs // cfg.chunk_size)

    @property
    def chunk_dir(self) -> Path:
        return Path(self.job.work_dir) / "chunks"

    def chunk_path(self, i: int) -> Path:
        return self.chunk_dir / f"chunk_{i:06d}.npz"

    def pending(self) -> list[int]:
        """Chunks without a completed result file."""
        return [i for i in range(self.n_chunks) if not self.chunk_path(i).exists()]

    def run_chunk(self, i: int) -> int:
        """Embed chunk ``i`` and write its result file atomically; returns its cell count."""
        size = self.job.cfg.chunk_size
        start, stop = i * size, min((i + 1) * size, self.store.n_obs)
        X = self.store.read_slice(start, stop)
        lib = np.asarray(X.sum(axis=1)).ravel()
        emb, _ = self.atlas.embed_counts((X @ self.select).tocsr(), lib, self.codes[start:stop])
        proto, conf = self.atlas.assign(emb)
        out = {"X_scproto": emb.astype(np.float32), "prototype": proto, "confidence": conf}
        if self.transfer is not None:
            out["label"], out["label_uncertainty"], _ = self.transfer.predict(emb)
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.chunk_dir / f".chunk_{i:06d}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **out)
        os.replace(tmp, self.chunk_path(i))
        return stop - start

    def run_chunks(self, chunks: list[int]) -> int:
        """Embed the given chunks in order (fault-injection aware); returns cells embedded."""
        n = 0
        for i in chunks:
            n += self.run_chunk(i)
            _fault("chunk", i)
        return n

    def signature(self) -> dict:
        """What the chunk files depend on (compared on resume)."""
        a = Path(self.job.atlas_path)
        return {"atlas_model_sha256": _sha256(a / "model.pt"),
                "atlas_json_sha256": _sha256(a / "atlas.json"),
                "store": str(Path(self.job.store_path).resolve()),
                "store_options": self.job.store_options, "n_obs": self.store.n_obs,
                "n_vars": self.store.n_vars, "chunk_size": self.job.cfg.chunk_size,
                "batch_key": self.job.cfg.batch_key, "min_overlap": self.job.cfg.min_overlap,
                "label_column": self.job.cfg.label_column,
                "label_temperature": self.job.cfg.label_temperature}


def _check_manifest(work: Path, sig: dict) -> None:
    path = work / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())["signature"]
        diff = [k for k in sig if old.get(k) != sig[k]]
        if diff:
            raise ScprotoInputError(
                f"{work}: partial results were computed with another {diff[0]} "
                f"({old.get(diff[0])!r} vs now {sig[diff[0]]!r}); rerun with --fresh or "
                "another work directory")


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def run_chunks_ray(job: EmbedJob, pending: list[int], workers: int) -> None:
    """Deal the pending chunks round-robin to ``workers`` Ray actors (1 CPU, 1 thread each)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    try:
        if job.cfg.ray_address:
            ray.init(address=job.cfg.ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=False)
        started = True
        if ray.cluster_resources().get("CPU", 0) < workers:
            raise ScprotoInputError(f"embed.workers={workers} but the Ray cluster has "
                                    f"{ray.cluster_resources().get('CPU', 0)} CPUs")
        Worker = ray.remote(num_cpus=1)(_RayEmbedWorker)
        actors = [Worker.remote(job) for _ in range(workers)]
        futures = [a.run.remote(pending[r::workers]) for r, a in enumerate(actors)]
        ray.get(futures)
    finally:
        if started:
            ray.shutdown()


class _RayEmbedWorker:
    """A Ray actor: one :class:`ChunkEmbedder` (atlas and store opened once)."""

    def __init__(self, job: EmbedJob):
        self.embedder = ChunkEmbedder(job, threads=1)

    def run(self, chunks: list[int]) -> int:
        return self.embedder.run_chunks(chunks)


def embed_chunks(job: EmbedJob, fresh: bool = False) -> ChunkEmbedder:
    """Phase 1: compute every chunk not yet done (in-process or on Ray actors).

    Writes ``WORK/manifest.json``, ``WORK/genes.json`` (overlap report) and the chunk files.

    Returns:
        The driver's :class:`ChunkEmbedder` (for the commit phase).

    Raises:
        ScprotoInputError: bad input (see :class:`ChunkEmbedder`), a work directory from
            another job, or too few Ray CPUs.
    """
    work = Path(job.work_dir)
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    emb = ChunkEmbedder(job)
    sig = emb.signature()
    _check_manifest(work, sig)
    emb.alignment.write_report(work / "genes.json")
    pending = emb.pending()
    t = time.perf_counter()
    _write_json(work / "manifest.json", {
        "signature": sig, "n_chunks": emb.n_chunks, "pending_at_start": len(pending),
        "labels": list(map(str, emb.transfer.classes)) if emb.transfer is not None else None})
    if job.cfg.workers > 1 and len(pending) > 1:
        run_chunks_ray(job, pending, min(job.cfg.workers, len(pending)))
    else:
        emb.run_chunks(pending)
    log.info("embedded %d chunks in %.1fs", len(pending), time.perf_counter() - t)
    missing = emb.pending()
    if missing:
        raise ScprotoInputError(f"{work}: chunks {missing[:5]} have no result after the run")
    return emb


# ---------------------------------------------------------------------------- commit
def _load_chunk(emb: ChunkEmbedder, i: int) -> dict[str, np.ndarray]:
    with np.load(emb.chunk_path(i)) as z:
        return {k: z[k] for k in z.files}


def result_columns(emb: ChunkEmbedder) -> tuple[pd.DataFrame, int]:
    """The obs result columns of all cells (``n_obs`` rows; small: no embedding) and ``d``."""
    parts = [_load_chunk(emb, i) for i in range(emb.n_chunks)]
    K = len(emb.atlas.prototypes)
    cols = {"scproto_prototype": pd.Categorical(np.concatenate([p["prototype"] for p in parts]),
                                                categories=range(K)),
            "scproto_confidence": np.concatenate([p["confidence"] for p in parts])}
    if emb.transfer is not None:
        cols["scproto_label"] = pd.Categorical.from_codes(
            np.concatenate([p["label"] for p in parts]), categories=list(emb.transfer.classes))
        cols["scproto_label_uncertainty"] = np.concatenate([p["label_uncertainty"] for p in parts])
    return pd.DataFrame(cols), parts[0]["X_scproto"].shape[1]


def _embedding(emb: ChunkEmbedder) -> np.ndarray:
    return np.concatenate([_load_chunk(emb, i)["X_scproto"] for i in range(emb.n_chunks)])


def to_anndata(emb: ChunkEmbedder) -> ad.AnnData:
    """Results as an AnnData without X: obs (study, store row, results), obsm ``X_scproto``."""
    cols, _ = result_columns(emb)
    store = emb.store
    cols.insert(0, emb.job.cfg.batch_key,
                store.obs_column(emb.job.cfg.batch_key).astype(str).to_numpy())
    cols.insert(1, "store_row", np.arange(store.n_obs))
    if hasattr(store, "obs_joinids"):
        cols.insert(2, "soma_joinid", store.obs_joinids)
    cols.index = pd.Index([str(i) for i in range(store.n_obs)])
    out = ad.AnnData(obs=cols, obsm={"X_scproto": _embedding(emb)})
    out.uns["scproto_embed"] = {"atlas": str(emb.job.atlas_path), "store": str(store.path),
                                "gene_overlap": emb.alignment.overlap,
                                "gene_match": emb.alignment.method}
    return out


def write_new(emb: ChunkEmbedder, out: Path) -> Path:
    """Write the results to a new ``.h5ad`` file or AnnData ``.zarr`` store (atomic)."""
    adata = to_anndata(emb)
    if out.suffix == ".h5ad":
        return write_h5ad_atomic(adata, out)
    if out.suffix != ".zarr":
        raise ScprotoInputError(f"--out {out}: expected a .h5ad file or a .zarr store")
    with atomic_directory(out) as tmp:
        adata.write_zarr(tmp)
    return out


def write_into_zarr(emb: ChunkEmbedder) -> Path:
    """Write obsm ``X_scproto`` and the obs result columns into the AnnData zarr store itself.

    Each element is built completely under ``.STORE.scproto_staging/`` (beside the store) and
    renamed into place;
    the obs ``column-order`` attribute is updated last. Crash-safe: see the module docstring.
    """
    import zarr

    path = Path(emb.store.path)
    root = zarr.open_group(str(path), mode="r+")
    fmt = root.metadata.zarr_format
    # beside the store (same file system: renames stay atomic), never inside its hierarchy,
    # where zarr and anndata would list it as an element
    staging = path.with_name(f".{path.name}.scproto_staging")
    shutil.rmtree(staging, ignore_errors=True)
    sg = zarr.open_group(str(staging), mode="w", zarr_format=fmt)
    cols, d = result_columns(emb)
    size = emb.job.cfg.chunk_size
    arr = sg.create_array("X_scproto", shape=(emb.store.n_obs, d), chunks=(size, d),
                          dtype="float32")
    for i in range(emb.n_chunks):  # streamed: one chunk in memory
        arr[i * size : i * size + size] = _load_chunk(emb, i)["X_scproto"]
    arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    for name in cols.columns:
        ad.io.write_elem(sg, name, cols[name].to_numpy() if cols[name].dtype != "category"
                         else cols[name].array)
    if "obsm" not in root:
        ad.io.write_elem(root, "obsm", {})
    trash = path.with_name(f".{path.name}.scproto_trash")
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir()
    moves = [("X_scproto", path / "obsm" / "X_scproto")] + [
        (name, path / "obs" / name) for name in cols.columns]
    for step, (name, dst) in enumerate(moves):
        if dst.exists():
            os.replace(dst, trash / f"{dst.parent.name}_{name}")
        os.replace(staging / name, dst)
        _fault("commit", step)
    obs = zarr.open_group(str(path / "obs"), mode="r+")
    order = list(obs.attrs.get("column-order", []))
    obs.attrs["column-order"] = order + [c for c in cols.columns if c not in order]
    if root.metadata.consolidated_metadata is not None:
        zarr.consolidate_metadata(str(path))
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(trash, ignore_errors=True)
    return path


def write_into_soma(emb: ChunkEmbedder, measurement: str = "RNA") -> Path:
    """Write ``ms/<measurement>/obsm/X_scproto`` and the obs result columns into the SOMA
    experiment. The obsm array is created under a fresh name, filled, and only then registered;
    obs columns are added with ``tiledbsoma.io.update_obs`` (schema evolution). Cells outside
    the store's ``obs_value_filter`` get missing values (NaN, −1 prototype, no label).
    """
    import pyarrow as pa
    import tiledbsoma
    import tiledbsoma.io

    path = Path(emb.store.path)
    joinids = emb.store.obs_joinids
    cols, d = result_columns(emb)
    size = emb.job.cfg.chunk_size
    with tiledbsoma.Experiment.open(str(path)) as r:
        full = r.obs.read().concat().to_pandas().sort_values("soma_joinid")
    max_joinid = int(full["soma_joinid"].max())
    with tiledbsoma.Experiment.open(str(path), "w") as exp:
        ms = exp.ms[measurement]
        if "obsm" not in ms:
            ms.add_new_collection("obsm")
        uri = f"{ms['obsm'].uri}/X_scproto-{uuid.uuid4().hex[:8]}"
        arr = tiledbsoma.SparseNDArray.create(uri, type=pa.float32(), shape=(max_joinid + 1, d))
        with arr:
            for i in range(emb.n_chunks):
                X = _load_chunk(emb, i)["X_scproto"]
                rows = np.repeat(joinids[i * size : i * size + len(X)], d)
                arr.write(pa.Table.from_pydict({
                    "soma_dim_0": rows.astype(np.int64),
                    "soma_dim_1": np.tile(np.arange(d, dtype=np.int64), len(X)),
                    "soma_data": X.ravel().astype(np.float32)}))
        _fault("commit", 0)
        obsm = ms["obsm"]
        if "X_scproto" in obsm:
            del obsm["X_scproto"]
        obsm.set("X_scproto", tiledbsoma.SparseNDArray.open(uri), use_relative_uri=True)
        _fault("commit", 1)
        pos = np.searchsorted(full["soma_joinid"].to_numpy(), joinids)
        for name in cols.columns:
            col = cols[name]
            if isinstance(col.dtype, pd.CategoricalDtype):
                cats = [str(c) for c in col.cat.categories]
                codes = np.full(len(full), -1, dtype=np.int64)
                codes[pos] = col.cat.codes.to_numpy()
                full[name] = pd.Categorical.from_codes(codes, categories=cats)
            else:
                values = np.full(len(full), np.nan, dtype=np.float32)
                values[pos] = col.to_numpy()
                full[name] = values
        tiledbsoma.io.update_obs(exp, full.drop(columns=["soma_joinid"]),
                                 default_index_name="soma_joinid")
    return path


def commit(emb: ChunkEmbedder, out: Path | None) -> Path:
    """Phase 2: write the results to ``out`` (new .h5ad / .zarr) or, when None, into the store."""
    if out is not None:
        return write_new(emb, Path(out))
    fmt = detect_format(emb.store.path)
    if fmt == "zarr":
        return write_into_zarr(emb)
    return write_into_soma(emb, emb.job.store_options.get("measurement", "RNA"))


def run_embed(job: EmbedJob, out: Path | None = None, fresh: bool = False) -> dict:
    """Embed every cell of the store and write the results (see the module docstring).

    Args:
        job: the job (atlas, store, work directory, options).
        out: a new ``.h5ad`` / ``.zarr`` target, or None to write into the store.
        fresh: discard partial results in the work directory first.

    Returns:
        Summary: target, cells, chunks computed in this run, gene overlap, seconds.

    Raises:
        ScprotoInputError: bad input (batch key, genes, atlas version, target).
    """
    t0 = time.perf_counter()
    emb = embed_chunks(job, fresh=fresh)
    t_chunks = time.perf_counter() - t0
    target = commit(emb, out)
    manifest = json.loads((Path(job.work_dir) / "manifest.json").read_text())
    summary = {"target": str(target), "n_cells": emb.store.n_obs, "n_chunks": emb.n_chunks,
               "chunks_computed": manifest["pending_at_start"], "workers": job.cfg.workers,
               "gene_overlap": emb.alignment.overlap, "gene_match": emb.alignment.method,
               "labels": emb.transfer is not None, "chunks_s": round(t_chunks, 3),
               "total_s": round(time.perf_counter() - t0, 3)}
    _write_json(Path(job.work_dir) / "summary.json", summary)
    return summary
