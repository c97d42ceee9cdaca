"""Run an ``npu`` artifact on the host: NPU ops through the TVM host build, the rest by reference.

The artifact's ``kernels/npu/host.so`` is the LLVM build of the same scheduled TIR as the C
source: loaded with ``tvm.runtime.load_module`` from a private temporary file (a shared object
must be a file to be mapped; never unpickled) and run by a Relax VM on the CPU, it is the
functional simulator of the device kernels. ``NpuExecutor`` is the reference executor with the
NPU ops' dispatch replaced: tensors go to TVM and back through DLPack (no copies on CPU).

Kernels are built for symbolic batch and sequence sizes; a call the kernel was not built for
(TVM refuses the shapes) runs the op's reference instead and is counted, so ``stats()`` says
what ran where.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from ds4c.backends.reference import ReferenceExecutor
from ds4c.errors import ArtifactError, TargetError
from ds4c.ir.graph import Graph, Op, Value
from ds4c.ir.registry import OpDef


def load_library(manifest: dict[str, Any], container: Any, where: str) -> tuple[Any, dict[str, Any]]:
    """(Relax VM over the host build, the manifest's kernels section), checked against the manifest."""
    from ds4c.backends.npu.lower import require_tvm

    tvm = require_tvm()
    from tvm import relax

    section = manifest.get("kernels") or {}
    if section.get("backend") != "npu":
        raise ArtifactError(f"{where}: the artifact has no npu kernels (target '{manifest['target']['name']}'); "
                            "compile it with --target npu, or load it with backend='reference'")
    member = section.get("library")
    if not section.get("kernels"):
        return None, section
    name = f"kernels/{member}"
    if name not in container.member_names():
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
        lib = tvm.runtime.load_module(path)  # mapped now; the file may go
    vm = relax.VirtualMachine(lib, tvm.cpu())
    missing = [k for k in section["kernels"] if not _has_function(vm, k)]
    if missing:
        raise ArtifactError(f"{where}: npu host build lacks kernel '{missing[0]}' named in the manifest; recompile")
    return vm, section


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
