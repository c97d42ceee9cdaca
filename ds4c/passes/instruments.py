"""Instruments: printing, timing, verification, IR diffs and dumps, attached to the PassManager."""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import TextIO

from ds4c.ir.graph import Graph, Program
from ds4c.ir.printer import print_graph
from ds4c.ir.verifier import verify_graph
from ds4c.passes.manager import Instrument


class PrintBeforeAll(Instrument):
    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout

    def run_before_pass(self, pass_name: str, graph: Graph) -> None:
        self.stream.write(f"// ----- IR before {pass_name} (@{graph.name}) -----\n{print_graph(graph)}")


class PrintAfterAll(Instrument):
    def __init__(self, stream: TextIO | None = None, only: set[str] | None = None):
        self.stream = stream or sys.stdout
        self.only = only

    def run_after_pass(self, pass_name: str, before: Graph, after: Graph, seconds: float) -> None:
        if self.only is None or pass_name in self.only:
            self.stream.write(f"// ----- IR after {pass_name} (@{after.name}) -----\n{print_graph(after)}")


class PassTiming(Instrument):
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run_after_pass(self, pass_name: str, before: Graph, after: Graph, seconds: float) -> None:
        self.seconds[pass_name] = self.seconds.get(pass_name, 0.0) + seconds

    def report(self) -> str:
        total = sum(self.seconds.values()) or 1e-12
        rows = [f"{name:<24} {s * 1e3:9.1f} ms {100 * s / total:5.1f}%" for name, s in self.seconds.items()]
        return "\n".join(rows)


class VerifyAfterEach(Instrument):
    def run_after_pass(self, pass_name: str, before: Graph, after: Graph, seconds: float) -> None:
        from ds4c.errors import VerificationError

        try:
            verify_graph(after)
        except VerificationError as e:
            raise VerificationError(f"after pass '{pass_name}': {e}") from None


class IRDiff(Instrument):
    """Unified diff of the IR text before and after each pass that changed something."""

    def __init__(self) -> None:
        self.diffs: list[tuple[str, str, str]] = []  # (pass, graph, diff)

    def run_after_pass(self, pass_name: str, before: Graph, after: Graph, seconds: float) -> None:
        a, b = print_graph(before), print_graph(after)
        if a != b:
            diff = "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True),
                                                f"{after.name} before {pass_name}", f"{after.name} after {pass_name}"))
            self.diffs.append((pass_name, after.name, diff))


class DumpIR(Instrument):
    """Write the IR after every pass: DIR/<graph>/<NN>_<pass>.ds4ir (00_input first)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.counter: dict[str, int] = {}

    def _write(self, graph: Graph, label: str) -> None:
        n = self.counter.get(graph.name, 0)
        self.counter[graph.name] = n + 1
        d = self.dir / graph.name
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{n:02d}_{label}.ds4ir").write_text(print_graph(graph))

    def run_before_pass(self, pass_name: str, graph: Graph) -> None:
        if graph.name not in self.counter:
            self._write(graph, "input")

    def run_after_pass(self, pass_name: str, before: Graph, after: Graph, seconds: float) -> None:
        self._write(after, pass_name)

    def run_after_pipeline(self, program: Program) -> None:
        for g in program.graphs.values():
            if g.name not in self.counter:
                self._write(g, "input")
