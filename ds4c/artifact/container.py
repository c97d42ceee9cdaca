"""The ``.ds4`` container: one ZIP file, members stored uncompressed, a JSON manifest with sha256s.

Written atomically (temp file in the same directory, fsync, rename): a crash or an exception
leaves any existing file untouched and no partial file behind. On open, the format and its
version are checked and every member is verified against the manifest before it is used.
No pickle: metadata is JSON, tensors are safetensors, IR is text.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any

from ds4c.errors import ArtifactError
from ds4c.version import __version__

FORMAT = "ds4c-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def _check_name(name: str) -> None:
    p = PurePosixPath(name)
    if not name or name == MANIFEST or p.is_absolute() or ".." in p.parts or "\\" in name or name.endswith("/"):
        raise ArtifactError(f"invalid artifact member name '{name}': use a relative posix path without '..'")


def write_container(path: str | os.PathLike, manifest: Mapping[str, Any],
                    members: Mapping[str, bytes | os.PathLike | str]) -> None:
    """Write ``manifest`` + ``members`` (bytes, or paths of files to stream in) to ``path`` atomically."""
    path = Path(path)
    for name in members:
        _check_name(name)
    directory = path.resolve().parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        index: dict[str, dict[str, Any]] = {}
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, src in members.items():
                h = hashlib.sha256()
                size = 0
                info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_STORED
                with zf.open(info, "w", force_zip64=True) as out:
                    if isinstance(src, bytes | bytearray | memoryview):
                        data = bytes(src)
                        h.update(data)
                        out.write(data)
                        size = len(data)
                    else:
                        with open(src, "rb") as f:
                            while chunk := f.read(_CHUNK):
                                h.update(chunk)
                                out.write(chunk)
                                size += len(chunk)
                index[name] = {"sha256": h.hexdigest(), "size": size}
            full = {"format": FORMAT, "format_version": FORMAT_VERSION, "ds4c_version": __version__,
                    "created": datetime.now(UTC).isoformat(timespec="seconds"), **dict(manifest), "members": index}
            zf.writestr(zipfile.ZipInfo(MANIFEST, date_time=(2020, 1, 1, 0, 0, 0)),
                        json.dumps(full, indent=1, sort_keys=False).encode())
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class Container:
    """A verified, open ``.ds4`` file."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: no such artifact file")
        try:
            self._zip = zipfile.ZipFile(self.path, "r")
            raw = self._zip.read(MANIFEST)
        except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
            raise ArtifactError(f"{self.path} is truncated or not a ds4c artifact ({e}); recompile it") from None
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{self.path}: manifest.json is not valid JSON ({e}); the file is corrupted") from None
        if manifest.get("format") != FORMAT:
            raise ArtifactError(f"{self.path}: not a ds4c artifact (format '{manifest.get('format')}')")
        version = manifest.get("format_version")
        if not isinstance(version, int):
            raise ArtifactError(f"{self.path}: manifest has no integer format_version")
        if version > FORMAT_VERSION:
            raise ArtifactError(f"{self.path}: artifact format version {version} is newer than this ds4c supports "
                                f"({FORMAT_VERSION}); upgrade ds4c (pip install -U ds4c) or recompile with this version")
        self.manifest: dict[str, Any] = manifest
        listed = manifest.get("members", {})
        present = {i.filename for i in self._zip.infolist()} - {MANIFEST}
        missing = sorted(set(listed) - present)
        extra = sorted(present - set(listed))
        if missing:
            raise ArtifactError(f"{self.path}: member '{missing[0]}' listed in the manifest is missing; the artifact "
                                "is truncated — recompile it")
        if extra:
            raise ArtifactError(f"{self.path}: member '{extra[0]}' is not listed in the manifest; the artifact was "
                                "tampered with — recompile it")
        self._verified: set[str] = set()
        if verify:
            for name in listed:
                self._verify(name)

    def _verify(self, name: str) -> None:
        if name in self._verified:
            return
        want = self.manifest["members"][name]
        h = hashlib.sha256()
        size = 0
        try:
            with self._zip.open(name) as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ArtifactError(f"{self.path}: member '{name}' cannot be read ({e}); the artifact is truncated") from None
        if size != want["size"] or h.hexdigest() != want["sha256"]:
            raise ArtifactError(f"{self.path}: member '{name}' is corrupted: sha256 mismatch; recompile the artifact")
        self._verified.add(name)

    def member_names(self) -> list[str]:
        return list(self.manifest.get("members", {}))

    def read_bytes(self, name: str) -> bytes:
        if name not in self.manifest.get("members", {}):
            raise ArtifactError(f"{self.path}: no member '{name}'")
        self._verify(name)
        return self._zip.read(name)

    def open_member(self, name: str) -> IO[bytes]:
        return io.BytesIO(self.read_bytes(name))

    def extract(self, name: str, dest: str | os.PathLike) -> Path:
        self._verify(name)
        dest = Path(dest)
        with self._zip.open(name) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
        return dest

    def close(self) -> None:
        self._zip.close()


def open_container(path: str | os.PathLike, *, verify: bool = True) -> Container:
    return Container(path, verify=verify)
