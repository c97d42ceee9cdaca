"""The stream schedule as the runtime runs it: stored in the artifact for the lowered graph the
kernel backends execute, issued in a topological order; and the plan as ``ds4c inspect`` shows it
(table, PNGs, Chrome trace)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import ds4c
from ds4c.artifact.artifact import read_artifact
from ds4c.cli import app
from ds4c.errors import ArtifactError
from ds4c.ir.interpreter import ReferenceExecutor
from ds4c.passes.schedule_streams import check_schedule
from ds4c.runtime.executor import issued


@pytest.fixture(scope="module")
def fp8_artifact(tiny_fp8_artifact):
    return tiny_fp8_artifact


def test_schedule_is_stored_for_the_lowered_graph_and_orders_it(fp8_artifact):
    manifest, program, container = read_artifact(fp8_artifact)
    sched = manifest["schedule"]["decode"]
    assert sched["makespan_s"] < sched["single_stream_makespan_s"] and sched["ops_per_stream"]["aux"] > 0
    schedule = json.loads(container.read_bytes(sched["member"]))
    stored = program.graphs["decode"]
    assert any(op.name == "linear.packed" for op in stored.ops)
    weights = ds4c.load(fp8_artifact, backend="reference").weights
    # the schedule covers the lowered graph the kernels run: every op is scheduled, none added at load
    ordered, streams, events = issued(stored, schedule)
    assert len(schedule["issue"]) == len(stored.ops) and check_schedule(stored, schedule) == []
    assert sorted(map(id, ordered.ops)) == sorted(map(id, stored.ops))
    assert "aux" in streams and len(streams) == len(ordered.ops) and events
    # the runtime's events are the compiled ones: each waits on a producer issued earlier, on another stream
    for e in events:
        assert all(e["producer"] < c and streams[c] == e["wait_stream"] != streams[e["producer"]]
                   for c in e["consumers"])
    # issue order is topological: every operand is an input or produced earlier
    known = {gi.value for gi in ordered.inputs}
    for op in ordered.ops:
        assert all(v in known for v in op.operands), op.name
        known.update(op.results)
    # and it computes the same thing (reference ops, CPU: one stream)
    feeds = {"input_ids": torch.tensor([[5]]), "position": torch.tensor(3)}
    state = ds4c.load(fp8_artifact, backend="reference").new_state(1)
    want = ReferenceExecutor(stored, "cpu").run(feeds, weights, state)["logits"]
    got = ReferenceExecutor(ordered, "cpu").run(feeds, weights, state)["logits"]
    assert torch.equal(got, want)


def test_inspect_prints_the_plan_and_writes_plots(fp8_artifact, tmp_path):
    res = CliRunner().invoke(app, ["inspect", str(fp8_artifact), "--plots", str(tmp_path / "plots")])
    assert res.exit_code == 0, res.output
    assert "memory plan and streams" in res.output and "main=" in res.output
    for name in ("decode.memory.png", "decode.schedule.png", "prefill.schedule.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = json.loads((tmp_path / "plots" / "decode.trace.json").read_text())
    assert {e.get("cat") for e in trace["traceEvents"] if e.get("ph") == "X"} >= {"main", "aux"}


def test_schedule_of_another_graph_is_refused(fp8_artifact):
    from ds4c.runtime.model import _stream_plans

    manifest, program, container = read_artifact(fp8_artifact)
    swapped = dict(manifest, schedule={"decode": manifest["schedule"]["prefill"]})
    with pytest.raises(ArtifactError, match="schedule covers"):
        _stream_plans(swapped, container, program.graphs)
