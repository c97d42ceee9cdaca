"""Registry of Triton kernel launchers, keyed by the IR op name they implement.

A launcher is a Python function that takes a ``KernelContext`` (``configs.py``: the kernel target,
the tuning table, the ``pdl`` compile option), then exactly the signature of the op's reference
(``OpDef.reference``: same positional operands, same keyword attributes), and returns the same
value(s), computed by Triton kernels. The context is all it may consult besides its operands: the
executor running the program hands it its own (``KernelExecutor(..., context=...)``). A launcher
may decline an instance it does not handle (a shape or dtype outside its specialisation) by
returning ``NotImplemented``; the executor then runs the reference for that call, and
``ds4c inspect`` reports it.

Kernel modules register at import::

    @register_kernel("rms_norm")
    def rms_norm(ctx, x, weight=None, *, eps): ...

A launcher allocates the tensors it returns with ``result_buffer`` (result index, shape, dtype,
device): when the executor has planned a buffer for that result (``ds4c.runtime.buffer_plan``)
and set it for this launch (``planned_results``), the launcher writes there; otherwise it gets a
new tensor. Scratch it does not return comes from ``torch.empty`` as usual.

Launchers are device-agnostic: under ``TRITON_INTERPRET=1`` (set before triton is imported)
they run on CPU tensors through Triton's interpreter, which is how CI checks them.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

KERNEL_MODULES = ("norms", "rope", "mhc", "attention", "compress", "moe", "act_quant", "linear", "paged")

_KERNELS: dict[str, Callable[..., Any]] = {}
_loaded = False
# per thread, the current launch's planned result buffers (``buffers``; absent or None: nothing
# planned); each is handed out once (a launcher calling another launcher may take it)
_PLANNED = threading.local()


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
    from ds4c.backends.triton.kernels.interpreter import install

    install()  # under TRITON_INTERPRET=1 only: one language swap per launch (kernels/interpreter.py)
    for mod in KERNEL_MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise
    _settle_cache_keys()


def jit_functions() -> list[Any]:
    """Every Triton ``JITFunction`` defined in or imported into the kernel modules (and ``configs``,
    ``pdl``), in a stable order (module, name)."""
    from triton.runtime.jit import JITFunction

    out, seen = [], set()
    for mod in (*KERNEL_MODULES, "configs", "pdl"):
        try:
            module = importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise
            continue
        for name in sorted(vars(module)):
            value = vars(module)[name]
            if isinstance(value, JITFunction) and id(value) not in seen:
                seen.add(id(value))
                out.append(value)
    return out


def _settle_cache_keys() -> None:
    """Give every kernel its order-independent Triton cache key (once per process, from ``_load``,
    before any kernel is launched or any stored binary's key is checked).

    Triton 3.6 merges a callee's constexpr globals (``used_global_vals``, part of the caller's key)
    into the caller *before* computing the callee's key (triton/runtime/jit.py,
    ``DependenciesFinder._update_hash``; 3.9 computes the callee first). So a kernel's key depended
    on which other kernel was hashed first in the process: ``moe._down_pairs_kernel`` hashed after
    ``moe._down_kernel`` (both call helpers that read ``FP8_SCALE_BLOCK``) got another key than
    hashed alone, and an artifact's stored binaries, keyed in the ahead-of-time workers, were not
    found at load (measured on the H100, triton 3.6: 2 of 62 binaries of a tiny h100 artifact).
    Recomputing every key until the merged globals stop changing gives each kernel the key with all
    its callees' globals, whatever the order: the key triton 3.9 computes. A no-op under the
    interpreter (no ``JITFunction``)."""
    fns = [f for f in jit_functions() if hasattr(f, "hash") and hasattr(f, "used_global_vals")]
    for _ in range(16):  # callee chains are a few deep; each round settles one more level
        before = [sorted(f.used_global_vals) for f in fns]
        for f in fns:
            f.hash = None
        for f in fns:
            f.cache_key  # noqa: B018 - computes and memoises the key
        if [sorted(f.used_global_vals) for f in fns] == before:
            return


def get_kernel(op_name: str) -> Callable[..., Any] | None:
    """The launcher for ``op_name``, or None when the op runs its reference."""
    _load()
    return _KERNELS.get(op_name)


def kernels() -> dict[str, Callable[..., Any]]:
    _load()
    return dict(_KERNELS)


@contextlib.contextmanager
def planned_results(buffers: Sequence[torch.Tensor | None]) -> Iterator[None]:
    """Within the block, ``result_buffer(k, ...)`` hands out ``buffers[k]`` (once) when it fits."""
    saved = getattr(_PLANNED, "buffers", None)
    _PLANNED.buffers = list(buffers)
    try:
        yield
    finally:
        _PLANNED.buffers = saved


def result_buffer(index: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The tensor a launcher writes its op's result ``index`` into: the planned buffer for it when
    one is set for this launch with this dtype, device and number of elements (viewed as
    ``shape``), else a new one."""
    buffers = getattr(_PLANNED, "buffers", None)
    if buffers is not None and index < len(buffers):
        buf = buffers[index]
        if buf is not None and buf.dtype == dtype and buf.device == device and buf.numel() == math.prod(shape):
            buffers[index] = None
            return buf.view(tuple(shape))
    return torch.empty(tuple(shape), dtype=dtype, device=device)
