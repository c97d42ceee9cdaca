"""The kernel executor's arena: activations at the offsets of the compiled memory plan (evaluated at
each call's sizes, nothing planned at run time), reuse ordered across streams by the compiled
events, results equal to running without it."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

import ds4c
from ds4c.ir import parse_graph
from ds4c.ir.interpreter import run_graph
from ds4c.ir.registry import OpDef
from ds4c.passes.liveness import analyze_liveness, is_view_op
from ds4c.passes.manager import PassContext, get_pass
from ds4c.passes.plan_memory import check_plan
from ds4c.passes.schedule_streams import _plan_for_issue_order
from ds4c.runtime.buffer_plan import out_variant, place
from ds4c.runtime.executor import ScheduledExecutor, _Placed, issued
from ds4c.targets import get_target
from tests.backends.triton.conftest import CTX
from tests.passes.random_graphs import random_feeds, random_graph
from tests.passes.test_plan_memory import VIEWS

SEEDS = range(24)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def compiled(graph, schedule=True, **options):
    """``graph``'s memory plan (and stream schedule) as the compiler makes them for h100."""
    ctx = PassContext(target=get_target("h100"), options=options, program_attrs={})
    graph = get_pass("plan_memory")(graph, ctx)
    if schedule:
        graph = get_pass("schedule_streams")(graph, ctx)
    return graph, ctx.program_attrs.get("schedule", {}).get(graph.name), ctx.program_attrs["memory_plan"][graph.name]


def planned_executor(graph, schedule=True, **options):
    graph, sched, plan = compiled(graph, schedule, **options)
    return ScheduledExecutor(graph, "cpu", context=CTX, schedule=sched, memory_plan=plan)


def test_out_variants_of_aten_ops():
    assert out_variant("aten.add.Tensor") is torch.ops.aten.add.out
    assert out_variant("aten.mm.default") is torch.ops.aten.mm.out
    assert out_variant("aten.linear.default") is torch.ops.aten.linear.out
    assert out_variant("aten.cat.default") is torch.ops.aten.cat.out
    assert out_variant("aten.view.default") is None  # a view: no bytes of its own
    assert out_variant("aten.topk.default") is None  # two results
    assert out_variant("aten.contiguous.default") is None  # may return its input
    assert out_variant("rms_norm") is None  # not ATen: launchers take ``result_buffer`` instead


def _placed_in_arena(executor):
    """(placed results, slots of the latest plan): every slot's result must have landed in it."""
    arena = executor._arena
    plan = next(reversed(arena.plans.values()))
    placed = sum(n for (_, how), n in arena.counts.items() if how == "placed")
    return placed, plan.placed


@pytest.mark.parametrize("seed", SEEDS)
def test_random_graphs_run_in_the_planned_arena(seed):
    graph = random_graph(seed)
    inputs, params = random_feeds(graph, seed)
    executor = planned_executor(graph, schedule=seed % 2 == 0)
    got = executor.run(inputs, params)
    want = run_graph(graph, inputs, params)
    for k in want:
        assert torch.equal(got[k], want[k]), k  # live buffers sharing bytes would corrupt results
    placed, slots = _placed_in_arena(executor)
    assert placed == slots > 0
    stats = executor.buffer_stats()
    latest = stats["latest"]
    assert latest["peak_live_bytes"] <= stats["arena_bytes"] == latest["arena_bytes"]
    # outputs are not in the arena: the next run must not overwrite what the caller holds
    arena = executor._arena.eager
    lo, hi = arena.data_ptr(), arena.data_ptr() + arena.numel()
    assert not any(lo <= t.data_ptr() < hi for t in got.values())
    again = executor.run(inputs, params)
    for k in want:
        assert torch.equal(got[k], want[k]) and torch.equal(again[k], want[k]), k




def test_a_plan_per_binding_one_growing_arena():
    graph = parse_graph(VIEWS)
    executor = planned_executor(graph)
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    sizes = []
    for b in (2, 300, 2):
        x = torch.randn(b, 64, generator=torch.Generator().manual_seed(b))
        got = executor.run({"x": x}, {"w": w})["y"]
        torch.testing.assert_close(got, run_graph(graph, {"x": x}, {"w": w})["y"], rtol=0, atol=0)
        stats = executor.buffer_stats()
        sizes.append(stats["arena_bytes"])
        assert stats["latest"]["sizes"] == {"B": b}
    assert stats["plans"] == 2  # the compiled plan evaluated at B=2 once, reused
    assert sizes[0] < sizes[1] == sizes[2]  # the eager arena grows to the largest plan and stays


def test_a_captured_run_gets_its_own_arena_which_the_graph_keeps(monkeypatch):
    graph = parse_graph(VIEWS)
    executor = planned_executor(graph)
    feeds = ({"x": torch.randn(4, 64)}, {"w": torch.randn(64, 64)})
    want = executor.run(*feeds)["y"]
    eager = executor.buffer_stats()["arena_bytes"]
    monkeypatch.setattr(type(executor._arena), "capturing", lambda self: True)  # as inside a CUDA graph capture
    got = executor.run(*feeds)["y"]
    assert torch.equal(got, want)
    held = executor.take_captured()  # what GraphedDecode / GraphedPrefill keep with their graph
    assert len(held) == 1 and held[0].numel() == eager
    assert executor.buffer_stats()["captured_arena_bytes"] == eager
    assert executor.take_captured() == []
    del held  # the graph evicted: its arena is freed, the executor keeps none
    assert executor.buffer_stats()["captured_arena_bytes"] == 0


def test_off_switch():
    graph, sched, plan = compiled(parse_graph(VIEWS))
    unplanned = ScheduledExecutor(graph, "cpu", context=CTX, schedule=sched, memory_plan=plan, buffer_plan=False)
    assert unplanned.buffer_stats() is None
    assert ScheduledExecutor(graph, "cpu", context=CTX, schedule=sched).buffer_stats() is None  # no plan in the artifact


def test_a_plan_for_program_order_only_is_not_run_in_a_schedules_order():
    graph, sched, plan = compiled(parse_graph(VIEWS))
    _, _, sequential = compiled(parse_graph(VIEWS), schedule=False)
    ScheduledExecutor(graph, "cpu", context=CTX, memory_plan=plan)  # a re-packed plan holds for program order too
    with pytest.raises(Exception, match="holds for program order only"):
        ScheduledExecutor(graph, "cpu", context=CTX, schedule=sched, memory_plan=sequential)


def _order_graph(n, streams, events):
    """Happens-before of ops issued in order 0..n-1: stream order plus the schedule's events."""
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    last = {}
    for i in range(n):
        if streams[i] in last:
            g.add_edge(last[streams[i]], i)
        last[streams[i]] = i
    for e in events:
        for c in e["consumers"]:
            g.add_edge(e["producer"], c)
    return g


def _check_reuse_is_ordered(graph, plan, streams, events):
    """Independent of the planner: two placed buffers share bytes only if every op touching one
    (writer, readers, readers of its views) happens before the other's writer. ``graph``: ops in
    issue order, ``plan`` a ``BufferPlan`` evaluated for it."""
    order = _order_graph(len(graph.ops), streams, events)
    reach = {i: nx.descendants(order, i) for i in order}
    groups = {b.root: b for b in analyze_liveness(graph, plan.sizes).buffers}
    readers = {}
    for i, op in enumerate(graph.ops):
        for v in op.operands:
            readers.setdefault(v.name, set()).add(i)
    placed = []
    for i, step in enumerate(plan.slots):
        for k, slot in enumerate(step):
            if slot is not None:
                b = groups[graph.ops[i].results[k].name]
                touch = {i}.union(*(readers.get(v, set()) for v in b.values))
                nbytes = slot[1].itemsize * max(1, int(torch.tensor(slot[2]).prod()))
                placed.append((i, touch, slot[0], slot[0] + nbytes))
    for a, (wa, ta, lo_a, hi_a) in enumerate(placed):
        for wb, tb, lo_b, hi_b in placed[a + 1:]:
            if lo_a < hi_b and lo_b < hi_a:
                a_first = all(t != wb and wb in reach[t] for t in ta)
                b_first = all(t != wa and wa in reach[t] for t in tb)
                assert a_first or b_first, (graph.ops[wa].results, graph.ops[wb].results)


@pytest.mark.parametrize("seed", SEEDS)
def test_reuse_across_streams_is_ordered_by_the_compiled_events(seed):
    graph, sched, plan = compiled(random_graph(seed))
    assert check_plan(graph, plan, sched) == []
    ordered, streams, events = issued(graph, sched)
    placeable = [not is_view_op(op.name) for op in ordered.ops]
    for sizes in ({}, {k: 2 * v for k, v in plan["sizes"].items()}):  # the plan binding, and twice it
        evaluated = place(ordered, plan, {**plan["sizes"], **sizes}, placeable)
        _check_reuse_is_ordered(ordered, evaluated, streams, events)


def test_a_buffer_read_on_another_stream_is_not_reused_by_unordered_ops():
    graph = parse_graph("""\
graph @g(input %x: f32[64,64]) {
  %a = aten.mm.default(%x, %x) : f32[64,64]
  %b = aten.relu.default(%x) : f32[64,64]
  %c = aten.neg.default(%a) : f32[64,64]
  %d = aten.add.Tensor(%b, %c) : f32[64,64]
  %e = aten.relu.default(%d) : f32[64,64]
  %f = aten.neg.default(%e) : f32[64,64]
  return y=%f
}
""")
    graph, _, plan = compiled(graph, schedule=False)
    placeable = [True] * len(graph.ops)
    one = place(graph, plan, {}, placeable)
    # a schedule with #2 (%c) on aux: it waits for %a (#0) and #3 (%d) waits for it
    streams = ["main", "main", "aux", "main", "main", "main"]
    events = [{"id": 0, "producer": 0, "record_stream": "main", "wait_stream": "aux", "consumers": [2]},
              {"id": 1, "producer": 2, "record_stream": "aux", "wait_stream": "main", "consumers": [3]}]
    import copy

    many_plan = copy.deepcopy(plan)
    _plan_for_issue_order(graph, many_plan, list(range(6)), streams, events)
    many = place(graph, many_plan, {}, placeable)
    # one stream: %a (last read by #2) shares bytes with %d (#3); with #2 on aux, %d's writer
    # is ordered after #2 (it waits for %c), so it may still reuse them; %a's bytes are not free
    # for %b, which is issued before #2 and runs concurrently with it
    offset = {graph.ops[i].results[0].name: s[0][0] for i, s in enumerate(one.slots) if s[0] is not None}
    assert offset["a"] == offset["d"]
    off_many = {graph.ops[i].results[0].name: s[0][0] for i, s in enumerate(many.slots) if s[0] is not None}
    assert off_many["a"] != off_many["b"]
    _check_reuse_is_ordered(graph, many, streams, events)
    sched = {"ops": [[st, float(i), float(i + 1)] for i, st in enumerate(streams)], "issue": list(range(6)),
             "events": events}
    assert check_plan(graph, many_plan, sched) == []


class _ReturnsItsInput(OpDef):
    name = "test.identity"

    def reference(self, x):
        return x  # a view of another arena buffer (%c is a slice of %b), not its planned buffer


def test_a_result_left_in_another_buffer_is_copied_out():
    graph = parse_graph("""\
graph @g(input %x: f32[8,8]) {
  %a = aten.add.Tensor(%x, %x) : f32[8,8]
  %b = aten.relu.default(%a) : f32[8,8]
  %c = aten.slice.Tensor(%b, 0, 1, 8) : f32[7,8]
  %d = aten.mul.Tensor(%c, %c) : f32[7,8]
  %e = aten.neg.default(%d) : f32[7,8]
  %f = aten.add.Tensor(%e, %e) : f32[7,8]
  return y=%f
}
""")
    executor = planned_executor(graph, schedule=False)
    # stand-in for a launcher whose fallback returns a view of its input: step %c's op writes nothing
    op, placed, args, kwargs = executor._steps[3]
    executor._steps[3] = (op, _Placed(_ReturnsItsInput(), executor._arena, 3, None), (op.args[0],), {})
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    got = executor.run({"x": x}, {})["y"]
    want = -2 * torch.relu(x + x)[1:]
    assert torch.equal(got, want)
    counts = executor.buffer_stats()["results"]
    assert counts["test.identity"] == {"copied": 1}


@pytest.fixture(scope="module")
def tiny_path(tiny_fp32_artifact):
    return tiny_fp32_artifact


def test_tiny_decode_runs_in_its_plan_with_the_same_values(tiny_path):
    ref = ds4c.load(tiny_path, device=DEVICE, backend="reference")
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    logits, state = ref.prefill(ids)
    tok = logits[:, -1].argmax(-1, keepdim=True)
    planned = ds4c.load(tiny_path, device=DEVICE, backend="kernels")
    got, _ = planned.decode(tok, 9, dict(state))
    unplanned = ds4c.load(tiny_path, device=DEVICE, backend="kernels", buffer_plan=False)
    want, _ = unplanned.decode(tok, 9, dict(state))
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # same kernels, same order: only addresses differ
    assert unplanned.buffer_plans() == {}
    plans = planned.buffer_plans()
    decode = plans["decode"]
    assert decode["latest"]["sizes"] == {"B": 2}
    # every fused op and GEMM of the step wrote into its planned buffer; none allocated its own
    results = decode["results"]
    assert {"attention.csa", "moe", "mhc.pre", "rms_norm", "aten.linear.default"} <= set(results)
    assert all(set(r) == {"placed"} for r in results.values()), results
    assert decode["latest"]["placed"] > 100
    assert decode["arena_bytes"] < decode["latest"]["placed_bytes"] / 3  # bytes reused across the step


def test_ds4c_run_reports_the_plan(tiny_path):
    from typer.testing import CliRunner

    from ds4c.cli import app

    res = CliRunner().invoke(app, ["run", str(tiny_path), "--prompt-ids", "5,17,99", "-n", "2", "--backend", "kernels",
                                   "--device", DEVICE])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert "activations in planned arenas (model.buffer_plans()): decode" in flat, flat
    assert "prefill_last" in flat and "results placed" in flat


def test_planned_results_are_per_thread():
    import threading

    from ds4c.backends.triton.kernels import planned_results, result_buffer

    mine = torch.empty(6)
    seen = {}

    def other_thread():  # another model's launcher, running meanwhile on another thread
        seen["other"] = result_buffer(0, (2, 3), torch.float32, mine.device)

    with planned_results([mine]):
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        got = result_buffer(0, (3, 2), torch.float32, mine.device)
        again = result_buffer(0, (3, 2), torch.float32, mine.device)
    assert seen["other"].data_ptr() != mine.data_ptr()
    assert got.data_ptr() == mine.data_ptr() and got.shape == (3, 2)
    assert again.data_ptr() != mine.data_ptr()  # handed out once
    assert result_buffer(0, (6,), torch.float32, mine.device).data_ptr() != mine.data_ptr()  # outside the block
