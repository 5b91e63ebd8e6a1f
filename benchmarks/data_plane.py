"""The out-of-core data plane at atlas scale: generator → prepare → loader, against peers.

    python benchmarks/data_plane.py --quick        # ~200k cells × 20k genes
    python benchmarks/data_plane.py                # 1M cells × 20k genes

Writes ``benchmarks/results/data_plane[_quick].json`` (and, for the default output name,
``benchmarks/results/data_plane.json``) with:

* ``loader_cells_per_s``: anchor cells per second of our view loader (each anchor with V−1 = 7
  KNN neighbours, gene-aligned dense ``(V, B, G)`` tensors, as the model consumes them) from
  the zarr training cache, single process, no prefetch thread; ``loader_view_cells_per_s``
  counts all V views; ``loader_soma_cells_per_s`` the same loader over the same cells in SOMA.
* ``tiledbsoma_ml_cells_per_s``: tiledbsoma-ml ``ExperimentDataset`` (shuffle on, same batch
  size) streaming a SOMA experiment with the same cells and the same model genes (it reads
  anchors only); ``loader_ratio`` = ours / it.
* ``peak_rss_gib``: peak RSS of one full training epoch (default model, 1,024 anchors × 8
  views) per store size N (prefixes of the store, each prepared on its own), in a child process.
* ``knn_recall``: recall@k of the prepared KNN table vs exact search on a 10k sample;
  ``knn_peer``: FAISS vs pynndescent wall time and recall on the same subsample.
* ``pca_explained_variance_rel_err``: total top-50 explained variance of the streaming PCA
  (all cells) vs sklearn's in-memory PCA on a 100k subsample; ``pca.max_rel_err`` per
  component (the trailing, noise-level components differ by the subsample's sampling noise).
* ``hvg_overlap``: our streaming batch-aware seurat_v3 HVGs (all cells) vs scanpy's
  ``seurat_v3`` with the same batch key on an in-memory subsample.
* ``machine``: CPU, memory, load; the machine is shared (other engineers' nice'd jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scproto_scale.config import ModelConfig, PrepareConfig, TrainConfig  # noqa: E402
from scproto_scale.data.store import PrefixStore, open_store  # noqa: E402
from scproto_scale.prepare.artefacts import Prepared  # noqa: E402
from scproto_scale.prepare.knn import knn, knn_recall  # noqa: E402
from scproto_scale.prepare.normalize import log_normalize  # noqa: E402
from scproto_scale.prepare.run import prepare  # noqa: E402
from scproto_scale.simulate_scale import write_scaled_atlas  # noqa: E402

BATCH = 1024


def _gib(kib: float) -> float:
    return round(kib / 2**20, 3)


def machine() -> dict:
    import psutil
    import torch

    return {
        "platform": platform.platform(), "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "shared": "2-core machine shared with other engineers (their jobs run nice'd); "
                  "timed sections run under flock /work/.bench.lock when launched so",
    }


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, round(time.perf_counter() - t, 2)


# ---------------------------------------------------------------------------- loader peers

def loader_rate(store, prepared: Prepared, steps: int, source=None, max_s: float = 60.0,
                prefetch: int = 0) -> dict:
    """Anchor and view cells per second of our loader over ``steps`` steps (after one warm-up)."""
    from scproto_scale.data.loader import ViewLoader
    from scproto_scale.data.sampler import StudyStratifiedSampler, merge_small_studies

    src = source or prepared.loader_source(store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups, _ = merge_small_studies(src.study, prepared.studies, 128)
    sampler = StudyStratifiedSampler(groups, BATCH, 128, 1.0, 0, block_size=src.block_size)
    loader = ViewLoader(src.store, src.cells, src.knn_indices, src.knn_distances,
                        src.library_size, src.condition, src.gene_columns, sampler, 8,
                        prefetch=prefetch)
    n = done = 0
    t = time.perf_counter()  # from the first batch on, like the peer (no warm-up excluded)
    for batch in loader.epoch(0):
        n += batch.counts.shape[1]
        done += 1
        if done >= steps or time.perf_counter() - t > max_s:
            break
    dt = time.perf_counter() - t
    return {"anchor_cells_per_s": round(n / dt), "view_cells_per_s": round(8 * n / dt),
            "steps": done, "seconds": round(dt, 2), "batch": BATCH, "views": 8,
            "prefetch_threads": prefetch,
            "genes": len(src.gene_columns)}


def soma_copy_of_cache(prepared: Prepared, out: Path) -> Path:
    """The training cache's cells and genes as a Census-layout SOMA experiment (cache order)."""
    from scproto_scale.data.writers import SomaWriter
    from scproto_scale.data.zarr_store import ZarrCellStore

    cache = ZarrCellStore(prepared.path / "train_cache.zarr")
    rows = np.load(prepared.path / "cache_rows.npy")
    genes = list(cache.var_names)
    var = pd.DataFrame({"feature_id": genes, "feature_name": genes})
    w = SomaWriter(out, var, cache.n_obs, overwrite=True)
    for _, _, X in cache.iter_chunks(50_000):
        w.append(X)
    study = np.asarray(prepared.study_codes)[rows]
    obs = pd.DataFrame({"study": np.asarray(prepared.studies)[study], "store_row": rows})
    return w.finish(obs)


def tiledbsoma_ml_rate(soma: Path, steps: int, max_s: float = 60.0) -> dict:
    try:
        import tiledbsoma
        from tiledbsoma_ml import ExperimentDataset
    except ImportError as exc:
        return {"skipped": f"tiledbsoma-ml not installed ({exc}); pip install -e '.[bench]'"}
    with tiledbsoma.Experiment.open(str(soma)) as exp, exp.axis_query("RNA") as query:
        ds = ExperimentDataset(query, layer_name="raw", obs_column_names=["study"],
                               batch_size=BATCH, shuffle=True, seed=0)
        n = done = 0
        t = time.perf_counter()  # includes the first IO batch: it reads 65,536 cells at once
        for X, _obs in ds:
            n += X.shape[0]
            done += 1
            if done >= steps or time.perf_counter() - t > max_s:
                break
        dt = time.perf_counter() - t
    return {"cells_per_s": round(n / dt), "steps": done, "seconds": round(dt, 2),
            "batch": BATCH, "shuffle": True, "io_batch_size": 2**16,
            "shuffle_chunk_size": 64}


# ---------------------------------------------------------------------------- quality peers

def subsample_rows(n: int, m: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, min(n, m), replace=False))


def pca_check(store, prepared: Prepared, n_sub: int, seed: int) -> dict:
    from sklearn.decomposition import PCA

    from scproto_scale.data.zarr_store import ZarrCellStore

    # The model-gene counts of a random subsample, read from the training cache.
    cache = ZarrCellStore(prepared.path / "train_cache.zarr")
    store_rows = np.load(prepared.path / "cache_rows.npy")
    rows = subsample_rows(cache.n_obs, n_sub, seed)
    X = cache.read_rows(rows)
    Xn = log_normalize(X, np.asarray(prepared.library_size)[store_rows[rows]]).toarray()
    k = len(prepared.meta["pca_explained_variance"])
    sk, t = timed(lambda: PCA(k, svd_solver="covariance_eigh").fit(Xn))
    ours = np.asarray(prepared.meta["pca_explained_variance"])
    ref = sk.explained_variance_
    rel = np.abs(ours - ref) / ref
    return {"n_subsample": len(rows), "n_components": k, "max_rel_err": round(float(rel.max()), 5),
            "sum_rel_err": round(float(abs(ours.sum() - ref.sum()) / ref.sum()), 6),
            "sklearn_fit_s": t, "solver": "sklearn PCA(svd_solver='covariance_eigh')"}


def hvg_check(store, prepared: Prepared, n_sub: int, batch_key: str, seed: int) -> dict:
    import anndata as ad
    import scanpy as sc

    # Random blocks of 1,000 contiguous rows (one ranged read each; the store is grouped by
    # study, in random order within a study).
    block = 1_000
    starts = np.sort(np.random.default_rng(seed).choice(store.n_obs // block, n_sub // block,
                                                        replace=False)) * block
    X = sp.vstack([store.read_slice(a, a + block) for a in starts], format="csr")
    rows = np.concatenate([np.arange(a, a + block) for a in starts])
    batch_all = store.obs_column(batch_key).to_numpy()[rows].astype(str)
    n_top = len(prepared.genes)
    ours = set(prepared.genes)
    # scanpy's per-batch loess fails ("near singularities") on small batches and has no
    # fallback: keep studies with at least `floor` sampled cells, raising it until scanpy fits.
    for floor in (100, 300, 1_000, 3_000):
        names, counts = np.unique(batch_all, return_counts=True)
        keep = np.isin(batch_all, names[counts >= floor])
        adata = ad.AnnData(X[keep])
        adata.var_names = store.var_names
        adata.obs[batch_key] = batch_all[keep]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, t = timed(sc.pp.highly_variable_genes, adata, flavor="seurat_v3",
                             n_top_genes=n_top, batch_key=batch_key)
        except ValueError as exc:
            last = str(exc)
            continue
        theirs = set(adata.var_names[adata.var["highly_variable"].to_numpy()])
        # Our streaming implementation on exactly scanpy's input (the implementation check).
        from scproto_scale.prepare.hvg import highly_variable_genes_seurat_v3

        codes = pd.Categorical(adata.obs[batch_key]).codes.astype(np.int64)
        Xk = adata.X.tocsr()

        def sub_chunks(Xk=Xk, codes=codes):
            for a in range(0, Xk.shape[0], 10_000):
                yield Xk[a:a + 10_000], codes[a:a + 10_000]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            st = highly_variable_genes_seurat_v3(sub_chunks, n_vars=Xk.shape[1],
                                                 n_batches=int(codes.max()) + 1,
                                                 n_top_genes=n_top)
        same = set(adata.var_names[st["highly_variable"].to_numpy()])
        return {"same_subsample_overlap": round(len(same & theirs) / n_top, 4),
                "n_subsample": int(keep.sum()), "n_studies_in_subsample":
                int((counts >= floor).sum()), "min_cells_per_study": floor,
                "n_top_genes": n_top, "overlap": round(len(ours & theirs) / n_top, 4),
                "scanpy_s": t,
                "note": f"scanpy on studies with ≥ {floor} subsampled cells; ours on all cells"}
    return {"overlap": None, "error": f"scanpy seurat_v3 failed at every floor: {last}"}


def knn_check(prepared: Prepared, n_peer: int, k: int, seed: int, nprobe: int) -> dict:
    cells = np.asarray(prepared.cells)
    pca = np.asarray(prepared.pca)
    table = np.searchsorted(cells, np.asarray(prepared.knn_indices))  # store rows → positions
    recall, t_rec = timed(knn_recall, pca, table, 10_000, seed)
    sub = subsample_rows(len(pca), n_peer, seed + 1)
    Xs = np.ascontiguousarray(pca[sub])
    (fi, _), t_faiss = timed(knn, Xs, k, 10_000, nprobe, seed)
    out = {"n": len(pca), "k": k, "recall_at_k_10k_sample": round(recall, 4),
           "faiss_ivf_full_s": prepared.meta["stage_seconds"]["knn_s"], "recall_check_s": t_rec,
           "peer_subsample": len(sub), "faiss_ivf_subsample_s": t_faiss,
           "faiss_ivf_subsample_recall": round(knn_recall(Xs, fi, 5_000, seed), 4)}
    try:
        from pynndescent import NNDescent
    except ImportError as exc:
        out["pynndescent"] = f"skipped: {exc}"
        return out
    NNDescent(Xs[:2000], n_neighbors=10, random_state=seed)  # numba compile, not timed
    nnd, t_nnd = timed(lambda: NNDescent(Xs, n_neighbors=k + 1, random_state=seed,
                                         n_jobs=1).neighbor_graph)
    nidx = nnd[0]
    own = nidx == np.arange(len(Xs))[:, None]
    own[~own.any(1), -1] = True
    nidx = nidx[~own].reshape(len(Xs), k)
    out.update({"pynndescent_subsample_s": t_nnd,
                "pynndescent_subsample_recall": round(knn_recall(Xs, nidx, 5_000, seed), 4),
                "faiss_speedup_vs_pynndescent": round(t_nnd / max(t_faiss, 1e-9), 2)})
    return out


# ---------------------------------------------------------------------------- memory per N

def rss_child(store_path: str, n: int, prepared_dir: str, batch_key: str) -> None:
    """One full training epoch from the prefix store; prints a JSON line with the peak RSS."""
    from scproto_scale.train.loop import train

    store = open_store(store_path)
    if n < store.n_obs:
        store = PrefixStore(store, n)
    prep = Prepared.load(prepared_dir)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = train(store, prep, ModelConfig(), TrainConfig(epochs=1, progress=False),
                    Path(prepared_dir).with_suffix(".ckpt"), seed=0)
    print(json.dumps({"n_cells": n, "peak_rss_gib": _gib(resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss), "epoch_s": round(time.perf_counter() - t, 1),
        "steps": len(res.history) and res.history[-1].get("epoch", 0) + 1}))


def rss_for(store_path: Path, n: int, prepared_dir: Path, batch_key: str) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", str(store_path), str(n), str(prepared_dir),
           batch_key]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not line:
        return {"n_cells": n, "error": r.stderr[-2000:]}
    return json.loads(line[-1])


# ---------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="~200k cells instead of 1M")
    ap.add_argument("--n-cells", type=int, default=None)
    ap.add_argument("--n-genes", type=int, default=20_000)
    ap.add_argument("--n-studies", type=int, default=120)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "data_plane")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=150,
                    help="loader steps (of 1,024 anchors) timed per peer, first batch included")
    ap.add_argument("--keep", action="store_true", help="keep the generated stores")
    ap.add_argument("--locked", action="store_true",
                    help="record that this run holds /work/.bench.lock (flock … --locked)")
    ap.add_argument("--table", type=Path, default=None,
                    help="print the README markdown table of a results JSON and exit")
    ap.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    if args.rss_child:
        s, n, p, bk = args.rss_child
        rss_child(s, int(n), p, bk)
        return
    warnings.filterwarnings("ignore")
    N = args.n_cells or (200_000 if args.quick else 1_000_000)
    rss_ns = [N // 4, N] if args.quick else [100_000, 300_000, N]
    rss_ns = sorted({min(n, N) for n in rss_ns})
    out = args.out or ROOT / "benchmarks" / "results" / "data_plane.json"
    work = args.work / f"n{N}_g{args.n_genes}_s{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    res: dict = {"mode": "quick" if args.quick else "full", "n_cells": N,
                 "n_genes": args.n_genes, "n_studies": args.n_studies, "seed": args.seed,
                 "machine": {**machine(), "under_bench_lock": args.locked}}

    store_path = work / "atlas.zarr"
    res["generate_reused"] = store_path.exists()
    if not store_path.exists():
        summary, t = timed(write_scaled_atlas, store_path, None, n_cells=N, n_genes=args.n_genes,
                           n_studies=args.n_studies, seed=args.seed)
        summary["seconds"] = t
        (work / "generate.json").write_text(json.dumps(summary))
    res["generate"] = json.loads((work / "generate.json").read_text())
    res["generate"].pop("type_counts", None)
    print("generate", res["generate"], flush=True)
    store = open_store(store_path)

    # IVF above 10k cells, so the recall check measures the approximate index at every N.
    cfg = PrepareConfig(training_cache="on", exact_knn_max_cells=10_000)
    prepared_dirs = {}
    for n in rss_ns:
        pdir = work / f"prepared_{n}"
        st = store if n == N else PrefixStore(store, n)
        p, t = timed(prepare, st, pdir, "study", cfg, seed=args.seed)
        prepared_dirs[n] = pdir
        if n == N:
            prep = p
            res["prepare"] = {"seconds": p.meta["runtime_s"], "stages": p.meta["stage_seconds"],
                              "n_hvg": len(p.genes), "reused": t < 0.5 * p.meta["runtime_s"]}
    print("prepare", res["prepare"], flush=True)

    res["loader"] = {"zarr_cache": loader_rate(store, prep, args.steps),
                     "zarr_cache_prefetch2": loader_rate(store, prep, args.steps, prefetch=2)}
    # Headline: one process, the better of no prefetch thread and two prefetch threads.
    best = max(res["loader"]["zarr_cache"], res["loader"]["zarr_cache_prefetch2"],
               key=lambda r: r["anchor_cells_per_s"])
    res["loader_cells_per_s"] = best["anchor_cells_per_s"]
    res["loader_view_cells_per_s"] = best["view_cells_per_s"]
    res["loader_prefetch_threads"] = best["prefetch_threads"]
    print("loader", res["loader"], flush=True)
    soma, t_soma = timed(soma_copy_of_cache, prep, work / "cache.soma")
    res["loader"]["soma_copy_write_s"] = t_soma
    from scproto_scale.data.soma_store import SomaCellStore
    src = prep.loader_source(store)
    src.store = SomaCellStore(soma)
    res["loader"]["soma"] = loader_rate(store, prep, min(args.steps, 20), source=src, max_s=30)
    res["loader_soma_cells_per_s"] = res["loader"]["soma"]["anchor_cells_per_s"]
    res["loader"]["tiledbsoma_ml"] = tiledbsoma_ml_rate(soma, args.steps)
    peer = res["loader"]["tiledbsoma_ml"].get("cells_per_s")
    res["tiledbsoma_ml_cells_per_s"] = peer
    res["loader_ratio"] = round(res["loader_cells_per_s"] / peer, 2) if peer else None
    print("loader", res["loader"], flush=True)

    res["knn"] = knn_check(prep, 50_000 if args.quick else 200_000, cfg.n_neighbors, args.seed,
                           cfg.ivf_nprobe)
    res["knn"]["index"] = f"IVF-Flat, 4·√n lists, nprobe {cfg.ivf_nprobe} (forced above 10k cells)"
    res["knn_recall"] = res["knn"]["recall_at_k_10k_sample"]
    print("knn", res["knn"], flush=True)
    res["pca"] = pca_check(store, prep, 100_000, args.seed)
    res["pca"]["ours_fit_s"] = prep.meta["stage_seconds"]["pca_fit_s"]
    # Headline: the top-50 explained variance in total; per component in res["pca"].
    res["pca_explained_variance_rel_err"] = res["pca"]["sum_rel_err"]
    print("pca", res["pca"], flush=True)
    res["hvg"] = hvg_check(store, prep, 50_000 if args.quick else 100_000, "study", args.seed)
    res["hvg"]["ours_s"] = prep.meta["stage_seconds"]["hvg_s"]
    res["hvg_overlap"] = res["hvg"].get("overlap")
    print("hvg", res["hvg"], flush=True)

    res["training_epoch"] = [rss_for(store_path, n, prepared_dirs[n], "study") for n in rss_ns]
    res["peak_rss_gib"] = {str(r["n_cells"]): r.get("peak_rss_gib") for r in res["training_epoch"]}
    print("rss", res["training_epoch"], flush=True)
    res["extrapolation"] = extrapolate(res, N)
    res["total_s"] = round(time.perf_counter() - t_all, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=float))
    print(json.dumps({k: res[k] for k in ("loader_cells_per_s", "tiledbsoma_ml_cells_per_s",
                                          "loader_ratio", "peak_rss_gib", "knn_recall",
                                          "pca_explained_variance_rel_err", "hvg_overlap",
                                          "total_s")}))
    if not args.keep:
        shutil.rmtree(work / "cache.soma", ignore_errors=True)


def table(res: dict) -> str:
    """The README table (markdown) of a results JSON."""
    ld, kn, pc, hv = res["loader"], res["knn"], res["pca"], res["hvg"]
    peer = ld["tiledbsoma_ml"]
    rows = [
        ("loader, anchors/s (× 8 views), zarr training cache, 1 process",
         f"{res['loader_cells_per_s']:,} ({res['loader_view_cells_per_s']:,} view cells/s; "
         f"{res['loader_prefetch_threads']} prefetch threads)"),
        ("same loader over the same cells in SOMA", f"{res['loader_soma_cells_per_s']:,}"),
        ("tiledbsoma-ml `ExperimentDataset`, cells/s (anchors only)",
         f"{peer['cells_per_s']:,}" if "cells_per_s" in peer else peer.get("skipped", "—")),
        ("loader ratio (ours / tiledbsoma-ml)", f"{res['loader_ratio']}"),
        ("peak RSS of a training epoch, GiB (by N)",
         ", ".join(f"{int(n):,}: {v}" for n, v in res["peak_rss_gib"].items())),
        (f"KNN recall@{kn['k']} vs exact (10k sample)", f"{kn['recall_at_k_10k_sample']}"),
        (f"KNN wall, FAISS IVF on {kn['n']:,} cells", f"{kn['faiss_ivf_full_s']} s"),
        (f"KNN on {kn['peer_subsample']:,} cells: FAISS IVF vs pynndescent",
         f"{kn['faiss_ivf_subsample_s']} s vs {kn.get('pynndescent_subsample_s', '—')} s "
         f"(recall {kn['faiss_ivf_subsample_recall']} vs {kn.get('pynndescent_subsample_recall', '—')})"),
        ("PCA top-50 explained variance vs sklearn (100k subsample), rel. err of the total",
         f"{pc['sum_rel_err']} (per component ≤ {pc['max_rel_err']}); fit {pc['ours_fit_s']} s"),
        (f"HVG overlap with scanpy seurat_v3 on a {hv['n_subsample']:,}-cell subsample "
         f"({hv['n_studies_in_subsample']} studies): ours on all cells / ours on that subsample",
         f"{hv['overlap']} / {hv.get('same_subsample_overlap', '—')}"),
        ("prepare, all stages", f"{res['prepare']['seconds']} s"),
    ]
    head = (f"{res['n_cells']:,} cells × {res['n_genes']:,} genes, {res['n_studies']} studies "
            f"(median {res['generate']['median_nnz_per_cell']:.0f} non-zeros per cell); "
            f"{res['machine']['cores']} cores, {res['machine']['memory_gib']} GiB, "
            f"GPU: {res['machine']['gpu'] or 'none'}; shared machine\n\n")
    return head + "| measure | value |\n|---|---:|\n" + "\n".join(
        f"| {a} | {b} |" for a, b in rows)


def extrapolate(res: dict, N: int) -> dict:
    """Linear-in-N stages scaled to 10M / 50M cells, with the first bottleneck named."""
    st = res["prepare"]["stages"]
    per_cell = {k: v / N for k, v in st.items()}
    disk_per_cell = None
    out = {}
    for M in (10_000_000, 50_000_000):
        prep_s = sum(per_cell.values()) * M
        out[f"{M // 1_000_000}M"] = {
            "prepare_hours_linear": round(prep_s / 3600, 2),
            "knn_table_gib": round(M * res["knn"]["k"] * 8 / 2**30, 1),
            "pca_scores_gib": round(M * 50 * 4 / 2**30, 1),
            "epoch_loader_hours_at_measured_rate": round(M / res["loader_cells_per_s"] / 3600, 2),
        }
    out["notes"] = (
        "Every prepare pass streams row chunks, so time is linear in N and memory flat except "
        "the per-cell vectors (library size, study code, PCA scores / KNN tables as memory "
        "maps). The first bottleneck on this 2-core machine is the PCA fit (exact Gram, "
        "O(N·G²) BLAS) and the IVF KNN search (O(N·nprobe·N/nlist), grows ~N^1.5 with "
        "nlist ∝ √N); both are the GPU paths (torch, faiss-gpu). At 50M cells the per-cell "
        "arrays (KNN table 50M×50 int32+float32 = 18.6 GiB on disk) no longer fit in page "
        "cache beside the training cache, so neighbour lookups become disk reads: shard the "
        "KNN table with the cache partitions.")
    del disk_per_cell
    return out


if __name__ == "__main__":
    main()
