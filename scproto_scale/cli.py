"""``scproto-scale``: a thin command line over the pipelines."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from scproto_scale.errors import ScprotoInputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Atlas-scale scProto: prototype learning for single-cell transcriptomics.")
console = Console(stderr=True)


def _fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
def simulate(
    out: Annotated[Path, typer.Option("--out", help="target .h5ad")],
    n_cells: int = 10_000, n_genes: int = 2_000, n_studies: int = 4, n_cell_types: int = 8,
    seed: int = 0,
) -> None:
    """Write the synthetic multi-study atlas (negative-binomial counts, study effects, a rare type)."""
    from scproto_scale.simulate import write_simulated_atlas

    try:
        path = write_simulated_atlas(out, n_cells=n_cells, n_genes=n_genes, n_studies=n_studies,
                                     n_cell_types=n_cell_types, seed=seed)
    except (ValueError, ScprotoInputError) as e:
        _fail(e)
    console.print(f"wrote {path}")


@app.command("ingest")
def ingest_cmd(
    input: Annotated[Path, typer.Argument(help="input .h5ad (X = counts)")],
    to: Annotated[Path, typer.Option("--to", help="target store (.zarr or .soma)")],
    format: Annotated[str | None, typer.Option(help="zarr | soma (default: from suffix)")] = None,
    chunk_size: int = 10_000, overwrite: bool = False,
) -> None:
    """Convert an h5ad file to an AnnData zarr (v3) store or a TileDB-SOMA experiment, in chunks."""
    from scproto_scale.data.ingest import ingest

    try:
        path = ingest(input, to, fmt=format, chunk_size=chunk_size, overwrite=overwrite)
    except ScprotoInputError as e:
        _fail(e)
    console.print(f"wrote {path}")


@app.command("prepare")
def prepare_cmd(
    store: Annotated[Path, typer.Argument(help="zarr or SOMA store")],
    batch_key: Annotated[str, typer.Option(help="obs column of the study / batch")],
    out: Annotated[Path | None, typer.Option(help="default: STORE.prepared beside the store")] = None,
    n_top_genes: int = 2000, n_pcs: int = 50, n_neighbors: int = 50, seed: int = 0,
    overwrite: bool = False,
) -> None:
    """HVG (batch-aware seurat_v3), PCA and the FAISS KNN table, saved beside the store."""
    from scproto_scale.config import PrepareConfig
    from scproto_scale.data.store import open_store
    from scproto_scale.prepare.run import prepare

    try:
        s = open_store(store)
        cfg = PrepareConfig(n_top_genes=n_top_genes, n_pcs=n_pcs, n_neighbors=n_neighbors)
        p = prepare(s, out or store.with_name(store.name + ".prepared"), batch_key, cfg,
                    seed=seed, overwrite=overwrite)
    except ScprotoInputError as e:
        _fail(e)
    console.print(f"prepared {p.meta['n_cells']} cells, {len(p.genes)} genes → {p.path}")


# Options shared by the commands that run the atlas job.
OutDir = Annotated[Path, typer.Option("--out", help="output directory")]
Overrides = Annotated[list[str] | None,
                      typer.Option("--set", help="override, e.g. train.epochs=5")]
Fresh = Annotated[bool, typer.Option(help="recompute every stage instead of resuming")]
Workers = Annotated[int | None, typer.Option(help="DDP workers (Ray Train when > 1)")]
RayAddress = Annotated[str | None, typer.Option(help='existing Ray cluster, e.g. "auto"')]


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/)")],
    out: OutDir,
    set_: Overrides = None,
    fresh: Fresh = False,
    workers: Workers = None,
    ray_address: RayAddress = None,
) -> None:
    """The whole job: ingest → prepare → train → export atlas → evaluate (report in OUT)."""
    from pipelines.atlas_job import run as run_job

    report = _run_job(run_job, config, set_, workers, ray_address, out, resume=not fresh)
    if report is not None:  # torchrun: only rank 0 evaluates
        _summary(report)
        console.print(f"report: {out / 'report.md'}")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config")],
    out: OutDir,
    set_: Overrides = None,
    resume: Annotated[bool, typer.Option(help="continue from the last checkpoint")] = False,
    workers: Workers = None,
    ray_address: RayAddress = None,
) -> None:
    """Ingest, prepare and train, then export the prototype atlas to OUT/atlas (no evaluation).

    Distributed: ``--workers N`` trains on N Ray Train workers on this machine (or on the
    cluster of ``--ray-address``); under ``torchrun --nproc_per_node N -m scproto_scale.cli
    train …`` every rank trains and rank 0 exports.
    """
    from pipelines.atlas_job import run as run_job

    report = _run_job(run_job, config, (set_ or []) + ["evaluate.enabled=false"], workers,
                      ray_address, out, resume=resume)
    if report is not None:
        console.print(f"atlas: {out / 'atlas'}")


@app.command()
def census(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/census_*.yaml)")],
    out: OutDir,
    set_: Overrides = None,
    fresh: Fresh = False,
    workers: Workers = None,
    ray_address: RayAddress = None,
) -> None:
    """Train an atlas on a CELLxGENE Census slice (obs value_filter, genes by feature_id, study =
    dataset_id): prepare → train → export → evaluate, as `run`."""
    from pipelines.census import run_census
    from scproto_scale.config import CensusRunConfig

    report = _run_job(run_census, config, set_, workers, ray_address, out, resume=not fresh,
                      model=CensusRunConfig)
    if report is not None:
        _summary(report)
        console.print(f"atlas: {out / 'atlas'}")


def _run_job(job, path: Path, overrides: list[str] | None, workers: int | None,
             ray_address: str | None, out: Path, resume: bool, model=None) -> dict | None:
    """Load the config (``--workers`` / ``--ray-address`` folded into it) and run ``job``;
    input errors exit with their message. Returns the report (None off rank 0 / no evaluation)."""
    from scproto_scale.config import RunConfig, load_config

    extra = [f"distributed.workers={workers}"] if workers is not None else []
    extra += [f"distributed.ray_address={ray_address}"] if ray_address else []
    try:
        cfg = load_config(path, (overrides or []) + extra, model=model or RunConfig)
        return job(cfg, out, resume=resume, console=console)
    except ScprotoInputError as e:
        _fail(e)


@app.command()
def embed(
    atlas: Annotated[Path, typer.Argument(help="prototype atlas directory")],
    input: Annotated[Path, typer.Argument(help="zarr or SOMA store, or h5ad file (X = counts)")],
    batch_key: Annotated[str, typer.Option(help="obs column of the study")],
    out: Annotated[Path | None, typer.Option(
        "--out", help="new .h5ad or .zarr with the results (default: write into the store)")] = None,
    work_dir: Annotated[Path | None, typer.Option(
        help="chunk results and progress (default: INPUT.embed beside the input)")] = None,
    chunk_size: int = 8192,
    workers: Annotated[int, typer.Option(help="Ray actors over chunk ranges")] = 1,
    ray_address: Annotated[str | None, typer.Option(help='existing Ray cluster, e.g. "auto"')] = None,
    min_overlap: Annotated[float, typer.Option(help="refuse below this atlas-gene overlap")] = 0.8,
    obs_filter: Annotated[str | None, typer.Option(
        help="SOMA obs value_filter, e.g. \"is_primary_data == True\"")] = None,
    fresh: Annotated[bool, typer.Option(help="discard partial results in the work directory")] = False,
) -> None:
    """Stream cells through the frozen atlas: obsm X_scproto, obs scproto_prototype /
    scproto_confidence and, when the atlas has prototype labels, scproto_label /
    scproto_label_uncertainty. Chunked and resumable: rerun the same command after an
    interruption. Gene overlap report: WORK/genes.json.
    """
    from scproto_scale.atlas.embed_job import EmbedJob, run_embed
    from scproto_scale.config import EmbedConfig
    from scproto_scale.data.ingest import ingest
    from scproto_scale.data.store import detect_format

    try:
        cfg = EmbedConfig(batch_key=batch_key, chunk_size=chunk_size, workers=workers,
                          ray_address=ray_address, min_overlap=min_overlap)
        work = work_dir or input.with_name(input.name + ".embed")
        fmt = detect_format(input)
        store = input
        if fmt == "h5ad":
            if out is None:
                raise ScprotoInputError(f"{input} is an h5ad file: give --out (results are not "
                                        "written into h5ad inputs)")
            store = work / "store.zarr"
            if not store.exists():
                ingest(input, store, fmt="zarr")
        opts = {"obs_value_filter": obs_filter} if obs_filter else {}
        if obs_filter and fmt != "soma":
            raise ScprotoInputError("--obs-filter applies to SOMA experiments only")
        summary = run_embed(EmbedJob(str(atlas), str(store), str(work), cfg, opts), out,
                            fresh=fresh)
    except ScprotoInputError as e:
        _fail(e)
    console.print(summary)
    console.print(f"wrote {summary['target']}")


@app.command("map-query")
def map_query(
    atlas: Annotated[Path, typer.Argument(help="reference prototype atlas directory")],
    input: Annotated[Path, typer.Argument(help="query zarr / SOMA store or h5ad (X = counts)")],
    batch_key: Annotated[str, typer.Option(help="obs column of the study")],
    out: Annotated[Path, typer.Option("--out", help="the extended atlas directory")],
    epochs: Annotated[int, typer.Option(help="surgery epochs (0: untrained new rows)")] = 20,
    lr: float = 5e-3, lambda_swav: float = 0.0, seed: int = 0,
) -> None:
    """scArches surgery: add the query's unseen studies to the atlas and train only their
    condition-embedding rows and θ columns (the reference part stays bit-identical).
    Then `scproto-scale embed OUT INPUT` maps the query with them."""
    import anndata as ad

    from scproto_scale.atlas.atlas import PrototypeAtlas
    from scproto_scale.atlas.surgery import train_query_studies
    from scproto_scale.config import SurgeryConfig
    from scproto_scale.data.ingest import ingest
    from scproto_scale.data.store import detect_format, open_store

    try:
        ref = PrototypeAtlas.load(atlas)
        store_path = input
        if detect_format(input) == "h5ad":
            store_path = out.with_name(out.name + ".query.zarr")
            if not store_path.exists():
                ingest(input, store_path, fmt="zarr")
        cfg = SurgeryConfig(epochs=epochs, lr=lr, lambda_swav=lambda_swav)
        new, history = train_query_studies(ref, open_store(store_path), batch_key, cfg, seed=seed)
        mc = atlas / "metacells.h5ad"  # prototypes are unchanged: keep the reference metacells
        new.save(out, ad.read_h5ad(mc) if mc.exists() else None)
    except ScprotoInputError as e:
        _fail(e)
    console.print({"new_studies": new.meta["surgery"]["new_studies"],
                   "final_loss": history[-1]["loss"] if history else None})
    console.print(f"wrote {out}")


@app.command()
def cluster(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/cluster/*.yaml)")],
    out: Annotated[Path, typer.Option("--out", help="output .h5ad (obs scgpcl_cluster) + .json")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. scgpcl.pretrain_epochs=5")] = None,
) -> None:
    """scGPCL clustering: contrastive + prototypical pre-training, DEC fine-tuning."""
    from scproto_scale.companion.cluster_job import run_cluster
    from scproto_scale.config import ClusterJobConfig, load_config

    try:
        cfg = load_config(config, set_, model=ClusterJobConfig)
        summary = run_cluster(cfg, out)
    except ScprotoInputError as e:
        _fail(e)
    console.print({k: summary[k] for k in ("n_cells", "n_clusters", "scores", "pretrain_epochs",
                                           "dec_epochs", "wall_s")})
    console.print(f"wrote {out}")


@app.command()
def annotate(
    reference: Annotated[Path, typer.Argument(help="labelled h5ad with the embedding in obsm")],
    query: Annotated[Path, typer.Argument(help="h5ad to annotate (same embedding in obsm)")],
    label_key: Annotated[str, typer.Option(help="obs column of cell types in the reference")],
    embedding: Annotated[str, typer.Option(help="obsm key of the frozen embedding, e.g. X_scproto")],
    out: Annotated[Path, typer.Option("--out", help="output .h5ad: obs annotation / annotation_confidence")],
    head: Annotated[str, typer.Option(help="none | mlp_cl | mls_cl")] = "mlp_cl",
    classifier: Annotated[str, typer.Option(help="logreg | mlp")] = "logreg",
    epochs: int = 100, seed: int = 0,
) -> None:
    """Train a supervised contrastive head + classifier on the reference, label the query."""
    import anndata as ad
    from pydantic import ValidationError

    from scproto_scale.companion.annotate import Annotator
    from scproto_scale.config import AnnotateHeadConfig
    from scproto_scale.data.writers import write_h5ad_atomic

    try:
        try:
            cfg = AnnotateHeadConfig(head=head, classifier=classifier, epochs=epochs)
        except ValidationError as e:
            raise ScprotoInputError(f"bad option: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None
        ref, qry = ad.read_h5ad(reference), ad.read_h5ad(query)
        for name, a in (("reference", ref), ("query", qry)):
            if embedding not in a.obsm:
                raise ScprotoInputError(f"{name} has no obsm[{embedding!r}] (has {list(a.obsm)})")
        if label_key not in ref.obs.columns:
            raise ScprotoInputError(f"reference has no obs column {label_key!r}")
        if ref.obsm[embedding].shape[1] != qry.obsm[embedding].shape[1]:
            raise ScprotoInputError(f"obsm[{embedding!r}] has {ref.obsm[embedding].shape[1]} dims in the "
                                    f"reference but {qry.obsm[embedding].shape[1]} in the query")
        ann = Annotator(cfg, seed=seed).fit(np.asarray(ref.obsm[embedding]), ref.obs[label_key].to_numpy())
        proba = ann.predict_proba(np.asarray(qry.obsm[embedding]))
        qry.obs["annotation"] = ann.classes_[proba.argmax(1)]
        qry.obs["annotation_confidence"] = proba.max(1)
        if label_key in qry.obs.columns:
            console.print(ann.score(np.asarray(qry.obsm[embedding]), qry.obs[label_key].to_numpy()))
        write_h5ad_atomic(qry, out)
    except ScprotoInputError as e:
        _fail(e)
    console.print(f"wrote {out}")


def _summary(report: dict) -> None:
    from rich.table import Table

    methods = report.get("methods", {})
    if methods:
        table = Table(title="atlas quality")
        table.add_column("metric")
        for m in methods:
            table.add_column(m, justify="right")
        for metric in ("scib_total", "scib_batch", "scib_bio", "scgraph_corr_weighted"):
            table.add_row(metric, *(f"{methods[m].get(metric, float('nan')):.3f}" for m in methods))
        console.print(table)
    mc = report.get("metacells", {})
    console.print({k: v for k, v in mc.items() if not isinstance(v, dict | list)})
    console.print(f"runtime {report.get('runtime_s', 0):.0f}s")


def main() -> None:  # pragma: no cover
    app(prog_name="scproto-scale")
    sys.exit(0)


if __name__ == "__main__":  # torchrun -m scproto_scale.cli …
    app()
