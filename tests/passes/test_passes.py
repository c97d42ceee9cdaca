"""Each pass: IR text before -> IR text after, and the reference result is preserved."""

import pytest
import torch
from torch.export import Dim, export

from ds4c.errors import PassError, VerificationError
from ds4c.frontend.fx_import import import_exported_program
from ds4c.ir import Graph, OpDef, Program, parse_graph, print_graph, register_op
from ds4c.ir.interpreter import run_graph
from ds4c.passes import PassContext, PassManager, get_pass, register_pass
from ds4c.passes.instruments import DumpIR, IRDiff, PassTiming, PrintAfterAll, VerifyAfterEach
from ds4c.targets import get_target


def run_pass(name: str, text: str, constants=None, **attrs) -> Graph:
    g = parse_graph(text, constants)
    ctx = PassContext(program_attrs=attrs)
    return get_pass(name)(g, ctx)


def test_dce_removes_unused_pure_ops_and_inputs():
    before = """\
graph @g(input %x: f32[4], const %c: f32[4], param %w: f32[4]) {
  %a = aten.mul.Tensor(%x, %w) : f32[4]
  %b = aten.add.Tensor(%x, 1) : f32[4]
  return y=%b
}
"""
    after = run_pass("dce", before, {"c": torch.ones(4)})
    assert print_graph(after) == """\
graph @g(input %x: f32[4]) {
  %b = aten.add.Tensor(%x, 1) : f32[4]
  return y=%b
}
"""
    assert after.constants == {}


@register_op
class _RandomLike(OpDef):
    """A random op for the test below: ATen's (rand_like) are outside the IR's allow-list."""

    name = "test.random_like"

    def reference(self, x):
        return torch.rand_like(x)


def test_cse_merges_identical_ops_but_not_random_ones():
    before = """\
graph @g(input %x: f32[B,4]) {
  %s0 = aten.sym_size.int(%x, 0) : int
  %s1 = aten.sym_size.int(%x, 0) : int
  %a = aten.exp.default(%x) : f32[B,4]
  %b = aten.exp.default(%x) : f32[B,4]
  %r1 = test.random_like(%x) : f32[B,4]
  %r2 = test.random_like(%x) : f32[B,4]
  %v = aten.view.default(%a, [%s1, 4]) : f32[B,4]
  %y = aten.add.Tensor(%v, %b) : f32[B,4]
  %z = aten.add.Tensor(%r1, %r2) : f32[B,4]
  return y=%y, z=%z
}
"""
    text = print_graph(run_pass("cse", before))
    assert "%s1 =" not in text and "%b =" not in text
    assert "aten.view.default(%a, [%s0, 4])" in text
    assert "aten.add.Tensor(%v, %a)" in text
    assert text.count("random_like") == 2


def test_cse_near_miss_different_literal_is_kept():
    before = """\
graph @g(input %x: f32[4]) {
  %a = aten.add.Tensor(%x, 1) : f32[4]
  %b = aten.add.Tensor(%x, 2) : f32[4]
  %c = aten.mul.Tensor(%a, %b) : f32[4]
  return y=%c
}
"""
    assert print_graph(run_pass("cse", before)) == before


def test_fold_constants_folds_rope_like_tables_and_scalars():
    before = """\
graph @g(input %x: f32[B,S,4], const %inv: f32[4]) {
  %ar = aten.arange.default(16, dtype=dtype(f32), device=device("cpu"), pin_memory=false) : f32[16]
  %outer = aten.outer.default(%ar, %inv) : f32[16,4]
  %cos = aten.cos.default(%outer) : f32[16,4]
  %two = sym.mul(3, 2) : int
  %S = aten.sym_size.int(%x, 1) : int
  %sl = aten.slice.Tensor(%cos, 0, 0, %S) : f32[S,4]
  %y = aten.mul.Tensor(%x, %sl) : f32[B,S,4]
  %z = aten.mul.Tensor(%y, %two) : f32[B,S,4]
  return y=%z
}
"""
    inv = torch.tensor([1.0, 0.5, 0.25, 0.125])
    after = run_pass("fold_constants", before, {"inv": inv})
    after = get_pass("dce")(after, PassContext())
    text = print_graph(after)
    assert "aten.cos" not in text and "aten.outer" not in text and "aten.arange" not in text
    assert "const %cos: f32[16,4]" in text
    assert "aten.mul.Tensor(%y, 6)" in text
    torch.testing.assert_close(after.constants["cos"], torch.cos(torch.outer(torch.arange(16.0), inv)))


def test_fold_constants_never_folds_weights_or_big_sourceless_tensors():
    before = """\
graph @g(param %w: f32[4], input %x: f32[4]) {
  %a = aten.neg.default(%w) : f32[4]
  %z = aten.zeros.default([1024, 1024], dtype=dtype(f32), device=device("cpu"), pin_memory=false) : f32[1024,1024]
  %s = aten.sum.default(%z) : f32[]
  %y = aten.add.Tensor(%a, %s) : f32[4]
  return y=%y
}
"""
    assert print_graph(run_pass("fold_constants", before)) == before


def test_canonicalize_shapes_names_symbols_and_drops_identity_views():
    before = """\
graph @g(input %input_ids: i64[s24,s27], param %e: f32[10,4]) {
  %s = aten.sym_size.int(%input_ids, 1) : int
  %b = aten.sym_size.int(%input_ids, 0) : int
  %emb = aten.embedding.default(%e, %input_ids) : f32[s24,s27,4]
  %v = aten.view.default(%emb, [%b, %s, 4]) : f32[s24,s27,4]
  %four = aten.sym_size.int(%emb, 2) : int
  %r = aten.view.default(%v, [%b, %s, 2, 2]) : f32[s24,s27,2,2]
  %h = aten.slice.Tensor(%r, 1, 0, %four) : f32[s24,Min(4,s27),2,2]
  return y=%h
}
"""
    after = run_pass("canonicalize_shapes", before, dim_names={"input_ids": ["B", "S"]})
    assert print_graph(after) == """\
graph @g(input %input_ids: i64[B,S], param %e: f32[10,4]) {
  %s = aten.sym_size.int(%input_ids, 1) : int
  %b = aten.sym_size.int(%input_ids, 0) : int
  %emb = aten.embedding.default(%e, %input_ids) : f32[B,S,4]
  %r = aten.view.default(%emb, [%b, %s, 2, 2]) : f32[B,S,2,2]
  %h = aten.slice.Tensor(%r, 1, 0, 4) : f32[B,Min(4,S),2,2]
  return y=%h
}
"""


class Toy(torch.nn.Module):
    """A little of everything the passes touch: RoPE-like tables, views, repeated subexpressions."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("inv", 1.0 / (100 ** (torch.arange(0, 4) / 4)), persistent=False)

    def forward(self, x, st):
        b, s = x.shape[:2]
        tab = torch.outer(torch.arange(32, dtype=torch.float32), self.inv)
        cos, sin = tab.cos()[:s], tab.sin()[:s]
        y = self.lin(x).view(b, s, 2, 4)
        y = y * cos.view(1, s, 1, 4) + y.flip(-1) * sin.view(1, s, 1, 4)
        y = y.reshape(b, s, 8) + torch.exp(x) + torch.exp(x)
        return y.softmax(-1), torch.cat([st, y[:, -1:]], 1)[:, 1:]


def traced_toy():
    m = Toy().eval()
    ep = export(m, (torch.randn(2, 5, 8), torch.randn(2, 3, 8)),
                dynamic_shapes={"x": {0: Dim("batch", min=1, max=8), 1: Dim("seq", min=2, max=32)}, "st": {0: Dim("batch", min=1, max=8)}},
                strict=False)
    g = import_exported_program(ep, "toy", input_names=["x"], state_names=["st"], output_names=["y", "st"])
    return m, g


@pytest.mark.parametrize("name", ["dce", "cse", "fold_constants", "canonicalize_shapes"])
def test_every_pass_preserves_reference_results(name):
    m, g = traced_toy()
    after = get_pass(name)(g, PassContext(program_attrs={"dim_names": {"x": ["B", "S"], "st": ["B"]}}))
    x, st = torch.randn(3, 7, 8), torch.randn(3, 3, 8)
    params = {k: v for k, v in m.state_dict().items()}
    want = run_graph(g, {"x": x}, params, {"st": st})
    got = run_graph(after, {"x": x}, params, {"st": st})
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6)
    assert print_graph(parse_graph(print_graph(after))) == print_graph(after)


def test_pass_manager_instruments(tmp_path):
    _, g = traced_toy()
    timing, diff = PassTiming(), IRDiff()
    import io

    buf = io.StringIO()
    pm = PassManager("default", [VerifyAfterEach(), timing, diff, DumpIR(tmp_path), PrintAfterAll(buf, only={"dce"})],
                     PassContext(target=get_target("h100")))
    out = pm.run(Program({"toy": g}, {"dim_names": {"x": ["B", "S"], "st": ["B"]}}))
    assert out.attrs["pipeline"] == pm.pass_names
    assert set(timing.seconds) == set(pm.pass_names)
    assert any(p == "fold_constants" for p, _, _ in diff.diffs)
    files = sorted(p.name for p in (tmp_path / "toy").iterdir())
    assert files[0] == "00_input.ds4ir" and files[-1].endswith("_fit_serving_pools.ds4ir")
    assert len(files) == len(pm.pass_names) + 1
    assert "IR after dce" in buf.getvalue()
    assert "aten.cos" not in print_graph(out.graphs["toy"])


def test_verify_instrument_names_the_breaking_pass():
    @register_pass("test_break_ssa")
    def _break(graph, ctx):
        ops = list(graph.ops)
        ops[0], ops[-1] = ops[-1], ops[0]
        return graph.copy(ops=ops)

    _, g = traced_toy()
    with pytest.raises(VerificationError, match="after pass 'test_break_ssa'"):
        PassManager(["test_break_ssa"], [VerifyAfterEach()]).run(Program({"toy": g}))


def test_unknown_pass_and_pipeline():
    with pytest.raises(PassError, match="unknown pass 'nope'"):
        PassManager(["nope"])
    with pytest.raises(PassError, match="unknown pipeline"):
        PassManager("nope")
