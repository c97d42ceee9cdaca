"""Lower an IR graph back to a ``torch.fx.GraphModule`` (for ONNX/MLIR export and torch.compile).

Weights and constants become buffers of the module; graph inputs (``input`` then ``state``, in
graph order) become the module's arguments; outputs are returned as a tuple in graph order.
Only ops whose reference is a torch op (ATen, ``sym.*``) can be lowered this way; ds4c's fused
ops are lowered through their reference function, traced in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.fx as fx

from ds4c.errors import IRError
from ds4c.ir.graph import Graph, Op, Value, map_values
from ds4c.ir.interpreter import _FUNCTIONAL_VIEWS
from ds4c.ir.registry import SYM_OPS, TorchOpDef, get_op

_SYM_FNS = {v: k for k, v in SYM_OPS.items()}


def _attr_name(name: str) -> str:
    return "w_" + "".join(c if c.isalnum() else "_" for c in name)


def to_graph_module(graph: Graph, params: Mapping[str, torch.Tensor],
                    lower_fused: Callable[[fx.Graph, Op, tuple, dict], fx.Node] | None = None,
                    ) -> tuple[fx.GraphModule, list[str]]:
    """Return (module, argument names). ``params`` supplies every ``param`` input.

    ``lower_fused(graph, op, args, kwargs)`` emits the node for a ds4c fused op (default: a call
    of its reference function); a node standing for several results is indexed with getitem.
    """
    root = torch.nn.Module()
    g = fx.Graph()
    env: dict[Value, fx.Node] = {}
    arg_names = []
    for inp in graph.inputs:
        v = inp.value
        if inp.kind in ("input", "state"):
            env[v] = g.placeholder("".join(c if c.isalnum() else "_" for c in v.name))
            arg_names.append(v.name)
    for inp in graph.inputs:
        v = inp.value
        if inp.kind in ("param", "const"):
            src = params if inp.kind == "param" else graph.constants
            if v.name not in src:
                raise IRError(f"graph @{graph.name}: {inp.kind} '{v.name}' has no tensor to embed")
            attr = _attr_name(v.name)
            root.register_buffer(attr, src[v.name].detach())
            env[v] = g.get_attr(attr)
    for op in graph.ops:
        opdef = get_op(op.name)
        args = map_values(op.args, env.__getitem__)
        kwargs = map_values(op.kwargs, env.__getitem__)
        indexed = len(op.results) != 1  # results taken from the node with getitem
        if op.name in _FUNCTIONAL_VIEWS:  # graphs are functional: a view's values are a reshape's
            node = g.call_function(torch.ops.aten.reshape.default, tuple(args), dict(kwargs))
        elif isinstance(opdef, TorchOpDef):
            node = g.call_function(opdef.overload, tuple(args), dict(kwargs))
        elif op.name in _SYM_FNS:
            node = g.call_function(_SYM_FNS[op.name], tuple(args), dict(kwargs))
        elif lower_fused is not None:
            node, indexed = lower_fused(g, op, tuple(args), dict(kwargs)), True
        else:
            node = g.call_function(opdef.reference, tuple(args), dict(kwargs))
        if not indexed:
            env[op.results[0]] = node
        else:
            import operator

            for i, r in enumerate(op.results):
                env[r] = g.call_function(operator.getitem, (node, i))
    g.output(tuple(env[v] for _, v in graph.outputs))
    gm = fx.GraphModule(root, g, class_name=f"ds4c_{graph.name}")
    return gm, arg_names

