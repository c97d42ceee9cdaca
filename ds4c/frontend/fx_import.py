"""Import a ``torch.export.ExportedProgram`` into a ds4c ``Graph``.

The exported program is first brought to the functional ATen inference IR
(``run_decompositions({})``: no in-place ops, no autograd wrappers, nothing decomposed further).
Placeholders become graph inputs with a kind (param, const, state, input); FX ``getitem`` nodes
become extra results of the op they index; ``operator.*`` on sizes becomes ``sym.*``; runtime shape
assertions are dropped (the runtime checks inputs against the graph's types instead).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from ds4c.errors import IRError
from ds4c.ir.graph import Graph, GraphInput, Op, Value
from ds4c.ir.registry import SYM_OPS
from ds4c.ir.shapes import dim_expr, format_dim
from ds4c.ir.types import IRType, ScalarType, TensorType
from ds4c.ops import TORCH_OPS

_DROPPED = {
    "aten._assert_scalar.default",
    "aten._assert_tensor_metadata.default",
    "aten.sym_constrain_range_for_size.default",
    "aten.sym_constrain_range.default",
    "aten._assert_async.msg",
    "aten._assert_async.default",
}


def _dim(d: Any) -> int | str:
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt):
        node = d.node
        if node.is_constant() if hasattr(node, "is_constant") else False:
            return int(d)
        expr = node.expr
        return format_dim(dim_expr(_sympy_text(expr)))
    raise IRError(f"unsupported dimension {d!r}")


def _sympy_text(expr: Any) -> str:
    """torch's sympy printing of FloorDiv/Mod/CeilToInt etc., reduced to our dimension grammar."""
    import sympy
    from torch.utils._sympy.functions import (
        CeilToInt,
        CleanDiv,
        FloorDiv,
        FloorToInt,
        Mod,
        ModularIndexing,
        PythonMod,
    )

    def conv(e: Any) -> sympy.Expr:
        if isinstance(e, FloorDiv | CleanDiv):
            return sympy.floor(conv(e.args[0]) / conv(e.args[1]))
        if isinstance(e, Mod | PythonMod):
            return sympy.Mod(conv(e.args[0]), conv(e.args[1]))
        if isinstance(e, ModularIndexing):
            base, div, mod = (conv(a) for a in e.args)
            return sympy.Mod(sympy.floor(base / div), mod)
        if isinstance(e, CeilToInt):
            return sympy.ceiling(conv(e.args[0]))
        if isinstance(e, FloorToInt):
            return sympy.floor(conv(e.args[0]))
        if isinstance(e, sympy.Symbol):
            return sympy.Symbol(e.name, integer=True, positive=True)
        if e.args:
            return e.func(*[conv(a) for a in e.args])
        return e

    from ds4c.ir.shapes import _to_text

    out = conv(expr)
    return str(out) if out.is_Integer else _to_text(out)


def _type_of(val: Any, where: str) -> IRType:
    if isinstance(val, torch.Tensor):
        return TensorType(val.dtype, tuple(_dim(d) for d in val.shape))
    if isinstance(val, torch.SymInt | int) and not isinstance(val, bool):
        return ScalarType("int")
    if isinstance(val, torch.SymFloat | float):
        return ScalarType("float")
    if isinstance(val, torch.SymBool | bool):
        return ScalarType("bool")
    raise IRError(f"{where}: cannot type value {type(val).__name__}")


def _op_name(target: Any, where: str) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        if ns == "ds4c" and target._schema.name in TORCH_OPS:  # ds4c's custom ops: the IR ops they are
            return TORCH_OPS[target._schema.name]
        return f"{ns}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    if target in SYM_OPS:
        return SYM_OPS[target]
    raise IRError(f"{where}: unsupported call target {target!r}; add it to the importer or the op registry")


def _convert_arg(obj: Any, env: dict[torch.fx.Node, Any], where: str) -> Any:
    if isinstance(obj, torch.fx.Node):
        if obj not in env:
            raise IRError(f"{where}: uses node {obj.name} that was not imported")
        return env[obj]
    if isinstance(obj, list | tuple):
        return [_convert_arg(o, env, where) for o in obj]
    if isinstance(obj, dict):
        return {k: _convert_arg(v, env, where) for k, v in obj.items()}
    if isinstance(obj, torch.device) and obj.type == "meta":
        return torch.device("cpu")  # traced on the meta device; the runtime retargets devices anyway
    if isinstance(obj, torch.SymInt | torch.SymFloat | torch.SymBool):
        raise IRError(f"{where}: a symbolic scalar appears without a node; re-export with dynamic shapes")
    return obj


def import_exported_program(
    ep: ExportedProgram,
    name: str,
    *,
    input_names: Sequence[str] | None = None,
    state_names: Sequence[str] = (),
    output_names: Sequence[str] | None = None,
    param_prefix: str = "",
    decompose: bool = True,
) -> Graph:
    """Turn an exported program into a Graph.

    ``input_names``: names for the user inputs in order; the trailing ``len(state_names)`` user
    inputs are model state and get kind ``state``. ``output_names``: names of the user outputs.
    ``param_prefix`` is stripped from parameter and buffer names (wrapper modules add one).
    """
    if decompose:
        ep = ep.run_decompositions({})
    sig = ep.graph_signature
    specs = {s.arg.name: s for s in sig.input_specs}
    non_persistent = set(sig.non_persistent_buffers)
    user_nodes = [n for n in ep.graph.nodes if n.op == "placeholder" and specs[n.name].kind == InputKind.USER_INPUT]
    n_state = len(state_names)
    if input_names is None:
        input_names = [n.name for n in user_nodes[: len(user_nodes) - n_state]]
    names_in_order = list(input_names) + list(state_names)
    if len(names_in_order) != len(user_nodes):
        raise IRError(f"graph @{name}: exported program has {len(user_nodes)} user inputs, "
                      f"{len(names_in_order)} names given")
    user_name = {n: nm for n, nm in zip(user_nodes, names_in_order, strict=True)}

    env: dict[torch.fx.Node, Any] = {}
    inputs: list[GraphInput] = []
    ops: list[Op] = []
    constants: dict[str, torch.Tensor] = {}
    taken: set[str] = set()

    def fresh(base: str) -> str:
        base = base.replace("/", ".")
        cand, i = base, 1
        while cand in taken:
            cand = f"{base}_{i}"
            i += 1
        taken.add(cand)
        return cand

    state_set = set(state_names)
    for node in ep.graph.nodes:
        where = f"graph @{name}: node {node.name}"
        if node.op == "placeholder":
            spec = specs[node.name]
            ty = _type_of(node.meta["val"], where)
            if spec.kind == InputKind.USER_INPUT:
                nm = user_name[node]
                kind = "state" if nm in state_set else "input"
            elif spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.target not in non_persistent):
                nm = spec.target.removeprefix(param_prefix)
                kind = "param"
            elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                nm = spec.target.removeprefix(param_prefix)
                kind = "const"
                tensor = ep.constants.get(spec.target)
                if tensor is None:
                    tensor = ep.state_dict.get(spec.target)
                if tensor is None:
                    raise IRError(f"{where}: constant {spec.target} has no value in the exported program")
                if tensor.is_meta:
                    raise IRError(f"{where}: constant {spec.target} is on the meta device; build small buffers on "
                                  "the CPU even when weights are meta")
                constants[nm] = tensor.detach().clone()
            else:
                raise IRError(f"{where}: unsupported input kind {spec.kind}")
            v = Value(fresh(nm), ty)
            if kind == "const":
                constants[v.name] = constants.pop(nm)
            env[node] = v
            inputs.append(GraphInput(kind, v))
        elif node.op == "call_function":
            if node.target is operator.getitem:
                src = env[node.args[0]]
                if not isinstance(src, list):
                    raise IRError(f"{where}: getitem on a single value")
                env[node] = src[node.args[1]]
                continue
            opname = _op_name(node.target, where)
            if opname in _DROPPED:
                continue
            args = tuple(_convert_arg(a, env, where) for a in node.args)
            kwargs = {k: _convert_arg(v, env, where) for k, v in node.kwargs.items()}
            val = node.meta.get("val")
            loc = _module_path(node, param_prefix)
            if isinstance(val, list | tuple):
                results = [Value(fresh(f"{node.name}_{i}" if i else node.name), _type_of(x, where))
                           for i, x in enumerate(val)]
                env[node] = results
            else:
                results = [Value(fresh(node.name), _type_of(val, where))]
                env[node] = results[0]
            ops.append(Op(opname, args, kwargs, tuple(results), loc))
        elif node.op == "output":
            pass
        else:
            raise IRError(f"{where}: unsupported node kind {node.op}")

    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    out_specs = sig.output_specs
    flat = out_node.args[0]
    user_outs = [env[a] for a, s in zip(flat, out_specs, strict=True) if s.kind.name == "USER_OUTPUT"]
    if output_names is None:
        output_names = [f"out{i}" for i in range(len(user_outs))]
    if len(output_names) != len(user_outs):
        raise IRError(f"graph @{name}: {len(user_outs)} outputs, {len(output_names)} names given")
    outputs = list(zip(output_names, user_outs, strict=True))
    return Graph(name, inputs, ops, outputs, constants)


def _module_path(node: torch.fx.Node, prefix: str) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = path.removeprefix("L['self'].").removeprefix("L__self__.")
    path = path.removeprefix(prefix)
    if path.startswith("_empty"):
        return None
    return path or None
