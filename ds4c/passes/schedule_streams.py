"""Stream scheduling: ops onto ``main`` / ``aux`` compute streams, a ``copy`` and a ``comm`` stream, with events.

The op DAG (a networkx DiGraph: an edge per operand, plus an edge between consecutive impure ops,
plus, when ``plan_memory`` ran, an edge from every reader of an arena buffer to the op that next
writes over its bytes) is list-scheduled with a roofline cost model of the target:

- each op costs ``kernel_latency_s`` (default 2 us, a launch inside a CUDA graph) plus its work:
  ``flops / peak(dtype)`` on the compute units and ``bytes / hbm_bandwidth`` on memory, FLOPs from
  shapes for matmul-like ops (mm, bmm, matmul, linear, einsum, convolution, attention, moe, ...),
  bytes read + written for everything, at the memory plan's binding of symbolic sizes;
- ops that run concurrently share the compute units and memory bandwidth (each is a resource whose
  busy time serialises); only latency and the other resource overlap. So overlap pays for small,
  latency-bound ops (decode) and for pairing compute-bound with memory-bound work;
- ``ds4c.prefetch`` ops run on ``copy`` at ``host_link_bandwidth``; collectives (``dist.*``, sharded
  programs) on ``comm`` at the target's ``peer_link_bandwidth``, moving what a ring moves per rank
  (all-reduce 2 (W-1)/W of its operand, all-gather (W-1) x, reduce-scatter and all-to-all
  (W-1)/W), so communication overlaps whatever compute does not wait for it; views and scalar
  arithmetic cost 0.

Ops on the critical path (by cost) go to ``main``; other compute ops go to ``aux`` (indexer,
compressor, shared expert, ... whatever can overlap); zero-cost ops follow their operand's stream.
Ops are issued in order of decreasing bottom level (longest path to the end), each starting when
its stream is free and its inputs are ready. This never exceeds the one-stream time (sum of all
costs). Every edge between streams gets an event (recorded after the producer, waited on before
the consumer).

Result: ``Program.attrs['schedule'][graph]`` = {``streams``, ``ops`` (per op index: [stream,
start_s, end_s]), ``order`` (issue order per stream), ``issue`` (the one order the host issues
them in, across streams: what the GPU runtime runs), ``events``, ``makespan``,
``single_stream_makespan``, ...}. ``check_schedule`` verifies it independently.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from typing import Any

import networkx as nx

from ds4c.errors import PassError
from ds4c.ir.graph import Graph, Op, Value
from ds4c.ir.registry import get_op
from ds4c.ir.types import ListType, TensorType
from ds4c.ops.memory import PREFETCH
from ds4c.passes.liveness import SizeEvaluator, is_view_op, plan_binding
from ds4c.passes.manager import PassContext, register_pass
from ds4c.targets import Target, peak_dtype

STREAMS = ("main", "aux", "copy", "comm")
# bytes a rank sends per byte of a collective's operand, over ``world`` ranks (ring algorithms)
LINK_FACTOR = {"dist.all_reduce": lambda w: 2 * (w - 1) / w, "dist.all_gather": lambda w: w - 1,
               "dist.reduce_scatter": lambda w: (w - 1) / w, "dist.all_to_all": lambda w: (w - 1) / w}
DEFAULT_KERNEL_LATENCY_S = 2e-6


class CostModel:
    """Roofline seconds of one op on a target: (latency, compute seconds, memory seconds, copy seconds)."""

    def __init__(self, target: Target, evaluator: SizeEvaluator, kernel_latency_s: float = DEFAULT_KERNEL_LATENCY_S):
        self.target = target
        self.evaluator = evaluator
        self.latency = kernel_latency_s
        self.hbm_bandwidth = float(target.hbm_bandwidth)
        self.host_link = float(target.host_link_bandwidth)
        # a target without peer-link facts (cpu): collectives at its memory bandwidth
        self.peer_link = float(target.peer_link_bandwidth or target.hbm_bandwidth)

    def peak(self, dtype: str) -> float:
        """The target's dense peak FLOP/s for work on tensors of ``dtype`` (``targets.peak_dtype``)."""
        return float(self.target.peak(peak_dtype(dtype)))

    def numel(self, ty: Any) -> int:
        if isinstance(ty, TensorType):
            return math.prod(self.evaluator.dim(d) for d in ty.shape)
        if isinstance(ty, ListType):
            return sum(self.numel(e) for e in ty.elements)
        return 0

    def shape(self, ty: Any) -> list[int]:
        return [self.evaluator.dim(d) for d in ty.shape] if isinstance(ty, TensorType) else []

    def flops(self, op: Op, params: set[str]) -> float:
        base = op.name.split(".")[1] if op.name.startswith("aten.") else op.name
        tensors = [v for v in op.operands if isinstance(v.type, TensorType)]
        out = sum(self.numel(r.type) for r in op.results)
        if base in ("mm", "bmm", "matmul", "linear", "addmm", "baddbmm", "addbmm") and tensors:
            a = tensors[1] if base in ("addmm", "baddbmm", "addbmm") and len(tensors) > 2 else tensors[0]
            k = (self.shape(a.type) or [1])[-1]
            return 2.0 * out * k
        if base == "einsum" and isinstance(op.args[0], str) and "->" in op.args[0]:
            lhs, rhs = op.args[0].replace(" ", "").split("->")
            sizes: dict[str, int] = {}
            for spec, v in zip(lhs.split(","), tensors, strict=False):
                for ch, n in zip(spec, self.shape(v.type), strict=False):
                    sizes[ch] = n
            return 2.0 * out * math.prod(n for ch, n in sizes.items() if ch not in rhs)
        if base in ("convolution", "conv1d", "conv2d") and len(tensors) > 1:
            w = self.shape(tensors[1].type)
            return 2.0 * out * (math.prod(w) // max(w[0], 1))
        if op.name.startswith("attention.") and op.name.endswith(".rows") and len(op.args) == 7:
            b, h, s, d = (self.shape(op.args[0].type) + [1, 1, 1, 1])[:4]
            t = sum((self.shape(r.type) + [1, 1])[1] for r in (op.args[2], op.args[4]) if isinstance(r, Value))
            return 4.0 * b * h * s * t * d
        if op.name.startswith("attention.") and len(tensors) >= 2:
            b, h, s, d = (self.shape(tensors[0].type) + [1, 1, 1, 1])[:4]
            t = (self.shape(tensors[1].type) + [1, 1, 1])[2]
            return 4.0 * b * h * s * t * d
        if op.name == "indexer.topk.rows" and len(tensors) >= 3:
            return 2.0 * self.numel(tensors[0].type) * (self.shape(tensors[2].type) or [1])[-1]
        if op.name == "indexer.topk.table" and tensors:
            return 2.0 * self.numel(tensors[0].type) * int(op.kwargs.get("count", 1))
        if op.name == "indexer.topk" and len(tensors) >= 2:
            keys = self.shape(tensors[1].type)
            return 2.0 * self.numel(tensors[0].type) * (keys[-2] if len(keys) >= 2 else 1)
        if op.name == "moe" and len(tensors) >= 9:
            x, router, gate_up, down = tensors[0], tensors[2], tensors[4], tensors[5]
            d = (self.shape(x.type) or [1])[-1]
            tokens = self.numel(x.type) // max(d, 1)
            experts = (self.shape(gate_up.type) or [1])[0]
            k = int(op.kwargs.get("top_k", 1))
            per_expert = (self.numel(gate_up.type) + self.numel(down.type)) / max(experts, 1)
            shared = sum(self.numel(v.type) for v in tensors[6:9])
            return 2.0 * tokens * (self.numel(router.type) + k * per_expert + shared)
        weights = [v for v in tensors if v.name in params and len(self.shape(v.type)) >= 2]
        if weights and op.results and isinstance(op.results[0].type, TensorType):
            rows = out // max((self.shape(op.results[0].type) or [1])[-1], 1)
            return 2.0 * rows * sum(self.numel(w.type) for w in weights)
        return float(out)

    def bytes_moved(self, op: Op) -> float:
        seen, total = set(), 0.0
        scale: dict[str, float] = {}
        if op.name == "moe":
            tensors = [v for v in op.operands if isinstance(v.type, TensorType)]
            if len(tensors) >= 6:
                x, gate_up = tensors[0], tensors[4]
                d = (self.shape(x.type) or [1])[-1]
                tokens = self.numel(x.type) // max(d, 1)
                experts = (self.shape(gate_up.type) or [1])[0]
                frac = min(1.0, tokens * int(op.kwargs.get("top_k", 1)) / max(experts, 1))
                scale = {tensors[4].name: frac, tensors[5].name: frac}  # only the selected experts are read
        elif op.name.startswith("aten.") and op.name.split(".")[1] in ("embedding", "index_select", "gather", "index") \
                and op.operands:
            # a lookup reads as many bytes of its table (the first operand) as it returns
            table = op.operands[0]
            out = sum(self.evaluator.nbytes(r.type) or 0 for r in op.results)
            scale = {table.name: out / max(self.evaluator.nbytes(table.type) or 1, 1)}
        for v in [*op.operands, *op.results]:
            if v.name in seen:
                continue
            seen.add(v.name)
            total += (self.evaluator.nbytes(v.type) or 0) * scale.get(v.name, 1.0)
        return total

    def cost(self, op: Op, params: set[str]) -> dict[str, Any]:
        tensor_results = [r for r in op.results if isinstance(r.type, TensorType | ListType)]
        if not tensor_results or is_view_op(op.name) or op.name.startswith("sym.") or op.name == "aten.sym_size.int":
            return {"kind": "free", "flops": 0.0, "bytes": 0.0, "latency": 0.0, "compute": 0.0, "memory": 0.0}
        if op.name == PREFETCH:
            nbytes = float(sum(self.evaluator.nbytes(r.type) or 0 for r in op.results))
            return {"kind": "copy", "flops": 0.0, "bytes": nbytes, "latency": self.latency, "compute": 0.0,
                    "memory": nbytes / self.host_link}
        if op.name in LINK_FACTOR:
            nbytes = float(sum(self.evaluator.nbytes(v.type) or 0 for v in op.operands))
            sent = nbytes * LINK_FACTOR[op.name](int(op.kwargs.get("world", 1)))
            return {"kind": "comm", "flops": 0.0, "bytes": sent, "latency": self.latency, "compute": 0.0,
                    "memory": sent / self.peer_link}
        dtype = str(tensor_results[0].type.dtype if isinstance(tensor_results[0].type, TensorType)
                    else "torch.float32").removeprefix("torch.")
        flops, nbytes = self.flops(op, params), self.bytes_moved(op)
        return {"kind": "compute", "flops": flops, "bytes": nbytes, "latency": self.latency,
                "compute": flops / self.peak(dtype), "memory": nbytes / self.hbm_bandwidth}


def op_dag(graph: Graph) -> nx.DiGraph:
    """Nodes: op indices. Edges: data (operand), order (between consecutive impure ops) and window
    (from the op before a ``ds4c.prefetch`` in program order to the prefetch).

    A prefetch reads only a weight, so without its window edge it would be ready at the start and
    issued first (its bottom level is long): every host weight staged at once, the arena holding
    all of them (36 GB for `flash` at a 120 GB budget). ``plan_memory`` placed each prefetch
    ``prefetch_lookahead`` ops before its first reader; the window edge keeps it there, so the
    copy still overlaps the ops in between and at most a lookahead's worth of weights is staged."""
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(graph.ops)))
    made: dict[Any, int] = {}
    readers: dict[str, set[int]] = {}
    last_impure = None
    last_compute = None  # the latest op before this one that is not a prefetch
    for i, op in enumerate(graph.ops):
        for v in op.operands:
            if v in made and made[v] != i:
                dag.add_edge(made[v], i, kind="data")
            readers.setdefault(v.name, set()).add(i)
        for r in op.results:
            made[r] = i
        if op.name == PREFETCH:
            if last_compute is not None and not dag.has_edge(last_compute, i):
                dag.add_edge(last_compute, i, kind="window")
        else:
            last_compute = i
        if not get_op(op.name).pure:
            if last_impure is not None:
                dag.add_edge(last_impure, i, kind="order")
            last_impure = i
    return dag


def _assign_streams(graph: Graph, dag: nx.DiGraph, costs: list[dict[str, Any]], duration: list[float]) -> list[str]:
    order = list(nx.topological_sort(dag))
    top = [0.0] * len(duration)
    for u in order:
        top[u] = max((top[p] + duration[p] for p in dag.predecessors(u)), default=0.0)
    bottom = [0.0] * len(duration)
    for u in reversed(order):
        bottom[u] = duration[u] + max((bottom[s] for s in dag.successors(u)), default=0.0)
    critical = max((top[u] + bottom[u] for u in order), default=0.0)
    streams = [""] * len(duration)
    for u in order:
        kind = costs[u]["kind"]
        if kind in ("copy", "comm"):
            streams[u] = kind
        elif kind == "free":
            preds = [p for p in dag.predecessors(u) if dag.edges[p, u].get("kind") == "data"]
            streams[u] = streams[preds[0]] if preds and streams[preds[0]] not in ("copy", "comm") else "main"
        else:
            on_path = top[u] + bottom[u] >= critical * (1 - 1e-9)
            streams[u] = "main" if on_path else "aux"
    return streams


def schedule_graph(graph: Graph, cost_model: CostModel, memory_plan: Mapping[str, Any] | None = None,
                   single_stream: bool = False) -> dict[str, Any]:
    params = {v.name for v in graph.inputs_of_kind("param")}
    costs = [cost_model.cost(op, params) for op in graph.ops]
    duration = [c["latency"] + max(c["compute"], c["memory"]) for c in costs]
    dag = op_dag(graph)
    streams = ["main"] * len(costs) if single_stream else _assign_streams(graph, dag, costs, duration)

    bottom = [0.0] * len(costs)
    for u in reversed(list(nx.topological_sort(dag))):
        bottom[u] = duration[u] + max((bottom[s] for s in dag.successors(u)), default=0.0)
    indegree = {u: dag.in_degree(u) for u in dag.nodes}
    ready = [(-bottom[u], u) for u in dag.nodes if indegree[u] == 0]
    heapq.heapify(ready)
    stream_free = dict.fromkeys(STREAMS, 0.0)
    compute_free = memory_free = link_free = peer_free = 0.0
    start = [0.0] * len(costs)
    end = [0.0] * len(costs)
    order: dict[str, list[int]] = {s: [] for s in STREAMS}
    issue: list[int] = []  # the order ops are issued in, across streams (a topological order)
    while ready:
        _, u = heapq.heappop(ready)
        issue.append(u)
        c, s = costs[u], streams[u]
        t0 = max([stream_free[s]] + [end[p] for p in dag.predecessors(u)])
        if c["kind"] == "copy":
            t1 = max(t0 + duration[u], link_free + c["memory"])
            link_free = max(link_free, t0) + c["memory"]
        elif c["kind"] == "comm":
            t1 = max(t0 + duration[u], peer_free + c["memory"])
            peer_free = max(peer_free, t0) + c["memory"]
        else:
            # concurrent ops share the compute units and the memory bandwidth
            t1 = max(t0 + duration[u], compute_free + c["compute"], memory_free + c["memory"])
            compute_free = max(compute_free, t0) + c["compute"]
            memory_free = max(memory_free, t0) + c["memory"]
        start[u], end[u] = t0, t1
        stream_free[s] = t1
        order[s].append(u)
        for v in dag.successors(u):
            indegree[v] -= 1
            if indegree[v] == 0:
                heapq.heappush(ready, (-bottom[v], v))

    events: list[dict[str, Any]] = []
    by_key: dict[tuple[int, str], dict[str, Any]] = {}
    for u, v in sorted(dag.edges):
        if streams[u] == streams[v]:
            continue
        key = (u, streams[v])
        if key not in by_key:
            by_key[key] = {"id": len(events), "producer": u, "record_stream": streams[u], "wait_stream": streams[v],
                           "consumers": []}
            events.append(by_key[key])
        by_key[key]["consumers"].append(v)
    makespan = max(end, default=0.0)
    if memory_plan is not None:
        _plan_for_issue_order(graph, memory_plan, issue, streams, events)
    if not order["comm"]:  # the comm stream only where collectives are (sharded programs)
        del order["comm"]
    return {
        "streams": [n for n in STREAMS if n in order],
        "ops": [[streams[i], start[i], end[i]] for i in range(len(costs))],
        "order": order,
        "issue": issue,
        "events": events,
        "makespan": makespan,
        "single_stream_makespan": sum(duration),
        "costs": [{"flops": c["flops"], "bytes": c["bytes"], "seconds": d} for c, d in zip(costs, duration,
                                                                                           strict=True)],
    }


def _happens_before(n: int, at: list[int], streams: list[str], events: list[dict[str, Any]]) -> list[int]:
    """Per op in issue order, a bit set of the issue positions that complete before it starts: the
    earlier ops of its stream and, through each event it waits for, its producer and what that
    producer waited for. ``at`` maps op index -> issue position."""
    waits: list[list[int]] = [[] for _ in range(n)]
    for e in events:
        for c in e["consumers"]:
            waits[at[int(c)]].append(at[int(e["producer"])])
    by_pos = [""] * n
    for u, k in enumerate(at):
        by_pos[k] = streams[u]
    last_on: dict[str, int] = {}
    before: list[int] = []
    for k in range(n):
        bits = 0
        prev = last_on.get(by_pos[k])
        if prev is not None:
            bits |= before[prev] | (1 << prev)
        for j in waits[k]:
            bits |= before[j] | (1 << j)
        before.append(bits)
        last_on[by_pos[k]] = k
    return before


def _concurrent_end(touchers: int, start: int, before: list[int], by_stream: list[list[int]]) -> int:
    """The last issue position not ordered after every op in ``touchers`` (a bit set): along a
    stream the set of ops before an op only grows, so per stream a binary search finds it."""
    import bisect

    end = start
    for order in by_stream:
        lo, hi = bisect.bisect_right(order, start), len(order)
        while lo < hi:  # first op of this stream after ``start`` that all touchers precede
            mid = (lo + hi) // 2
            if before[order[mid]] & touchers == touchers:
                hi = mid
            else:
                lo = mid + 1
        if lo > 0:
            end = max(end, order[lo - 1])
    return end


def _plan_for_issue_order(graph: Graph, plan: dict[str, Any], issue: list[int], streams: list[str],
                          events: list[dict[str, Any]]) -> None:
    """Re-pack ``plan_memory``'s arena, in place, for the program as the GPU runtime runs it too: ops
    in ``issue`` order on their streams. There a buffer is live from its writer's issue position to
    the last position not ordered (by stream order and events) after every op that touches it, so
    bytes are reused only by an op that all earlier users of them happen before: sound on real
    streams, not only in the modelled timeline. Buffers conflict when they overlap in program order
    or in that one, so the plan holds for both; ``placement_order`` is recomputed the same way."""
    from ds4c.passes.liveness import Buffer
    from ds4c.passes.plan_memory import pack_arena, placement_order

    n = len(graph.ops)
    at = [0] * n
    for k, u in enumerate(issue):
        at[u] = k
    before = _happens_before(n, at, streams, events)
    by_stream: dict[str, list[int]] = {}
    for k, u in enumerate(issue):
        by_stream.setdefault(streams[u], []).append(k)
    readers: dict[str, int] = {}
    for i, op in enumerate(graph.ops):
        for v in op.operands:
            readers[v.name] = readers.get(v.name, 0) | (1 << at[i])
    buffers, outputs, spans = [], [], []
    for b in plan["buffers"]:
        start = at[b["op"]]
        touchers = 1 << start
        for v in b["values"]:
            touchers |= readers.get(v, 0)
        output = bool(b.get("output")) or b["end"] >= n
        end = n if output else _concurrent_end(touchers, max(start, touchers.bit_length() - 1), before,
                                               list(by_stream.values()))
        # program order's live steps stay conflicts too: the plan holds for both orders
        buffers.append(Buffer(b["value"], b["values"], b["start"], b["end"], b["size"], b["op"]))
        spans.append((start, end))
        outputs.append(output)
    times = [(float(a), float(z) + 1.0) for a, z in spans]
    offsets, arena = pack_arena(buffers, int(plan["alignment"]), effort=5000, times=times)
    placed, below, placed_arena = placement_order(buffers, outputs, int(plan["alignment"]), effort=5000, also=spans)
    plan["placed_arena_bytes"] = placed_arena
    plan.setdefault("arena_bytes_sequential", plan["arena_bytes"])
    if "device_bytes" in plan:
        plan["device_bytes"] += arena - plan["arena_bytes"]
    plan["arena_bytes"] = arena
    if plan.get("target_hbm_bytes"):
        plan["fits"] = plan["device_bytes"] <= plan["target_hbm_bytes"]
    for b, span, off, out, po, bl in zip(plan["buffers"], spans, offsets, outputs, placed, below, strict=True):
        b.update(offset=off, output=out, placed_offset=po, below=bl, issued=list(span))
    plan["orders"] = ["graph", "issue"]
    plan["packed_for"] = "schedule_streams"


@register_pass("schedule_streams")
def schedule_streams(graph: Graph, ctx: PassContext) -> Graph:
    """Schedule ops onto main / aux / copy streams with events; the graph itself is unchanged.

    Needs: op order final (after ``plan_memory``, whose buffer reuse it respects when present).
    Guarantees: ``Program.attrs['schedule'][graph]`` respects every dependency, puts an event on
    every cross-stream edge, and its makespan is at most the single-stream makespan.

        %a = aten.mm.default(%x, %w1)    main  [0, 3.1us]
        %b = aten.mm.default(%x, %w2)    aux   [0, 3.1us]      event: aux(%b) -> main
        %c = aten.add.Tensor(%a, %b)     main  [3.1us, 5.1us]
    """
    plan = (ctx.program_attrs.get("memory_plan") or {}).get(graph.name)
    if plan is not None:
        sizes = dict(plan["sizes"])
    else:
        sizes, _ = plan_binding(graph, ctx.options, ctx.program_attrs)
    if ctx.target is None:
        raise PassError("schedule_streams: the cost model needs the target's bandwidths and peak rates; "
                        "give the PassContext a target (ds4c.targets.get_target(name))")
    latency = float(ctx.options.get("kernel_latency_s", DEFAULT_KERNEL_LATENCY_S))
    model = CostModel(ctx.target, SizeEvaluator(sizes), latency)
    schedule = schedule_graph(graph, model, plan)
    schedule["cost_model"] = {"target": ctx.target.name, "sizes": sizes,
                              "kernel_latency_s": latency, "hbm_bandwidth": model.hbm_bandwidth,
                              "host_link_bandwidth": model.host_link}
    ctx.program_attrs.setdefault("schedule", {})[graph.name] = schedule
    return graph


def check_schedule(graph: Graph, schedule: Mapping[str, Any], plan: Mapping[str, Any] | None = None,
                   tolerance: float = 1e-12) -> list[str]:
    """Problems of ``schedule`` for ``graph`` (empty: valid), found without the scheduler's code:
    every op scheduled once; a consumer starts after each producer (of an operand) ends; an edge
    between streams has an event waited on by the consumer's stream; ops of one stream do not
    overlap; with ``plan``, an op writing an arena buffer starts after every reader of a buffer
    that held the same bytes before has ended."""
    problems: list[str] = []
    ops = schedule["ops"]
    entries = {int(k): v for k, v in ops.items()} if isinstance(ops, Mapping) else dict(enumerate(ops))
    n = len(graph.ops)
    if sorted(entries) != list(range(n)):
        return [f"schedule covers ops {sorted(entries)[:5]}..., the graph has {n} ops"]
    stream = {i: entries[i][0] for i in range(n)}
    start = {i: float(entries[i][1]) for i in range(n)}
    end = {i: float(entries[i][2]) for i in range(n)}
    waits = {(int(e["producer"]), e["wait_stream"], int(c)) for e in schedule.get("events", []) for c in
             e["consumers"]}
    issue = schedule.get("issue")
    if issue is not None and sorted(issue) != list(range(n)):
        problems.append(f"the issue order names {len(issue)} ops, not each of the graph's {n} once")
        issue = None
    issued_at = {u: k for k, u in enumerate(issue)} if issue is not None else None
    for e in schedule.get("events", []):
        if issued_at is not None and any(issued_at[int(c)] < issued_at[int(e["producer"])] for c in e["consumers"]):
            problems.append(f"event {e.get('id')}: a consumer is issued before its producer op "
                            f"#{e['producer']} records it")
        if stream[int(e["producer"])] != e["record_stream"]:
            problems.append(f"event {e.get('id')}: recorded on {e['record_stream']}, its producer runs on "
                            f"{stream[int(e['producer'])]}")

    def need(u: int, v: int, why: str) -> None:
        if start[v] + tolerance < end[u]:
            problems.append(f"op #{v} {graph.ops[v].name} starts at {start[v]:.3e}s before op #{u} "
                            f"{graph.ops[u].name} ends at {end[u]:.3e}s ({why})")
        if issued_at is not None and issued_at[v] < issued_at[u]:
            problems.append(f"op #{v} {graph.ops[v].name} is issued before op #{u} {graph.ops[u].name} ({why})")
        if stream[u] != stream[v] and (u, stream[v], v) not in waits:
            problems.append(f"op #{u} ({stream[u]}) -> op #{v} ({stream[v]}): no event for this {why} edge")

    producer: dict[str, int] = {}
    readers: dict[str, list[int]] = {}
    for i, op in enumerate(graph.ops):
        if end[i] + tolerance < start[i]:
            problems.append(f"op #{i} ends before it starts")
        for v in op.operands:
            if v.name in producer:
                need(producer[v.name], i, "data")
            readers.setdefault(v.name, []).append(i)
        for r in op.results:
            producer[r.name] = i
    for s in {stream[i] for i in range(n)}:
        on = sorted((start[i], end[i], i) for i in range(n) if stream[i] == s)
        for (s0, e0, a), (s1, _, b) in zip(on, on[1:], strict=False):
            if s1 + tolerance < e0:
                problems.append(f"ops #{a} and #{b} overlap on stream {s} ({s0:.3e}..{e0:.3e} vs {s1:.3e})")
    if plan is not None:
        # buffers sharing bytes must not be in use at the same time of the schedule
        buffers = plan["buffers"]
        outputs = {v.name for v in graph.output_values()}
        use: list[tuple[float, float]] = []
        for b in buffers:
            w = producer.get(b["value"])
            t0 = start[w] if w is not None else 0.0
            t1 = max([end[w] if w is not None else 0.0] + [end[r] for v in b["values"] for r in readers.get(v, [])])
            use.append((t0, math.inf if any(v in outputs for v in b["values"]) else t1))
        for a in range(len(buffers)):
            for c in range(a + 1, len(buffers)):
                x, y = buffers[a], buffers[c]
                if x["offset"] < y["offset"] + y["size"] and y["offset"] < x["offset"] + x["size"] and \
                        use[a][0] + tolerance < use[c][1] and use[c][0] + tolerance < use[a][1]:
                    problems.append(f"buffers %{x['value']} and %{y['value']} share arena bytes and are in use at "
                                    f"the same time ({use[a]} vs {use[c]})")
    return problems
