"""One scoring harness for every method: scIB, scGraph and the embedding probes, with the bad
input (singleton labels, a label missing in a study, one batch only) turned into warnings.

Each metric family runs on its own; a family that cannot run on the input (or fails) leaves
its metrics out and adds a warning naming the reason, so that a report never holds a silent NaN:
:func:`clean_scores` moves any NaN into the warnings list.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import anndata as ad
import numpy as np
import pandas as pd

from scproto_scale.evaluate.probes import embedding_probes


def input_warnings(labels: np.ndarray, batches: np.ndarray, studies: np.ndarray | None = None
                   ) -> list[str]:
    """Plain-language warnings about evaluation input that limits some metrics.

    Args:
        labels: ``(n,)`` cell types; batches: ``(n,)`` batches; studies: ``(n,)`` or None.

    Returns:
        One message per problem: singleton labels, a label absent from some batch (for types
        with ≥ 10 cells), a single batch (batch metrics undefined), a single study.
    """
    out = []
    lab = pd.Series(np.asarray(labels).astype(str))
    counts = lab.value_counts()
    single = sorted(counts[counts == 1].index)
    if single:
        out.append(f"cell types with a single cell: {single} (left out of the kNN / linear "
                   "probes; isolated-label scores rest on one cell)")
    bat = pd.Series(np.asarray(batches).astype(str))
    if bat.nunique() < 2:
        out.append(f"only one batch ({bat.iloc[0]!r}): batch-correction metrics (scib_batch, "
                   "scib_total) are undefined and left out")
    else:
        tab = pd.crosstab(lab, bat)
        for t in counts[counts >= 10].index:
            missing = sorted(tab.columns[tab.loc[t] == 0])
            if missing:
                out.append(f"cell type {t!r} is absent from batches {missing} (scGraph uses "
                           "only the batches where it occurs)")
    if studies is not None and pd.Series(np.asarray(studies).astype(str)).nunique() < 2:
        out.append("only one study: cross-study metacell mixing is 0 by construction")
    return out


def _family(name: str, fn: Callable[[], dict], notes: list[str]) -> dict:
    """Run one metric family; record its warnings and turn a failure into a warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn()
        except Exception as e:  # a metric library failing on odd input must not stop the report
            notes.append(f"{name} not computed: {type(e).__name__}: {e}")
            result = {}
    for w in caught:
        if issubclass(w.category, UserWarning | RuntimeWarning):
            notes.append(f"{name}: {w.message}")
    return result


def score_embeddings(cells: ad.AnnData, counts: ad.AnnData | None, methods: dict[str, str],
                     batch_key: str, label_key: str, unintegrated_key: str, seed: int,
                     scib: bool = True, scgraph: bool = True, probes: bool = True
                     ) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Score several embeddings of the same cells with exactly the same code.

    Args:
        cells: ``(n, ·)`` AnnData with obs ``batch_key``, ``label_key`` and the embeddings in
            obsm (never under ``"X_pca"``).
        counts: the same cells' raw counts (for scGraph's per-batch PCA reference) or None.
        methods: method name → obsm key.
        unintegrated_key: obsm key of the unintegrated PCA (scIB's PCR reference).
        seed: seed of the probes' folds.

    Returns:
        ``({method: {metric: value}}, warnings)``: scIB metrics with ``scib_batch``,
        ``scib_bio``, ``scib_total`` (BRAS for batch), ``scgraph_rank``, ``scgraph_corr``,
        ``scgraph_corr_weighted``, ``knn_f1``, ``linear_f1``; no NaN (see :func:`clean_scores`).
    """
    from scproto_scale.evaluate.scgraph import scgraph as scgraph_fn
    from scproto_scale.evaluate.scib import scib_scores

    notes = input_warnings(cells.obs[label_key].to_numpy(), cells.obs[batch_key].to_numpy())
    sub = cells.copy()
    sub.obs[batch_key] = sub.obs[batch_key].astype(str).astype("category")
    sub.obs[label_key] = sub.obs[label_key].astype(str).astype("category")
    n_batches = sub.obs[batch_key].nunique()
    scores: dict[str, dict[str, float]] = {m: {} for m in methods}
    keys = list(methods.values())
    if scib:
        res = _family("scIB", lambda: scib_scores(sub, batch_key, label_key, keys,
                                                  unintegrated_key, batch_metrics=n_batches > 1),
                      notes)
        for m, k in methods.items():
            scores[m].update(res.get(k, {}))
    if scgraph and counts is not None:
        cnt = ad.AnnData(X=counts.X, obs=sub.obs, obsm=dict(sub.obsm))
        res = _family("scGraph", lambda: scgraph_fn(cnt, keys, batch_key, label_key), notes)
        for m, k in methods.items():
            scores[m].update({f"scgraph_{name}": v for name, v in res.get(k, {}).items()})
    if probes:
        labels = sub.obs[label_key].to_numpy()
        for m, k in methods.items():
            scores[m].update(_family(f"probes {m}", lambda k=k, m=m: embedding_probes(
                sub.obsm[k], labels, seed, what=m), notes))
    return clean_scores(scores, notes), notes


def clean_scores(scores: dict[str, dict], notes: list[str]) -> dict[str, dict]:
    """Drop NaN / infinite metrics, recording each in ``notes`` (no silent NaN downstream)."""
    out: dict[str, dict] = {}
    for method, metrics in scores.items():
        out[method] = {}
        for name, v in metrics.items():
            if isinstance(v, float | np.floating) and not math.isfinite(float(v)):
                notes.append(f"{method}: {name} is undefined on this input (NaN) and left out")
                continue
            out[method][name] = float(v) if isinstance(v, float | np.floating) else v
    return out
