"""quantize_weights: read packed weights through ``quant.dequant``, as assign_precision decided.

Needs: ``program.attrs["precision"]["assignment"]`` (param -> format). Guarantees: every assigned
param ``%w`` is replaced by its packed graph inputs ``%w.qdata`` (and ``%w.scale``), and an op
right before the first use rebuilds ``%w`` in its old type, so users are untouched and the
reference backend holds one expanded weight at a time. The tensors themselves are packed by
ds4c.quant.packing (at compile time when embedded, at load time otherwise).

    before: param %lm_head.weight: bf16[512,64]
            %logits = aten.linear.default(%x, %lm_head.weight) : bf16[B,S,512]
    after:  param %lm_head.weight.qdata: f8e4m3[512,64], param %lm_head.weight.scale: u8[4,1]
            %lm_head.weight = quant.dequant(%lm_head.weight.qdata, %lm_head.weight.scale, format="fp8",
                                            shape=[512, 64], dtype=dtype(bf16)) : bf16[512,64]
            %logits = aten.linear.default(%x, %lm_head.weight) : bf16[B,S,512]
    with FP8 activations (target h100): %x.fp8 = quant.activation(%x, format="fp8", block=128) : bf16[B,S,64]
            %logits = aten.linear.default(%x.fp8, %lm_head.weight) : bf16[B,S,512]
    FP8 experts there: %y = moe(%x, ..., act="fp8", shared_act="fp8") (the op quantises x and h)
"""

from __future__ import annotations

from ds4c.ir.graph import Graph, GraphInput, Op, Value, replace_uses
from ds4c.ir.registry import get_op
from ds4c.ir.types import TensorType
from ds4c.passes.manager import PassContext, register_pass
from ds4c.quant.activations import ACTIVATION_BLOCKS
from ds4c.quant.formats import get_format
from ds4c.quant.packing import packed_name
from ds4c.quant.units import MOE_ACT_KWARG


@register_pass("quantize_weights")
def quantize_weights(graph: Graph, ctx: PassContext) -> Graph:
    precision = ctx.program_attrs.get("precision") or {}
    assignment = precision.get("assignment") or {}
    if not assignment:
        return graph
    activations = precision.get("activations") or {}
    users = graph.users()
    first_use = {id(op): i for i, op in enumerate(graph.ops)}
    inputs: list[GraphInput] = []
    mapping: dict[Value, Value] = {}
    inserts: dict[int, list[Op]] = {}
    for gi in graph.inputs:
        v = gi.value
        fmt_name = assignment.get(v.name) if gi.kind == "param" else None
        if fmt_name is None or v not in users or not ctx.allow_rewrite(f"pack %{v.name} as {fmt_name}"):
            inputs.append(gi)
            continue
        assert isinstance(v.type, TensorType)
        fmt = get_format(fmt_name)
        shape = tuple(int(d) for d in v.type.shape)
        packed = [Value(packed_name(v.name, part), TensorType(dt, s)) for part, (s, dt) in
                  fmt.packed_spec(shape).items()]
        inputs.extend(GraphInput("param", p) for p in packed)
        first = min(users[v], key=lambda op: first_use[id(op)])
        result = Value(v.name, v.type)
        op = Op("quant.dequant", tuple(packed), {"format": fmt.name, "shape": list(shape), "dtype": v.type.dtype},
                (result,), loc=first.loc)
        inserts.setdefault(first_use[id(first)], []).append(op)
        mapping[v] = result
    if not mapping:
        return graph
    packed_names = {v.name for v in mapping}
    packed_activations = {p: a for p, a in activations.items() if p in packed_names}
    quantized: dict[tuple[Value, str], Value] = {}  # (x, activation format) -> quant.activation result
    ops: list[Op] = []
    for i, op in enumerate(graph.ops):
        ops.extend(inserts.get(i, ()))
        if op.name == "moe":
            op = _moe_activations(op, packed_activations, ctx)
        act = _linear_activation(op, activations)
        if act is not None and ctx.allow_rewrite(f"quantise the input of {op.results[0].name} to {act}"):
            x = op.args[0]
            if (x, act) not in quantized:
                quantized[x, act] = Value(f"{x.name}.{act}", x.type)
                ops.append(Op("quant.activation", (x,), {"format": act, "block": ACTIVATION_BLOCKS[act]}, (quantized[x, act],),
                              loc=op.loc))
            op = op.replace(args=(quantized[x, act], *op.args[1:]))
        ops.append(op)
    return replace_uses(graph.copy(ops=ops, inputs=inputs), mapping)


def _moe_activations(op: Op, activations: dict[str, str], ctx: PassContext) -> Op:
    """``op`` (a ``moe``) with ``act`` / ``shared_act`` where assign_precision gave its routed /
    shared expert weights (packed by this pass: ``activations`` holds only those) an activation
    format: the op quantises x and h itself (the router reads x unquantised, so no
    ``quant.activation`` before it)."""
    kwargs = dict(op.kwargs)
    for positions, kind in get_op(op.name).unit_operands():
        key = MOE_ACT_KWARG[kind]
        acts = {activations.get(op.args[i].name) for i in positions if isinstance(op.args[i], Value)}
        act = acts.pop() if len(acts) == 1 else None
        if act is not None and kwargs.get(key) != act and ctx.allow_rewrite(f"quantise the {key} inputs of "
                                                                            f"{op.results[0].name} to {act}"):
            kwargs[key] = act
    return op if kwargs == op.kwargs else op.replace(kwargs=kwargs)


def _linear_activation(op: Op, activations: dict[str, str]) -> str | None:
    """The activation format ``op`` multiplies in, if it is an ``aten.linear`` whose weight parameter
    assign_precision gave one (FP8 weights on FP8 tensor cores)."""
    if op.name != "aten.linear.default" or len(op.args) < 2 or not isinstance(op.args[1], Value):
        return None
    x = op.args[0]
    if not isinstance(x, Value) or not isinstance(x.type, TensorType):
        return None
    return activations.get(op.args[1].name)
