"""Without a terminal a compile says what it is doing: a plain line per stage, with elapsed time."""

from __future__ import annotations

import io
import re

from typer.testing import CliRunner

from ds4c.cli import app
from ds4c.progress import LINE_EVERY_S, LineSteps, progress_steps


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_per_stage_with_the_time_since_the_start():
    out, clock = io.StringIO(), Clock()
    steps = LineSteps("compiling for cpu", 3, out, clock)
    steps.advance("tracing", 0)
    clock.now += 7.25
    steps.advance("running passes")
    steps.advance()  # no label: not a new stage
    steps.finish()
    assert out.getvalue().splitlines() == ["[   0.0 s] compiling for cpu: tracing",
                                           "[   7.2 s] compiling for cpu: running passes"]


def test_many_small_steps_are_a_line_now_and_then():
    out, clock = io.StringIO(), Clock()
    steps = LineSteps("loading w.ds4", 1000, out, clock)
    for _ in range(500):
        clock.now += 0.01
        steps.advance()
    clock.now += LINE_EVERY_S
    steps.advance("layer 7")
    for _ in range(499):
        steps.advance()
    steps.finish()
    assert out.getvalue().splitlines() == ["[  15.0 s] loading w.ds4: 501/1000 layer 7",
                                           "[  15.0 s] loading w.ds4: done, 1000/1000"]


def test_progress_is_off_by_default_without_a_terminal(capsys):
    with progress_steps("quiet", 3) as steps:  # the Python API's default: a script's log stays clean
        steps.advance("stage")
    with progress_steps("shown", 3, enabled=True) as steps:
        steps.advance("stage")
    err = capsys.readouterr().err
    assert "quiet" not in err and re.search(r"^\[ +\d+\.\d s\] shown: stage$", err, flags=re.M), err


def test_cli_compile_prints_its_stages_when_piped(tmp_path):
    res = CliRunner().invoke(app, ["compile", "tiny", "--target", "cpu", "--max-context", "32",
                                   "-o", str(tmp_path / "t.ds4")])
    assert res.exit_code == 0, res.output
    stages = re.findall(r"^\[ +\d+\.\d s\] compiling for cpu: (.+)$", res.output, flags=re.M)
    assert stages == ["tracing (torch.export)", "running passes", "collecting weights", "device code (reference)",
                      "done"], res.output
