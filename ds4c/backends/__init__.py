"""Backends: device code for a compiled program, per target backend.

``lower_kernels(target, program)`` runs after the pass pipeline and returns what the artifact
stores about device code: a manifest section (``manifest["kernels"]``) and the members under
``kernels/`` (sources and binaries). Each device backend provides a module with
``lower(target, program, *, progress, options) -> (section, members)`` (``options``: the compile
options the manifest records in ``lowering.options``, e.g. ``pdl``):

- ``cuda`` and ``rocm``: ``ds4c.backends.triton.aot`` (Triton, compiled ahead of time for the
  target's arch: cubin for sm_90a / sm_100a, hsaco for gfx942 / gfx950);
- ``npu``: ``ds4c.backends.npu.lower`` (TVM).

The ``reference`` backend (the ``cpu`` target) has no device code.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from ds4c.ir.graph import Program
from ds4c.targets import Target

LOWERINGS = {"cuda": "ds4c.backends.triton.aot", "rocm": "ds4c.backends.triton.aot", "npu": "ds4c.backends.npu.lower"}


def lower_kernels(target: Target, program: Program, *, progress: bool | None = None, binaries: bool = True,
                  options: Mapping[str, bool] | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(manifest ``kernels`` section, ``kernels/`` members) for ``target`` and the compile
    ``options``; empty for the reference backend, and for cuda / rocm when ``binaries`` is False
    (the runtime then JIT-compiles)."""
    name = LOWERINGS.get(target.backend)
    if name is None or (target.backend in ("cuda", "rocm") and not binaries):
        return {}, {}
    module = importlib.import_module(name)
    return module.lower(target, program, progress=progress, options=options)
