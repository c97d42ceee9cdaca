"""Directories where ds4c keeps native code between runs: trusted kernel binaries, NPU host builds.

They live under ds4c's cache directory (``$DS4C_CACHE_DIR``, else ``$XDG_CACHE_HOME/ds4c``, else
``~/.cache/ds4c``; the trace cache's root, ``ds4c.frontend.trace_cache``), never in a cache other
programs share (Triton's ``~/.triton/cache``): what is loaded from here must have been written by
ds4c for this user. So a directory is created mode 0700 and used only while it is a real
directory (not a link) owned by this user that nobody else can write; files are written whole
(a temp file renamed into place), so a killed writer leaves no half-written library behind.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path

from ds4c.errors import KernelError

# a file name in a private cache directory: one path component, no leading dot
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")


def cache_root() -> Path:
    if os.environ.get("DS4C_CACHE_DIR"):
        return Path(os.environ["DS4C_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ds4c"


def private_dir(*parts: str) -> Path:
    """``cache_root()/parts...``, created 0700 where missing; KernelError if it is not this user's alone."""
    path = cache_root()
    path.mkdir(parents=True, exist_ok=True)
    for part in parts:
        if not PLAIN_NAME.fullmatch(part):
            raise KernelError(f"cache directory name {part!r} is not a plain file name")
        path = path / part
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        check_private(path)
    return path


def check_private(path: Path) -> None:
    """KernelError unless ``path`` is a directory (not a link) of this user that others cannot write."""
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise KernelError(f"{path} is not a directory (a link or a file); ds4c keeps native code only in a "
                          f"directory of its own: remove {path}")
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise KernelError(f"{path} belongs to another user or others can write to it (mode {st.st_mode & 0o777:o}); "
                          f"ds4c loads native code only from a directory that is yours alone: remove it, or "
                          f"`chmod 700 {path}` if it is yours")


def write_file(directory: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to ``directory/name`` whole (a temp file renamed into place); returns the path."""
    if not PLAIN_NAME.fullmatch(name):
        raise KernelError(f"file name {name!r} is not a plain file name; refusing to write it under {directory}")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, directory / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return directory / name
