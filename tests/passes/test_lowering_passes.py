"""The GPU lowering stage, pass by pass: IR text before -> IR text after (golden), a near miss that
must stay as it is, and the reference result kept (lower_packed_weights, fuse_norm_rope, fuse_paged_reads,
merge_sibling_linears; run through the PassManager with a Triton target)."""

from __future__ import annotations

import pytest
import torch

from ds4c.compiler import apply_lowering
from ds4c.ir import Program, parse_graph, print_graph
from ds4c.ir.interpreter import run_graph
from ds4c.passes import PassContext, PassManager
from ds4c.passes.instruments import VerifyAfterEach
from ds4c.quant import pack_weights
from ds4c.targets import get_target


def lower(pass_name: str, text: str, *, target: str = "h100", attrs: dict | None = None,
          before: list[str] = (), **options) -> Program:
    """``text`` (one graph) through ``before`` and then ``pass_name``, for ``target``, verified after each."""
    g = parse_graph(text)
    ctx = PassContext(target=get_target(target), options=options)
    return PassManager([*before, pass_name], [VerifyAfterEach()], ctx).run(Program({g.name: g}, dict(attrs or {})))


def only_graph(program: Program) -> str:
    (g,) = program.graphs.values()
    return print_graph(g)


# -- lower_packed_weights --------------------------------------------------------------------------

PACKED_BEFORE = """\
graph @prefill(param %emb: bf16[64,64], param %w: bf16[256,64], param %head: bf16[64,64], param %b: bf16[64], \
input %input_ids: i64[B,S]) {
  %x = aten.embedding.default(%emb, %input_ids) : bf16[B,S,64] loc("model.embed_tokens")
  %h = aten.linear.default(%x, %w) : bf16[B,S,256] loc("model.layers.0.self_attn.q_a_proj")
  %g = aten.slice.Tensor(%h, -1, 0, 64) : bf16[B,S,64]
  %logits = aten.linear.default(%g, %head, %b) : bf16[B,S,64] loc("lm_head")
  return logits=%logits
}
"""
# int8 embedding, FP8 q_a_proj multiplied in FP8 activations, MXFP4 head with a bias
PACKED_PLAN = {"assignment": {"emb": "int8", "w": "fp8", "head": "mxfp4"}, "activations": {"w": "fp8"}}


def test_lower_packed_weights_golden():
    """The FP8 linear reads its packed tensors and quantises its input itself (act="fp8"); the
    embedding's and the biased head's weights (no kernel reads them packed) are dequantised once,
    at load: parameters of their own, recorded as ``dequantize`` transforms."""
    quantized = lower("quantize_weights", PACKED_BEFORE, attrs={"precision": PACKED_PLAN})
    assert only_graph(quantized).count("quant.dequant") == 3 and "quant.activation" in only_graph(quantized)
    out = lower("lower_packed_weights", only_graph(quantized))
    assert only_graph(out) == """\
graph @prefill(param %w.qdata: f8e4m3[256,64], param %w.scale: u8[2,1], param %b: bf16[64], input %input_ids: i64[B,S], \
param %emb: bf16[64,64], param %head: bf16[64,64]) {
  %x = aten.embedding.default(%emb, %input_ids) : bf16[B,S,64] loc("model.embed_tokens")
  %h = linear.packed(%x, %w.qdata, %w.scale, format="fp8", shape=[256, 64], act="fp8") : bf16[B,S,256] \
loc("model.layers.0.self_attn.q_a_proj")
  %g = aten.slice.Tensor(%h, -1, 0, 64) : bf16[B,S,64]
  %logits = aten.linear.default(%g, %head, %b) : bf16[B,S,64] loc("lm_head")
  return logits=%logits
}
"""
    assert out.attrs["weight_transforms"] == [{"op": "dequantize", "tensors": {
        "emb": {"format": "int8", "shape": [64, 64], "dtype": "bfloat16", "from": ["emb.qdata", "emb.scale"]},
        "head": {"format": "mxfp4", "shape": [64, 64], "dtype": "bfloat16", "from": ["head.qdata", "head.scale"]}}}]
    # the same numbers as the dequantising graph, on the same packed weights
    gen = torch.Generator().manual_seed(0)
    weights = {"emb": torch.randn(64, 64, generator=gen), "w": torch.randn(256, 64, generator=gen) / 8,
               "head": torch.randn(64, 64, generator=gen) / 8, "b": torch.randn(64, generator=gen)}
    weights = {k: v.bfloat16() for k, v in weights.items()}
    packed = pack_weights(dict(weights), PACKED_PLAN["assignment"])
    lowered = dict(packed)
    apply_lowering(lowered, out.attrs["weight_transforms"])
    ids = torch.randint(0, 64, (1, 5), generator=gen)
    want = run_graph(quantized.graphs["prefill"], {"input_ids": ids}, packed)["logits"]
    torch.testing.assert_close(run_graph(out.graphs["prefill"], {"input_ids": ids}, lowered)["logits"], want)


def test_lower_packed_weights_near_miss_keeps_weights_a_kernel_cannot_read_packed():
    """A dequantised weight that some use cannot read packed (here: also an activation of a matmul)
    is expanded once at load for all its uses, even the linear that could; off a Triton target
    nothing is lowered at all."""
    before = """\
graph @prefill(param %w.qdata: f8e4m3[64,64], param %w.scale: u8[1,1], input %x: bf16[B,64]) {
  %w = quant.dequant(%w.qdata, %w.scale, format="fp8", shape=[64, 64], dtype=dtype(bf16)) : bf16[64,64]
  %y = aten.linear.default(%x, %w) : bf16[B,64]
  %z = aten.mm.default(%y, %w) : bf16[B,64]
  return z=%z
}
"""
    out = lower("lower_packed_weights", before)
    assert only_graph(out) == """\
graph @prefill(input %x: bf16[B,64], param %w: bf16[64,64]) {
  %y = aten.linear.default(%x, %w) : bf16[B,64]
  %z = aten.mm.default(%y, %w) : bf16[B,64]
  return z=%z
}
"""
    assert [t["op"] for t in out.attrs["weight_transforms"]] == ["dequantize"]
    assert only_graph(lower("lower_packed_weights", before, target="cpu")) == before


# -- fuse_norm_rope --------------------------------------------------------------------------------

NORM_ROPE_BEFORE = """\
graph @decode(param %wk: f32[32], input %q: f32[B,4,1,32], input %k: f32[B,1,32], input %cos: f32[1,1,1,8], \
input %sin: f32[1,1,1,8]) {
  %qn = rms_norm(%q, none, eps=1e-06) : f32[B,4,1,32]
  %qr = rope(%qn, %cos, %sin, rope_dim=8, inverse=false) : f32[B,4,1,32]
  %b = aten.sym_size.int(%k, 0) : int
  %kn = rms_norm(%k, %wk, eps=1e-06) : f32[B,1,32]
  %kv = aten.view.default(%kn, [%b, 1, 1, 32]) : f32[B,1,1,32]
  %kt = aten.transpose.int(%kv, 1, 2) : f32[B,1,1,32]
  %kr = rope(%kt, %cos, %sin, rope_dim=8, inverse=false) : f32[B,1,1,32]
  return q=%qr, k=%kr
}
"""


def _rope_feed(gen: torch.Generator) -> tuple[dict, dict]:
    angles = torch.rand(1, 1, 1, 4, generator=gen) * 6
    inputs = {"q": torch.randn(2, 4, 1, 32, generator=gen), "k": torch.randn(2, 1, 32, generator=gen),
              "cos": angles.cos().repeat_interleave(2, -1), "sin": angles.sin().repeat_interleave(2, -1)}
    return inputs, {"wk": torch.rand(32, generator=gen) + 0.5}


def test_fuse_norm_rope_golden():
    """The query's norm and rope become one op; the key's too, its view and transpose moved before
    the fused op (they now read the norm's input). Results keep their names and numbers."""
    out = lower("fuse_norm_rope", NORM_ROPE_BEFORE)
    assert only_graph(out) == """\
graph @decode(param %wk: f32[32], input %q: f32[B,4,1,32], input %k: f32[B,1,32], input %cos: f32[1,1,1,8], \
input %sin: f32[1,1,1,8]) {
  %qr = rms_norm.rope(%q, none, %cos, %sin, eps=1e-06, rope_dim=8) : f32[B,4,1,32]
  %b = aten.sym_size.int(%k, 0) : int
  %kv = aten.view.default(%k, [%b, 1, 1, 32]) : f32[B,1,1,32]
  %kt = aten.transpose.int(%kv, 1, 2) : f32[B,1,1,32]
  %kr = rms_norm.rope(%kt, %wk, %cos, %sin, eps=1e-06, rope_dim=8) : f32[B,1,1,32]
  return q=%qr, k=%kr
}
"""
    inputs, params = _rope_feed(torch.Generator().manual_seed(1))
    want = run_graph(parse_graph(NORM_ROPE_BEFORE), inputs, params)
    got = run_graph(out.graphs["decode"], inputs, params)
    for name in ("q", "k"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)
    # the compile option turns it off, and only Triton targets lower at all
    assert only_graph(lower("fuse_norm_rope", NORM_ROPE_BEFORE, fuse_norm_rope=False)) == NORM_ROPE_BEFORE
    assert only_graph(lower("fuse_norm_rope", NORM_ROPE_BEFORE, target="cpu")) == NORM_ROPE_BEFORE


def test_fuse_norm_rope_near_misses_stay_apart():
    """Not fused: a norm whose result is also a graph output (the norm must stay), a norm with a
    second reader, a layout op on the way with a second reader, a view that splits the rows the
    norm runs over, and an inverse rope."""
    before = """\
graph @decode(param %wk: f32[32], input %q: f32[B,4,1,32], input %k: f32[B,1,32], input %cos: f32[1,1,1,8], \
input %sin: f32[1,1,1,8], input %c4: f32[1,1,1,4], input %s4: f32[1,1,1,4]) {
  %qn = rms_norm(%q, none, eps=1e-06) : f32[B,4,1,32]
  %qr = rope(%qn, %cos, %sin, rope_dim=8, inverse=false) : f32[B,4,1,32]
  %pn = rms_norm(%q, none, eps=1e-05) : f32[B,4,1,32]
  %pr = rope(%pn, %cos, %sin, rope_dim=8, inverse=false) : f32[B,4,1,32]
  %pm = aten.mul.Tensor(%pn, 2.0) : f32[B,4,1,32]
  %b = aten.sym_size.int(%k, 0) : int
  %kn = rms_norm(%k, %wk, eps=1e-06) : f32[B,1,32]
  %kv = aten.view.default(%kn, [%b, 1, 1, 32]) : f32[B,1,1,32]
  %kt = aten.transpose.int(%kv, 1, 2) : f32[B,1,1,32]
  %kr = rope(%kt, %cos, %sin, rope_dim=8, inverse=false) : f32[B,1,1,32]
  %jn = rms_norm(%k, %wk, eps=1e-05) : f32[B,1,32]
  %jv = aten.view.default(%jn, [%b, 1, 4, 8]) : f32[B,1,4,8]
  %jr = rope(%jv, %c4, %s4, rope_dim=4, inverse=false) : f32[B,1,4,8]
  %in = rms_norm(%q, none, eps=0.0001) : f32[B,4,1,32]
  %ir = rope(%in, %cos, %sin, rope_dim=8, inverse=true) : f32[B,4,1,32]
  return q=%qr, qn=%qn, p=%pr, pm=%pm, k=%kr, kv=%kv, j=%jr, i=%ir
}
"""
    assert only_graph(lower("fuse_norm_rope", before)) == before


# -- merge_sibling_linears -------------------------------------------------------------------------

SIBLINGS_BEFORE = """\
graph @decode(param %attn.q_a.weight: bf16[32,64], param %attn.kv.weight: bf16[16,64], param %attn.o.weight: bf16[16,32], \
param %a.qdata: f8e4m3[128,64], param %a.scale: u8[1,1], param %c.qdata: f8e4m3[64,64], param %c.scale: u8[1,1], \
input %x: bf16[B,1,64]) {
  %q = aten.linear.default(%x, %attn.q_a.weight) : bf16[B,1,32] loc("attn.q_a")
  %kv = aten.linear.default(%x, %attn.kv.weight) : bf16[B,1,16] loc("attn.kv")
  %o = aten.linear.default(%q, %attn.o.weight) : bf16[B,1,16] loc("attn.o")
  %pa = linear.packed(%x, %a.qdata, %a.scale, format="fp8", shape=[128, 64], act="fp8") : bf16[B,1,128]
  %pc = linear.packed(%x, %c.qdata, %c.scale, format="fp8", shape=[64, 64], act="fp8") : bf16[B,1,64]
  return o=%o, kv=%kv, pa=%pa, pc=%pc
}
"""


def test_merge_sibling_linears_golden():
    """Two plain and two FP8 linears of one input: one GEMM each over concatenated weights (the
    FP8 part of 128 rows fills whole scale blocks, so the 64-row one can follow it), sliced after;
    the slices keep the results' names; each concatenation is a ``concat`` weight transform. The
    linear of another input (%o reads %q) stays."""
    out = lower("merge_sibling_linears", SIBLINGS_BEFORE)
    assert only_graph(out) == """\
graph @decode(param %attn.o.weight: bf16[16,32], input %x: bf16[B,1,64], param %attn.cat:q_a.weight:kv.weight: bf16[48,64], \
param %cat:a.qdata:c.qdata: f8e4m3[192,64], param %cat:a.scale:c.scale: u8[2,1]) {
  %q_merged = aten.linear.default(%x, %attn.cat:q_a.weight:kv.weight) : bf16[B,1,48] loc("attn.q_a")
  %q = aten.slice.Tensor(%q_merged, -1, 0, 32) : bf16[B,1,32] loc("attn.q_a")
  %kv = aten.slice.Tensor(%q_merged, -1, 32, 48) : bf16[B,1,16] loc("attn.kv")
  %o = aten.linear.default(%q, %attn.o.weight) : bf16[B,1,16] loc("attn.o")
  %pa_merged = linear.packed(%x, %cat:a.qdata:c.qdata, %cat:a.scale:c.scale, format="fp8", shape=[192, 64], \
act="fp8") : bf16[B,1,192]
  %pa = aten.slice.Tensor(%pa_merged, -1, 0, 128) : bf16[B,1,128]
  %pc = aten.slice.Tensor(%pa_merged, -1, 128, 192) : bf16[B,1,64]
  return o=%o, kv=%kv, pa=%pa, pc=%pc
}
"""
    assert out.attrs["weight_transforms"] == [{"op": "concat", "tensors": {
        "attn.cat:q_a.weight:kv.weight": ["attn.q_a.weight", "attn.kv.weight"],
        "cat:a.qdata:c.qdata": ["a.qdata", "c.qdata"], "cat:a.scale:c.scale": ["a.scale", "c.scale"]}}]
    # the merged GEMMs over the concatenated weights give the siblings' numbers
    gen = torch.Generator().manual_seed(2)
    weights = {"attn.q_a.weight": torch.randn(32, 64, generator=gen), "attn.kv.weight": torch.randn(16, 64, generator=gen),
               "attn.o.weight": torch.randn(16, 32, generator=gen), "a": torch.randn(128, 64, generator=gen),
               "c": torch.randn(64, 64, generator=gen)}
    weights = pack_weights({k: (v / 8).bfloat16() for k, v in weights.items()}, {"a": "fp8", "c": "fp8"})
    lowered = dict(weights)
    apply_lowering(lowered, out.attrs["weight_transforms"])
    x = {"x": torch.randn(2, 1, 64, generator=gen).bfloat16()}
    want = run_graph(parse_graph(SIBLINGS_BEFORE), x, weights)
    got = run_graph(out.graphs["decode"], x, lowered)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    # the compile options keep all, or the packed, siblings apart
    assert only_graph(lower("merge_sibling_linears", SIBLINGS_BEFORE, merge_linears=False)) == SIBLINGS_BEFORE
    packed_apart = only_graph(lower("merge_sibling_linears", SIBLINGS_BEFORE, merge_packed=False))
    assert "%q_merged" in packed_apart and "%pa_merged" not in packed_apart


@pytest.mark.parametrize("why,second,rows", [
    ("another input", 'linear.packed(%y, %c.qdata, %c.scale, format="fp8", shape=[128, 64])', 128),
    ("another format", 'linear.packed(%x, %c.qdata, %c.scale, format="fp8-f32scale", shape=[128, 64])', 128),
    ("another activation format", 'linear.packed(%x, %c.qdata, %c.scale, format="fp8", shape=[128, 64], act="fp8")',
     128),
    ("a ragged part that is not last", 'linear.packed(%x, %d.qdata, %d.scale, format="fp8", shape=[64, 64])', 64),
    ("a bias", "aten.linear.default(%x, %w, %bias)", 64),
    ("a weight that is no parameter", "aten.linear.default(%x, %t)", 64),
])
def test_merge_sibling_linears_near_misses_stay_apart(why, second, rows):
    """Siblings of %x that must stay apart: the FP8 linear %pa (64 rows: a ragged scale block,
    so it can only come last) and %z (the near miss), or the plain %u and %z."""
    before = f"""\
graph @decode(param %a.qdata: f8e4m3[64,64], param %a.scale: u8[1,1], param %c.qdata: f8e4m3[128,64], \
param %c.scale: u8[1,1], param %d.qdata: f8e4m3[64,64], param %d.scale: u8[1,1], param %w: bf16[64,64], \
param %bias: bf16[64], input %x: bf16[B,1,64], input %y: bf16[B,1,64]) {{
  %t = aten.t.default(%w) : bf16[64,64]
  %pa = linear.packed(%x, %a.qdata, %a.scale, format="fp8", shape=[64, 64]) : bf16[B,1,64]
  %z = {second} : bf16[B,1,{rows}]
  %u = aten.linear.default(%x, %w) : bf16[B,1,64]
  return pa=%pa, z=%z, u=%u, t=%t
}}
"""
    assert only_graph(lower("merge_sibling_linears", before)) == before, why


# -- fuse_paged_reads ------------------------------------------------------------------------------

PAGED_BEFORE = """\
graph @ragged_step(param %sinks: f32[4], input %q: f32[N,4,1,8], input %iq: f32[N,1,2,8], input %w: f32[N,1,2], \
input %win: f32[12,8], input %comp: f32[9,8], input %ikeys: f32[9,8], input %wrows: i64[N,3], \
input %crows: i64[N,5], input %bias: f32[N,1,1,8], input %wbias: f32[N,1,1,3], input %future: i1[N,1,5]) {
  %ik = paged.gather(%ikeys, %crows) : f32[N,5,8]
  %top = indexer.topk(%iq, %ik, %w, %future, k=2, softmax_scale=0.5, weights_scale=0.7) : i64[N,1,2]
  %wk = paged.gather(%win, %wrows) : f32[N,3,8]
  %ck = paged.gather(%comp, %crows) : f32[N,5,8]
  %cat = aten.cat.default([%wk, %ck], 1) : f32[N,8,8]
  %keys = aten.unsqueeze.default(%cat, 1) : f32[N,1,8,8]
  %o = attention.hca(%q, %keys, %bias, %sinks, scale=0.35) : f32[N,4,1,8]
  %sk = paged.gather(%win, %wrows) : f32[N,3,8]
  %skeys = aten.unsqueeze.default(%sk, 1) : f32[N,1,3,8]
  %so = attention.sliding(%q, %skeys, %wbias, %sinks, scale=0.35) : f32[N,4,1,8]
  return top=%top, o=%o, so=%so
}
"""


def _paged_feed(gen: torch.Generator) -> tuple[dict, dict]:
    n = 3
    crows = torch.randint(0, 9, (n, 5), generator=gen)
    crows[0, 2:] = -1  # a short sequence's entries past its end
    wrows = torch.randint(0, 12, (n, 3), generator=gen)
    wrows[0, 0] = -1
    rows = torch.cat([wrows, crows], dim=1)
    inputs = {"q": torch.randn(n, 4, 1, 8, generator=gen), "iq": torch.randn(n, 1, 2, 8, generator=gen),
              "w": torch.randn(n, 1, 2, generator=gen), "win": torch.randn(12, 8, generator=gen),
              "comp": torch.randn(9, 8, generator=gen), "ikeys": torch.randn(9, 8, generator=gen),
              "wrows": wrows, "crows": crows, "bias": torch.where(rows >= 0, 0.0, float("-inf")).view(n, 1, 1, 8),
              "wbias": torch.where(wrows >= 0, 0.0, float("-inf")).view(n, 1, 1, 3),
              "future": (crows < 0).view(n, 1, 5)}
    return inputs, {"sinks": torch.randn(4, generator=gen)}


def test_fuse_paged_reads_golden():
    """A serving step's indexer and attention read their keys at the pools' rows: the gathers (and
    the concatenation, and the unsqueeze) go, the consumers become their ``.rows`` forms with the
    same results; off by the compile option and on targets without Triton kernels."""
    out = lower("fuse_paged_reads", PAGED_BEFORE)
    assert only_graph(out) == """\
graph @ragged_step(param %sinks: f32[4], input %q: f32[N,4,1,8], input %iq: f32[N,1,2,8], input %w: f32[N,1,2], \
input %win: f32[12,8], input %comp: f32[9,8], input %ikeys: f32[9,8], input %wrows: i64[N,3], \
input %crows: i64[N,5], input %bias: f32[N,1,1,8], input %wbias: f32[N,1,1,3], input %future: i1[N,1,5]) {
  %top = indexer.topk.rows(%iq, %ikeys, %crows, %w, %future, k=2, softmax_scale=0.5, weights_scale=0.7) : i64[N,1,2]
  %o = attention.hca.rows(%q, %win, %wrows, %comp, %crows, %bias, %sinks, scale=0.35) : f32[N,4,1,8]
  %so = attention.sliding.rows(%q, %win, %wrows, none, none, %wbias, %sinks, scale=0.35) : f32[N,4,1,8]
  return top=%top, o=%o, so=%so
}
"""
    inputs, params = _paged_feed(torch.Generator().manual_seed(2))
    want = run_graph(parse_graph(PAGED_BEFORE), inputs, params)
    got = run_graph(out.graphs["ragged_step"], inputs, params)
    for name in ("o", "so"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert torch.equal(got["top"].sort(-1).values, want["top"].sort(-1).values)
    assert only_graph(lower("fuse_paged_reads", PAGED_BEFORE, fuse_paged_reads=False)) == PAGED_BEFORE
    assert only_graph(lower("fuse_paged_reads", PAGED_BEFORE, target="cpu")) == PAGED_BEFORE


def test_fuse_paged_reads_near_misses_keep_the_copies():
    """Kept: a gather that is also a graph output, a gather read twice, a concatenation of three
    copies, one along the channels, and keys unsqueezed on another axis."""
    before = """\
graph @ragged_step(param %sinks: f32[4], input %q: f32[N,4,1,8], input %iq: f32[N,1,2,8], input %w: f32[N,1,2], \
input %win: f32[12,8], input %rows: i64[N,3], input %bias: f32[N,1,1,3], input %future: i1[N,1,3], \
input %b9: f32[N,1,1,9]) {
  %ik = paged.gather(%win, %rows) : f32[N,3,8]
  %top = indexer.topk(%iq, %ik, %w, %future, k=2, softmax_scale=0.5, weights_scale=0.7) : i64[N,1,2]
  %a = paged.gather(%win, %rows) : f32[N,3,8]
  %ka = aten.unsqueeze.default(%a, 1) : f32[N,1,3,8]
  %oa = attention.sliding(%q, %ka, %bias, %sinks, scale=0.35) : f32[N,4,1,8]
  %ob = attention.sliding(%q, %ka, %bias, %sinks, scale=0.35) : f32[N,4,1,8]
  %c = paged.gather(%win, %rows) : f32[N,3,8]
  %cat3 = aten.cat.default([%c, %c, %c], 1) : f32[N,9,8]
  %k3 = aten.unsqueeze.default(%cat3, 1) : f32[N,1,9,8]
  %o3 = attention.hca(%q, %k3, %b9, %sinks, scale=0.35) : f32[N,4,1,8]
  %d = paged.gather(%win, %rows) : f32[N,3,8]
  %e = paged.gather(%win, %rows) : f32[N,3,8]
  %wide = aten.cat.default([%d, %e], 2) : f32[N,3,16]
  %f = paged.gather(%win, %rows) : f32[N,3,8]
  %kf = aten.unsqueeze.default(%f, 0) : f32[1,N,3,8]
  return top=%top, ik=%ik, oa=%oa, ob=%ob, o3=%o3, wide=%wide, kf=%kf
}
"""
    assert only_graph(lower("fuse_paged_reads", before)) == before


TABLE_BEFORE = """\
graph @ragged_step(input %iq: f32[N,1,2,8], input %w: f32[N,1,2], input %ikeys: f32[64,8], input %table: i32[R,4], \
input %seq: i64[N], input %visible: i64[N], input %future: i1[N,1,64]) {
  %rows = paged.rows(%table, %seq, none, %visible, count=64, page=16) : i64[N,64]
  %ik = paged.gather(%ikeys, %rows) : f32[N,64,8]
  %top = indexer.topk(%iq, %ik, %w, %future, k=4, softmax_scale=0.5, weights_scale=0.7) : i64[N,1,4]
  %sel = aten.select.int(%top, 1, 0) : i64[N,4]
  %picked = aten.gather.default(%rows, 1, %sel) : i64[N,4]
  return top=%top, picked=%picked
}
"""


def test_fuse_paged_reads_finds_the_indexers_rows_through_the_page_table():
    """The indexer's rows list (every entry each token may see) is made by nothing but the page
    table: the indexer reads the table itself, the picks' rows come from ``paged.rows_at``, and the
    [N, C] rows are not made; same results. Kept when the rows have another reader."""
    out = lower("fuse_paged_reads", TABLE_BEFORE)
    assert only_graph(out) == """\
graph @ragged_step(input %iq: f32[N,1,2,8], input %w: f32[N,1,2], input %ikeys: f32[64,8], input %table: i32[R,4], \
input %seq: i64[N], input %visible: i64[N], input %future: i1[N,1,64]) {
  %top = indexer.topk.table(%iq, %ikeys, %table, %seq, %visible, %w, %future, k=4, softmax_scale=0.5, \
weights_scale=0.7, count=64, page=16) : i64[N,1,4]
  %sel = aten.select.int(%top, 1, 0) : i64[N,4]
  %picked = paged.rows_at(%table, %seq, %sel, %visible, page=16) : i64[N,4]
  return top=%top, picked=%picked
}
"""
    gen = torch.Generator().manual_seed(3)
    n = 3
    visible = torch.tensor([5, 33, 64])
    inputs = {"iq": torch.randn(n, 1, 2, 8, generator=gen), "w": torch.rand(n, 1, 2, generator=gen) + 0.1,
              "ikeys": torch.randn(64, 8, generator=gen), "table": torch.stack([torch.randperm(4, generator=gen)
                                                                              for _ in range(2)]).int(),
              "seq": torch.tensor([0, 1, 1]), "visible": visible,
              "future": (torch.arange(64).view(1, 1, -1) >= visible.view(-1, 1, 1))}
    want = run_graph(parse_graph(TABLE_BEFORE), inputs, {})
    got = run_graph(out.graphs["ragged_step"], inputs, {})
    assert torch.equal(got["top"], want["top"]) and torch.equal(got["picked"], want["picked"])
    kept = TABLE_BEFORE.replace("return top=%top, picked=%picked", "return top=%top, picked=%picked, rows=%rows")
    assert "indexer.topk.rows(" in only_graph(lower("fuse_paged_reads", kept))
