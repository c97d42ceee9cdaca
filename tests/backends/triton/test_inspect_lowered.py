"""``ds4c inspect ART`` shows the lowered program per entry point from the artifact alone (#25): ops
per kind, packed formats, merged linears, arena bytes and streams, with no pass rerun."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from typer.testing import CliRunner

from ds4c.artifact.artifact import read_artifact
from ds4c.cli import app
from ds4c.inspect import lowered_program_table, merged_linears, packed_formats
from ds4c.passes import manager as pass_manager


def _no_rewrites(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("inspect reran a pass")

    monkeypatch.setattr(pass_manager.PassManager, "run", refuse)
    monkeypatch.setattr(pass_manager, "get_pass", refuse)


def test_inspect_shows_the_lowered_program_per_entry_point(tiny_fp8_artifact, monkeypatch):
    _no_rewrites(monkeypatch)
    res = CliRunner().invoke(app, ["inspect", str(tiny_fp8_artifact)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "lowered program per entry point" in text
    assert "lowering lower_packed_weights -> fuse_norm_rope -> fuse_paged_reads -> merge_sibling_linears" in text

    manifest, program, _ = read_artifact(tiny_fp8_artifact)
    wide = Console(width=2000, record=True)  # a row on one line
    wide.print(lowered_program_table(manifest, program))
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in wide.export_text().splitlines() if line.startswith("│")}
    assert set(rows) == set(manifest["entry_points"]) >= {"prefill", "decode", "prefill_last"}
    concats = {k: v for tr in manifest["weights"]["transforms"] if tr["op"] == "concat" for k, v in tr["tensors"].items()}
    for entry, (ops, per_kind, packed, merged, arena, streams) in rows.items():
        g = program.graphs[entry]
        counts = Counter(op.name for op in g.ops)
        assert ops == str(len(g.ops))
        for kind in ("rms_norm.rope", "moe.packed", "attention.csa"):
            assert f"{kind}×{counts[kind]}" in per_kind and counts[kind] > 0, (entry, kind, per_kind)
        # FP8 linears read their packed tensors and quantise their input in the kernel
        fp8 = sum(1 for op in g.ops if op.name == "linear.packed" and op.kwargs["format"] == "fp8")
        assert fp8 > 0 and f"linear.packed fp8 (act fp8)×{fp8}" in packed, packed
        assert sum(packed_formats(g).values()) == sum(counts[k] for k in ("linear.packed", "linear.grouped.packed",
                                                                           "moe.packed"))
        # each merged GEMM reads one concatenated weight in place of its parts
        gemms, parts = merged_linears(g, concats)
        assert gemms > 0 and merged == f"{gemms} GEMMs for {parts} linears"
        assert parts == sum(len(concats[op.args[1].name]) for op in g.ops if op.name in ("linear.packed",
                            "aten.linear.default") and op.args[1].name in concats)
        plan, sched = manifest["memory_plan"][entry], manifest["schedule"][entry]
        assert arena == f"{plan['runtime_arena']['bytes'] / 1024:,.1f} KiB"
        assert streams.startswith(" ".join(f"{k}={v}" for k, v in sched["ops_per_stream"].items()))
        assert sum(sched["ops_per_stream"].values()) == len(g.ops)
