"""ONNX: export of ``tiny`` runs in onnxruntime equal to the reference backend, imports back equal,
and quantised weights appear as QDQ."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

import ds4c
from ds4c.cli import app
from ds4c.errors import IRError
from ds4c.export import open_source, widen
from ds4c.export.onnx import build_model
from ds4c.ir.interpreter import ReferenceExecutor

SEQ = 12


def _session(path_or_proto) -> ort.InferenceSession:
    data = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def test_onnx_round_trip(tiny_cpu, tmp_path):
    out = tmp_path / "tiny.onnx"
    res = CliRunner().invoke(app, ["export", str(tiny_cpu), "--format", "onnx", "-o", str(out), "--seq", str(SEQ)])
    assert res.exit_code == 0, res.output
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.onnx"]  # written atomically, nothing left over
    model = onnx.load(str(out))
    # the IR's signature and names; fused ops as ds4c-domain nodes calling local functions
    assert [i.name for i in model.graph.input] == ["input_ids"]
    assert [o.name for o in model.graph.output][:2] == ["logits", "layers.0.window_kv"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in {i.name for i in model.graph.initializer}
    fused = [n for n in model.graph.node if n.domain == "ds4c"]
    kinds = {n.op_type for n in fused}
    assert {"attention_sliding", "attention_csa", "attention_hca", "moe", "mhc_pre", "mhc_post", "mhc_head",
            "rms_norm", "compress", "indexer_topk"} <= kinds
    functions = {(f.domain, f.name, f.overload) for f in model.functions}
    assert all(("ds4c", n.op_type, n.overload) in functions for n in fused)
    csa = next(n for n in fused if n.op_type == "attention_csa")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in csa.attribute}
    assert attrs["scale"] == pytest.approx(json.loads(attrs["ds4c_spec"])["kwargs"]["scale"])
    onnx.checker.check_model(model)

    ids = torch.randint(0, 512, (1, SEQ), generator=torch.Generator().manual_seed(0))
    reference = ds4c.load(tiny_cpu)(ids)
    got = _session(str(out)).run(["logits"], {"input_ids": ids.numpy()})[0]
    assert np.abs(got - reference.numpy()).max() <= 1e-4

    # imported back: same pipeline, same numbers
    again = tmp_path / "again.ds4"
    res = CliRunner().invoke(app, ["compile", str(out), "--target", "cpu", "-o", str(again)])
    assert res.exit_code == 0, res.output
    m = ds4c.load(again)
    assert m.manifest["model"]["source"]["kind"] == "onnx"
    ops = m.program.graphs["prefill"].op_counts()
    assert ops["attention.csa"] == 2 and ops["moe"] == 4 and ops["mhc.pre"] == 8
    assert (m(ids) - reference).abs().max() <= 1e-4


def test_quantised_weights_are_qdq(tmp_path):
    art = ds4c.compile("tiny", target="cpu", precision="mxfp4-experts", max_context=32, progress=False)
    assignment = art.manifest["precision"]["assignment"]
    fp8 = [p for p, f in assignment.items() if f == "fp8"]
    assert fp8 and len(fp8) < len(assignment)  # fp8 linears, mxfp4 experts
    # bf16 compute (the policy's), widened to fp32: onnxruntime's CPU provider has no bf16 Softplus, MatMul, ...
    proto = build_model(open_source(art), entry="prefill", batch=1, seq=SEQ, dtype=torch.float32)
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert sorted(n.input[0] for n in dq) == sorted(p + ".qdata" for p in fp8)
    inits = {i.name: i for i in proto.graph.initializer}
    assert inits[dq[0].input[0]].data_type == onnx.TensorProto.FLOAT8E4M3FN
    assert {a.name: onnx.helper.get_attribute_value(a) for a in dq[0].attribute}["block_size"] == 128
    mx = [n for n in proto.graph.node if n.domain == "ds4c" and n.op_type == "quant_dequant"]
    assert len(mx) == len(assignment) - len(fp8)

    ids = torch.randint(0, 512, (1, SEQ), generator=torch.Generator().manual_seed(1))
    got = torch.from_numpy(_session(proto).run(["logits"], {"input_ids": ids.numpy()})[0])
    # The reference backend runs the same artifact graph, widened to fp32 as the export was: only
    # summation order differs, so 1e-4 holds. (Against the bf16 activations the artifact computes
    # with, no fixed tolerance holds: a bf16 rounding flips a top-k choice, MoE routing or indexer
    # selection, at some token; on tiny the logits differ by 0.03 before that token, up to 1.9 after.)
    src = open_source(art)
    graph, weights = widen(src.program.graphs["prefill"], src.weights, torch.float32)
    widened = ReferenceExecutor(graph).run({"input_ids": ids}, weights)["logits"]
    assert (got - widened).abs().max() <= 1e-4

    # imported back: QDQ weights become quant.dequant on the artifact's packed bytes again
    path = tmp_path / "q.onnx"
    onnx.save(proto, str(path))
    again = ds4c.compile(path, target="cpu", progress=False)
    assert again.program.graphs["prefill"].op_counts()["quant.dequant"] == len(assignment)
    for p in fp8:
        for part in ("qdata", "scale"):
            a, b = again.weights[f"{p}.{part}"], art.weights[f"{p}.{part}"]
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (p, part)
    assert (ds4c.load(again.save(tmp_path / "again.ds4"))(ids) - got).abs().max() <= 1e-4


def test_import_names_an_unmapped_op(tmp_path):
    from onnx import TensorProto, helper

    meta = {"ds4c.config": json.dumps({"model_type": "deepseek_v4"}), "ds4c.entry": "prefill"}
    node = helper.make_node("Einsum", ["x", "x"], ["y"], name="mix", equation="ij,jk->ik")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    from ds4c.frontend.onnx_import import import_onnx_program

    with pytest.raises(IRError, match=r"ONNX node 'mix' \(op_type Einsum\) has no ds4c mapping.*_CONVERTERS"):
        import_onnx_program(path)


def test_fp8_and_fp4_activations_export_and_run_in_onnxruntime(tmp_path):
    """b200 multiplies FP8 and FP4 activations (FP8 linears, an MXFP4 q_b): the lowered program's
    linear.packed(act=...) exports in both formats (the activation quantisation's reference through
    ops ONNX has: log2/floor/exp2 for the exponent, a Cast to FLOAT8E4M3FN or Round for e2m1) and
    onnxruntime computes what the reference backend does."""
    table = tmp_path / "table.json"
    table.write_text('{"*.q_b_proj": "mxfp4", "lm_head": "bf16", "model.embed_tokens": "bf16", "*": "fp8"}')
    art = ds4c.compile("tiny", target="b200", precision=str(table), max_context=32, progress=False)
    for activation in ("fp8", "mxfp4"):
        assert f'format="{activation}"' in art.ir_text("prefill") and f'act="{activation}")' in art.ir_text("prefill")
    src = open_source(art)
    proto = build_model(src, entry="prefill", batch=1, seq=SEQ, dtype=torch.float32)
    ids = torch.randint(0, 512, (1, SEQ), generator=torch.Generator().manual_seed(4))
    got = torch.from_numpy(_session(proto).run(["logits"], {"input_ids": ids.numpy()})[0])
    graph, weights = widen(src.program.graphs["prefill"], src.weights, torch.float32)
    widened = ReferenceExecutor(graph).run({"input_ids": ids}, weights)["logits"]
    assert (got - widened).abs().max() <= 1e-4
