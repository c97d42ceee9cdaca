"""Programmatic dependent launch (kernels/pdl.py): which targets launch with it, that every entry
kernel keeps the contract (``PDL`` constexpr, ``wait_for_producers`` first), and that the launch
options carry it. The PTX side (``griddepcontrol.wait`` in every sm_90a / sm_100a binary, none on
AMD) is pinned in test_aot.py."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from ds4c.backends.cuda import kernels
from ds4c.backends.cuda.kernels import pdl
from ds4c.backends.cuda.kernels.configs import Launch
from ds4c.targets import get_target


@pytest.fixture
def compiled_mode(monkeypatch):
    """As on a GPU or in the AOT worker: not interpreted, the device (if any) allows PDL."""
    monkeypatch.setattr(pdl, "_interpreted", lambda: False)
    monkeypatch.setattr(pdl, "_live_device_allows", lambda: True)
    monkeypatch.delenv("DS4C_PDL", raising=False)


@pytest.mark.parametrize("name,on", [("h100", True), ("h200", True), ("b200", True), ("gb200", True),
                                     ("mi300x", False), ("mi355x", False)])
def test_nvidia_sm90_and_later_launch_with_pdl(compiled_mode, name, on):
    target = get_target(name)
    assert pdl.pdl_enabled(target) is on
    kw = Launch(4).kwargs(target)
    assert kw["PDL"] is on and kw.get("launch_pdl", False) is on


def test_off_under_the_interpreter_and_by_environment(compiled_mode, monkeypatch):
    h100 = get_target("h100")
    monkeypatch.setenv("DS4C_PDL", "0")
    assert pdl.pdl_kwargs(h100) == {"PDL": False}  # launch_pdl never without the kernel's wait
    monkeypatch.delenv("DS4C_PDL")
    monkeypatch.setattr(pdl, "_interpreted", lambda: True)
    assert pdl.pdl_kwargs(h100) == {"PDL": False}


def test_off_on_a_gpu_older_than_sm90(compiled_mode, monkeypatch):
    # an sm_80 device runs the h100 record's kernels; griddepcontrol needs sm_90
    monkeypatch.setattr(pdl, "_live_device_allows", lambda: False)
    assert not pdl.pdl_enabled(get_target("h100"))


def _entry_kernels():
    """(module, FunctionDef) of every ``_*_kernel`` Triton function: the ones launchers launch."""
    for mod in kernels.KERNEL_MODULES:
        path = Path(importlib.util.find_spec(f"{kernels.__name__}.{mod}").origin)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("_") and node.name.endswith("_kernel"):
                yield mod, node


def test_every_entry_kernel_waits_for_its_producer_first():
    found = list(_entry_kernels())
    assert len(found) >= 20
    for mod, fn in found:
        args = [a.arg for a in fn.args.args]
        assert "PDL" in args, f"{mod}.{fn.name} lacks the PDL constexpr"
        body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant) \
            else fn.body
        first = body[0]
        assert (isinstance(first, ast.Expr) and isinstance(first.value, ast.Call)
                and getattr(first.value.func, "id", None) == "wait_for_producers"), \
            f"{mod}.{fn.name}: the first statement must be wait_for_producers(PDL)"


def test_launch_options_of_the_interpreter_run_without_pdl():
    # CI runs every kernel through the interpreter (conftest): PDL is off there
    assert pdl.pdl_kwargs(get_target("h100")) == {"PDL": False}
