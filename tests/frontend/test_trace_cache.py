"""Traces kept on disk between processes: read back exactly, keyed by everything a trace depends
on, written atomically, unreadable, edited or mis-filed entries traced anew with a warning (never
used), off with DS4C_TRACE_CACHE=0."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict

import pytest
import torch
from typer.testing import CliRunner

import ds4c.frontend.trace as trace_mod
from ds4c.cli import app
from ds4c.frontend import trace_cache
from ds4c.frontend.trace import trace_program
from ds4c.ir.graph import Program
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
        return Program(dict(program.graphs), {**program.attrs, "max_context": max_context})

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
    with pytest.warns(UserWarning, match=f"{path.name}: cached trace not used.*tracing anew"):
        assert trace_cache.load(key) is None
    assert not path.exists()


def _key(context=64):
    return trace_cache.trace_key(CONFIG, context, torch.float32, True)


def test_off_switch_and_pruning(program, cache_dir, monkeypatch):
    monkeypatch.setenv("DS4C_TRACE_CACHE", "0")
    trace_cache.store(_key(), program)
    assert not cache_dir.exists() and trace_cache.load(_key()) is None
    monkeypatch.delenv("DS4C_TRACE_CACHE")
    monkeypatch.setattr(trace_cache, "MAX_ENTRIES", 2)
    for c in (61, 62, 63):
        trace_cache.store(_key(c), program)
    assert len(trace_cache.entries()) == 2


def test_a_key_not_made_by_trace_key_is_not_stored(program, cache_dir):
    """An entry must carry what its key hashes, or it could never be verified: not written."""
    trace_cache.store("a" * 64, program)
    assert not trace_cache.entries()


def test_cli_shows_and_clears_the_cache(program, cache_dir):
    trace_cache.store(_key(), program)
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

    trace_cache.store(_key(), program)
    mode = stat.S_IMODE((cache_dir / f"{_key()}.safetensors").stat().st_mode)
    assert mode == 0o666 & ~trace_cache._umask()  # readable by whoever shares DS4C_CACHE_DIR, as umask allows


def _rewrite(path, edit_meta=None, edit_tensors=None, to=None):
    """Rewrite an entry as a hand-editor would: a well-formed safetensors file with edited parts."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta, tensors)
    save_file(tensors, str(to or path), metadata=meta)


@pytest.mark.parametrize("edit", ["ir", "constant"])
def test_a_hand_edited_entry_is_traced_anew_and_the_artifact_equals_a_fresh_compile(program, cache_dir, monkeypatch,
                                                                                   edit):
    """An edited entry (IR text or a constant) parses fine but is not what was traced: a warning,
    a retrace, and an artifact equal to one compiled from an intact cache."""
    import ds4c

    calls = []

    def retrace(config, model, max_context, dtype, per_kind):  # what torch.export gives (the fixture's trace)
        calls.append(max_context)
        return Program({n: g.copy() for n, g in program.graphs.items()}, dict(program.attrs))

    monkeypatch.setattr(trace_mod, "_trace_program", retrace)
    monkeypatch.setattr(trace_mod, "_TRACES", OrderedDict())
    key = _key()
    trace_cache.store(key, program)
    fresh = ds4c.compile("tiny", target="cpu", max_context=64, progress=False)
    assert calls == []  # read from the intact entry
    path = cache_dir / f"{key}.safetensors"
    if edit == "ir":
        def edit_meta(meta, tensors):
            graphs = json.loads(meta["graphs"])
            assert "scaling=1.0" in graphs["prefill"]  # an attribute (RoPE's attention scaling)
            graphs["prefill"] = graphs["prefill"].replace("scaling=1.0", "scaling=2.0", 1)
            meta["graphs"] = json.dumps(graphs)
        _rewrite(path, edit_meta=edit_meta)
    else:
        def edit_tensors(tensors):
            name = next(k for k in sorted(tensors) if k.startswith("prefill/") and tensors[k].is_floating_point())
            tensors[name] = tensors[name] * 1.5 + 0.25
        _rewrite(path, edit_tensors=edit_tensors)
    monkeypatch.setattr(trace_mod, "_TRACES", OrderedDict())  # a new process
    with pytest.warns(UserWarning, match=rf"{path.name}: cached trace not used .*does not match its sha256.*tracing anew"):
        again = ds4c.compile("tiny", target="cpu", max_context=64, progress=False)
    assert calls == [64]
    for name in fresh.program.graphs:
        assert again.ir_text(name) == fresh.ir_text(name)
        a, b = fresh.program.graphs[name].constants, again.program.graphs[name].constants
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert trace_cache.load(key) is not None  # the retrace was stored in its place


@pytest.mark.parametrize("how", ["renamed", "key rewritten", "key, inputs and hash rewritten"])
def test_an_entry_copied_under_another_context_is_detected(program, cache_dir, how):
    key, other = _key(64), _key(128)
    trace_cache.store(key, program)
    src, dst = cache_dir / f"{key}.safetensors", cache_dir / f"{other}.safetensors"

    def edit_meta(meta, tensors):
        meta["key"] = other
        if how == "key, inputs and hash rewritten":  # a careful forger: only the content tells
            meta["inputs"] = trace_cache.key_inputs(CONFIG, 128, torch.float32, True)
            meta["content_sha256"] = trace_cache._content_sha256(meta["inputs"], meta["attrs"], meta["graphs"],
                                                                 tensors)
    _rewrite(src, edit_meta=None if how == "renamed" else edit_meta, to=dst)
    reason = "holds a trace for context 64, not its key's" if how.startswith("key, inputs") else \
        "stored under another key"
    with pytest.warns(UserWarning, match=rf"{dst.name}: cached trace not used .*{reason}"):
        assert trace_cache.load(other) is None
    assert not dst.exists() and trace_cache.load(key) is not None


def test_the_key_covers_torch_sympy_python_and_ds4c_sources():
    parts = json.loads(trace_cache.key_inputs(CONFIG, 64, torch.float32, True))
    import sympy

    assert torch.__version__ in parts and sympy.__version__ in parts and trace_cache._source_digest() in parts
    assert parts[trace_cache._MAX_CONTEXT_AT] == 64
