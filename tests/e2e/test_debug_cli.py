"""`ds4c debug numerics` and `ds4c debug bisect` find a planted miscompile in a copy of the pipeline."""

from __future__ import annotations

import math

from typer.testing import CliRunner

from ds4c.cli import app
from ds4c.passes import PIPELINES, register_pass
from ds4c.passes.patterns import Builder, Match, Op, Rewrite, Wild, rewrite_graph

runner = CliRunner()


def _relu_for_silu(m: Match, b: Builder):
    (y,) = b.op("aten.relu.default", [m["x"]], {}, [m.root.type], base="planted_relu")
    return y


@register_pass("planted_silu_to_relu")
def planted(graph, ctx):
    """Deliberately wrong: SiLU 'simplified' to ReLU."""
    rule = Rewrite("silu->relu", Op("aten.silu.default", Wild("x")), _relu_for_silu)
    return rewrite_graph(graph, [rule], budget=lambda r, m: ctx.allow_rewrite(f"{r} at %{m.root.name}"))


PLANTED = list(PIPELINES["default"])
PLANTED.insert(PLANTED.index("fuse_moe"), "planted_silu_to_relu")


def test_debug_numerics_names_the_planted_pass_and_op():
    res = runner.invoke(app, ["debug", "numerics", "tiny", "--pipeline", ",".join(PLANTED), "--max-context", "48",
                              "--seq-len", "24"])
    assert res.exit_code == 1, res.output
    assert "pass 'planted_silu_to_relu'" in res.output
    assert "planted_relu" in res.output and "aten.relu.default" in res.output


def test_debug_numerics_clean_pipeline_reports_no_divergence():
    res = runner.invoke(app, ["debug", "numerics", "tiny", "--max-context", "48", "--seq-len", "24"])
    assert res.exit_code == 0, res.output
    assert "no divergence" in res.output


def test_debug_bisect_finds_the_planted_rewrite_in_log_runs():
    res = runner.invoke(app, ["debug", "bisect", "tiny", "--pipeline", ",".join(PLANTED), "--max-context", "48"])
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())
    assert "in pass 'planted_silu_to_relu'" in text
    total = int(text.split(" of ")[1].split()[0])
    runs = int(text.split("found in ")[1].split()[0])
    assert runs <= 2 + math.ceil(math.log2(total))
