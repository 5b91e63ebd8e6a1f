"""Where scProto's metacells lose purity against k-means metacells of the same count.

The quality harness's ``metacell_purity`` is SEACells' definition: the mean over metacells of
the majority-label fraction, every metacell weighing the same. scProto's metacells are its used
prototypes, whose sizes follow the data (a nearest-prototype partition), while k-means metacells
on the PCA are closer to equal-sized; so this script reads the cached runs of
``benchmarks/quality.py`` (``runs/quality/<set>/seed<s>``) and splits purity by metacell size:

- ``purity`` (the harness's), ``cell_weighted_purity`` (the fraction of cells in their
  metacell's majority type: each metacell weighs by its cells), ``purity_small`` /
  ``purity_large`` (metacells below / at or above the method's median size), ``size_cv`` (sd /
  mean of metacell sizes) and ``impure_fraction`` (metacells with purity < 0.8);
- ``scproto_balanced``: scProto's used prototypes with cells assigned by the training's
  Sinkhorn (ε 0.02, 3 iterations: equal mass per prototype) instead of the nearest prototype,
  the size-balanced alternative, read on Kang 8 donors (the tuning set) before anything else;
- ``confusions``: the label pairs (majority type → a minority type inside the metacell) that hold
  the most misplaced cells, summed over seeds.

    python benchmarks/metacell_purity.py [--datasets kang_scgen,pbmc_multi]

writes ``benchmarks/results/metacell_purity.json``: ``{dataset: {method: {metric: {mean, sd, n,
values}}, "confusions": {method: [[majority, minority, cells], ...]}}}``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _companion_common import RESULTS, merge_json
from quality import DATASETS, aggregate, cached_runs

from scproto_scale.evaluate import baselines
from scproto_scale.model.sinkhorn import sinkhorn


def partition_purity(assign: np.ndarray, labels: np.ndarray) -> tuple[dict[str, float], Counter]:
    """Purity readings of one ``(n,)`` cell → metacell partition and its misplaced cells.

    Returns the metrics named in the module docstring and a ``Counter`` of
    ``(majority type, minority type) → cells``.
    """
    tab = pd.crosstab(assign, labels)
    size = tab.sum(axis=1).to_numpy()
    top = tab.max(axis=1).to_numpy()
    purity = top / size
    small = size < np.median(size)
    confusions: Counter = Counter()
    for majority, row in zip(tab.idxmax(axis=1), tab.to_numpy(), strict=True):
        for t, n in zip(tab.columns, row, strict=True):
            if t != majority and n:
                confusions[(majority, t)] += int(n)
    return {
        "n_metacells": float(len(size)),
        "purity": float(purity.mean()),
        "cell_weighted_purity": float(top.sum() / size.sum()),
        "purity_small": float(purity[small].mean()) if small.any() else float("nan"),
        "purity_large": float(purity[~small].mean()),
        "size_cv": float(size.std() / size.mean()),
        "impure_fraction": float((purity < 0.8).mean()),
    }, confusions


def dataset_rows(name: str) -> dict:
    """Every cached seed of one dataset → aggregated readings and summed confusions."""
    runs = cached_runs(name)  # first: it names an unknown dataset
    ds = DATASETS[name.split("~")[0]]
    per_seed: list[dict[str, dict[str, float]]] = []
    confusions: dict[str, Counter] = {}
    for run in runs:
        seed = int(run.name.removeprefix("seed"))
        emb = ad.read_h5ad(run / "embeddings.h5ad")
        labels = emb.obs[ds.label_key].astype(str).to_numpy()
        proto = emb.obs["scproto_prototype"].astype(int).to_numpy()
        pca = np.asarray(emb.obsm["X_pca_unintegrated"], dtype=np.float32)
        # the harness's k-means metacells: same PCA, count and seed
        used = np.unique(proto)
        km, _ = baselines.kmeans_metacells(pca, len(used), seed)
        scores = emb.obsm["X_scproto"] @ np.load(run / "atlas" / "prototypes.npy")[used].T
        balanced = used[sinkhorn(torch.from_numpy(scores).double(), 0.02, 3).argmax(1).numpy()]
        per_seed.append({})
        for method, assign in (("scproto", proto), ("scproto_balanced", balanced),
                               ("kmeans_metacells", km)):
            per_seed[-1][method], conf = partition_purity(assign, labels)
            confusions.setdefault(method, Counter()).update(conf)
    out: dict = aggregate(per_seed)
    out["confusions"] = {m: [[a, b, n] for (a, b), n in c.most_common(5)]
                         for m, c in confusions.items()}
    out["seeds"] = len(runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="kang_scgen,pbmc_multi")
    args = ap.parse_args()
    dest = RESULTS / "metacell_purity.json"
    for name in args.datasets.split(","):
        res = dataset_rows(name)
        merge_json(dest, {name: res})
        for method in ("scproto", "scproto_balanced", "kmeans_metacells"):
            r = res[method]
            print(f"{name} {method}: " + ", ".join(
                f"{k} {v['mean']:.3f}±{v['sd']:.3f}" for k, v in r.items()))
            print(f"  confusions: {res['confusions'][method]}")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
