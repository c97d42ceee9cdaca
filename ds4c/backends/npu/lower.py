"""``lower(target, program)``: the NPU partition of every entry graph, lowered through TVM.

1. partition (``partition.place``): NPU ops vs host ops, each host op with its reason;
2. one Relax function per distinct NPU op signature (``relax_import``: torch.export of the op's
   reference with symbolic ``B``/``S``), all in one IRModule; Relax legalizes them to TIR and fuses
   the elementwise chains (TVM's ``zero`` pipeline);
3. every PrimFunc tiled for the target's SRAM (``tiling``); an op whose kernel cannot be tiled
   goes to the host with the reason;
4. two builds of the same scheduled module: ``c`` (the device kernels' C source, stored as
   ``kernels/npu/kernels.c``) and ``llvm`` (a shared library, ``kernels/npu/host.so``, that the
   runtime loads as the functional simulator; built at -O0: it checks function, not speed).

The manifest section maps each NPU op (graph, op index) to its kernel, and records per kernel
its op, signature and SRAM working set, and per op kind where it runs and why.

The host build is native code. The runtime loads the artifact's own only when the artifact is
trusted (``ds4c.artifact.signing``); otherwise it builds it anew from the artifact's IR
(``ds4c.backends.npu.executor``), which is this function run again. Builds made here are kept in
ds4c's cache (``HOST_BUILDS``, a directory of this user's alone) under ``build_key``: everything
that determines the build (IR and constants of every graph, the target record, TVM's version,
ds4c's source), so loading an untrusted copy of an artifact compiled on this machine costs no
rebuild.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ds4c.backends.npu.partition import place, placement_table
from ds4c.backends.npu.relax_import import import_op, signature
from ds4c.backends.npu.tiling import KernelTiling, tile_prim_func
from ds4c.errors import TargetError
from ds4c.ir.graph import Program
from ds4c.progress import progress_steps
from ds4c.quiet import TVM_FAST_TAKE, native_stderr_without
from ds4c.targets import Target

HOST_BUILDS = "npu-host-builds"  # under ds4c's cache: <build key>/host.so + section.json
LIBRARY_MEMBER = "npu/host.so"
C_SOURCE_MEMBER = "npu/kernels.c"
SECTION_VERSION = 1
# TVM 0.27's c codegen prints a float infinity (a one-sided clamp's bound) as ``inff``, which no C
# header defines; the stored source defines it so that it compiles as emitted.
C_PRELUDE = "/* ds4c npu kernels: TVM c codegen */\n#include <math.h>\n#ifndef inff\n#define inff INFINITY\n#endif\n"


def c_include_dirs() -> list[str]:
    """Header folders the stored C source needs (TVM's C runtime API and tvm-ffi), for ``gcc -c -I...``."""
    import tvm
    import tvm_ffi

    return [os.path.join(os.path.dirname(tvm.__file__), "include"),
            os.path.join(os.path.dirname(tvm_ffi.__file__), "include")]


def require_tvm() -> Any:
    """``tvm``, or a clear error naming the extra that installs it."""
    try:
        import tvm
        from tvm import relax  # noqa: F401
    except ImportError as e:
        raise TargetError(f"the npu backend needs Apache TVM (apache-tvm 0.27), which is not importable ({e}); "
                          "install it with: pip install 'ds4c[npu]'") from None
    return tvm


def lower(target: Target, program: Program, *, progress: bool | None = None,
          options: Mapping[str, bool] | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    tvm = require_tvm()
    if target.npu is None:
        raise TargetError(f"target '{target.name}' has no npu facts; the npu backend needs an NPU target record")
    host: dict[tuple[str, int], str] = {}
    by_sig: dict[Any, str] = {}
    import_failed: dict[Any, str] = {}
    kernels: dict[str, dict[str, Any]] = {}
    assign: dict[str, dict[int, str]] = {g: {} for g in program.graphs}
    funcs: dict[str, Any] = {}
    npu_ops = [(g, i, op) for g, graph in program.graphs.items() for i, op in enumerate(graph.ops)
               if place(op, target).npu]
    with progress_steps("npu: Relax import", total=max(len(npu_ops), 1), enabled=progress) as steps:
        for g, i, op in npu_ops:
            sig = signature(op)
            if sig not in by_sig and sig not in import_failed:
                name = f"{op.name.replace('.', '_')}_{len(by_sig) + len(import_failed)}"
                try:
                    funcs[name] = import_op(op, name)
                    kernels[name] = {"op": op.name, "signature": repr(sig)}
                    by_sig[sig] = name
                except Exception as e:  # noqa: BLE001 - any export/import failure sends the op to the host
                    import_failed[sig] = f"TVM import failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            if sig in import_failed:
                host[(g, i)] = import_failed[sig]
            else:
                assign[g][i] = by_sig[sig]
            steps.advance()

    mod, tilings, failed = _schedule(tvm, funcs, target)
    for name, reason in failed.items():
        kernels.pop(name, None)
        for g in assign:
            for i in [i for i, k in assign[g].items() if k == name]:
                del assign[g][i]
                host[(g, i)] = reason
    for name, rec in kernels.items():
        prims = tilings.get(name, [])
        rec["prim_funcs"] = {t.name: t.to_dict() for t in prims}
        rec["working_set_bytes"] = max((t.working_set_bytes for t in prims), default=0)

    members: dict[str, bytes] = {}
    if kernels:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            csrc = tvm.compile(mod, target=tvm.target.Target({"kind": "c"}),
                               relax_pipeline=tvm.relax.pipeline.default_build_pipeline())
            members[C_SOURCE_MEMBER] = (C_PRELUDE + "\n".join(m.inspect_source() for m in csrc.mod.imports)).encode()
            host_build = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm", "opt-level": 0}),
                                     relax_pipeline=tvm.relax.pipeline.default_build_pipeline())
        with tempfile.TemporaryDirectory(prefix="ds4c-npu-") as tmp:
            path = os.path.join(tmp, "host.so")
            host_build.export_library(path)
            with open(path, "rb") as f:
                members[LIBRARY_MEMBER] = f.read()

    ops = [op for graph in program.graphs.values() for op in graph.ops]
    table = placement_table(ops, target)
    for (g, i), reason in host.items():  # ops the NPU would take but TVM could not
        row = table[program.graphs[g].ops[i].name]
        row["npu"] -= 1
        row["host"] += 1
        if reason not in row["reasons"]:
            row["reasons"].append(reason)
    section = {
        "backend": "npu",
        "version": SECTION_VERSION,
        "tvm_version": tvm.__version__,
        "sram_bytes": target.npu.sram_bytes,
        "library": LIBRARY_MEMBER if kernels else None,
        "library_sha256": hashlib.sha256(members[LIBRARY_MEMBER]).hexdigest() if kernels else None,
        "c_source": C_SOURCE_MEMBER if kernels else None,
        "kernel_count": len(kernels),
        "kernels": kernels,
        "assign": {g: {str(i): k for i, k in sorted(a.items())} for g, a in assign.items()},
        "assign_ops": {g: {str(i): program.graphs[g].ops[i].name for i in sorted(a)} for g, a in assign.items()},
        "placement": table,
    }
    if kernels:
        store_host_build(build_key(target, program), members[LIBRARY_MEMBER], section)
    return section, members


@functools.cache
def _ds4c_source_digest() -> str:
    """sha256 over ds4c's Python sources: op references, the importer and the tiling shape the build."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def build_key(target: Target, program: Program) -> str:
    """The host build's cache key: every graph's IR text and constants, the target record, TVM's
    version and ds4c's source."""
    import tvm
    from safetensors.torch import save

    from ds4c.ir.printer import print_graph

    h = hashlib.sha256(json.dumps({"target": target.to_dict(), "tvm": tvm.__version__, "section": SECTION_VERSION,
                                   "ds4c": _ds4c_source_digest()}, sort_keys=True, default=str).encode())
    for name, g in sorted(program.graphs.items()):
        h.update(f"\0{name}\0".encode())
        h.update(print_graph(g).encode())
        h.update(save({k: v.contiguous() for k, v in g.constants.items()}))
    return h.hexdigest()


def store_host_build(key: str, library: bytes, section: dict[str, Any]) -> Path | None:
    """Keep a host build made here under ``key``; None where ds4c's cache is not usable (not kept)."""
    from ds4c.backends.local_cache import private_dir, write_file
    from ds4c.errors import KernelError

    try:
        directory = private_dir(HOST_BUILDS, key)
        write_file(directory, "section.json", json.dumps(section).encode())
        write_file(directory, "host.so", library)  # last: its presence means the entry is whole
    except (KernelError, OSError):
        return None
    return directory


def cached_host_build(key: str) -> tuple[Path, dict[str, Any]] | None:
    """(library path, section) of a host build made here under ``key``, if ds4c's cache has it."""
    from ds4c.backends.local_cache import private_dir
    from ds4c.errors import KernelError

    try:
        directory = private_dir(HOST_BUILDS, key)
        library = directory / "host.so"
        if not library.is_file():
            return None
        section = json.loads((directory / "section.json").read_text())
    except (KernelError, OSError, ValueError):
        return None
    return (library, section) if isinstance(section, dict) and section.get("kernels") else None


def toolchain_problem() -> str | None:
    """Why a host build cannot be made here (TVM without LLVM, no C compiler to link), or None."""
    import shutil

    tvm = require_tvm()
    from tvm.support import cc

    if not tvm.runtime.enabled("llvm"):
        return "this TVM build has no LLVM code generator"
    compiler = cc.get_cc()
    if not compiler or shutil.which(compiler) is None:
        return "no C compiler for TVM to link the library with: install gcc, or set CXX"
    return None


def _schedule(tvm: Any, funcs: dict[str, Any], target: Target
              ) -> tuple[Any, dict[str, list[KernelTiling]], dict[str, str]]:
    """Legalize + fuse the Relax functions, then tile every PrimFunc for SRAM.

    Returns the module, per Relax function the tilings of the PrimFuncs it calls, and the
    functions dropped because a PrimFunc of theirs could not be tiled (with the reason)."""
    from tvm import relax, tirx

    facts = target.npu
    max_inner = facts.vector_width * facts.matrix_unit[0]
    failed: dict[str, str] = {}
    while True:
        live = [k for k in funcs if k not in failed]
        mod = tvm.IRModule({k: funcs[k] for k in live})
        if not live:
            return mod, {}, failed
        # topi's take logs "Fast mode segfaults ..." to fd 2 per legalized take (indices in bounds by construction)
        with warnings.catch_warnings(), native_stderr_without(TVM_FAST_TAKE):
            warnings.simplefilter("ignore")
            mod = relax.pipeline.zero_pipeline()(mod)
            mod = relax.transform.DeadCodeElimination(live)(mod)
        callers = _callers(mod)
        tiled: dict[str, KernelTiling] = {}
        newly: dict[str, str] = {}
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc):
                continue
            try:
                scheduled, record = tile_prim_func(gv.name_hint, func, facts.sram_bytes, max_inner)
            except Exception as e:  # noqa: BLE001 - the op falls back to the host with the reason
                for caller in callers.get(gv.name_hint, ()):
                    newly.setdefault(caller, f"no SRAM tiling: {str(e).splitlines()[0][:160]}")
                continue
            mod[gv] = scheduled.with_attr("global_symbol", gv.name_hint) if "global_symbol" in (
                scheduled.attrs or {}) else scheduled
            tiled[gv.name_hint] = record
        if not newly:
            per_kernel = {name: [tiled[p] for p in sorted(prims) if p in tiled] for name, prims in
                          _callees(callers).items()}
            return mod, per_kernel, failed
        failed.update(newly)


def _callers(mod: Any) -> dict[str, set[str]]:
    """PrimFunc name -> the Relax functions calling it."""
    from tvm import relax

    out: dict[str, set[str]] = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue

        def visit(expr: Any, caller: str = gv.name_hint) -> None:
            if isinstance(expr, relax.Call):
                for a in expr.args:
                    if isinstance(a, tvm_global_var()):
                        out.setdefault(a.name_hint, set()).add(caller)

        relax.analysis.post_order_visit(func, visit)
    return out


def _callees(callers: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for prim, fns in callers.items():
        for f in fns:
            out.setdefault(f, set()).add(prim)
    return out


def tvm_global_var() -> type:
    import tvm

    return tvm.ir.GlobalVar
