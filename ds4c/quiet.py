"""Third-party output ds4c cannot fix, silenced narrowly where the call is made.

Each filter names the exact message it drops and wraps only the call that produces it; nothing
is silenced globally, so a new warning from the same library still reaches the user.

- ``native_stderr_without(*patterns)``: lines a native library writes to file descriptor 2
  itself (TVM's C++ ``LOG(WARNING)``, which Python's ``warnings`` never sees), e.g. topi's
  "Fast mode segfaults when there are out-of-bounds indices" for every ``take`` it legalizes:
  the indices ds4c gives it are in bounds by construction, and the line says nothing a user can
  act on. Other lines written meanwhile are passed on unchanged, after the call.
- ``TORCH_PYTREE_LEAFSPEC``: the FutureWarning torch's pytree raises when torch-mlir copies a
  ``LeafSpec`` (for ``warnings.filterwarnings(..., message=...)`` around that call).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

TVM_FAST_TAKE = r"Warning: Fast mode segfaults when there are out-of-bounds indices"
TORCH_PYTREE_LEAFSPEC = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


@contextlib.contextmanager
def native_stderr_without(*patterns: str) -> Iterator[None]:
    """Hold what is written to file descriptor 2 during the block; afterwards write it back, less
    the lines matching any of ``patterns`` (regular expressions)."""
    drop = re.compile("|".join(f"(?:{p})" for p in patterns))
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (a notebook's stream): nothing to filter
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True)
                    if not drop.search(line.decode(errors="replace"))]
            if kept:
                os.write(fd, b"".join(kept))
