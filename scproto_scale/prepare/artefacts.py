"""The prepared artefacts saved beside a store, and their loader.

Layout of a prepare directory::

    prepare.json        config, versions, store path, genes, studies, dropped cells
    gene_stats.csv      per-gene statistics and the HVG flags (seurat_v3)
    library_size.npy    (n_obs,) float32 total counts per store row (all genes)
    study_codes.npy     (n_obs,) int32 code of each row's study (index into `studies`)
    cells.npy           (n,) int64 store rows kept for training (non-zero counts)
    pca.npy             (n, n_pcs) float32 PCA of the kept cells
    knn_indices.npy     (n, k) int32 store rows of each kept cell's neighbours
    knn_distances.npy   (n, k) float32 Euclidean distances in PCA space

and, when prepare wrote a training cache (:mod:`scproto_scale.prepare.cache`)::

    train_cache.zarr         (n, G) model-gene counts of the kept cells, locality-ordered
    cache_rows.npy           (n,) int64 store row of each cache row
    cache_knn_indices.npy    (n, k) int32 neighbours as cache rows
    cache_knn_distances.npy  (n, k) float32
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scproto_scale.errors import ScprotoInputError

FORMAT_VERSION = 1


@dataclass
class Prepared:
    """In-memory handle on a prepare directory (arrays memory-mapped)."""

    path: Path
    meta: dict
    gene_stats: pd.DataFrame
    library_size: np.ndarray
    study_codes: np.ndarray
    cells: np.ndarray
    pca: np.ndarray
    knn_indices: np.ndarray
    knn_distances: np.ndarray

    @property
    def has_cache(self) -> bool:
        """Whether a training cache was written."""
        return (self.path / "train_cache.zarr").exists() and bool(self.meta.get("training_cache"))

    def loader_source(self, store, cache_block: int = 64, cache_bytes: int = 256 << 20):
        """What the training loader reads: the cache when there is one, else the store.

        Args:
            store: the raw store the artefacts were made from.
            cache_block: chunk-level shuffle block (cells) over the cache.
            cache_bytes: decoded-chunk LRU budget of the cache reader, used only when the
                cache is not uncompressed zarr v3 (the cache this package writes is read
                with ``pread``: :mod:`scproto_scale.data.pread`).

        Returns:
            :class:`scproto_scale.prepare.cache.LoaderSource`.
        """
        from scproto_scale.data.zarr_store import ZarrCellStore
        from scproto_scale.prepare.cache import LoaderSource

        cells = np.asarray(self.cells)
        if not self.has_cache:
            return LoaderSource(store, cells, np.asarray(self.study_codes)[cells],
                                self.knn_indices, self.knn_distances, self.library_size,
                                self.study_codes, self.gene_columns)
        rows = np.load(self.path / "cache_rows.npy")
        cache = ZarrCellStore(self.path / "train_cache.zarr", cache_bytes=cache_bytes)
        study = np.asarray(self.study_codes)[rows]
        return LoaderSource(
            cache, np.arange(len(rows)), study,
            np.load(self.path / "cache_knn_indices.npy", mmap_mode="r"),
            np.load(self.path / "cache_knn_distances.npy", mmap_mode="r"),
            np.asarray(self.library_size)[rows], study, np.arange(cache.n_vars),
            block_size=cache_block)

    @property
    def genes(self) -> list[str]:
        """The selected gene ids (model gene list), in store column order."""
        return list(self.meta["genes"])

    @property
    def gene_columns(self) -> np.ndarray:
        """``(G,)`` int64 store columns of the selected genes."""
        return np.asarray(self.meta["gene_columns"], dtype=np.int64)

    @property
    def studies(self) -> list[str]:
        return list(self.meta["studies"])

    @classmethod
    def load(cls, path: str | Path) -> Prepared:
        """Open a prepare directory.

        Raises:
            ScprotoInputError: missing directory or files, or another format version.
        """
        p = Path(path)
        meta_file = p / "prepare.json"
        if not meta_file.exists():
            raise ScprotoInputError(
                f"no prepared artefacts at {p} (missing prepare.json); run `scproto-scale prepare`"
            )
        meta = json.loads(meta_file.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ScprotoInputError(
                f"{p}: prepare format {meta.get('format_version')} != {FORMAT_VERSION}; re-run prepare"
            )

        names = ["library_size", "study_codes", "cells", "pca", "knn_indices", "knn_distances"]
        missing = [f for f in ["gene_stats.csv", *(f"{n}.npy" for n in names)]
                   if not (p / f).exists()]
        if missing:
            raise ScprotoInputError(f"incomplete prepared artefacts at {p}: missing {missing}; "
                                    "re-run prepare with overwrite")

        def arr(name: str) -> np.ndarray:
            return np.load(p / f"{name}.npy", mmap_mode="r")

        return cls(
            path=p, meta=meta, gene_stats=pd.read_csv(p / "gene_stats.csv", index_col=0),
            library_size=arr("library_size"), study_codes=arr("study_codes"), cells=arr("cells"),
            pca=arr("pca"), knn_indices=arr("knn_indices"), knn_distances=arr("knn_distances"),
        )
