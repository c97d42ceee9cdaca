"""The default pipeline on ds4c's own graphs: every layer fused, numerics unchanged."""

from __future__ import annotations

import torch

import ds4c
from ds4c.debug.numerics import _err as max_abs_error
from ds4c.frontend.trace import build_meta_model, param_spec
from ds4c.ir.interpreter import run_graph
from ds4c.models.deepseek_v4 import ModelConfig
from ds4c.models.deepseek_v4.presets import PRESETS, init_preset_weights

UNFUSED = ("aten.softmax.int", "aten.topk.default", "aten.matmul.default", "aten.bmm.default", "aten.sigmoid.default",
           "aten.rsqrt.default")


def _left_unfused(graph):
    return {op.name for op in graph.ops if op.name in UNFUSED}


def test_tiny_fused_equals_unfused_and_nothing_is_left():
    fused = ds4c.compile("tiny", target="cpu", max_context=64, weights="embed", progress=False)
    plain = ds4c.compile("tiny", target="cpu", max_context=64, weights="embed", pipeline="none", progress=False)
    params = fused.weights
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(0))
    want = run_graph(plain.program.graphs["prefill"], {"input_ids": ids}, params)
    got = run_graph(fused.program.graphs["prefill"], {"input_ids": ids}, params)
    for k in want:
        assert max_abs_error(got[k], want[k]) <= 1e-5, k
    state = {k: v for k, v in got.items() if k != "logits"}
    tok = {"input_ids": ids[:, -1:], "position": torch.tensor(37)}
    want = run_graph(plain.program.graphs["decode"], tok, params, state)
    got = run_graph(fused.program.graphs["decode"], tok, params, state)
    for k in want:
        assert max_abs_error(got[k], want[k]) <= 1e-5, k
    for g in fused.program.graphs.values():
        assert not _left_unfused(g), (g.name, _left_unfused(g))
        counts = g.op_counts()
        assert counts["attention.sliding"] == 1 and counts["attention.csa"] == 2 and counts["attention.hca"] == 1
        assert counts["moe"] == 4 and counts["mhc.pre"] == 8 and counts["mhc.post"] == 8 and counts["mhc.head"] == 1
        assert counts["compress"] == 5 and counts["indexer.topk"] == 2 and counts["linear.grouped"] == 4


def test_flash_slice_fuses_every_layer():
    art = ds4c.compile("flash-slice", target="b200", progress=False)
    for g in art.program.graphs.values():
        assert not _left_unfused(g), (g.name, _left_unfused(g))
        counts = g.op_counts()
        assert counts["attention.sliding"] == 1 and counts["attention.csa"] == 1 and counts["attention.hca"] == 1
        assert counts.get("moe", 0) + counts.get("moe.packed", 0) == 3  # b200 lowers quantised MoEs to moe.packed


def test_preset_weights_drive_the_same_numbers_as_embedding():
    model = build_meta_model(ModelConfig.from_hf_dict(PRESETS["tiny"]), 64, torch.float32)
    spec = param_spec(model)
    a = dict(init_preset_weights(spec, 0))
    assert set(a) == set(spec)


def test_bf16_fused_ops_return_the_dtypes_their_ir_types_say():
    """In bf16 the mHC collapse sums in fp32 and casts to bf16 after: ``mhc.pre`` (whose reference
    returns H's dtype) takes the cast into its region, so its IR type is bf16, not the sum's fp32."""
    from ds4c.ir.interpreter import ReferenceExecutor
    from ds4c.ir.types import TensorType

    art = ds4c.compile("tiny", target="cpu", precision="bf16", max_context=64, progress=False)
    wrong = []

    def check(i, op, outs):
        for r, o in zip(op.results, outs, strict=True):
            if isinstance(r.type, TensorType) and isinstance(o, torch.Tensor) and o.dtype != r.type.dtype:
                wrong.append((op.name, r.name, str(r.type), o.dtype))

    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    ReferenceExecutor(art.program.graphs["prefill"], "cpu", on_op=check).run({"input_ids": ids}, art.weights)
    assert wrong == []
    pre = [op for op in art.program.graphs["decode"].ops if op.name == "mhc.pre"]
    assert pre and all(op.results[0].type.dtype == op.args[0].type.dtype == torch.bfloat16 for op in pre)


def test_decode_csa_attends_the_selected_entries_whatever_the_context():
    """The dense decode step's CSA attention reads the window and the indexer's k picks (gathered),
    not every compressed entry under a mask: its keys do not grow with the compiled context (#29's
    long-context line), while HCA's do (it attends every visible entry)."""
    keys = {}
    for ctx in (64, 512):
        art = ds4c.compile("tiny", target="cpu", max_context=ctx, weights="embed", progress=False)
        g = art.program.graphs["decode"]
        keys[ctx] = {op.name: tuple(op.args[1].type.shape)[2] for op in g.ops
                     if op.name in ("attention.csa", "attention.hca")}
    window, topk = PRESETS["tiny"]["sliding_window"], PRESETS["tiny"]["index_topk"]
    assert keys[64]["attention.csa"] == keys[512]["attention.csa"] == window + topk
    assert keys[512]["attention.hca"] > keys[64]["attention.hca"]
