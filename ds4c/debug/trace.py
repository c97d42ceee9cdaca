"""``CompileTrace``: the IR after every pass, with timings and diffs, for Python and notebooks.

    trace = CompileTrace()
    art = ds4c.compile("tiny", target="b200", instruments=[trace])
    trace                          # in a notebook: the pipeline as a table, IR per pass, diffs
    trace.ir("fold_constants")     # IR text after a pass
    trace.diff("cse")              # unified diff of what a pass changed
"""

from __future__ import annotations

import difflib
import html
import re
from dataclasses import dataclass

from ds4c.inspect import layer_of
from ds4c.ir.graph import Graph, Program
from ds4c.ir.printer import format_op, format_signature, print_graph
from ds4c.passes.manager import Instrument


@dataclass
class Snapshot:
    pass_name: str  # "input" for the traced graph
    graph_name: str
    graph: Graph
    seconds: float

    @property
    def text(self) -> str:
        return print_graph(self.graph)


class CompileTrace(Instrument):
    def __init__(self) -> None:
        self.snapshots: list[Snapshot] = []

    def run_before_pass(self, pass_name: str, graph: Graph) -> None:
        if not any(s.graph_name == graph.name for s in self.snapshots):
            self.snapshots.append(Snapshot("input", graph.name, graph, 0.0))

    def run_after_pass(self, pass_name: str, before: Graph, after: Graph, seconds: float) -> None:
        self.snapshots.append(Snapshot(pass_name, after.name, after, seconds))

    def run_after_pipeline(self, program: Program) -> None:
        pass

    # -- queries --------------------------------------------------------------------------------
    @property
    def graph_names(self) -> list[str]:
        return list(dict.fromkeys(s.graph_name for s in self.snapshots))

    @property
    def pass_names(self) -> list[str]:
        return list(dict.fromkeys(s.pass_name for s in self.snapshots))

    def stages(self, graph: str = "prefill") -> list[Snapshot]:
        return [s for s in self.snapshots if s.graph_name == graph]

    def graph_after(self, pass_name: str, graph: str = "prefill") -> Graph:
        found = [s for s in self.stages(graph) if s.pass_name == pass_name]
        if not found:
            raise KeyError(f"no pass '{pass_name}' ran on @{graph}; passes: {self.pass_names}")
        return found[-1].graph

    def ir(self, pass_name: str, graph: str = "prefill") -> str:
        return print_graph(self.graph_after(pass_name, graph))

    def diff(self, pass_name: str, graph: str = "prefill") -> str:
        stages = self.stages(graph)
        for i, s in enumerate(stages):
            if s.pass_name == pass_name and i > 0:
                a, b = stages[i - 1].text, s.text
                return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True),
                                                    f"before {pass_name}", f"after {pass_name}"))
        raise KeyError(f"no pass '{pass_name}' ran on @{graph}")

    def timings(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.snapshots:
            if s.pass_name != "input":
                out[s.pass_name] = out.get(s.pass_name, 0.0) + s.seconds
        return out

    def summary_rows(self, graph: str = "prefill") -> list[tuple[str, int, int, float]]:
        """(pass, ops after, change in ops, seconds) per stage of one graph."""
        rows, prev = [], None
        for s in self.stages(graph):
            n = len(s.graph.ops)
            rows.append((s.pass_name, n, 0 if prev is None else n - prev, s.seconds))
            prev = n
        return rows

    # -- notebook display -----------------------------------------------------------------------
    def _repr_html_(self) -> str:
        parts = [_STYLE, "<div class='ds4c'>"]
        for g in self.graph_names:
            parts.append(f"<h4>@{html.escape(g)}</h4><table><tr><th>pass</th><th>ops</th><th>Δ</th><th>ms</th></tr>")
            for name, n, d, sec in self.summary_rows(g):
                cls = "chg" if d else ""
                parts.append(f"<tr class='{cls}'><td>{html.escape(name)}</td><td>{n}</td><td>{d:+d}</td>"
                             f"<td>{sec * 1e3:.1f}</td></tr>")
            parts.append("</table>")
            stages = self.stages(g)
            for i, s in enumerate(stages):
                title = f"IR after {s.pass_name}" if s.pass_name != "input" else "traced IR"
                parts.append(f"<details><summary>{html.escape(title)} ({len(s.graph.ops)} ops)</summary>")
                if i > 0:
                    d = self.diff(s.pass_name, g) if s.pass_name != stages[i - 1].pass_name else ""
                    if d:
                        parts.append("<details><summary>diff</summary><pre>" + _render_diff(d) + "</pre></details>")
                parts.append(graph_html(s.graph))
                parts.append("</details>")
        parts.append("</div>")
        return "".join(parts)


_STYLE = """<style>
.ds4c pre{font-size:11px;line-height:1.3;margin:2px 0}
.ds4c .op{color:#0550ae}.ds4c .val{color:#953800}.ds4c .ty{color:#6e7781}.ds4c .loc{color:#8c959f}
.ds4c .add{background:#dafbe1}.ds4c .del{background:#ffebe9}.ds4c tr.chg td{font-weight:bold}
</style>"""

_TOKENS = re.compile(r"(%[A-Za-z0-9_.:\-]+)|(\b[a-z_]+\.[A-Za-z0-9_.]+(?=\())|( : [^\n]*?)(?= loc\(|$)|( loc\(.*\))")


def _colour(line: str) -> str:
    out, pos = [], 0
    for m in _TOKENS.finditer(line):
        out.append(html.escape(line[pos:m.start()]))
        cls = "val" if m.group(1) else "op" if m.group(2) else "ty" if m.group(3) else "loc"
        out.append(f"<span class='{cls}'>{html.escape(m.group())}</span>")
        pos = m.end()
    out.append(html.escape(line[pos:]))
    return "".join(out)


def graph_html(graph: Graph) -> str:
    """IR with colours, one collapsible block per layer."""
    parts = [f"<pre>{_colour(format_signature(graph))} {{</pre>"]
    groups: list[tuple[int | None, list[str]]] = []
    for op in graph.ops:
        layer = layer_of(op.loc)
        if not groups or groups[-1][0] != layer:
            groups.append((layer, []))
        groups[-1][1].append(format_op(op))
    for layer, lines in groups:
        label = "model" if layer is None else f"layer {layer}"
        body = "\n".join("  " + _colour(ln) for ln in lines)
        parts.append(f"<details><summary>{label}: {len(lines)} ops</summary><pre>{body}</pre></details>")
    outs = ", ".join(f"{n}=%{v.name}" for n, v in graph.outputs)
    parts.append(f"<pre>  return {html.escape(outs)}\n}}</pre>")
    return "".join(parts)


def _render_diff(diff: str) -> str:
    out = []
    for ln in diff.splitlines():
        cls = "add" if ln.startswith("+") and not ln.startswith("+++") else \
            "del" if ln.startswith("-") and not ln.startswith("---") else ""
        out.append(f"<span class='{cls}'>{html.escape(ln)}</span>" if cls else html.escape(ln))
    return "\n".join(out)
