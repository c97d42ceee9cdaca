"""The IR's interpreter (the ``reference`` backend): a graph run op by op with each op's PyTorch
reference, on any device.

Every artifact runs here, whatever its target, so any IR at any stage can be executed and
compared. Tensors are released after their last use, so peak memory follows the program.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ds4c.errors import InputError, IRError, RankFailure
from ds4c.ir.graph import Graph, Op, Value, map_values
from ds4c.ir.registry import OpDef, get_op, split_results
from ds4c.ir.shapes import eval_dim
from ds4c.ir.types import TensorType


def _retarget_devices(obj: Any, device: torch.device) -> Any:
    """Factory ops were traced with the trace device baked in; run them on ours."""
    if isinstance(obj, torch.device):
        return device
    if isinstance(obj, list):
        return [_retarget_devices(o, device) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_retarget_devices(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _retarget_devices(v, device) for k, v in obj.items()}
    return obj


class _ReshapeView(OpDef):
    """Graphs are functional: a view's values are a reshape's, whatever the input's strides."""

    def reference(self, x, size):
        return torch.ops.aten.reshape.default(x, size)


_FUNCTIONAL_VIEWS = {"aten.view.default": _ReshapeView(), "aten._unsafe_view.default": _ReshapeView()}


class ReferenceExecutor:
    """Runs one graph. Build once, call many times."""

    def __init__(self, graph: Graph, device: torch.device | str = "cpu",
                 on_op: Callable[[int, Op, list[Any]], None] | None = None):
        self.graph = graph
        self.device = torch.device(device)
        self.on_op = on_op
        self._steps: list[tuple[Op, OpDef, tuple, dict]] = []
        for op in graph.ops:
            opdef = _FUNCTIONAL_VIEWS.get(op.name) or get_op(op.name)
            args = _retarget_devices(op.args, self.device)
            kwargs = _retarget_devices(op.kwargs, self.device)
            self._steps.append((op, opdef, args, kwargs))
        self.constants = {k: v.to(self.device) for k, v in graph.constants.items()}
        # Values to drop after each step (last use), so activations do not pile up.
        last_use: dict[Value, int] = {}
        for i, op in enumerate(graph.ops):
            for v in op.operands:
                last_use[v] = i
        keep = set(graph.output_values())
        self._free_after: list[list[Value]] = [[] for _ in graph.ops]
        for v, i in last_use.items():
            if v not in keep:
                self._free_after[i].append(v)

    def bind_sizes(self, feeds: Mapping[Value, Any]) -> dict[str, int]:
        """Bind symbolic dims of the graph inputs from the fed tensors; check static dims and dtypes."""
        sizes: dict[str, int] = {}
        for v, t in feeds.items():
            ty = v.type
            if not isinstance(ty, TensorType):
                continue
            if not isinstance(t, torch.Tensor):
                raise InputError(f"graph @{self.graph.name}: input '{v.name}' must be a tensor of type {ty}")
            if t.dim() != len(ty.shape):
                raise InputError(f"graph @{self.graph.name}: input '{v.name}' has rank {t.dim()}, expected {ty}")
            if t.dtype != ty.dtype:
                raise InputError(f"graph @{self.graph.name}: input '{v.name}' is {t.dtype}, expected {ty}")
            for d, n in zip(ty.shape, t.shape, strict=True):
                if isinstance(d, int):
                    if d != n:
                        raise InputError(f"graph @{self.graph.name}: input '{v.name}' has shape {list(t.shape)}, "
                                         f"expected {ty}")
                elif d.isidentifier():
                    if sizes.setdefault(d, int(n)) != int(n):
                        raise InputError(f"graph @{self.graph.name}: dimension {d} is {sizes[d]} in one input and "
                                         f"{int(n)} in '{v.name}'")
        for v, t in feeds.items():
            ty = v.type
            if isinstance(ty, TensorType) and not ty.is_static:
                want = [eval_dim(d, sizes) for d in ty.shape]
                if list(t.shape) != want:
                    raise InputError(f"graph @{self.graph.name}: input '{v.name}' has shape {list(t.shape)}, "
                                     f"expected {ty} = {want}")
        return sizes

    def _begin(self, sizes: dict[str, int]) -> None:
        """Called by ``run`` once the symbolic sizes are bound, before the first op (a hook)."""

    def run(self, inputs: Mapping[str, Any], params: Mapping[str, torch.Tensor],
            state: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        env: dict[Value, Any] = {}
        state = state or {}
        for gi in self.graph.inputs:
            name = gi.value.name
            if gi.kind == "input":
                src = inputs
            elif gi.kind == "param":
                src = params
            elif gi.kind == "state":
                src = state
            else:
                src = self.constants
            if name not in src:
                raise InputError(f"graph @{self.graph.name}: {gi.kind} '{name}' was not supplied")
            env[gi.value] = src[name]
        self._begin(self.bind_sizes({gi.value: env[gi.value] for gi in self.graph.inputs
                                     if gi.kind in ("input", "state")}))
        lookup = env.__getitem__
        for i, (op, opdef, args, kwargs) in enumerate(self._steps):
            a = map_values(args, lookup)
            k = map_values(kwargs, lookup)
            try:
                out = opdef.reference(*a, **k)
            except RankFailure:  # another rank's failure, as it is
                raise
            except Exception as e:
                raise IRError(f"graph @{self.graph.name}: op #{i} {op.name} -> "
                              f"{', '.join('%' + r.name for r in op.results)} failed: {e}") from e
            outs = split_results(out)
            if len(outs) != len(op.results):
                raise IRError(f"graph @{self.graph.name}: op #{i} {op.name} returned {len(outs)} values, "
                              f"IR declares {len(op.results)}")
            for r, o in zip(op.results, outs, strict=True):
                env[r] = o
            if self.on_op is not None:
                self.on_op(i, op, outs)
            for v in self._free_after[i]:
                env.pop(v, None)
        return {name: env[v] for name, v in self.graph.outputs}


def run_graph(graph: Graph, inputs: Mapping[str, Any], params: Mapping[str, torch.Tensor],
              state: Mapping[str, torch.Tensor] | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    return ReferenceExecutor(graph, device).run(inputs, params, state)
