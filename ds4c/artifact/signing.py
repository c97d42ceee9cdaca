"""Artifact signatures: who wrote an artifact, and whether the native code it stores may run here.

An artifact can carry native code: Triton binaries for cuda / rocm targets, the NPU host build
(a shared library). Its manifest lists every member's sha256, so a signature over the manifest's
exact bytes covers every byte of the file. ``Artifact.save`` signs with this user's key (made on
first use) or a given one; loading checks the signature:

- it does not match the manifest: the artifact was modified after it was signed, and is refused;
- it matches, by a trusted key (this user's own, or one added with ``ds4c trust add``): the
  artifact is *trusted*, its stored native code is used;
- unsigned, signed by a key not trusted here, or ``cryptography`` not installed: *untrusted*. It
  still runs; its native code is not loaded (Triton JIT-compiles this ds4c's kernels, the NPU host
  build is rebuilt from the artifact's IR), unless the user says ``--trust-binaries``
  (``ds4c.load(..., trust_binaries=True)``).

Ed25519 (RFC 8032, through the ``cryptography`` package, imported only when used): a publisher
shares only a public key. HMAC would need the same secret on both sides, so trusting a publisher
would mean holding a key that can forge their artifacts. Files under the ds4c home
(``$DS4C_HOME``, else ``$XDG_CONFIG_HOME/ds4c``, else ``~/.config/ds4c``):

- ``signing-key.pem``: this user's private key, PKCS#8 PEM, mode 0600, made on first use;
- ``signing-key.pub``: its public half, to give to those who run your artifacts;
- ``trusted-keys/<key id>.pub``: public keys trusted besides the local one (PEM).

The signature is the container member ``signature.json`` (``container.SIGNATURE``):
``{"format": "ds4c-signature/1", "algorithm": "ed25519", "key_id", "public_key", "signature"}``,
key and signature in base64; a key id is the first 16 hex digits of the sha256 of the raw key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds4c.artifact.container import Container, rewrite_signature
from ds4c.errors import ArtifactError

SIGNATURE_FORMAT = "ds4c-signature/1"
ALGORITHM = "ed25519"
KEY_FILE = "signing-key.pem"
PUBLIC_KEY_FILE = "signing-key.pub"
TRUSTED_DIR = "trusted-keys"
HOW_TO_TRUST = ("trust its publisher's key with `ds4c trust add KEY.pub`, or, if you trust this file, pass "
                "--trust-binaries (ds4c.load(..., trust_binaries=True))")
_KEY_ID = re.compile(r"[0-9a-f]{16}")


class SignatureWarning(UserWarning):
    """An artifact could not be signed, or its signature could not be checked."""


@dataclass(frozen=True)
class Trust:
    """Whether an artifact's native code may run here (``trusted``), and why (``reason``)."""

    trusted: bool
    reason: str
    key_id: str | None = None

    def __str__(self) -> str:
        return f"{'trusted' if self.trusted else 'untrusted'}: {self.reason}"


def ds4c_home() -> Path:
    """ds4c's configuration directory: ``$DS4C_HOME``, else ``$XDG_CONFIG_HOME/ds4c``, else ``~/.config/ds4c``."""
    if os.environ.get("DS4C_HOME"):
        return Path(os.environ["DS4C_HOME"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "ds4c"


def crypto_available() -> bool:
    try:
        _ed25519()
    except ImportError:
        return False
    return True


def _ed25519() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519


def _serialization() -> Any:
    from cryptography.hazmat.primitives import serialization

    return serialization


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _raw_public(private_key: Any) -> bytes:
    s = _serialization()
    return private_key.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)


def public_key_pem(private_key: Any) -> bytes:
    s = _serialization()
    return private_key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)


# -- keys ----------------------------------------------------------------------------------------

def local_key(create: bool = True) -> Any:
    """This user's Ed25519 private key (made on first use when ``create``), or None if there is none."""
    path = ds4c_home() / KEY_FILE
    if not path.exists():
        if not create:
            return None
        _make_local_key(path)
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise ArtifactError(f"{path}: the signing key is readable by other users (mode "
                            f"{path.stat().st_mode & 0o777:o}); restrict it with `chmod 600 {path}`")
    return load_signing_key(path)


def _make_local_key(path: Path) -> None:
    s = _serialization()
    key = _ed25519().Ed25519PrivateKey.generate()
    pem = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:  # created 0600 from the start, never readable by others, even for a moment
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    (path.parent / PUBLIC_KEY_FILE).write_bytes(public_key_pem(key))


def load_signing_key(path: str | os.PathLike) -> Any:
    """An Ed25519 private key from a PKCS#8 PEM file (``openssl genpkey -algorithm ed25519``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"signing key {path}: cannot read it ({e.strerror}); give a readable PEM file "
                            "(make one with `openssl genpkey -algorithm ed25519 -out KEY.pem`)") from None
    try:
        key = _serialization().load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"signing key {path}: not an unencrypted PEM private key ({e}); make one with "
                            "`openssl genpkey -algorithm ed25519 -out KEY.pem`") from None
    if not isinstance(key, _ed25519().Ed25519PrivateKey):
        raise ArtifactError(f"signing key {path}: a {type(key).__name__}, ds4c signs with Ed25519 keys; make one "
                            "with `openssl genpkey -algorithm ed25519 -out KEY.pem`")
    return key


def _load_public(data: bytes, where: str) -> bytes:
    """The raw 32 bytes of an Ed25519 public key in a PEM file (a private key gives its public half)."""
    s = _serialization()
    try:
        key = s.load_pem_public_key(data)
    except (ValueError, TypeError):
        try:
            key = s.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as e:
            raise ArtifactError(f"{where}: not a PEM public key ({e}); give the publisher's signing-key.pub "
                                "(`ds4c trust export` writes yours)") from None
    if not isinstance(key, _ed25519().Ed25519PublicKey):
        raise ArtifactError(f"{where}: a {type(key).__name__}; ds4c artifacts are signed with Ed25519 keys, give "
                            "the publisher's signing-key.pub")
    return key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)


def trusted_keys() -> dict[str, tuple[bytes, str]]:
    """{key id: (raw public key, where it comes from)}: this user's key and ``trusted-keys/*.pub``."""
    out: dict[str, tuple[bytes, str]] = {}
    home = ds4c_home()
    folder = home / TRUSTED_DIR
    if folder.is_dir():
        for f in sorted(folder.glob("*.pub")):
            try:
                raw = _load_public(f.read_bytes(), str(f))
            except (ArtifactError, OSError) as e:
                warnings.warn(f"{f}: skipped, not a usable public key ({e})", SignatureWarning, stacklevel=2)
                continue
            out[key_id(raw)] = (raw, str(f))
    if (home / KEY_FILE).is_file():
        try:
            raw = _raw_public(load_signing_key(home / KEY_FILE))
        except ArtifactError as e:
            warnings.warn(f"this user's signing key is not usable ({e})", SignatureWarning, stacklevel=2)
        else:
            out[key_id(raw)] = (raw, f"this user's key ({home / KEY_FILE})")
    return out


def trust_key(path: str | os.PathLike) -> str:
    """Trust the Ed25519 public key in ``path``: artifacts it signed may run their native code. Returns its id."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the key ({e.strerror}); give the publisher's .pub file") from None
    raw = _load_public(data, str(path))
    kid = key_id(raw)
    s = _serialization()
    pem = _ed25519().Ed25519PublicKey.from_public_bytes(raw).public_bytes(s.Encoding.PEM,
                                                                          s.PublicFormat.SubjectPublicKeyInfo)
    folder = ds4c_home() / TRUSTED_DIR
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    (folder / f"{kid}.pub").write_bytes(pem)
    return kid


def untrust_key(kid: str) -> Path:
    """Stop trusting the key ``kid`` (added with ``trust_key``); returns the file removed."""
    path = ds4c_home() / TRUSTED_DIR / f"{kid}.pub"
    if not _KEY_ID.fullmatch(kid) or not path.is_file():
        known = ", ".join(k for k in trusted_keys() if (ds4c_home() / TRUSTED_DIR / f"{k}.pub").is_file())
        raise ArtifactError(f"no trusted key '{kid}' in {path.parent}; trusted keys added here: {known or '(none)'}")
    path.unlink()
    return path


# -- signing -------------------------------------------------------------------------------------

def signer(key: bool | str | os.PathLike = True) -> Callable[[bytes], bytes] | None:
    """What signs a manifest for ``write_container(sign=...)``: ``True`` this user's key (made on
    first use), a path that key file, ``False`` nobody (unsigned). Without ``cryptography`` the
    default leaves the artifact unsigned with a warning; an explicit key file is an error."""
    if key is False:
        return None
    if not crypto_available():
        if key is True:
            warnings.warn("artifact saved unsigned: the 'cryptography' package is not installed (pip install "
                          "cryptography); its native code will run elsewhere only with --trust-binaries",
                          SignatureWarning, stacklevel=3)
            return None
        raise ArtifactError(f"cannot sign with {key}: the 'cryptography' package is not installed; "
                            "install it (pip install cryptography)")
    private = _private_key(key)
    return lambda manifest: signature_member(private, manifest)


def _private_key(key: bool | str | os.PathLike) -> Any:
    return local_key() if key is True else load_signing_key(key)  # type: ignore[arg-type]


def signature_member(private_key: Any, manifest: bytes) -> bytes:
    """The ``signature.json`` member: ``private_key``'s Ed25519 signature of the manifest's bytes."""
    raw = _raw_public(private_key)
    return json.dumps({"format": SIGNATURE_FORMAT, "algorithm": ALGORITHM, "key_id": key_id(raw),
                       "public_key": base64.b64encode(raw).decode(),
                       "signature": base64.b64encode(private_key.sign(manifest)).decode()}, indent=1).encode()


def sign_file(path: str | os.PathLike, key: bool | str | os.PathLike = True) -> str:
    """Sign the artifact at ``path`` anew with ``key`` (see ``signer``), in place; returns the key id."""
    if not crypto_available():
        raise ArtifactError(f"cannot sign {path}: the 'cryptography' package is not installed; install it "
                            "(pip install cryptography)")
    private = _private_key(key)
    rewrite_signature(path, lambda manifest: signature_member(private, manifest))
    return key_id(_raw_public(private))


# -- checking ------------------------------------------------------------------------------------

def check(container: Container) -> Trust:
    """Verify ``container``'s signature: a Trust, or ArtifactError when the manifest was changed
    after it was signed (or the signature member is malformed)."""
    where = container.path
    if container.signature is None:
        return Trust(False, "the artifact is unsigned")
    try:
        sig = json.loads(container.signature)
    except (json.JSONDecodeError, UnicodeDecodeError):
        sig = None
    fields = ("format", "algorithm", "key_id", "public_key", "signature")
    if not isinstance(sig, dict) or not all(isinstance(sig.get(f), str) for f in fields):
        raise ArtifactError(f"{where}: its signature member is malformed (not a {SIGNATURE_FORMAT} record); the "
                            "artifact is damaged: re-download it, or sign it again with `ds4c sign`")
    if sig["format"] != SIGNATURE_FORMAT or sig["algorithm"] != ALGORITHM:
        return Trust(False, f"its signature ({sig['format']}, {sig['algorithm']}) is of a kind this ds4c cannot "
                            "check")
    try:
        raw = base64.b64decode(sig["public_key"], validate=True)
        signature = base64.b64decode(sig["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise ArtifactError(f"{where}: its signature member is malformed (bad base64); the artifact is damaged: "
                            "re-download it, or sign it again with `ds4c sign`") from None
    if len(raw) != 32 or key_id(raw) != sig["key_id"]:
        raise ArtifactError(f"{where}: its signature names key {sig['key_id']!r} but carries another; the artifact "
                            "was tampered with: re-download it, or sign it again with `ds4c sign`")
    try:
        ed25519 = _ed25519()
        from cryptography.exceptions import InvalidSignature
    except ImportError:
        return Trust(False, "its signature cannot be checked: the 'cryptography' package is not installed "
                            "(pip install cryptography)", sig["key_id"])
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(raw).verify(signature, container.raw_manifest)
    except (InvalidSignature, ValueError):
        raise ArtifactError(f"{where}: its manifest does not match its signature (key {sig['key_id']}): the "
                            "artifact was modified after it was signed; re-download it, or if you changed it "
                            "yourself, sign it again with `ds4c sign`") from None
    known = trusted_keys().get(sig["key_id"])
    if known is None or known[0] != raw:
        return Trust(False, f"it is signed by key {sig['key_id']}, which is not trusted here", sig["key_id"])
    return Trust(True, f"signed by trusted key {sig['key_id']} ({known[1]})", sig["key_id"])


def artifact_trust(container: Container, trust_binaries: bool = False) -> Trust:
    """Whether the native code stored in ``container`` may run: ``check``, then the user's override.

    A signature that does not match is refused even with ``trust_binaries``: that file is not what
    anyone signed."""
    found = check(container)
    if trust_binaries and not found.trusted:
        return Trust(True, f"trusted by trust_binaries=True / --trust-binaries ({found.reason})", found.key_id)
    return found
