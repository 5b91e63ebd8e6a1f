"""Align a dataset's genes to an atlas's gene list: by stable id (Ensembl), else by symbol.

Gene symbols change between annotation releases and collide across species (``CD4`` is a human
and, as ``Cd4``, a mouse gene), so the model's genes are matched by stable id first — Census
``feature_id``, an ``ensembl_id`` / ``gene_ids`` var column, or var names that are Ensembl ids —
and by symbol only when one side has no stable ids (with a warning). Missing model genes are
zero-filled by the caller (:func:`gene_selector`); below ``min_overlap`` the input is refused.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scproto_scale.errors import ScprotoInputError

# var columns holding stable gene ids (Census, scanpy/10x, the shared data sets) and symbols
STABLE_ID_COLUMNS = ("feature_id", "ensembl_id", "gene_ids", "gene_id")
SYMBOL_COLUMNS = ("feature_name", "gene_symbol", "gene_symbols", "symbol")
_ENSEMBL = re.compile(r"^(ENS[A-Z]*)\d{6,}(\.\d+)?$")


def looks_like_stable_ids(ids) -> bool:
    """True when most (≥ 90 %) of ``ids`` are Ensembl-style ids (``ENSG…``, ``ENSMUSG…``)."""
    ids = pd.Index(ids).astype(str)
    return len(ids) > 0 and float(np.mean([bool(_ENSEMBL.match(s)) for s in ids])) >= 0.9


def namespace(ids) -> str:
    """The id namespace: the most common Ensembl prefix (``ENSG`` human, ``ENSMUSG`` mouse…)
    or ``"symbols"``."""
    prefixes = Counter(m.group(1) for s in pd.Index(ids).astype(str)[:5000]
                       if (m := _ENSEMBL.match(s)))
    return prefixes.most_common(1)[0][0] if prefixes else "symbols"


def _strip_version(ids: pd.Index) -> pd.Index:
    return pd.Index([s.split(".", 1)[0] if _ENSEMBL.match(s) else s for s in ids.astype(str)])


def stable_ids(var: pd.DataFrame) -> tuple[pd.Index, str] | None:
    """The var rows' stable ids and where they came from (``"index"`` or a column), or None.

    Args:
        var: a var table (index = gene ids in column order).
    """
    if looks_like_stable_ids(var.index):
        return _strip_version(pd.Index(var.index)), "var index"
    for col in STABLE_ID_COLUMNS:
        if col in var.columns and looks_like_stable_ids(var[col].dropna()):
            return _strip_version(pd.Index(var[col].astype(str))), f"var[{col!r}]"
    return None


def model_stable_ids(var: pd.DataFrame, genes: list[str]) -> list[str] | None:
    """Stable ids of the model genes ``genes`` (ids of ``var``'s index), or None if var has none.

    Recorded in the atlas (``gene_stable_ids``) so that queries are matched by stable id even
    when the training store was indexed by symbol.
    """
    found = stable_ids(var)
    if found is None:
        return None
    ids, _ = found
    pos = pd.Index(var.index).get_indexer(pd.Index(genes))
    if (pos < 0).any():
        return None
    out = ids[pos]
    # every model gene needs its own valid id, else matching by id would merge or drop genes
    if out.duplicated().any() or not all(_ENSEMBL.match(s) for s in out.astype(str)):
        return None
    return [str(i) for i in out]


def symbols(var: pd.DataFrame) -> pd.Index:
    """The var rows' symbols: the index unless it holds stable ids, else a symbol column."""
    if not looks_like_stable_ids(var.index):
        return pd.Index(var.index.astype(str))
    for col in SYMBOL_COLUMNS:
        if col in var.columns:
            return pd.Index(var[col].astype(str))
    return pd.Index(var.index.astype(str))


def _positions(ids: pd.Index, wanted: pd.Index) -> np.ndarray:
    """Position in ``ids`` of each ``wanted`` id (first occurrence; −1 when absent)."""
    first = ~ids.duplicated()
    where = np.flatnonzero(first)
    pos = ids[first].get_indexer(wanted)
    return np.where(pos >= 0, where[np.maximum(pos, 0)], -1).astype(np.int64)


@dataclass
class GeneAlignment:
    """How a dataset's genes map onto the model's.

    Attributes:
        columns: ``(G,)`` int64 dataset column of each model gene, −1 where missing.
        method: ``"stable_id"`` or ``"symbol"``.
        n_model_genes, n_present: G and how many of them the dataset has.
        overlap: ``n_present / G``.
        missing: the missing model genes (ids as matched).
        source: the dataset's name; ``query_ids`` / ``model_ids``: where ids came from and
            their namespace.
    """

    columns: np.ndarray
    method: str
    n_model_genes: int
    n_present: int
    overlap: float
    missing: list[str] = field(default_factory=list)
    source: str = "input"
    query_ids: str = ""
    model_ids: str = ""

    def report(self) -> dict:
        """JSON-ready overlap report (every missing gene listed)."""
        d = asdict(self)
        d.pop("columns")
        d["n_missing"] = len(self.missing)
        return d

    def write_report(self, path: str | Path) -> Path:
        """Write :meth:`report` as JSON (temporary name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.report(), indent=1))
        tmp.replace(path)
        return path


def align_to_model(var: pd.DataFrame, genes: list[str], gene_ids: list[str] | None = None,
                   min_overlap: float = 0.8, source: str = "input") -> GeneAlignment:
    """Map the model's genes onto a dataset's columns, by stable id when both sides have them.

    Args:
        var: the dataset's var table (index = its gene ids, in column order).
        genes: the model's gene names as trained (length G).
        gene_ids: the model genes' stable ids (Ensembl), when known (atlas ``gene_stable_ids``);
            default: ``genes`` themselves if they are stable ids.
        min_overlap: refuse when fewer than this fraction of model genes are present.
        source: the dataset's name for messages and the report.

    Returns:
        :class:`GeneAlignment`.

    Raises:
        ScprotoInputError: overlap below ``min_overlap``; the message gives present / total,
            the percentage, the id namespaces of both sides (another species or gene namespace
            shows there) and example missing genes.
    """
    model = pd.Index(gene_ids if gene_ids is not None else genes).astype(str)
    query = stable_ids(var)
    if looks_like_stable_ids(model) and query is not None:
        method, model_ids, (qids, qsrc) = "stable_id", _strip_version(model), query
    else:
        method, qids = "symbol", symbols(var)
        qsrc = "var symbols"
        model_ids = pd.Index(genes).astype(str)
        if len(var):
            warnings.warn(f"{source}: genes matched by symbol ({'the atlas has' if query else 'the input has'} "
                          "no stable ids such as Ensembl feature_id); symbols are ambiguous across "
                          "annotation releases", stacklevel=2)
    cols = _positions(qids, model_ids)
    present = int((cols >= 0).sum())
    frac = present / max(1, len(model_ids))
    missing = [str(g) for g in model_ids[cols < 0]]
    al = GeneAlignment(cols, method, len(model_ids), present, frac, missing, source,
                       f"{qsrc} ({namespace(qids)})", f"{namespace(model_ids)}")
    if frac < min_overlap:
        raise ScprotoInputError(
            f"{source}: only {present}/{len(model_ids)} atlas genes ({frac:.1%}) found by "
            f"{method.replace('_', ' ')} in {qsrc}, below the required {min_overlap:.0%} "
            f"(input ids: {namespace(qids)}, atlas ids: {namespace(model_ids)}; another species "
            f"or gene namespace?); e.g. missing {missing[:5]}")
    if present < len(model_ids):
        warnings.warn(f"{source}: {len(model_ids) - present} of {len(model_ids)} atlas genes "
                      "missing; zero-filled", stacklevel=2)
    return al


def align_genes(var_names: pd.Index, genes: list[str], min_overlap: float = 0.8,
                source: str = "input") -> np.ndarray:
    """Columns of ``var_names`` holding each atlas gene (−1 where missing, zero-filled later).

    Exact id match on the names as given (the training path: model genes are the store's own
    ids). For a dataset from elsewhere use :func:`align_to_model`, which matches stable ids.

    Args:
        var_names: the dataset's gene ids.
        genes: the atlas's gene ids (model order).
        min_overlap: refuse when fewer than this fraction of atlas genes are present.
        source: name of the dataset for messages.

    Returns:
        ``(len(genes),)`` int64 column positions, −1 for missing genes.

    Raises:
        ScprotoInputError: overlap below ``min_overlap`` (the message gives the numbers).
    """
    pos = pd.Index(var_names).get_indexer(pd.Index(genes))
    present = int((pos >= 0).sum())
    frac = present / max(1, len(genes))
    if frac < min_overlap:
        raise ScprotoInputError(
            f"{source}: only {present}/{len(genes)} atlas genes ({frac:.1%}) found in var, "
            f"below the required {min_overlap:.0%}; e.g. missing {list(np.asarray(genes)[pos < 0][:5])}"
        )
    if present < len(genes):
        warnings.warn(f"{source}: {len(genes) - present} of {len(genes)} atlas genes missing; "
                      "zero-filled", stacklevel=2)
    return pos.astype(np.int64)


def gene_selector(columns: np.ndarray, n_vars: int) -> sp.csr_matrix:
    """``(n_vars, G)`` 0/1 matrix so that ``X @ S`` puts column ``columns[g]`` at ``g``
    (zeros where ``columns[g] == −1``)."""
    g = np.flatnonzero(columns >= 0)
    return sp.csr_matrix((np.ones(len(g), dtype=np.float32), (columns[g], g)),
                         shape=(n_vars, len(columns)))
