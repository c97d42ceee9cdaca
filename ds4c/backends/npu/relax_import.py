"""One NPU op instance -> one Relax function: ``torch.export`` of the op's reference, then TVM's importer.

The reference is the op's own PyTorch implementation (so kernel and reference cannot disagree),
traced at the op's IR types: symbolic dims (``B``, ``S``, ``S+1024``) become ``torch.export``
dims, so one kernel serves every batch and sequence length. ``moe`` is traced in its gather
formulation (the reference groups tokens by expert with a data-dependent loop, which no static
compiler takes). Instances with the same signature (op, operand types, attributes) share a kernel.

    sig = signature(op)             # ('rms_norm', (('f32', ('B', 'S', 64)), ...), 'eps=1e-06')
    fn = import_op(op, name)         # tvm.relax.Function with global_symbol ``name``
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import sympy
import torch

from ds4c.errors import IRError
from ds4c.ir.graph import Op, Value, map_values
from ds4c.ir.registry import get_op, split_results
from ds4c.ir.shapes import dim_expr
from ds4c.ir.types import Dim, TensorType, dtype_name

# Example sizes per symbol for tracing (away from 0/1, which torch.export would specialise).
EXAMPLE_SIZES = {"B": 2, "S": 5}


def signature(op: Op) -> tuple[Any, ...]:
    """What determines the kernel: op name, operand structure and types, attributes."""

    def ty(v: Value) -> Any:
        t = v.type
        return (dtype_name(t.dtype), tuple(t.shape)) if isinstance(t, TensorType) else str(t)

    return (op.name, repr(map_values(op.args, ty)), repr(sorted(map_values(op.kwargs, ty).items())),
            tuple(ty(r) for r in op.results))


def _reference(op: Op):
    """The formulation traced into Relax: the op's portable one (static shapes)."""
    return get_op(op.name).portable(op.kwargs)


class _OpModule(torch.nn.Module):
    """``forward(*tensors)``: the op's reference with its tensor operands in order."""

    def __init__(self, op: Op):
        super().__init__()
        self.op = op
        self.fn = _reference(op)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        it = iter(tensors)
        args = map_values(self.op.args, lambda v: next(it))
        kwargs = map_values(self.op.kwargs, lambda v: next(it))
        return tuple(split_results(self.fn(*args, **kwargs)))


def _symbols(values: Sequence[Value]) -> dict[str, sympy.Symbol]:
    out: dict[str, sympy.Symbol] = {}
    for v in values:
        for d in v.type.shape:
            if isinstance(d, str):
                for s in dim_expr(d).free_symbols:
                    out[str(s)] = s
    return out


def _example(dim: Dim, sizes: dict[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    return int(dim_expr(dim).subs({sympy.Symbol(k, integer=True, positive=True): v for k, v in sizes.items()}))


def _export_dim(dim: Dim, dims: dict[str, Any], where: str) -> Any:
    """A torch.export dim for an IR dim: a symbol, or ``a*symbol + b`` of one (torch's derived dims)."""
    expr = dim_expr(dim)
    syms = list(expr.free_symbols)
    if len(syms) != 1:
        raise IRError(f"{where}: dimension '{dim}' is not a function of one symbol; the NPU kernel cannot take it")
    base = dims[str(syms[0])]
    poly = sympy.Poly(expr, syms[0]) if expr.is_polynomial(syms[0]) else None
    if poly is None or poly.degree() != 1:
        raise IRError(f"{where}: dimension '{dim}' is not linear in {syms[0]}; the NPU kernel cannot take it")
    a, b = (int(c) for c in poly.all_coeffs())
    out = base
    if a != 1:
        out = out * a
    if b:
        out = out + b
    return out


def example_inputs(op: Op, sizes: dict[str, int] | None = None, seed: int = 0) -> list[torch.Tensor]:
    """Random tensors of the op's operand types (indices within bounds of what they index)."""
    sizes = {**EXAMPLE_SIZES, **(sizes or {})}
    gen = torch.Generator().manual_seed(seed)
    out = []
    for v in op.operands:
        shape = [_example(d, sizes) for d in v.type.shape]
        dt = v.type.dtype
        if dt.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dt))
        elif dt == torch.bool:
            out.append(torch.rand(shape, generator=gen) < 0.5)
        else:
            out.append(torch.randint(0, 2, shape, generator=gen).to(dt))
    return out


def export_op(op: Op) -> torch.export.ExportedProgram:
    """``torch.export`` of the op's reference at its IR types, symbolic dims kept symbolic."""
    from torch.export import Dim as TorchDim

    where = f"op {op.name} -> %{op.results[0].name}"
    operands = list(op.operands)
    syms = _symbols(operands)
    # Prefixed: torch sympifies dim names, and "S" is sympy's singleton registry. No upper bound:
    # given one, Relax's memory planner would allocate every intermediate at its largest size.
    dims = {name: TorchDim(f"dim_{name}", min=2 if name == "S" else 1) for name in syms}
    dynamic = tuple({i: _export_dim(d, dims, where) for i, d in enumerate(v.type.shape) if isinstance(d, str)}
                    or None for v in operands)
    example = example_inputs(op)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(_OpModule(op).eval(), tuple(example), dynamic_shapes=(dynamic,), strict=False)


def _max_dim(node: Any, importer: Any) -> Any:
    """``aten.max.dim`` as max + argmax: TVM's importer maps it to ``topk(k=1)``, whose ``c``
    codegen is broken in 0.27 (and a reduction is what the vector unit does anyway)."""
    from tvm import relax

    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return importer.block_builder.emit(relax.Tuple([relax.op.max(x, dim, keep),
                                                    relax.op.argmax(x, dim, keep)]))


_CONVERTERS = {"max.dim": _max_dim}


def import_op(op: Op, name: str) -> Any:
    """The op as a Relax function named ``name`` (takes the op's tensor operands, returns a tuple)."""
    from tvm.relax.frontend.torch import from_exported_program

    ep = export_op(op)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # PyTorch's decompositions re-trace the program (slow): only when the importer needs them
            mod = from_exported_program(ep, keep_params_as_input=False, run_ep_decomposition=False,
                                        custom_convert_map=_CONVERTERS)
        except AssertionError:  # "Unsupported function types [...]"
            mod = from_exported_program(ep, keep_params_as_input=False, custom_convert_map=_CONVERTERS)
    return mod["main"].with_attr("global_symbol", name)
