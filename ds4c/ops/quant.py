"""``quant.dequant``: a packed weight back in the compute dtype (the reference every backend can run).

    %w = quant.dequant(%w.qdata, %w.scale, format="mxfp4", shape=[8,64,64], dtype=dtype(bf16)) : bf16[8,64,64]

Operands are the packed tensors in the order of the format's ``packed_spec`` (ds4c.quant.formats).
Device backends fuse the dequantisation into the GEMM that reads ``%w`` (or compute natively in
the format); the reference backend expands the weight right before its one use.
"""

from __future__ import annotations

import torch

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, Operand, register_op
from ds4c.ir.types import TensorType
from ds4c.ops.attention import grouped_linear_type
from ds4c.ops.moe import Moe


@register_op
class Dequant(OpDef):
    name = "quant.dequant"
    num_results = 1
    operands = (Operand("packed", "weight", variadic=True),)
    traits = frozenset({"npu"})

    def reference(self, *packed: torch.Tensor, format: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        from ds4c.quant.formats import get_format

        fmt = get_format(format)
        return fmt.unpack(dict(zip(fmt.packed_spec(tuple(shape)), packed, strict=True)), tuple(shape), dtype)

    def portable(self, kwargs):
        """``mxfp4``: nibble codes through the E2M1 table and ``2^(b-127)`` scales (the reference
        views the scale bytes as float8_e8m0fnu, which ONNX and torch-mlir lack)."""
        return _mxfp4_dequant_portable if kwargs.get("format") == "mxfp4" else self.reference

    def infer_types(self, operand_types, kwargs):
        dtype = kwargs.get("dtype")
        if not isinstance(dtype, torch.dtype):
            raise VerificationError(f"quant.dequant: dtype= must be a dtype, got {dtype!r}")
        return [TensorType(dtype, weight_shape(self.name, kwargs.get("shape")))]

    def verify(self, op) -> None:
        super().verify(op)
        from ds4c.quant.formats import FORMATS

        fmt = FORMATS.get(op.kwargs.get("format"))
        if fmt is None:
            raise VerificationError(f"quant.dequant: format must be one of {', '.join(FORMATS)}, "
                                    f"got {op.kwargs.get('format')!r}")
        shape = tuple(op.kwargs.get("shape") or ())
        spec = fmt.packed_spec(shape)
        if len(op.args) != len(spec):
            raise VerificationError(f"quant.dequant: format {fmt.name} takes {len(spec)} packed operands "
                                    f"({', '.join(spec)}), got {len(op.args)}")
        for arg, (part, (want_shape, want_dtype)) in zip(op.args, spec.items(), strict=True):
            ty = getattr(arg, "type", None)
            if isinstance(ty, TensorType) and (ty.dtype != want_dtype or tuple(ty.shape) != want_shape):
                raise VerificationError(f"quant.dequant: {fmt.name} {part} of a {list(shape)} weight must be "
                                        f"{want_dtype}{list(want_shape)}, got {ty}")


@register_op
class Activation(OpDef):
    """``x`` quantised as a GEMM that multiplies natively in ``format`` quantises its input, and
    multiplied back (ds4c.quant.activations): what the FP8 (FP4) tensor cores see, in the compute
    dtype. quantize_weights puts it before linears whose FP8 (MXFP4) weights the target multiplies
    natively; the CUDA backend folds it into the ``linear.packed`` that reads it (``act=``).

        %x.fp8 = quant.activation(%x, format="fp8", block=128) : bf16[1,1,4096]
        %x.mxfp4 = quant.activation(%x, format="mxfp4", block=32) : bf16[1,1,4096]
    """

    name = "quant.activation"
    num_results = 1
    operands = (Operand("x"),)
    traits = frozenset({"positionwise"})

    def reference(self, x: torch.Tensor, *, format: str, block: int) -> torch.Tensor:
        from ds4c.quant.activations import roundtrip

        return roundtrip(x, format, block)

    def infer_types(self, operand_types, kwargs):
        return [self.tensor_operand(operand_types, 0)]

    def verify(self, op) -> None:
        super().verify(op)
        from ds4c.quant.activations import ACTIVATION_FORMATS

        if op.kwargs.get("format") not in ACTIVATION_FORMATS or not isinstance(op.kwargs.get("block"), int) \
                or op.kwargs["block"] <= 0 or len(op.args) != 1:
            raise VerificationError(f"quant.activation: takes x, format= one of {', '.join(ACTIVATION_FORMATS)} "
                                    f"and a positive block=, got {op.kwargs}")


def weight_shape(op_name: str, shape) -> tuple[int, ...]:
    """A packed op's ``shape=`` attribute (the weight's logical shape) as a tuple of sizes."""
    if not isinstance(shape, list | tuple) or not shape or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise VerificationError(f"{op_name}: shape= must be the weight's sizes (a list of ints), got {shape!r}")
    return tuple(shape)


def _mxfp4_dequant_portable(qdata: torch.Tensor, scale: torch.Tensor, *, format: str, shape: list[int],
                            dtype: torch.dtype) -> torch.Tensor:
    from ds4c.quant.formats import dequant_mxfp4_portable

    return dequant_mxfp4_portable(qdata, scale, tuple(shape), dtype)


def dequant_operands(args: tuple, formats: list[str], shapes: list[list[int]], dtype: torch.dtype, *,
                     portable: bool = False) -> list[torch.Tensor]:
    """Weight operands of a packed op back in ``dtype``: one group of packed tensors per format
    (the format's ``packed_spec`` order), or one plain tensor where the format is ``none``.
    ``portable``: decoded with exportable ops (``Format.unpack_portable``)."""
    from ds4c.quant.formats import get_format

    out, i = [], 0
    for fmt_name, shape in zip(formats, shapes, strict=True):
        if fmt_name == "none":
            out.append(args[i])
            i += 1
            continue
        fmt = get_format(fmt_name)
        names = list(fmt.packed_spec(tuple(shape)))
        unpack = fmt.unpack_portable if portable else fmt.unpack
        out.append(unpack(dict(zip(names, args[i:i + len(names)], strict=True)), tuple(shape), dtype))
        i += len(names)
    if i != len(args):
        raise VerificationError(f"packed operands: {len(args)} tensors for formats {formats}, expected {i}")
    return out


def packed_operand_count(formats: list[str], shapes: list[list[int]]) -> int:
    from ds4c.quant.formats import get_format

    return sum(1 if f == "none" else len(get_format(f).packed_spec(tuple(s))) for f, s in zip(formats, shapes, strict=True))


@register_op
class LinearPacked(OpDef):
    """``y = x @ dequant(w)ᵀ`` with ``w`` still packed: what device backends run in place of
    ``quant.dequant`` + ``aten.linear`` so a GEMM reads the packed bytes (ds4c.backends.triton.kernels.linear).
    ``act`` (optional) names the activation format the GEMM multiplies in (``quant.activation``
    folded in): ``x`` is quantised to it first.

        %y = linear.packed(%x, %w.qdata, %w.scale, format="fp8", shape=[4096,1024]) : bf16[1,1,4096]
        %y = linear.packed(%x, %w.qdata, %w.scale, format="fp8", shape=[4096,1024], act="fp8") : bf16[1,1,4096]
    """

    name = "linear.packed"
    num_results = 1
    operands = (Operand("x"), Operand("packed", "weight", variadic=True))
    traits = frozenset({"positionwise"})

    def reference(self, x: torch.Tensor, *packed: torch.Tensor, format: str, shape: list[int],
                  act: str | None = None) -> torch.Tensor:
        (w,) = dequant_operands(packed, [format], [shape], x.dtype)
        if act is not None:
            from ds4c.quant.activations import roundtrip

            x = roundtrip(x, act)
        return torch.nn.functional.linear(x, w)

    def portable(self, kwargs):
        """The weight decoded with exportable ops (``Format.unpack_portable``)."""
        return _linear_packed_portable

    def infer_types(self, operand_types, kwargs):
        x = self.tensor_operand(operand_types, 0, min_rank=1)
        return [TensorType(x.dtype, (*x.shape[:-1], weight_shape(self.name, kwargs.get("shape"))[0]))]

    def verify(self, op) -> None:
        super().verify(op)
        from ds4c.quant.activations import ACTIVATION_FORMATS

        n = packed_operand_count([op.kwargs.get("format")], [op.kwargs.get("shape")])
        if len(op.args) != 1 + n:
            raise VerificationError(f"linear.packed: format {op.kwargs.get('format')} takes x and {n} packed operands")
        if op.kwargs.get("act") not in (None, *ACTIVATION_FORMATS):
            raise VerificationError(f"linear.packed: act must be one of {', '.join(ACTIVATION_FORMATS)} (or absent), "
                                    f"got {op.kwargs.get('act')!r}")


@register_op
class LinearGroupedPacked(OpDef):
    """``linear.grouped`` with its weight still packed: ``y[.., g, :] = x[.., g, :] @ dequant(w)[g*O:(g+1)*O, :]ᵀ``
    (the grouped output projection ``wo_a`` reading FP8/INT8/MXFP4 bytes in decode).

        %y = linear.grouped.packed(%x, %w.qdata, %w.scale, format="fp8", shape=[8192,4096], groups=8) : bf16[1,1,8,1024]
    """

    name = "linear.grouped.packed"
    num_results = 1
    operands = (Operand("x"), Operand("packed", "weight", variadic=True))
    traits = frozenset({"positionwise"})

    def reference(self, x: torch.Tensor, *packed: torch.Tensor, format: str, shape: list[int],
                  groups: int) -> torch.Tensor:
        from ds4c.ir.registry import get_op

        (w,) = dequant_operands(packed, [format], [shape], x.dtype)
        return get_op("linear.grouped").reference(x, w, groups=groups)

    def portable(self, kwargs):
        """The weight decoded with exportable ops (``Format.unpack_portable``)."""

        def run(x, *packed, format, shape, groups):
            from ds4c.ir.registry import get_op

            (w,) = dequant_operands(packed, [format], [shape], x.dtype, portable=True)
            return get_op("linear.grouped").reference(x, w, groups=groups)
        return run

    def infer_types(self, operand_types, kwargs):
        x = self.tensor_operand(operand_types, 0, min_rank=2)
        rows = weight_shape(self.name, kwargs.get("shape"))[0]
        return [grouped_linear_type(self.name, x, rows, kwargs.get("groups"))]

    def verify(self, op) -> None:
        super().verify(op)
        n = packed_operand_count([op.kwargs.get("format")], [op.kwargs.get("shape")])
        if len(op.args) != 1 + n:
            raise VerificationError(f"linear.grouped.packed: format {op.kwargs.get('format')} takes x and {n} packed "
                                    "operands")
        shape, groups = op.kwargs.get("shape") or [], op.kwargs.get("groups")
        if not isinstance(groups, int) or groups < 1 or len(shape) != 2 or shape[0] % groups:
            raise VerificationError(f"linear.grouped.packed: groups ({groups}) must divide the weight's rows "
                                    f"(shape {shape})")


MOE_WEIGHTS = tuple(o.name for o in Moe.operands if o.unit)  # gate_up, down, s_gate, s_up, s_down


@register_op
class MoePacked(OpDef):
    """``moe`` whose expert weights (``gate_up``, ``down``, ``s_gate``, ``s_up``, ``s_down``, in that
    order) may be packed: ``formats[i]`` / ``shapes[i]`` describe weight ``i`` (``none``: a plain
    tensor operand). Operands: x, ids, router, selector, then each weight's tensors. ``act`` /
    ``shared_act`` as on ``moe``."""

    name = "moe.packed"
    num_results = 1
    operands = (*Moe.operands[:4], Operand("packed", "weight", variadic=True))
    traits = frozenset({"positionwise", "host_sync"})

    def reference(self, x, ids, router, selector, *packed, formats: list[str], shapes: list[list[int]], **kwargs):
        from ds4c.ops.moe import moe_reference

        return moe_reference(x, ids, router, selector, *dequant_operands(packed, formats, shapes, x.dtype), **kwargs)

    def portable(self, kwargs):
        return _moe_packed_portable

    def infer_types(self, operand_types, kwargs):
        return [self.tensor_operand(operand_types, 0)]

    def verify(self, op) -> None:
        super().verify(op)
        formats, shapes = op.kwargs.get("formats") or [], op.kwargs.get("shapes") or []
        if len(formats) != len(MOE_WEIGHTS) or len(shapes) != len(MOE_WEIGHTS):
            raise VerificationError(f"moe.packed: formats and shapes name the {len(MOE_WEIGHTS)} weights {MOE_WEIGHTS}")
        if len(op.args) != 4 + packed_operand_count(formats, shapes):
            raise VerificationError(f"moe.packed: {len(op.args)} operands do not match formats {formats}")
        from ds4c.ops.moe import verify_activations

        verify_activations(op)


def _moe_packed_portable(x, ids, router, selector, *packed, formats: list[str], shapes: list[list[int]], **kwargs):
    from ds4c.ops.moe import moe_gather_formulation

    return moe_gather_formulation(x, ids, router, selector,
                                  *dequant_operands(packed, formats, shapes, x.dtype, portable=True), **kwargs)


def _linear_packed_portable(x: torch.Tensor, *packed: torch.Tensor, format: str, shape: list[int],
                            act: str | None = None) -> torch.Tensor:
    (w,) = dequant_operands(packed, [format], [shape], x.dtype, portable=True)
    if act is not None:
        from ds4c.quant.activations import roundtrip

        x = roundtrip(x, act)
    return torch.nn.functional.linear(x, w)
