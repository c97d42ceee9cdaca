"""``quant.dequant``: a packed weight back in the compute dtype (the reference every backend can run).

    %w = quant.dequant(%w.qdata, %w.scale, format="mxfp4", shape=[8,64,64], dtype=dtype(bf16)) : bf16[8,64,64]

Operands are the packed tensors in the order of the format's ``packed_spec`` (ds4c.quant.formats).
Device backends fuse the dequantisation into the GEMM that reads ``%w`` (or compute natively in
the format); the reference backend expands the weight right before its one use.
"""

from __future__ import annotations

import torch

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, register_op
from ds4c.ir.types import TensorType


@register_op
class Dequant(OpDef):
    name = "quant.dequant"
    num_results = 1

    def reference(self, *packed: torch.Tensor, format: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        from ds4c.quant.formats import get_format

        fmt = get_format(format)
        return fmt.unpack(dict(zip(fmt.packed_spec(tuple(shape)), packed, strict=True)), tuple(shape), dtype)

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
        res = op.result.type
        if isinstance(res, TensorType) and (tuple(res.shape) != shape or res.dtype != op.kwargs.get("dtype")):
            raise VerificationError(f"quant.dequant: result {res} must be {op.kwargs.get('dtype')}{list(shape)}")
