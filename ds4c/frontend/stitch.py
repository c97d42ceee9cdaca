"""Trace once per layer kind, then stitch: tracing cost O(kinds), not O(layers).

A DeepSeek-V4 decoder layer's computation depends only on its kind, ``(layer_type,
mlp_layer_type)``: ``flash``'s 43 layers are 4 kinds. ``trace_program`` exports a *proxy* model
holding one layer per kind (in first-appearance order) and this module rebuilds each entry
point of the real model from the proxy's graph:

    prologue (embedding)  |  layer 0 .. layer K-1 of the proxy  |  epilogue (hc_head, norm, lm_head)

Every real layer ``i`` of kind ``k`` is a copy of proxy layer ``k`` with its weights
(``model.layers.k.*`` -> ``model.layers.i.*``), state (``layers.k.*`` -> ``layers.i.*``), source
locations and SSA names renamed, and its inputs from the previous layer (the residual streams)
wired to the previous real layer's outputs, matched in definition order and checked by type.
The result is the graph torch.export would give for the real model, op for op (a test compares
the two on ``tiny``).

Layer ranges are found from source locations (``Op.loc``): layer ``j`` runs from its first op to
the next layer's first op; the epilogue starts at the first op after the last layer that belongs
to no layer (shared helpers such as ``model.rotary`` that layers call stay inside the layer).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ds4c.errors import IRError
from ds4c.ir.graph import Graph, GraphInput, Op, Value, map_values

_LAYER_LOC = re.compile(r"^model\.layers\.(\d+)(\.|$)")
_LAYER_PARAM = re.compile(r"^model\.layers\.(\d+)\.")
_LAYER_STATE = re.compile(r"^layers\.(\d+)\.")
_SHARED_LOCS = ("model.rotary",)  # helpers called from inside layers


def layer_kinds(config: Any) -> list[tuple[str, str]]:
    return list(zip(config.layer_types, config.mlp_layer_types, strict=True))


def proxy_plan(config: Any) -> tuple[Any, list[int]] | None:
    """(proxy config with one layer per kind, proxy layer index of each real layer), or None when
    every layer is its own kind (nothing to save)."""
    kinds = layer_kinds(config)
    distinct = list(dict.fromkeys(kinds))
    if len(distinct) == len(kinds):
        return None
    proxy = dataclasses.replace(config, num_hidden_layers=len(distinct),
                                layer_types=[k[0] for k in distinct], mlp_layer_types=[k[1] for k in distinct])
    return proxy, [distinct.index(k) for k in kinds]


def _layer_of(loc: str | None) -> int | None:
    if not loc:
        return None
    m = _LAYER_LOC.match(loc)
    return int(m.group(1)) if m else None


def _segments(graph: Graph, n_layers: int) -> list[tuple[int, int]]:
    """[prologue, layer 0, ..., layer n-1, epilogue] as half-open op index ranges."""
    firsts: dict[int, int] = {}
    for i, op in enumerate(graph.ops):
        j = _layer_of(op.loc)
        if j is not None:
            firsts.setdefault(j, i)
    if sorted(firsts) != list(range(n_layers)):
        raise IRError(f"graph @{graph.name}: expected ops located in layers 0..{n_layers - 1}, found layers "
                      f"{sorted(firsts)}; cannot stitch per-kind traces (trace the whole model instead)")
    starts = [firsts[j] for j in range(n_layers)]
    if starts != sorted(starts):
        raise IRError(f"graph @{graph.name}: layers are interleaved in the traced op order; cannot stitch")
    last = starts[-1]
    epilogue = len(graph.ops)
    for i in range(last, len(graph.ops)):
        loc = graph.ops[i].loc
        if loc and _layer_of(loc) is None and not loc.startswith(_SHARED_LOCS):
            epilogue = i
            break
    bounds = [0, *starts, epilogue, len(graph.ops)]
    segs = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    for j, (a, b) in enumerate(segs[1:-1]):
        for op in graph.ops[a:b]:
            other = _layer_of(op.loc)
            if other is not None and other != j:
                raise IRError(f"graph @{graph.name}: op {op.name} at {op.loc} lies inside layer {j}'s ops; "
                              "cannot stitch per-kind traces")
    return segs


def _rename_layer(name: str, pattern: re.Pattern[str], prefix: str, i: int) -> str:
    return pattern.sub(f"{prefix}{i}.", name, count=1)


def _hoist_invariants(proxy: Graph, segs: list[list[Op]], input_layer: dict[Value, int | None]) -> None:
    """Move layer-invariant ops whose results other segments read into the prologue (in place).

    torch.export shares values that depend on no layer (symbolic sizes such as ``S - 1``, index
    ranges) between layers: the first layer computes them, later ones reuse them. Such an op
    depends only on non-layer graph inputs and other invariant values, so it may run first.
    """
    invariant: set[Value] = {v for v, j in input_layer.items() if j is None}
    for op in segs[0]:
        invariant.update(op.results)
    seg_of = {r: s for s, ops in enumerate(segs) for op in ops for r in op.results}
    inv_ops: dict[Op, int] = {}
    for s, ops in enumerate(segs[1:-1], start=1):
        for op in ops:
            if all(v in invariant for v in op.operands):
                invariant.update(op.results)
                inv_ops[op] = s
    needed: set[Op] = set()
    producer = {r: op for op in inv_ops for r in op.results}
    stack = [producer[v] for s, ops in enumerate(segs) for op in ops for v in op.operands
             if v in producer and seg_of[v] != s]
    while stack:
        op = stack.pop()
        if op in needed:
            continue
        needed.add(op)
        stack.extend(producer[v] for v in op.operands if v in producer)
    if not needed:
        return
    hoisted = [op for ops in segs[1:-1] for op in ops if op in needed]
    for s in range(1, len(segs) - 1):
        segs[s] = [op for op in segs[s] if op not in needed]
    segs[0] = segs[0] + hoisted


def stitch_graph(proxy: Graph, kind_of_layer: list[int], n_proxy_layers: int) -> Graph:
    """The real model's graph from the proxy's: real layer ``i`` copies proxy layer ``kind_of_layer[i]``."""
    input_layer: dict[Value, int | None] = {}
    for gi in proxy.inputs:
        m = (_LAYER_PARAM if gi.kind == "param" else _LAYER_STATE).match(gi.value.name)
        input_layer[gi.value] = int(m.group(1)) if m and gi.kind in ("param", "state") else None
    segs = [proxy.ops[a:b] for a, b in _segments(proxy, n_proxy_layers)]
    _hoist_invariants(proxy, segs, input_layer)
    seg_of: dict[Value, int] = {}  # defining segment: -1 graph input, 0 prologue, 1..K layers, K+1 epilogue
    for gi in proxy.inputs:
        seg_of[gi.value] = -1
    for s, ops in enumerate(segs):
        for op in ops:
            for r in op.results:
                seg_of[r] = s

    # Per proxy segment: the values it takes from the segment before (what that one hands on).
    carried_in: list[list[Value]] = [[] for _ in segs]
    for s, ops in enumerate(segs):
        seen: set[Value] = set()
        for op in ops:
            for v in op.operands:
                d = seg_of.get(v)
                if d is None:
                    raise IRError(f"graph @{proxy.name}: %{v.name} is used before it is defined")
                if d in (-1, 0) or d == s:
                    if d == -1 and s > 0 and input_layer[v] is not None and input_layer[v] != s - 1:
                        raise IRError(f"graph @{proxy.name}: layer {s - 1} reads '{v.name}' of layer {input_layer[v]}")
                    continue
                if d != s - 1:
                    raise IRError(f"graph @{proxy.name}: segment {s} reads %{v.name} from segment {d}, not from the "
                                  "one before it; cannot stitch per-kind traces")
                if v not in seen:
                    seen.add(v)
                    carried_in[s].append(v)
    for s in range(2, len(segs)):
        order = {r: i for i, r in enumerate(r for op in segs[s - 1] for r in op.results)}
        carried_in[s].sort(key=order.__getitem__)
    # The first layer reads its residual streams straight from the prologue, next to shared
    # prologue values (positions, sizes): they are the prologue values of the types it hands on.
    used_by_first = list(dict.fromkeys(v for op in segs[1] for v in op.operands if seg_of.get(v) == 0))
    for v in carried_in[2]:
        cands = [u for u in used_by_first if str(u.type) == str(v.type)]
        if len(cands) != 1:
            raise IRError(f"graph @{proxy.name}: cannot tell which prologue value feeds the first layer's "
                          f"{v.type} stream ({len(cands)} candidates); cannot stitch per-kind traces")
        carried_in[1].append(cands[0])
    for name, v in proxy.outputs:
        if 1 <= seg_of.get(v, -1) <= n_proxy_layers and not _LAYER_STATE.match(name):
            raise IRError(f"graph @{proxy.name}: output '{name}' is computed inside a layer but is not that "
                          "layer's state; cannot stitch")

    n_real = len(kind_of_layer)
    new_ops: list[Op] = []
    env: dict[Value, Value] = {}
    new_inputs: dict[str, GraphInput] = {}
    inputs_by_key: list[tuple[tuple[int, int, int], GraphInput]] = []
    kind_rank = {k: i for i, k in enumerate(dict.fromkeys(gi.kind for gi in proxy.inputs))}
    proxy_pos = {gi.value: i for i, gi in enumerate(proxy.inputs)}
    first_layer_input = min((proxy_pos[v] for v, j in input_layer.items() if j is not None), default=0)

    def graph_input(v: Value, layer: int | None) -> Value:
        gi = next(g for g in proxy.inputs if g.value is v)
        if layer is None or input_layer[v] is None:
            if v.name not in new_inputs:
                new_inputs[v.name] = gi
                where = -1 if proxy_pos[v] < first_layer_input else n_real
                inputs_by_key.append(((kind_rank[gi.kind], where, proxy_pos[v]), gi))
            return v
        pattern, prefix = (_LAYER_PARAM, "model.layers.") if gi.kind == "param" else (_LAYER_STATE, "layers.")
        name = _rename_layer(v.name, pattern, prefix, layer)
        if name not in new_inputs:
            nv = Value(name, v.type)
            new_inputs[name] = GraphInput(gi.kind, nv)
            inputs_by_key.append(((kind_rank[gi.kind], layer, proxy_pos[v]), new_inputs[name]))
        return new_inputs[name].value

    def copy_segment(s: int, layer: int | None, incoming: list[Value]) -> list[Value]:
        local: dict[Value, Value] = dict(zip(carried_in[s], incoming, strict=True))

        def resolve(v: Value) -> Value:
            if v in local:
                return local[v]
            if seg_of[v] == -1:
                j = input_layer[v]
                if j is None:
                    return graph_input(v, None)
                # the prologue may read a layer's input (e.g. the batch size from its state):
                # the first real layer of that kind has it too
                return graph_input(v, layer if layer is not None else kind_of_layer.index(j))
            return env[v]  # prologue value

        for op in segs[s]:
            results = tuple(Value(v.name if layer is None else f"L{layer}_{v.name}", v.type) for v in op.results)
            loc = op.loc
            if layer is not None and loc and _layer_of(loc) is not None:
                loc = _LAYER_LOC.sub(f"model.layers.{layer}\\2", loc, count=1)
            new_ops.append(Op(op.name, map_values(op.args, resolve), map_values(op.kwargs, resolve), results, loc))
            for old, new in zip(op.results, results, strict=True):
                local[old] = new
        if layer is None:
            env.update(local)
        else:
            for n, v in proxy.outputs:
                m = _LAYER_STATE.match(n)
                if m and int(m.group(1)) == s - 1:
                    layer_outputs.append((_rename_layer(n, _LAYER_STATE, "layers.", layer), resolve(v)))
        return [local[v] for v in carried_in[s + 1]] if s + 1 < len(segs) else []

    layer_outputs: list[tuple[str, Value]] = []
    carried = copy_segment(0, None, [])
    for i, k in enumerate(kind_of_layer):
        s = k + 1
        if len(carried) != len(carried_in[s]) or any(str(x.type) != str(y.type) for x, y in zip(carried, carried_in[s],
                                                                                                   strict=False)):
            raise IRError(f"graph @{proxy.name}: layer {i} (kind of proxy layer {k}) takes "
                          f"{[str(v.type) for v in carried_in[s]]} but the layer before gives "
                          f"{[str(v.type) for v in carried]}; cannot stitch")
        carried = copy_segment(s, i, carried)
    epi = len(segs) - 1
    if len(carried) != len(carried_in[epi]):
        raise IRError(f"graph @{proxy.name}: the epilogue takes {len(carried_in[epi])} values, the last layer gives "
                      f"{len(carried)}")
    copy_segment(epi, None, carried)
    final = {v: env[v] for v in env}
    outs: list[tuple[str, Value]] = []
    for name, v in proxy.outputs:
        if _LAYER_STATE.match(name):
            continue
        if seg_of.get(v) == -1:
            outs.append((name, graph_input(v, None)))
        else:
            outs.append((name, final[v]))
    outs += layer_outputs
    inputs = [gi for _, gi in sorted(inputs_by_key, key=lambda t: t[0])]
    # graph inputs never read (possible in the proxy) keep their place too
    return Graph(proxy.name, inputs, new_ops, outs, dict(proxy.constants))


__all__ = ["layer_kinds", "proxy_plan", "stitch_graph"]
