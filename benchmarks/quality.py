"""scProto against the field on real data: the paper's evaluations in one harness.

    SCPROTO_DATA_DIR=... python benchmarks/quality.py [--datasets kang8,cellbench] [--seeds 3]
        [--quick] [--set model.latent_dim=32 ...] [--no-seacells]
    python benchmarks/quality.py --tables      # regenerate quality.md + F1 plots from the JSON

For every dataset and seed: scProto is trained by the pipeline API (``pipelines.atlas_job.run``)
with the config defaults (only ``data`` and ``seed`` set, plus ``--set`` overrides), then the
baselines run on the same cells (unintegrated PCA of the prepare stage, Harmony on it, scVI and
scPoli on the prepared HVG counts, k-means and SEACells metacells on the PCA with as many
metacells as scProto uses prototypes), and everything is scored by
:func:`scproto_scale.evaluate.harness.score_embeddings` (scIB with BRAS, scGraph, kNN / linear
F1), :func:`~scproto_scale.evaluate.metacells.partition_quality` and the Fig. 2 marker
classification. Writes ``benchmarks/results/quality.json``::

    {dataset: {method: {metric: {"mean": x, "sd": y, "n": seeds, "values": [per seed]}},
     "_run": {seeds, epochs, warnings, …}}}

(sd over seeds, ddof 1; 0 with one seed), ``quality.md`` (one table per dataset),
``quality_umap_<dataset>.png`` (seed 0: scProto cells and prototypes by type and by study, the
paper's Fig. 3) and ``quality_f1_<dataset>.png`` (marker classification, the paper's Fig. 2).
``--quick``: Kang scGen ctrl/stim (1,975 cells), one seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _companion_common import RESULTS, data_dir, machine, merge_json

from pipelines.atlas_job import run
from pipelines.pbmc_multi import assemble_multi_pbmc
from scproto_scale.config import load_config
from scproto_scale.evaluate import baselines
from scproto_scale.evaluate.harness import input_warnings, score_embeddings
from scproto_scale.evaluate.metacells import partition_quality
from scproto_scale.evaluate.probes import MARKER_PAIRS, log_normalise, marker_classification
from scproto_scale.evaluate.quality_report import (
    plot_f1_bars,
    write_quality_markdown,
)
from scproto_scale.evaluate.report import plot_umap


@dataclass
class Dataset:
    """A benchmark dataset: source, obs keys, and its names of the Fig. 2 cell types."""

    source: str  # folder under $SCPROTO_DATA_DIR, or "pbmc_multi" (assembled)
    batch_key: str = "batch"
    study_key: str = "batch"
    label_key: str = "cell_type"
    types: dict[str, str] = field(default_factory=dict)
    description: str = ""


DATASETS: dict[str, Dataset] = {
    "kang8": Dataset("kang2018_pbmc_ctrl_8donors",
                     types={"NK": "NK cells", "CD8 T": "CD8 T cells", "CD4 T": "CD4 T cells"},
                     description="Kang 2018 PBMC, 8 donors (12,261 cells, 1,287 genes)"),
    "cellbench": Dataset("cellbench_3cl_3protocols_894genes",
                         description="CellBench, 3 cell lines × 3 protocols (1,345 cells)"),
    "kang_scgen": Dataset("kang2018_scgen_valid",
                          types={"NK": "NK", "CD8 T": "CD8T", "CD4 T": "CD4T"},
                          description="Kang 2018 scGen ctrl / IFN-β stim (1,975 cells)"),
    "pbmc_multi": Dataset("pbmc_multi", study_key="study",
                          types={"NK": "NK", "CD8 T": "CD8 T", "CD4 T": "CD4 T"},
                          description="Kang 8 donors + PBMC 4k + Ding 2020 (15,653 cells, "
                                      "97 shared genes, 11 batches, 3 studies)"),
}
QUICK = "kang_scgen"
EMBEDDING_METHODS = ("scproto", "pca", "harmony", "scvi", "scpoli")
RUNS = Path(__file__).resolve().parents[1] / "runs" / "quality"


def fingerprint(*parts) -> str:
    """A short hash of arrays (their bytes) and JSON-able values: the key of a cache file."""
    h = hashlib.sha1()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray)
                 else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:10]


def cached_runs(name: str) -> list[Path]:
    """The ``runs/quality/<name>/seed<s>`` directories a finished quality run left, by seed.

    Raises:
        SystemExit: an unknown dataset, or no cached run (the message names the command).
    """
    if name.split("~")[0] not in DATASETS:
        raise SystemExit(f"unknown dataset {name!r}; choose from {list(DATASETS)}")
    runs = sorted(p.parent for p in (RUNS / name).glob("seed*/embeddings.h5ad"))
    if not runs:
        raise SystemExit(f"no cached runs under {RUNS / name}: run benchmarks/quality.py "
                         f"--datasets {name} first")
    return runs


def source_path(ds: Dataset) -> Path:
    if ds.source == "pbmc_multi":
        target = RUNS / "pbmc_multi.h5ad"
        if not target.exists():
            assemble_multi_pbmc(data_dir(), target)
        return target
    return data_dir() / ds.source / f"{ds.source}.h5ad"


def run_seed(name: str, ds: Dataset, seed: int, overrides: list[str], use_seacells: bool,
             notes: list[str], figure: bool, resume: bool = False, vae_epochs: int | None = None,
             tag: str = "", baselines_on: bool = True) -> tuple[dict[str, dict[str, float]], dict]:
    """All methods on one dataset and seed → ``({method: {metric: value}}, run info)``.

    ``tag`` names a variant (its runs go to ``runs/quality/<name><tag>``); without
    ``baselines_on`` only scProto, the unintegrated PCA and k-means metacells are scored (a
    settings sweep).
    """
    path = source_path(ds)
    out = RUNS / f"{name}{tag}" / f"seed{seed}"
    base = {"seed": seed, "data": {"path": str(path), "batch_key": ds.batch_key,
                                   "label_key": ds.label_key},
            "evaluate": {"enabled": False}, "train": {"progress": False}}
    cfg = load_config(None, overrides, base=base)
    # A resumed run reuses finished stages: its times are those of the run that did them,
    # kept in scproto_stages.json (report.json is rewritten by every run).
    measured = out / f"scproto_stages_{fingerprint(cfg.model_dump())}.json"
    earlier_st = json.loads(measured.read_text()) if resume and measured.exists() else None
    report = run(cfg, out, resume=resume)
    st = earlier_st or report["stages_s"]
    if earlier_st is None:
        if resume and report["stages_s"]["train"] < 1:
            notes.append(f"{name} seed {seed}: scProto reused from an interrupted run; its "
                         "train time is not measured")
        else:
            measured.write_text(json.dumps(st))

    emb = ad.read_h5ad(out / "embeddings.h5ad")
    rows = emb.obs["store_row"].to_numpy()
    src = ad.read_h5ad(path)
    if not np.array_equal(src.obs[ds.label_key].astype(str).to_numpy()[rows],
                          emb.obs[ds.label_key].astype(str).to_numpy()):
        raise RuntimeError(f"{name}: store rows do not match {path} (labels differ)")
    genes = list(ad.read_h5ad(out / "atlas" / "metacells.h5ad", backed="r").var_names)
    counts_all = sp.csr_matrix(src.X[rows])
    hvg = sp.csr_matrix(src[rows, genes].X)
    batches = emb.obs[ds.batch_key].astype(str).to_numpy()
    labels = emb.obs[ds.label_key].astype(str).to_numpy()
    studies = src.obs[ds.study_key].astype(str).to_numpy()[rows]
    pca = np.asarray(emb.obsm["X_pca_unintegrated"], dtype=np.float32)
    epochs = vae_epochs or baselines.default_epochs(cfg.train.epochs, cfg.train.n_views)
    info = {"n_cells": len(rows), "n_genes_model": len(genes), "vae_epochs": epochs,
            "scproto_epochs": cfg.train.epochs, "stages_s": st}
    notes += input_warnings(labels, batches, studies)
    # caches are named by what made them: a changed scProto config or input never reuses them
    run_key, data_key = fingerprint(cfg.model_dump()), fingerprint(rows, genes, seed)

    wall = {"scproto": st["prepare"] + st["train"] + st["export"], "pca": st["prepare"]}
    obsm = {"scproto": emb.obsm["X_scproto"], "pca": pca}
    embedding_baselines = (
        ("harmony", lambda: baselines.harmony_embedding(pca, batches, seed)),
        ("scvi", lambda: baselines.scvi_embedding(hvg, batches, seed, epochs)),
        ("scpoli", lambda: baselines.scpoli_embedding(hvg, batches, seed, epochs)),
    )
    for method, fn in embedding_baselines if baselines_on else ():
        cached = out / f"baseline_{method}_e{epochs}_{data_key}.npz"
        if resume and cached.exists():  # an interrupted benchmark: reuse embedding and time
            z = np.load(cached)
            Z, t = z["Z"], float(z["seconds"])
        else:
            try:
                Z, t = fn()
            except baselines.BaselineUnavailable as e:
                notes.append(f"{method} skipped: {e}")
                continue
            np.savez(cached, Z=Z, seconds=t)
        obsm[method], wall[method] = Z, t + (st["prepare"] if method == "harmony" else 0.0)
        print(f"[{name} seed {seed}] {method}: {t:.0f} s", flush=True)
    # scib-metrics overwrites obsm["X_pca"]: the PCA is scored under another key.
    keys = {m: "X_pca_unintegrated" if m == "pca" else f"X_{m}" for m in obsm}
    cells = ad.AnnData(obs=emb.obs[[ds.batch_key, ds.label_key]].copy(),
                       obsm={keys[m]: np.ascontiguousarray(z, dtype=np.float32)
                             for m, z in obsm.items()})
    t = time.perf_counter()
    cached = out / f"scores_{'_'.join(obsm)}_e{epochs}_{run_key}.json"
    if resume and cached.exists():
        scores, score_notes, info["scoring_s"] = json.loads(cached.read_text())
    else:
        scores, score_notes = score_embeddings(
            cells, ad.AnnData(X=counts_all.astype(np.float32), obs=cells.obs.copy()),
            keys, ds.batch_key, ds.label_key, "X_pca_unintegrated", seed)
        info["scoring_s"] = round(time.perf_counter() - t, 1)
        cached.write_text(json.dumps([scores, score_notes, info["scoring_s"]]))
    notes += score_notes

    # Metacells: scProto's prototypes vs k-means / SEACells with as many metacells.
    proto = emb.obs["scproto_prototype"].astype(int).to_numpy()
    n_used = len(np.unique(proto))
    assignments = {"scproto": proto}
    km, wall["kmeans_metacells"] = baselines.kmeans_metacells(pca, n_used, seed)
    assignments["kmeans_metacells"] = km
    cached = out / f"seacells_{n_used}_{data_key}.npz"
    if use_seacells and baselines_on and resume and cached.exists():
        z = np.load(cached)
        assignments["seacells"], wall["seacells"] = z["labels"], float(z["seconds"])
    elif use_seacells and baselines_on:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assignments["seacells"], wall["seacells"] = baselines.seacells_metacells(
                    hvg, pca, n_used, seed)
            notes += [f"seacells: {w.message}" for w in caught if w.category is UserWarning]
            np.savez(cached, labels=assignments["seacells"], seconds=wall["seacells"])
        except baselines.BaselineUnavailable as e:
            notes.append(str(e))
        except Exception as e:  # an optional baseline's failure must not lose the other scores
            notes.append(f"seacells failed: {type(e).__name__}: {e}")
    for m, a in assignments.items():
        q = partition_quality(a, pca, hvg, labels, studies)
        if q["uncovered_types"]:
            notes.append(f"{m}: types with ≥ 10 cells that are the majority of no metacell: "
                         f"{q['uncovered_types']}")
        scores.setdefault(m, {}).update({f"metacell_{k}": v for k, v in q.items()
                                         if isinstance(v, int | float) and np.isfinite(v)})

    # Fig. 2: marker classification.
    markers = sorted({g for _, ms in MARKER_PAIRS.values() for g in ms} & set(src.var_names))
    all_genes = list(src.var_names)
    mc = ad.read_h5ad(out / "atlas" / "metacells.h5ad")
    mc_genes = [g for g in markers if g in mc.var_names]
    mc_feats = log_normalise(mc.X, mc_genes, list(mc.var_names))[proto]
    km_onehot = sp.csr_matrix((np.ones(len(km)), (km, np.arange(len(km)))))
    km_feats = log_normalise(km_onehot @ counts_all, markers, all_genes)[km]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig2 = marker_classification(
            labels, ds.types, seed,
            cell_markers=(log_normalise(counts_all, markers, all_genes), markers),
            metacell_markers={"scproto": (mc_feats, mc_genes), "kmeans_metacells": (km_feats, markers)},
            embeddings={m: obsm[m] for m in obsm})
    notes += [f"marker classification: {w.message}" for w in caught if w.category is UserWarning]
    for pair, res in fig2.items():
        info.setdefault("markers", {})[pair] = {k: v for k, v in res.items() if k != "f1"}
        for fset, f1 in res["f1"].items():
            if not np.isfinite(f1):
                notes.append(f"marker classification {pair} {fset}: F1 undefined")
                continue
            kind, _, method = fset.partition(":")
            if kind == "cell_markers":
                scores.setdefault("single_cell_markers", {})[f"{pair}_f1"] = f1
            elif kind == "metacell_markers":
                scores.setdefault(method, {})[f"{pair}_f1_metacell_markers"] = f1
            else:
                scores.setdefault(method, {})[f"{pair}_f1"] = f1
    for m, s in wall.items():
        scores.setdefault(m, {})["wall_time_s"] = round(float(s), 2)

    if figure:
        import umap

        reducer = umap.UMAP(n_neighbors=15, random_state=seed, n_jobs=1)
        xy = reducer.fit_transform(obsm["scproto"])
        used = np.unique(proto)
        pxy = reducer.transform(np.asarray(mc.obsm["prototype"])[used])
        plot_umap(xy, pxy, labels, studies, RESULTS / f"quality_umap_{name}.png", seed)
    return scores, info


def aggregate(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict]]:
    """``{method: {metric: {"mean", "sd", "n", "values"}}}`` over the seeds where the metric
    exists (``values``: one per seed, in seed order, so a spread can be read back)."""
    out: dict[str, dict[str, dict]] = {}
    for method in dict.fromkeys(m for s in per_seed for m in s):
        metrics = dict.fromkeys(k for s in per_seed for k in s.get(method, {}))
        out[method] = {}
        for k in metrics:
            vals = [s[method][k] for s in per_seed if k in s.get(method, {})]
            out[method][k] = {"mean": float(np.mean(vals)),
                              "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                              "n": len(vals), "values": [float(v) for v in vals]}
    return out


def run_dataset(name: str, seeds: int, overrides: list[str], *, seacells_seeds: int | None = None,
                resume: bool = False, vae_epochs: int | None = None, tag: str = "",
                baselines_on: bool = True, figures: bool = True, quick: bool = False) -> dict:
    """Every seed of one dataset (see :func:`run_seed`) → the aggregated result with ``_run``.

    SEACells runs on the first ``seacells_seeds`` seeds (default all): its CPU fit forms the
    dense n × n reconstruction every iteration (~10 min at 12k cells here).
    """
    ds = DATASETS[name]
    t0 = time.perf_counter()
    notes: list[str] = []
    per_seed, infos = [], []
    for seed in range(seeds):
        use_seacells = seacells_seeds is None or seed < seacells_seeds
        if not use_seacells and seacells_seeds == seed:
            notes.append(f"SEACells on the first {seacells_seeds} seed(s) only (run time: its "
                         "CPU fit is O(n²) per iteration)")
        scores, info = run_seed(name, ds, seed, overrides, use_seacells, notes,
                                figure=figures and seed == 0, resume=resume,
                                vae_epochs=vae_epochs, tag=tag, baselines_on=baselines_on)
        per_seed.append(scores)
        infos.append(info)
        print(json.dumps({m: {k: round(v, 3) for k, v in s.items()
                              if k in ("scib_total", "scib_batch", "scib_bio",
                                       "scgraph_corr_weighted", "metacell_purity",
                                       "wall_time_s")}
                          for m, s in scores.items()}), flush=True)
    result = aggregate(per_seed)
    result["_run"] = {
        "description": ds.description, "seeds": list(range(seeds)),
        "batch_key": ds.batch_key, "study_key": ds.study_key,
        "scproto_config": "config defaults" + (f" + {overrides}" if overrides else ""),
        "vae_epochs": infos[0]["vae_epochs"], "per_seed": infos,
        "warnings": sorted(set(notes)), "wall_s": round(time.perf_counter() - t0, 1),
        "machine": machine(), "quick": quick, "resumed": resume,
        "scib": "scib-metrics Benchmarker, unscaled; batch correction uses BRAS",
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(DATASETS),
                    help=f"comma-separated, from {list(DATASETS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK}, one seed")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="scProto config override key.sub=value (default: config defaults)")
    ap.add_argument("--no-seacells", action="store_true")
    ap.add_argument("--seacells-seeds", type=int, default=None,
                    help="SEACells on the first N seeds only (default: every seed)")
    ap.add_argument("--vae-epochs", type=int, default=None,
                    help="scVI / scPoli epochs (default: scProto's cell passes, baselines.default_epochs)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse finished scProto stages under runs/quality (times of the run "
                         "that did them)")
    ap.add_argument("--tables", action="store_true",
                    help="only regenerate the markdown (and quality's F1 plots) from the JSON")
    ap.add_argument("--out", default="quality",
                    help="results stem under benchmarks/results (a side study, e.g. the "
                         "baselines' epoch budget, keeps quality.json and the figures intact)")
    args = ap.parse_args()
    dest = RESULTS / f"{args.out}.json"
    main_report = args.out == "quality"
    if not args.tables:
        names = [QUICK] if args.quick else args.datasets.split(",")
        unknown = sorted(set(names) - set(DATASETS))
        if unknown:
            ap.error(f"unknown datasets {unknown}; choose from {list(DATASETS)}")
        for name in names:
            result = run_dataset(name, 1 if args.quick else args.seeds, args.overrides,
                                 seacells_seeds=0 if args.no_seacells else args.seacells_seeds,
                                 resume=args.resume,
                                 vae_epochs=args.vae_epochs, figures=main_report,
                                 quick=args.quick)
            merge_json(dest, {name: result})
    data = json.loads(dest.read_text())
    write_quality_markdown(data, RESULTS / f"{args.out}.md")
    if main_report:
        for name, res in data.items():
            plot_f1_bars(res, name, RESULTS / f"quality_f1_{name}.png")
    print(f"wrote {dest} and {RESULTS / f'{args.out}.md'}")


if __name__ == "__main__":
    main()
