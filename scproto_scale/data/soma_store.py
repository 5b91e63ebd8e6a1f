"""TileDB-SOMA experiments read as a :class:`CellStore` (the CELLxGENE Census layout).

Rows are positions into the experiment's obs ``soma_joinid`` (sorted); columns are positions
into the measurement's var. Reads pass the sorted ``soma_joinid`` array as point coordinates,
one request per batch (tiledbsoma takes a point array or a single slice, not a list of slices).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import tiledbsoma

from scproto_scale.data.store import CellStore
from scproto_scale.data.validate import check_unique_genes
from scproto_scale.errors import ScprotoInputError


class SomaCellStore(CellStore):
    """A :class:`CellStore` over a TileDB-SOMA experiment.

    Args:
        path: experiment URI (a local directory here).
        measurement: measurement name (Census: ``"RNA"``).
        layer: X layer with raw counts (Census: ``"raw"``).
        var_id_column: var column holding the gene ids (``"var_id"`` as written by
            ``tiledbsoma.io.from_h5ad``; Census: ``"feature_id"``).
        obs_value_filter: a SOMA ``value_filter`` on obs (e.g. ``"is_primary_data == True and
            tissue == 'blood'"``): the store's rows are the matching cells only, as in a Census
            ``axis_query``.
        genes: keep only these gene ids, in this order (a Census ``var_query`` by
            ``feature_id``); ids the experiment lacks are an error naming them.
        tiledb_config: TileDB configuration of the context (e.g. the Census's anonymous S3
            access: ``vfs.s3.region``, ``vfs.s3.no_sign_request``); plain values, so that a
            training job can reopen the same store on every worker.

    Raises:
        ScprotoInputError: unknown measurement, layer or var column; duplicate gene ids; a
            filter that matches no cell or is invalid; unknown genes.
    """

    def __init__(
        self,
        path: str | Path,
        measurement: str = "RNA",
        layer: str = "raw",
        var_id_column: str | None = None,
        obs_value_filter: str | None = None,
        genes: list[str] | None = None,
        tiledb_config: dict | None = None,
    ):
        self.uri = str(path)  # may be remote (s3://…): Path() would mangle it
        self.path = Path(path)
        context = (tiledbsoma.SOMATileDBContext(tiledb_config=dict(tiledb_config))
                   if tiledb_config else None)
        self._exp = tiledbsoma.Experiment.open(self.uri, context=context)
        if measurement not in self._exp.ms:
            raise ScprotoInputError(
                f"SOMA experiment {self.path} has no measurement {measurement!r}; "
                f"found {list(self._exp.ms.keys())}"
            )
        ms = self._exp.ms[measurement]
        if layer not in ms.X:
            raise ScprotoInputError(
                f"SOMA experiment {self.path}: measurement {measurement!r} has no X layer "
                f"{layer!r}; found {list(ms.X.keys())}"
            )
        self._X = ms.X[layer]
        var = ms.var.read().concat().to_pandas().sort_values("soma_joinid")
        if var_id_column is None:
            var_id_column = next((c for c in ("var_id", "feature_id") if c in var.columns), None)
        if var_id_column not in var.columns:
            raise ScprotoInputError(
                f"SOMA experiment {self.path}: var column {var_id_column!r} not found; "
                f"columns: {list(var.columns)}"
            )
        var.index = pd.Index(var[var_id_column].astype(str).to_numpy(), name=None)
        check_unique_genes(var.index, f"SOMA experiment {self.path} (var[{var_id_column!r}])")
        if genes is not None:
            missing = pd.Index(genes).difference(var.index)
            if len(missing):
                raise ScprotoInputError(
                    f"SOMA experiment {self.path}: {len(missing)} of {len(genes)} requested genes "
                    f"not in var[{var_id_column!r}], e.g. {list(missing[:5])}")
            var = var.loc[list(genes)]
        self._var = var
        # Map var soma_joinid → column position (joinids need not be 0..n-1).
        var_joinids = var["soma_joinid"].to_numpy()
        self._var_pos = np.full(int(var_joinids.max()) + 1, -1, dtype=np.int64)
        self._var_pos[var_joinids] = np.arange(len(var_joinids))
        self._var_coords = np.sort(var_joinids) if genes is not None else slice(None)
        try:
            obs = self._exp.obs.read(column_names=["soma_joinid"], value_filter=obs_value_filter)
            self._obs_joinids = np.sort(obs.concat()["soma_joinid"].to_numpy())
        except Exception as exc:  # tiledbsoma raises its own error types for bad filters
            raise ScprotoInputError(
                f"SOMA experiment {self.path}: invalid obs value_filter {obs_value_filter!r}: "
                f"{exc}") from exc
        if len(self._obs_joinids) == 0:
            raise ScprotoInputError(
                f"SOMA experiment {self.path}: obs value_filter {obs_value_filter!r} matches no cell")
        self._obs_schema = [f.name for f in self._exp.obs.schema]
        self._lock = threading.Lock()

    @property
    def n_obs(self) -> int:
        return len(self._obs_joinids)

    @property
    def var(self) -> pd.DataFrame:
        return self._var

    @property
    def obs_joinids(self) -> np.ndarray:
        """``(n_obs,)`` int64 ``soma_joinid`` of each row position."""
        return self._obs_joinids

    def obs_columns(self) -> list[str]:
        return [c for c in self._obs_schema if c != "soma_joinid"]

    def _read_obs_column(self, key: str) -> pd.Series:
        df = self._exp.obs.read(column_names=["soma_joinid", key]).concat().to_pandas()
        df = df.set_index("soma_joinid").reindex(self._obs_joinids)
        return df[key].reset_index(drop=True).rename(key)

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return sp.csr_matrix((0, self.n_vars), dtype=np.float32)
        if rows[0] < 0 or rows[-1] >= self.n_obs:
            raise IndexError(f"row index out of range [0, {self.n_obs}) in {self.path}")
        joinids = self._obs_joinids[rows]
        contiguous = joinids[-1] - joinids[0] + 1 == len(joinids)
        coords = slice(int(joinids[0]), int(joinids[-1])) if contiguous else joinids
        with self._lock:  # one reader at a time on the shared handle (loader threads)
            tbl = self._X.read(coords=(coords, self._var_coords)).tables().concat()
        obs_j = tbl["soma_dim_0"].to_numpy()
        var_j = tbl["soma_dim_1"].to_numpy()
        vals = tbl["soma_data"].to_numpy().astype(np.float32, copy=False)
        r = np.searchsorted(joinids, obs_j)
        c = self._var_pos[var_j]
        m = sp.coo_matrix((vals, (r, c)), shape=(len(rows), self.n_vars)).tocsr()
        m.sum_duplicates()
        m.sort_indices()
        return m

    def close(self) -> None:
        """Close the underlying experiment handle."""
        self._exp.close()
