"""Declarative patterns over the IR, and a rewrite driver.

Patterns are small trees (tinygrad's UPat, TVM's dataflow patterns):

    x = Wild("x")
    rms = Op("aten.mul.Tensor", x, Op("aten.rsqrt.default",
              Op("aten.add.Tensor", Op("aten.mean.dim", Op("aten.pow.Tensor_Scalar", x, 2), [-1], True),
                 Lit(capture="eps"))))

- ``Wild(name)`` matches any value (a wildcard used twice must bind the same value);
- ``Lit(value | predicate, capture=)`` matches a literal argument;
- ``Op(names, *args, commutative=, capture=, **kwargs)`` matches a value produced by one of the ops
  ``names`` with matching arguments (commutative ops try both operand orders);
- ``Maybe(names, inner)`` matches ``inner`` seen through an optional op (a cast, a view);
- ``Alt(*pats)`` matches any one of several patterns.

``pattern_from_function`` builds a pattern by tracing a PyTorch function (Inductor's idea): the
pattern and its reference computation cannot disagree. ``rewrite_graph`` applies rules anchored at
their root op name, in one forward walk, so matching stays linear in the graph size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ds4c.ir.graph import Graph, Value, map_values, replace_uses
from ds4c.ir.registry import has_trait
from ds4c.ir.types import ScalarType, TensorType


class Pat:
    capture: str | None = None


@dataclass(eq=False)
class Wild(Pat):
    capture: str | None = None
    where: Callable[[Any], bool] | None = None  # extra constraint on the bound object
    literals: bool = False  # may also bind a literal argument

    def __repr__(self) -> str:
        return f"Wild({self.capture})"


@dataclass(eq=False)
class Lit(Pat):
    value: Any = None
    predicate: Callable[[Any], bool] | None = None
    capture: str | None = None

    def accepts(self, obj: Any) -> bool:
        if isinstance(obj, Value):
            return False
        if self.predicate is not None:
            return bool(self.predicate(obj))
        if self.value is None and self.capture is not None:
            return True
        return _lit_eq(obj, self.value)


def _lit_eq(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_lit_eq(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return type(a) is type(b) and a == b or (isinstance(a, int | float) and isinstance(b, int | float)
                                              and not isinstance(a, bool) and not isinstance(b, bool) and a == b)


@dataclass(eq=False)
class Op(Pat):
    names: frozenset[str]
    args: tuple
    kwargs: dict[str, Any]
    capture: str | None = None
    commutative: bool = False
    result_index: int = 0
    kwargs_exact: bool = False  # otherwise unmentioned kwargs of the op may have any value

    def __init__(self, names: str | Iterable[str], *args: Any, capture: str | None = None, commutative: bool = False,
                 result_index: int = 0, kwargs_exact: bool = False, **kwargs: Any):
        self.names = frozenset([names] if isinstance(names, str) else names)
        self.args = args
        self.kwargs = kwargs
        self.capture = capture
        self.commutative = commutative
        self.result_index = result_index
        self.kwargs_exact = kwargs_exact

    def __repr__(self) -> str:
        return f"Op({'|'.join(sorted(self.names))})"


@dataclass(eq=False)
class Maybe(Pat):
    names: frozenset[str]
    inner: Pat
    capture: str | None = None

    def __init__(self, names: str | Iterable[str], inner: Pat, capture: str | None = None):
        self.names = frozenset([names] if isinstance(names, str) else names)
        self.inner = inner
        self.capture = capture


@dataclass(eq=False)
class Alt(Pat):
    options: tuple[Pat, ...]
    capture: str | None = None

    def __init__(self, *options: Pat, capture: str | None = None):
        self.options = options
        self.capture = capture


@dataclass
class Match:
    root: Value
    captures: dict[str, Any] = field(default_factory=dict)
    ops: list[Any] = field(default_factory=list)  # ir Ops matched, root op last
    producers: dict[Value, Any] = field(default_factory=dict, repr=False)  # of the whole graph, for builders

    def __getitem__(self, name: str) -> Any:
        return self.captures[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.captures.get(name, default)


class Matcher:
    """Matches patterns against values of one graph (producers computed once)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.producers = graph.producers()
        # (pattern, value) -> what matching it alone binds, or None. Matching is compositional
        # (sub-results merge if their captures agree), so a pattern node that occurs many times
        # in a pattern tree (Sinkhorn's nested normalisations) is matched once per value: linear.
        self._memo: dict[tuple[int, int], tuple[dict, list] | None] = {}

    def match(self, pat: Pat, value: Value) -> Match | None:
        m = Match(value, producers=self.producers)
        state = (m.captures, m.ops)
        got = self._match(pat, value, state)
        if got is None:
            return None
        m.captures, m.ops = got
        return m

    def _bind(self, pat: Pat, obj: Any, state: tuple[dict, list]) -> tuple[dict, list] | None:
        caps, ops = state
        if pat.capture is None:
            return state
        if pat.capture in caps:
            prev = caps[pat.capture]
            same = prev is obj if isinstance(obj, Value) or isinstance(prev, Value) else _lit_eq(prev, obj)
            return state if same else None
        caps = dict(caps)
        caps[pat.capture] = obj
        return caps, ops

    def _match(self, pat: Any, obj: Any, state: tuple[dict, list]) -> tuple[dict, list] | None:
        if isinstance(pat, Op | Maybe | Alt) and isinstance(obj, Value):
            key = (id(pat), id(obj))
            if key not in self._memo:
                self._memo[key] = self._match_raw(pat, obj, ({}, []))
            got = self._memo[key]
            if got is None:
                return None
            caps, ops = state
            merged = None
            for k, v in got[0].items():
                if k in caps:
                    prev = caps[k]
                    same = prev is v if isinstance(v, Value) or isinstance(prev, Value) else _lit_eq(prev, v)
                    if not same:
                        # The unconstrained match chose other alternatives (Maybe/Alt) than these
                        # bindings allow: match again under them. (Failure unconstrained is final.)
                        return self._match_raw(pat, obj, state)
                else:
                    if merged is None:
                        merged = dict(caps)
                    merged[k] = v
            seen = {id(o) for o in ops}
            return (merged if merged is not None else caps), ops + [o for o in got[1] if id(o) not in seen]
        return self._match_raw(pat, obj, state)

    def _match_raw(self, pat: Any, obj: Any, state: tuple[dict, list]) -> tuple[dict, list] | None:
        if not isinstance(pat, Pat):
            # a plain literal (or list of sub-patterns) in a pattern's argument list
            if isinstance(pat, list | tuple):
                if not isinstance(obj, list | tuple) or len(obj) != len(pat):
                    return None
                for p, o in zip(pat, obj, strict=True):
                    state = self._match(p, o, state)
                    if state is None:
                        return None
                return state
            return state if not isinstance(obj, Value) and _lit_eq(obj, pat) else None
        if isinstance(pat, Wild):
            if not isinstance(obj, Value) and not pat.literals:
                return None
            if pat.where is not None and not pat.where(obj):
                return None
            return self._bind(pat, obj, state)
        if isinstance(pat, Lit):
            return self._bind(pat, obj, state) if pat.accepts(obj) else None
        if isinstance(pat, Alt):
            for opt in pat.options:
                got = self._match(opt, obj, state)
                if got is not None:
                    return self._bind(pat, obj, got)
            return None
        if isinstance(pat, Maybe):
            if isinstance(obj, Value):
                op = self.producers.get(obj)
                if op is not None and op.name in pat.names and op.args and isinstance(op.args[0], Value):
                    got = self._match(pat.inner, op.args[0], state)
                    if got is not None:
                        caps, ops = got
                        return self._bind(pat, obj, (caps, ops + [op]))
            got = self._match(pat.inner, obj, state)
            return None if got is None else self._bind(pat, obj, got)
        if isinstance(pat, Op):
            if not isinstance(obj, Value):
                return None
            op = self.producers.get(obj)
            if op is None or op.name not in pat.names or len(op.results) <= pat.result_index \
                    or op.results[pat.result_index] is not obj:
                return None
            orders = [op.args]
            if pat.commutative and len(op.args) >= 2:
                orders.append((op.args[1], op.args[0], *op.args[2:]))
            for args in orders:
                got = self._match_call(pat, op, args, state)
                if got is not None:
                    caps, ops = got
                    return self._bind(pat, obj, (caps, ops + [op]))
            return None
        raise TypeError(f"not a pattern: {pat!r}")

    def _match_call(self, pat: Op, op: Any, args: Sequence[Any], state: tuple[dict, list]) -> tuple[dict, list] | None:
        if len(args) < len(pat.args):
            return None
        if len(args) > len(pat.args) and not pat.kwargs_exact:
            pass  # trailing positional args beyond the pattern are ignored only if the pattern says nothing
        if len(args) != len(pat.args):
            return None
        for p, a in zip(pat.args, args, strict=True):
            state = self._match(p, a, state)
            if state is None:
                return None
        if pat.kwargs_exact and set(op.kwargs) != set(pat.kwargs):
            return None
        for k, p in pat.kwargs.items():
            if k not in op.kwargs:
                return None
            state = self._match(p, op.kwargs[k], state)
            if state is None:
                return None
        return state


@dataclass
class Rewrite:
    """A rule: ``pattern`` anchored at its root; ``build(match, b)`` emits replacement ops, returns new values.

    ``check(match)`` may veto a structural match (semantic constraints: shapes, dtypes, counts).
    """

    name: str
    pattern: Pat
    build: Callable[[Match, Builder], Value | Sequence[Value]]
    check: Callable[[Match], bool] | None = None

    def root_names(self) -> frozenset[str] | None:
        p = self.pattern
        if isinstance(p, Alt) and all(isinstance(o, Op) for o in p.options):
            return frozenset().union(*(o.names for o in p.options))
        if isinstance(p, Op):
            return p.names
        return None


class Builder:
    """Emits new ops at the position of the op being replaced."""

    def __init__(self, taken: set[str], loc: str | None):
        self.taken = taken
        self.ops: list[Any] = []
        self.loc = loc

    def fresh(self, base: str) -> str:
        cand, i = base, 1
        while cand in self.taken:
            cand = f"{base}_{i}"
            i += 1
        self.taken.add(cand)
        return cand

    def op(self, name: str, args: Sequence[Any], kwargs: dict[str, Any] | None, result_types: Sequence[Any],
           base: str | None = None) -> tuple[Value, ...]:
        from ds4c.ir.graph import Op as IROp

        base = base or name.split(".")[-1]
        results = tuple(Value(self.fresh(base), t) for t in result_types)
        self.ops.append(IROp(name, tuple(args), dict(kwargs or {}), results, self.loc))
        return results


def rewrite_graph(graph: Graph, rules: Sequence[Rewrite], *, budget: Callable[[str, Match], bool] | None = None,
                  fired: dict[str, int] | None = None) -> Graph:
    """Apply ``rules`` once over the graph, visiting ops in order; a match's inner ops must not be used
    outside it (so nothing is computed twice), except views (free to keep: CSE makes one
    ``reshape(%input_ids, [-1])`` serve every hash-routed MoE layer). ``budget(rule, match)`` may
    refuse individual rewrites (used by bisection). Returns the rewritten graph; dead ops are left to DCE.
    """
    by_root: dict[str, list[Rewrite]] = {}
    anywhere: list[Rewrite] = []
    for r in rules:
        names = r.root_names()
        if names is None:
            anywhere.append(r)
        else:
            for n in names:
                by_root.setdefault(n, []).append(r)
    matcher = Matcher(graph)
    users = graph.users()
    outputs = set(graph.output_values())
    taken = graph.value_names()
    removed: set[int] = set()
    inserted: dict[int, list[Any]] = {}
    mapping: dict[Value, Value] = {}
    for op in reversed(graph.ops):  # roots late in the graph first: largest patterns win
        if id(op) in removed:
            continue
        for rule in by_root.get(op.name, []) + anywhere:
            for res in op.results:
                m = matcher.match(rule.pattern, res)
                if m is None or any(id(o) in removed for o in m.ops):
                    continue
                kept = _shared_views(m, op, users, outputs)
                if kept is None:
                    continue
                inner = {id(o) for o in m.ops if o is not op and id(o) not in kept}
                if rule.check is not None and not rule.check(m):
                    continue
                if budget is not None and not budget(rule.name, m):
                    continue
                b = Builder(taken, op.loc)
                new = rule.build(m, b)
                new_vals = [new] if isinstance(new, Value) else list(new)
                roots = [res] if len(new_vals) == 1 else list(op.results)
                for old, nv in zip(roots, new_vals, strict=True):
                    mapping[old] = nv
                inserted[id(op)] = b.ops
                removed.add(id(op))
                removed.update(inner)
                if fired is not None:
                    fired[rule.name] = fired.get(rule.name, 0) + 1
                break
            if id(op) in removed:
                break
    return _assemble(graph, inserted, removed, mapping)


def _assemble(graph: Graph, inserted: dict[int, list[Any]], removed: set[int], mapping: dict[Value, Value]) -> Graph:
    """The graph with new ops placed before the op they were anchored at, removed ops dropped, uses remapped."""
    ops = []
    for op in graph.ops:
        if id(op) in inserted:
            ops.extend(inserted[id(op)])
        if id(op) not in removed:
            ops.append(op)
    return replace_uses(graph.copy(ops=ops), mapping)


def apply_rules(graph: Graph, ctx: Any, rules: Sequence[Rewrite]) -> Graph:
    """Run ``rules`` through the PassContext's rewrite budget; count what fired in ``program_attrs['fusion']``."""
    fired: dict[str, int] = {}
    out = rewrite_graph(graph, rules, budget=lambda rule, m: ctx.allow_rewrite(f"{rule} at %{m.root.name}"),
                        fired=fired)
    record_fusion(ctx, graph.name, fired)
    return out


def record_fusion(ctx: Any, graph_name: str, fired: dict[str, int]) -> None:
    stats = ctx.program_attrs.setdefault("fusion", {}).setdefault(graph_name, {})
    for k, v in fired.items():
        stats[k] = stats.get(k, 0) + v


def _shared_views(m: Match, root: Any, users: dict[Value, list[Any]], outputs: set[Value]) -> set[int] | None:
    """The inner ops of ``m`` to keep because something outside the match uses them, or None when
    the match cannot be rewritten. Only views may be kept (they compute nothing), and only views of
    values that stay (graph inputs, ops outside the match, other kept views)."""
    from ds4c.passes.pattern_lib import VIEWS

    matched = {id(o) for o in m.ops}
    escaping = [o for o in m.ops if o is not root
                and any(r in outputs or any(id(u) not in matched for u in users.get(r, [])) for r in o.results)]
    kept: set[int] = set()
    while escaping:  # a kept view keeps the matched views it reads
        o = escaping.pop()
        if id(o) in kept:
            continue
        if o.name not in VIEWS:
            return None
        kept.add(id(o))
        escaping.extend(p for a in o.operands if (p := m.producers.get(a)) is not None and id(p) in matched)
    return kept


# -- patterns from traced reference code ----------------------------------------------------------



def pattern_from_graph(graph: Graph, *, output: str | None = None, captures: dict[str, Callable[[Any], bool]] | None = None,
                       optional_casts: bool = True) -> Pat:
    """Convert a traced graph into a pattern rooted at one output.

    Graph inputs become wildcards named after the inputs; scalar (size) values become unnamed
    wildcards, since shapes differ between the pattern and real graphs; literals must match
    exactly unless ``captures`` names an op result whose literal arguments are free. Casts become
    optional, adds and multiplies commutative.
    """
    producers = graph.producers()
    inputs = {i.value: i.value.name for i in graph.inputs}
    memo: dict[Value, Pat] = {}

    def conv_arg(a: Any) -> Any:
        if isinstance(a, Value):
            return conv(a)
        if isinstance(a, list):
            return [conv_arg(x) for x in a]
        return a

    def conv(v: Value) -> Pat:
        if v in memo:
            return memo[v]
        if v in inputs:
            p: Pat = Wild(inputs[v], literals=isinstance(v.type, ScalarType))
        elif isinstance(v.type, ScalarType):
            p = Wild(None, literals=True)
        else:
            op = producers[v]
            if optional_casts and has_trait(op.name, "cast") and set(op.kwargs) <= {"dtype"}:
                p = Maybe(op.name, conv(op.args[0]))
            else:
                args = tuple(conv_arg(a) for a in op.args)
                kwargs = {k: conv_arg(x) for k, x in op.kwargs.items() if k not in ("device", "pin_memory", "layout")}
                p = Op(op.name, *args, commutative=has_trait(op.name, "commutative"), result_index=op.results.index(v),
                       **kwargs)
        memo[v] = p
        return p

    name, root = graph.outputs[0] if output is None else next((n, v) for n, v in graph.outputs if n == output)
    del name
    return conv(root)


def trace_function(fn: Callable[..., Any], example_args: Sequence[Any], names: Sequence[str]) -> Graph:
    """Trace a PyTorch function into IR (the way patterns and references are made from one source)."""
    import torch

    from ds4c.frontend.fx_import import import_exported_program

    class _Fn(torch.nn.Module):
        def forward(self, *args: Any) -> Any:
            return fn(*args)

    ep = torch.export.export(_Fn(), tuple(example_args), strict=False)
    return import_exported_program(ep, getattr(fn, "__name__", "pattern"), input_names=list(names))


def pattern_from_function(fn: Callable[..., Any], example_args: Sequence[Any], names: Sequence[str], **kw: Any) -> Pat:
    return pattern_from_graph(trace_function(fn, example_args, names), **kw)


def literal_args(obj: Any) -> Any:
    """Values in an args structure replaced by None: handy in checks that only care about literals."""
    return map_values(obj, lambda v: None)


__all__ = ["Alt", "Builder", "Lit", "Match", "Matcher", "Maybe", "Op", "Pat", "Rewrite", "Wild", "literal_args",
           "pattern_from_function", "pattern_from_graph", "rewrite_graph", "trace_function", "TensorType"]


# -- multi-root rewrites ---------------------------------------------------------------------------

@dataclass
class Region:
    """A rewrite with several roots: ``matches`` together are replaced by ``new_ops``.

    ``mapping`` sends each root value to its replacement; new ops are inserted before the earliest
    matched op that is a root, so every operand they read is already defined.
    """

    matches: list[Match]
    new_ops: list[Any]
    mapping: dict[Value, Value]


def self_contained_union(matches: Sequence[Match], roots: set[Value], users: dict[Value, list[Any]],
                         outputs: set[Value]) -> bool:
    matched = {id(o) for m in matches for o in m.ops}
    for m in matches:
        for o in m.ops:
            for r in o.results:
                if r in roots:
                    continue
                if r in outputs or any(id(u) not in matched for u in users.get(r, [])):
                    return False
    return True


def apply_regions(graph: Graph, regions: Sequence[Region]) -> Graph:
    removed: set[int] = set()
    inserted: dict[int, list[Any]] = {}
    mapping: dict[Value, Value] = {}
    position = {id(op): i for i, op in enumerate(graph.ops)}
    for reg in regions:
        ops = {id(o): o for m in reg.matches for o in m.ops}
        if any(k in removed for k in ops):
            continue
        root_ops = [o for o in ops.values() if any(r in reg.mapping for r in o.results)]
        first = min(root_ops, key=lambda o: position[id(o)])
        inserted.setdefault(id(first), []).extend(reg.new_ops)
        removed.update(ops)
        mapping.update(reg.mapping)
    return _assemble(graph, inserted, removed, mapping)
