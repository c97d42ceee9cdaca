"""The .ds4 container: round trip, atomic writes, verification, clear refusals."""

from __future__ import annotations

import json
import mmap
import os
import zipfile
from pathlib import Path

import pytest

from ds4c.artifact import (
    DATA_ALIGNMENT,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    container,
    open_container,
    write_container,
)
from ds4c.errors import ArtifactError
from ds4c.version import __version__


@pytest.fixture
def artifact(tmp_path) -> Path:
    """An artifact with a small text member and a streamed 3 MiB file member."""
    big = tmp_path / "weights.bin"
    big.write_bytes(bytes(range(256)) * (3 << 12))
    p = tmp_path / "a.ds4"
    write_container(p, {"target": {"name": "cpu"}, "pipeline": ["cse", "dce"]},
                    {"ir/prefill.ds4ir": b"graph text", "weights.safetensors": big, "x": b"seven b"})
    big.unlink()
    return p


def test_round_trip(artifact):
    with open_container(artifact) as c:
        m = c.manifest
        assert m["format"] == FORMAT and m["format_version"] == FORMAT_VERSION and m["ds4c_version"] == __version__
        assert m["created"].endswith("+00:00") and m["target"] == {"name": "cpu"} and m["pipeline"] == ["cse", "dce"]
        assert c.member_names() == ["ir/prefill.ds4ir", "weights.safetensors", "x"]
        assert m["members"]["x"]["size"] == 7 and len(m["members"]["x"]["sha256"]) == 64
        assert c.read_bytes("ir/prefill.ds4ir") == b"graph text"
        weights = c.read_bytes("weights.safetensors")
        assert weights == bytes(range(256)) * (3 << 12) and "x" in c and "y" not in c
        with c.open_member("weights.safetensors") as f:
            f.seek(1000)
            assert f.read(3) == weights[1000:1003]
            f.seek(-2, os.SEEK_END)
            assert f.read() == weights[-2:] and f.read() == b""
        dest = c.extract("x", artifact.parent / "x.out")
        assert dest.read_bytes() == b"seven b"
        with pytest.raises(ArtifactError, match="no member 'nope'; it has: ir/prefill.ds4ir, weights"):
            c.read_bytes("nope")


def test_layout_manifest_first_stored_aligned_and_readable_by_any_zip_tool(artifact):
    with zipfile.ZipFile(artifact) as z:
        infos = z.infolist()
        assert infos[0].filename == MANIFEST
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        assert z.testzip() is None and z.read("x") == b"seven b"
    with open_container(artifact) as c, open(artifact, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        for name in c.member_names():
            offset, size = c.member_span(name)
            assert offset % DATA_ALIGNMENT == 0
            assert mm[offset:offset + size] == c.read_bytes(name)
        mm.close()


def test_writer_owns_the_reserved_manifest_keys(tmp_path, artifact):
    with open_container(artifact) as c:
        old = c.manifest
    p = tmp_path / "b.ds4"
    write_container(p, {**old, "format_version": 99, "format": "zip"}, {"y": b"1"})  # re-saving a loaded manifest
    with open_container(p) as c:
        assert c.manifest["format_version"] == FORMAT_VERSION and c.manifest["format"] == FORMAT
        assert c.member_names() == ["y"] and c.manifest["target"] == {"name": "cpu"}


def test_failure_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path, artifact, monkeypatch):
    """The second member's copy fails after the temp file has its manifest and first member."""
    before = artifact.read_bytes()
    real_copy = container._copy_member
    seen: list[str] = []

    def copy_then_fail(zf, name, *args):
        if name == "n":
            seen.extend(p.name for p in tmp_path.iterdir())
            raise OSError("disk on fire")
        real_copy(zf, name, *args)

    monkeypatch.setattr(container, "_copy_member", copy_then_fail)
    with pytest.raises(OSError, match="disk on fire"):
        write_container(artifact, {}, {"m": b"new", "n": b"newer"})
    assert any(n.endswith(".tmp") for n in seen)  # it really failed mid-write
    assert artifact.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.ds4"]


def test_interrupt_mid_write_also_cleans_up(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(container, "_copy_member", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_container(tmp_path / "a.ds4", {}, {"m": b"1"})
    assert list(tmp_path.iterdir()) == []


def test_failure_before_writing_and_bad_inputs_leave_nothing(tmp_path):
    p = tmp_path / "a.ds4"
    with pytest.raises(ArtifactError, match="not JSON-serializable"):
        write_container(p, {"tensor": object()}, {"m": b"1"})
    with pytest.raises(ArtifactError, match="pass bytes or a path object"):
        write_container(p, {}, {"m": "some text"})
    with pytest.raises(ArtifactError, match="is not a readable file"):
        write_container(p, {}, {"m": tmp_path / "missing.bin"})
    assert list(tmp_path.iterdir()) == []


def test_file_changing_while_written_is_refused(tmp_path, monkeypatch):
    src = tmp_path / "w.bin"
    src.write_bytes(b"version 1")
    real_hash = container._hash_file

    def hash_then_someone_writes(path):
        digest = real_hash(path)
        path.write_bytes(b"version 2")
        return digest

    monkeypatch.setattr(container, "_hash_file", hash_then_someone_writes)
    with pytest.raises(ArtifactError, match="member 'w': .*w.bin changed while the artifact was being written"):
        write_container(tmp_path / "x.ds4", {}, {"w": src})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin"]


def test_truncated_and_not_an_artifact(tmp_path, artifact):
    data = artifact.read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 10, 0):
        t = tmp_path / "t.ds4"
        t.write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match="is truncated or not a ds4c artifact"):
            open_container(t)
    j = tmp_path / "j.ds4"
    j.write_text("hello")
    with pytest.raises(ArtifactError, match="truncated or not a ds4c artifact"):
        open_container(j)
    with zipfile.ZipFile(j, "w") as z:
        z.writestr("manifest.json", json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="not a ds4c artifact .*'something-else'"):
        open_container(j)
    with pytest.raises(ArtifactError, match="no such artifact file"):
        open_container(tmp_path / "absent.ds4")


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_names_the_member(artifact):
    with open_container(artifact) as c:
        offset, size = c.member_span("weights.safetensors")
    _flip_byte(artifact, offset + size // 2)
    msg = r"member 'weights.safetensors' of .*a.ds4 is corrupted: sha256 mismatch; recompile or re-download"
    with pytest.raises(ArtifactError, match=msg):
        open_container(artifact)
    # unverified at open: refused on every kind of read, the other members still read fine
    with open_container(artifact, verify=False) as c:
        assert c.read_bytes("x") == b"seven b"
        for read in (c.read_bytes, c.open_member, c.member_span, c.verify):
            with pytest.raises(ArtifactError, match=msg):
                read("weights.safetensors")
        with pytest.raises(ArtifactError, match=msg):
            c.extract("weights.safetensors", artifact.parent / "w.out")
        assert not (artifact.parent / "w.out").exists()


def test_big_members_are_verified_lazily(artifact):
    with open_container(artifact) as c:
        offset, _ = c.member_span("weights.safetensors")
    _flip_byte(artifact, offset)
    with open_container(artifact, eager_verify_bytes=1 << 20) as c:  # 3 MiB member: checked on first use
        assert c.read_bytes("ir/prefill.ds4ir") == b"graph text"
        with pytest.raises(ArtifactError, match="'weights.safetensors' .* sha256 mismatch"):
            c.open_member("weights.safetensors")


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy a zip member by member through ``edit(name, data) -> data | None (drop)``, then extras."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)


def _edit_manifest(fn):
    def edit(name, data):
        if name == MANIFEST:
            m = json.loads(data)
            fn(m)
            return json.dumps(m).encode()
        return data
    return edit


def test_newer_format_version_refused(tmp_path, artifact):
    n = tmp_path / "n.ds4"
    _rewrite(artifact, n, _edit_manifest(lambda m: m.update(format_version=FORMAT_VERSION + 1)))
    with pytest.raises(ArtifactError, match=f"artifact format version {FORMAT_VERSION + 1} is newer than this "
                                            f"ds4c supports \\({FORMAT_VERSION}\\); upgrade ds4c"):
        open_container(n)


def test_unlisted_missing_duplicate_and_compressed_members_refused(tmp_path, artifact):
    with zipfile.ZipFile(artifact, "a") as z:
        z.writestr("sneaky", b"!")
    with pytest.raises(ArtifactError, match="'sneaky' is not listed in the manifest"):
        open_container(artifact)
    missing = tmp_path / "m.ds4"
    _rewrite(artifact, missing, lambda n, d: None if n in ("x", "sneaky") else d)
    with pytest.raises(ArtifactError, match="member 'x' listed in the manifest is missing"):
        open_container(missing)
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(missing, "a") as z:
        z.writestr("ir/prefill.ds4ir", b"graph text")
    with pytest.raises(ArtifactError, match="'ir/prefill.ds4ir' appears twice"):
        open_container(missing)
    deflated = tmp_path / "d.ds4"
    with zipfile.ZipFile(artifact) as zin, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename != "sneaky":
                zout.writestr(info.filename, zin.read(info.filename))
    with pytest.raises(ArtifactError, match="is compressed or encrypted"):
        open_container(deflated)


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/../../b", "a/./b", "a//b", "dir/", "a\\b", "C:/x",
                                  "manifest.json", ""])
def test_bad_member_names_refused_on_write(tmp_path, name):
    with pytest.raises(ArtifactError, match="invalid artifact member name"):
        write_container(tmp_path / "a.ds4", {}, {name: b"x"})
    assert list(tmp_path.iterdir()) == []


def test_bad_member_names_refused_on_read(tmp_path, artifact):
    evil = tmp_path / "evil.ds4"
    with zipfile.ZipFile(artifact) as zin, zipfile.ZipFile(evil, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == MANIFEST:
                m = json.loads(data)
                m["members"]["../x"] = m["members"].pop("x")
                data = json.dumps(m).encode()
            zout.writestr("../x" if info.filename == "x" else info.filename, data)
    with pytest.raises(ArtifactError, match="invalid artifact member name '../x'"):
        open_container(evil)


# -- file handling: mode, temp files of killed writers ------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_artifact_mode_follows_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_container(tmp_path / "a.ds4", {}, {"m": b"1"})
    finally:
        os.umask(old)
    assert (tmp_path / "a.ds4").stat().st_mode & 0o777 == 0o666 & ~mask


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from ds4c.artifact import container

real = container._copy_member

def copy_then_hang(zf, name, *args):
    real(zf, name, *args)
    if name == "m2":  # the temp file holds the manifest and two members: stop here
        print("writing", flush=True)
        time.sleep(120)

container._copy_member = copy_then_hang
container.write_container(Path(sys.argv[1]), {}, {"m1": b"1", "m2": b"2" * 100000, "m3": b"3"})
"""


def test_temp_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    import signal
    import subprocess
    import sys

    target = tmp_path / "a.ds4"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(temps) == 1 and temps[0].name.startswith(f".a.ds4.{proc.pid}-")
        # a live writer's temp file is left alone, also by a write of the same artifact
        assert container.remove_stale_temps(target) == [] and temps[0].exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert temps[0].exists() and not target.exists()  # SIGKILL: nothing cleaned up, nothing renamed
    write_container(target, {}, {"m": b"fresh"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ds4"]
    with open_container(target) as c:
        assert c.read_bytes("m") == b"fresh"


def test_stale_temp_scheme_touches_only_its_own_files(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    target = tmp_path / "m.ds4"
    stale = [tmp_path / f".m.ds4.{pid}-abc123_x.tmp", tmp_path / f".m.ds4.{pid}-q9.weights.tmp"]
    kept = [tmp_path / f".m.ds4.{os.getppid()}-abc.tmp",  # a live process's
            tmp_path / f".other.ds4.{pid}-abc.tmp",  # another artifact's
            tmp_path / f".m.ds4.{pid}-abc.tmp.keep", tmp_path / ".m.ds4.notapid-abc.tmp",
            tmp_path / "m.ds4.123-abc.tmp"]  # not a temp of this scheme
    for p in stale + kept:
        p.write_bytes(b"partial")
    (tmp_path / f".m.ds4.{pid}-dir.tmp").mkdir()  # a directory of that name is not ours either
    kept.append(tmp_path / f".m.ds4.{pid}-dir.tmp")
    removed = container.remove_stale_temps(target)
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


def test_saving_an_artifact_with_weights_leaves_only_the_artifact(tmp_path):
    """Artifact.save streams embedded weights through a temp file of the same scheme beside the output."""
    import torch

    from ds4c.artifact.artifact import Artifact, read_artifact
    from ds4c.ir.graph import Program

    art = Artifact({"target": {"name": "cpu"}, "weights": {"mode": "embed"}}, Program({}, {}),
                   {"w": torch.arange(6.0).reshape(2, 3)})
    art.save(tmp_path / "w.ds4", sign_key=False)
    assert [p.name for p in tmp_path.iterdir()] == ["w.ds4"]
    with open_container(tmp_path / "w.ds4") as c:
        assert "weights.safetensors" in c and c.signature is None
    with pytest.raises(ArtifactError, match="manifest field"):  # not a complete artifact: named, not a crash
        read_artifact(tmp_path / "w.ds4")
