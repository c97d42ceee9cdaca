"""Registry of Triton kernel launchers, keyed by the IR op name they implement.

A launcher is a Python function with exactly the signature of the op's reference
(``OpDef.reference``: same positional operands, same keyword attributes) that returns the same
value(s), computed by Triton kernels. It may decline an instance it does not handle (a shape or
dtype outside its specialisation) by returning ``NotImplemented``; the executor then runs the
reference for that call, and ``ds4c inspect`` reports it.

Kernel modules register at import::

    @register_kernel("rms_norm")
    def rms_norm(x, weight=None, *, eps): ...

Launchers are device-agnostic: under ``TRITON_INTERPRET=1`` (set before triton is imported)
they run on CPU tensors through Triton's interpreter, which is how CI checks them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

KERNEL_MODULES = ("norms", "rope", "mhc", "attention", "compress", "moe", "act_quant", "linear")

_KERNELS: dict[str, Callable[..., Any]] = {}
_loaded = False


def register_kernel(op_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if op_name in _KERNELS and _KERNELS[op_name] is not fn:
            raise ValueError(f"a Triton kernel for op '{op_name}' is already registered ({_KERNELS[op_name].__module__})")
        _KERNELS[op_name] = fn
        return fn
    return wrap


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from ds4c.backends.cuda.kernels.interpreter import install

    install()  # under TRITON_INTERPRET=1 only: one language swap per launch (kernels/interpreter.py)
    for mod in KERNEL_MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise


def get_kernel(op_name: str) -> Callable[..., Any] | None:
    """The launcher for ``op_name``, or None when the op runs its reference."""
    _load()
    return _KERNELS.get(op_name)


def kernels() -> dict[str, Callable[..., Any]]:
    _load()
    return dict(_KERNELS)
