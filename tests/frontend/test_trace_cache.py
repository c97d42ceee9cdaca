"""Traces kept on disk between processes: read back exactly, keyed by everything a trace depends
on, written atomically, unreadable entries traced anew with a warning, off with DS4C_TRACE_CACHE=0."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest
import torch
from typer.testing import CliRunner

import ds4c.frontend.trace as trace_mod
from ds4c.cli import app
from ds4c.frontend import trace_cache
from ds4c.frontend.trace import trace_program
from ds4c.ir.printer import print_graph
from ds4c.models.deepseek_v4 import ModelConfig
from ds4c.models.deepseek_v4.presets import PRESETS

CONFIG = ModelConfig.from_hf_dict(PRESETS["tiny"])


@pytest.fixture(scope="module")
def program():
    return trace_program(CONFIG, 64)[0]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DS4C_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DS4C_TRACE_CACHE", raising=False)
    return tmp_path / "traces"


def _printed(program):
    return {n: print_graph(g) for n, g in program.graphs.items()}


def test_a_stored_trace_reads_back_exactly(program, cache_dir):
    key = trace_cache.trace_key(CONFIG, 64, torch.float32, True)
    assert trace_cache.load(key) is None
    trace_cache.store(key, program)
    assert [p.name for p in cache_dir.iterdir()] == [f"{key}.safetensors"]  # no temporary file left
    back = trace_cache.load(key)
    assert _printed(back) == _printed(program) and back.attrs == program.attrs
    for name, g in program.graphs.items():
        assert g.constants.keys() == back.graphs[name].constants.keys()
        for k, v in g.constants.items():
            assert torch.equal(back.graphs[name].constants[k], v) and back.graphs[name].constants[k].dtype == v.dtype
        assert [op.loc for op in g.ops] == [op.loc for op in back.graphs[name].ops]


def test_the_key_names_everything_a_trace_depends_on():
    base = trace_cache.trace_key(CONFIG, 64, torch.float32, True)
    others = [trace_cache.trace_key(CONFIG, 128, torch.float32, True),
              trace_cache.trace_key(CONFIG, 64, torch.bfloat16, True),
              trace_cache.trace_key(CONFIG, 64, torch.float32, False),
              trace_cache.trace_key(dataclasses.replace(CONFIG, sliding_window=8), 64, torch.float32, True)]
    assert base == trace_cache.trace_key(CONFIG, 64, torch.float32, True)
    assert len({base, *others}) == 5


def test_trace_program_reads_the_disk_before_tracing(program, cache_dir, monkeypatch):
    """A new process (empty in-memory cache) gets the stored trace without torch.export; a context
    not stored yet is traced and stored."""
    calls = []

    def fake_trace(config, model, max_context, dtype, per_kind):
        calls.append(max_context)
        return program

    monkeypatch.setattr(trace_mod, "_TRACES", OrderedDict())
    monkeypatch.setattr(trace_mod, "_trace_program", fake_trace)
    trace_cache.store(trace_cache.trace_key(CONFIG, 64, torch.float32, True), program)
    got, _ = trace_program(CONFIG, 64)
    assert calls == [] and _printed(got) == _printed(program)
    trace_program(CONFIG, 48)
    assert calls == [48] and trace_cache.load(trace_cache.trace_key(CONFIG, 48, torch.float32, True)) is not None
    monkeypatch.setattr(trace_mod, "_TRACES", OrderedDict())
    trace_program(CONFIG, 48)
    assert calls == [48]


@pytest.mark.parametrize("damage", ["truncated", "other key"])
def test_an_unreadable_entry_is_named_removed_and_traced_anew(program, cache_dir, damage):
    key = trace_cache.trace_key(CONFIG, 64, torch.float32, True)
    trace_cache.store(key, program)
    path = cache_dir / f"{key}.safetensors"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        other = trace_cache.trace_key(CONFIG, 65, torch.float32, True)
        path.rename(cache_dir / f"{other}.safetensors")
        key, path = other, cache_dir / f"{other}.safetensors"
    with pytest.warns(UserWarning, match=f"{path.name}: cached trace unreadable.*tracing anew"):
        assert trace_cache.load(key) is None
    assert not path.exists()


def test_off_switch_and_pruning(program, cache_dir, monkeypatch):
    monkeypatch.setenv("DS4C_TRACE_CACHE", "0")
    trace_cache.store("a" * 64, program)
    assert not cache_dir.exists() and trace_cache.load("a" * 64) is None
    monkeypatch.delenv("DS4C_TRACE_CACHE")
    monkeypatch.setattr(trace_cache, "MAX_ENTRIES", 2)
    for c in "abc":
        trace_cache.store(c * 64, program)
    assert len(trace_cache.entries()) == 2


def test_cli_shows_and_clears_the_cache(program, cache_dir):
    trace_cache.store("d" * 64, program)
    res = CliRunner().invoke(app, ["cache"])
    assert res.exit_code == 0 and "1 traces" in res.output and str(cache_dir) in res.output.replace("\n", "")
    res = CliRunner().invoke(app, ["cache", "--clear"])
    assert res.exit_code == 0 and "removed 1 traces" in res.output and not trace_cache.entries()


def test_an_unusable_cache_directory_only_warns(program, tmp_path, monkeypatch):
    """A cache path that cannot be a directory: storing warns and the compile goes on; loading misses."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("DS4C_CACHE_DIR", str(blocker))
    key = trace_cache.trace_key(CONFIG, 64, torch.float32, True)
    with pytest.warns(UserWarning, match="trace cache not written"):
        trace_cache.store(key, program)
    assert trace_cache.load(key) is None


def test_entries_are_ordinary_files(program, cache_dir):
    import stat

    trace_cache.store("e" * 64, program)
    mode = stat.S_IMODE((cache_dir / f"{'e' * 64}.safetensors").stat().st_mode)
    assert mode == 0o666 & ~trace_cache._umask()  # readable by whoever shares DS4C_CACHE_DIR, as umask allows
