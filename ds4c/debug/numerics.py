"""Find the first pass, and the first op in it, that changed the numbers.

Every graph of the pipeline runs on the same inputs through the reference backend. The first
stage whose outputs differ from the traced graph beyond the tolerance names the pass; then its
values are compared by name with the stage before it, and the culprit is the earliest op the pass
introduced upstream of the first mismatching value (or that op itself when the pass introduced
none). Ops that only move data (views, transposes, copies) which a pass re-pointed at another
operand are left out of the by-name comparison: they hold other values under their old names by
design (``fuse_norm_rope`` moves a key's view before the fused norm), and would be blamed instead
of the rewrite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ds4c.debug.trace import CompileTrace
from ds4c.errors import InputError
from ds4c.ir.graph import Graph, Op, Value
from ds4c.ir.interpreter import ReferenceExecutor
from ds4c.ir.printer import format_op
from ds4c.ir.registry import get_op, is_registered

# Traits of ops that compute nothing: their result is their operand's elements, moved or viewed.
_MOVES_DATA = frozenset({"view", "reshape", "identity", "copy_if_needed", "broadcast", "layout"})


@dataclass
class Divergence:
    pass_name: str
    graph: str
    op_index: int
    op: str  # the op's IR line
    value: str
    max_abs_error: float
    tolerance: float
    loc: str | None
    output_errors: dict[str, float]

    def __str__(self) -> str:
        where = f" ({self.loc})" if self.loc else ""
        return (f"first divergence: pass '{self.pass_name}' on @{self.graph}, op #{self.op_index}{where}:\n"
                f"  {self.op}\n  value %{self.value} max abs error {self.max_abs_error:.3g} > tolerance "
                f"{self.tolerance:g}; outputs: " + ", ".join(f"{k}={v:.3g}" for k, v in self.output_errors.items()))


def _err(a: Any, b: Any) -> float:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return float("inf")
        if a.numel() == 0:
            return 0.0
        a64, b64 = a.double(), b.double()
        both_inf = torch.isinf(a64) & torch.isinf(b64) & (torch.sign(a64) == torch.sign(b64))
        d = (a64 - b64).abs().masked_fill(both_inf, 0.0)
        d = torch.nan_to_num(d, nan=float("inf"))
        return float(d.max())
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(float(a) - float(b))
    return 0.0 if a == b else float("inf")


def run_capturing(graph: Graph, inputs: Mapping[str, Any], params: Mapping[str, torch.Tensor],
                  state: Mapping[str, torch.Tensor] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a graph keeping every intermediate value by name; returns (outputs, values)."""
    values: dict[str, Any] = {}

    def keep(i: int, op: Op, outs: list[Any]) -> None:
        for r, o in zip(op.results, outs, strict=True):
            values[r.name] = o.detach().clone() if isinstance(o, torch.Tensor) else o

    outputs = ReferenceExecutor(graph, "cpu", on_op=keep).run(inputs, params, state)
    return outputs, values


def _moves_data(op: Op) -> bool:
    return is_registered(op.name) and bool(_MOVES_DATA & set(get_op(op.name).traits))


def moved_values(before: Graph, after: Graph) -> set[str]:
    """Names of the values that ``after`` defines as ``before`` does but over other data: results of
    ops that only move data whose data operand (the first) a pass changed, and of such ops after
    them. (A norm moved after its layout ops leaves them holding the un-normalised rows.)"""
    defined = {r.name: op for op in before.ops for r in op.results}
    moved: set[str] = set()
    for op in after.ops:
        old = defined.get(op.results[0].name) if op.results else None
        if old is None or not _moves_data(op) or not op.args or not isinstance(op.args[0], Value):
            continue
        data, old_data = op.args[0], old.args[0] if old.args else None
        if not isinstance(old_data, Value) or data.name != old_data.name or data.name in moved:
            moved.update(r.name for r in op.results)
    return moved


@dataclass(frozen=True)
class Feed:
    """What one graph runs on: its inputs, weights and (for decode) state."""

    inputs: Mapping[str, Any]
    params: Mapping[str, torch.Tensor]
    state: Mapping[str, torch.Tensor] | None = None


def locate_op(before: Graph, after: Graph, inputs: Mapping[str, Any], params: Mapping[str, torch.Tensor],
              state: Mapping[str, torch.Tensor] | None, atol: float, *, after_feed: Feed | None = None,
              comparable_only: bool = False) -> tuple[int, Op, str, float] | None:
    """The op of ``after`` that introduced the difference from ``before``: (index, op, value, error).

    ``after_feed``: what ``after`` runs on, when not what ``before`` does (two artifacts of one model
    at different precisions hold different weights). ``comparable_only``: values of different
    shapes (a state sized by another context length) are skipped rather than counted as different.
    """
    feed = after_feed or Feed(inputs, params, state)
    _, vals_a = run_capturing(before, inputs, params, state)
    outs_b, vals_b = run_capturing(after, feed.inputs, feed.params, feed.state)
    names_before = set(vals_a)
    for name in moved_values(before, after):
        vals_a.pop(name, None)
        vals_b.pop(name, None)
    if comparable_only:
        for name in [n for n in vals_a if n in vals_b and not comparable(vals_a[n], vals_b[n])]:
            del vals_a[name], vals_b[name]
    producers = after.producers()
    index = {id(op): i for i, op in enumerate(after.ops)}
    new_ops = {id(op) for op in after.ops if any(r.name not in names_before for r in op.results)}

    def earliest_new_ancestor(v: Value) -> Op | None:
        best: Op | None = None
        stack, seen = [v], set()
        while stack:
            x = stack.pop()
            if x in seen:
                continue
            seen.add(x)
            op = producers.get(x)
            if op is None:
                continue
            if id(op) in new_ops:
                if best is None or index[id(op)] < index[id(best)]:
                    best = op
            # stop at values that exist before and match: they are clean
            for o in op.operands:
                if o.name in vals_a and o.name in vals_b and _err(vals_a[o.name], vals_b[o.name]) <= atol:
                    continue
                stack.append(o)
        return best

    for op in after.ops:
        for r in op.results:
            if r.name in vals_a and r.name in vals_b:
                e = _err(vals_a[r.name], vals_b[r.name])
                if e > atol:
                    culprit = earliest_new_ancestor(r) if id(op) not in new_ops else op
                    culprit = culprit or op
                    cr = culprit.results[0]
                    return index[id(culprit)], culprit, cr.name, e
    # no shared intermediate differs: blame the earliest new op feeding a differing output
    ref_outs = {n: vals_a.get(v.name) for n, v in before.outputs}
    for (name, v) in after.outputs:
        if name in ref_outs and ref_outs[name] is not None and (not comparable_only
                                                                or comparable(ref_outs[name], outs_b[name])):
            e = _err(ref_outs[name], outs_b[name])
            if e > atol:
                culprit = earliest_new_ancestor(v)
                if culprit is not None:
                    return index[id(culprit)], culprit, culprit.results[0].name, e
    return None


def comparable(a: Any, b: Any) -> bool:
    """Whether two values can be compared element by element (tensors: the same shape)."""
    return not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape)


def output_errors(a: Mapping[str, Any], b: Mapping[str, Any], comparable_only: bool = False) -> dict[str, float]:
    return {k: _err(a[k], b[k]) for k in a if k in b and (not comparable_only or comparable(a[k], b[k]))}


def find_divergence(trace: CompileTrace, inputs: Mapping[str, Any], params: Mapping[str, torch.Tensor], *,
                    graph: str = "prefill", state: Mapping[str, torch.Tensor] | None = None,
                    atol: float = 1e-4) -> Divergence | None:
    """Name the first pass (and op) whose graph's outputs differ from the traced graph by more than ``atol``."""
    stages = trace.stages(graph)
    if not stages:
        raise InputError(f"the trace holds no graph @{graph}; choose one of its graphs: "
                         f"{', '.join(trace.graph_names) or 'none (no pass ran)'}")
    reference, _ = run_capturing(stages[0].graph, inputs, params, state)
    for i in range(1, len(stages)):
        outs, _ = run_capturing(stages[i].graph, inputs, params, state)
        errs = output_errors(reference, outs)
        if max(errs.values(), default=0.0) > atol:
            found = locate_op(stages[i - 1].graph, stages[i].graph, inputs, params, state, atol)
            if found is None:
                return Divergence(stages[i].pass_name, graph, -1, "(no single op found)", "", max(errs.values()),
                                  atol, None, errs)
            idx, op, value, e = found
            return Divergence(stages[i].pass_name, graph, idx, format_op(op), value, e, atol, op.loc, errs)
    return None


def compare_graphs(a: Graph, b: Graph, inputs: Mapping[str, Any], params: Mapping[str, torch.Tensor],
                   state: Mapping[str, torch.Tensor] | None = None, atol: float = 1e-4,
                   label: str = "second artifact", *, b_feed: Feed | None = None,
                   comparable_only: bool = False) -> Divergence | None:
    """Two graphs of one entry point side by side (e.g. two artifacts). ``b_feed``: what ``b`` runs
    on when it is not what ``a`` does; ``comparable_only``: outputs and values of different shapes
    are left out of the comparison (see ``locate_op``)."""
    feed = b_feed or Feed(inputs, params, state)
    oa, _ = run_capturing(a, inputs, params, state)
    ob, _ = run_capturing(b, feed.inputs, feed.params, feed.state)
    errs = output_errors(oa, ob, comparable_only)
    if max(errs.values(), default=0.0) <= atol:
        return None
    found = locate_op(a, b, inputs, params, state, atol, after_feed=feed, comparable_only=comparable_only)
    if found is None:
        return Divergence(label, b.name, -1, "(no single op found)", "", max(errs.values()), atol, None, errs)
    idx, op, value, e = found
    return Divergence(label, b.name, idx, format_op(op), value, e, atol, op.loc, errs)


def bisect_rewrites(compile_with_limit: Callable[[int | None], tuple[int, bool]]) -> tuple[int | None, int]:
    """Binary search for the first bad rewrite.

    ``compile_with_limit(N)`` compiles allowing only the first N rewrites (None: all) and returns
    (rewrites attempted, good?). Returns (index of the first bad rewrite or None, compiles run).
    """
    total, good = compile_with_limit(None)
    runs = 1
    if good:
        return None, runs
    lo, hi = 0, total  # invariant: limit lo is good (assumed for 0), limit hi is bad
    while hi - lo > 1:
        mid = (lo + hi) // 2
        _, ok = compile_with_limit(mid)
        runs += 1
        if ok:
            lo = mid
        else:
            hi = mid
    return hi - 1, runs


__all__ = ["Divergence", "Feed", "bisect_rewrites", "comparable", "compare_graphs", "find_divergence", "locate_op",
           "run_capturing", "Sequence"]
