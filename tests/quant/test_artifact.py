"""Packed weights in artifacts: compile-time packing (embedded) equals load-time packing (referenced)."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

import ds4c
from ds4c.artifact.artifact import read_artifact
from ds4c.cli import app


def test_compiled_tiny_runs_packed_and_reports(tmp_path):
    art = ds4c.compile("tiny", target="b200", precision="mxfp4-experts", max_context=32, progress=False)
    prec, w = art.manifest["precision"], art.manifest["weights"]
    kinds = {u["kind"]: u["format"] for u in prec["units"] if u["layer"] == 1}
    assert kinds == {"linear": "fp8", "grouped_linear": "fp8", "experts": "mxfp4", "shared_experts": "fp8"}
    assert w["bytes"] == prec["weight_bytes"]
    for k, t in art.weights.items():  # packed tensors exactly as the manifest (and the IR) declare them
        if k.endswith((".qdata", ".scale")):
            assert [list(t.shape), str(t.dtype)] == [w["tensors"][k]["shape"], "torch." + w["tensors"][k]["dtype"]]
    experts = art.weights["model.layers.1.mlp.experts.gate_up_proj.qdata"]
    assert experts.dtype == torch.uint8 and list(experts.shape) == [8, 64, 32]
    # the GPU lowering has run (b200): the kernels read the packed bytes (moe.packed, linear.packed)
    assert "moe.packed(" in art.ir_text("decode") and 'formats=["mxfp4", "mxfp4"' in art.ir_text("decode")
    path = art.save(tmp_path / "t.ds4")
    # embedded (packed at compile time) and referenced (packed at load) weights are the same bytes
    ref = ds4c.compile("tiny", target="b200", precision="mxfp4-experts", max_context=32, progress=False,
                       weights="reference")
    ref_path = ref.save(tmp_path / "r.ds4")
    a, b = ds4c.load(path), ds4c.load(ref_path)
    assert set(a.weights) == set(b.weights)
    assert all(torch.equal(a.weights[k].view(torch.uint8) if a.weights[k].element_size() == 1 else a.weights[k],
                           b.weights[k].view(torch.uint8) if b.weights[k].element_size() == 1 else b.weights[k])
               for k in a.weights)
    ids = torch.randint(0, 512, (1, 12))
    assert torch.equal(a(ids), b(ids))
    res = CliRunner().invoke(app, ["inspect", str(path)])
    assert res.exit_code == 0 and "mxfp4" in res.output and "vs bf16" in res.output, res.output


def test_fp8_activations_follow_the_target_and_the_cli_flag(tmp_path):
    """FP8 linears multiply FP8 activations on b200 (linear.packed's act="fp8" in the lowered IR, "fp8" in the
    report, the sensitivity measured with them), FP8 experts too (the moe op's act / shared_act);
    --activations compute and MI300 (FNUZ) keep weight-only quantisation; a bad value is refused
    by name."""
    def activations(art):
        prec = art.manifest["precision"]
        return {u["activations"] for u in prec["units"] if u["kind"] == "linear" and u["format"] == "fp8"}

    native = ds4c.compile("tiny", target="b200", precision="fp8", max_context=32, progress=False)
    assert activations(native) == {"fp8"} and native.manifest["precision"]["activation_mode"] == "native"
    assert 'format="fp8", shape=[32, 64], act="fp8")' in native.ir_text("decode")
    experts = [u for u in native.manifest["precision"]["units"] if u["kind"] in ("experts", "shared_experts")]
    assert experts and {(u["format"], u["activations"]) for u in experts} == {("fp8", "fp8")}
    assert native.ir_text("decode").count('act="fp8", shared_act="fp8"') == len(experts) // 2
    mi300 = ds4c.compile("tiny", target="mi300x", precision="fp8", max_context=32, progress=False)
    assert activations(mi300) == {"bf16"} and "quant.activation" not in mi300.ir_text("decode")
    assert "act=" not in mi300.ir_text("decode")
    out = tmp_path / "t.ds4"
    res = CliRunner().invoke(app, ["compile", "tiny", "--target", "b200", "--precision", "fp8", "--activations",
                                   "compute", "--max-context", "32", "-o", str(out)])
    assert res.exit_code == 0, res.output
    manifest, program, _ = read_artifact(out)
    units = manifest["precision"]["units"]
    assert {u["activations"] for u in units if u["kind"] == "linear" and u["format"] == "fp8"} == {"bf16"}
    assert not any(op.name == "quant.activation" or "act" in op.kwargs for g in program.graphs.values() for op in g.ops)
    res = CliRunner().invoke(app, ["compile", "tiny", "--activations", "fp4", "-o", str(out)])
    assert res.exit_code != 0 and "--activations must be one of native, compute" in res.output


def test_fp4_activations_on_blackwell_only(tmp_path):
    """MXFP4 linears multiply MXFP4 activations where the tensor cores take FP4 (b200: linear.packed
    with act="mxfp4" in the lowered IR, "mxfp4" in the report); on h100 (no FP4 tensor cores) they
    stay weight-only; MXFP4 experts multiply FP8 activations on b200. (The kernels running them:
    tests/backends/triton/test_packed_kernels.py.)"""
    table = tmp_path / "table.json"
    table.write_text('{"model.layers.*.self_attn.q_b_proj": "mxfp4", "lm_head": "bf16", "model.embed_tokens": "bf16"}')

    def acts(art):
        return {u["activations"] for u in art.manifest["precision"]["units"] if u["format"] == "mxfp4"}

    b200 = ds4c.compile("tiny", target="b200", precision=str(table), max_context=32, progress=False)
    assert acts(b200) == {"mxfp4"}
    assert 'format="mxfp4", shape=[128, 32], act="mxfp4")' in b200.ir_text("decode")
    assert "e2m1" in b200.manifest["precision"]["activation_quantization"]["mxfp4"]
    h100 = ds4c.compile("tiny", target="h100", precision=str(table), max_context=32, progress=False)
    assert acts(h100) == {"bf16"} and "quant.activation" not in h100.ir_text("decode")
    # MXFP4 experts multiply FP8 activations where the tensor cores take FP4 (e4m3 x e2m1, as
    # DeepSeek's FP4 experts do), weight-only elsewhere
    for target, want in (("b200", "fp8"), ("h100", "bf16")):
        art = ds4c.compile("tiny", target=target, precision="mxfp4-experts", max_context=32, progress=False)
        assert {u["activations"] for u in art.manifest["precision"]["units"] if u["kind"] == "experts"} == {want}
        moes = [line for line in art.ir_text("decode").splitlines() if "moe.packed(" in line]
        assert moes and all((', act="fp8"' in m) == (want == "fp8") for m in moes)  # routed experts
        assert all('shared_act="fp8"' in m for m in moes)  # the FP8 shared expert multiplies FP8 on both
