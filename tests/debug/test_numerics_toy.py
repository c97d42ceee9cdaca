"""Divergence finding and rewrite bisection on a small traced graph with a planted bad rewrite."""

import torch

from ds4c.debug import CompileTrace, bisect_rewrites, find_divergence
from ds4c.ir import Program
from ds4c.passes import PIPELINES, PassContext, PassManager, register_pass
from ds4c.passes.patterns import Builder, Match, Op, Rewrite, Wild, rewrite_graph
from ds4c.targets import get_target
from tests.passes.test_passes import traced_toy


def _bad_exp(m: Match, b: Builder):
    # exp(x) "optimised" into 1 + x: numerically wrong, structurally fine
    (out,) = b.op("aten.add.Tensor", [m["x"], 1.0], {}, [m.root.type], base="bad_exp")
    return out


BAD_RULE = Rewrite("plant_exp", Op("aten.exp.default", Wild("x")), _bad_exp)


@register_pass("test_planted_exp")
def planted(graph, ctx):
    """A deliberately wrong rewrite, for the debugging tests."""
    return rewrite_graph(graph, [BAD_RULE], budget=lambda rule, m: ctx.allow_rewrite(f"{rule} at %{m.root.name}"))


PIPELINES["test_planted"] = ["canonicalize_shapes", "fold_constants", "test_planted_exp", "cse", "dce"]


def _setup():
    m, g = traced_toy()
    params = dict(m.state_dict())
    inputs = {"x": torch.randn(2, 6, 8)}
    state = {"st": torch.randn(2, 3, 8)}
    return Program({"toy": g}, {"dim_names": {"x": ["B", "S"], "st": ["B"]}}), params, inputs, state


def test_divergence_names_planted_pass_and_op():
    prog, params, inputs, state = _setup()
    trace = CompileTrace()
    PassManager("test_planted", [trace]).run(prog)
    div = find_divergence(trace, inputs, params, graph="toy", state=state)
    assert div is not None
    assert div.pass_name == "test_planted_exp"
    assert "bad_exp" in div.op and "aten.add.Tensor" in div.op
    assert div.max_abs_error > 1e-3


def test_no_divergence_on_the_real_pipeline():
    prog, params, inputs, state = _setup()
    trace = CompileTrace()
    PassManager("default", [trace], PassContext(target=get_target("h100"))).run(prog)
    assert find_divergence(trace, inputs, params, graph="toy", state=state) is None
    html = trace._repr_html_()
    assert "<details>" in html and "fold_constants" in html


def test_bisect_finds_planted_rewrite_in_log_runs():
    prog, params, inputs, state = _setup()
    want = PassManager("none").run(prog)
    from ds4c.debug.numerics import run_capturing

    ref, _ = run_capturing(want.graphs["toy"], inputs, params, state)
    logs = {}

    def attempt(limit):
        ctx = PassContext(bisect_limit=limit)
        out = PassManager("test_planted", ctx=ctx).run(prog)
        got, _ = run_capturing(out.graphs["toy"], inputs, params, state)
        logs[limit] = ctx.rewrite_log
        return len(ctx.rewrite_log), all(float((got[k] - ref[k]).abs().max()) <= 1e-5 for k in ref)

    first_bad, runs = bisect_rewrites(attempt)
    log = logs[None]
    assert log[first_bad][1] == "test_planted_exp"
    assert all(entry[1] != "test_planted_exp" for entry in log[:first_bad])
    import math

    assert runs <= 2 + math.ceil(math.log2(len(log)))
