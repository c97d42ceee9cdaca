"""Every notebook under examples/ runs headless (nbclient) and its assertions hold."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for var in ("IPYTHONDIR", "JUPYTER_RUNTIME_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(var, tempfile.mkdtemp(prefix=f"ds4c-{var.lower()}-"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on a failing cell or assertion


def test_there_are_notebooks():
    assert {"01_pipeline_walkthrough.ipynb", "04_debug_a_miscompile.ipynb"} <= {p.name for p in NOTEBOOKS}
