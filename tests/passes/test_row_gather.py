"""hoist_row_gather: a ragged serving step runs its last layer's FFN half and its head on the rows it
returns logits for, with the same values; decode steps (every row returned) and steps whose final
streams another output reads (MTP) are left alone."""

from __future__ import annotations

import pytest
import torch

import ds4c
from ds4c.ir.interpreter import ReferenceExecutor
from ds4c.passes.manager import PassContext
from ds4c.passes.row_gather import hoist_row_gather_pass

SERVING = {"max_running": 4, "max_chunk": 32}


@pytest.fixture(scope="module")
def fused():
    """The tiny serving program as fusion leaves it (the pass comes next)."""
    return ds4c.compile("tiny", target="cpu", max_context=256, serving=SERVING, stop_after="last_position_logits",
                        progress=False)


def _moes(graph):
    return [op for op in graph.ops if op.name == "moe"]


def test_the_last_ffn_half_moves_below_the_row_gather(fused):
    graph = fused.program.graphs["ragged_step"]
    ctx = PassContext()
    out = hoist_row_gather_pass(graph, ctx)
    assert len(ctx.rewrite_log) == 1 and "position-wise ops" in ctx.rewrite_log[0][2]
    # every MoE but the last runs on all N rows; the last on the L logits rows
    assert [op.args[0].type.shape[1] for op in _moes(graph)] == ["N"] * len(_moes(graph))
    assert [op.args[0].type.shape[1] for op in _moes(out)] == ["N"] * (len(_moes(out)) - 1) + ["L"]
    gathers = [op for op in out.ops if op.name == "aten.index_select.default"
               and op.args[2].name == "logit_rows"]
    assert gathers and all(op.loc == "hoist_row_gather" for op in gathers)
    # the last layer's two mHC posts move with it; nothing after the gathers carries N any more
    first = out.ops.index(gathers[0])
    assert all("N" not in getattr(r.type, "shape", ()) for op in out.ops[first + len(gathers):] for r in op.results)
    assert dict(out.outputs)["logits"].type.shape == graph.tensor_type(dict(graph.outputs)["logits"]).shape


def test_decode_steps_are_left_alone(fused):
    """ragged_decode returns every row's logits (its gather is arange(R)): moving it would only copy."""
    graph = fused.program.graphs["ragged_decode"]
    ctx = PassContext()
    assert hoist_row_gather_pass(graph, ctx).ops == graph.ops and not ctx.rewrite_log


def test_a_gathered_value_another_output_reads_stays(fused):
    """With MTP the step also returns every row's final streams: the FFN must run on all rows."""
    graph = fused.program.graphs["ragged_step"]
    gather = next(op for op in graph.ops if op.name == "aten.index_select.default" and op.args[2].name == "logit_rows")
    streams = graph.copy(outputs=[*graph.outputs, ("hidden", gather.args[0])])
    ctx = PassContext()
    assert hoist_row_gather_pass(streams, ctx).ops == streams.ops and not ctx.rewrite_log


def test_the_step_gives_the_same_logits_and_pools(fused, tmp_path):
    """Both graphs on one packed batch (three chunks at different positions, one of them continuing
    earlier state) through the reference executor: same logits (to CPU GEMM rounding of 2 rows vs 47),
    same pools."""
    from ds4c.runtime.engine import CompiledStepRunner
    from ds4c.runtime.pages import RequestPages
    from ds4c.runtime.step_batch import Chunk, build_step

    path = ds4c.compile("tiny", target="cpu", max_context=256, serving=SERVING, progress=False).save(tmp_path / "t.ds4")
    runner = CompiledStepRunner(ds4c.load(path))
    chunks = []
    for start, n in ((0, 20), (9, 3), (0, 24)):
        pages = RequestPages(runner.layout, runner.pools)
        assert pages.grow(start + n)
        chunks.append(Chunk(pages, list(range(5, 5 + n)), start))
    batch = build_step(chunks, runner.rates)
    inputs = dict(zip(runner.inputs["ragged_step"], batch.args(), strict=True))
    torch.manual_seed(0)
    pools = {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in runner.state.items()}
    graph = fused.program.graphs["ragged_step"]
    outs = [ReferenceExecutor(g, "cpu").run(inputs, fused.weights, {k: v.clone() for k, v in pools.items()})
            for g in (graph, hoist_row_gather_pass(graph, PassContext()))]
    assert outs[0]["logits"].shape == (3, 512)
    assert set(outs[0]) == set(outs[1])
    assert torch.allclose(outs[0]["logits"], outs[1]["logits"], atol=1e-5, rtol=1e-5)
    for name in set(outs[0]) - {"logits"}:
        # page / slot 0 is the pools' trash: rows that write nowhere real all land there, in an order
        # index_put does not fix (the same graph run twice differs there)
        assert torch.allclose(outs[0][name][1:], outs[1][name][1:], atol=1e-5, rtol=1e-5, equal_nan=True), name
