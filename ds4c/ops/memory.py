"""``ds4c.prefetch``: bring a host-resident tensor (a weight placed in host-pinned memory) to the device.

    %w_dev = ds4c.prefetch(%w) : bf16[2048,4096]

Inserted by ``plan_memory`` a few ops ahead of the weight's first use; ``schedule_streams`` puts
it on the copy stream. The reference is a (non-blocking) copy to the device of the computation,
so on the reference backend, where every tensor already lives there, it is the identity.
"""

from __future__ import annotations

from typing import Any

import torch

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, Operand, register_op
from ds4c.ir.types import TensorType

PREFETCH = "ds4c.prefetch"


@register_op
class Prefetch(OpDef):
    name = PREFETCH
    num_results = 1
    operands = (Operand("x", "weight"),)
    traits = frozenset({"transfer"})

    def reference(self, x: torch.Tensor, *, device: Any = None) -> torch.Tensor:
        return x if device is None else x.to(device, non_blocking=True)

    def infer_types(self, operand_types, kwargs):
        return [self.tensor_operand(operand_types, 0)]

    def verify(self, op: Any) -> None:
        super().verify(op)
        operands = op.operands
        if len(operands) != 1 or not isinstance(operands[0].type, TensorType):
            raise VerificationError(f"{PREFETCH} takes exactly one tensor operand")
