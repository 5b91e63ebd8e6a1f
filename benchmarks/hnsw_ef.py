"""HNSW search breadth at scale: recall@k of one HNSW index (the prepare defaults M and
efConstruction) searched with several efSearch values, against exact search on a sample.

    python benchmarks/hnsw_ef.py PCA.npy [--ef 192 256 320] [--sample 10000]

Builds the index once on all rows of ``PCA.npy`` (e.g. a prepared store's ``pca.npy``), then
for each efSearch searches the sampled rows only and compares with exact (flat L2) search of
the same rows. Prints and appends to ``benchmarks/results/hnsw_ef.json`` (the machine's load
average is recorded: this 2-core box is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np

from scproto_scale.config import PrepareConfig
from scproto_scale.prepare.knn import build_index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pca")
    ap.add_argument("--ef", type=int, nargs="+", default=[192, 256, 320])
    ap.add_argument("--sample", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = PrepareConfig()
    X = np.ascontiguousarray(np.load(args.pca, mmap_mode="r"), dtype=np.float32)
    n, d = X.shape
    q = np.sort(np.random.default_rng(args.seed).choice(n, args.sample, replace=False))
    t = time.perf_counter()
    index, kind = build_index(X, "hnsw", 0, cfg.ivf_nprobe, cfg.hnsw_m, 192, args.seed,
                              cfg.hnsw_ef_construction)
    build_s = time.perf_counter() - t
    flat = faiss.IndexFlatL2(d)
    flat.add(X)
    _, exact = flat.search(X[q], args.k + 1)
    rows = {"pca": str(args.pca), "n": n, "d": d, "k": args.k, "sample": args.sample,
            "index": kind, "hnsw_m": cfg.hnsw_m, "ef_construction": cfg.hnsw_ef_construction,
            "build_s": round(build_s, 1), "load_average": [round(x, 2) for x in os.getloadavg()],
            "by_ef_search": {}}
    for ef in args.ef:
        faiss.downcast_index(index).hnsw.efSearch = ef
        t = time.perf_counter()
        _, approx = index.search(X[q], args.k + 1)
        s = time.perf_counter() - t
        # the cell itself excluded, as knn_recall (k neighbours per cell)
        recall = np.mean([len((set(a) & set(e)) - {i}) / args.k
                          for i, a, e in zip(q.tolist(), approx, exact, strict=True)])
        rows["by_ef_search"][str(ef)] = {"recall_at_k": round(float(recall), 4),
                                         "search_s_per_1M_queries": round(s * 1e6 / len(q), 1)}
        print(ef, rows["by_ef_search"][str(ef)], flush=True)
    dest = Path(__file__).parent / "results" / "hnsw_ef.json"
    old = json.loads(dest.read_text()) if dest.exists() else []
    dest.write_text(json.dumps([*old, rows], indent=1))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
