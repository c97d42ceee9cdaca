"""ds4c's fused operators: one module per concept, each op declared once with its PyTorch reference.

Importing this package registers the ops (``ds4c.ir.registry.get_op`` imports it on demand).
"""

from ds4c.ir.registry import check_declarations
from ds4c.ops import attention, collectives, compress, memory, mhc, moe, norms, paged, quant, rope, state  # noqa: F401

check_declarations()

# ds4c's custom torch ops (what the model calls where an ATen formulation would cost many
# launches) -> the IR ops the importer names them
TORCH_OPS = {**compress.TORCH_OPS, **paged.TORCH_OPS, **rope.TORCH_OPS}
