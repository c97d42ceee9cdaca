"""Triton's interpreter (``TRITON_INTERPRET=1``), patched once per launch instead of once per call.

The interpreter swaps ``triton.language``'s builtins for numpy-backed ones when a kernel launches
(``GridExecutor.__call__``) and restores them after. It does the same swap again every time a
kernel calls a ``@triton.jit`` helper (``InterpretedFunction.__call__``), although the launch
already did it for the same modules: ~0.3 ms of ``inspect.getmembers`` per helper call, in every
program. ds4c's kernels call helpers in their inner loops (``round_to``, ``row_dot``,
``wait_for_producers``, ...), so on a CPU the swaps were half of an mHC kernel's time.

``install()`` skips a helper's swap when the modules the helper's globals name (``tl``, or
``tl.core`` for Triton's own helpers such as ``tl.sum``) are already swapped in the running
launch: by the launch itself, or by an earlier helper call of it (Triton never restores a
helper's swap, so it holds until the launch restores its own). The swap patches those module
objects, shared by all functions; anything else goes through Triton's own path unchanged.
Nothing changes on a GPU, where no interpreter runs; a Triton release not in ``CHECKED_TRITON``
is left alone.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
from typing import Any

_state = threading.local()
_installed = False
# Triton releases whose interpreter this was checked against (GridExecutor / InterpretedFunction
# / _patch_lang as in 3.9); others run as shipped, slower but unpatched
CHECKED_TRITON = ("3.9",)


@functools.cache
def _langs(fn: Any) -> frozenset[int]:
    """The language modules (by id) ``fn``'s globals name; once per function (kernels and helpers
    live as long as the process)."""
    import triton.language as tl

    return frozenset(id(v) for v in getattr(fn, "__globals__", {}).values()
                     if inspect.ismodule(v) and v in (tl, tl.core))


def _active() -> list[set[int]]:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


def install() -> bool:
    """Patch the interpreter (idempotent); True when it is patched, False when not interpreting or
    when this Triton's interpreter lacks the internals (then it runs as shipped)."""
    global _installed
    if _installed:
        return True
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        import triton
        from triton.runtime import interpreter as it
    except ImportError:
        return False
    if not triton.__version__.startswith(CHECKED_TRITON):
        return False
    grid_cls, fn_cls = getattr(it, "GridExecutor", None), getattr(it, "InterpretedFunction", None)
    if grid_cls is None or fn_cls is None or not hasattr(it, "_patch_lang") or not hasattr(fn_cls, "rewrite"):
        return False
    launch = grid_cls.__call__

    def launch_and_remember(self, *args, **kwargs):
        stack = _active()
        stack.append(set(_langs(self.fn)))  # the launch swaps these before running any program
        try:
            return launch(self, *args, **kwargs)
        finally:
            stack.pop()

    def call_helper(self, *args, **kwargs):
        stack, langs = _active(), _langs(self.fn)
        if not stack or not langs <= set().union(*stack):
            it._patch_lang(self.fn)  # as Triton does; it never restores this swap, so the
            if stack:  # modules stay swapped until the launch restores its own
                stack[-1] |= langs
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise it.InterpreterError(repr(e)) from e

    grid_cls.__call__ = launch_and_remember
    fn_cls.__call__ = call_helper
    _installed = True
    return True
