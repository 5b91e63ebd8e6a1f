"""The evaluation report: ``report.json``, ``report.md`` and ``umap.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

HEADLINE = ["scib_total", "scib_batch", "scib_bio", "scgraph_rank", "scgraph_corr",
            "scgraph_corr_weighted"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def write_markdown(report: dict, path: Path) -> None:
    """A human-readable summary of ``report`` (methods × metrics, metacells, timings)."""
    methods = report.get("methods", {})
    lines = [f"# scProto atlas report: {report.get('dataset', '')}", "",
             f"{report.get('n_cells', '?')} cells, {report.get('n_studies', '?')} studies, "
             f"seed {report.get('seed')}, runtime {report.get('runtime_s', 0):.0f} s.", ""]
    lines += [f"**Warning:** {w}" for w in report.get("warnings", [])]
    use = report.get("prototype_usage")
    if use:
        lines += [f"Prototypes used by the cells: {use['used']} (perplexity {use['perplexity']}); "
                  f"mean resultant length of the unit embeddings {use['mean_resultant']}."]
        if "used_by_posterior_samples" in use:
            lines += [f"Prototypes nearest to one posterior sample per cell (what training "
                      f"scores): {use['used_by_posterior_samples']}."]
        lines += [""]
    if methods:
        metrics = HEADLINE + sorted({m for v in methods.values() for m in v} - set(HEADLINE))
        lines += ["| metric | " + " | ".join(methods) + " |",
                  "|---|" + "---:|" * len(methods)]
        for m in metrics:
            lines.append(f"| {m} | " + " | ".join(_fmt(methods[k].get(m, float("nan")))
                                                  for k in methods) + " |")
        lines.append("")
        lines.append("scIB: scib-metrics Benchmarker, unscaled; batch correction uses BRAS. "
                     "scGraph: Islander algorithm (method.md §9).")
        lines.append("")
    mc = report.get("metacells", {})
    if mc:
        lines += ["## Metacells", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in mc.items() if not isinstance(v, dict)]
        lines.append("")
    if report.get("stages_s"):
        lines += ["## Stage timings (s)", ""]
        lines += [f"- {k}: {v:.1f}" for k, v in report["stages_s"].items()]
        lines.append("")
    lines += ["![UMAP of cells and prototypes](umap.png)", ""]
    path.write_text("\n".join(lines))


def write_json(report: dict, path: Path) -> None:
    """``report`` as JSON; NaN becomes null so that the file is strict JSON."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return clean(v.item())
        return v
    path.write_text(json.dumps(clean(report), indent=1))


def plot_umap(cells_xy: np.ndarray, proto_xy: np.ndarray, labels: np.ndarray | None,
              studies: np.ndarray, path: Path, seed: int = 0) -> None:
    """Two panels of a UMAP: cells coloured by cell type and by study, prototypes overlaid.

    Args:
        cells_xy: ``(n, 2)`` cell coordinates; proto_xy: ``(K, 2)`` used prototypes.
        labels: ``(n,)`` cell types or None; studies: ``(n,)`` study names.
    """
    panels = [("study", studies)] if labels is None else [("cell type", labels), ("study", studies)]
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 6.5), squeeze=False)
    order = np.random.default_rng(seed).permutation(len(cells_xy))
    for ax, (title, values) in zip(axes[0], panels, strict=True):
        cat = pd.Categorical(np.asarray(values).astype(str))
        cmap = plt.get_cmap("tab20" if len(cat.categories) > 10 else "tab10")
        colors = cmap(cat.codes[order] % cmap.N)
        ax.scatter(cells_xy[order, 0], cells_xy[order, 1], c=colors, s=2, linewidths=0,
                   rasterized=True)
        ax.scatter(proto_xy[:, 0], proto_xy[:, 1], marker="x", c="black", s=14, linewidths=0.8,
                   label="prototypes")
        handles = [plt.Line2D([], [], marker="o", ls="", color=cmap(i % cmap.N), label=c)
                   for i, c in enumerate(cat.categories[:20])]
        handles.append(plt.Line2D([], [], marker="x", ls="", color="black", label="prototype"))
        ax.legend(handles=handles, fontsize=7, markerscale=1.2, loc="center left",
                  bbox_to_anchor=(1.0, 0.5), frameon=False)
        ax.set_title(f"scProto embedding — by {title}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
