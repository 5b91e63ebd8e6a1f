"""Train a prototype atlas on the CELLxGENE Census (or a SOMA experiment with its schema).

The Census is a TileDB-SOMA experiment: measurement ``RNA``, X layer ``raw``, var
``feature_id`` (Ensembl) / ``feature_name``, obs ``dataset_id``, ``assay``, ``tissue``,
``cell_type``, ``is_primary_data``. This pipeline opens it with
``cellxgene_census.open_soma(census_version=…)`` (the ``[census]`` extra, imported only here),
selects cells with an obs ``value_filter`` and genes by ``feature_id``, uses ``dataset_id`` (or
any obs column) as the study, and then runs the ordinary job — prepare, train on the configured
launcher (in-process, torchrun or Ray Train), export, evaluate — over a
:class:`~scproto_scale.data.soma_store.SomaCellStore` of that query. Every training worker
reopens the same query from plain options (URI, filter, genes, TileDB config), so a multi-node
Ray job reads the Census directly from S3 on each node.

With ``census.uri`` set, a local SOMA experiment with the Census schema is used instead; the
code path is otherwise identical (that is how it is tested without network).
"""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console

from pipelines.atlas_job import run
from scproto_scale.config import CensusConfig, CensusRunConfig, DataConfig, RunConfig
from scproto_scale.errors import ScprotoInputError
from scproto_scale.evaluate.report import write_json

log = logging.getLogger(__name__)


def census_source(cfg: CensusConfig) -> tuple[str, dict]:
    """The experiment URI and the store options selecting the configured cells and genes.

    Returns:
        ``(uri, options)`` for :class:`~scproto_scale.data.soma_store.SomaCellStore`.

    Raises:
        ScprotoInputError: ``cellxgene_census`` missing (install the ``[census]`` extra), an
            unknown organism, or an unreadable genes file.
    """
    genes = cfg.genes
    if cfg.genes_file is not None:
        p = Path(cfg.genes_file)
        if not p.exists():
            raise ScprotoInputError(f"census.genes_file not found: {p}")
        genes = [g for g in p.read_text().split() if g]
    opts: dict = {"measurement": cfg.measurement, "layer": cfg.layer,
                  "var_id_column": "feature_id", "obs_value_filter": cfg.obs_value_filter,
                  "genes": genes}
    if cfg.uri is not None:
        return cfg.uri, opts
    try:
        import cellxgene_census
    except ImportError as e:
        raise ScprotoInputError(
            "census.uri is not set and cellxgene_census is not installed: "
            "pip install -e '.[census]' (needs network access to the Census)") from e
    with cellxgene_census.open_soma(census_version=cfg.census_version) as census:
        data = census["census_data"]
        if cfg.organism not in data:
            raise ScprotoInputError(f"census {cfg.census_version}: no organism {cfg.organism!r}; "
                                    f"found {list(data.keys())}")
        uri = data[cfg.organism].uri
        opts["tiledb_config"] = {k: v for k, v in census.context.tiledb_config.items()
                                 if isinstance(v, str | int | float | bool)}
    log.info("census %s: %s", cfg.census_version, uri)
    return uri, opts


def to_run_config(cfg: CensusRunConfig, uri: str) -> RunConfig:
    """The ordinary job config over the Census query (study = ``census.study_key``)."""
    return RunConfig(
        seed=cfg.seed,
        data=DataConfig(path=uri, batch_key=cfg.census.study_key, label_key=cfg.census.label_key,
                        store_format="soma"),
        prepare=cfg.prepare, model=cfg.model, train=cfg.train, distributed=cfg.distributed,
        evaluate=cfg.evaluate)


def run_census(cfg: CensusRunConfig, out: str | Path, resume: bool = True,
               console: Console | None = None) -> dict | None:
    """Prepare, train (configured launcher), export and evaluate an atlas on a Census slice.

    Args:
        cfg: :class:`CensusRunConfig`.
        out: output directory (the same layout as ``scproto-scale run``; no store copy).
        resume: reuse finished stages and continue from the last checkpoint.

    Returns:
        The report (None on torchrun ranks > 0).

    Raises:
        ScprotoInputError: see :func:`census_source`; a filter matching no cell; unknown study
            or label column; unknown feature_ids.
    """
    uri, opts = census_source(cfg.census)
    report = run(to_run_config(cfg, uri), out, resume=resume, console=console,
                 store_options=opts)
    if report is not None:
        report["census"] = {"census_version": cfg.census.census_version if cfg.census.uri is None
                            else None, "uri": uri, "obs_value_filter": cfg.census.obs_value_filter,
                            "n_genes_requested": len(opts["genes"]) if opts["genes"] else None,
                            "study_key": cfg.census.study_key}
        write_json(report, Path(out) / "report.json")
    return report
