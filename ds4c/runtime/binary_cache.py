"""ds4c's cache of trusted kernel binaries, and the Triton cache manager that reads it first.

``binaries.install`` writes a trusted artifact's binaries to ``<ds4c cache>/kernel-binaries/<key>/``
(``ds4c.backends.local_cache``: a directory of this user's alone), the files under the names
Triton gives them and a group record, as Triton's ``FileCacheManager`` lays out its own cache.
``activate`` then makes ``StoredBinaries`` Triton's cache manager for this process
(``triton.knobs.cache.manager_class``, read at every ``get_cache_manager`` in triton 3.6 and 3.9):
a lookup finds a key's files here first, and everything else - lookups of other keys, and every
write, such as what the JIT compiles - goes to the cache manager that was configured before
(``TRITON_CACHE_MANAGER``, else Triton's file cache in ``TRITON_CACHE_DIR``). So stored binaries
never enter the Triton cache that other programs share, and nothing but ds4c's ``install`` puts
files where this manager looks first.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from triton import knobs
from triton.runtime.cache import CacheManager, FileCacheManager

from ds4c.backends.local_cache import PLAIN_NAME, private_dir, write_file

DIRECTORY = "kernel-binaries"
_GROUP = "__grp__"


def triton_key(cache_key: str) -> str:
    """The directory name Triton's cache uses for a cache key (sha256 hex -> base32, unpadded)."""
    return base64.b32encode(bytes.fromhex(cache_key)).decode().rstrip("=")


def store(cache_key: str, files: dict[str, bytes]) -> Path:
    """Write one binary's files (Triton's names -> bytes) under ``cache_key``, then their group
    record (the ``.json`` metadata file's, as Triton's ``put_group``), last."""
    directory = private_dir(DIRECTORY, triton_key(cache_key))
    for name, data in files.items():
        write_file(directory, name, data)
    metadata = next(name for name in files if name.endswith(".json"))
    write_file(directory, f"{_GROUP}{metadata}", json.dumps({"child_paths": {n: n for n in files}}).encode())
    return directory


class StoredBinaries(CacheManager):
    """Triton's cache manager while ds4c has installed binaries: reads ds4c's directory first."""

    fallback: Any = FileCacheManager  # the manager class configured before ``activate``

    def __init__(self, key: str, override: bool = False, dump: bool = False):
        self._inner = self.fallback(key, override=override, dump=dump)
        directory = None
        if not (override or dump) and PLAIN_NAME.fullmatch(key):
            candidate = private_dir(DIRECTORY) / key
            directory = candidate if candidate.is_dir() else None
        self._stored = directory

    def _stored_file(self, filename: str) -> str | None:
        if self._stored is None or not PLAIN_NAME.fullmatch(filename):
            return None
        path = self._stored / filename
        return str(path) if path.is_file() else None

    def get_file(self, filename: str) -> str | None:
        return self._stored_file(filename) or self._inner.get_file(filename)

    def get_group(self, filename: str) -> dict[str, str] | None:
        record = self._stored_file(f"{_GROUP}{filename}")
        if record is not None:
            try:
                children = json.loads(Path(record).read_text())["child_paths"]
                group = {name: self._stored_file(child) for name, child in children.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                group = None
            if group and all(group.values()):
                return group  # type: ignore[return-value]
        return self._inner.get_group(filename)

    def put(self, data: Any, filename: str, binary: bool = True) -> str:
        return self._inner.put(data, filename, binary=binary)

    def put_group(self, filename: str, group: dict[str, str]) -> Any:
        return self._inner.put_group(filename, group)

    def __getattr__(self, name: str) -> Any:  # anything else the configured manager offers
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def activate() -> None:
    """Make ``StoredBinaries`` Triton's cache manager in this process (once; keeps the previous one
    as its fallback)."""
    current = knobs.cache.manager_class
    if current is StoredBinaries:
        return
    StoredBinaries.fallback = current or FileCacheManager
    knobs.cache.manager_class = StoredBinaries
