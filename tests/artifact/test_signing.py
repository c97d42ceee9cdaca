"""Artifact signatures: signed at save with the local key or a given one, checked at load; a
manifest changed after signing is refused; unsigned and foreign-signed artifacts are untrusted
until their key is trusted or they are signed anew by a trusted key."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ds4c
from ds4c.artifact import MANIFEST, SIGNATURE, open_container, signing, write_container
from ds4c.artifact.artifact import read_artifact
from ds4c.cli import app
from ds4c.errors import ArtifactError


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh ds4c home (no keys yet) for this test."""
    path = tmp_path / "home"
    monkeypatch.setenv("DS4C_HOME", str(path))
    return path


def _foreign_key(path: Path) -> Path:
    """A publisher's Ed25519 key, as `openssl genpkey -algorithm ed25519` writes it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.with_suffix(".pub").write_bytes(signing.public_key_pem(key))
    return path


def _trust(path: Path) -> signing.Trust:
    with open_container(path) as c:
        return signing.artifact_trust(c)


def test_local_key_made_on_first_use_private_and_trusted(home, tmp_path):
    p = tmp_path / "a.ds4"
    write_container(p, {"x": 1}, {"m": b"data"}, sign=signing.signer(True))
    key = home / signing.KEY_FILE
    assert key.stat().st_mode & 0o777 == 0o600 and home.stat().st_mode & 0o077 == 0
    trust = _trust(p)
    assert trust.trusted and trust.key_id in trust.reason and "this user's key" in trust.reason
    with open_container(p) as c:
        sig = json.loads(c.signature)
        assert sig["algorithm"] == "ed25519" and sig["key_id"] == trust.key_id
    key.chmod(0o644)  # a private key others can read is not used to sign
    with pytest.raises(ArtifactError, match="readable by other users.*chmod 600"):
        signing.signer(True)


def test_unsigned_and_foreign_artifacts_are_untrusted_until_trusted_or_resigned(home, tmp_path):
    unsigned = tmp_path / "u.ds4"
    write_container(unsigned, {}, {"m": b"1"})
    assert not _trust(unsigned).trusted and "unsigned" in _trust(unsigned).reason
    publisher = _foreign_key(tmp_path / "publisher.pem")
    foreign = tmp_path / "f.ds4"
    write_container(foreign, {}, {"m": b"1"}, sign=signing.signer(publisher))
    found = _trust(foreign)
    assert not found.trusted and f"signed by key {found.key_id}, which is not trusted" in found.reason
    with open_container(foreign) as c:
        assert signing.artifact_trust(c, trust_binaries=True).trusted  # the user's explicit override
    # trusting the publisher's public key
    assert signing.trust_key(publisher.with_suffix(".pub")) == found.key_id
    assert _trust(foreign).trusted and f"trusted-keys/{found.key_id}.pub" in _trust(foreign).reason
    signing.untrust_key(found.key_id)
    assert not _trust(foreign).trusted
    # or signing it anew with a trusted key (after checking it): members kept byte for byte
    before = {n: open_container(foreign).read_bytes(n) for n in ("m",)}
    signing.sign_file(foreign)
    assert _trust(foreign).trusted and "this user's key" in _trust(foreign).reason
    with open_container(foreign) as c:
        assert c.read_bytes("m") == before["m"]
    signing.sign_file(unsigned, publisher)  # with a given key: untrusted here, as that key is
    assert not _trust(unsigned).trusted
    with pytest.raises(ArtifactError, match="not a PEM public key"):
        signing.trust_key(unsigned)


def _rewrite_manifest(src: Path, dst: Path, edit, keep_signature: bool = True) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == MANIFEST:
                m = json.loads(data)
                edit(m)
                data = json.dumps(m, indent=1).encode()
            if info.filename != SIGNATURE or keep_signature:
                zout.writestr(info, data)


def test_manifest_changed_after_signing_is_refused(tiny_cpu_artifact, tmp_path):
    assert _trust(tiny_cpu_artifact).trusted
    bad = tmp_path / "bad.ds4"  # a bigger context: consistent member hashes, old signature
    _rewrite_manifest(tiny_cpu_artifact, bad, lambda m: m.update(max_context=4096))
    with pytest.raises(ArtifactError, match="does not match its signature .*modified after it was signed"):
        read_artifact(bad)
    with pytest.raises(ArtifactError, match="modified after it was signed"):
        ds4c.load(bad, trust_binaries=True)  # no override for a file nobody signed
    res = CliRunner().invoke(app, ["run", str(bad), "--prompt-ids", "1,2"])
    assert res.exit_code == 2 and "modified after it was signed" in res.output and "Traceback" not in res.output
    # the same edit with the signature stripped: an unsigned artifact, which runs (its native code would not)
    stripped = tmp_path / "stripped.ds4"
    _rewrite_manifest(tiny_cpu_artifact, stripped, lambda m: None, keep_signature=False)
    model = ds4c.load(stripped)
    assert not model.trust.trusted and "unsigned" in model.trust.reason


@pytest.mark.parametrize("signature", [b"not json", b"[1, 2]", json.dumps({"format": "ds4c-signature/1"}).encode(),
                                       "swap-key", b"x" * (70 * 1024)])
def test_malformed_or_swapped_signature_is_refused(tmp_path, home, signature):
    p = tmp_path / "a.ds4"
    write_container(p, {}, {"m": b"1"}, sign=signing.signer(True))
    if signature == "swap-key":  # another key's public half under the same key id
        with open_container(p) as c:
            sig = json.loads(c.signature)
        other = _foreign_key(tmp_path / "other.pem")
        sig["public_key"] = json.loads(signing.signature_member(signing.load_signing_key(other), b"x"))["public_key"]
        signature = json.dumps(sig).encode()
    bad = tmp_path / "bad.ds4"
    with zipfile.ZipFile(p) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, signature if info.filename == SIGNATURE else zin.read(info.filename))
    with pytest.raises(ArtifactError):
        with open_container(bad) as c:
            signing.check(c)


def test_without_cryptography_artifacts_are_saved_unsigned_and_untrusted(tmp_path, home, monkeypatch):
    p = tmp_path / "signed.ds4"
    write_container(p, {}, {"m": b"1"}, sign=signing.signer(True))

    def missing():
        raise ImportError("No module named 'cryptography'")

    monkeypatch.setattr(signing, "_ed25519", missing)
    with pytest.warns(signing.SignatureWarning, match="saved unsigned.*cryptography"):
        sign = signing.signer(True)
    assert sign is None
    with pytest.raises(ArtifactError, match="cryptography"):
        signing.signer(tmp_path / "given.pem")  # an explicit key cannot be ignored
    found = _trust(p)
    assert not found.trusted and "cannot be checked" in found.reason and "cryptography" in found.reason


def test_given_key_through_save_and_cli(tmp_path, home, tiny_cpu_artifact):
    publisher = _foreign_key(tmp_path / "publisher.pem")
    manifest, program, _ = read_artifact(tiny_cpu_artifact)
    art = ds4c.artifact.artifact.Artifact(manifest, program, None)
    out = art.save(tmp_path / "given.ds4", sign_key=publisher)
    assert not _trust(out).trusted  # home has no keys: the publisher is not trusted yet
    runner = CliRunner()
    res = runner.invoke(app, ["trust", "add", str(publisher.with_suffix(".pub"))])
    assert res.exit_code == 0, res.output
    assert _trust(out).trusted
    res = runner.invoke(app, ["trust", "list"])
    assert res.exit_code == 0 and _trust(out).key_id in res.output
    res = runner.invoke(app, ["trust", "export", "-o", str(tmp_path / "mine.pub")])
    assert res.exit_code == 0 and (tmp_path / "mine.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    res = runner.invoke(app, ["trust", "add", str(tmp_path / "missing.pub")])
    assert res.exit_code == 2 and "cannot read the key" in res.output
    res = runner.invoke(app, ["trust", "remove", _trust(out).key_id])
    assert res.exit_code == 0 and not _trust(out).trusted
    res = runner.invoke(app, ["sign", str(out)])
    assert res.exit_code == 0 and _trust(out).trusted
    res = runner.invoke(app, ["compile", "tiny", "--target", "cpu", "--max-context", "16", "--sign-key",
                              str(tmp_path / "nope.pem"), "-o", str(tmp_path / "x.ds4")])
    assert res.exit_code == 2 and "signing key" in res.output and "openssl genpkey" in res.output
    assert not (tmp_path / "x.ds4").exists()
    assert not os.listdir(home / signing.TRUSTED_DIR)
