"""What a reference-mode artifact records of the files its weights come from, and the check at load.

An artifact whose weights are referenced (``weights="reference"``, the default above 2 GiB) runs
on whatever its checkpoint directory holds when it is loaded. So the compiler records every file
the weight load reads (the index and the shards; an ONNX file), by name relative to the
directory, with its size and sha256 (``record_files``); the loader refuses a recorded file that
is missing or differs, and a file it would read that is not recorded (``check_recorded``,
``check_unrecorded``), naming the file and the path the artifact was compiled against. A moved
checkpoint is re-pointed with ``ds4c run ART --weights-from DIR`` / ``ds4c.load(..., weights_from=DIR)``;
the same record is checked there.

Why a whole-file sha256 with a stat cache, not size + mtime alone, nor per-tensor hashes:
- size + mtime cannot tell a same-size file copied with its mtime kept (``cp -p``, ``rsync -a``)
  or touched back (``touch -d``) from the one compiled against;
- per-tensor hashes would let the load hash the bytes it reads anyway, but they cost the same
  hashing, and a 1.6T-parameter release has ~10^5 tensors: a manifest of megabytes, against 64
  hex characters per file here;
- a whole-file sha256 is one sequential read at compile (sha256 runs at 1-2 GB/s a core: a
  ~150 GB checkpoint takes one to two minutes, on top of a compile that otherwise reads no weight
  data). So that a load does not pay it again, a file's hash is kept in ds4c's cache
  (``$DS4C_CACHE_DIR/file-hashes``) under its identity and stat: path, device, inode, size,
  mtime and ctime in ns. ctime cannot be set back by a user, and any write, ``touch``, rename or
  copy changes it, so an unchanged stat means unchanged bytes (git's index works so). A load on
  the machine that compiled costs a ``stat`` per file; a copied or moved checkpoint is hashed
  once, then cached. Files changed within ``RACY_SECONDS`` of being hashed are not cached (a
  write in the same clock tick would keep the stat: git's "racy clean" case).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds4c.errors import CheckpointError

RACY_SECONDS = 2.0
logger = logging.getLogger(__name__)


def _stamp(st: os.stat_result, path: Path) -> dict[str, Any]:
    return {"path": str(path), "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _stamp_file(path: Path) -> Path:
    from ds4c.frontend.trace_cache import cache_root

    return cache_root() / "file-hashes" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:40]}.json"


def file_sha256(path: Path) -> str:
    """sha256 of ``path``'s bytes, from ds4c's stat cache when the file is unchanged since it was
    last hashed here, else read in full (and cached when the file is not racily new)."""
    real = Path(os.path.realpath(path))
    st = real.stat()
    stamp = _stamp(st, real)
    try:
        cached = json.loads(_stamp_file(real).read_text())
        if isinstance(cached, dict) and {k: cached.get(k) for k in stamp} == stamp \
                and isinstance(cached.get("sha256"), str):
            return cached["sha256"]
    except (OSError, ValueError, RuntimeError):  # no entry, no home, an unreadable entry: hash it
        pass
    if st.st_size > 1 << 30:
        logger.info("%s: hashing %.1f GiB to check it against the artifact's record", real, st.st_size / 2**30)
    with open(real, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    after = real.stat()
    if _stamp(after, real) == stamp and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_SECONDS * 1e9:
        _store(_stamp_file(real), {**stamp, "sha256": digest})
    return digest


def _store(path: Path, entry: dict[str, Any]) -> None:
    """Write a cache entry atomically; a cache that cannot be written only costs a hash next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hash-", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(entry, fh)
        os.replace(tmp, path)
    except (OSError, RuntimeError):
        pass


def record_files(base: Path, files: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """``{name relative to base: {"size", "sha256"}}`` for ``files`` (all under ``base``)."""
    out = {}
    for f in files:
        out[f.relative_to(base).as_posix()] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
    return out


def _recorded_path(base: Path, name: Any, origin: str) -> Path:
    """``base / name`` for a record entry: a plain relative name (the record comes from an
    artifact, which may be hostile too: it must not make the loader look elsewhere)."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name \
            or ".." in name.split("/") or Path(name).is_absolute():
        raise CheckpointError(f"{origin} records the weight file {name!r}, which is not a name inside a checkpoint "
                              "directory; the artifact's manifest is damaged: recompile it")
    return base / name


def check_recorded(base: Path, recorded: Mapping[str, Any], *, origin: str, recorded_base: str) -> None:
    """Every file in ``recorded`` is under ``base`` with its recorded size and sha256.

    ``origin`` names the artifact in messages; ``recorded_base`` is the directory it was compiled against."""
    if not isinstance(recorded, Mapping):
        raise CheckpointError(f"{origin}: its record of weight files is not an object; recompile the artifact")
    for name, want in recorded.items():
        path = _recorded_path(base, name, origin)
        if not isinstance(want, Mapping) or not isinstance(want.get("size"), int) \
                or not isinstance(want.get("sha256"), str):
            raise CheckpointError(f"{origin}: its record of weight file '{name}' lacks a size or sha256; recompile it")
        was = f"{recorded_base.rstrip('/')}/{name}"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; {origin} reads its weights from this file (compiled against "
                                  f"{was}, {want['size']} bytes): restore it, or pass the checkpoint's location "
                                  "with --weights-from DIR (ds4c.load(..., weights_from=DIR))")
        size = path.stat().st_size
        digest = file_sha256(path) if size == want["size"] else None
        if size != want["size"] or digest != want["sha256"]:
            now = f"{size} bytes" if digest is None else f"sha256 {digest[:16]}..."
            then = f"{want['size']} bytes" if digest is None else f"sha256 {want['sha256'][:16]}..."
            raise CheckpointError(f"{path}: changed since {origin} was compiled against {was} (now {now}, recorded "
                                  f"{then}); restore the checkpoint it was compiled from (--weights-from DIR where "
                                  "it moved), or recompile against this one")


def check_unrecorded(base: Path, files: Sequence[Path], recorded: Mapping[str, Any], *, origin: str) -> None:
    """Every file of ``files`` (those the weight load reads) is one ``recorded`` names."""
    for f in files:
        name = f.relative_to(base).as_posix()
        if name not in recorded:
            raise CheckpointError(f"{f}: the weight load reads this file, but {origin} does not record it: the "
                                  "checkpoint changed since it was compiled; restore that checkpoint, or recompile "
                                  "against this one")


@dataclass(frozen=True)
class RecordCheck:
    """A reference-mode artifact's record, checked by the weight loader around its header reads."""

    files: Mapping[str, Any]  # name relative to the directory -> {"size", "sha256"}
    origin: str               # "the artifact X.ds4", for messages
    recorded_base: str        # the directory (or ONNX file's folder) it was compiled against

    def before_reading(self, base: Path) -> None:
        check_recorded(base, self.files, origin=self.origin, recorded_base=self.recorded_base)

    def files_read(self, base: Path, files: Sequence[Path]) -> None:
        check_unrecorded(base, files, self.files, origin=self.origin)
