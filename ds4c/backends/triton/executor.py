"""Triton kernel dispatch: runs a graph with Triton kernels for fused ops, torch (cuBLAS) for the rest.

``KernelExecutor`` is the reference executor with a different op table: every op that has a
registered launcher (``ds4c.backends.triton.kernels``) runs it; a launcher that declines an instance
(``NotImplemented``) falls back to the op's reference, and the executor counts both so
``stats()`` says what ran where. It works on any device Triton reaches (CUDA, ROCm builds of
PyTorch, CPU under ``TRITON_INTERPRET=1``, and ``meta``, where ``launches`` records what the
program launches for the ahead-of-time compile). It runs the ops in program order on one stream;
the runtime's ``ScheduledExecutor`` (``ds4c.runtime.executor``) adds the compiled issue order,
streams, events and memory plan.

Its ``context`` (``kernels.configs.KernelContext``: kernel target, tuning table, ``pdl`` option) is
given at construction by whoever builds it (``ds4c.load``, the ahead-of-time launch recording) and
handed to every launch; its owner may give it another (``executor.context = ...``: a tuning table
measured later), which the next launch uses.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from ds4c.backends.triton.kernels import get_kernel
from ds4c.backends.triton.kernels.configs import KernelContext
from ds4c.errors import KernelError
from ds4c.ir.graph import Graph, Op
from ds4c.ir.interpreter import ReferenceExecutor
from ds4c.ir.registry import OpDef, get_op


class _KernelOp(OpDef):
    """An op run by its Triton launcher, given the executor's kernel context (``owner``; a torch
    fallback of ``TORCH_FALLBACKS`` takes none), falling back to the reference when the launcher
    declines."""

    def __init__(self, inner: OpDef, launcher: Callable[..., Any], counts: Counter, owner: KernelExecutor | None):
        self.inner = inner
        self.launcher = launcher
        self.counts = counts
        self.owner = owner
        self.name = inner.name

    def reference(self, *args: Any, **kwargs: Any) -> Any:
        if self.owner is not None:
            out = self.launcher(self.owner.context, *args, **kwargs)
        else:
            out = self.launcher(*args, **kwargs)
        if out is NotImplemented:
            self.counts[(self.name, "reference")] += 1
            return self.inner.reference(*args, **kwargs)
        self.counts[(self.name, "kernel")] += 1
        return out


def _moe_without_host_sync(*args: Any, **kwargs: Any) -> Any:
    """``moe`` with no kernel: the reference groups tokens by expert on the host (a sync, so no
    CUDA graph); for a few tokens run the op's portable formulation instead (it gathers the picked
    experts' weights: static shapes)."""
    x, gate_up = args[0], args[4]
    pairs = x.numel() // x.shape[-1] * kwargs["top_k"]
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if pairs > gate_up.shape[0] and not capturing:
        return NotImplemented
    return get_op("moe").portable(kwargs)(*args, **kwargs)


# Torch formulations used when no Triton launcher is registered for the op.
TORCH_FALLBACKS: dict[str, Callable[..., Any]] = {"moe": _moe_without_host_sync}


class KernelExecutor(ReferenceExecutor):
    """Ops with a Triton launcher run it (``use_kernels``), given ``context``; the rest their torch
    reference."""

    def __init__(self, graph: Graph, device: torch.device | str = "cuda",
                 on_op: Callable[[int, Op, list[Any]], None] | None = None, *, context: KernelContext,
                 use_kernels: bool = True):
        super().__init__(graph, device, on_op)
        if not isinstance(context, KernelContext):
            raise KernelError(f"KernelExecutor needs a KernelContext (ds4c.backends.triton.kernels.configs) for its "
                              f"launchers, got {type(context).__name__}")
        self.context = context
        self.counts: Counter = Counter()
        if use_kernels:
            steps = []
            for op, opdef, args, kwargs in self._steps:
                launcher = get_kernel(op.name)
                if launcher is not None:
                    opdef = _KernelOp(opdef, launcher, self.counts, self)
                elif op.name in TORCH_FALLBACKS:
                    opdef = _KernelOp(opdef, TORCH_FALLBACKS[op.name], self.counts, None)
                steps.append((op, opdef, args, kwargs))
            self._steps = steps

    def runs_kernel(self, index: int) -> bool:
        """Whether step ``index`` runs a registered Triton launcher (which can write into a given
        result buffer, ``kernels.planned_results``)."""
        op, opdef = self._steps[index][0], self._steps[index][1]
        return isinstance(opdef, _KernelOp) and get_kernel(op.name) is not None

    def take_captured(self) -> list[torch.Tensor]:
        """Arenas of runs captured into CUDA graphs: none here (see ``ScheduledExecutor``)."""
        return []

    def stats(self) -> dict[str, dict[str, int]]:
        """Per fused op name: how many calls ran a kernel and how many fell back to the reference."""
        out: dict[str, dict[str, int]] = {}
        for (name, how), n in self.counts.items():
            out.setdefault(name, {})[how] = n
        return out
