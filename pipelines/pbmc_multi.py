"""The multi-study PBMC benchmark set: Kang 2018 (8 donors) + 10x PBMC 4k + Ding 2020.

Three real PBMC studies from ``$SCPROTO_DATA_DIR`` are put on one gene space and one label
vocabulary, and written as a single ``.h5ad`` of raw counts:

=================================  =============================  =================
study (``obs["study"]``)           source folder                  original batches
=================================  =============================  =================
``kang2018``                       kang2018_pbmc_ctrl_8donors     8 donors
``pbmc4k``                         pbmc4k_soupx                   1
``ding2020``                       ding2020_pbmc_dropseq_indrops  Drop-seq, inDrops
                                   _scannotate
=================================  =============================  =================

**Genes.** The intersection of the three sets' gene symbols, in Kang's order. Kang stores
1,287 genes and Ding only its 2,000 most variable ones, so only **97 genes** are shared (1,272
between Kang and PBMC 4k alone). Genes missing from a study are not zero-filled: an absent gene
is unmeasured, not unexpressed.

**Labels** (``obs["cell_type"]``; the study's own label is kept in ``obs["cell_type_original"]``).
The coarse vocabulary is the finest one all three studies can be mapped to; PBMC 4k's "MNP"
(mononuclear phagocytes) does not separate monocytes from dendritic cells, so they are merged:

==================  ======================================  ==========  ================
coarse type         Kang 2018                               PBMC 4k     Ding 2020
==================  ======================================  ==========  ================
``CD4 T``           CD4 T cells                             T_CD4       —
``CD8 T``           CD8 T cells                             T_CD8       Cytotoxic T cell
``NK``              NK cells                                NK          —
``B``               B cells                                 B           B cell
``Myeloid``         CD14+ Monocytes, FCGR3A+ Monocytes,     MNP         CD16+ monocyte
                    Dendritic cells
``Megakaryocyte``   Megakaryocytes                          —           —
(dropped)           —                                       ``?``       —
==================  ======================================  ==========  ================

PBMC 4k's 20 unassigned cells (``?``) are dropped. ``obs["batch"]`` is the original batch
prefixed by the study (``kang2018:1015``, ``pbmc4k:pbmc4k``, ``ding2020:inDrops``: 11 batches).
``X`` holds the raw integer counts (CSR float32) restricted to the shared genes; cells with no
count left on those genes are dropped (their number is in ``uns["pbmc_multi"]``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scproto_scale.data.writers import write_h5ad_atomic
from scproto_scale.errors import ScprotoInputError

# study name → (data folder, {original label → coarse label}); unmapped labels are dropped.
SOURCES: dict[str, tuple[str, dict[str, str]]] = {
    "kang2018": ("kang2018_pbmc_ctrl_8donors", {
        "CD4 T cells": "CD4 T", "CD8 T cells": "CD8 T", "NK cells": "NK", "B cells": "B",
        "CD14+ Monocytes": "Myeloid", "FCGR3A+ Monocytes": "Myeloid",
        "Dendritic cells": "Myeloid", "Megakaryocytes": "Megakaryocyte"}),
    "pbmc4k": ("pbmc4k_soupx", {
        "T_CD4": "CD4 T", "T_CD8": "CD8 T", "NK": "NK", "B": "B", "MNP": "Myeloid"}),
    "ding2020": ("ding2020_pbmc_dropseq_indrops_scannotate", {
        "Cytotoxic T cell": "CD8 T", "B cell": "B", "CD16+ monocyte": "Myeloid"}),
}
VOCABULARY = ("CD4 T", "CD8 T", "NK", "B", "Myeloid", "Megakaryocyte")


def _read_study(data_dir: Path, study: str) -> ad.AnnData:
    folder, mapping = SOURCES[study]
    path = data_dir / folder / f"{folder}.h5ad"
    if not path.is_file():
        raise ScprotoInputError(f"multi-study PBMC: {path} not found (SCPROTO_DATA_DIR={data_dir})")
    adata = ad.read_h5ad(path)
    for col in ("batch", "cell_type"):
        if col not in adata.obs:
            raise ScprotoInputError(f"{path}: obs column {col!r} missing")
    original = adata.obs["cell_type"].astype(str)
    unknown = sorted(set(original) - set(mapping) - {"?"})
    if unknown:
        raise ScprotoInputError(f"{path}: cell_type values {unknown} have no coarse mapping")
    keep = original.isin(list(mapping)).to_numpy()
    adata = adata[keep].copy()
    obs = pd.DataFrame(index=[f"{study}:{c}" for c in adata.obs_names])
    obs["study"] = study
    obs["batch"] = [f"{study}:{b}" for b in adata.obs["batch"].astype(str)]
    obs["cell_type_original"] = original[keep].to_numpy()
    obs["cell_type"] = obs["cell_type_original"].map(mapping).to_numpy()
    return ad.AnnData(X=sp.csr_matrix(adata.X, dtype=np.float32), obs=obs, var=adata.var[[]])


def assemble_multi_pbmc(data_dir: Path, out: Path) -> Path:
    """Build the multi-study PBMC set and write it atomically to ``out``.

    Args:
        data_dir: the real-data directory (``$SCPROTO_DATA_DIR``) holding the three source
            folders of :data:`SOURCES`.
        out: target ``.h5ad`` (replaced if present).

    Returns:
        ``out``: ``(n_cells, 97)`` raw counts (CSR float32) with obs ``study``, ``batch``,
        ``cell_type`` (categorical, :data:`VOCABULARY`), ``cell_type_original``; ``uns
        ["pbmc_multi"]`` records the gene count, dropped cells and sources.

    Raises:
        ScprotoInputError: a source file or obs column is missing, a label has no mapping, or
            the studies share no gene.
    """
    data_dir, out = Path(data_dir), Path(out)
    parts = {s: _read_study(data_dir, s) for s in SOURCES}
    shared = list(parts["kang2018"].var_names)
    for a in parts.values():
        present = set(a.var_names)
        shared = [g for g in shared if g in present]
    if not shared:
        raise ScprotoInputError(f"multi-study PBMC: the studies {list(SOURCES)} share no gene")
    combined = ad.concat([a[:, shared] for a in parts.values()], join="inner", merge="same")
    X = sp.csr_matrix(combined.X, dtype=np.float32)
    nonzero = np.asarray(X.sum(axis=1)).ravel() > 0
    combined = ad.AnnData(X=X[nonzero], obs=combined.obs.iloc[np.flatnonzero(nonzero)].copy(),
                          var=pd.DataFrame(index=pd.Index(shared, name=None)))
    for col in ("study", "batch", "cell_type_original"):
        combined.obs[col] = combined.obs[col].astype("category")
    combined.obs["cell_type"] = pd.Categorical(
        combined.obs["cell_type"], categories=[t for t in VOCABULARY
                                              if t in set(combined.obs["cell_type"])])
    combined.uns["pbmc_multi"] = {
        "n_shared_genes": len(shared),
        "dropped_zero_count_cells": int((~nonzero).sum()),
        "sources": {s: SOURCES[s][0] for s in SOURCES},
        "cells_per_study": {s: int((combined.obs["study"] == s).sum()) for s in SOURCES},
    }
    return write_h5ad_atomic(combined, out)


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.pbmc_multi --out F [--data-dir D]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="target .h5ad")
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("SCPROTO_DATA_DIR"),
                        help="real-data directory (default $SCPROTO_DATA_DIR)")
    args = parser.parse_args(argv)
    if args.data_dir is None:
        parser.error("--data-dir or $SCPROTO_DATA_DIR is required")
    path = assemble_multi_pbmc(args.data_dir, args.out)
    adata = ad.read_h5ad(path, backed="r")
    info = adata.uns["pbmc_multi"]
    print(f"{path}: {adata.n_obs} cells × {adata.n_vars} shared genes; "
          f"cells per study {dict(info['cells_per_study'])}; "
          f"types {adata.obs['cell_type'].value_counts().to_dict()}")


if __name__ == "__main__":
    main()
