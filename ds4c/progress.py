"""Progress of long work (compile, load): a rich bar on a terminal, plain lines elsewhere.

``progress_steps(title, total, enabled)`` yields a ``Steps``; the work calls ``advance(label)``.
``enabled``: None shows a bar on a terminal and nothing otherwise (the Python API's default: a
script's log stays clean); True shows progress either way: a bar on a terminal, and without one
(a CI log, ``ds4c compile ... 2>log``) plain lines on stderr, so a minute of work is not a
minute of silence; False shows nothing.

Plain lines are one per stage: ``[  12.3 s] title: label``, the time since the work began. Work
with many small steps (loading weights, compiling hundreds of kernels) is not a stage per step:
above ``STAGE_LINES_UP_TO`` steps a line comes at most every ``LINE_EVERY_S`` seconds, with the
count, and one when the work is done.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

STAGE_LINES_UP_TO = 10  # at most this many steps: every labelled step is a stage, with its line
LINE_EVERY_S = 10.0  # more steps than that: a line at most this often


class Steps:
    """A progress bar over named steps; ``advance(label)`` moves it on."""

    def __init__(self, progress: Progress | None, task: int | None):
        self._p, self._t = progress, task

    def advance(self, label: str | None = None, n: int = 1) -> None:
        if self._p is not None and self._t is not None:
            self._p.update(self._t, advance=n, description=label or self._p.tasks[0].description)

    def set_total(self, total: int) -> None:
        if self._p is not None and self._t is not None:
            self._p.update(self._t, total=total)


class LineSteps(Steps):
    """Progress as plain lines (no terminal): one per stage, with the seconds since the start."""

    def __init__(self, title: str, total: int, stream: TextIO, clock: Callable[[], float] = time.monotonic):
        super().__init__(None, None)
        self.title, self.total, self.done = title, max(int(total), 0), 0
        self._stream, self._clock = stream, clock
        self._start = self._last_line = clock()
        self._label: str | None = None

    def _line(self, text: str) -> None:
        self._last_line = self._clock()
        print(f"[{self._last_line - self._start:6.1f} s] {self.title}: {text}", file=self._stream, flush=True)

    def advance(self, label: str | None = None, n: int = 1) -> None:
        self.done += n
        if label is not None:
            self._label = label
        if self.total <= STAGE_LINES_UP_TO:
            if label is not None:
                self._line(label)
        elif self._clock() - self._last_line >= LINE_EVERY_S:
            self._line(f"{self.done}/{self.total}" + (f" {self._label}" if self._label else ""))

    def set_total(self, total: int) -> None:
        self.total = max(int(total), 0)

    def finish(self) -> None:
        """The closing line of many-step work (a staged one ends on its own last stage)."""
        if self.total > STAGE_LINES_UP_TO:
            self._line(f"done, {self.done}/{self.total}")


@contextlib.contextmanager
def progress_steps(title: str, total: int, enabled: bool | None = None) -> Iterator[Steps]:
    terminal = sys.stderr.isatty()
    if enabled is False or (enabled is None and not terminal):
        yield Steps(None, None)
        return
    if not terminal:
        lines = LineSteps(title, total, sys.stderr)
        yield lines
        lines.finish()
        return
    from rich.console import Console

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as p:
        task = p.add_task(title, total=total)
        yield Steps(p, task)
