"""Op-name groups shared by fusion patterns: the spellings the same computation takes in traced
graphs, read from the ops' traits (``ds4c.ir.registry.TRAITS``)."""

from ds4c.ir.registry import ops_with

CASTS = ops_with("cast")  # _to_copy, to.dtype
VIEWS = ops_with("reshape")  # view, _unsafe_view, reshape
# Value-preserving copies that sit between the ops a pattern cares about (dropout at eval, .contiguous()).
COPIES = ops_with("identity")
