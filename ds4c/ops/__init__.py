"""ds4c's fused operators: one module per concept, each op declared once with its PyTorch reference.

Importing this package registers the ops (``ds4c.ir.registry.get_op`` imports it on demand).
"""

from ds4c.ir.registry import check_declarations
from ds4c.ops import attention, collectives, compress, memory, mhc, moe, norms, paged, quant, rope, state  # noqa: F401

check_declarations()
