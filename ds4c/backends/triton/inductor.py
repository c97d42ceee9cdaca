"""Whole-graph compilation: the IR lowered to an fx graph, fused ops as one opaque custom op,
everything else fused and scheduled by TorchInductor.

ds4c's passes have already made each layer a handful of fused ops (attention, MoE, mHC, ...),
which run our Triton launchers; what is left between them (projections, casts, small elementwise
chains, index arithmetic) is ordinary ATen that Inductor fuses into few kernels and sends GEMMs
to cuBLAS. Every fused op becomes ``ds4c::fused(tensors, spec)``: ``spec`` is JSON naming the op,
its attributes and the ``InductorExecutor`` whose kernel context (``KernelContext``) its launcher
is given (a custom op takes tensors and strings, not records); the fake (shape) implementation
runs the op's reference under fake tensors.
"""

from __future__ import annotations

import functools
import itertools
import json
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

from ds4c.backends.fx import to_graph_module
from ds4c.backends.triton.executor import TORCH_FALLBACKS
from ds4c.backends.triton.kernels import get_kernel
from ds4c.backends.triton.kernels.configs import KernelContext
from ds4c.errors import IRError, KernelError
from ds4c.ir.graph import Graph, Op
from ds4c.ir.interpreter import _retarget_devices
from ds4c.ir.registry import get_op, has_trait, split_results
from ds4c.ir.types import dtype_name, parse_dtype

# The executors whose compiled graphs may run, by the name their fused ops' specs give
_EXECUTORS: weakref.WeakValueDictionary[str, InductorExecutor] = weakref.WeakValueDictionary()
_NAMES = itertools.count()


def _context_of(executor: str) -> KernelContext:
    owner = _EXECUTORS.get(executor)
    if owner is None:
        raise KernelError(f"a graph compiled by InductorExecutor '{executor}' ran after that executor was dropped; "
                          "run compiled graphs through the executor (model) that compiled them")
    return owner.context


def _run_fused(name: str, args: list, kwargs: dict, executor: str, *, fake: bool) -> list[torch.Tensor]:
    opdef = get_op(name)
    if fake:  # shapes only: the portable formulation's do not depend on the data (MoE's reference's do)
        return split_results(opdef.portable(kwargs)(*args, **kwargs))
    launcher = get_kernel(name)
    out = launcher(_context_of(executor), *args, **kwargs) if launcher is not None else NotImplemented
    if out is NotImplemented and name in TORCH_FALLBACKS:
        out = TORCH_FALLBACKS[name](*args, **kwargs)
    if out is NotImplemented:
        out = opdef.reference(*args, **kwargs)
    outs = split_results(out)
    ptrs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    # a custom op may not return (views of) its inputs, and its outputs' strides must be the fake
    # implementation's: contiguous on both sides
    return [o.clone(memory_format=torch.contiguous_format) if o.untyped_storage().data_ptr() in ptrs
            else o.contiguous() for o in outs]


def _as_list(x: Any) -> list[Any]:
    return [x]


def _spec(op: str, kwargs: dict, executor: str) -> str:
    """The JSON a ``ds4c::fused`` node carries: op, attributes (a dtype as ``{"dtype": "bf16"}``) and executor."""
    def encode(x: Any) -> Any:
        if isinstance(x, torch.dtype):
            return {"dtype": dtype_name(x)}
        if isinstance(x, list | tuple):
            return [encode(v) for v in x]
        return x
    return json.dumps({"op": op, "kwargs": {k: encode(v) for k, v in kwargs.items()}, "executor": executor},
                      sort_keys=True)


def _read_spec(spec: str) -> dict[str, Any]:
    def decode(x: Any) -> Any:
        if isinstance(x, dict) and set(x) == {"dtype"}:
            return parse_dtype(x["dtype"])
        return [decode(v) for v in x] if isinstance(x, list) else x
    d = json.loads(spec)
    d["kwargs"] = {k: decode(v) for k, v in d["kwargs"].items()}
    return d


@torch.library.custom_op("ds4c::fused", mutates_args=())
def fused(args: list[torch.Tensor | None], spec: str) -> list[torch.Tensor]:
    d = _read_spec(spec)
    return _run_fused(d["op"], list(args), d["kwargs"], d["executor"], fake=False)


@fused.register_fake
def _fused_fake(args: list[torch.Tensor | None], spec: str) -> list[torch.Tensor]:
    d = _read_spec(spec)
    return [torch.empty_like(o, memory_format=torch.contiguous_format)
            for o in _run_fused(d["op"], list(args), d["kwargs"], d["executor"], fake=True)]


def _lower_fused(g: fx.Graph, op: Op, args: tuple, kwargs: dict, *, executor: str) -> fx.Node:
    # a reference that synchronises with the host (data-dependent shapes) stays opaque
    if get_kernel(op.name) is None and not has_trait(op.name, "host_sync"):
        # no Triton kernel: trace the reference in, so Inductor fuses it with its neighbours
        # (e.g. mhc.pre's Sinkhorn loop becomes a few kernels instead of a hundred)
        node = g.call_function(get_op(op.name).reference, args, kwargs)
        # to_graph_module indexes every lowered fused op's results
        return g.call_function(_as_list, (node,)) if len(op.results) == 1 else node
    for a in args:
        if a is not None and not isinstance(a, fx.Node):
            raise IRError(f"{op.name} at {op.loc}: positional operand {a!r} is not a tensor; "
                          "cannot lower it to ds4c::fused")
    try:
        spec = _spec(op.name, kwargs, executor)
    except TypeError as e:
        raise IRError(f"{op.name} at {op.loc}: attributes are not JSON ({e}); cannot lower to ds4c::fused") from e
    return g.call_function(torch.ops.ds4c.fused.default, (list(args), spec))


def inductor_options(device: torch.device, context: KernelContext) -> dict[str, Any]:
    """Inductor settings for ``device``: its kernels launch with programmatic dependent launch
    where ours do (``context.launches_with_pdl``, ``kernels/pdl.py``; the setting exists from
    torch 2.9)."""
    from torch._inductor import config as inductor_config

    if device.type != "cuda":
        return {}
    opts: dict[str, Any] = {}
    if hasattr(inductor_config.triton, "enable_pdl"):
        opts["triton.enable_pdl"] = context.launches_with_pdl
    return opts


class InductorGraph:
    """One entry point compiled whole by torch.compile (Inductor), fused ops through our kernels.

    Compiled for the sizes of the first call (``dynamic=False``); a new size recompiles. Where
    Inductor fails to compile it (an Inductor bug for that shape, e.g. torch 2.11 on flash-slice's
    32768-token prefill: ``ValueError: The argument '((-4)) + 4' is not comparable``), the entry
    point runs op by op on the Triton kernels instead (the ``kernels`` backend: same ops, same
    values), with a warning naming the entry point, its sizes and Inductor's error;
    ``fallback_error`` keeps that error.
    """

    def __init__(self, graph: Graph, params: Mapping[str, torch.Tensor], device: torch.device | str,
                 owner: InductorExecutor):
        device = torch.device(device)
        # factory ops were traced with the trace device baked in: run them on ours
        ops = [op.replace(args=_retarget_devices(op.args, device), kwargs=_retarget_devices(op.kwargs, device))
               for op in graph.ops]
        g = graph.copy(ops=ops, constants={k: v.to(device) for k, v in graph.constants.items()})
        self.graph = graph
        self.owner = owner  # whose kernel context the fused ops' launchers get
        self.module, self.arg_names = to_graph_module(
            g, params, lower_fused=functools.partial(_lower_fused, executor=owner.name))
        self.output_names = [n for n, _ in graph.outputs]
        self.device = device
        self.fn = None  # compiled at the first call, for its sizes
        self.fallback: Any = None  # a KernelExecutor where Inductor could not compile the graph
        self.fallback_error: str | None = None

    def _compile(self, args: list[Any]) -> Any:
        # The fx graph is already whole and functional: hand it to Inductor directly (AOT
        # autograd traces it with fake tensors) instead of re-tracing Python with Dynamo.
        from torch._inductor import compile as inductor_compile
        from torch._inductor import config as inductor_config

        with inductor_config.patch(inductor_options(self.device, self.owner.context)):
            return inductor_compile(self.module, args)

    def run(self, inputs: Mapping[str, Any], params: Mapping[str, torch.Tensor],
            state: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        state = state or {}
        if self.fallback is not None:
            return self.fallback.run(inputs, params, state)
        args = [inputs[n] if n in inputs else state[n] for n in self.arg_names]
        if self.fn is None:
            try:
                self.fn = self._compile(args)
            except Exception as e:  # noqa: BLE001 - any Inductor failure: the kernels still run the graph
                return self._fall_back(e, args).run(inputs, params, state)
        outs = self.fn(*args)
        return dict(zip(self.output_names, outs, strict=True))

    def _fall_back(self, error: Exception, args: list[Any]) -> Any:
        from ds4c.backends.triton.executor import KernelExecutor

        first = str(error).strip().splitlines()
        self.fallback_error = f"{type(error).__name__}: {first[-1] if first else ''}"[:500]
        sizes = {n: tuple(a.shape) for n, a in zip(self.arg_names, args, strict=True)
                 if isinstance(a, torch.Tensor) and n in {gi.value.name for gi in self.graph.inputs if gi.kind == "input"}}
        warnings.warn(f"backend 'compiled': TorchInductor could not compile entry point '{self.graph.name}' for inputs "
                      f"{sizes} ({self.fallback_error}); it runs op by op on the Triton kernels instead (backend "
                      "'kernels': same ops, same values; only the glue between kernels is not fused)",
                      RuntimeWarning, stacklevel=3)
        self.fallback = KernelExecutor(self.graph, self.device, context=self.owner.context)
        return self.fallback


class InductorExecutor:
    """An entry point compiled per input shape (a few kept), with the executor interface.

    ``context``: the kernel context its fused ops' launchers are given (``KernelExecutor``); its
    owner may give it another (``executor.context = ...``), which the next run uses without
    recompiling (a compiled graph names the executor, not the context)."""

    def __init__(self, graph: Graph, params: Mapping[str, torch.Tensor], device: torch.device | str, *,
                 context: KernelContext, max_shapes: int = 4):
        self.graph = graph
        self.params = params
        self.device = torch.device(device)
        self.max_shapes = max_shapes
        self._compiled: dict[tuple, InductorGraph] = {}
        self.context = context
        self.name = f"{graph.name}-{next(_NAMES)}"
        _EXECUTORS[self.name] = self

    @property
    def context(self) -> KernelContext:
        return self._context

    @context.setter
    def context(self, context: KernelContext) -> None:
        if not isinstance(context, KernelContext):
            raise KernelError(f"InductorExecutor needs a KernelContext (ds4c.backends.triton.kernels.configs) for "
                              f"its launchers, got {type(context).__name__}")
        self._context = context
        for ig in self._compiled.values():  # shapes that run op by op (KernelExecutor)
            if ig.fallback is not None:
                ig.fallback.context = context

    def run(self, inputs: Mapping[str, Any], params: Mapping[str, torch.Tensor],
            state: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        key = tuple((k, tuple(v.shape)) for k, v in sorted({**inputs, **(state or {})}.items()))
        ig = self._compiled.get(key)
        if ig is None:
            if len(self._compiled) >= self.max_shapes:
                self._compiled.pop(next(iter(self._compiled)))
            ig = self._compiled[key] = InductorGraph(self.graph, params, self.device, self)
        return ig.run(inputs, params, state)

    def take_captured(self) -> list[torch.Tensor]:
        """Arenas of captured runs of the shapes that fell back to the kernels (``KernelExecutor``)."""
        return [a for ig in self._compiled.values() if ig.fallback is not None for a in ig.fallback.take_captured()]

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"compiled_shapes": sum(ig.fallback is None for ig in self._compiled.values())}
        errors = {str(key): ig.fallback_error for key, ig in self._compiled.items() if ig.fallback is not None}
        if errors:
            out["inductor_fallbacks"] = errors
        return out
