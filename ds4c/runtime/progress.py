"""Rich progress bars for long work (compile, load), quiet when not on a terminal unless asked."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


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


@contextlib.contextmanager
def progress_steps(title: str, total: int, enabled: bool | None = None) -> Iterator[Steps]:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield Steps(None, None)
        return
    from rich.console import Console

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as p:
        task = p.add_task(title, total=total)
        yield Steps(p, task)
