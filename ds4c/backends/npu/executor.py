"""Run an ``npu`` artifact on the host: NPU ops through the TVM host build, the rest by reference.

The artifact's ``kernels/npu/host.so`` is the LLVM build of the same scheduled TIR as the C
source: loaded with ``tvm.runtime.load_module`` from a private temporary file (a shared object
must be a file to be mapped; never unpickled) and run by a Relax VM on the CPU, it is the
functional simulator of the device kernels. Loading a shared object runs its code, so the stored
one is loaded only when the artifact is trusted (``ds4c.artifact.signing``: signed by a trusted
key, or ``--trust-binaries``). An untrusted artifact's host build is made anew from its IR with
this machine's TVM (``lower.lower``, kept in ds4c's cache under ``lower.build_key``), or, where
no toolchain can build it, the artifact is refused with a message saying how to trust it. ``NpuExecutor`` is the reference executor with the
NPU ops' dispatch replaced: tensors go to TVM and back through DLPack (no copies on CPU).

Kernels are built for symbolic batch and sequence sizes; a call the kernel was not built for
(TVM refuses the shapes) runs the op's reference instead and is counted, so ``stats()`` says
what ran where.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from ds4c.errors import ArtifactError, Ds4cError, TargetError
from ds4c.ir.graph import Graph, Op, Value
from ds4c.ir.interpreter import ReferenceExecutor
from ds4c.ir.registry import OpDef

HOW_TO_TRUST = ("trust its publisher's key with `ds4c trust add KEY.pub`, or pass --trust-binaries "
                "(ds4c.load(..., trust_binaries=True)) if you trust this file")


class NpuBuildWarning(UserWarning):
    """The artifact's NPU host build is not loaded (untrusted); it is built here instead."""


def load_library(manifest: dict[str, Any], container: Any, where: str, *, trust: Any = None,
                 program: Any = None) -> tuple[Any, dict[str, Any]]:
    """(Relax VM over the host build, the kernels section it implements).

    ``trust`` (``ds4c.artifact.signing.Trust``; None: untrusted) decides whether the artifact's own
    library may be loaded (checked against the manifest first); otherwise it is built from
    ``program`` (the artifact's graphs) here, and the section of that build is returned."""
    from ds4c.backends.npu.lower import require_tvm

    tvm = require_tvm()
    from tvm import relax

    section = manifest.get("kernels") or {}
    if not isinstance(section, dict) or section.get("backend") != "npu":
        raise ArtifactError(f"{where}: the artifact has no npu kernels (target '{manifest['target']['name']}'); "
                            "compile it with --target npu, or load it with backend='reference'")
    if not section.get("kernels"):
        return None, section
    if trust is not None and trust.trusted:
        lib = _stored_library(tvm, section, container, where)
    else:
        lib, section = _built_library(tvm, manifest, program, where,
                                      trust.reason if trust is not None else "its signature was not checked")
    try:
        vm = relax.VirtualMachine(lib, tvm.cpu())
    except Exception as e:  # noqa: BLE001 - TVM's own error types (AttributeError for a library without a VM)
        raise ArtifactError(f"{where}: the npu host build is not a TVM library this TVM can load ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); recompile the artifact") \
            from None
    kernels = section.get("kernels")
    missing = [k for k in kernels if not isinstance(k, str) or not _has_function(vm, k)] if isinstance(
        kernels, dict) else ["(the section's kernels are not a name -> record map)"]
    if missing:
        raise ArtifactError(f"{where}: npu host build lacks kernel '{missing[0]}' named in the manifest; recompile")
    return vm, section


def _stored_library(tvm: Any, section: dict[str, Any], container: Any, where: str) -> Any:
    """The artifact's own host build, checked against the manifest (trusted artifacts only)."""
    member = section.get("library")
    name = f"kernels/{member}"
    if not isinstance(member, str) or name not in container.member_names():
        raise ArtifactError(f"{where}: manifest lists the npu host build '{name}' but the artifact lacks it; recompile")
    blob = container.read_bytes(name)
    if hashlib.sha256(blob).hexdigest() != section.get("library_sha256"):
        raise ArtifactError(f"{where}: '{name}' does not match the kernels section's sha256 (a kernel library from "
                            "another compile?); recompile the artifact")
    if section.get("tvm_version") != tvm.__version__:
        raise TargetError(f"{where}: npu kernels were built with TVM {section.get('tvm_version')}, this machine has "
                          f"{tvm.__version__}; install that version or recompile")
    with tempfile.TemporaryDirectory(prefix="ds4c-npu-") as tmp:
        path = os.path.join(tmp, "host.so")
        with open(path, "wb") as f:
            f.write(blob)
        return _load_module(tvm, path, where)  # mapped now; the file may go


def _built_library(tvm: Any, manifest: dict[str, Any], program: Any, where: str, why: str
                   ) -> tuple[Any, dict[str, Any]]:
    """The host build of ``program`` made on this machine (ds4c's cache, else built now), never the
    artifact's: (library, its kernels section)."""
    from ds4c.backends.npu.lower import LIBRARY_MEMBER, build_key, cached_host_build, lower, toolchain_problem
    from ds4c.targets import Target

    if program is None:
        raise ArtifactError(f"{where}: the artifact's npu host build is native code and the artifact is not trusted "
                            f"({why}); load it with ds4c.load so that it is rebuilt from the IR, or {HOW_TO_TRUST}")
    try:
        target = Target.from_dict(manifest["target"])
    except Ds4cError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: the manifest's target record is malformed ({type(e).__name__}: {e}); "
                            "recompile the artifact") from None
    key = build_key(target, program)
    cached = cached_host_build(key)
    if cached is None and (problem := toolchain_problem()) is not None:
        raise ArtifactError(f"{where}: the artifact's npu host build is native code and the artifact is not trusted "
                            f"({why}); it cannot be rebuilt here ({problem}): {HOW_TO_TRUST}")
    how = ("using the build of its IR made on this machine earlier" if cached is not None else
           "building it from the artifact's IR with this machine's TVM now (once: the build is cached)")
    warnings.warn(f"{where}: not loading the npu host build stored in the artifact, which is native code, because "
                  f"the artifact is not trusted ({why}); {how}. To load the stored one, {HOW_TO_TRUST}",
                  NpuBuildWarning, stacklevel=4)
    if cached is not None:
        return _load_module(tvm, cached[0], where), cached[1]
    section, members = lower(target, program, progress=False)
    cached = cached_host_build(key)  # lower keeps what it builds in ds4c's cache
    if cached is not None:
        return _load_module(tvm, cached[0], where), cached[1]
    with tempfile.TemporaryDirectory(prefix="ds4c-npu-") as tmp:  # no usable cache: a private temp file
        path = os.path.join(tmp, "host.so")
        with open(path, "wb") as f:
            f.write(members[LIBRARY_MEMBER])
        return _load_module(tvm, path, where), section


def _load_module(tvm: Any, path: Any, where: str) -> Any:
    try:
        return tvm.runtime.load_module(str(path))
    except Exception as e:  # noqa: BLE001 - TVM raises its own error types for a library it cannot use
        raise ArtifactError(f"{where}: the npu host build is not a TVM library this TVM can load "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}); "
                            "recompile the artifact") from None


def _has_function(vm: Any, name: str) -> bool:
    try:
        vm[name]
    except (AttributeError, KeyError, ValueError, RuntimeError):
        return False
    return True


class _NpuOp(OpDef):
    """An op run by its TVM kernel; shapes the kernel was not built for run the reference."""

    def __init__(self, op: Op, inner: OpDef, kernel: Callable[..., Any], name: str, counts: Counter):
        self.op = op
        self.inner = inner
        self.kernel = kernel
        self.kernel_name = name
        self.counts = counts
        self.name = op.name

    def reference(self, *args: Any, **kwargs: Any) -> Any:
        import tvm

        tensors = _operands(self.op.args, args) + _operands(self.op.kwargs, kwargs)
        try:
            out = self.kernel(*(tvm.runtime.from_dlpack(_compact(t)) for t in tensors))
        except Exception:  # noqa: BLE001 - TVM refuses shapes it was not built for: the reference runs
            self.counts[(self.name, "host (shape not built)")] += 1
            return self.inner.reference(*args, **kwargs)
        self.counts[(self.name, "npu")] += 1
        outs = [torch.from_dlpack(o) for o in (out if not hasattr(out, "shape") else [out])]
        return outs[0] if len(outs) == 1 else tuple(outs)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` as TVM takes it: compact row-major strides (size-1 dims included) and 64-byte aligned data."""
    expected, n = [], 1
    for size in reversed(t.shape):
        expected.append(n)
        n *= size
    if list(t.stride()) == expected[::-1] and t.data_ptr() % 64 == 0:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)  # the allocator aligns to 64 bytes
    return out.copy_(t)


def _operands(pattern: Any, actual: Any) -> list[torch.Tensor]:
    """The runtime values at the positions where the IR op has Values, in operand order."""
    if isinstance(pattern, Value):
        return [actual]
    if isinstance(pattern, list | tuple):
        return [t for p, a in zip(pattern, actual, strict=True) for t in _operands(p, a)]
    if isinstance(pattern, dict):
        return [t for k, p in pattern.items() for t in _operands(p, actual[k])]
    return []


class NpuExecutor(ReferenceExecutor):
    """Runs one graph: ops assigned to NPU kernels through the host build, the rest by reference."""

    def __init__(self, graph: Graph, vm: Any, section: dict[str, Any], device: torch.device | str = "cpu",
                 on_op: Callable[[int, Op, list[Any]], None] | None = None):
        super().__init__(graph, device, on_op)
        self.counts: Counter = Counter()
        assign = section.get("assign", {}).get(graph.name, {})
        names = section.get("assign_ops", {}).get(graph.name, {})
        steps = []
        for i, (op, opdef, args, kwargs) in enumerate(self._steps):
            kernel = assign.get(str(i))
            if kernel is not None:
                if names.get(str(i)) != op.name:
                    raise ArtifactError(f"graph @{graph.name}: npu kernel '{kernel}' was built for op #{i} "
                                        f"{names.get(str(i))}, the IR has {op.name}; recompile the artifact")
                opdef = _NpuOp(op, opdef, vm[kernel], kernel, self.counts)
            else:
                opdef = _HostOp(op.name, opdef, self.counts)
            steps.append((op, opdef, args, kwargs))
        self._steps = steps

    def stats(self) -> dict[str, dict[str, int]]:
        """Per op name: calls run on the NPU (host simulator) and on the host."""
        out: dict[str, dict[str, int]] = {}
        for (name, how), n in self.counts.items():
            out.setdefault(name, {})[how] = n
        return dict(sorted(out.items()))


class _HostOp(OpDef):
    def __init__(self, name: str, inner: OpDef, counts: Counter):
        self.inner = inner
        self.counts = counts
        self.name = name

    def reference(self, *args: Any, **kwargs: Any) -> Any:
        self.counts[(self.name, "host")] += 1
        return self.inner.reference(*args, **kwargs)
