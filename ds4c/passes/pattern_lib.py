"""Op-name groups shared by fusion patterns: the spellings the same computation takes in traced graphs."""

CASTS = ("aten._to_copy.default", "aten.to.dtype")
VIEWS = ("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default")
# Value-preserving copies that sit between the ops a pattern cares about (dropout at eval, .contiguous()).
COPIES = ("aten.clone.default", "aten.contiguous.default", "aten.alias.default", "aten.detach.default")
