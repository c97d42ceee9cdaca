"""The .ds4 container: atomic writes, verification, clear refusals."""

from __future__ import annotations

import json
import zipfile

import pytest

from ds4c.artifact.container import FORMAT_VERSION, open_container, write_container
from ds4c.errors import ArtifactError


def test_round_trip_and_streamed_members(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (3 << 20))
    p = tmp_path / "a.ds4"
    write_container(p, {"target": {"name": "cpu"}}, {"ir/prefill.ds4ir": b"graph", "weights.safetensors": big})
    c = open_container(p)
    assert c.manifest["format_version"] == FORMAT_VERSION and c.manifest["target"]["name"] == "cpu"
    assert c.read_bytes("ir/prefill.ds4ir") == b"graph"
    assert len(c.read_bytes("weights.safetensors")) == 3 << 20
    with zipfile.ZipFile(p) as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())


class Boom:
    def __fspath__(self):
        raise RuntimeError("disk on fire")


def test_failure_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.ds4"
    write_container(p, {}, {"m": b"old"})
    before = p.read_bytes()
    with pytest.raises(RuntimeError):
        write_container(p, {}, {"m": b"new", "n": Boom()})
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["a.ds4"]


def test_truncated_and_not_an_artifact(tmp_path):
    p = tmp_path / "a.ds4"
    write_container(p, {}, {"m": b"0123456789" * 1000})
    data = p.read_bytes()
    t = tmp_path / "t.ds4"
    t.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or not a ds4c artifact"):
        open_container(t)
    j = tmp_path / "j.ds4"
    j.write_text("hello")
    with pytest.raises(ArtifactError, match="not a ds4c artifact"):
        open_container(j)


def _rewrite(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)


def test_flipped_byte_names_the_member(tmp_path):
    p = tmp_path / "a.ds4"
    write_container(p, {}, {"weights.safetensors": b"abcdef" * 100, "ir/x": b"ok"})
    bad = tmp_path / "b.ds4"
    _rewrite(p, bad, lambda n, d: (b"X" + d[1:]) if n == "weights.safetensors" else d)
    with pytest.raises(ArtifactError, match="member 'weights.safetensors' .* corrupted: sha256 mismatch"):
        open_container(bad)


def test_newer_version_and_unlisted_member_refused(tmp_path):
    p = tmp_path / "a.ds4"
    write_container(p, {}, {"m": b"1"})

    def newer(n, d):
        if n == "manifest.json":
            m = json.loads(d)
            m["format_version"] = FORMAT_VERSION + 1
            return json.dumps(m).encode()
        return d

    _rewrite(p, tmp_path / "n.ds4", newer)
    with pytest.raises(ArtifactError, match="newer than this ds4c supports"):
        open_container(tmp_path / "n.ds4")
    with zipfile.ZipFile(p, "a") as z:
        z.writestr("sneaky", b"!")
    with pytest.raises(ArtifactError, match="'sneaky' is not listed"):
        open_container(p)


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/../../b", "manifest.json", ""])
def test_bad_member_names(tmp_path, name):
    with pytest.raises(ArtifactError, match="invalid artifact member name"):
        write_container(tmp_path / "a.ds4", {}, {name: b"x"})
    assert not (tmp_path / "a.ds4").exists()
