"""Programmatic dependent launch (kernels/pdl.py): which targets launch with it, that it is a
compile option recorded in the artifact (``ds4c compile --no-pdl``) which the runtime's kernel
context and the ahead-of-time launch recording both follow, that every entry kernel keeps the
contract (``PDL`` constexpr, ``wait_for_producers`` first), and that the launch options carry it.
The PTX side (``griddepcontrol.wait`` in every sm_90a / sm_100a binary, none on AMD) is pinned in
test_aot.py."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ds4c
from ds4c.backends.triton import aot, kernels
from ds4c.backends.triton.kernels import pdl
from ds4c.backends.triton.kernels.configs import KernelContext, Launch
from ds4c.cli import app
from ds4c.targets import get_target
from tests.backends.triton.conftest import CTX, kernel_context


@pytest.fixture
def compiled_mode(monkeypatch):
    """As on a GPU or in the AOT worker: not interpreted, the device (if any) allows PDL."""
    monkeypatch.setattr(pdl, "_interpreted", lambda: False)
    monkeypatch.setattr(pdl, "_live_device_allows", lambda: True)


@pytest.mark.parametrize("name,on", [("h100", True), ("h200", True), ("b200", True), ("gb200", True),
                                     ("mi300x", False), ("mi355x", False)])
def test_nvidia_sm90_and_later_launch_with_pdl(compiled_mode, name, on):
    target = get_target(name)
    assert pdl.pdl_enabled(target, True) is on
    ctx = KernelContext(target)
    assert ctx.pdl and ctx.launches_with_pdl is on
    kw = Launch(4).kwargs(ctx)
    assert kw["PDL"] is on and kw.get("launch_pdl", False) is on


def test_off_by_the_compile_option_and_under_the_interpreter(compiled_mode, monkeypatch):
    h100 = get_target("h100")
    off = KernelContext(h100, pdl=False)
    assert not pdl.pdl_enabled(h100, False) and not off.launches_with_pdl
    assert Launch(4).kwargs(off) == {"num_warps": 4, "PDL": False}  # launch_pdl never without the kernel's wait
    assert KernelContext(h100).launches_with_pdl  # near miss: the option on
    monkeypatch.setattr(pdl, "_interpreted", lambda: True)
    assert not KernelContext(h100).launches_with_pdl and pdl.pdl_kwargs(False) == {"PDL": False}


def test_off_on_a_gpu_older_than_sm90(compiled_mode, monkeypatch):
    # an sm_80 device runs the h100 record's kernels; griddepcontrol needs sm_90
    monkeypatch.setattr(pdl, "_live_device_allows", lambda: False)
    assert not pdl.pdl_enabled(get_target("h100"), True)


@pytest.fixture(scope="module")
def with_and_without_pdl(tmp_path_factory):
    """tiny for h100 compiled as usual and with ``ds4c compile --no-pdl`` (no stored binaries: the
    launch recording is checked below without compiling them)."""
    out = tmp_path_factory.mktemp("pdl")
    default, off = out / "default.ds4", out / "nopdl.ds4"
    ds4c.compile("tiny", target="h100", precision="fp32", max_context=48, progress=False,
                 kernel_binaries=False).save(default)
    res = CliRunner().invoke(app, ["compile", "tiny", "--target", "h100", "--precision", "fp32", "--max-context", "48",
                                   "--no-kernel-binaries", "--no-pdl", "-o", str(off)])
    assert res.exit_code == 0, res.output
    return default, off


def test_no_pdl_is_recorded_in_the_artifact_and_reaches_the_launchers(with_and_without_pdl, compiled_mode):
    default, off = with_and_without_pdl
    for path, on in ((default, True), (off, False)):
        model = ds4c.load(path, device="cuda" if torch.cuda.is_available() else "cpu", backend="kernels",
                          cuda_graphs=False)
        assert model.manifest["lowering"]["options"]["pdl"] is on
        ctx = model.kernel_context
        assert ctx.target.name == "h100" and ctx.pdl is on and ctx.launches_with_pdl is on
        assert all(ex.context is ctx for ex in model._executors.values())  # what every launch is given
        assert Launch(4).kwargs(ctx)["PDL"] is on and ("launch_pdl" in Launch(4).kwargs(ctx)) is on


def test_no_pdl_compiles_its_binaries_without(with_and_without_pdl, monkeypatch):
    """The compile hands the option to the ahead-of-time backend (its request to the workers, the
    kernels section), and the launch recording then holds PDL-free specialisations only."""
    requests = []

    def workers(tmpdir, target, progress):
        requests.append(json.loads((tmpdir / "request.json").read_text()))
        return []

    monkeypatch.setattr(aot, "_run_workers", workers)
    monkeypatch.setattr(aot, "_CACHE", {})
    for lowering, on in (({"pdl": False}, False), (None, True)):
        art = ds4c.compile("tiny", target="h100", precision="fp32", max_context=48, progress=False,
                           kernel_binaries=True, lowering=lowering)
        assert requests[-1]["pdl"] is on and art.manifest["kernels"]["specialised_for"]["pdl"] is on
    default, off = with_and_without_pdl
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # JITFunctions, as in the workers
    out = subprocess.run([sys.executable, "-c", _RECORD, str(default), str(off)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    with_pdl, without = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert with_pdl["count"] == without["count"] > 10
    assert with_pdl["modes"] == [[True, True]] and without["modes"] == [[False, False]]


_RECORD = """
import json, sys
from ds4c.artifact.artifact import read_artifact
from ds4c.backends.triton.launches import record_launches
from ds4c.runtime.model import compiled_pdl
from ds4c.targets import get_target
for path in sys.argv[1:]:
    manifest, program, _ = read_artifact(path)
    launches = record_launches(program.graphs, manifest["state"], get_target("h100"), [37], pdl=compiled_pdl(manifest))
    modes = set()
    for la in launches:
        spec = json.loads(la.specialization)
        names = [k for k in spec["signature"]]
        consts = {names[k[0]]: v for k, v in zip(spec["constant_keys"], spec["constant_vals"]) if len(k) == 1}
        modes.add((consts["PDL"], bool(spec["options"].get("launch_pdl", False))))
    print(json.dumps({"count": len(launches), "modes": sorted(modes)}))
"""


def _entry_kernels():
    """(module, FunctionDef) of every ``_*_kernel`` Triton function: the ones launchers launch."""
    for mod in kernels.KERNEL_MODULES:
        path = Path(importlib.util.find_spec(f"{kernels.__name__}.{mod}").origin)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("_") and node.name.endswith("_kernel"):
                yield mod, node


def _body(fn: ast.FunctionDef) -> list[ast.stmt]:
    """The kernel's statements without its docstring."""
    first = fn.body[0]
    return fn.body[1:] if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) else fn.body


def _is_wait(stmt) -> bool:
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
            and getattr(stmt.value.func, "id", None) == "wait_for_producers")


# what may run before the wait: index arithmetic and L2 prefetches of weights - no memory access
_BEFORE_WAIT = {"program_id", "arange", "minimum", "maximum", "to", "prefetch_l2", "range"}


def test_every_entry_kernel_waits_for_its_producer_before_touching_memory():
    found = list(_entry_kernels())
    assert len(found) >= 20
    for mod, fn in found:
        args = [a.arg for a in fn.args.args]
        assert "PDL" in args, f"{mod}.{fn.name} lacks the PDL constexpr"
        body = _body(fn)
        waits = [i for i, stmt in enumerate(body) if _is_wait(stmt)]
        assert waits, f"{mod}.{fn.name}: no top-level wait_for_producers(PDL)"
        for stmt in body[:waits[0]]:
            for node in ast.walk(stmt):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
                    assert name in _BEFORE_WAIT, f"{mod}.{fn.name}: {name}() before wait_for_producers"


def test_weight_prefetch_only_before_the_wait_of_row_gemv():
    # the one kernel that prefetches its weights before waiting; anything else starts with the wait
    early = []
    for _mod, fn in _entry_kernels():
        if not _is_wait(_body(fn)[0]):
            early.append(fn.name)
    assert early == ["_row_gemv_kernel"]


def test_launch_options_of_the_interpreter_run_without_pdl():
    # CI runs every kernel through the interpreter (conftest): PDL is off there, whatever the option
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert CTX.pdl and not CTX.launches_with_pdl and Launch(4).kwargs(CTX)["PDL"] is False
    else:  # on a GPU the hardware decides too (pdl_enabled): the kernel's wait and Triton's option go together
        kw = Launch(4).kwargs(CTX)
        assert kw["PDL"] is CTX.launches_with_pdl and kw.get("launch_pdl", False) is kw["PDL"]


_COMPILE_ROW_GEMV = """
import triton
from triton.backends.compiler import GPUTarget
from ds4c.backends.triton.kernels.linear import _row_gemv_kernel
sig = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "p_ptr": "*fp32", "y_ptr": "*bf16",
       "lock_ptr": "*i32", "N": "i32", "K": "i32", "group_rows": "i32", "k_split": "i32", "split": "i32",
       "s_cols": "i32", "prefetch_k": "i32"}
const = {"BLOCK_N": 32, "BLOCK_K": 128, "SCALE": 1, "ACT_FP8": True, "SPLIT_K": True, "INTERPRETER_BF16": False,
         "PDL": True, "PREFETCH": True, "STAGES": 3, "ROW_SUMS": True}
sig.update({k: "constexpr" for k in const})
attrs = {(list(sig).index(a),): [["tt.divisibility", 16]] for a in ("x_ptr", "q_ptr", "s_ptr", "K", "k_split")}
for stages in (3, 1):
    src = triton.compiler.ASTSource(fn=_row_gemv_kernel, signature=sig, constexprs={**const, "STAGES": stages},
                                    attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1, "launch_pdl": True}).asm["ptx"]
    print(ptx.index("prefetch.global.L2"), ptx.index("griddepcontrol.wait"), ptx.count("cp.async.cg"))
"""


def test_row_gemv_prefetches_its_weights_before_waiting_on_sm90():
    """With the tunable ``prefetch`` the one-row FP8 GEMV asks L2 for its weight slice before
    ``griddepcontrol.wait``; with ``pipeline`` (STAGES > 1) its K loop reads weights by asynchronous copies
    (``cp.async``: Triton pipelines a loop without a dot only when asked), without it by plain
    loads. Compiled for sm_90a without a GPU (a real JITFunction: no interpreter)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_ROW_GEMV], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (prefetch, wait, copies), (_, _, copies_unpipelined) = (map(int, line.split())
                                                             for line in out.stdout.strip().splitlines()[-2:])
    assert prefetch < wait
    assert copies > 0 and copies_unpipelined == 0


def test_prefetch_is_on_by_default_and_tunable():
    from ds4c.backends.triton.kernels.configs import TUNABLE
    from ds4c.backends.triton.kernels.linear import row_gemv_config
    from ds4c.runtime.autotune import CANDIDATES

    assert row_gemv_config(4096, 4096, 132).prefetch == 1  # H200: 1.208 -> 1.117-1.138 ms (ds4c tune)
    tuned = kernel_context(row_gemv={"prefetch": 0}).tuned("row_gemv")
    assert row_gemv_config(4096, 4096, 132, **tuned).prefetch == 0
    assert "prefetch" in TUNABLE["row_gemv"] and CANDIDATES["row_gemv"]["prefetch"] == (None, 0)


def test_prefetch_stays_within_three_quarters_of_l2():
    """Every program prefetches its whole K slice while the GEMV's prefetches fit in 3/4 of L2
    (flash-slice's 2-32 MB linears on a 50 MB L2), else only its first steps: an FP8 LM head
    (129280 x 4096, 530 MB) prefetches two 128-wide steps per program, 33 MB in all."""
    from ds4c.backends.triton.kernels.linear import prefetch_inputs, row_gemv_config

    l2 = get_target("h200").l2_bytes
    for n, k in ((32768, 1024), (4096, 8192), (1024, 4096)):  # whole weights, all K slices
        cfg = row_gemv_config(n, k, 132, l2)
        assert cfg.prefetch_k == cfg.k_split and n * k <= l2 * 3 // 4, (n, k, cfg)
    # 64 MB in 4 K slices: each program prefetches what keeps all of them within 37.5 MB
    big = row_gemv_config(8192, 8192, 132, l2)
    assert big.k_split == 2048 and 8192 * 4 * big.prefetch_k <= l2 * 3 // 4 and big.prefetch_k == 1152
    head = row_gemv_config(129280, 4096, 132, l2)
    assert head.k_split == 4096 and head.prefetch_k == 256
    assert prefetch_inputs(65536, 4096, l2) == 4 * 128  # 4.5 steps of 64K rows fit 37.5 MB
    assert prefetch_inputs(1 << 20, 4096, l2) == 128  # at least one step
    assert row_gemv_config(129280, 4096, 132, l2, prefetch=0).prefetch_k == 0
