"""What the scIB "PCR comparison" batch metric sees: raw principal-component regression per method.

scIB's PCR comparison (Büttner et al., Nat. Methods 2019; scib-metrics ``pcr_comparison``) is
``(R²_pre − R²_post) / R²_pre`` clipped at 0, with R² the variance-weighted fraction of each
principal component explained by the batch (one-hot regression). Where the unintegrated data
has almost no batch effect, R²_pre is small and the score is the ratio of two small numbers.
This script reads the embeddings that ``quality.py`` cached under ``runs/quality/<set>/seed<s>``
and prints, per dataset and method, the raw R² of batch and of cell type and the scIB batch score
without its PCR term, so the README can say what limits the batch score.

Batch R² also counts composition: where donors differ in their cell-type mix, an embedding that
separates the types carries batch R² even with no batch effect left inside any type. So the
batch R² is split: ``pcr_batch_r2_type_means`` is the batch R² of the embedding with every cell
replaced by its type's mean (composition only), ``pcr_batch_r2_within_type`` that of the
residual after removing the type means (the batch effect left inside the types), and
``pcr_batch_r2_composition_only`` that of an oracle embedding with every (type, batch) group
moved onto its type's mean offset (the batch effect inside each type removed with the labels):
the lowest batch R² the embedding's type structure allows, and ``pcr_comparison_ceiling`` the
PCR comparison it would score.

    python benchmarks/batch_pcr.py [--datasets kang8,pbmc_multi]
    python benchmarks/batch_pcr.py --datasets "kang8~neighbours_per_study"  # a sweep's runs

writes ``benchmarks/results/batch_pcr.json``: ``{dataset: {method: {metric: {mean, sd, n,
values}}}}`` (:func:`quality.aggregate` over the cached seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np
from scib_metrics.utils import principal_component_regression

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _companion_common import RESULTS, merge_json
from quality import DATASETS, RUNS, aggregate

BATCH_TERMS = ("BRAS", "iLISI", "KBET", "Graph connectivity", "PCR comparison")


def _r2(Z: np.ndarray, covariate: np.ndarray) -> float:
    """Variance-weighted R² of ``Z``'s principal components on a categorical covariate."""
    return float(principal_component_regression(Z.astype(np.float32), covariate,
                                                categorical=True))


def _means(Z: np.ndarray, code: np.ndarray) -> np.ndarray:
    """``(n_groups, d)`` mean of ``Z``'s rows per integer group code."""
    sums = np.zeros((code.max() + 1, Z.shape[1]))
    np.add.at(sums, code, Z)
    return sums / np.bincount(code)[:, None]


def seed_rows(run: Path, ds) -> dict[str, dict[str, float]]:
    """Raw PCR of batch and cell type for every embedding of one cached quality run."""
    emb = ad.read_h5ad(run / "embeddings.h5ad")
    batch = emb.obs[ds.batch_key].astype(str).to_numpy()
    label = emb.obs[ds.label_key].astype(str).to_numpy()
    obsm = {"scproto": emb.obsm["X_scproto"], "pca": emb.obsm["X_pca_unintegrated"]}
    for f in sorted(run.glob("baseline_*_e*_*.npz")):
        obsm[f.name.split("_")[1]] = np.load(f)["Z"]
    scores_files = sorted(run.glob("scores_*.json"), key=lambda p: p.stat().st_mtime)
    scib = json.loads(scores_files[-1].read_text())[0] if scores_files else {}
    out = {}
    type_code = np.unique(label, return_inverse=True)[1]
    group_code = np.unique(np.char.add(np.char.add(label, "\t"), batch), return_inverse=True)[1]
    for method, Z in obsm.items():
        Z = np.asarray(Z, dtype=np.float64)
        type_mean, group_mean = _means(Z, type_code)[type_code], _means(Z, group_code)[group_code]
        oracle = Z - group_mean + type_mean  # every type's batches share one mean
        row = {"pcr_batch_r2": _r2(Z, batch), "pcr_type_r2": _r2(Z, label),
               "pcr_batch_r2_type_means": _r2(type_mean, batch),
               "pcr_batch_r2_within_type": _r2(Z - type_mean, batch),
               "pcr_batch_r2_composition_only": _r2(oracle, batch)}
        terms = [scib[method][t] for t in BATCH_TERMS if t in scib.get(method, {})]
        if len(terms) == len(BATCH_TERMS):
            row["scib_batch"] = float(np.mean(terms))
            row["scib_batch_without_pcr"] = float(np.mean(terms[:-1]))
            row["pcr_comparison"] = float(terms[-1])
        out[method] = row
    r2_pca = out["pca"]["pcr_batch_r2"]  # scIB's R²_pre: the unintegrated PCA
    for row in out.values():
        row["pcr_comparison_ceiling"] = max(
            0.0, (r2_pca - row["pcr_batch_r2_composition_only"]) / r2_pca)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    args = ap.parse_args()
    for name in args.datasets.split(","):
        runs = sorted((RUNS / name).glob("seed*"))
        runs = [r for r in runs if (r / "embeddings.h5ad").exists()]
        if not runs:
            print(f"{name}: no cached quality run under {RUNS / name}; run quality.py first")
            continue
        per_seed = [seed_rows(r, DATASETS[name.split("~")[0]]) for r in runs]
        result: dict = {"_run": {"seeds": [r.name for r in runs]}, **aggregate(per_seed)}
        merge_json(RESULTS / "batch_pcr.json", {name: result})
        print(f"== {name} ({len(runs)} seeds)")
        metrics = ["pcr_batch_r2", "pcr_batch_r2_type_means", "pcr_batch_r2_within_type",
                   "pcr_batch_r2_composition_only", "pcr_type_r2", "pcr_comparison",
                   "pcr_comparison_ceiling", "scib_batch", "scib_batch_without_pcr"]
        print(f"{'method':10s} " + " ".join(f"{m.removeprefix('pcr_'):>24s}" for m in metrics))
        for method, row in result.items():
            if method.startswith("_"):
                continue
            print(f"{method:10s} " + " ".join(
                f"{row[m]['mean']:24.4f}" if m in row else f"{'-':>24s}" for m in metrics))


if __name__ == "__main__":
    main()
