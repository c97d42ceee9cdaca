"""IR text: print -> parse -> print is the identity; the verifier names the bad op."""

import pytest
import torch

from ds4c.errors import IRError, VerificationError
from ds4c.ir import (
    Graph,
    GraphInput,
    Op,
    TensorType,
    Value,
    check_types,
    parse_graph,
    print_graph,
    verify_graph,
)

TEXT = """\
graph @demo(input %x: f32[B,S,8], param %w: f32[8,8], const %c: f32[4], state %st: f32[B,3,8]) {
  %S = aten.sym_size.int(%x, 1) : int
  %lin = aten.linear.default(%x, %w) : f32[B,S,8] loc("model.layers.0.self_attn")
  %half = sym.floordiv(%S, 2) : int
  %sl = aten.slice.Tensor(%lin, 1, 0, %half) : f32[B,(S//2),8]
  %v, %i = aten.topk.default(%lin, 2, -1, true, true) : f32[B,S,2], i64[B,S,2]
  %m = aten.masked_fill.Scalar(%lin, %lin, -inf) : f32[B,S,8]
  %z = aten.full.default([2, 3], 0.5, dtype=dtype(bf16), device=device("cpu"), pin_memory=false) : bf16[2,3]
  %cat = aten.cat.default([%st, %lin], 1) : f32[B,3+S,8]
  return y=%sl, idx=%i, layers.0.st=%cat
}
"""


def test_round_trip_is_identity():
    g = parse_graph(TEXT)
    assert print_graph(g) == TEXT
    assert print_graph(parse_graph(print_graph(g))) == print_graph(g)


def test_parse_keeps_literals_and_types():
    g = parse_graph(TEXT)
    ops = {op.results[0].name: op for op in g.ops}
    assert ops["m"].args[2] == float("-inf")
    assert ops["z"].kwargs["dtype"] is torch.bfloat16
    assert ops["z"].kwargs["device"] == torch.device("cpu")
    assert ops["v"].args[3] is True
    assert ops["sl"].results[0].type == TensorType(torch.float32, ("B", "(S//2)", 8))
    assert ops["lin"].loc == "model.layers.0.self_attn"


def test_check_types_rederives_symbolic_shapes():
    g = parse_graph(TEXT.replace("  %m = aten.masked_fill.Scalar(%lin, %lin, -inf) : f32[B,S,8]\n", ""))
    check_types(g, {"B": 2, "S": 7})


def test_check_types_catches_wrong_declared_shape():
    bad = TEXT.replace("f32[B,(S//2),8]", "f32[B,S,8]").replace(
        "  %m = aten.masked_fill.Scalar(%lin, %lin, -inf) : f32[B,S,8]\n", "")
    with pytest.raises(VerificationError, match="%sl"):
        check_types(parse_graph(bad), {"B": 2, "S": 7})


def test_verifier_accepts_good_graph():
    verify_graph(parse_graph(TEXT))


def test_parser_rejects_use_before_definition():
    bad = TEXT.replace("%lin = aten.linear.default(%x, %w)", "%lin = aten.linear.default(%x, %nope)")
    with pytest.raises(IRError, match="undefined value %nope"):
        parse_graph(bad)


def test_verifier_rejects_unknown_op_naming_it():
    g = parse_graph(TEXT)
    op = g.ops[1]
    g.ops[1] = op.replace(name="aten.not_an_op.default")
    with pytest.raises(VerificationError, match=r"op #1 \(%lin = aten.not_an_op.default\)"):
        verify_graph(g)


def test_verifier_rejects_bad_arguments():
    g = parse_graph(TEXT)
    g.ops[1] = g.ops[1].replace(kwargs={"alpha": 2})
    with pytest.raises(VerificationError, match="unknown keyword argument 'alpha'"):
        verify_graph(g)


def test_verifier_rejects_use_from_another_graph_and_ssa_violation():
    x = Value("x", TensorType(torch.float32, (2,)))
    stray = Value("stray", TensorType(torch.float32, (2,)))
    y = Value("y", TensorType(torch.float32, (2,)))
    g = Graph("g", [GraphInput("input", x)], [Op("aten.add.Tensor", (x, stray), {}, (y,))], [("y", y)])
    with pytest.raises(VerificationError, match="uses %stray before it is defined"):
        verify_graph(g)
    g = Graph("g", [GraphInput("input", x)], [Op("aten.neg.default", (x,), {}, (x,))], [("y", x)])
    with pytest.raises(VerificationError, match="redefines %x"):
        verify_graph(g)


def test_verifier_checks_constant_data():
    g = parse_graph(TEXT, constants={"c": torch.zeros(5)})
    with pytest.raises(VerificationError, match="const %c data"):
        verify_graph(g, require_constants=True)


@pytest.mark.parametrize("line", [
    "graph demo() {",
    "graph @g(weird %x: f32[2]) {",
    "graph @g(input %x: q32[2]) {",
])
def test_parser_errors_are_clear(line):
    with pytest.raises(IRError):
        parse_graph(line + "\n  return\n}\n")
