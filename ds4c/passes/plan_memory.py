"""Memory planning: activation arena, weight placement (HBM or host) with prefetch, model-state capacity.

The plan is JSON-able and lives in ``Program.attrs['memory_plan'][graph_name]`` (``ctx.program_attrs``
is that dict), so the artifact manifest and ``ds4c inspect`` can carry it. Buffers are named by
their SSA values and ops by their index in the planned graph, so no pass may reorder ops after
``plan_memory`` and ``schedule_streams`` (lowering reads the plan, it does not move ops).

Options read from ``ctx.options``:

- ``plan_sizes`` / ``plan_batch`` / ``max_context``: the binding symbolic sizes are planned at
  (see ``ds4c.passes.liveness``).
- ``hbm_budget``: bytes of device memory the graph may use for resident weights + state + arena;
  weights are moved to host-pinned memory, largest first, until it fits, and ``ds4c.prefetch``
  ops are inserted ``prefetch_lookahead`` ops (default 8) ahead of each host weight's first use.
- ``csa_kv_on_host``: keep CSA compressed KV on the host and fetch only the ``index_topk``
  selected entries per step into a device staging buffer (HiSparse). Recorded only; the GPU
  runtime does the fetching.
- ``alignment``: arena offset alignment, default 256 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

import ds4c.ops.memory  # noqa: F401 - registers ds4c.prefetch
from ds4c.errors import PassError
from ds4c.ir.graph import Graph, Op, Value
from ds4c.ir.shapes import eval_dim
from ds4c.ir.types import ListType, TensorType
from ds4c.ops.memory import PREFETCH
from ds4c.passes.liveness import Buffer, Liveness, SizeEvaluator, analyze_liveness, plan_binding
from ds4c.passes.manager import PassContext, register_pass

ALIGNMENT = 256
DEFAULT_LOOKAHEAD = 8
LARGE_GRAPH_BUFFERS = 2000  # above this, pack_arena makes one greedy pass (compile time)
DEFAULT_INDEX_TOPK = 512


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


# -- arena packing --------------------------------------------------------------------------------

class _IntervalIndex:
    """Items by interval, in fixed-width buckets: finding the items overlapping an interval costs
    the buckets it spans plus their items, so placing n short-lived buffers is ~linear, not n^2."""

    def __init__(self, values: list[float], n_items: int):
        finite = [v for v in values if math.isfinite(v)] or [0.0]
        self.lo, self.hi = min(finite), max(finite)
        self.width = max((self.hi - self.lo) / max(n_items // 4, 1), 1e-9)
        self.buckets: dict[int, list[int]] = {}

    def _bucket(self, v: float) -> int:
        return int((min(max(v, self.lo), self.hi) - self.lo) // self.width)  # clamps infinities

    def _range(self, a: float, b: float) -> range:
        return range(self._bucket(a), self._bucket(b) + 1)

    def add(self, a: float, b: float, item: int) -> None:
        for k in self._range(a, b):
            self.buckets.setdefault(k, []).append(item)

    def near(self, a: float, b: float) -> set[int]:
        out: set[int] = set()
        for k in self._range(a, b):
            out.update(self.buckets.get(k, ()))
        return out


def _place(buffers: list[Buffer], order: list[int], alignment: int, best_fit: bool,
           times: list[tuple[float, float]] | None = None) -> tuple[dict[int, int], int]:
    """Place buffers in ``order``, each in a gap between the buffers already placed that are live at
    the same time: the smallest gap that holds it (best fit, TFLite's greedy-by-size) or the lowest
    (first fit); at the top when no gap does. With ``times`` (per buffer, a half-open interval of a
    concurrent schedule) buffers also conflict when those overlap."""
    offsets: dict[int, int] = {}
    sizes: dict[int, int] = {}
    top = 0
    steps = _IntervalIndex([b.start for b in buffers] + [b.end for b in buffers], len(buffers))
    clock = _IntervalIndex([t for ab in times for t in ab], len(buffers)) if times is not None else None
    for k in order:
        b = buffers[k]
        size = align_up(max(b.size, 1), alignment)
        near = steps.near(b.start, b.end)
        conflicts = {p for p in near if buffers[p].start <= b.end and b.start <= buffers[p].end}
        if clock is not None:
            t0, t1 = times[k]
            conflicts.update(p for p in clock.near(t0, t1) if times[p][0] < t1 and t0 < times[p][1])
        overlapping = sorted(conflicts, key=lambda p: (offsets[p], p))
        best, best_gap, prev_end = None, None, 0
        for p in overlapping:
            off = offsets[p]
            gap = off - prev_end
            if gap >= size and (best_gap is None or gap < best_gap):
                best, best_gap = prev_end, gap
                if not best_fit:
                    break
            prev_end = max(prev_end, off + sizes[p])
        offset = prev_end if best is None else best
        offsets[k] = offset
        sizes[k] = size
        steps.add(b.start, b.end, k)
        if clock is not None:
            clock.add(times[k][0], times[k][1], k)
        top = max(top, offset + size)
    return offsets, top


def pack_arena(buffers: list[Buffer], alignment: int = ALIGNMENT, *, effort: int = 20000, seed: int = 0,
               times: list[tuple[float, float]] | None = None) -> tuple[list[int], int]:
    """Offsets (aligned) of ``buffers`` in one arena and the arena's size.

    Packing intervals is NP-hard; we take the best of a few greedy orders (by size, by lifetime,
    by size x lifetime, by start), each best fit and first fit, then, while the arena is above
    its lower bound (the most aligned bytes live at one step) and ``effort`` (buffer placements)
    is left, random orders from a seeded RNG (size-descending perturbed, or shuffled)."""
    import random

    idx = list(range(len(buffers)))
    if not buffers:
        return [], 0
    sizes = [align_up(max(b.size, 1), alignment) for b in buffers]
    delta: dict[int, int] = {}
    for b, sz in zip(buffers, sizes, strict=True):
        delta[b.start] = delta.get(b.start, 0) + sz
        delta[b.end + 1] = delta.get(b.end + 1, 0) - sz
    bound, acc = 0, 0
    for t in sorted(delta):
        acc += delta[t]
        bound = max(bound, acc)
    orders = [
        sorted(idx, key=lambda k: (-sizes[k], buffers[k].start, k)),
        sorted(idx, key=lambda k: (-(buffers[k].end - buffers[k].start), -sizes[k], k)),
        sorted(idx, key=lambda k: (-sizes[k] * (buffers[k].end - buffers[k].start + 1), k)),
        sorted(idx, key=lambda k: (buffers[k].start, -sizes[k], k)),
    ]
    if len(buffers) > LARGE_GRAPH_BUFFERS:
        # Every placement scans the buffers live at the same time, and graph outputs (the model
        # state) stay live to the end: on many-layer graphs one greedy pass is the budget.
        orders, effort = orders[:1], 0
    best: tuple[dict[int, int], int] | None = None
    for i, order in enumerate(orders):
        for best_fit in ((True, False) if i == 0 and effort else (True,)):
            offsets, top = _place(buffers, order, alignment, best_fit, times)
            if best is None or top < best[1]:
                best = (offsets, top)
    assert best is not None
    rng = random.Random(seed)
    tries = effort // max(len(buffers), 1)
    while best[1] > bound and tries > 0:
        tries -= 1
        if rng.random() < 0.5:
            order = sorted(idx, key=lambda k: (-sizes[k] * rng.uniform(0.5, 1.5), k))
        else:
            order = idx[:]
            rng.shuffle(order)
        offsets, top = _place(buffers, order, alignment, rng.random() < 0.5, times)
        if top < best[1]:
            best = (offsets, top)
    return [best[0][k] for k in idx], align_up(best[1], alignment)


def placement_order(buffers: list[Buffer], outputs: list[bool], alignment: int = ALIGNMENT, *,
                    effort: int = 20000, also: list[tuple[int, int]] | None = None
                    ) -> tuple[list[int | None], list[list[int]], int]:
    """The arena of the GPU runtime, in a form that holds at any sizes: the buffers that are not
    graph outputs (the runtime hands outputs to the caller; they are not placed) packed on their
    own, and per buffer the buffers it conflicts with (live at the same step) and sits above.
    The runtime evaluates it at the sizes of each call (``ds4c.runtime.buffer_plan.evaluate_placement``): a buffer starts
    where the highest of those ends, so buffers live at once never share bytes, whatever B and S
    are. ``also``: per buffer a second closed interval (another order the program runs in, e.g.
    the stream schedule's issue order); buffers overlapping in either conflict. Returns (offset
    per buffer at these sizes, None for outputs; ``below`` lists; arena bytes)."""
    idx = [k for k in range(len(buffers)) if not outputs[k]]
    times = None if also is None else [(float(also[k][0]), float(also[k][1]) + 1.0) for k in idx]
    packed, arena = pack_arena([buffers[k] for k in idx], alignment, effort=effort, times=times)
    offsets: list[int | None] = [None] * len(buffers)
    for k, off in zip(idx, packed, strict=True):
        offsets[k] = off
    below: list[set[int]] = [set() for _ in buffers]
    for spans in ([(buffers[k].start, buffers[k].end) for k in range(len(buffers))], also):
        if spans is None:
            continue
        active: list[int] = []
        for k in sorted(idx, key=lambda k: spans[k][0]):
            active = [p for p in active if spans[p][1] >= spans[k][0]]
            for p in active:  # live at the same step: the one placed lower is below the other
                lo, hi = (p, k) if offsets[p] < offsets[k] else (k, p)
                below[hi].add(lo)
            active.append(k)
    return offsets, [sorted(x) for x in below], arena


def _aligned_live_bytes(live: Liveness, alignment: int) -> list[int]:
    delta = [0] * (live.num_steps + 1)
    for b in live.buffers:
        delta[b.start] += align_up(max(b.size, 1), alignment)
        delta[b.end + 1] -= align_up(max(b.size, 1), alignment)
    out, acc = [], 0
    for t in range(live.num_steps):
        acc += delta[t]
        out.append(acc)
    return out


def plan_arena(graph: Graph, sizes: dict[str, int], assumed: list[str] | None = None,
               alignment: int = ALIGNMENT) -> dict[str, Any]:
    """The arena part of a memory plan (JSON-able)."""
    live = analyze_liveness(graph, sizes, assumed)
    offsets, arena = pack_arena(live.buffers, alignment)
    outputs = [b.end >= len(graph.ops) for b in live.buffers]
    placed, below, placed_arena = placement_order(live.buffers, outputs, alignment)
    per_step = live.live_bytes()
    aligned = _aligned_live_bytes(live, alignment)
    peak = max(per_step, default=0)
    return {
        "sizes": dict(sizes),
        "assumed_symbols": list(live.assumed),
        "alignment": alignment,
        "arena_bytes": arena,
        "peak_live_bytes": peak,  # alignment excluded: what the CPU runtime measures
        "peak_live_aligned_bytes": max(aligned, default=0),
        "peak_step": per_step.index(peak) if per_step else 0,
        "live_bytes": per_step,  # per step: ops 0..n-1, then the return
        # the GPU runtime's arena (graph outputs left out), evaluated at each call's sizes
        "placed_arena_bytes": placed_arena,
        "buffers": [{"value": b.root, "values": list(b.values), "op": b.op, "start": b.start, "end": b.end,
                     "size": b.size, "offset": off, "output": out, "placed_offset": po, "below": bl}
                    for b, off, out, po, bl in zip(live.buffers, offsets, outputs, placed, below, strict=True)],
        "orders": ["graph"],  # the op orders the plan is valid for (schedule_streams adds "issue")
        "views_of_inputs": sorted(v for v, r in live.alias_of.items() if r is None),
    }


# -- weights: HBM or host, with prefetch ----------------------------------------------------------

def insert_prefetches(graph: Graph, host: set[str], lookahead: int = DEFAULT_LOOKAHEAD) -> tuple[Graph, list[dict]]:
    """``graph`` where every read of a param in ``host`` reads ``ds4c.prefetch(param)`` instead,
    the prefetch placed ``lookahead`` ops before the first read. Computation is unchanged."""
    first_use: dict[Value, int] = {}
    for i, op in enumerate(graph.ops):
        for v in op.operands:
            if v.name in host and graph.input_kind(v) == "param":
                first_use.setdefault(v, i)
    if not first_use:
        return graph, []
    taken = graph.value_names()
    staged: dict[Value, Value] = {}
    before: dict[int, list[Op]] = {}
    for w, use in sorted(first_use.items(), key=lambda kv: (kv[1], kv[0].name)):
        name = graph.fresh_name(f"{w.name}_dev", taken)
        taken.add(name)
        staged[w] = Value(name, w.type)
        before.setdefault(max(0, use - lookahead), []).append(Op(PREFETCH, (w,), {}, (staged[w],), loc="plan_memory"))
    ops: list[Op] = []
    records: list[dict] = []
    for i, op in enumerate(graph.ops):
        for p in before.get(i, []):
            records.append({"weight": p.args[0].name, "staged": p.results[0].name, "op": len(ops)})
            ops.append(p)
        ops.append(op.map_operands(lambda v: staged.get(v, v)) if any(o in staged for o in op.operands) else op)
    out_map = {v: staged[v] for v in graph.output_values() if v in staged}
    outputs = [(n, out_map.get(v, v)) for n, v in graph.outputs]
    new = graph.copy(ops=ops, outputs=outputs)
    first_read: dict[str, int] = {}
    for i, op in enumerate(new.ops):
        for v in op.operands:
            first_read.setdefault(v.name, i)
    for r in records:
        r["first_use"] = first_read.get(r["staged"], len(new.ops))
    return new, records


def _param_bytes(graph: Graph, evaluator: SizeEvaluator) -> dict[str, int]:
    used = {v for op in graph.ops for v in op.operands} | set(graph.output_values())
    return {v.name: evaluator.nbytes(v.type) or 0 for v in graph.inputs_of_kind("param") if v in used}


# -- model state ----------------------------------------------------------------------------------

STATE_KINDS = ("sliding_ring", "csa_compressed_kv", "csa_indexer_keys", "hca_compressed_kv", "compressor_tail",
               "other")


def classify_state(names: list[str]) -> dict[str, str]:
    """State tensor name -> kind (``STATE_KINDS``), from the model's naming: ``<layer>.window_kv``,
    ``<layer>.compressed_kv`` (CSA when the layer also has ``indexer_keys``, else HCA),
    ``<layer>.indexer_keys``, ``<layer>.[indexer_]compressor_*``; the serving pools
    (``<layer>.window_kv_pool``, ..., ``<layer>.[indexer_]compressor_ring``) as the state they page."""
    def layer(n: str) -> str:
        return n.rsplit(".", 1)[0] if "." in n else ""

    csa_layers = {layer(n) for n in names if n.endswith(("indexer_keys", "indexer_keys_pool"))}
    kinds = {}
    for n in names:
        leaf = n.rsplit(".", 1)[-1].removesuffix("_pool")  # a serving pool holds its kind's rows in pages
        if leaf == "window_kv":
            kinds[n] = "sliding_ring"
        elif leaf == "indexer_keys":
            kinds[n] = "csa_indexer_keys"
        elif leaf.startswith(("compressor_", "indexer_compressor_")):
            kinds[n] = "compressor_tail"
        elif leaf == "compressed_kv":
            kinds[n] = "csa_compressed_kv" if layer(n) in csa_layers else "hca_compressed_kv"
        else:
            kinds[n] = "other"
    return kinds


def _state_tensors(graph: Graph, program_attrs: Mapping[str, Any]) -> list[tuple[str, TensorType]]:
    states = [(v.name, v.type) for v in graph.inputs_of_kind("state") if isinstance(v.type, TensorType)]
    if states:
        return states
    out = []
    for s in program_attrs.get("state", []) or []:
        dtype = getattr(torch, str(s.get("dtype", "float32")), torch.float32)
        out.append((s["name"], TensorType(dtype, tuple(s["shape"]))))
    return out


def _index_topk(graph: Graph, options: Mapping[str, Any], program_attrs: Mapping[str, Any]) -> int:
    if options.get("index_topk"):
        return int(options["index_topk"])
    for op in graph.ops:
        if op.name == "indexer.topk" and isinstance(op.kwargs.get("k"), int):
            return int(op.kwargs["k"])
    cfg = program_attrs.get("model_config") or {}
    return int(cfg.get("index_topk", DEFAULT_INDEX_TOPK))


def plan_state(graph: Graph, evaluator: SizeEvaluator, options: Mapping[str, Any],
               program_attrs: Mapping[str, Any], target: Any = None) -> dict[str, Any]:
    """Bytes of model state per kind at the plan binding, and where it lives."""
    tensors = _state_tensors(graph, program_attrs)
    kinds = classify_state([n for n, _ in tensors])
    on_host = bool(options.get("csa_kv_on_host", False))
    topk = _index_topk(graph, options, program_attrs)
    by_kind = dict.fromkeys(STATE_KINDS, 0)
    out_tensors: dict[str, dict[str, Any]] = {}
    staging = 0
    for name, ty in tensors:
        nbytes = evaluator.nbytes(ty) or 0
        kind = kinds[name]
        by_kind[kind] += nbytes
        host = on_host and kind == "csa_compressed_kv"
        out_tensors[name] = {"kind": kind, "bytes": nbytes, "placement": "host" if host else "hbm"}
        if host:
            # device staging for the selected entries of one step: [B, min(topk, capacity), D]
            dims = [evaluator.dim(d) for d in ty.shape]
            capacity = dims[1] if len(dims) > 1 else 1
            per_entry = nbytes // max(capacity, 1)
            staging += min(topk, capacity) * per_entry
    host_bytes = sum(t["bytes"] for t in out_tensors.values() if t["placement"] == "host")
    plan: dict[str, Any] = {
        "source": "state inputs" if graph.inputs_of_kind("state") else "program attrs (outputs of this graph)",
        "by_kind": {k: v for k, v in by_kind.items() if v},
        "tensors": out_tensors,
        "csa_kv_on_host": on_host,
        "hbm_bytes": sum(t["bytes"] for t in out_tensors.values()) - host_bytes + staging,
        "host_bytes": host_bytes,
    }
    if on_host:
        link = getattr(target, "host_link_bandwidth", None)
        plan["topk_fetch"] = {"index_topk": topk, "staging_bytes": staging,
                              "bytes_per_step": staging,  # worst case: every selected entry comes from the host
                              "seconds_per_step": staging / link if link else None}
    return plan


# -- the pass -------------------------------------------------------------------------------------

def plan_device_bytes(arena: dict[str, Any], resident_weights: int, state: dict[str, Any],
                      counts_state: bool) -> int:
    """Device bytes of a plan: its arena, the weights resident in HBM and (where the graph takes
    state inputs) the state's HBM bytes."""
    return arena["arena_bytes"] + resident_weights + (state["hbm_bytes"] if counts_state else 0)


@register_pass("plan_memory")
def plan_memory(graph: Graph, ctx: PassContext) -> Graph:
    """Plan every activation byte into one arena, place weights in HBM or host, size the model state.

    Needs: a graph whose op order is final. Guarantees: the reference result is unchanged; with
    ``hbm_budget`` below the graph's weights, host-resident weights are read through
    ``ds4c.prefetch`` ops; ``Program.attrs['memory_plan'][graph]`` holds the plan (buffers with
    offsets and live steps, arena size, peak, weight placement, state capacity).

        %y = aten.mm.default(%x, %w) : f32[4,8]        with hbm_budget below %w's size:
                                                          %w_dev = ds4c.prefetch(%w) : f32[16,8]
                                                          %y = aten.mm.default(%x, %w_dev) : f32[4,8]
    """
    options = ctx.options
    attrs = ctx.program_attrs
    if serving_entry_points(attrs, [graph.name]):
        options = {**options, "plan_sizes": {**serving_sizes(graph, options, attrs, ctx.target, ctx.graphs),
                                             **(options.get("plan_sizes") or {})}}
    alignment = int(options.get("alignment", ALIGNMENT))
    lookahead = int(options.get("prefetch_lookahead", DEFAULT_LOOKAHEAD))
    sizes, assumed = plan_binding(graph, options, attrs)
    evaluator = SizeEvaluator(sizes)
    weights = _param_bytes(graph, evaluator)
    state = plan_state(graph, evaluator, options, attrs, ctx.target)
    counts_state = bool(graph.inputs_of_kind("state"))
    budget = options.get("hbm_budget")

    host: set[str] = set()
    planned, prefetches = graph, []
    arena = plan_arena(graph, sizes, assumed, alignment)
    if budget is not None:
        budget = int(budget)
        by_size = sorted(weights, key=lambda n: (-weights[n], n))
        while True:
            resident = sum(b for n, b in weights.items() if n not in host)
            need = plan_device_bytes(arena, resident, state, counts_state)
            if need <= budget:
                break
            remaining = [n for n in by_size if n not in host]
            if not remaining:
                raise PassError(
                    f"plan_memory @{graph.name}: hbm_budget {budget} bytes is below what the graph needs with every "
                    f"weight on the host ({need} bytes: arena {arena['arena_bytes']} incl. prefetch staging, state "
                    f"{state['hbm_bytes'] if counts_state else 0}); raise --hbm-budget, lower --max-context or use "
                    "csa_kv_on_host")
            over, moved = need - budget, 0
            for n in remaining:
                host.add(n)
                moved += weights[n]
                if moved >= over:
                    break
            planned, prefetches = insert_prefetches(graph, host, lookahead)
            arena = plan_arena(planned, sizes, assumed, alignment)

    resident = sum(b for n, b in weights.items() if n not in host)
    hbm_capacity = getattr(ctx.target, "hbm_bytes", None)
    plan = dict(arena)
    plan["weights"] = {
        "budget": budget,
        "hbm_bytes": resident,
        "host_bytes": sum(weights[n] for n in host),
        "host": sorted(host),
        "prefetch": prefetches,
        "lookahead": lookahead,
    }
    plan["state"] = state
    plan["device_bytes"] = plan_device_bytes(arena, resident, state, counts_state)
    plan["target_hbm_bytes"] = hbm_capacity
    plan["fits"] = None if hbm_capacity is None else plan["device_bytes"] <= hbm_capacity
    attrs.setdefault("memory_plan", {})[graph.name] = plan
    return planned


def serving_entry_points(attrs: Mapping[str, Any], names: list[str]) -> list[str]:
    """Those of ``names`` the engine runs over the state pools: the serving graphs
    (``attrs['serving']['inputs']``) and the MTP block's ``mtp_step``."""
    serving = attrs.get("serving") or {}
    return [n for n in names if n in serving.get("inputs", {}) or (n == "mtp_step" and serving.get("mtp"))]


def serving_sizes(graph: Graph, options: Mapping[str, Any], attrs: dict[str, Any], target: Any,
                  graphs: Mapping[str, Graph] | None = None) -> dict[str, int]:
    """The binding of a serving graph: N = L = max_step_tokens tokens, R = max_running sequences,
    E = N emitters, and the pool pages of ``attrs['serving_pages']`` (sized here, once per
    program, by ``size_pools``: the state budget is ``hbm_budget`` or 92% of the target's HBM, less
    the weights of this graph and of the MTP block's ``mtp_step`` in ``graphs`` where the program
    has one, and less the largest serving arena, estimated here and taken again from the final
    arenas by ``fit_serving_pools``; the host CPU target, without a budget, gets pools for
    ``max_running`` requests of max_context: filling 92% of a server's RAM is no default)."""
    from ds4c.models.deepseek_v4.paged import PageLayout, all_pools, page_bytes, pool_capacity

    serving = attrs["serving"]
    batch = serving["batch"]
    layout = PageLayout.from_record(serving["layout"], f"plan_memory @{graph.name}")
    if "serving_pages" not in attrs:
        per_page = page_bytes(all_pools(serving))
        held = dict(_param_bytes(graph, SizeEvaluator({})))
        mtp = (graphs or {}).get("mtp_step") if serving.get("mtp") else None
        if mtp is not None and mtp is not graph:  # the MTP block's weights live beside the model's
            held = {**_param_bytes(mtp, SizeEvaluator({})), **held}
        weights = sum(held.values())
        hbm = getattr(target, "hbm_bytes", None) if getattr(target, "backend", "reference") != "reference" else None
        budget = options.get("hbm_budget") or (int(0.92 * hbm) if hbm else None)
        if budget is not None:
            budget = int(budget) - weights
        hint = " (--hbm-budget, --serving max_running=...)"
        pages, activations = serving_pools(layout, per_page, budget, batch, f"plan_memory @{graph.name}", hint), 0
        if budget is not None:  # the steps' activations live beside the pools (fit_serving_pools: final arenas)
            activations = _serving_arena_estimate(graphs or {graph.name: graph}, batch, pages, options, attrs)
            pages = serving_pools(layout, per_page, budget - activations, batch, f"plan_memory @{graph.name}", hint)
        attrs["serving_pages"] = {"pages": pages, "page_bytes": per_page, "state_budget": budget, "weights": weights,
                                  "activations": activations, "capacity": pool_capacity(layout, pages)}
    return _serving_binding(batch, attrs["serving_pages"]["pages"])


def serving_pools(layout: Any, per_page: Mapping[str, int], budget: int | None, batch: Mapping[str, int],
                  where: str, hint: str) -> dict[str, int]:
    """``size_pools`` for the serving ``batch``; one that does not fit raises a PassError naming
    ``where``, the numbers and ``hint`` (what to change)."""
    from ds4c.models.deepseek_v4.paged import size_pools

    try:
        return size_pools(layout, per_page, budget, max_running=batch["max_running"],
                          max_step_tokens=batch["max_step_tokens"])
    except ValueError as e:
        raise PassError(f"{where}: {e}{hint}") from None


def _serving_binding(batch: Mapping[str, int], pages: Mapping[str, int]) -> dict[str, int]:
    n = batch["max_step_tokens"]
    return {"N": n, "L": n, "R": batch["max_running"], "Ec": n, "Eh": n,
            "PW": pages["window"], "PC": pages["compressed"], "SLOTS": pages["slots"]}


def _serving_arena_estimate(graphs: Mapping[str, Graph], batch: Mapping[str, int], pages: Mapping[str, int],
                            options: Mapping[str, Any], attrs: dict[str, Any]) -> int:
    """The largest activation arena of the engine's entry points (the serving graphs and the MTP
    block's ``mtp_step``) in program order, packed with little effort, at the serving binding with
    ``pages`` (an arena does not grow when the pools shrink). ``schedule_streams`` may grow the
    arenas afterwards; ``fit_serving_pools`` then sizes the pools from the final ones."""
    sizes = _serving_binding(batch, pages)
    names = serving_entry_points(attrs, list(graphs))
    alignment = int(options.get("alignment", ALIGNMENT))
    most = 0
    for name in names:
        binding, assumed = plan_binding(graphs[name], {**options, "plan_sizes": sizes}, attrs)
        live = analyze_liveness(graphs[name], binding, assumed)
        most = max(most, pack_arena(live.buffers, alignment, effort=500)[1])
    return most


def host_weights(plans: Mapping[str, Any] | None) -> set[str]:
    """The weights any entry point's memory plan keeps in host memory (``plan["weights"]["host"]``),
    from ``Program.attrs["memory_plan"]`` or from the manifest's summaries of it."""
    return {n for plan in (plans or {}).values() for n in (plan.get("weights") or {}).get("host", [])}


# -- context capacity -------------------------------------------------------------------------------

def _layer_types(config: Mapping[str, Any]) -> list[str]:
    n = int(config["num_hidden_layers"])
    if config.get("layer_types"):
        return list(config["layer_types"])[:n]
    names = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    return [names.get(int(r), "heavily_compressed_attention") for r in config["compress_ratios"][:n]]


def state_bytes_per_sequence(config: Mapping[str, Any], context: int, *, kv_bytes: int = 2,
                             csa_kv_on_host: bool = False) -> tuple[int, int]:
    """(device bytes, host bytes) of one sequence's model state at ``context`` tokens (see 4.6 of the spec)."""
    rates = config.get("compress_rates") or {}
    csa = int(rates.get("compressed_sparse_attention", 4))
    hca = int(rates.get("heavily_compressed_attention", 128))
    d, di = int(config["head_dim"]), int(config["index_head_dim"])
    window, topk = int(config["sliding_window"]), int(config["index_topk"])
    device = host = 0
    for kind in _layer_types(config):
        elems = window * d  # ring
        if kind == "compressed_sparse_attention":
            entries = math.ceil(context / csa)
            elems += entries * di + 6 * csa * (d + di)  # indexer keys; overlap compressor tails (main + indexer)
            if csa_kv_on_host:
                host += entries * d * kv_bytes
                elems += min(topk, entries) * d  # device staging of the selected entries
            else:
                elems += entries * d
        elif kind == "heavily_compressed_attention":
            elems += math.ceil(context / hca) * d + 2 * hca * d  # compressed KV; kv + score tails
        device += elems * kv_bytes
    return device, host


def max_context_per_placement(config: Mapping[str, Any], target: Any, weight_bytes: int, batch: int = 1, *,
                              kv_bytes: int = 2, activation_bytes: int = 0,
                              host_bytes: int | None = None) -> dict[str, Any]:
    """Longest context per sequence that fits ``batch`` sequences on ``target``, per KV placement.

    Device memory = ``target.hbm_bytes`` - ``weight_bytes`` (HBM-resident weights) -
    ``activation_bytes`` (the arena); each sequence holds the state of 4.6 (``kv_bytes`` per
    element). ``all_hbm``: everything on the device; ``csa_kv_on_host``: CSA compressed KV in host
    memory (at most ``host_bytes`` if given), a device staging buffer of ``index_topk`` entries per
    CSA layer. ``max_context`` is the exact largest token count (0: nothing fits);
    ``max_context_clipped`` is it bounded by the model's ``max_position_embeddings``.
    """
    if isinstance(target, str):
        from ds4c.targets import get_target

        target = get_target(target)
    hbm = int(getattr(target, "hbm_bytes", 0))
    available = hbm - int(weight_bytes) - int(activation_bytes)
    positions = int(config.get("max_position_embeddings", 0)) or None
    out: dict[str, Any] = {"hbm_bytes": hbm, "weight_bytes": int(weight_bytes), "activation_bytes": activation_bytes,
                           "available_bytes": available, "batch": batch, "kv_bytes": kv_bytes}
    for placement, on_host in (("all_hbm", False), ("csa_kv_on_host", True)):
        def fits(t: int, on_host: bool = on_host) -> bool:
            dev, hst = state_bytes_per_sequence(config, t, kv_bytes=kv_bytes, csa_kv_on_host=on_host)
            return batch * dev <= available and (host_bytes is None or batch * hst <= host_bytes)

        if not fits(0):
            best = 0
        else:
            lo, hi = 0, 1
            while fits(hi) and hi < 1 << 50:
                lo, hi = hi, hi * 2
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            best = lo
        # linear beyond the top-k staging: slope and intercept from two long contexts
        t1, t2 = 1 << 20, 1 << 21
        dev1, host1 = state_bytes_per_sequence(config, t1, kv_bytes=kv_bytes, csa_kv_on_host=on_host)
        dev2, host2 = state_bytes_per_sequence(config, t2, kv_bytes=kv_bytes, csa_kv_on_host=on_host)
        per_token = (dev2 - dev1) / (t2 - t1)
        out[placement] = {
            "max_context": best,
            "max_context_clipped": min(best, positions) if positions else best,
            "fixed_device_bytes": round(dev1 - per_token * t1),
            "device_bytes_per_token": per_token,
            "host_bytes_per_token": (host2 - host1) / (t2 - t1),
        }
    return out


# -- independent checker ----------------------------------------------------------------------------

def _schema_aliases(op_name: str, result_index: int) -> bool:
    """Whether the op's schema says result ``result_index`` may be a view of an input (torch alias info)."""
    from ds4c.ir.registry import get_op

    schema = getattr(get_op(op_name), "schema", None)
    if schema is None or not schema.returns:
        return False
    ret = schema.returns[min(result_index, len(schema.returns) - 1)]
    return ret.alias_info is not None and not ret.alias_info.is_write


def check_plan(graph: Graph, plan: Mapping[str, Any], schedule: Mapping[str, Any] | None = None) -> list[str]:
    """Problems of ``plan`` for ``graph`` (empty: valid). Independent of the planner: recomputes live
    ranges from the ops, accepts shared buffers only where torch's schema says the op returns a view,
    and checks that no two buffers live at the same step overlap in the arena and all fit in it.
    With ``schedule`` (a plan ``schedule_streams`` re-packed, valid for its issue order too) also:
    two buffers may share bytes only if every op touching one happens before (stream order,
    events) the op writing the other."""
    problems: list[str] = []
    sizes = dict(plan["sizes"])
    n = len(graph.ops)
    alignment = int(plan.get("alignment", 1))
    arena = int(plan["arena_bytes"])

    def nbytes(ty: Any) -> int | None:
        types = (ty,) if isinstance(ty, TensorType) else ty.elements if isinstance(ty, ListType) else ()
        if not types:
            return None
        total = 0
        for t in types:
            total += math.prod(eval_dim(d, sizes) for d in t.shape) * t.dtype.itemsize
        return total

    made_by: dict[str, tuple[int, Op, int]] = {}
    for i, op in enumerate(graph.ops):
        for k, r in enumerate(op.results):
            made_by[r.name] = (i, op, k)
    last: dict[str, int] = {}
    for i, op in enumerate(graph.ops):
        for v in op.operands:
            last[v.name] = i
    for v in graph.output_values():
        last[v.name] = n
    input_names = {gi.value.name for gi in graph.inputs}

    group_of: dict[str, int] = {}
    for g, b in enumerate(plan["buffers"]):
        for v in b["values"]:
            if v in group_of:
                problems.append(f"%{v} is in two buffers")
            group_of[v] = g
    views_of_inputs = set(plan.get("views_of_inputs", []))

    def input_derived(name: str) -> bool:
        while name not in input_names:
            if name not in views_of_inputs or name not in made_by:
                return False
            _, op, k = made_by[name]
            if not _schema_aliases(op.name, k):
                return False
            src = next((v for v in op.operands if isinstance(v.type, TensorType | ListType)), None)
            if src is None:
                return False
            name = src.name
        return True

    for i, op in enumerate(graph.ops):
        for r in op.results:
            if nbytes(r.type) is None:
                continue
            if r.name not in group_of:
                if not input_derived(r.name):
                    problems.append(f"op #{i}: %{r.name} has no buffer and is not a view of a graph input")

    intervals: list[tuple[int, int, int, int, str]] = []  # (start, end, offset, size, root)
    for b in plan["buffers"]:
        values = b["values"]
        root = values[0]
        if root not in made_by:
            problems.append(f"buffer %{root} is not made by an op")
            continue
        start = made_by[root][0]
        end = max([start] + [last.get(v, made_by[v][0] if v in made_by else start) for v in values])
        need = nbytes(made_by[root][1].results[made_by[root][2]].type) or 0
        size, off = int(b["size"]), int(b["offset"])
        if size < need:
            problems.append(f"buffer %{root}: {size} bytes planned, the value needs {need}")
        if off < 0 or off % alignment:
            problems.append(f"buffer %{root}: offset {off} is not a non-negative multiple of {alignment}")
        if off + size > arena:
            problems.append(f"buffer %{root}: [{off}, {off + size}) exceeds the arena of {arena} bytes")
        for v in values[1:]:
            if v not in made_by:
                problems.append(f"buffer %{root}: %{v} is not made by an op")
                continue
            _, op, k = made_by[v]
            src = next((x for x in op.operands if isinstance(x.type, TensorType | ListType)), None)
            if not _schema_aliases(op.name, k) or src is None or group_of.get(src.name) != group_of[root]:
                problems.append(f"buffer %{root}: %{v} shares it but {op.name} does not return a view of it")
        if int(b.get("start", start)) > start or int(b.get("end", end)) < end:
            problems.append(f"buffer %{root}: planned live steps [{b.get('start')}, {b.get('end')}] do not cover "
                            f"its uses [{start}, {end}]")
        intervals.append((start, end, off, max(size, need), root))

    if schedule is not None:
        if "issue" not in plan.get("orders", []):
            problems.append("the plan is not packed for a stream schedule (no 'issue' in its orders)")
        problems += _check_issue_order(graph, plan, schedule, last)
    # sweep over steps: buffers live at the same step must not overlap in the arena
    intervals.sort()
    active: list[tuple[int, int, int, int, str]] = []
    for cur in intervals:
        active = [a for a in active if a[1] >= cur[0]]
        for a in active:
            if a[2] < cur[2] + cur[3] and cur[2] < a[2] + a[3] and a[3] > 0 and cur[3] > 0:
                problems.append(f"buffers %{a[4]} [{a[2]}, {a[2] + a[3]}) and %{cur[4]} [{cur[2]}, "
                                f"{cur[2] + cur[3]}) overlap while both live (steps {max(a[0], cur[0])}.."
                                f"{min(a[1], cur[1])})")
        active.append(cur)
    return problems


def _check_issue_order(graph: Graph, plan: Mapping[str, Any], schedule: Mapping[str, Any],
                       last: Mapping[str, int]) -> list[str]:
    """``check_plan`` for a plan packed for ``schedule``: buffers overlapping in bytes must be
    ordered, all users of one before the writer of the other."""
    n = len(graph.ops)
    issue = [int(u) for u in schedule["issue"]]
    stream = [str(row[0]) for row in schedule["ops"]]
    waits: dict[int, list[int]] = {}
    for e in schedule.get("events", []):
        for c in e["consumers"]:
            waits.setdefault(int(c), []).append(int(e["producer"]))
    before: dict[int, int] = {}  # op -> bit set of ops done before it starts
    last_on: dict[str, int] = {}
    for u in issue:
        bits = 0
        if stream[u] in last_on:
            p = last_on[stream[u]]
            bits |= before[p] | (1 << p)
        for p in waits.get(u, []):
            bits |= before[p] | (1 << p)
        before[u], last_on[stream[u]] = bits, u
    readers: dict[str, int] = {}
    for i, op in enumerate(graph.ops):
        for v in op.operands:
            readers[v.name] = readers.get(v.name, 0) | (1 << i)
    rows = []  # (offset, end byte, writer op, touchers, is output, root)
    for b in plan["buffers"]:
        touch = 1 << int(b["op"])
        for v in b["values"]:
            touch |= readers.get(v, 0)
        output = any(last.get(v, -1) >= n for v in b["values"])
        rows.append((int(b["offset"]), int(b["offset"]) + max(int(b["size"]), 1), int(b["op"]), touch, output,
                     b["values"][0]))
    rows.sort()
    problems: list[str] = []
    active: list[tuple] = []
    for cur in rows:
        active = [a for a in active if a[1] > cur[0]]
        for a in active:
            a_first = not a[4] and before[cur[2]] & a[3] == a[3]
            c_first = not cur[4] and before[a[2]] & cur[3] == cur[3]
            if not (a_first or c_first):
                problems.append(f"buffers %{a[5]} and %{cur[5]} share bytes [{max(a[0], cur[0])}, "
                                f"{min(a[1], cur[1])}) but neither's users all happen before the other's writer")
        active.append(cur)
    return problems
