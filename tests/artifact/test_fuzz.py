"""Artifact reader fuzz: random mutations of a valid small artifact fed to the container reader and
``ds4c.load`` raise nothing but ``Ds4cError`` subclasses (hypothesis; bounded, no deadline).

Three kinds of damage: bytes of the file (flipped, overwritten, cut, inserted: what a bad download
or disk does); the manifest's JSON (keys dropped, values replaced by other types, huge and negative
numbers, paths, lists for objects), written back as a consistent container or raw into the zip; and
the small members' bytes (IR text, constants, plans), written back with consistent sha256s.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ds4c  # noqa: E402
from ds4c.artifact import MANIFEST, SIGNATURE, open_container, write_container  # noqa: E402
from ds4c.errors import Ds4cError  # noqa: E402

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# values a hostile or damaged manifest may hold
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, -1, 1, 2, 7, 2**31, 2**63, -(2**63), 10**30, -(10**30)]), st.integers(),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.5, -1e308, 1e-320]),
    st.sampled_from(["", "B", "float32", "int64", "bfloat16", "../../etc/passwd", "/tmp/x", "kernels/../../x",
                     "ir/prefill.ds4ir", "weights.safetensors", "embed", "reference", "npu", "triton", "prefill",
                     "decode", "aten.from_file.default", "os.system", "\x00", "é" * 3]),
    st.text(max_size=12),
)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=8)


@pytest.fixture(scope="module")
def original(tiny_cpu_artifact) -> dict[str, Any]:
    with open_container(tiny_cpu_artifact) as c:
        return {"bytes": tiny_cpu_artifact.read_bytes(), "manifest": c.manifest,
                "members": {n: c.read_bytes(n) for n in c.member_names()}}


def _must_refuse_or_load(path: Path) -> None:
    """Open and load ``path``: either works or raises a Ds4cError; anything else fails the test."""
    try:
        with open_container(path):
            pass
        model = ds4c.load(path)
    except Ds4cError:
        return
    assert model.vocab_size > 0


def _walk(data: st.DataObject, node: Any) -> tuple[Any, Any]:
    """A random (container, key) inside ``node``: a dict key or list index at some depth."""
    parent, key = None, None
    while isinstance(node, dict | list) and node and (parent is None or data.draw(st.booleans(), label="deeper")):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, data.draw(st.sampled_from(keys), label="key")
        node = node[key]
    return parent, key


def _mutate_manifest(data: st.DataObject, manifest: dict[str, Any]) -> None:
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        parent, key = _walk(data, manifest)
        if parent is None:
            return
        how = data.draw(st.sampled_from(["drop", "replace", "swap", "wrap", "grow"]), label="how")
        value = parent[key]
        if how == "drop":
            if isinstance(parent, dict):
                del parent[key]
            else:
                parent.pop(key)
        elif how == "replace":
            parent[key] = data.draw(JSON, label="value")
        elif how == "swap":  # a list where an object is expected and the other way round
            parent[key] = (list(value.values()) if isinstance(value, dict) else
                           {str(i): v for i, v in enumerate(value)} if isinstance(value, list) else [value])
        elif how == "wrap":
            parent[key] = {"value": value}
        elif isinstance(value, int | float) and not isinstance(value, bool):
            parent[key] = data.draw(st.sampled_from([-value - 1, value * 2**40 + 1, 2**64, -(2**64)]), label="n")
        elif isinstance(value, str):
            parent[key] = value + data.draw(st.sampled_from(["/../../x", "\x00", "x", "/"]), label="suffix")


def _raw_manifest(src: bytes, manifest_bytes: bytes, dest: Path) -> None:
    """``src``'s zip with manifest.json replaced and the signature dropped (no hashes recomputed)."""
    import io

    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename != SIGNATURE:
                zout.writestr(info, manifest_bytes if info.filename == MANIFEST else zin.read(info.filename))


@FUZZ
@given(data=st.data())
def test_damaged_bytes_are_refused_cleanly(original, data):
    blob = bytearray(original["bytes"])
    n = len(blob)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        # the manifest at the start and the zip directory at the end are where structure lives
        region = data.draw(st.sampled_from(["head", "tail", "anywhere"]), label="region")
        lo, hi = {"head": (0, min(n, 4096)), "tail": (max(0, n - 4096), n), "anywhere": (0, n)}[region]
        pos = data.draw(st.integers(lo, max(lo, hi - 1)), label="pos")
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "zero"]), label="op")
        if op == "flip":
            blob[pos] ^= data.draw(st.integers(1, 255), label="mask")
        elif op == "set":
            blob[pos:pos + 4] = data.draw(st.binary(min_size=4, max_size=4), label="bytes")
        elif op == "cut":
            del blob[pos:]
        elif op == "insert":
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
        else:
            blob[pos:pos + 64] = bytes(len(blob[pos:pos + 64]))
        n = len(blob)
        if not n:
            break
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "damaged.ds4"
        path.write_bytes(bytes(blob))
        _must_refuse_or_load(path)


@FUZZ
@given(data=st.data())
def test_hostile_manifests_are_refused_cleanly(original, data):
    manifest = json.loads(json.dumps(original["manifest"]))
    _mutate_manifest(data, manifest)
    raw = data.draw(st.booleans(), label="raw")  # raw: members/format keys mutated too, hashes as they were
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hostile.ds4"
        if raw:
            try:
                text = json.dumps(manifest).encode()
            except ValueError:
                return
            _raw_manifest(original["bytes"], text, path)
        else:
            try:
                write_container(path, manifest, original["members"])
            except Ds4cError:
                return
        _must_refuse_or_load(path)


@FUZZ
@given(data=st.data())
def test_damaged_members_with_consistent_hashes_are_refused_cleanly(original, data):
    members = dict(original["members"])
    name = data.draw(st.sampled_from(sorted(n for n in members if n != "weights.safetensors")), label="member")
    blob = bytearray(members[name])
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        pos = data.draw(st.integers(0, max(0, len(blob) - 1)), label="pos")
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "swap-digit"]), label="op")
        if op == "flip" and blob:
            blob[pos] ^= data.draw(st.integers(1, 255), label="mask")
        elif op == "cut":
            del blob[pos:]
        elif op == "insert":
            blob[pos:pos] = data.draw(st.sampled_from([b"\x00", b"{", b"]", b"-1", b"99999999999", b"%", b"\n"]),
                                      label="bytes")
        elif blob and chr(blob[pos]).isdigit():  # a number in a header or the IR changed, the text still parses
            blob[pos] = ord(data.draw(st.sampled_from("0123456789"), label="digit"))
    members[name] = bytes(blob)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "members.ds4"
        write_container(path, original["manifest"], members)
        _must_refuse_or_load(path)


def _kernels_section(members: dict[str, bytes]) -> dict[str, Any]:
    """A well-formed Triton kernels section for one kernel of a gfx942 artifact, its files in ``members``."""
    import hashlib

    files = {}
    for suffix, blob in ((".json", b'{"name": "_k"}'), (".hsaco", b"\x7fELF code"), (".amdgcn", b"v_mfma")):
        member = f"kernels/gfx942/_k-0123{suffix}"
        members[member] = blob
        files[f"_k{suffix}"] = {"member": member, "sha256": hashlib.sha256(blob).hexdigest()}
    members["kernels/src/k.py"] = b"# source"
    return {"format": 1, "compiler": "triton", "triton_version": "3.9.0", "target": "mi300x", "arch": "gfx942",
            "triton_target": ["hip", "gfx942", 64], "binary_format": "hsaco",
            "sources": {"k": {"member": "kernels/src/k.py", "sha256": hashlib.sha256(b"# source").hexdigest()}},
            "binaries": [{"name": "_k", "function": "ds4c.backends.triton.kernels.k._k", "ops": ["rms_norm"],
                          "source": "kernels/src/k.py", "arch": "gfx942", "triton_version": "3.9.0",
                          "cache_key": "ab" * 32, "specialization": "{}", "config": {"num_warps": 4},
                          "binary": files["_k.hsaco"]["member"], "files": files}]}


@FUZZ
@given(data=st.data())
def test_hostile_kernels_sections_are_refused_cleanly(data):
    """The kernels section is read whenever an artifact with binaries is loaded (``verify_section``):
    a mutated one is refused with a Ds4cError, or the binaries are not used; nothing else."""
    import torch

    from ds4c.runtime import binaries

    members: dict[str, bytes] = {}
    section = _kernels_section(members)
    manifest = {"kernels": section}
    _mutate_manifest(data, manifest)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ds4"
        write_container(path, {}, members)
        with open_container(path) as c:
            try:
                status = binaries.use_stored_binaries(manifest, c, torch.device("cpu"), "kernels", trust=None)
            except Ds4cError:
                return
    assert isinstance(status, str)
