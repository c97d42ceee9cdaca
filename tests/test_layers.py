"""The import contract (pyproject.toml ``[tool.importlinter]``): ds4c's packages import one way,
drivers -> runtime -> backends -> passes -> frontend -> models/artifact -> ops -> quant -> ir ->
targets -> errors, and the subpackages of a package import each other without cycles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contract_holds(tmp_path):
    pytest.importorskip("importlinter")
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "ds4c layers KEPT" in proc.stdout and "no cycles between the subpackages of a package KEPT" in proc.stdout


def test_the_contract_catches_an_upward_import(tmp_path):
    """A near miss: the same contract over a copy of the package where the IR imports the runtime
    is broken, naming the import."""
    pytest.importorskip("importlinter")
    import shutil

    pkg = tmp_path / "ds4c"
    shutil.copytree(ROOT / "ds4c", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shapes = pkg / "ir" / "shapes.py"
    shapes.write_text(shapes.read_text() + "\n\ndef _upward():\n    from ds4c.runtime import model  # noqa: F401\n")
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(tmp_path),
                                                                           "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "ds4c.ir is not allowed to import ds4c.runtime" in proc.stdout, proc.stdout[-3000:]
    assert "ds4c.ir.shapes -> ds4c.runtime.model" in proc.stdout
