"""The IR's op allow-list (ds4c.ir.allowed_aten) and its literals: what IR text may name.

Every entry point that turns text or graphs into something that runs (get_op, the parser, the
verifier, constant folding) refuses an op outside the list with an IRError naming the op, before
the op is resolved to anything callable. Literals resolve no names: device(), layout() and
memfmt() come from fixed tables.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import ds4c
import ds4c.ir.registry as registry
from ds4c.errors import IRError, VerificationError
from ds4c.ir import Graph, GraphInput, Op, TensorType, Value, get_op, parse_graph, verify_graph
from ds4c.ir.allowed_aten import ALLOWED_ATEN_OPS
from ds4c.passes import PassContext, get_pass

# Argument and return types an allowed op's schema may have (str: rounding_mode, approximate).
SAFE_ARGUMENT_TYPES = {
    "Tensor", "Optional[Tensor]", "List[Tensor]", "List[Optional[Tensor]]", "int", "Optional[int]", "List[int]",
    "Optional[List[int]]", "float", "Optional[float]", "bool", "Optional[bool]", "number", "Optional[number]",
    "ScalarType", "Optional[ScalarType]", "Device", "Optional[Device]", "Optional[Layout]", "MemoryFormat",
    "Optional[MemoryFormat]", "str", "Optional[str]",
}
SAFE_RETURN_TYPES = {"Tensor", "List[Tensor]", "int"}
STRING_ARGUMENTS = {"rounding_mode", "approximate"}


@pytest.fixture
def resolved(monkeypatch) -> list[str]:
    """The torch op names the registry resolves to callables during the test."""
    seen: list[str] = []
    original = registry._resolve_torch_op

    def spy(name: str):
        seen.append(name)
        return original(name)

    monkeypatch.setattr(registry, "_resolve_torch_op", spy)
    return seen


@pytest.mark.parametrize("name", sorted(ALLOWED_ATEN_OPS))
def test_every_allowed_op_is_a_pure_tensor_op(name):
    ns, op, overload = name.split(".")
    schema = getattr(getattr(getattr(torch.ops, ns), op), overload)._schema
    assert not schema.is_mutable, f"{name} writes an argument"
    for a in schema.arguments:
        assert a.alias_info is None or not a.alias_info.is_write, f"{name}: {a.name} is written"
        assert str(a.real_type) in SAFE_ARGUMENT_TYPES, f"{name}: argument {a.name}: {a.real_type}"
        if "str" in str(a.real_type):
            assert a.name in STRING_ARGUMENTS, f"{name}: string argument {a.name}"
        assert a.name != "generator", f"{name} draws random numbers"
    assert all(str(r.type) in SAFE_RETURN_TYPES for r in schema.returns), f"{name} returns {schema.returns}"
    assert not any(w in op for w in ("rand", "normal", "bernoulli", "dropout", "empty", "file", "save", "load"))
    assert get_op(name).pure


def test_every_aten_op_named_in_ds4c_sources_is_allowed():
    """Ops the passes, backends and ONNX importer create are on the list (in-place names appear only
    in patterns that match them, and the shape assertions the importer drops never reach the IR)."""
    from ds4c.frontend.fx_import import _DROPPED

    root = Path(ds4c.__file__).parent
    names = {m for f in root.rglob("*.py") for m in re.findall(r'"(aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+)"', f.read_text())}
    assert len(names) > 50
    missing = {n for n in names - ALLOWED_ATEN_OPS - _DROPPED if not n.split(".")[1].endswith("_")}
    assert not missing, f"named in ds4c but not allowed: {sorted(missing)}"


def test_onnx_converters_emit_only_allowed_ops():
    pytest.importorskip("onnx")
    from ds4c.frontend import onnx_import

    src = Path(onnx_import.__file__).read_text()
    emitted = set(re.findall(r'"((?:aten|quant)\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)"', src))
    assert "aten.add.Tensor" in emitted and "aten.remainder.Scalar" in emitted
    for name in emitted:
        get_op(name)


@pytest.mark.parametrize("name", [
    "aten.from_file.default",          # maps a file; shared=True writes it
    "aten.add_.Tensor",                # in place
    "aten.add.out",                    # out=
    "aten.fill_.Scalar",
    "aten.rand_like.default",          # global RNG
    "aten.bernoulli.default",
    "aten.empty.memory_format",        # uninitialised memory
    "aten.set_.source_Storage",
    "aten._local_scalar_dense.default",
    "prims.add.default",
    "_c10d_functional.all_reduce.default",
    "quantized.linear.default",
])
def test_get_op_refuses_ops_outside_the_allow_list(name, resolved):
    with pytest.raises(IRError, match=rf"op '{re.escape(name)}' is not in ds4c's allow-list .*ds4c.ir.allowed_aten"):
        get_op(name)
    assert name not in resolved  # never turned into something callable


@pytest.mark.parametrize("name", [
    "profiler._record_function_enter.default",  # a torch.ops namespace ds4c does not know
    "aten.add",                                 # packet, no overload
    "os.system",
    "builtins.eval",
    "torch.load",
])
def test_get_op_refuses_names_of_no_family(name, resolved):
    with pytest.raises(IRError, match="unknown op|not in ds4c's allow-list"):
        get_op(name)
    assert not resolved


def test_near_miss_allowed_overload_resolves():
    assert get_op("aten.add.Tensor").reference(torch.ones(2), torch.ones(2)).tolist() == [2.0, 2.0]
    with pytest.raises(IRError, match="aten.add.Tensorx"):
        get_op("aten.add.Tensorx")


def _from_file_ir(path: Path) -> str:
    """IR that, run, would map ``path`` shared and zero its first 16 bytes."""
    return f"""\
graph @g(input %x: f32[4]) {{
  %f = aten.from_file.default({ds4c_json(str(path))}, true, 16, dtype=dtype(u8)) : u8[16]
  %z = aten.fill_.Scalar(%f, 0) : u8[16]
  return y=%x
}}
"""


def ds4c_json(text: str) -> str:
    import json

    return json.dumps(text)


def test_parser_refuses_file_ops_and_touches_no_file(tmp_path, resolved):
    sentinel = tmp_path / "sentinel.bin"
    sentinel.write_bytes(b"keep these bytes")
    with pytest.raises(IRError, match=r"line 2: op 'aten.from_file.default' is not in ds4c's allow-list"):
        parse_graph(_from_file_ir(sentinel))
    assert sentinel.read_bytes() == b"keep these bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sentinel.bin"]
    assert "aten.from_file.default" not in resolved


def _graph_with(name: str, args: tuple, kwargs: dict, result: TensorType, extra: list[Op] = ()) -> Graph:
    """A graph built in memory (no parser): what a frontend or a pass might hand on."""
    x = Value("x", TensorType(torch.float32, (4,)))
    r = Value("r", result)
    return Graph("g", [GraphInput("input", x)], [Op(name, args, kwargs, (r,)), *extra], [("y", x)])


def test_verifier_refuses_graphs_built_in_memory_with_file_ops(tmp_path, resolved):
    sentinel = tmp_path / "sentinel.bin"
    sentinel.write_bytes(b"keep these bytes")
    g = _graph_with("aten.from_file.default", (str(sentinel), True, 16), {"dtype": torch.uint8},
                    TensorType(torch.uint8, (16,)))
    with pytest.raises(VerificationError, match="op #0 .*aten.from_file.default.* not in ds4c's allow-list"):
        verify_graph(g)
    assert sentinel.read_bytes() == b"keep these bytes" and "aten.from_file.default" not in resolved


def test_fold_constants_never_runs_a_file_op(tmp_path, resolved):
    """from_file has only literal operands: exactly what constant folding evaluates at compile time."""
    sentinel = tmp_path / "sentinel.bin"
    sentinel.write_bytes(b"keep these bytes")
    g = _graph_with("aten.from_file.default", (str(sentinel), False, 16), {"dtype": torch.uint8},
                    TensorType(torch.uint8, (16,)))
    with pytest.raises(IRError, match="aten.from_file.default.* not in ds4c's allow-list"):
        get_pass("fold_constants")(g, PassContext())
    assert "aten.from_file.default" not in resolved and sentinel.read_bytes() == b"keep these bytes"


def test_fold_constants_reports_an_allowed_op_on_bad_literals():
    g = _graph_with("aten.arange.default", ("ten",), {}, TensorType(torch.int64, (10,)))
    with pytest.raises(IRError, match=r"fold_constants: op aten.arange.default -> %r fails on its constant operands"):
        get_pass("fold_constants")(g, PassContext())


# -- literals ------------------------------------------------------------------------------------

def _literal(text: str):
    g = parse_graph(f"graph @g(input %x: f32[4]) {{\n  %y = aten.to.dtype(%x, {text}) : f32[4]\n  return y=%y\n}}")
    return g.ops[0].args[1]


@pytest.mark.parametrize("text, value", [
    ('device("cpu")', torch.device("cpu")),
    ('device("cuda")', torch.device("cuda")),
    ('device("cuda:1")', torch.device("cuda:1")),
    ('device("meta")', torch.device("meta")),
    ("layout(strided)", torch.strided),
    ("memfmt(contiguous_format)", torch.contiguous_format),
    ("memfmt(preserve_format)", torch.preserve_format),
    ("dtype(bf16)", torch.bfloat16),
    ('"a \\"quoted\\" string"', 'a "quoted" string'),
    ("[1, [2, -3.5], none, true, -inf]", [1, [2, -3.5], None, True, float("-inf")]),
])
def test_literals_from_fixed_tables(text, value):
    assert _literal(text) == value


@pytest.mark.parametrize("text, message", [
    ("device(cpu)", "device"),                   # must be quoted
    ("device(1)", "device"),                     # an int is a CUDA index to torch.device
    ('device("xla")', "device"),
    ('device("privateuseone")', "device"),
    ('device("cuda:0:0")', "device"),
    ('device("file:///etc/passwd")', "device"),
    ("layout(load)", r"layout\(load\)"),         # torch.load, were it getattr(torch, ...)
    ("layout(sparse_coo)", "layout"),
    ("memfmt(save)", r"memfmt\(save\)"),
    ("memfmt(channels_last)", "memfmt"),
    ("memfmt(__class__)", "memfmt"),
    ("dtype(float32)", "unknown dtype"),
    ("dtype(__builtins__)", "unknown dtype"),
    ("__import__", "cannot parse literal"),
    ("os", "cannot parse literal"),
    ('"\\q"', "invalid escape"),
    ("1" * 5000, "too long"),
    ("[" * 40 + "]" * 40, "nested deeper"),
])
def test_literal_near_misses_are_refused(text, message):
    with pytest.raises(IRError, match=message):
        _literal(text)


def test_parsed_literals_are_plain_values_only():
    """No parsed literal is a module, a class or a callable: only data."""
    g = parse_graph("""\
graph @g(input %x: f32[4]) {
  %a = aten._to_copy.default(%x, dtype=dtype(f16), layout=layout(strided), device=device("cpu"), memory_format=memfmt(preserve_format)) : f16[4]
  %b = aten.full.default([2, 2], 1.5, dtype=dtype(f32), device=device("cuda:0"), pin_memory=false) : f32[2,2]
  return a=%a, b=%b
}
""")
    plain = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format, Value)

    def walk(obj):
        if isinstance(obj, list | tuple):
            for o in obj:
                walk(o)
        else:
            assert isinstance(obj, plain) and not callable(obj), obj

    for op in g.ops:
        walk(op.args)
        walk(list(op.kwargs.values()))


@pytest.mark.parametrize("text, message", [
    ("graph @g(input %x: f32[__import__('os')]) {\n  return y=%x\n}", "characters no dimension has"),
    ("graph @g(input %x: f32[__import__(S)]) {\n  return y=%x\n}", "unsupported construct"),
    ("graph @g(input %x: f32[S//]) {\n  return y=%x\n}", "not an expression"),
    ("graph @g(input %x: f32[Max()]) {\n  return y=%x\n}", "unsupported construct"),
    ("graph @g(input %x: f32[\"S\"]) {\n  return y=%x\n}", "characters no dimension has"),
    ("graph @g(input %x: f32[S(1)]) {\n  return y=%x\n}", "unsupported construct"),
    ("graph @g(input %x: f32[4]) {\n  %y = aten.neg.default(%x, %x) : f32[4]\n  %y = aten.neg.default(%x) : f32[4]\n"
     "  return y=%y\n}", "defined twice"),
    ("graph @g(input %x: f32[4]) {\n  %y = aten.clone.default(%x, memory_format=none, memory_format=none) : f32[4]\n"
     "  return y=%y\n}", "given twice"),
    ("graph @g(input %x: f32[4]) {\n  return y=%x\n}\n%z = aten.neg.default(%x) : f32[4]", "text after the end"),
    ("graph @g(input %x: f32[4]) {\n  return y=%x\n  %z = aten.neg.default(%x) : f32[4]\n}", "op after the return"),
    ('graph @g(input %x: f32[4]) {\n  %y = aten.neg.default(%x) : f32[4] loc("\\q")\n  return y=%y\n}',
     "invalid escape"),
])
def test_malformed_text_is_an_ir_error(text, message):
    with pytest.raises(IRError, match=message):
        parse_graph(text)


def test_refused_dims_print_no_python_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dim in ("4S", "1_000x", "S.real", "(B//0)", "0-1"):
            with pytest.raises(IRError, match="dimension"):
                parse_graph(f"graph @g(input %x: f32[{dim}]) {{\n  return y=%x\n}}")


def test_symbolic_dims_of_traced_graphs_still_parse():
    g = parse_graph("graph @g(input %x: f32[B,(S//4),Max(S,8),ceiling(S/1)+1,(S%4)]) {\n  return y=%x\n}"
                    .replace("ceiling(S/1)+1", "CeilDiv(S,4)+1"))
    assert g.inputs[0].value.type.shape == ("B", "(S//4)", "Max(S,8)", "CeilDiv(S,4)+1", "(S%4)")


def test_verifier_reports_an_op_verifier_meeting_wrong_operands():
    """ds4c's own op verifiers read operands' types: a number in a tensor's place is a
    VerificationError naming the op, not an AttributeError."""
    g = parse_graph("""\
graph @g(input %x: f32[2,8]) {
  %y = rms_norm(1, 2, eps=0.1) : f32[2,8]
  return y=%y
}
""")
    with pytest.raises(VerificationError, match=r"op #0 \(%y = rms_norm\)"):
        verify_graph(g)
