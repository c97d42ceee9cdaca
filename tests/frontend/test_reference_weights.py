"""Artifacts whose weights stay in their checkpoint (``weights="reference"``) record the size and
sha256 of every file they read, refuse a changed checkpoint naming the file and the recorded
path, say what they reference when it is gone, and run from a moved one given --weights-from."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import ds4c
from ds4c.cli import app
from ds4c.errors import CheckpointError, InputError
from ds4c.frontend import file_record
from tests.hf_configs import SMALL_CONFIGS, make_hf_model

IDS = [[3, 1, 4, 1, 5, 9, 2, 6]]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A sharded checkpoint, an artifact referencing it, and the logits an embedded artifact gives."""
    root = tmp_path_factory.mktemp("ref")
    ckpt = root / "ckpt"
    make_hf_model(SMALL_CONFIGS["mixed"], 0).save_pretrained(ckpt, max_shard_size="100KB")
    art = ds4c.compile(ckpt, target="cpu", weights="reference", max_context=32, progress=False)
    path = art.save(root / "ref.ds4")
    embedded = ds4c.compile(ckpt, target="cpu", weights="embed", max_context=32, progress=False)
    want = ds4c.load(embedded.save(root / "embed.ds4"))(IDS)
    return ckpt, path, want


def _copy(ckpt, dst):
    shutil.copytree(ckpt, dst)
    return dst


def test_the_artifact_records_every_file_it_reads(compiled):
    ckpt, path, want = compiled
    source = ds4c.load(path).manifest["weights"]["source"]
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(source["files"]) == sorted(["model.safetensors.index.json", *shards])
    for name, rec in source["files"].items():
        data = (ckpt / name).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert torch.equal(ds4c.load(path)(IDS), want)


@pytest.mark.parametrize("change", ["byte flipped", "shard grown", "index edited", "shard removed",
                                    "extra shard read"])
def test_a_changed_checkpoint_is_refused_naming_the_file_and_the_recorded_path(compiled, tmp_path, change):
    ckpt, path, _ = compiled
    d = _copy(ckpt, tmp_path / "changed")
    shard = sorted(d.glob("*.safetensors"))[1]
    if change == "byte flipped":  # same size, one weight byte different: only the hash tells
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0x40
        shard.write_bytes(bytes(data))
        culprit, match = shard, r"changed since the artifact .* was compiled against .*/ckpt/.* \(now sha256"
    elif change == "shard grown":
        shard.write_bytes(shard.read_bytes() + b"\0" * 8)
        culprit, match = shard, r"changed since the artifact .*\(now \d+ bytes, recorded \d+ bytes\)"
    elif change == "index edited":
        index = d / "model.safetensors.index.json"
        index.write_text(index.read_text().replace("\n", "\n "))
        culprit, match = index, r"changed since the artifact"
    elif change == "shard removed":
        shard.unlink()
        culprit, match = shard, r"missing; the artifact .* reads its weights from this file \(compiled against .*/ckpt/"
    else:  # no index: every *.safetensors is read, one of them never recorded
        (d / "model.safetensors.index.json").unlink()
        culprit, match = d / "model.safetensors.index.json", "missing"
    with pytest.raises(CheckpointError, match=match) as e:
        ds4c.load(path, weights_from=d)
    message = str(e.value)
    assert message.startswith(f"{culprit}:") and str(path) in message and "\n" not in message
    if change != "shard removed":
        assert str(ckpt) in message or change == "extra shard read"


def test_a_file_the_record_does_not_name_is_refused(tmp_path):
    """A one-file checkpoint gains a second safetensors file: the load would read it, the record
    does not name it."""
    ckpt = tmp_path / "one"
    make_hf_model(SMALL_CONFIGS["mixed"], 0).save_pretrained(ckpt)
    path = ds4c.compile(ckpt, target="cpu", weights="reference", max_context=32, progress=False).save(
        tmp_path / "one.ds4")
    from safetensors.torch import save_file

    save_file({"mtp.0.extra.weight": torch.zeros(2)}, str(ckpt / "zz-extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"zz-extra.safetensors: the weight load reads this file, but the "
                                              r"artifact .* does not record it"):
        ds4c.load(path)


def test_the_checkpoint_changed_in_place_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    make_hf_model(SMALL_CONFIGS["mixed"], 0).save_pretrained(ckpt)
    path = ds4c.compile(ckpt, target="cpu", weights="reference", max_context=32, progress=False).save(
        tmp_path / "a.ds4")
    ds4c.load(path)
    make_hf_model(SMALL_CONFIGS["mixed"], 1).save_pretrained(ckpt)  # fine-tuned / re-downloaded in place
    with pytest.raises(CheckpointError, match=rf"{ckpt}/model.safetensors: changed since the artifact {path}"):
        ds4c.load(path)
    res = CliRunner().invoke(app, ["run", str(path), "--prompt-ids", "1,2,3", "-n", "2"])
    assert res.exit_code == 2 and "changed since the artifact" in res.output and "Traceback" not in res.output


def test_a_moved_checkpoint_is_named_and_can_be_re_pointed(compiled, tmp_path):
    ckpt, path, want = compiled
    moved = tmp_path / "moved"
    shutil.move(_copy(ckpt, tmp_path / "tmp"), moved)
    art = tmp_path / "ref.ds4"
    manifest_path = ckpt  # the artifact records the original location; make that location vanish
    shutil.copy(path, art)
    hidden = ckpt.with_name("ckpt-hidden")
    ckpt.rename(hidden)
    try:
        with pytest.raises(CheckpointError, match=rf"{manifest_path}: not found; the artifact {art} references this "
                                                  r"checkpoint directory .* --weights-from DIR"):
            ds4c.load(art)
        res = CliRunner().invoke(app, ["run", str(art), "--prompt-ids", "1,2,3", "-n", "2"])
        assert res.exit_code == 2 and "--weights-from" in res.output and "Traceback" not in res.output
        assert torch.equal(ds4c.load(art, weights_from=moved)(IDS), want)
        res = CliRunner().invoke(app, ["run", str(art), "--prompt-ids", "1,2,3", "-n", "2",
                                       "--weights-from", str(moved)])
        assert res.exit_code == 0 and "generated ids" in res.output, res.output
        with pytest.raises(CheckpointError, match=r"--weights-from .*nowhere: no checkpoint directory there"):
            ds4c.load(art, weights_from=tmp_path / "nowhere")
    finally:
        hidden.rename(ckpt)


def test_weights_from_is_refused_where_there_is_no_checkpoint(compiled, tmp_path):
    ckpt, _, _ = compiled
    embedded = compiled[1].with_name("embed.ds4")
    with pytest.raises(InputError, match="embeds its weights"):
        ds4c.load(embedded, weights_from=ckpt)
    preset = ds4c.compile("tiny", target="cpu", weights="reference", max_context=16, progress=False)
    p = preset.save(tmp_path / "preset.ds4")
    with pytest.raises(Exception, match=r"takes its weights from a preset \('tiny'\), not from a checkpoint"):
        ds4c.load(p, weights_from=ckpt)


def test_a_hostile_record_cannot_point_outside_the_directory(compiled, tmp_path):
    """The record comes from the artifact, which is untrusted too: a name with '..' is refused."""
    ckpt, _, _ = compiled
    check = file_record.RecordCheck({"../secret": {"size": 1, "sha256": "0" * 64}}, "the artifact x.ds4", str(ckpt))
    with pytest.raises(CheckpointError, match=r"records the weight file '../secret', which is not a name inside"):
        check.before_reading(ckpt)


def test_the_stat_cache_skips_rehashing_only_unchanged_files(tmp_path, monkeypatch):
    """A file hashed once is not read again while its stat is unchanged; a same-size rewrite
    whose mtime is set back is still rehashed (its ctime moved) and seen as different."""
    monkeypatch.setenv("DS4C_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(file_record, "RACY_SECONDS", 0.0)
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    reads = []
    real = hashlib.file_digest

    def counting(fh, name):
        reads.append(fh.name)
        return real(fh, name)

    monkeypatch.setattr(hashlib, "file_digest", counting)
    first = file_record.file_sha256(f)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest() and len(reads) == 1
    assert file_record.file_sha256(f) == first and len(reads) == 1  # from the cache
    st = f.stat()
    f.write_bytes(b"b" * 1000)
    import os

    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime forged back; ctime cannot be
    assert file_record.file_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest() and len(reads) == 2
    entry = next((tmp_path / "cache" / "file-hashes").glob("*.json"))
    assert json.loads(entry.read_text())["sha256"] == hashlib.sha256(b"b" * 1000).hexdigest()
