"""Pictures of the plans: a Chrome-trace JSON (opens in Perfetto / chrome://tracing) and PNGs.

    write_chrome_trace("decode.json", graph, program.attrs["schedule"]["decode"])
    plot_schedule_png("decode.png", graph, program.attrs["schedule"]["decode"])
    plot_memory_png("decode_memory.png", graph, program.attrs["memory_plan"]["decode"])
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ds4c.ir.graph import Graph

_COLORS = {"main": "tab:blue", "aux": "tab:orange", "copy": "tab:green", "comm": "tab:red"}


def _entries(schedule: Mapping[str, Any]) -> dict[int, list]:
    ops = schedule["ops"]
    return {int(k): v for k, v in ops.items()} if isinstance(ops, Mapping) else dict(enumerate(ops))


def chrome_trace(graph: Graph, schedule: Mapping[str, Any]) -> dict[str, Any]:
    """Trace Event Format: one complete event ("X") per op, one thread per stream, flow arrows per event."""
    streams = list(schedule.get("streams") or sorted({e[0] for e in _entries(schedule).values()}))
    tid = {s: k + 1 for k, s in enumerate(streams)}
    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": f"@{graph.name}"}}]
    for s in streams:
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": tid[s], "args": {"name": s}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": tid[s], "args": {"sort_index": tid[s]}})
    costs = schedule.get("costs") or []
    entries = _entries(schedule)
    for i, op in enumerate(graph.ops):
        s, t0, t1 = entries[i]
        args: dict[str, Any] = {"op": i, "results": [r.name for r in op.results]}
        if i < len(costs):
            args.update(flops=costs[i]["flops"], bytes=costs[i]["bytes"])
        if op.loc:
            args["loc"] = op.loc
        events.append({"name": op.name, "cat": s, "ph": "X", "pid": 0, "tid": tid[s], "ts": t0 * 1e6,
                       "dur": max(t1 - t0, 0.0) * 1e6, "args": args})
    for e in schedule.get("events", []):
        u = int(e["producer"])
        for v in e["consumers"]:
            flow = {"name": "event", "cat": "event", "id": f"{e['id']}.{v}", "pid": 0}
            events.append(dict(flow, ph="s", tid=tid[e["record_stream"]], ts=entries[u][2] * 1e6))
            events.append(dict(flow, ph="f", bp="e", tid=tid[e["wait_stream"]], ts=entries[int(v)][1] * 1e6))
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"graph": graph.name, "makespan_s": schedule.get("makespan"),
                          "single_stream_makespan_s": schedule.get("single_stream_makespan")}}


def write_chrome_trace(path: str | Path, graph: Graph, schedule: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(graph, schedule)))
    return path


def plot_schedule_png(path: str | Path, graph: Graph, schedule: Mapping[str, Any], *, title: str | None = None) -> Path:
    """One row per stream, one bar per op (microseconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = _entries(schedule)
    streams = list(schedule.get("streams") or sorted({e[0] for e in entries.values()}))
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.7 * len(streams)))
    for row, s in enumerate(streams):
        bars = [(t0 * 1e6, max((t1 - t0) * 1e6, 1e-3)) for st, t0, t1 in entries.values() if st == s]
        if bars:
            ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=_COLORS.get(s, "tab:gray"), edgecolor="black",
                           linewidth=0.2)
    ax.set_yticks(range(len(streams)), streams)
    ax.set_xlabel("time (us)")
    ms, single = schedule.get("makespan", 0.0), schedule.get("single_stream_makespan", 0.0)
    ax.set_title(title or f"@{graph.name}: {ms * 1e6:.1f} us on streams vs {single * 1e6:.1f} us on one stream")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_memory_png(path: str | Path, graph: Graph, plan: Mapping[str, Any], *, title: str | None = None) -> Path:
    """Live activation bytes at every step of the program, against the arena size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live = plan["live_bytes"]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.step(range(len(live)), [b / 2**20 for b in live], where="post", label="live buffers")
    ax.axhline(plan["arena_bytes"] / 2**20, color="tab:red", linestyle="--", label="arena")
    ax.set_xlabel("op index")
    ax.set_ylabel("MiB")
    ax.legend(loc="upper right")
    ax.set_title(title or f"@{graph.name}: arena {plan['arena_bytes'] / 2**20:.2f} MiB, peak live "
                 f"{plan['peak_live_bytes'] / 2**20:.2f} MiB at op {plan['peak_step']}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
