"""Which cell types move an embedding's scGraph Corr-Weighted, per seed.

scGraph's Corr-Weighted (Wang et al. 2024) averages, over cell types, the weighted Pearson
correlation between a type's distances to the other types in the embedding and in a batch-wise
PCA consensus. This script reads the runs that ``benchmarks/quality.py`` cached under
``runs/quality/<set>/seed<s>`` (scProto and every cached baseline embedding), scores them again
with ``scgraph(..., per_type=True)`` on the same cells and counts, and prints each type's term,
so that a low seed can be traced to the types whose neighbourhoods it distorts.

    python benchmarks/scgraph_per_type.py [--datasets kang_scgen]

writes ``benchmarks/results/scgraph_per_type.json``: ``{dataset: {method: {"corr_weighted":
[per seed], "per_type": {type: [per seed]}}}}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _companion_common import RESULTS, merge_json
from quality import DATASETS, cached_runs, source_path

from scproto_scale.evaluate.scgraph import scgraph


def seed_scores(run: Path, ds) -> dict[str, dict]:
    """Corr-Weighted and its per-type terms for every embedding of one cached seed."""
    emb = ad.read_h5ad(run / "embeddings.h5ad")
    rows = emb.obs["store_row"].to_numpy()
    src = ad.read_h5ad(source_path(ds))
    obsm = {"scproto": emb.obsm["X_scproto"], "pca": emb.obsm["X_pca_unintegrated"]}
    for f in sorted(run.glob("baseline_*_e*_*.npz")):
        obsm[f.name.split("_")[1]] = np.load(f)["Z"]
    cells = ad.AnnData(X=sp.csr_matrix(src.X[rows], dtype=np.float32),
                       obs=emb.obs[[ds.batch_key, ds.label_key]].copy(),
                       obsm={m: np.asarray(z, dtype=np.float32) for m, z in obsm.items()})
    return scgraph(cells, list(obsm), ds.batch_key, ds.label_key, per_type=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="kang_scgen")
    args = ap.parse_args()
    dest = RESULTS / "scgraph_per_type.json"
    for name in args.datasets.split(","):
        out: dict[str, dict] = {}
        for run in cached_runs(name):
            for method, s in seed_scores(run, DATASETS[name.split("~")[0]]).items():
                m = out.setdefault(method, {"corr_weighted": [], "per_type": {}})
                m["corr_weighted"].append(s["corr_weighted"])
                for t, v in s["corr_weighted_per_type"].items():
                    m["per_type"].setdefault(t, []).append(v)
        merge_json(dest, {name: out})
        for method, m in out.items():
            print(f"{name} {method}: Corr-W per seed {[round(v, 3) for v in m['corr_weighted']]}")
            for t, vals in m["per_type"].items():
                print(f"    {t}: {[round(v, 3) for v in vals]}")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
