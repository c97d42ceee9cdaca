"""`ds4c debug numerics` on artifacts: one artifact through its own pipeline, and two artifacts of
one model at different precisions and contexts side by side."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import ds4c
from ds4c.cli import app
from ds4c.debug.numerics import Feed, compare_graphs
from ds4c.debug.session import numerics_for_artifact, numerics_for_artifacts
from ds4c.ir import parse_graph

runner = CliRunner()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("arts")
    fp32, fp8 = d / "fp32.ds4", d / "fp8.ds4"
    ds4c.compile("tiny", target="cpu", max_context=32, progress=False).save(fp32)
    ds4c.compile("tiny", target="cpu", precision="fp8", max_context=24, progress=False).save(fp8)
    return fp32, fp8


def test_numerics_of_an_artifact_recompiles_it_with_a_trace(artifacts):
    fp32, _ = artifacts
    res = runner.invoke(app, ["debug", "numerics", str(fp32), "--seq-len", "12"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "preset 'tiny' (seed 0), target cpu" in text and "max context 32" in text
    assert "the recompile's @prefill IR equals the artifact's" in text and "no divergence" in text


def test_numerics_of_an_artifact_names_the_pass_that_changes_its_numbers(artifacts):
    _, fp8 = artifacts
    divergence, notes = numerics_for_artifact(fp8, entry="decode", atol=1e-3, seq_len=10)
    assert "precision fp8 (bfloat16), max context 24" in notes[0]
    # the fusions keep bf16's numbers; packing the weights in FP8 is what changes them
    assert divergence is not None and divergence.graph == "decode" and divergence.pass_name == "quantize_weights"
    assert "quant.dequant" in divergence.op


def test_artifacts_of_different_precision_and_context_side_by_side(artifacts):
    fp32, fp8 = artifacts
    res = runner.invoke(app, ["debug", "numerics", str(fp32), "--against", str(fp8), "--seq-len", "12"])
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())
    assert "precision auto (float32) vs fp8 (bfloat16)" in text and "max context 32 vs 24" in text
    assert "compared on 12 tokens" in text and "left out, shapes differ: " in text and "compressed_kv" in text
    assert "first divergence: pass 'fp8.ds4 vs fp32.ds4'" in text and "logits=" in text
    # a tolerance above FP8's error: nothing diverges on what both compute
    loose, _ = numerics_for_artifacts(fp32, fp8, atol=100.0, seq_len=12)
    assert loose is None
    with pytest.raises(ds4c.errors.InputError, match="exceeds the maximum context 24"):
        numerics_for_artifacts(fp32, fp8, seq_len=30)


def test_compare_graphs_leaves_out_values_of_other_shapes():
    a = parse_graph("graph @g(input %x: f32[4]) {\n  %y = aten.mul.Tensor(%x, %x) : f32[4]\n"
                    "  return out=%y, s=%x\n}")
    b = parse_graph("graph @g(input %x: f32[2]) {\n  %y = aten.mul.Tensor(%x, %x) : f32[2]\n"
                    "  return out=%y, s=%x\n}")
    x = torch.arange(4.0)
    assert compare_graphs(a, b, {"x": x}, {}, b_feed=Feed({"x": x[:2]}, {}), comparable_only=True) is None
    # counted as different when asked to compare everything
    assert compare_graphs(a, b, {"x": x}, {}, b_feed=Feed({"x": x[:2]}, {})) is not None
