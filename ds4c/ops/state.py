"""``state.write``: rows of a serving pool written in place.

    %pool2 = state.write(%pool, %rows, %values, [%read1, %read2]) : bf16[PW,32,512]

The serving entry points keep per-request state in pools of pages (``ds4c.models.deepseek_v4.paged``)
that a step updates a few rows of. Traced, the update is functional (``aten.index_put``: a new
pool, the old one copied whole); ``lower_paged_state`` makes it this op, whose result *is* its
first operand (``view``: no buffer of its own), written at ``rows`` (int64 [n], row indices of the
flattened leading dimension; duplicates land in the trash rows, where any of them may win).

Writing in place is correct only if nothing reads the old pool afterwards: every other reader of
``%pool`` (or of a view of it) is listed in the last operand, so that every schedule runs them
first, and the verifier refuses a reader that is not (``ds4c.ir.verifier``).
"""

from __future__ import annotations

from typing import Any

import torch

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, Operand, register_op
from ds4c.ir.types import TensorType

STATE_WRITE = "state.write"


@register_op
class StateWrite(OpDef):
    name = STATE_WRITE
    pure = False
    num_results = 1
    operands = (Operand("pool"), Operand("rows", "index"), Operand("values"), Operand("after", variadic=True))
    traits = frozenset({"view", "writes_in_place"})

    def reference(self, pool: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, after: Any = ()) -> torch.Tensor:
        return pool.index_put_((rows.to(device=pool.device, dtype=torch.long),), values.to(pool.dtype))

    def infer_types(self, operand_types, kwargs):
        pool = self.tensor_operand(operand_types, 0, min_rank=1)
        rows = self.tensor_operand(operand_types, 1, min_rank=1)
        values = self.tensor_operand(operand_types, 2, min_rank=1)
        if rows.rank != 1 or rows.dtype not in (torch.int64, torch.int32):
            raise VerificationError(f"{STATE_WRITE}: rows must be int64 [n], got {rows}")
        if values.rank != pool.rank or values.shape[1:] != pool.shape[1:]:
            raise VerificationError(f"{STATE_WRITE}: values {values} are not rows of the pool {pool}")
        return [pool]

    def verify(self, op: Any) -> None:
        super().verify(op)
        if len(op.args) != 4 or not isinstance(op.args[3], list | tuple):
            raise VerificationError(f"{STATE_WRITE} takes (pool, rows, values, [readers before it])")
        if not isinstance(op.results[0].type, TensorType):
            raise VerificationError(f"{STATE_WRITE}: its result must be a tensor")
