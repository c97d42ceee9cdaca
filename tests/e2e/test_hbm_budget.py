"""--hbm-budget end to end: weights beyond the budget are planned on the host, prefetched, same tokens."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import ds4c
from ds4c.cli import _parse_bytes, app
from ds4c.errors import ConfigError, Ds4cError


def test_budget_moves_weights_to_host_and_keeps_tokens(tmp_path):
    full = ds4c.compile("tiny", target="h100", precision="bf16", max_context=64, progress=False)
    need = full.program.attrs["memory_plan"]["decode"]["device_bytes"]
    art = ds4c.compile("tiny", target="h100", precision="bf16", max_context=64, progress=False,
                       hbm_budget=int(need * 0.6))
    plan = art.program.attrs["memory_plan"]["decode"]
    assert plan["weights"]["host"], "a budget below the weights moves some to the host"
    assert plan["weights"]["budget"] == int(need * 0.6)
    prefetches = [op for op in art.program.graphs["decode"].ops if op.name == "ds4c.prefetch"]
    assert len(prefetches) >= len(plan["weights"]["host"])
    full.save(tmp_path / "a.ds4")
    art.save(tmp_path / "b.ds4")
    ids = [[3, 14, 15, 92, 65, 35]]
    want = ds4c.load(tmp_path / "a.ds4").generate(ids, 8).tolist()
    assert ds4c.load(tmp_path / "b.ds4").generate(ids, 8).tolist() == want


def test_budget_parsing_and_errors():
    assert _parse_bytes("40GB") == 40 * 10**9 and _parse_bytes("512MiB") == 512 * 2**20
    assert _parse_bytes("2.5e3") == 2500
    with pytest.raises(Ds4cError, match="hbm-budget"):
        _parse_bytes("lots")
    with pytest.raises(ConfigError, match="hbm-budget"):
        ds4c.compile("tiny", target="h100", hbm_budget=-1, progress=False)
    res = CliRunner().invoke(app, ["compile", "tiny", "--target", "h100", "--hbm-budget", "1KB", "--max-context", "32",
                                   "--precision", "bf16", "-o", "/dev/null"])
    assert res.exit_code != 0 and "hbm_budget" in res.output
