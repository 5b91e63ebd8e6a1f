"""What made an artefact: package versions, recorded in every artefact and report."""

from __future__ import annotations

import importlib.metadata
import platform


def versions() -> dict[str, str]:
    """Versions of Python and of the packages whose behaviour shapes results."""
    out = {"python": platform.python_version()}
    for pkg in ("scproto-scale", "torch", "numpy", "scipy", "anndata", "zarr", "tiledbsoma",
                "faiss-cpu", "scanpy", "scib-metrics"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
