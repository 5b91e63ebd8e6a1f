"""Shared fixtures: a small synthetic atlas, its stores, and the real-data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scproto_scale.simulate import simulate_atlas


def data_dir() -> Path:
    """``$SCPROTO_DATA_DIR`` or skip the test with a message saying so."""
    d = os.environ.get("SCPROTO_DATA_DIR")
    if not d:
        pytest.skip("SCPROTO_DATA_DIR is not set: real-data test skipped")
    p = Path(d)
    if not p.is_dir():
        pytest.skip(f"SCPROTO_DATA_DIR={d} is not a directory: real-data test skipped")
    return p


@pytest.fixture(scope="session")
def tiny_h5ad(tmp_path_factory) -> Path:
    """1,200 cells × 300 genes, 3 studies, 5 types (one rare), written as h5ad."""
    adata = simulate_atlas(n_cells=1200, n_genes=300, n_studies=3, n_cell_types=5,
                           rare_fraction=0.02, seed=1)
    path = tmp_path_factory.mktemp("tiny") / "tiny.h5ad"
    adata.write_h5ad(path)
    return path
