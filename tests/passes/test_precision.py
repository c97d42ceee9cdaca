"""assign_precision and quantize_weights: IR text in/out, the policies, the report, flash-slice bytes."""

from __future__ import annotations

import json

import pytest
import torch

import ds4c
from ds4c.ir import parse_graph, print_graph, verify_graph
from ds4c.ir.interpreter import run_graph
from ds4c.passes import PassContext, get_pass
from ds4c.quant import get_format, pack_weights
from ds4c.quant.calibration import Calibration
from ds4c.quant.policy import choose
from ds4c.quant.units import Unit, find_units
from ds4c.targets import get_target

BEFORE = """\
graph @prefill(param %emb: bf16[64,64], param %w: bf16[64,64], param %head: bf16[64,64], input %input_ids: i64[B,S]) {
  %x = aten.embedding.default(%emb, %input_ids) : bf16[B,S,64] loc("model.embed_tokens")
  %h = aten.linear.default(%x, %w) : bf16[B,S,64] loc("model.layers.0.self_attn.q_a_proj")
  %logits = aten.linear.default(%h, %head) : bf16[B,S,64] loc("lm_head")
  return logits=%logits
}
"""


def _ctx(policy: str, target: str, weights=None, **options) -> PassContext:
    cal = Calibration(load_all=(lambda: weights) if weights is not None else None)
    return PassContext(target=get_target(target), options={"precision": policy, "calibration": cal,
                                                           "max_context": 16, **options})


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(64, 64, generator=g) / 8).bfloat16() for k in ("emb", "w", "head")}


def test_units_of_a_graph():
    units = find_units(parse_graph(BEFORE))
    assert [(u.name, u.kind, u.params) for u in units] == [
        ("emb", "embedding", ("emb",)), ("w", "linear", ("w",)), ("head", "linear", ("head",))]


def test_quantize_weights_reads_packed_params_through_dequant():
    g = parse_graph(BEFORE)
    ctx = PassContext(program_attrs={"precision": {"assignment": {"w": "fp8", "head": "mxfp4"}}})
    after = get_pass("quantize_weights")(g, ctx)
    verify_graph(after)
    assert print_graph(after) == """\
graph @prefill(param %emb: bf16[64,64], param %w.qdata: f8e4m3[64,64], param %w.scale: u8[1,1], \
param %head.qdata: u8[64,32], param %head.scale: u8[64,2], input %input_ids: i64[B,S]) {
  %x = aten.embedding.default(%emb, %input_ids) : bf16[B,S,64] loc("model.embed_tokens")
  %w = quant.dequant(%w.qdata, %w.scale, format="fp8", shape=[64, 64], dtype=dtype(bf16)) : bf16[64,64] \
loc("model.layers.0.self_attn.q_a_proj")
  %h = aten.linear.default(%x, %w) : bf16[B,S,64] loc("model.layers.0.self_attn.q_a_proj")
  %head = quant.dequant(%head.qdata, %head.scale, format="mxfp4", shape=[64, 64], dtype=dtype(bf16)) : \
bf16[64,64] loc("lm_head")
  %logits = aten.linear.default(%h, %head) : bf16[B,S,64] loc("lm_head")
  return logits=%logits
}
"""
    # same result as the original graph on round-tripped weights
    w = _weights()
    ids = torch.randint(0, 64, (1, 5))
    packed = pack_weights(dict(w), {"w": "fp8", "head": "mxfp4"})
    want = {**w, "w": get_format("fp8").roundtrip(w["w"], torch.bfloat16),
            "head": get_format("mxfp4").roundtrip(w["head"], torch.bfloat16)}
    assert torch.equal(run_graph(after, {"input_ids": ids}, packed)["logits"],
                       run_graph(g, {"input_ids": ids}, want)["logits"])


def test_quantize_weights_quantises_the_inputs_of_fp8_linears_once():
    """precision["activations"] (FP8 linears on FP8 tensor cores): each such linear reads its input
    through one quant.activation per input value; the result is the reference GEMM over
    fake-quantised inputs."""
    from ds4c.quant.activations import fp8_roundtrip

    g = parse_graph(BEFORE.replace("%logits = aten.linear.default(%h, %head)", "%logits = aten.linear.default(%x, %head)"))
    plan = {"assignment": {"w": "fp8", "head": "fp8"}, "activations": {"w": "fp8", "head": "fp8"}}
    after = get_pass("quantize_weights")(g, PassContext(program_attrs={"precision": plan}))
    verify_graph(after)
    acts = [op for op in after.ops if op.name == "quant.activation"]
    assert len(acts) == 1 and acts[0].args[0].name == "x" and acts[0].kwargs == {"format": "fp8", "block": 128}
    assert {op.results[0].name: op.args[0] for op in after.ops if op.name == "aten.linear.default"} == \
        {"h": acts[0].result, "logits": acts[0].result}
    assert 'quant.activation(%x, format="fp8", block=128) : bf16[B,S,64]' in print_graph(after)
    w = _weights()
    ids = torch.randint(0, 64, (1, 5))
    packed = pack_weights(dict(w), {"w": "fp8", "head": "fp8"})
    x = w["emb"][ids]
    want = fp8_roundtrip(x) @ get_format("fp8").roundtrip(w["head"], torch.bfloat16).T
    torch.testing.assert_close(run_graph(after, {"input_ids": ids}, packed)["logits"], want, atol=0, rtol=1e-2)


def test_quantize_weights_respects_bisect_and_empty_plans():
    g = parse_graph(BEFORE)
    assert get_pass("quantize_weights")(g, PassContext()) is g
    ctx = PassContext(program_attrs={"precision": {"assignment": {"w": "fp8", "head": "fp8"}}}, bisect_limit=1)
    after = get_pass("quantize_weights")(g, ctx)
    assert [v.name for v in after.inputs_of_kind("param")] == ["emb", "w.qdata", "w.scale", "head"]


@pytest.mark.parametrize("policy,target,want", [
    ("bf16", "b200", {"emb": "bf16", "w": "bf16", "head": "bf16"}),
    ("fp8", "b200", {"emb": "bf16", "w": "fp8", "head": "fp8"}),  # head is named "head", not lm_head
    ("auto", "cpu", {"emb": "fp32", "w": "fp32", "head": "fp32"}),
])
def test_fixed_policies(policy, target, want):
    g = parse_graph(BEFORE)
    if policy == "auto":
        g = parse_graph(BEFORE.replace("bf16", "f32"))
    ctx = _ctx(policy, target, _weights())
    get_pass("assign_precision")(g, ctx)
    rec = ctx.program_attrs["precision"]
    assert {u["unit"]: u["format"] for u in rec["units"]} == want
    assert rec["assignment"] == {k: v for k, v in want.items() if v not in ("bf16", "fp32")}


@pytest.mark.parametrize("effects", [True, False])
def test_auto_measures_and_stays_under_the_bound(effects, monkeypatch):
    """By each unit's effect on the output (KL of the next-token distributions), or, beyond
    MAX_EFFECT_TRIALS forwards, by the NSR of its own output on calibration activations."""
    import ds4c.passes.assign_precision as ap

    if not effects:
        monkeypatch.setattr(ap, "MAX_EFFECT_TRIALS", 0)
    g = parse_graph(BEFORE)
    tight = 2e-6 if effects else 1e-4  # below every unit's FP8 cost (KL is second order in the noise)
    for bound, target in ((1.0, "b200"), (0.01, "b200"), (tight, "b200"), (1.0, "h100")):
        ctx = _ctx("auto", target, _weights(), error_bound=bound)
        get_pass("assign_precision")(g, ctx)
        rec = ctx.program_attrs["precision"]
        assert rec["measured"] == ("output KL" if effects else "activations") and rec["total_error"] <= bound
        fmts = {u["unit"]: u["format"] for u in rec["units"]}
        if bound == 1.0:  # room for everything: the smallest format the target runs (int8's per-row
            # scales make it 6% larger than fp8 on 64x64)
            assert set(fmts.values()) == ({"mxfp4"} if target == "b200" else {"fp8"})
        if bound == tight:
            assert "mxfp4" not in fmts.values() and "fp8" not in fmts.values()
        for u in rec["units"]:
            assert set(u["errors"]) == {"bf16", "int8", "fp8", "mxfp4"} and u["why"]
            assert u["bytes"] == get_format(u["format"]).nbytes((64, 64))
        assert rec["units"][0]["errors"]["mxfp4"] > rec["units"][0]["errors"]["fp8"] > rec["units"][0]["errors"]["int8"]


def test_auto_keeps_shipped_formats_and_tables_choose_per_unit(tmp_path):
    units = find_units(parse_graph(BEFORE))
    errors = {u.name: {"bf16": 0.0, "int8": 1e-4, "fp8": 1e-3, "mxfp4": 1e-2} for u in units}
    picks = choose(units, errors, "auto", get_target("h100"), "bf16", arrival={"w": "mxfp4"}, bound=1e-3)
    assert [(c.format, c.activations) for c in picks] == [("int8", "bf16"), ("mxfp4", "bf16"), ("int8", "bf16")]
    assert "ships" in picks[1].why and "fp8 would add" in picks[0].why
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"he*": "mxfp4", "*": "fp8"}))
    picks = choose(units, errors, str(table), get_target("b200"), "bf16")
    # what runs on b200: the FP8 linear multiplies FP8 activations, the MXFP4 one MXFP4 activations
    # (FP4 tensor cores); the embedding is a lookup
    assert [(c.format, c.activations) for c in picks] == [("fp8", "bf16"), ("fp8", "fp8"), ("mxfp4", "mxfp4")]
    # h100 has no FP4 tensor cores: MXFP4 stays weight-only there
    assert choose(units, errors, str(table), get_target("h100"), "bf16")[2].activations == "bf16"
    # MI300's matrix cores take FNUZ e4m3, not the OCP e4m3 ds4c quantises to: weight-only there
    picks = choose(units, errors, str(table), get_target("mi300x"), "bf16")
    assert [c.activations for c in picks] == ["bf16"] * 3
    table.write_text(json.dumps({"*": "fp5"}))
    with pytest.raises(ds4c.errors.ConfigError, match="unknown format 'fp5'"):
        choose(units, errors, str(table), get_target("b200"), "bf16")


def test_flash_slice_weight_bytes_b200_and_h100():
    """Decided from weight samples (41 GB of bf16 weights are never materialised); bytes exact from shapes.
    One compile (b200); h100's decision is re-made by the same policy from the report's measurements."""
    art = ds4c.compile("flash-slice", target="b200", max_context=256, progress=False)
    prec, tensors = art.manifest["precision"], art.manifest["weights"]["source_tensors"]
    assert art.manifest["weights"]["mode"] == "reference" and prec["measured"] == "weight samples"
    others = prec["weight_bytes"] - sum(u["bytes"] for u in prec["units"])
    assert others == sum(torch.Size(t["shape"]).numel() * getattr(torch, t["dtype"]).itemsize
                         for k, t in tensors.items() if not any(k in u["params"] for u in prec["units"]))
    ratios = {"b200": prec["weight_bytes"] / prec["bf16_weight_bytes"]}
    units = [Unit(u["unit"], u["kind"], tuple(u["params"]), tuple(tuple(tensors[p]["shape"]) for p in u["params"]), 0)
             for u in prec["units"]]
    h100 = choose(units, {u["unit"]: u["errors"] for u in prec["units"]}, "auto", get_target("h100"), "bf16")
    assert {c.format for c in h100} <= {"bf16", "int8", "fp8"}
    ratios["h100"] = (others + sum(c.bytes for c in h100)) / prec["bf16_weight_bytes"]
    assert ratios["b200"] <= 0.30 and ratios["h100"] <= 0.55, ratios


def test_error_bound_from_the_cli_is_checked():
    from typer.testing import CliRunner

    from ds4c.cli import app

    out = CliRunner().invoke(app, ["compile", "tiny", "--target", "b200", "--error-bound", "-1", "-o", "x.ds4"])
    assert out.exit_code != 0 and "--error-bound must be a positive number" in out.output
