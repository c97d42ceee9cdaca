"""Checkpoints from anywhere: every damaged or hostile safetensors header, index and weight is
refused with an error naming the file and tensor (never a traceback, never silently wrong
weights), with the same header checks as the safetensors library's own."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import ds4c
from ds4c.cli import app
from ds4c.errors import CheckpointError
from ds4c.frontend.checkpoint import _read_header, check_checkpoint, load_checkpoint
from ds4c.frontend.deepseek_format import write_deepseek_checkpoint
from tests.hf_configs import SMALL_CONFIGS, make_hf_model

W = "model.norm.weight"


def _write(path, header, data: bytes, raw: bytes | None = None):
    """A safetensors file written by hand: 8-byte length, JSON header (or ``raw`` bytes), data."""
    h = raw if raw is not None else json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)
    return path


def _f32(n, start=0.0):
    return torch.arange(start, start + n, dtype=torch.float32).numpy().tobytes()


SPEC = {W: ((4,), torch.float32), "model.embed_tokens.weight": ((2, 2), torch.float32)}
GOOD = {W: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "model.embed_tokens.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}}


def _refused(tmp_path, header, data, match, raw=None):
    _write(tmp_path / "model.safetensors", header, data, raw)
    for read in (lambda: check_checkpoint(tmp_path, SPEC), lambda: load_checkpoint(tmp_path, SPEC)):
        with pytest.raises(CheckpointError, match=match) as e:
            read()
        assert str(tmp_path / "model.safetensors") in str(e.value) and "\n" not in str(e.value)


def test_a_hand_written_valid_file_loads(tmp_path):
    _write(tmp_path / "model.safetensors", GOOD, _f32(8))
    got = load_checkpoint(tmp_path, SPEC)
    assert got[W].tolist() == [0, 1, 2, 3] and got["model.embed_tokens.weight"].tolist() == [[4, 5], [6, 7]]


@pytest.mark.parametrize("case,match", [
    ("overlap", rf"tensor '{W}' \[8, 24\) overlaps tensor 'model.embed_tokens.weight'"),
    ("into header", rf"tensor '{W}' has data_offsets \[-8, 8\].*0 <= begin <= end"),
    ("negative", rf"tensor '{W}' has data_offsets \[-4, 12\]"),
    ("reversed", rf"tensor '{W}' has data_offsets \[16, 0\]"),
    ("list header", r"header is a JSON list, not an object"),
    ("size mismatch", rf"tensor '{W}' spans 16 bytes \[0, 16\), but its shape \[4\] of I16 needs 8"),
    ("same size, wrong class", rf"tensor '{W}' is stored as I32, but '{W}' is a floating point parameter"),
    ("gap", r"bytes \[16, 20\) after tensor 'model.norm.weight' belong to no tensor"),
    ("trailing", r"ends at byte .* but the file has .* bytes; bytes after the last tensor"),
    ("past the end", r"ends at byte .* but the file has .* bytes; it is truncated"),
    ("duplicate", rf"tensor '{W}' is listed twice"),
    ("bad shape", rf"tensor '{W}' has shape \[4.0\]"),
    ("record not object", rf"tensor '{W}' has a header record of type list"),
    ("unknown dtype", rf"tensor '{W}' has dtype 'C64', which ds4c does not read"),
    ("metadata", r"__metadata__ is not an object of strings"),
    ("not json", r"header is not valid JSON"),
    ("huge header", r"header length .* does not fit"),
])
def test_hostile_headers_are_refused_naming_file_and_tensor(tmp_path, case, match):
    h = json.loads(json.dumps(GOOD))
    data, raw = _f32(8), None
    if case == "overlap":
        h[W]["data_offsets"] = [8, 24]
        h["model.embed_tokens.weight"]["data_offsets"] = [0, 16]
    elif case == "into header":
        h[W]["data_offsets"] = [-8, 8]
    elif case == "negative":
        h[W]["data_offsets"] = [-4, 12]
    elif case == "reversed":
        h[W]["data_offsets"] = [16, 0]
    elif case == "list header":
        raw = json.dumps([GOOD]).encode()
    elif case == "size mismatch":  # an integer header of another size over float data
        h[W]["dtype"] = "I16"
    elif case == "same size, wrong class":  # I32 over F32 bytes: only the dtype class can tell
        h[W]["dtype"] = "I32"
    elif case == "gap":
        h["model.embed_tokens.weight"]["data_offsets"] = [20, 36]
        data = _f32(9)
    elif case == "trailing":
        data = _f32(9)
    elif case == "past the end":
        data = _f32(7)
    elif case == "duplicate":
        raw = b'{"model.norm.weight": ' + json.dumps(GOOD[W]).encode() + b', ' + json.dumps(GOOD)[1:].encode()
    elif case == "bad shape":
        h[W]["shape"] = [4.0]
    elif case == "record not object":
        h[W] = [1, 2]
    elif case == "unknown dtype":
        h[W]["dtype"] = "C64"
    elif case == "metadata":
        h["__metadata__"] = {"format": 1}
    elif case == "not json":
        raw = b"{nope"
    elif case == "huge header":
        _write(tmp_path / "model.safetensors", None, b"", raw=b"{}")
        p = tmp_path / "model.safetensors"
        p.write_bytes((10**9).to_bytes(8, "little") + p.read_bytes()[8:])
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(tmp_path, SPEC)
        return
    _refused(tmp_path, h, data, match, raw)


def test_hostile_header_through_the_cli_is_one_line_and_leaves_no_output(tmp_path):
    ckpt = tmp_path / "ckpt"
    make_hf_model(SMALL_CONFIGS["mixed"], 0).save_pretrained(ckpt)
    f = ckpt / "model.safetensors"
    n = int.from_bytes(f.read_bytes()[:8], "little")
    header = json.loads(f.read_bytes()[8:8 + n])
    name = next(k for k in sorted(header) if k != "__metadata__")
    header[name]["data_offsets"][0] = -1
    data = f.read_bytes()[8 + n:]
    _write(f, header, data)
    out = tmp_path / "o.ds4"
    res = CliRunner().invoke(app, ["compile", str(ckpt), "--target", "cpu", "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert f"tensor '{name}' has data_offsets" in " ".join(res.output.split()) and "Traceback" not in res.output
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


# -- the same verdict as safetensors' own validation ---------------------------------------------
_ITEM = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1}


@st.composite
def _headers(draw):
    """A valid header of 1-3 tensors, then random damage: offsets shifted, shapes or dtypes
    changed, the data section longer or shorter."""
    names = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True))
    header, at = {}, 0
    for n in names:
        dt = draw(st.sampled_from(sorted(_ITEM)))
        shape = draw(st.lists(st.integers(0, 3), max_size=2))
        nbytes = _ITEM[dt]
        for x in shape:
            nbytes *= x
        header[n] = {"dtype": dt, "shape": shape, "data_offsets": [at, at + nbytes]}
        at += nbytes
    for _ in range(draw(st.integers(0, 2))):
        n = draw(st.sampled_from(names))
        what = draw(st.sampled_from(["begin", "end", "dtype", "shape"]))
        if what in ("begin", "end"):
            header[n]["data_offsets"][what == "end"] += draw(st.integers(-6, 6))
        elif what == "dtype":
            header[n]["dtype"] = draw(st.sampled_from(sorted(_ITEM)))
        else:
            header[n]["shape"] = draw(st.lists(st.integers(0, 3), max_size=2))
    return header, max(0, at + draw(st.sampled_from([0, 0, 0, -1, 1, 4])))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_headers())
def test_header_checks_agree_with_safetensors(tmp_path, case):
    from safetensors import safe_open

    header, data_len = case
    f = _write(tmp_path / "x.safetensors", header, bytes(data_len))
    try:
        with safe_open(str(f), framework="pt") as h:
            theirs = sorted(h.keys())
    except Exception:  # noqa: BLE001 - safetensors' verdict, whatever it raises
        theirs = None
    try:
        ours = sorted(_read_header(f))
    except CheckpointError:
        ours = None
    assert ours == theirs, (header, data_len)


# -- the index may only name files inside the checkpoint ----------------------------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded") / "ckpt"
    model = make_hf_model(SMALL_CONFIGS["mixed"], 3)
    model.save_pretrained(d, max_shard_size="100KB")
    with torch.device("meta"):
        meta = type(model)(model.config)
    return d, {k: (tuple(v.shape), v.dtype) for k, v in meta.state_dict().items()}


def _index_naming(src, dst, where):
    """A copy of ``src`` whose index puts its first tensor in ``where`` (a name), that file holding it."""
    shutil.copytree(src, dst)
    index = dst / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name, shard = next(iter(data["weight_map"].items()))
    data["weight_map"][name] = where
    index.write_text(json.dumps(data))
    return name, shard


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink out", "backslash"])
def test_an_index_naming_a_file_outside_the_checkpoint_is_refused(sharded, tmp_path, how):
    src, spec = sharded
    outside = tmp_path / "outside.safetensors"
    d = tmp_path / "ckpt"
    where = {"parent": "../outside.safetensors", "absolute": str(outside), "symlink out": "link.safetensors",
             "backslash": "..\\outside.safetensors"}[how]
    name, shard = _index_naming(src, d, where)
    shutil.copy(d / shard, outside)  # a real shard holding the tensor: only where it is is wrong
    if how == "symlink out":
        os.symlink(outside, d / "link.safetensors")
    match = "is a symlink to .*outside the checkpoint directory" if how == "symlink out" else \
        "is not a file name inside the checkpoint directory"
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json: tensor '{name}' is in .*{match}"):
        load_checkpoint(d, spec)
    with pytest.raises(CheckpointError, match=match):
        check_checkpoint(d, spec)


def test_a_shard_symlinked_out_of_the_directory_is_refused_but_a_hub_snapshot_loads(sharded, tmp_path):
    src, spec = sharded
    want = load_checkpoint(src, spec)
    # one file, linked from elsewhere (no index): refused
    one = tmp_path / "one"
    one.mkdir()
    save_file({k: v.contiguous() for k, v in want.items()}, str(tmp_path / "elsewhere.safetensors"))
    os.symlink(tmp_path / "elsewhere.safetensors", one / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"one/model.safetensors is a symlink to .*outside the checkpoint"):
        load_checkpoint(one, spec)
    # the Hugging Face hub's layout: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--x--y"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in src.iterdir():
        shutil.copy(f, blobs / f"blob-{f.name}")
        os.symlink(f"../../blobs/blob-{f.name}", snap / f.name)
    got = load_checkpoint(snap, spec)
    assert all(torch.equal(got[k], want[k]) for k in want)


# -- non-finite weights ----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["plain", "fp8 weight", "fp8 scale", "fp4 scale", "one-dimensional"])
def test_nonfinite_weights_are_refused_naming_the_tensor_unless_allowed(sharded, tmp_path, where):
    src, spec = sharded
    sd = load_checkpoint(src, spec)
    d = tmp_path / "ckpt"
    if where.startswith("fp"):  # DeepSeek's release format: FP8 / MXFP4 weights with UE8M0 block scales
        write_deepseek_checkpoint(sd, json.loads((src / "config.json").read_text()), d)
        f = d / "model.safetensors"
        t = load_file(f)
        key = {"fp8 weight": "layers.0.attn.wq_a.weight", "fp8 scale": "layers.0.attn.wq_a.scale",
               "fp4 scale": "layers.1.ffn.experts.2.w3.scale"}[where]
        raw = t[key].view(torch.uint8).clone()
        raw.view(-1)[min(3, raw.numel() - 1)] = 0xFF  # e4m3fn NaN / e8m0 NaN
        t[key] = raw.view(t[key].dtype)
        save_file(t, str(f))
        named = key.removesuffix(".scale").removesuffix(".weight") + ".weight"
    else:
        d.mkdir()
        shutil.copy(src / "config.json", d)
        named = "model.layers.1.self_attn.q_a_proj.weight" if where == "plain" else "model.norm.weight"
        sd = dict(sd)
        sd[named] = sd[named].clone()
        sd[named].view(-1)[5] = float("nan") if where == "plain" else float("inf")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{named}' holds \d+ NaN/Inf value.*"
                                              r"--allow-nonfinite-weights"):
        load_checkpoint(d, spec)
    got = load_checkpoint(d, spec, allow_nonfinite=True)
    assert not all(bool(torch.isfinite(v).all()) for v in got.values() if v.is_floating_point())


def test_nonfinite_checkpoint_compile_is_refused_and_allowed_by_the_option(sharded, tmp_path):
    src, spec = sharded
    sd = load_checkpoint(src, spec)
    d = tmp_path / "nan"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    sd["model.layers.0.self_attn.sinks"] = torch.full_like(sd["model.layers.0.self_attn.sinks"], float("nan"))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    out = tmp_path / "o.ds4"
    res = CliRunner().invoke(app, ["compile", str(d), "--target", "cpu", "--max-context", "32", "-o", str(out)])
    assert res.exit_code == 2 and "model.layers.0.self_attn.sinks' holds" in " ".join(res.output.split())
    assert not out.exists()
    art = ds4c.compile(d, target="cpu", max_context=32, allow_nonfinite=True, progress=False)
    assert art.manifest["weights"]["source"]["allow_nonfinite"] is True
    res = CliRunner().invoke(app, ["compile", str(d), "--target", "cpu", "--max-context", "32", "-o", str(out),
                                   "--weights", "reference", "--allow-nonfinite-weights"])
    assert res.exit_code == 0, res.output
    model = ds4c.load(out)  # referenced: loads the NaN again, as allowed at compile
    assert torch.isnan(model.weights["model.layers.0.self_attn.sinks"]).all()


def test_an_integer_parameter_stored_as_floats_is_refused(sharded, tmp_path):
    src, spec = sharded
    sd = load_checkpoint(src, spec)
    key = "model.layers.0.mlp.gate.tid2eid"
    sd[key] = sd[key].float()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is stored as F32, but '{key}' holds integers"):
        check_checkpoint(tmp_path, spec)


def test_u8_block_scales_are_ue8m0_exponents(sharded, tmp_path):
    """A release checkpoint storing its UE8M0 scales as U8 bytes loads as the F8_E8M0 one does."""
    src, spec = sharded
    write_deepseek_checkpoint(load_checkpoint(src, spec), json.loads((src / "config.json").read_text()), tmp_path)
    want = load_checkpoint(tmp_path, spec)
    f = tmp_path / "model.safetensors"
    t = load_file(f)
    for k in [k for k in t if k.endswith(".scale") and t[k].dtype == torch.float8_e8m0fnu]:
        t[k] = t[k].view(torch.uint8)
    save_file(t, str(f))
    got = load_checkpoint(tmp_path, spec)
    assert all(torch.equal(got[k], want[k]) for k in want)
    t["layers.0.attn.wq_a.scale"] = t["layers.0.attn.wq_a.scale"].to(torch.int32)
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match=r"scale 'layers.0.attn.wq_a.scale' is stored as I32"):
        check_checkpoint(tmp_path, spec)
