"""Per-layer precision: storage formats, sensitivity, policies and packing (see each module).

Passes: ``assign_precision`` (ds4c.passes.assign_precision) chooses a format per unit;
``quantize_weights`` rewrites the IR to read packed weights through ``quant.dequant``.
"""

from ds4c.quant.formats import FORMATS, Format, FormatError, get_format
from ds4c.quant.packing import pack_weights, packed_name, packed_names
from ds4c.quant.policy import DEFAULT_ERROR_BOUND, POLICIES, Choice

__all__ = ["DEFAULT_ERROR_BOUND", "FORMATS", "POLICIES", "Choice", "Format", "FormatError", "get_format",
           "pack_weights", "packed_name", "packed_names"]
