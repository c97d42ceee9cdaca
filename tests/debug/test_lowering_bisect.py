"""A planted wrong rewrite inside a GPU lowering pass (#25): ``fuse_norm_rope`` fuses a key's norm and
rotary embedding with the rotation's cos and sin tables swapped. ``ds4c debug numerics --target``
names the pass and the fused op (not the view the pass moved before it), ``ds4c debug bisect``
finds the rewrite, and ``ds4c compile --bisect N`` reproduces it in an artifact whose Triton kernels
(the interpreter on CPU) give the wrong logits one rewrite later and the right ones before."""

from __future__ import annotations

import os
import re

import pytest
import torch

if not torch.cuda.is_available():  # the kernels below run in Triton's interpreter (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from typer.testing import CliRunner  # noqa: E402

import ds4c  # noqa: E402
from ds4c.cli import app  # noqa: E402
from ds4c.debug import CompileTrace, find_divergence  # noqa: E402
from ds4c.ir import Program, parse_graph  # noqa: E402
from ds4c.passes import PassContext, PassManager, get_pass  # noqa: E402
from ds4c.passes import manager as pass_manager  # noqa: E402
from ds4c.targets import get_target  # noqa: E402
from tests.passes.test_lowering_passes import NORM_ROPE_BEFORE, _rope_feed  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
runner = CliRunner()


@pytest.fixture
def planted(monkeypatch):
    """fuse_norm_rope with a wrong rewrite: each ``rms_norm.rope`` it makes of a key (a norm with a
    weight) reads the sin table as cos and the cos table as sin. Only the pass's IR is wrong."""
    real = get_pass("fuse_norm_rope")

    def wrong(graph, ctx):
        out = real(graph, ctx)
        kept = {id(op) for op in graph.ops}
        return out.copy(ops=[op.replace(args=(*op.args[:2], op.args[3], op.args[2]))
                             if op.name == "rms_norm.rope" and id(op) not in kept and op.args[1] is not None else op
                             for op in out.ops])

    monkeypatch.setitem(pass_manager._PASSES, "fuse_norm_rope", pass_manager.Pass("fuse_norm_rope", wrong, real.doc))


def _divergence(graph_text: str):
    g = parse_graph(graph_text)
    trace = CompileTrace()
    PassManager(["fuse_norm_rope"], [trace], PassContext(target=get_target("h100"))).run(Program({g.name: g}, {}))
    inputs, params = _rope_feed(torch.Generator().manual_seed(1))
    return find_divergence(trace, inputs, params, graph=g.name)


def test_divergence_names_the_fused_op_not_the_views_the_pass_moved(planted):
    """The key's view and transpose now read the un-normalised key under their old names: by design
    they differ, and the blame goes to the fused op after them."""
    div = _divergence(NORM_ROPE_BEFORE)
    assert div is not None and div.pass_name == "fuse_norm_rope"
    assert div.value == "kr" and div.op.startswith("%kr = rms_norm.rope(%kt, %wk, %sin, %cos,"), div.op


def test_the_unplanted_pass_keeps_the_numbers():
    assert _divergence(NORM_ROPE_BEFORE) is None


@pytest.mark.slow
def test_debug_numerics_names_the_lowering_pass_and_op(planted):
    res = runner.invoke(app, ["debug", "numerics", "tiny", "--target", "h100", "--max-context", "32",
                              "--seq-len", "8"])
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())
    assert "first divergence: pass 'fuse_norm_rope' on @prefill" in text, text
    op = re.search(r"(%\S+) = rms_norm\.rope\(\S+ %model\.layers\.0\.self_attn\.kv_norm\.weight,", text)
    assert op is not None, text  # layer 0's key, not the view moved before it
    assert f"value {op.group(1)} max abs error" in text


@pytest.mark.slow
def test_debug_bisect_finds_the_rewrite_and_compile_bisect_reproduces_it_in_the_kernels(planted, tmp_path):
    res = runner.invoke(app, ["debug", "bisect", "tiny", "--target", "h100", "--max-context", "32"])
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())
    found = re.search(r"in pass 'fuse_norm_rope': @prefill: fuse %\S+ into rope %\S+ .*--bisect (\d+)`", text)
    assert found is not None, text
    limit = int(found.group(1))
    # the artifacts just before and at the bad rewrite, run by the Triton kernels
    good, bad = (ds4c.compile("tiny", target="h100", precision="fp32", max_context=32, bisect=n, progress=False)
                 for n in (limit - 1, limit))
    fused = [a.program.graphs["prefill"].op_counts().get("rms_norm.rope", 0) for a in (good, bad)]
    assert fused[1] == fused[0] + 1
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    logits = []
    for art, name in ((good, "good"), (bad, "bad")):
        path = tmp_path / f"{name}.ds4"
        art.save(path)
        ker = ds4c.load(path, device=DEVICE, backend="kernels", cuda_graphs=False)
        ref = ds4c.load(path, device=DEVICE, backend="reference")
        logits.append(ker.prefill(ids)[0])
        torch.testing.assert_close(logits[-1], ref.prefill(ids)[0], rtol=1e-4, atol=1e-4)  # the IR is the bug
    ds4c.compile("tiny", target="cpu", precision="fp32", max_context=32, progress=False).save(tmp_path / "clean.ds4")
    clean = ds4c.load(tmp_path / "clean.ds4", backend="reference")
    want = clean.prefill(ids.cpu())[0]
    torch.testing.assert_close(logits[0].cpu(), want, rtol=1e-4, atol=1e-4)
    assert float((logits[1].cpu() - want).abs().max()) > 1e-2
