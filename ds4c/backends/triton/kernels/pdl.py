"""Programmatic dependent launch (PDL) between consecutive kernels on sm_90 and later.

A decode step is ~140 kernels, most of them a few microseconds long; inside a CUDA graph each
kernel boundary still costs the launch of the next grid after the previous one has drained
(measured: ~400 us of a 1.3 ms H200 step is between kernels, docs/PERFORMANCE.md). With PDL a
kernel is launched with programmatic stream serialisation (Triton's ``launch_pdl=True``, i.e.
``cuLaunchKernelEx`` with ``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION``; stream
capture turns it into a programmatic edge of the graph), so the hardware may start it as soon
as every program of the previous kernel has signalled, instead of when the previous kernel ends.

The contract every ds4c entry kernel keeps (``wait_for_producers`` before any memory access):

1. ``gdc_wait``: nothing is read before the previous grid in the stream has *completed* and its
   writes are visible (PTX ``griddepcontrol.wait``);
2. then ``gdc_launch_dependents``: the next grid may be launched now; its programs are scheduled
   onto free SMs and themselves wait at 1. until this grid completes.

Before its wait a kernel may compute indices and prefetch *weights* into L2 (``prefetch_l2``;
the one-row FP8 GEMV does with its tunable ``prefetch``), never touch anything a kernel writes.

Ordering stays transitive along a stream: a grid signals only after its own wait, so when a grid
passes its wait, every earlier grid has completed. A kernel whose predecessor is not launched this
way (cuBLAS, a copy) simply starts when that predecessor ends. Only the launch latency of the next
kernel overlaps the current one; results are bit-identical with and without PDL.

PDL is a compile option, on by default and recorded in the artifact (``lowering.options.pdl``;
``ds4c compile --no-pdl`` turns it off, to measure without it): the ahead-of-time binaries and the
runtime's launches follow the same option, through the ``KernelContext`` the launchers are given
(``configs.KernelContext.launches_with_pdl``). Where it is on, kernels launch with PDL on NVIDIA
targets of compute capability 9.0 and later (``h100`` ... ``gb200``), not on AMD, not under
Triton's interpreter (which has no ``griddepcontrol``) and not on an older GPU running the
``h100`` record's kernels. The same decision covers the kernels Inductor generates between ours
(``torch._inductor.config.triton.enable_pdl``).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl

from ds4c.targets import Target

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAVE_GDC = True
except ImportError:  # pragma: no cover - older Triton: kernels launch without PDL
    HAVE_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

MIN_SM = 90  # griddepcontrol: PTX ISA, sm_90 and later


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _live_device_allows() -> bool:
    """False on an NVIDIA GPU older than sm_90 (which runs the ``h100`` record's kernels: no
    ``griddepcontrol`` there); True without a GPU, where the target alone decides (AOT)."""
    if _interpreted() or not torch.cuda.is_available() or torch.version.hip:
        return True
    return torch.cuda.get_device_capability()[0] * 10 >= MIN_SM


def pdl_enabled(target: Target, option: bool) -> bool:
    """Whether kernels built for ``target`` launch with PDL, given the artifact's compile option
    ``pdl`` (``option``): the option and the hardware facts (see the module docstring)."""
    tt = target.triton_target
    return (option and HAVE_GDC and tt is not None and tt[0] == "cuda" and int(tt[1]) >= MIN_SM
            and not _interpreted() and _live_device_allows())


def pdl_kwargs(on: bool) -> dict[str, Any]:
    """Keyword arguments of ``kernel[grid](...)`` for PDL ``on`` or off (``pdl_enabled``): the
    kernel's ``PDL`` constexpr and, when on, Triton's ``launch_pdl`` option (a compile option too,
    so part of the binary's cache key). Launchers get them through ``configs.Launch.kwargs``, never
    alone: ``launch_pdl`` without the kernel's wait would let it read its inputs early."""
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def prefetch_l2(ptrs, mask):
    """Ask L2 for the lines at ``ptrs`` (where ``mask``) without waiting for them (PTX
    ``prefetch.global.L2::evict_last``). For read-only data only - weights - and NVIDIA only: a
    weight-streaming kernel may issue it *before* ``wait_for_producers``, so its first weight bytes
    stream in while the previous kernel finishes (``row_gemv`` with the tunable ``prefetch``)."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; mov.b32 $0, 0; }",
        "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def wait_for_producers(PDL: tl.constexpr):
    """In every ds4c entry kernel before its first memory access (its first statement, but for
    weight prefetches): wait for the previous grid, then let the next one launch (a no-op when
    ``PDL`` is false)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
