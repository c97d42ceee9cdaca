"""ONNX frontend: an ONNX model -> a ds4c IR Program, compiled by the same pipeline as a traced model.

    ds4c compile model.onnx --target cpu        ds4c.compile("model.onnx", target="cpu")

The file holds one entry point (``prefill`` or ``decode``, metadata ``ds4c.entry``; ``prefill`` by
default) with static shapes. Mapping:

- nodes of domain ``ds4c`` (what ``ds4c export --format onnx`` writes for fused ops) become the
  ds4c op their ``ds4c_spec`` attribute names, with its attributes exactly; their function bodies
  are not read. The spec may name only ds4c's own fused ops (an ATen op, or one outside the IR's
  allow-list ``ds4c.ir.allowed_aten``, is refused before anything runs), and its attributes are
  JSON values and dtypes from a fixed table: nothing in the file names a module, callable or file;
- ``DequantizeLinear`` of a weight ``<param>.qdata`` that metadata ``ds4c.quantized`` lists becomes
  ``quant.dequant`` in that format, with the packed scale recovered from the QDQ scale (exact);
  any other ``DequantizeLinear`` becomes ATen arithmetic;
- standard ONNX ops become core (ATen-level) IR ops (``_CONVERTERS``); an op without a mapping is an
  error naming the node, its op_type and what to do. Attributes are read only with the types
  ``_ATTR_TYPES`` gives (no subgraphs); tensors' external data only through ``onnx.load``, which
  keeps it inside the model's directory.

Initializers listed in metadata ``ds4c.params`` (all of them when absent) are the model's weights
(``param`` inputs, loaded from the file); the other initializers and ``Constant`` nodes are graph
constants. Metadata ``ds4c.config`` (the model config, as in ``config.json``), ``ds4c.state`` (state
layout) and ``ds4c.max_context`` describe the model; ``ds4c export`` writes them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ds4c.errors import ConfigError, IRError
from ds4c.ir.graph import Graph, GraphInput, Op, Program, Value
from ds4c.ir.types import DTYPE_NAMES, TensorType

DOMAIN = "ds4c"


# -- reading the file -----------------------------------------------------------------------------
def load_model(path: str | Path, *, weights: bool = True) -> Any:
    import onnx

    path = Path(path)
    try:
        return onnx.load(str(path), load_external_data=weights)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ConfigError(f"{path}: not a readable ONNX model ({e})") from e


def metadata(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def onnx_config(path: str | Path) -> dict[str, Any]:
    """The model config recorded in the file (metadata ``ds4c.config``)."""
    meta = metadata(load_model(path, weights=False))
    if "ds4c.config" not in meta:
        raise ConfigError(f"{path}: ONNX metadata has no 'ds4c.config' (the model's config.json as JSON); "
                          "export it with `ds4c export --format onnx`, or add the entry to metadata_props")
    return json.loads(meta["ds4c.config"])


def _torch_dtype(elem: int) -> torch.dtype:
    import onnx

    table = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
             onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
             onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
             onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT8: torch.int8,
             onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
             onnx.TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn, onnx.TensorProto.FLOAT8E5M2: torch.float8_e5m2}
    if elem not in table:
        raise ConfigError(f"ONNX element type {onnx.TensorProto.DataType.Name(elem)} has no ds4c dtype")
    return table[elem]


def to_tensor(proto: Any) -> torch.Tensor:
    """An ONNX TensorProto as a torch tensor (float8 and bfloat16 through their raw bytes)."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    if uses_external_data(proto):  # onnx.load reads external data (inside the model's directory only)
        raise ConfigError(f"ONNX tensor '{proto.name}' keeps its data in an external file that was not loaded with "
                          "the model; ds4c reads external data only through onnx.load of the model file")
    dtype = _torch_dtype(proto.data_type)
    if dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2) and proto.HasField("raw_data"):
        raw = torch.frombuffer(bytearray(proto.raw_data), dtype=torch.uint8)
        return raw.view(dtype).reshape(tuple(proto.dims)).clone()
    arr = numpy_helper.to_array(proto)
    if proto.data_type in (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2):
        return torch.from_numpy(arr.astype("float32")).to(dtype)
    return torch.from_numpy(arr.copy()).reshape(tuple(proto.dims))


def load_onnx_weights(path: str | Path, expected: Any, *, dtype: torch.dtype | None = None,
                      device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The weights ``expected`` names (shape, dtype), read from the file (QDQ scales recovered)."""
    model = load_model(path)
    tensors = {i.name: i for i in model.graph.initializer}
    recovered = _recovered_scales(model)
    out = {}
    for name, (shape, want) in expected.items():
        if name in recovered:
            t = recovered[name]
        elif name in tensors:
            t = to_tensor(tensors[name])
        else:
            raise ConfigError(f"{path}: the ONNX model has no initializer '{name}'")
        if tuple(t.shape) != tuple(shape):
            raise ConfigError(f"{path}: initializer '{name}' has shape {list(t.shape)}, expected {list(shape)}")
        out[name] = t.to(device=device, dtype=want)
    return out


# -- QDQ weights back to packed formats -------------------------------------------------------------
def _quantized(model: Any) -> dict[str, str]:
    return json.loads(metadata(model).get("ds4c.quantized") or "{}")


def _packed_dequant(node: Any, quantized: dict[str, str], inits: dict[str, Any]) -> tuple[str, str] | None:
    """(param, format) when ``node`` is the QDQ form of a packed ds4c weight."""
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or not node.input[0].endswith(".qdata"):
        return None
    param = node.input[0].removesuffix(".qdata")
    fmt = quantized.get(param)
    if fmt not in ("int8", "fp8", "fp8-f32scale") or node.input[0] not in inits or node.input[1] not in inits:
        return None
    return param, fmt


def _recovered_scales(model: Any) -> dict[str, torch.Tensor]:
    """``<param>.scale`` as the artifact stores it, from the QDQ scale (see ds4c.export.onnx)."""
    from ds4c.quant.formats import FP8_BLOCK, ue8m0_bits

    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        hit = _packed_dequant(node, _quantized(model), inits)
        if hit is None:
            continue
        param, fmt = hit
        scale = to_tensor(inits[node.input[1]])
        if fmt != "int8":  # repeated over the 128 rows of each block: take one row per block
            scale = scale[..., ::FP8_BLOCK, :].contiguous()
            if fmt == "fp8":
                scale = ue8m0_bits(scale)
        out[param + ".scale"] = scale
    return out


# -- building the IR --------------------------------------------------------------------------------
class _Builder:
    """Emits IR ops for one ONNX graph; knows every value's type and the constants' values."""

    def __init__(self, name: str):
        self.name = name
        self.values: dict[str, Value] = {}
        self.consts: dict[str, torch.Tensor] = {}  # ONNX name -> value, for constant operands
        self.const_inputs: dict[str, torch.Tensor] = {}
        self.inputs: list[GraphInput] = []
        self.ops: list[Op] = []
        self.taken: set[str] = set()
        self.types: dict[str, TensorType] = {}

    def fresh(self, base: str) -> str:
        base = "".join(c if c.isalnum() or c in "._" else "_" for c in base) or "v"
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def value(self, onnx_name: str, node: Any = None) -> Value:
        if onnx_name in self.values:
            return self.values[onnx_name]
        if onnx_name in self.consts:  # a constant used as a tensor operand: a const input of the graph
            t = self.consts[onnx_name]
            v = Value(self.fresh(onnx_name), TensorType(t.dtype, tuple(t.shape)))
            self.inputs.append(GraphInput("const", v))
            self.const_inputs[v.name] = t
            self.values[onnx_name] = v
            return v
        where = f" (input of {node.op_type} node '{node.name}')" if node is not None else ""
        raise IRError(f"ONNX value '{onnx_name}'{where} is used before it is defined")

    def const(self, onnx_name: str, node: Any, what: str) -> torch.Tensor:
        if onnx_name not in self.consts:
            raise IRError(f"ONNX node '{node.name}' ({node.op_type}): its {what} ('{onnx_name}') must be a constant "
                          "(an initializer or Constant node): ds4c imports static-shape models; re-export with "
                          "static shapes and constant folding")
        return self.consts[onnx_name]

    def emit(self, name: str, args: tuple, kwargs: dict, types: list[TensorType], base: str) -> list[Value]:
        results = tuple(Value(self.fresh(base), t) for t in types)
        self.ops.append(Op(name, args, kwargs, results))
        return list(results)

    def type_of(self, onnx_name: str) -> TensorType:
        if onnx_name in self.types:
            return self.types[onnx_name]
        if onnx_name in self.consts:
            t = self.consts[onnx_name]
            return TensorType(t.dtype, tuple(t.shape))
        raise IRError(f"ONNX value '{onnx_name}' has no static type (value_info); run onnx shape inference with "
                      "static input shapes before importing")


# The attributes the converters read, with the one ONNX type each may have. Nothing else of an
# attribute is used: a subgraph, a sparse tensor or a type proto is refused wherever it appears.
_ATTR_TYPES = {"axis": "INT", "perm": "INTS", "fmod": "INT", "reduction": "STRING", "value": "TENSOR",
               "keepdims": "INT", "largest": "INT", "sorted": "INT", "block_size": "INT", "value_float": "FLOAT",
               "value_int": "INT", "value_floats": "FLOATS", "value_ints": "INTS", "ds4c_spec": "STRING"}
_PLAIN_ATTR_TYPES = ("FLOAT", "INT", "STRING", "TENSOR", "FLOATS", "INTS", "STRINGS")


def _attrs(node: Any) -> dict[str, Any]:
    """The node's attributes as Python values, each of the type ds4c reads it as (``_ATTR_TYPES``)."""
    from onnx import AttributeProto, helper

    out = {}
    for a in node.attribute:
        kind = AttributeProto.AttributeType.Name(a.type) if a.type in AttributeProto.AttributeType.values() \
            else str(a.type)
        want = _ATTR_TYPES.get(a.name)
        if kind not in _PLAIN_ATTR_TYPES or (want is not None and kind != want):
            raise IRError(f"ONNX node '{node.name}' ({node.op_type}): attribute '{a.name}' is {kind}, ds4c reads "
                          f"{want or 'numbers, strings and tensors'} there; re-export the model with standard "
                          "attributes (no subgraphs)")
        if a.ref_attr_name:
            raise IRError(f"ONNX node '{node.name}' ({node.op_type}): attribute '{a.name}' refers to a function "
                          f"attribute '{a.ref_attr_name}'; ds4c imports main-graph nodes with literal attributes")
        out[a.name] = helper.get_attribute_value(a)
    return out


def _required(attrs: dict[str, Any], name: str, node: Any) -> Any:
    if name not in attrs:
        raise IRError(f"ONNX node '{node.name}' ({node.op_type}) has no '{name}' attribute, which the op requires; "
                      "check the model with onnx.checker")
    return attrs[name]


Converter = Callable[[_Builder, Any, dict[str, Any], list[TensorType]], list[Value]]
_CONVERTERS: dict[str, Converter] = {}


def _converter(*op_types: str) -> Callable[[Converter], Converter]:
    def deco(fn: Converter) -> Converter:
        for t in op_types:
            _CONVERTERS[t] = fn
        return fn

    return deco


def _ins(b: _Builder, node: Any) -> list[Value | None]:
    return [b.value(i, node) if i else None for i in node.input]


def _simple(aten: str) -> Converter:
    def conv(b: _Builder, node: Any, attrs: dict, out: list[TensorType]) -> list[Value]:
        return b.emit(aten, tuple(_ins(b, node)), {}, out, node.output[0])

    return conv


for _onnx, _aten in {
    "Add": "aten.add.Tensor", "Sub": "aten.sub.Tensor", "Mul": "aten.mul.Tensor", "Pow": "aten.pow.Tensor_Tensor",
    "MatMul": "aten.matmul.default", "Sqrt": "aten.sqrt.default", "Exp": "aten.exp.default",
    "Log": "aten.log.default", "Sin": "aten.sin.default", "Cos": "aten.cos.default", "Tanh": "aten.tanh.default",
    "Sigmoid": "aten.sigmoid.default", "Neg": "aten.neg.default", "Abs": "aten.abs.default",
    "Reciprocal": "aten.reciprocal.default", "Relu": "aten.relu.default", "Erf": "aten.erf.default",
    "Softplus": "aten.softplus.default", "Floor": "aten.floor.default", "Ceil": "aten.ceil.default",
    "Equal": "aten.eq.Tensor", "Less": "aten.lt.Tensor", "LessOrEqual": "aten.le.Tensor",
    "Greater": "aten.gt.Tensor", "GreaterOrEqual": "aten.ge.Tensor", "And": "aten.logical_and.default",
    "Or": "aten.logical_or.default", "Xor": "aten.logical_xor.default", "Not": "aten.logical_not.default",
    "Where": "aten.where.self", "Max": "aten.maximum.default", "Min": "aten.minimum.default",
}.items():
    _CONVERTERS[_onnx] = _simple(_aten)


@_converter("Div")
def _div(b, node, attrs, out):
    x, y = _ins(b, node)
    if out[0].dtype.is_floating_point:
        return b.emit("aten.div.Tensor", (x, y), {}, out, node.output[0])
    return b.emit("aten.div.Tensor_mode", (x, y), {"rounding_mode": "trunc"}, out, node.output[0])


@_converter("Mod")
def _mod(b, node, attrs, out):
    name = "aten.fmod.Tensor" if attrs.get("fmod", 0) else "aten.remainder.Tensor"
    return b.emit(name, tuple(_ins(b, node)), {}, out, node.output[0])


@_converter("Identity")
def _identity(b, node, attrs, out):
    return [b.value(node.input[0], node)]


@_converter("Cast")
def _cast(b, node, attrs, out):
    return b.emit("aten._to_copy.default", (b.value(node.input[0], node),), {"dtype": out[0].dtype}, out,
                  node.output[0])


@_converter("Softmax")
def _softmax(b, node, attrs, out):
    return b.emit("aten._softmax.default", (b.value(node.input[0], node), attrs.get("axis", -1), False), {}, out,
                  node.output[0])


@_converter("Reshape")
def _reshape(b, node, attrs, out):
    return b.emit("aten.reshape.default", (b.value(node.input[0], node), list(out[0].shape)), {}, out, node.output[0])


@_converter("Transpose")
def _transpose(b, node, attrs, out):
    x = b.value(node.input[0], node)
    perm = attrs.get("perm") or list(reversed(range(len(x.type.shape))))
    return b.emit("aten.permute.default", (x, list(perm)), {}, out, node.output[0])


@_converter("Unsqueeze", "Squeeze", "Flatten")
def _reshape_like(b, node, attrs, out):
    # static shapes: every rank change is a reshape to the known result shape
    return b.emit("aten.reshape.default", (b.value(node.input[0], node), list(out[0].shape)), {}, out,
                  node.output[0])


@_converter("Expand")
def _expand(b, node, attrs, out):
    return b.emit("aten.expand.default", (b.value(node.input[0], node), list(out[0].shape)), {}, out, node.output[0])


@_converter("Concat")
def _concat(b, node, attrs, out):
    return b.emit("aten.cat.default", ([b.value(i, node) for i in node.input], _required(attrs, "axis", node)), {}, out,
                  node.output[0])


@_converter("Slice")
def _slice(b, node, attrs, out):
    x = b.value(node.input[0], node)
    rank = len(x.type.shape)
    starts = b.const(node.input[1], node, "starts").tolist()
    ends = b.const(node.input[2], node, "ends").tolist()
    axes = b.const(node.input[3], node, "axes").tolist() if len(node.input) > 3 and node.input[3] else \
        list(range(len(starts)))
    steps = b.const(node.input[4], node, "steps").tolist() if len(node.input) > 4 and node.input[4] else \
        [1] * len(starts)
    cur = x
    for i, (s, e, a, st) in enumerate(zip(starts, ends, axes, steps, strict=True)):
        if st < 1:
            raise IRError(f"ONNX node '{node.name}' (Slice): step {st} < 1 has no ds4c mapping; reverse with a "
                          "Gather of constant indices instead")
        a = a % rank
        shape = list(cur.type.shape)
        n = shape[a]
        s, e = max(min(s + n if s < 0 else s, n), 0), max(min(e + n if e < 0 else e, n), 0)
        shape[a] = max(0, -(-(e - s) // st))
        last = i == len(starts) - 1
        cur = b.emit("aten.slice.Tensor", (cur, a, s, e, st), {}, [out[0] if last else TensorType(x.type.dtype,
                     tuple(shape))], node.output[0])[0]
    return [cur]


def _wrap_indices(b: _Builder, node: Any, idx: Value, size: int) -> Value:
    """ONNX indices may be negative (counted from the end); ATen's index ops take them non-negative."""
    return b.emit("aten.remainder.Scalar", (idx, size), {}, [idx.type], node.output[0] + "_index")[0]


@_converter("Gather")
def _gather(b, node, attrs, out):
    x = b.value(node.input[0], node)
    axis = attrs.get("axis", 0) % len(x.type.shape)
    size = int(x.type.shape[axis])
    if node.input[1] in b.consts:
        idx_t = b.consts[node.input[1]]
        if idx_t.dim() == 0:
            return b.emit("aten.select.int", (x, axis, int(idx_t) % size), {}, out, node.output[0])
    idx = _wrap_indices(b, node, b.value(node.input[1], node), size)
    flat = idx
    if len(idx.type.shape) != 1:
        flat = b.emit("aten.reshape.default", (idx, [-1]), {}, [TensorType(idx.type.dtype, (_numel(idx.type),))],
                      node.output[0] + "_flat")[0]
    shape = list(x.type.shape)
    shape[axis] = _numel(idx.type)
    picked = b.emit("aten.index_select.default", (x, axis, flat), {}, [TensorType(x.type.dtype, tuple(shape))],
                    node.output[0])[0]
    if list(picked.type.shape) == list(out[0].shape):
        return [picked]
    return b.emit("aten.reshape.default", (picked, list(out[0].shape)), {}, out, node.output[0])


def _numel(t: TensorType) -> int:
    n = 1
    for d in t.shape:
        n *= int(d)
    return n


@_converter("GatherElements")
def _gather_elements(b, node, attrs, out):
    x = b.value(node.input[0], node)
    axis = attrs.get("axis", 0) % len(x.type.shape)
    idx = _wrap_indices(b, node, b.value(node.input[1], node), int(x.type.shape[axis]))
    return b.emit("aten.gather.default", (x, axis, idx), {}, out, node.output[0])


@_converter("ScatterElements")
def _scatter_elements(b, node, attrs, out):
    x, idx, upd = _ins(b, node)
    if attrs.get("reduction", b"none") not in (b"none", "none"):
        raise IRError(f"ONNX node '{node.name}' (ScatterElements): reduction {attrs['reduction']!r} has no ds4c "
                      "mapping; only reduction='none' is imported")
    axis = attrs.get("axis", 0) % len(x.type.shape)
    idx = _wrap_indices(b, node, idx, int(x.type.shape[axis]))
    return b.emit("aten.scatter.src", (x, axis, idx, upd), {}, out, node.output[0])


@_converter("ConstantOfShape")
def _constant_of_shape(b, node, attrs, out):
    value = to_tensor(attrs["value"]).reshape(-1)[0].item() if "value" in attrs else 0.0
    return b.emit("aten.full.default", (list(out[0].shape), value), {"dtype": out[0].dtype}, out, node.output[0])


@_converter("Range")
def _range(b, node, attrs, out):
    start, limit, delta = (b.const(i, node, "bound").item() for i in node.input)
    return b.emit("aten.arange.start_step", (start, limit, delta), {"dtype": out[0].dtype}, out, node.output[0])


@_converter("ReduceSum", "ReduceMax", "ReduceMin", "ReduceMean")
def _reduce(b, node, attrs, out):
    x = b.value(node.input[0], node)
    axes = b.const(node.input[1], node, "axes").tolist() if len(node.input) > 1 and node.input[1] else \
        list(range(len(x.type.shape)))
    keep = bool(attrs.get("keepdims", 1))
    name = {"ReduceSum": "aten.sum.dim_IntList", "ReduceMax": "aten.amax.default", "ReduceMin": "aten.amin.default",
            "ReduceMean": "aten.mean.dim"}[node.op_type]
    return b.emit(name, (x, axes, keep), {}, out, node.output[0])


@_converter("TopK")
def _topk(b, node, attrs, out):
    x = b.value(node.input[0], node)
    k = int(b.const(node.input[1], node, "k").reshape(-1)[0])
    return b.emit("aten.topk.default", (x, k, attrs.get("axis", -1), bool(attrs.get("largest", 1)),
                                        bool(attrs.get("sorted", 1))), {}, out, node.output[0])


@_converter("Clip")
def _clip(b, node, attrs, out):
    x = b.value(node.input[0], node)
    lo = b.const(node.input[1], node, "min").item() if len(node.input) > 1 and node.input[1] else None
    hi = b.const(node.input[2], node, "max").item() if len(node.input) > 2 and node.input[2] else None
    return b.emit("aten.clamp.default", (x, lo, hi), {}, out, node.output[0])


@_converter("DequantizeLinear")
def _dequantize_linear(b, node, attrs, out):
    """Generic QDQ: (x - zero_point) * scale, the scale broadcast along ``axis`` (blocked: repeated)."""
    x = b.value(node.input[0], node)
    scale = b.value(node.input[1], node)
    rank = len(x.type.shape)
    f32 = [TensorType(torch.float32, tuple(x.type.shape))]
    xf = b.emit("aten._to_copy.default", (x,), {"dtype": torch.float32}, f32, node.output[0] + "_x")[0]
    if len(node.input) > 2 and node.input[2]:
        zp = b.emit("aten._to_copy.default", (b.value(node.input[2], node),), {"dtype": torch.float32},
                    [TensorType(torch.float32, tuple(b.type_of(node.input[2]).shape))], node.output[0] + "_zp")[0]
        zp = _broadcast_scale(b, node, zp, x, attrs, rank)
        xf = b.emit("aten.sub.Tensor", (xf, zp), {}, f32, node.output[0] + "_shifted")[0]
    s = _broadcast_scale(b, node, scale, x, attrs, rank)
    res = b.emit("aten.mul.Tensor", (xf, s), {}, [TensorType(scale.type.dtype, tuple(x.type.shape))],
                 node.output[0])[0]
    return [res]


def _broadcast_scale(b: _Builder, node: Any, s: Value, x: Value, attrs: dict, rank: int) -> Value:
    if len(s.type.shape) == 0:
        return s
    axis = attrs.get("axis", 1) % rank
    block = attrs.get("block_size", 0)
    if block:
        shape = list(s.type.shape)
        shape[axis] *= block
        s = b.emit("aten.repeat_interleave.self_int", (s, block, axis), {}, [TensorType(s.type.dtype, tuple(shape))],
                   node.output[0] + "_scale")[0]
        if shape[axis] != x.type.shape[axis]:
            shape[axis] = int(x.type.shape[axis])
            s = b.emit("aten.slice.Tensor", (s, axis, 0, shape[axis]), {}, [TensorType(s.type.dtype, tuple(shape))],
                       node.output[0] + "_scale")[0]
        return s
    view = [1] * rank
    view[axis] = int(s.type.shape[0])
    return b.emit("aten.reshape.default", (s, view), {}, [TensorType(s.type.dtype, tuple(view))],
                  node.output[0] + "_scale")[0]


def _numel_dims(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


# dtypes a ds4c_spec may name (as ``str(dtype)`` without ``torch.``): the IR's dtypes, looked up,
# never fetched from the torch module by name.
SPEC_DTYPES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in DTYPE_NAMES}


def decode_attr(v: Any, where: str = "ds4c_spec") -> Any:
    """An attribute of a ``ds4c_spec`` (JSON; dtypes as {"dtype": name}) back to its IR value.

    Only JSON numbers, strings, booleans, null, lists of them and dtypes of ``SPEC_DTYPES``: an
    attribute can name no module, callable or file."""
    if isinstance(v, dict):
        if set(v) != {"dtype"} or v["dtype"] not in SPEC_DTYPES:
            raise IRError(f"{where}: attribute {json.dumps(v)[:80]} is not a dtype ds4c knows ({{\"dtype\": name}}, "
                          f"name one of {', '.join(SPEC_DTYPES)}); re-export with `ds4c export --format onnx`")
        return SPEC_DTYPES[v["dtype"]]
    if isinstance(v, list):
        return [decode_attr(x, where) for x in v]
    if v is None or isinstance(v, bool | int | float | str):
        return v
    raise IRError(f"{where}: attribute {v!r:.80} of type {type(v).__name__} has no IR form")


def _spec(node: Any, attrs: dict) -> dict[str, Any]:
    """The node's ``ds4c_spec``, checked: {"op": a ds4c op, "present": [bool per operand slot],
    "kwargs": {name: attribute}, "results": n}."""
    from ds4c.ir.registry import get_op, is_ds4c_op

    where = f"ONNX node '{node.name}' ({DOMAIN}.{node.op_type})"
    if "ds4c_spec" not in attrs:
        raise IRError(f"{where} has no ds4c_spec attribute; only nodes written by `ds4c export --format onnx` can "
                      "be imported from the ds4c domain")
    try:
        spec = json.loads(attrs["ds4c_spec"])
    except (ValueError, RecursionError):
        raise IRError(f"{where}: its ds4c_spec is not JSON; re-export with `ds4c export --format onnx`") from None
    if not (isinstance(spec, dict) and isinstance(spec.get("op"), str) and isinstance(spec.get("kwargs"), dict)
            and isinstance(spec.get("present"), list) and all(isinstance(p, bool) for p in spec["present"])):
        raise IRError(f"{where}: its ds4c_spec is not {{\"op\": name, \"present\": [bool], \"kwargs\": {{...}}}}; "
                      "re-export with `ds4c export --format onnx`")
    try:
        get_op(spec["op"])  # the allow-list's refusal, naming the op, for anything outside it
    except IRError as e:
        raise IRError(f"{where}: {e}") from None
    if not is_ds4c_op(spec["op"]):
        raise IRError(f"{where} names '{spec['op']}', which is not one of ds4c's fused ops; a ds4c-domain node "
                      "stands for a fused op only (ATen ops are standard ONNX nodes); re-export with `ds4c export "
                      "--format onnx`")
    if sum(spec["present"]) != len(node.input):
        raise IRError(f"{where}: its ds4c_spec lists {sum(spec['present'])} present operands, the node has "
                      f"{len(node.input)} inputs; re-export with `ds4c export --format onnx`")
    return spec


def _fused(b: _Builder, node: Any, attrs: dict, out: list[TensorType]) -> list[Value]:
    spec = _spec(node, attrs)
    it = iter(node.input)
    args = tuple(b.value(next(it), node) if present else None for present in spec["present"])
    where = f"ONNX node '{node.name}' ({DOMAIN}.{node.op_type})"
    kwargs = {str(k): decode_attr(v, where) for k, v in spec["kwargs"].items()}
    return b.emit(spec["op"], args, kwargs, out, spec["op"].replace(".", "_"))


def onnx_float_dtype(spec: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> torch.dtype:
    """The compute dtype the file's weights imply (its widest float weights): fixed by the file."""
    floats = [d for _, d in spec.values() if d.is_floating_point and d.itemsize >= 2]
    return max(floats, key=lambda d: d.itemsize) if floats else torch.float32


def import_onnx_program(path: str | Path) -> tuple[Program, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """The ONNX file's entry point as a Program, and the weights it reads (name -> (shape, dtype))."""
    model = load_model(path)
    meta = metadata(model)
    g = model.graph
    entry = meta.get("ds4c.entry", "prefill")
    state = json.loads(meta.get("ds4c.state") or "[]")
    state_names = {s["name"] for s in state}
    quantized = _quantized(model)
    inits = {i.name: i for i in g.initializer}
    params = set(json.loads(meta["ds4c.params"])) if "ds4c.params" in meta else set(inits)
    b = _Builder(entry)
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            b.types[vi.name] = TensorType(_torch_dtype(t.elem_type), tuple(int(d.dim_value) for d in t.shape.dim))
    for vi in g.input:
        if vi.name in inits:
            continue
        v = Value(b.fresh(vi.name), b.type_of(vi.name))
        b.inputs.append(GraphInput("state" if vi.name in state_names else "input", v))
        b.values[vi.name] = v
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def param(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Value:
        v = Value(b.fresh(name), TensorType(dtype, shape))
        b.inputs.append(GraphInput("param", v))
        spec[name] = (shape, dtype)
        return v

    for name, init in inits.items():
        small = _numel_dims(init.dims) <= 1024  # shapes, axes, indices: their values steer the mapping
        if name in params:
            b.values[name] = param(name, tuple(init.dims), _torch_dtype(init.data_type))
        if name not in params or small:
            b.consts[name] = to_tensor(init)
    from ds4c.quant.formats import get_format

    for node in g.node:
        attrs = _attrs(node)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            b.consts[node.output[0]] = _constant_value(node, attrs)
            continue
        out = [b.type_of(o) for o in node.output]
        hit = _packed_dequant(node, quantized, inits)
        if hit is not None:  # a packed ds4c weight: quant.dequant in its format, on the artifact's tensors
            p, fmt = hit
            shape = tuple(inits[node.input[0]].dims)
            packed = [param(f"{p}.{part}", tuple(s), dt) if f"{p}.{part}" not in b.values else b.values[f"{p}.{part}"]
                      for part, (s, dt) in get_format(fmt).packed_spec(shape).items()]
            res = b.emit("quant.dequant", tuple(packed), {"format": fmt, "shape": list(shape), "dtype": out[0].dtype},
                         out, p.rsplit(".", 1)[-1])
        elif node.domain == DOMAIN:
            res = _fused(b, node, attrs, out)
        elif node.domain in ("", "ai.onnx") and node.op_type in _CONVERTERS:
            res = _CONVERTERS[node.op_type](b, node, attrs, out)
        else:
            raise IRError(f"ONNX node '{node.name}' (op_type {node.domain + '.' if node.domain else ''}{node.op_type}) "
                          "has no ds4c mapping; known ONNX ops: "
                          f"{', '.join(sorted(_CONVERTERS))}. Export the model with these ops (e.g. decompose it in "
                          "torch.onnx), or add a converter to ds4c.frontend.onnx_import._CONVERTERS")
        for o, v in zip(node.output, res, strict=True):
            b.values[o] = v
    # packed tensors replaced their QDQ inputs: drop initializers no op reads any more
    used = {v for op in b.ops for v in op.operands}
    labels = json.loads(meta["ds4c.outputs"]) if "ds4c.outputs" in meta else [o.name for o in g.output]
    outputs = []
    for label, o in zip(labels, g.output, strict=True):
        v = b.value(o.name)
        used.add(v)
        outputs.append((label, v))
    b.inputs = [i for i in b.inputs if i.kind in ("input", "state") or i.value in used]
    spec = {k: s for k, s in spec.items() if any(i.value.name == k for i in b.inputs)}
    graph = Graph(entry, b.inputs, b.ops, outputs, {k: v for k, v in b.const_inputs.items()
                                                   if any(i.value.name == k for i in b.inputs)})
    attrs = {
        "state": state,
        "max_context": int(meta.get("ds4c.max_context", 0)) or None,
        "dim_names": {},
        "model_config": json.loads(meta.get("ds4c.model_config") or "{}"),
    }
    return Program({entry: graph}, attrs), spec


def _constant_value(node: Any, attrs: dict[str, Any]) -> torch.Tensor:
    if "value" in attrs:
        return to_tensor(attrs["value"])
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(list(attrs[key]), dtype=dtype)
    raise IRError(f"ONNX Constant node '{node.name}' uses {', '.join(attrs)}; ds4c imports value, value_float(s) and "
                  "value_int(s)")


__all__ = ["import_onnx_program", "load_onnx_weights", "onnx_config", "onnx_float_dtype"]
