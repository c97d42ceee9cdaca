"""ONNX export of a compiled entry point (opset 21, static shapes), checked by onnxruntime.

How the graph is built. ATen ops go through ``torch.onnx.export(dynamo=True)``. Each fused ds4c op
is lowered to one opaque custom op (``ds4c_export::fused``) that a ``custom_translation_table``
entry turns into a node of domain ``ds4c``: ``op_type`` is the ds4c name with ``_`` for ``.``
(``attention_csa``, ``mhc_pre``, ``indexer_topk``), the op's IR attributes are node attributes
(``scale``, ``top_k``, ...), and ``ds4c_spec`` holds them exactly (JSON) for the importer. The
node calls a model-local function whose body is the op's PyTorch reference exported on its own
(MoE in its gather formulation); one body per distinct (op, attributes, operand types), told apart
by the ONNX function ``overload``. onnxruntime inlines local functions, so the file runs as is.

Quantised weights (``quant.dequant``) become QDQ: ``DequantizeLinear`` on the packed initializers.
- ``int8`` (one fp32 scale per output row): blocked DequantizeLinear along the last axis with one
  block per row (``block_size`` = row length); exact.
- ``fp8`` / ``fp8-f32scale`` (e4m3 with one scale per 128x128 block): ONNX blocks run along one axis
  only, so the 2-D block scale is repeated over the 128 rows of its block (scale ``[rows,
  cols/128]``, ``axis`` = last, ``block_size`` = 128); exact, since every row of a block shares its
  scale. UE8M0 scales (exponent bytes) are turned into fp32 by ``2^(b - 127)`` in the graph, so
  the initializers stay the artifact's packed bytes.
- ``mxfp4`` (packed e2m1 pairs, UE8M0 per 32): FLOAT4E2M1 needs opset 23 and onnxruntime's CPU
  DequantizeLinear does not take it; it stays a ``ds4c.quant_dequant`` node whose function decodes
  the nibbles through the E2M1 table (``quant.dequant``'s portable formulation, ``OpDef.portable``).
- ``bf16``: a ``ds4c.quant_dequant`` function (a cast).
Activations are not quantised by any ds4c policy, so there are no QuantizeLinear nodes.

Names: graph inputs, outputs and weight initializers carry the IR's names (``input_ids``,
``layers.1.compressed_kv``, ``logits``, ``model.layers.0.mlp.gate.weight``, ``<param>.qdata``); an
output that shares its name with an input (decode's next state) gets ``.next`` appended.
Model metadata (``ds4c.*``) records the model config, state layout, context, entry and quantised
weights, which is what ``ds4c.frontend.onnx_import`` needs to compile the file again.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ds4c.errors import IRError
from ds4c.export import ExportSource, capture, entry_graph, write_atomic
from ds4c.frontend.onnx_import import decode_attr
from ds4c.ir.graph import Op

OPSET = 21
DOMAIN = "ds4c"
QDQ_FORMATS = ("int8", "fp8", "fp8-f32scale")
_ONNX_FLOAT_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16}
_PROTOBUF_LIMIT = 2**31 - 2**26  # leave room for the graph next to the weights


# -- the opaque fused op ---------------------------------------------------------------------------
def encode_attr(v: Any) -> Any:
    """IR attribute -> JSON (dtypes as {"dtype": name}); ``onnx_import.decode_attr`` reverses it."""
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, list | tuple):
        return [encode_attr(x) for x in v]
    if v is None or isinstance(v, bool | int | float | str):
        return v
    raise IRError(f"attribute value {v!r} ({type(v).__name__}) has no ONNX form")


def _call(spec: dict[str, Any], tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    from ds4c.ir.registry import get_op, split_results

    kwargs = {k: decode_attr(v) for k, v in spec["kwargs"].items()}
    return split_results(get_op(spec["op"]).portable(kwargs)(*tensors, **kwargs))


@torch.library.custom_op("ds4c_export::fused", mutates_args=())
def fused(args: list[torch.Tensor | None], spec: str) -> list[torch.Tensor]:
    return [o.clone() for o in _call(json.loads(spec), args)]


@fused.register_fake
def _fused_fake(args: list[torch.Tensor | None], spec: str) -> list[torch.Tensor]:
    return [torch.empty_like(o, memory_format=torch.contiguous_format) for o in _call(json.loads(spec), args)]


def _lower_fused(g: torch.fx.Graph, op: Op, args: tuple, kwargs: dict) -> torch.fx.Node:
    for a in args:
        if a is not None and not isinstance(a, torch.fx.Node):
            raise IRError(f"{op.name} at {op.loc}: operand {a!r} is not a tensor; ONNX export takes tensor operands only")
    spec = {"op": op.name, "kwargs": {k: encode_attr(v) for k, v in kwargs.items()}, "results": len(op.results),
            "present": [a is not None for a in args]}
    return g.call_function(torch.ops.ds4c_export.fused.default, (list(args), json.dumps(spec, sort_keys=True)))


def op_type(name: str) -> str:
    return name.replace(".", "_")


# -- translation into ONNX (runs inside torch.onnx's graph builder) -----------------------------------
def _node_attrs(spec: dict[str, Any]) -> dict[str, Any]:
    """The IR attributes as ONNX attributes (readable); ``ds4c_spec`` keeps them exactly."""
    out: dict[str, Any] = {}
    for k, v in spec["kwargs"].items():
        if isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, int | float | str):
            out[k] = v
        elif isinstance(v, dict):
            out[k] = v["dtype"]
        elif isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            out[k] = v
        elif isinstance(v, list) and v and all(isinstance(x, float) for x in v):
            out[k] = v
    out["ds4c_spec"] = json.dumps(spec, sort_keys=True)
    return out


def _translate(args: Sequence[Any], spec_text: str) -> list[Any]:
    import onnx
    from onnxscript import values

    spec = json.loads(spec_text)
    tensors = [a for a in args if a is not None]
    if spec["op"] == "quant.dequant" and spec["kwargs"]["format"] in QDQ_FORMATS:
        from onnxscript import opset21 as op

        w = _dequantize_linear(tensors, spec["kwargs"])  # fp32, the scale's type
        dtype = spec["kwargs"]["dtype"]["dtype"]
        return [w if dtype == "float32" else op.Cast(w, to=_ONNX_FLOAT_TYPES[dtype])]
    any_type = [f"tensor({t})" for t in ("float", "double", "float16", "bfloat16", "int64", "int32", "int16",
                                          "int8", "uint8", "bool", "float8e4m3fn", "float8e5m2")]
    param = onnx.defs.OpSchema.FormalParameter
    attrs = _node_attrs(spec)
    schema = onnx.defs.OpSchema(
        op_type(spec["op"]), DOMAIN, 1,
        inputs=[param(f"in{i}", f"I{i}") for i in range(len(tensors))],
        outputs=[param(f"out{i}", f"O{i}") for i in range(spec["results"])],
        type_constraints=[(f"I{i}", any_type, "") for i in range(len(tensors))]
        + [(f"O{i}", any_type, "") for i in range(spec["results"])],
        attributes=[onnx.defs.OpSchema.Attribute(k, _attr_type(v), "") for k, v in attrs.items()],
    )
    out = values.Op(values.Opset(DOMAIN, 1), op_type(spec["op"]), schema)(*tensors, **attrs)
    return list(out) if isinstance(out, list | tuple) else [out]


def _attr_type(v: Any) -> Any:
    import onnx

    t = onnx.defs.OpSchema.AttrType
    if isinstance(v, str):
        return t.STRING
    if isinstance(v, float):
        return t.FLOAT
    if isinstance(v, int):
        return t.INT
    return t.FLOATS if any(isinstance(x, float) for x in v) else t.INTS


def _dequantize_linear(tensors: list[Any], kw: dict[str, Any]) -> Any:
    """QDQ form of ``quant.dequant`` (see the module docstring)."""
    from onnxscript import opset21 as op

    from ds4c.quant.formats import FP8_BLOCK

    shape = list(kw["shape"])
    q, scale = tensors
    rank = len(shape)
    if kw["format"] == "int8":  # scale [.., rows, 1]: one block per row
        return op.DequantizeLinear(q, scale, axis=rank - 1, block_size=shape[-1])
    if kw["format"] == "fp8":  # UE8M0 exponent bytes -> 2^(b-127)
        exponent = op.Sub(op.Cast(scale, to=1), op.Constant(value_float=127.0))
        scale = op.Pow(op.Constant(value_float=2.0), exponent)
    # repeat each block row's scale over its 128 rows, then cut to the matrix's rows
    lead, br, bc = shape[:-2], -(-shape[-2] // FP8_BLOCK), -(-shape[-1] // FP8_BLOCK)
    s = op.Unsqueeze(scale, op.Constant(value_ints=[rank - 1]))
    s = op.Expand(s, op.Constant(value_ints=[*lead, br, FP8_BLOCK, bc]))
    s = op.Reshape(s, op.Constant(value_ints=[*lead, br * FP8_BLOCK, bc]))
    s = op.Slice(s, op.Constant(value_ints=[0]), op.Constant(value_ints=[shape[-2]]),
                 op.Constant(value_ints=[rank - 2]))
    return op.DequantizeLinear(q, s, axis=rank - 1, block_size=FP8_BLOCK)


# -- function bodies ------------------------------------------------------------------------------------
class _Bodies(torch.nn.Module):
    """Every distinct fused op's reference side by side: one export gives all function bodies."""

    def __init__(self, specs: list[dict[str, Any]], counts: list[int]):
        super().__init__()
        self.specs, self.counts = specs, counts

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs: list[torch.Tensor] = []
        at = 0
        for spec, n in zip(self.specs, self.counts, strict=True):
            it = iter(tensors[at:at + n])
            at += n
            outs += _call(spec, [next(it) if present else None for present in spec["present"]])
        return tuple(outs)


def _function_bodies(sigs: list[tuple[dict[str, Any], list[tuple[int, tuple[int, ...]]]]], names: list[str],
                     overloads: list[str], attributes: list[list[str]]) -> list[Any]:
    """The references exported together, then cut apart: body k is what its outputs depend on,
    back to its own inputs (a dependency slice, so nothing of another body can leak in)."""
    from onnx import helper

    example = tuple(_example(elem, shape) for _, types in sigs for elem, shape in types)
    prog = _quiet_export(_Bodies([s for s, _ in sigs], [len(t) for _, t in sigs]), example)
    graph = prog.model_proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    order = {id(n): i for i, n in enumerate(graph.node)}
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    if len(inputs) != len(example):
        raise IRError(f"ONNX export of the fused ops' references kept {len(inputs)} of {len(example)} inputs")
    fns, at_in, at_out = [], 0, 0
    for (spec, types), name, overload, attrs in zip(sigs, names, overloads, attributes, strict=True):
        own_in = inputs[at_in:at_in + len(types)]
        own_out = outputs[at_out:at_out + spec["results"]]
        at_in += len(types)
        at_out += spec["results"]
        keep: dict[int, Any] = {}
        consts: dict[str, Any] = {}
        stack = list(own_out)
        while stack:
            v = stack.pop()
            if v in own_in or v == "":
                continue
            if v in inits:
                consts[v] = inits[v]
            elif v in producer:
                n = producer[v]
                if id(n) not in keep:
                    keep[id(n)] = n
                    stack.extend(n.input)
            else:
                raise IRError(f"ONNX body of {spec['op']} reads '{v}', which is not one of its inputs")
        nodes = [helper.make_node("Constant", [], [k], value=t) for k, t in consts.items()]
        nodes += sorted(keep.values(), key=lambda n: order[id(n)])
        fn_out = []
        for o in own_out:  # a function output must be produced by a node of the body
            if o in own_in or o in consts:
                nodes.append(helper.make_node("Identity", [o], [o + "__out"]))
                o = o + "__out"
            fn_out.append(o)
        fn = helper.make_function(DOMAIN, name, own_in, fn_out, nodes, list(prog.model_proto.opset_import),
                                  attributes=attrs)
        fn.overload = overload
        fns.append(fn)
    return fns


def _example(elem: int, shape: tuple[int, ...]) -> torch.Tensor:
    from onnx import helper

    from ds4c.ir.types import torch_dtype

    np_dtype = helper.tensor_dtype_to_np_dtype(elem)
    dtype = torch_dtype(str(np_dtype))
    if dtype is None:
        import onnx

        dtype = {onnx.TensorProto.BFLOAT16: torch.bfloat16, onnx.TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn}[elem]
    return torch.zeros(shape, dtype=dtype)


def _quiet_export(module: Any, args: Any, **kw: Any) -> Any:
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            return torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, optimize=True, verbose=False,
                                     **kw)


# -- the whole entry point ------------------------------------------------------------------------------
def build_model(src: ExportSource, *, entry: str = "prefill", batch: int = 1, seq: int = 16,
                dtype: torch.dtype | None = None) -> Any:
    """The ONNX ModelProto of one entry point (see the module docstring)."""
    from ds4c.backends.fx import _attr_name

    graph = entry_graph(src, entry)
    ep, arg_names, feeds = capture(graph, src, batch, seq, _lower_fused, dtype)
    prog = _quiet_export(ep, None, custom_translation_table={torch.ops.ds4c_export.fused.default: _translate})
    model = prog.model
    g = model.graph
    # the IR's names for inputs, weights, outputs
    for v, name in zip(g.inputs, arg_names, strict=True):
        v.name = name
    by_attr = {_attr_name(i.value.name): i.value.name for i in graph.inputs if i.kind in ("param", "const")}
    for name, v in list(g.initializers.items()):
        if name in by_attr:
            v.name = by_attr[name]
    inputs = set(arg_names)  # ONNX names are SSA: decode's next state needs its own name
    _name_outputs(g, [n + ".next" if n in inputs else n for n, _ in graph.outputs])
    proto = _serialise(model)
    for node in proto.graph.node:  # torch.onnx's provenance (python paths, fx nodes): not ours to ship
        del node.metadata_props[:]
    _attach_functions(proto)
    state_types = {i.value.name: str(feeds[i.value.name].dtype).removeprefix("torch.")
                   for i in graph.inputs if i.kind == "state"}
    state = [{**s, "dtype": state_types.get(s["name"], s["dtype"] if dtype is None else str(dtype).removeprefix(
        "torch."))} for s in src.manifest["state"]]
    meta = {
        "ds4c.entry": entry, "ds4c.batch": str(batch), "ds4c.seq": str(feeds["input_ids"].shape[1]),
        "ds4c.config": json.dumps(src.manifest["model"]["config"], sort_keys=True),
        "ds4c.state": json.dumps(state),
        "ds4c.max_context": str(src.manifest["max_context"]),
        "ds4c.target": src.manifest["target"]["name"],
        "ds4c.compute_dtype": str(dtype or src.manifest["precision"]["compute_dtype"]).removeprefix("torch."),
        "ds4c.quantized": json.dumps((src.manifest.get("precision") or {}).get("assignment") or {}, sort_keys=True),
        "ds4c.model_config": json.dumps(src.program.attrs.get("model_config") or {}),
        "ds4c.params": json.dumps([v.name for v in graph.inputs_of_kind("param")]),
        "ds4c.outputs": json.dumps([n for n, _ in graph.outputs]),
    }
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    proto.producer_name = "ds4c"
    return proto


def _name_outputs(g: Any, names: list[str]) -> None:
    import onnx_ir as ir

    inputs = set(id(v) for v in g.inputs)
    seen: set[int] = set()
    for i, v in enumerate(list(g.outputs)):
        if id(v) in inputs or id(v) in seen or v.is_initializer():
            node = ir.node("Identity", [v])
            g.append(node)
            v = node.outputs[0]
            v.shape, v.type = g.outputs[i].shape, g.outputs[i].type
            g.outputs[i] = v
        seen.add(id(v))
        v.name = names[i]


def _serialise(model: Any) -> Any:
    import onnx_ir as ir

    return ir.serde.serialize_model(model)


def _attach_functions(proto: Any) -> None:
    """One local function per distinct (op, attributes, operand types); nodes name it by overload."""
    import onnx

    types: dict[str, tuple[int, tuple[int, ...]]] = {}
    for vi in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]:
        t = vi.type.tensor_type
        types[vi.name] = (t.elem_type, tuple(d.dim_value for d in t.shape.dim))
    for init in proto.graph.initializer:
        types[init.name] = (init.data_type, tuple(init.dims))
    sigs: dict[str, tuple[dict[str, Any], list, str, str, list[str]]] = {}
    for node in proto.graph.node:
        if node.domain != DOMAIN:
            continue
        spec = json.loads(next(a for a in node.attribute if a.name == "ds4c_spec").s.decode())
        missing = [i for i in node.input if i not in types]
        if missing:
            raise IRError(f"ONNX export: no type for '{missing[0]}', input of {node.op_type} ({node.name})")
        sig = [types[i] for i in node.input]
        key = json.dumps([node.op_type, spec["kwargs"], spec["present"], sig], sort_keys=True)
        if key not in sigs:
            overload = f"v{sum(1 for s in sigs.values() if s[2] == node.op_type)}"
            sigs[key] = (spec, sig, node.op_type, overload, [a.name for a in node.attribute])
        node.overload = sigs[key][3]
    if sigs:
        s = list(sigs.values())
        proto.functions.extend(_function_bodies([(x[0], x[1]) for x in s], [x[2] for x in s], [x[3] for x in s],
                                                [x[4] for x in s]))
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    if proto.ir_version < 10:  # function overloads
        proto.ir_version = 10


def save_model(proto: Any, out: str | os.PathLike) -> Path:
    """Write atomically; weights past protobuf's 2 GiB go to ``OUT.data`` next to it (external data)."""
    import onnx

    out = Path(out)
    if proto.ByteSize() < _PROTOBUF_LIMIT:
        return write_atomic(out, lambda tmp: onnx.save_model(proto, str(tmp)))
    data = out.with_name(out.name + ".data")

    def write(tmp: Path) -> None:
        onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name + ".tmp", size_threshold=1024)
        os.replace(tmp.parent / (data.name + ".tmp"), data)
        m = onnx.load(str(tmp), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = data.name
        onnx.save_model(m, str(tmp))

    return write_atomic(out, write)


def export_onnx(src: ExportSource, out: str | os.PathLike, *, entry: str = "prefill", batch: int = 1,
                seq: int = 16, dtype: torch.dtype | None = None) -> Path:
    return save_model(build_model(src, entry=entry, batch=batch, seq=seq, dtype=dtype), out)
