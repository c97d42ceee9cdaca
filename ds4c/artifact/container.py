"""The ``.ds4`` container: one ZIP file, members stored uncompressed, a JSON manifest with sha256s.

Layout: ``manifest.json`` is the first member; every other member is STORED (no compression)
and its data starts at a multiple of ``DATA_ALIGNMENT`` bytes from the start of the file (the
padding lives in a ZIP extra field, as Android's zipalign does), so a runtime can memory-map a
large member in place (``Container.member_span``). Any ZIP tool can list and extract the file.

Writing is atomic: a temp file in the destination directory, fsync, ``os.replace``. On any
exception the temp file is removed and an existing file at the path is left untouched. A temp
file is named ``.NAME.PID-RANDOM[.LABEL].tmp`` and locked (``flock``) while its writer lives, so
one left by a killed process (SIGKILL, power loss) is recognised and removed by the next write
next to it: its writer's pid is gone and its lock is free. The artifact gets the mode any new
file gets (``0666 & ~umask``). File members are streamed, never read whole; they are hashed once
before writing (the manifest, which lists every sha256, comes first) and again while copied,
which also catches a file that changes under us.

A container may carry a signature of the manifest's exact bytes, the member ``signature.json``
right after the manifest (``SIGNATURE``; not listed in the manifest, which it signs). This module
stores and returns those bytes; making and checking signatures is ``ds4c.artifact.signing``'s.
Since the manifest lists every member's sha256, signing the manifest signs the whole artifact.

Reading checks the format and its version, refuses truncated files, members missing from the
manifest or from the archive, and verifies sha256 sums: at open for members up to
``EAGER_VERIFY_BYTES``, on first use for larger ones, and ``read_bytes`` hashes exactly the bytes
it returns. No pickle anywhere: metadata is JSON; tensors (safetensors) and IR (text) are
members like any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import struct
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO

from ds4c.errors import ArtifactError
from ds4c.version import __version__

FORMAT = "ds4c-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"  # the manifest's signature (ds4c.artifact.signing); not a listed member
MAX_SIGNATURE_BYTES = 64 * 1024
RESERVED_KEYS = ("format", "format_version", "ds4c_version", "created", "members")
DATA_ALIGNMENT = 64  # bytes; enough for any dtype view and for cache lines
EAGER_VERIFY_BYTES = 256 * 1024 * 1024  # members larger than this are verified on first use

_CHUNK = 1 << 20
_ALIGN_EXTRA_ID = 0xD935  # zipalign's extra-field id: "padding, ignore"
_ZIP64_EXTRA_LEN = 20  # zipfile adds it to every local header when force_zip64=True
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # PK\3\4 ... name length, extra length
_FIXED_TIME = (2020, 1, 1, 0, 0, 0)  # members carry no timestamps: same inputs, same bytes


def check_member_name(name: object) -> str:
    """A member name is a relative POSIX path without ``..``, ``.``, empty parts or backslashes."""
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"invalid artifact member name {name!r}: use a non-empty relative posix path")
    parts = name.split("/")
    if (name.startswith("/") or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in parts)
            or PurePosixPath(name).is_absolute() or (len(parts[0]) == 2 and parts[0][1] == ":")):
        raise ArtifactError(f"invalid artifact member name '{name}': use a relative posix path "
                            "like 'kernels/matmul.ptx', without '..', '.', empty parts or backslashes")
    if name in (MANIFEST, SIGNATURE):
        raise ArtifactError(f"invalid artifact member name '{name}': it is reserved for the manifest and its "
                            "signature; pass manifest sections in the manifest argument")
    return name


# where a member's bytes come from while writing: bytes, a file, or chunks of another container
_Source = Path | memoryview | Callable[[], Iterable[bytes]]


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _describe(name: str, src: object) -> tuple[str, int, _Source]:
    """(sha256, size, source) of one member; file members are hashed by streaming."""
    if isinstance(src, bytes | bytearray | memoryview):
        view = memoryview(src).cast("B")
        return hashlib.sha256(view).hexdigest(), view.nbytes, view
    if isinstance(src, str):
        raise ArtifactError(f"member '{name}': pass bytes or a path object (pathlib.Path), not str; "
                            "encode text with .encode() or wrap a file name in Path(...)")
    if not isinstance(src, os.PathLike):
        raise ArtifactError(f"member '{name}': expected bytes or an os.PathLike, got {type(src).__name__}")
    path = Path(os.fspath(src))
    if not path.is_file():
        raise ArtifactError(f"member '{name}': {path} is not a readable file")
    digest, size = _hash_file(path)
    return digest, size, path


def _aligned_info(zf: zipfile.ZipFile, name: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    info.file_size = size
    encoded = name.encode("ascii") if name.isascii() else name.encode("utf-8")
    data_start = zf.start_dir + _LOCAL_HEADER.size + len(encoded) + 4 + _ZIP64_EXTRA_LEN
    pad = -data_start % DATA_ALIGNMENT
    info.extra = struct.pack("<HH", _ALIGN_EXTRA_ID, pad) + bytes(pad)
    return info


def write_container(path: str | os.PathLike, manifest: Mapping[str, Any],
                    members: Mapping[str, bytes | bytearray | memoryview | os.PathLike], *,
                    sign: Callable[[bytes], bytes] | None = None) -> None:
    """Write ``manifest`` sections and ``members`` to ``path`` as one ``.ds4`` file, atomically.

    ``members`` maps names (relative posix paths) to bytes or to paths of files that are streamed
    in. The keys ``format``, ``format_version``, ``ds4c_version``, ``created`` and ``members`` of
    the manifest are written by this function (values given for them are replaced), so a manifest
    read from one artifact can be passed back in. ``sign``, given the manifest's bytes, returns
    the ``signature.json`` member (``ds4c.artifact.signing.signer``); without it the file is unsigned.
    """
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory; give a file name such as {path / 'model.ds4'}")
    for name in members:
        check_member_name(name)
    described = {name: _describe(name, src) for name, src in members.items()}
    full = {k: v for k, v in manifest.items() if k not in RESERVED_KEYS}
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "ds4c_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"), **full,
            "members": {name: {"sha256": d, "size": n} for name, (d, n, _) in described.items()}}
    try:
        manifest_bytes = json.dumps(full, indent=1, ensure_ascii=False).encode()
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"the manifest for {path} is not JSON-serializable ({e}); store tensors as "
                            "members and keep only plain numbers, strings, lists and dicts in the manifest") from None
    _write(path, manifest_bytes, sign(manifest_bytes) if sign is not None else None, described)


def rewrite_signature(path: str | os.PathLike, sign: Callable[[bytes], bytes] | None) -> None:
    """Sign the artifact at ``path`` anew (``sign``) or drop its signature (None), atomically.

    The manifest's bytes and every member are kept as they are (streamed from the old file, each
    checked against its sha256 on the way), so the new signature covers exactly what was there.
    """
    path = Path(path)
    with open_container(path, verify=False) as c:
        described = {name: (info["sha256"], info["size"], _member_chunks(c, name))
                     for name, info in c.manifest["members"].items()}
        _write(path, c.raw_manifest, sign(c.raw_manifest) if sign is not None else None, described)


def _member_chunks(c: Container, name: str) -> Callable[[], Iterator[bytes]]:
    return lambda: c._chunks(name)


def _write(path: Path, manifest_bytes: bytes, signature: bytes | None,
           described: Mapping[str, tuple[str, int, _Source]]) -> None:
    if signature is not None and len(signature) > MAX_SIGNATURE_BYTES:
        raise ArtifactError(f"the signature for {path} has {len(signature)} bytes, more than {MAX_SIGNATURE_BYTES}; "
                            "sign with an Ed25519 key (ds4c.artifact.signing)")
    directory = path.parent.resolve()
    with temp_beside(path) as (raw, tmp):
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            manifest_digest = hashlib.sha256(manifest_bytes).hexdigest()
            _copy_member(zf, MANIFEST, manifest_digest, len(manifest_bytes), memoryview(manifest_bytes))
            if signature is not None:
                _copy_member(zf, SIGNATURE, hashlib.sha256(signature).hexdigest(), len(signature),
                             memoryview(signature))
            for name, (digest, size, src) in described.items():
                _copy_member(zf, name, digest, size, src)
        raw.flush()
        if hasattr(os, "fchmod"):  # mkstemp made it 0600: give it the mode any new file gets
            os.fchmod(raw.fileno(), 0o666 & ~_umask())
        os.fsync(raw.fileno())
        os.replace(tmp, path)
    try:  # make the rename itself durable; not possible on every platform / filesystem
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _umask() -> int:
    """The process's umask, read without changing it where the platform allows (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not atomic, as everywhere without getumask)
    os.umask(mask)
    return mask


# .NAME.PID-RANDOM[.LABEL].tmp (the random part is tempfile.mkstemp's)
_TEMP = re.compile(r"\.(?P<pid>[0-9]+)-[a-z0-9_]+(?:\.[a-z]+)?\.tmp")


@contextlib.contextmanager
def temp_beside(path: str | os.PathLike, label: str = "") -> Iterator[tuple[BinaryIO, Path]]:
    """A new, locked temp file next to ``path`` (``.NAME.PID-RANDOM[.LABEL].tmp``), removed at exit
    unless it was renamed away; stale temps of ``path`` left by dead processes are removed first."""
    path = Path(path)
    directory = path.parent.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=f".{label}.tmp" if label else ".tmp",
                               dir=directory)
    f = os.fdopen(fd, "r+b")
    try:
        _try_lock(f.fileno())  # held until closed: tells remove_stale_temps this writer lives
        yield f, Path(tmp)
    finally:
        f.close()
        Path(tmp).unlink(missing_ok=True)


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files of ``path`` whose writer died (its pid is gone and its lock is free).

    Only files of this user that match the temp scheme exactly are considered; returns those removed."""
    path = Path(path)
    directory = path.parent
    prefix = f".{path.name}"
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix) or not _TEMP.fullmatch(entry.name[len(prefix):]):
            continue
        pid = int(_TEMP.fullmatch(entry.name[len(prefix):]).group("pid"))  # type: ignore[union-attr]
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if (not entry.is_file(follow_symlinks=False) or pid == os.getpid() or _pid_alive(pid)
                or (hasattr(os, "getuid") and st.st_uid != os.getuid())):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if _try_lock(fd):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _try_lock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` without waiting; False if another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): the pid alone decides
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without flock: the pid alone decides
        return True
    return True


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process (or a pid the OS cannot name): leave its file alone
    return True


def _copy_member(zf: zipfile.ZipFile, name: str, digest: str, size: int, src: _Source) -> None:
    h = hashlib.sha256()
    copied = 0
    with zf.open(_aligned_info(zf, name, size), "w", force_zip64=True) as out:
        if isinstance(src, memoryview):
            out.write(src)
            h.update(src)
            copied = src.nbytes
        elif isinstance(src, Path):
            with open(src, "rb") as f:
                while chunk := f.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    copied += len(chunk)
        else:
            for chunk in src():
                out.write(chunk)
                h.update(chunk)
                copied += len(chunk)
    if copied != size or h.hexdigest() != digest:
        if not isinstance(src, memoryview | Path):
            raise ArtifactError(f"member '{name}' does not match its sha256 in the manifest; the artifact is "
                                "corrupted: recompile or re-download it")
        raise ArtifactError(f"member '{name}': {src} changed while the artifact was being written; "
                            "write the artifact again once nothing else writes that file")


class Container:
    """An open ``.ds4`` file whose manifest and members have been checked against each other.

    Use as a context manager or call ``close()``. Reads are thread-safe (positioned reads).
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True,
                 eager_verify_bytes: int = EAGER_VERIFY_BYTES):
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: no such artifact file; compile one with `ds4c compile`")
        self._file: BinaryIO = open(self.path, "rb")  # closed by close() / __exit__
        self._lock = threading.Lock()
        try:
            self._open(verify, eager_verify_bytes)
        except BaseException:
            self._file.close()
            raise

    # -- opening -------------------------------------------------------------------------------
    def _bad(self, what: str) -> ArtifactError:
        return ArtifactError(f"{self.path} is truncated or not a ds4c artifact ({what}); recompile it "
                             "or download it again")

    def _open(self, verify: bool, eager_verify_bytes: int) -> None:
        file_size = os.fstat(self._file.fileno()).st_size
        try:
            with zipfile.ZipFile(self._file, "r") as zf:
                infos = zf.infolist()
                raw_manifest = zf.read(MANIFEST)
                signed = [i for i in infos if i.filename == SIGNATURE]
                if signed and signed[0].file_size > MAX_SIGNATURE_BYTES:
                    raise self._bad(f"{SIGNATURE} has {signed[0].file_size} bytes, more than a signature")
                raw_signature = zf.read(signed[0]) if signed else None
        except KeyError:
            raise self._bad("no manifest.json") from None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error,
                NotImplementedError, RuntimeError, zlib.error) as e:  # what zipfile raises on damaged input
            raise self._bad(str(e) or type(e).__name__) from None
        self.raw_manifest: bytes = raw_manifest  # the exact bytes a signature covers
        self.signature: bytes | None = raw_signature  # the signature member's bytes, if signed
        try:
            manifest = json.loads(raw_manifest)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{self.path}: manifest.json is not valid JSON ({e}); the file is corrupted, "
                                "recompile it") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise ArtifactError(f"{self.path} is not a ds4c artifact (manifest format is {found!r}, "
                                f"expected '{FORMAT}')")
        version = manifest.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ArtifactError(f"{self.path}: manifest has no valid format_version (got {version!r}); "
                                "the artifact is corrupted, recompile it")
        if version > FORMAT_VERSION:
            raise ArtifactError(f"{self.path}: artifact format version {version} is newer than this ds4c "
                                f"supports ({FORMAT_VERSION}); upgrade ds4c (ds4c {__version__} is installed) "
                                "or recompile the model with this version")
        listed = manifest.get("members")
        if not isinstance(listed, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int)
                for v in listed.values()):
            raise ArtifactError(f"{self.path}: manifest 'members' must map names to {{sha256, size}}; "
                                "the artifact is corrupted, recompile it")
        self.manifest: dict[str, Any] = manifest

        names = [i.filename for i in infos]
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise ArtifactError(f"{self.path}: member '{n}' appears twice; the artifact was tampered with, "
                                    "recompile it")
            seen.add(n)
        for n in listed:
            check_member_name(n)
        missing = sorted(set(listed) - seen)
        if missing:
            raise ArtifactError(f"{self.path}: member '{missing[0]}' listed in the manifest is missing; "
                                "the artifact is incomplete, recompile it")
        extra = sorted(seen - set(listed) - {MANIFEST, SIGNATURE})
        if extra:
            raise ArtifactError(f"{self.path}: member '{extra[0]}' is not listed in the manifest; "
                                "the artifact was modified after it was written, recompile it")

        self._spans: dict[str, tuple[int, int]] = {}
        for info in infos:
            if info.filename in (MANIFEST, SIGNATURE):
                continue
            name = info.filename
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                raise ArtifactError(f"{self.path}: member '{name}' is compressed or encrypted; ds4c artifacts "
                                    "store members as-is, recompile it (do not re-zip artifacts)")
            if info.file_size != listed[name]["size"]:
                raise ArtifactError(f"{self.path}: member '{name}' is corrupted: size {info.file_size} != "
                                    f"{listed[name]['size']} in the manifest; recompile or re-download")
            header = self._pread(info.header_offset, _LOCAL_HEADER.size) if info.header_offset >= 0 else b""
            if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                raise self._bad(f"bad local header of member '{name}'")
            fields = _LOCAL_HEADER.unpack(header)
            start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
            if start + info.file_size > file_size:
                raise self._bad(f"member '{name}' runs past the end of the file")
            self._spans[name] = (start, info.file_size)

        self._verified: set[str] = set()
        if verify:
            for name, (_, size) in self._spans.items():
                if size <= eager_verify_bytes:
                    self.verify(name)

    # -- reading -------------------------------------------------------------------------------
    def _pread(self, offset: int, n: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(self._file.fileno(), n, offset)
        with self._lock:  # platforms without pread share one file position
            self._file.seek(offset)
            return self._file.read(n)

    def _chunks(self, name: str) -> Iterator[bytes]:
        start, size = self._span(name)
        pos = 0
        while pos < size:
            chunk = self._pread(start + pos, min(_CHUNK, size - pos))
            if not chunk:
                raise self._bad(f"member '{name}' ends early")
            pos += len(chunk)
            yield chunk

    def _span(self, name: str) -> tuple[int, int]:
        try:
            return self._spans[name]
        except KeyError:
            raise ArtifactError(f"{self.path}: no member '{name}'; it has: {', '.join(self._spans) or '(none)'}") \
                from None

    def _check_digest(self, name: str, digest: str) -> None:
        if digest != self.manifest["members"][name]["sha256"]:
            raise ArtifactError(f"member '{name}' of {self.path} is corrupted: sha256 mismatch; "
                                "recompile or re-download the artifact")

    def verify(self, name: str | None = None) -> None:
        """Check the sha256 of one member (or, with no name, of every member) against the manifest."""
        if name is None:
            for n in self._spans:
                self.verify(n)
            return
        if name in self._verified:
            return
        h = hashlib.sha256()
        for chunk in self._chunks(name):
            h.update(chunk)
        self._check_digest(name, h.hexdigest())
        self._verified.add(name)

    def member_names(self) -> list[str]:
        """Member names in manifest order (``manifest.json`` itself is not a member)."""
        return list(self.manifest["members"])

    def __contains__(self, name: object) -> bool:
        return name in self._spans

    def member_info(self, name: str) -> dict[str, Any]:
        """``{"sha256", "size", "offset"}`` of a member; offset is where its bytes start in the file."""
        start, size = self._span(name)
        return {"sha256": self.manifest["members"][name]["sha256"], "size": size, "offset": start}

    def read_bytes(self, name: str) -> bytes:
        """The member's bytes; the sha256 of exactly these bytes is checked."""
        _, size = self._span(name)
        buf = bytearray(size)
        view = memoryview(buf)
        pos = 0
        for chunk in self._chunks(name):
            view[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        self._check_digest(name, hashlib.sha256(view).hexdigest())
        self._verified.add(name)
        return bytes(buf)

    def open_member(self, name: str) -> IO[bytes]:
        """A seekable read-only file object over the member, verified first (once per container)."""
        self.verify(name)
        start, size = self._span(name)
        return io.BufferedReader(_MemberReader(self, start, size), buffer_size=_CHUNK)

    def member_span(self, name: str) -> tuple[int, int]:
        """``(offset, size)`` of the member's bytes in the file, verified first: for ``mmap``.

        Offsets are multiples of ``DATA_ALIGNMENT`` for files this ds4c wrote.
        """
        self.verify(name)
        return self._span(name)

    def extract(self, name: str, dest: str | os.PathLike) -> Path:
        """Stream a member to ``dest``, checking its sha256 on the way (dest is removed on mismatch)."""
        dest = Path(dest)
        h = hashlib.sha256()
        try:
            with open(dest, "wb") as out:
                for chunk in self._chunks(name):
                    h.update(chunk)
                    out.write(chunk)
            self._check_digest(name, h.hexdigest())
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        self._verified.add(name)
        return dest

    def close(self) -> None:
        self._file.close()

    def __del__(self) -> None:  # a model keeps its container for lazy reads: closed when it goes
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Container({str(self.path)!r}, members={len(self._spans)})"


class _MemberReader(io.RawIOBase):
    """A read-only, seekable window [start, start + size) of the container's file."""

    def __init__(self, container: Container, start: int, size: int):
        super().__init__()
        self._c, self._start, self._size, self._pos = container, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        data = self._c._pread(self._start + self._pos, n) if n else b""
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def open_container(path: str | os.PathLike, *, verify: bool = True,
                   eager_verify_bytes: int = EAGER_VERIFY_BYTES) -> Container:
    """Open and check a ``.ds4`` file.

    With ``verify`` (the default), members up to ``eager_verify_bytes`` are checked against their
    sha256 now and larger ones on first use; with ``verify=False`` every member is checked on
    first use only. The manifest, the member list and the ZIP structure are always checked.
    """
    return Container(path, verify=verify, eager_verify_bytes=eager_verify_bytes)
