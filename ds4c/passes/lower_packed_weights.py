"""lower_packed_weights: kernels read packed weights as stored (Triton targets).

Needs: ``quantize_weights`` (packed params read through ``quant.dequant``). Guarantees, on a
target with Triton kernels (``target.triton_target``): no ``quant.dequant`` of parameters is left.
Where every use of a dequantised weight is a kernel that reads its format as stored
(``KERNEL_FORMATS``: the weight of a bias-free ``aten.linear``, of ``linear.grouped``, or an
expert weight of ``moe``), the dequantisation goes and the uses become the op's packed variant
(``OpDef.packed_variant``: ``linear.packed`` / ``linear.grouped.packed`` / ``moe.packed``) over
the packed tensors, so a step reads FP8 / INT8 /
MXFP4 bytes; a ``quant.activation`` feeding such a linear whose weight format multiplies in that
activation format is folded into it (``act=``: the kernel quantises its input itself) and dropped
once nothing else reads it. Any other dequantised weight becomes a parameter of its own, made once
when the weights are loaded: the pass records a ``dequantize`` weight transform in
``program.attrs["weight_transforms"]`` (the manifest's transforms; an embedded artifact stores its
result), instead of expanding a whole tensor at every step.

    before: %w = quant.dequant(%w.qdata, %w.scale, format="fp8", shape=[512,64], dtype=dtype(bf16)) : bf16[512,64]
            %x.fp8 = quant.activation(%x, format="fp8", block=128) : bf16[B,S,64]
            %y = aten.linear.default(%x.fp8, %w) : bf16[B,S,512]
    after:  %y = linear.packed(%x, %w.qdata, %w.scale, format="fp8", shape=[512,64], act="fp8") : bf16[B,S,512]

    before: %e = quant.dequant(%e.qdata, %e.scale, format="int8", ...) ; %h = aten.embedding.default(%e, %ids)
    after:  param %e: bf16[V,D] (transform: dequantize %e from %e.qdata, %e.scale) ; %h = aten.embedding.default(%e, %ids)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ds4c.ir.graph import Graph, GraphInput, Op, Value
from ds4c.ir.registry import get_op
from ds4c.passes.manager import PassContext, register_pass
from ds4c.quant.activations import ACTIVATION_BLOCKS, WEIGHT_FORMATS

KERNEL_FORMATS = frozenset({"fp8", "fp8-f32scale", "int8", "mxfp4"})  # formats the Triton GEMMs read packed
TRANSFORMS = "weight_transforms"


def lowers_for(target: Any) -> bool:
    """Whether ``target`` runs Triton kernels, the lowering passes' audience."""
    return getattr(target, "triton_target", None) is not None


def record_transform(ctx: PassContext, op: str, name: str, entry: Any) -> None:
    """Record that weight ``name`` is made at load by transform ``op`` (``entry`` says from what);
    the compiler copies ``program.attrs["weight_transforms"]`` into the manifest, in order."""
    transforms: list[dict[str, Any]] = ctx.program_attrs.setdefault(TRANSFORMS, [])
    if transforms and transforms[-1]["op"] == op:
        transforms[-1]["tensors"].setdefault(name, entry)
    else:
        transforms.append({"op": op, "tensors": {name: entry}})


def _weight_positions(name: str) -> list[int]:
    """Positions of the operands of op ``name`` that are the weights of a precision unit (moe:
    gate_up, down, s_gate, s_up, s_down)."""
    return [i for positions, _ in get_op(name).unit_operands() for i in positions]


def _reads_packed(use: Op, value: Value) -> bool:
    """Whether ``use`` can take ``value`` (a dequantised weight) packed."""
    if use.name == "aten.linear.default":
        return len(use.args) >= 2 and use.args[1] is value and value not in use.args[:1] + use.args[2:] \
            and all(a is None for a in use.args[2:]) and not use.kwargs
    if use.name == "linear.grouped":
        return len(use.args) == 2 and use.args[1] is value and use.args[0] is not value
    if use.name == "moe":
        weights = _weight_positions("moe")
        return any(use.args[i] is value for i in weights) and \
            not any(a is value for i, a in enumerate(use.args) if i not in weights)
    return False


def _read_packed(op: Op, packed: Mapping[Value, tuple[str, list[int], tuple]], quantized: Mapping[Value, Op]) -> Op:
    """``op`` rewritten to read the packed weights among its operands (unchanged if none)."""
    packed_op = get_op(op.name).packed_variant
    if op.name == "aten.linear.default" and len(op.args) >= 2 and op.args[1] in packed:
        fmt, shape, tensors = packed[op.args[1]]
        x, kwargs = op.args[0], {"format": fmt, "shape": shape}
        if x in quantized and fmt in WEIGHT_FORMATS.get(quantized[x].kwargs["format"], ()):
            x, kwargs["act"] = quantized[x].args[0], quantized[x].kwargs["format"]
        return op.replace(name=packed_op, args=(x, *tensors), kwargs=kwargs)
    if op.name == "linear.grouped" and op.args[1] in packed:
        fmt, shape, tensors = packed[op.args[1]]
        return op.replace(name=packed_op, args=(op.args[0], *tensors),
                          kwargs={"format": fmt, "shape": shape, "groups": op.kwargs["groups"]})
    if op.name == "moe" and any(op.args[i] in packed for i in _weight_positions("moe")):
        # moe.packed: the operands before the weights, then each weight's tensors
        weights = _weight_positions("moe")
        formats, shapes, tensors = [], [], []
        for w in (op.args[i] for i in weights):
            fmt, shape, ts = packed.get(w, ("none", None, (w,)))
            formats.append(fmt)
            shapes.append(shape if shape is not None else list(w.type.shape))
            tensors.extend(ts)
        return op.replace(name=packed_op, args=(*op.args[:weights[0]], *tensors),
                          kwargs={**op.kwargs, "formats": formats, "shapes": shapes})
    return op


@register_pass("lower_packed_weights")
def lower_packed_weights(graph: Graph, ctx: PassContext) -> Graph:
    if not lowers_for(ctx.target):
        return graph
    params = set(graph.inputs_of_kind("param"))
    users, outputs = graph.users(), set(graph.output_values())
    packed: dict[Value, tuple[str, list[int], tuple]] = {}  # dequantised value -> (format, shape, packed operands)
    expanded: list[Value] = []
    quantized = {op.result: op for op in graph.ops if op.name == "quant.activation"
                 and op.kwargs["block"] == ACTIVATION_BLOCKS.get(op.kwargs["format"])}
    ops: list[Op] = []
    for op in graph.ops:
        if op.name == "quant.dequant" and op.operands and all(v in params for v in op.operands):
            r = op.result
            fmt = op.kwargs["format"]
            if (fmt in KERNEL_FORMATS and r not in outputs and users.get(r)
                    and all(_reads_packed(u, r) for u in users[r])
                    and ctx.allow_rewrite(f"read %{r.name} packed ({fmt})")):
                packed[r] = (fmt, list(op.kwargs["shape"]), tuple(op.args))
                continue
            if ctx.allow_rewrite(f"dequantize %{r.name} once, at load"):
                record_transform(ctx, "dequantize", r.name, {
                    "format": fmt, "shape": list(op.kwargs["shape"]),
                    "dtype": str(op.kwargs["dtype"]).removeprefix("torch."), "from": [v.name for v in op.args]})
                expanded.append(r)
                continue
        ops.append(_read_packed(op, packed, quantized) if packed else op)
    if not packed and not expanded:
        return graph
    if packed and quantized:  # quant.activation folded into every linear.packed that read it
        read = {v for op in ops for v in op.operands} | outputs
        ops = [op for op in ops if op.name != "quant.activation" or op.result in read]
    read = {v for op in ops for v in op.operands} | outputs
    inputs = [gi for gi in graph.inputs if gi.kind != "param" or gi.value in read]
    return graph.copy(ops=ops, inputs=[*inputs, *(GraphInput("param", v) for v in expanded)])
