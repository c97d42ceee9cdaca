"""Op facts live on the op definitions: every name a declaration uses is a registered op, and a
declaration naming an op that does not exist cannot be made."""

from __future__ import annotations

import pytest

import ds4c.ir.registry as registry
from ds4c.errors import IRError
from ds4c.ir.allowed_aten import ALLOWED_ATEN_OPS
from ds4c.ir.registry import TRAITS, OpDef, Operand, get_op, has_trait, is_registered, ops_with, register_op


def test_every_op_named_in_a_fact_is_registered():
    declared = {n for names in registry._ATEN_TRAITS.values() for n in names}
    declared |= set(registry._ATEN_OPERANDS) | set(registry._ATEN_PACKED) | set(registry._ATEN_PACKED.values())
    declared |= {get_op(n).packed_variant for n in registry.registered_ops() if get_op(n).packed_variant}
    for name in sorted(declared):
        get_op(name)  # raises IRError for a name that is not an op
    for name in registry.registered_ops():
        assert get_op(name).traits <= TRAITS.keys(), name


def test_a_fact_about_an_unknown_op_cannot_be_declared():
    # the stale case of #25: ds4c.backends.npu.partition named "memory.prefetch", an op that does not exist
    with pytest.raises(IRError, match="memory.prefetch"):
        registry._checked_aten_declarations({"transfer": ("memory.prefetch",)})
    with pytest.raises(IRError, match="aten.not_an_op.default"):
        registry._checked_aten_declarations({}, {"aten.not_an_op.default": {}})
    with pytest.raises(IRError, match="unknown traits"):
        registry._checked_aten_declarations({"prefetch": ("aten.to.device",)})
    with pytest.raises(IRError):
        has_trait("memory.prefetch", "transfer")
    with pytest.raises(IRError, match="unknown trait"):
        has_trait("ds4c.prefetch", "prefetch")
    assert has_trait("ds4c.prefetch", "transfer")


def test_an_op_declaring_an_unknown_trait_or_role_is_refused():
    class Bad(OpDef):
        name = "test.bad_trait"
        traits = frozenset({"viewish"})

    class BadRole(OpDef):
        name = "test.bad_role"
        operands = (Operand("x", "activation"),)

    for cls in (Bad, BadRole):
        with pytest.raises(IRError):
            register_op(cls)
        assert not is_registered(cls.name)


def test_a_packed_variant_that_is_not_an_op_fails_the_check(monkeypatch):
    class Stale(OpDef):
        name = "test.stale_packed"
        packed_variant = "test.stale_packed.packed"

    monkeypatch.setitem(registry._REGISTRY, Stale.name, Stale())
    with pytest.raises(IRError, match="test.stale_packed.packed"):
        registry.check_declarations()


def test_aten_views_are_derived_from_the_schema():
    """A result that the schema lets alias an input is a view, unless the op copies when it must."""
    views = ops_with("view")
    for name in sorted(ALLOWED_ATEN_OPS):
        if not is_registered(name):
            continue
        opdef = get_op(name)
        if opdef.may_alias and name not in views:
            assert "copy_if_needed" in opdef.traits, name
    assert {"aten.view.default", "aten.slice.Tensor", "aten.split.Tensor", "aten._unsafe_view.default"} <= views
    assert not views & {"aten.contiguous.default", "aten.to.dtype", "aten.clone.default", "aten.cat.default"}


def test_operands_have_names_and_roles():
    assert [o.name for o in get_op("aten.linear.default").operands] == ["input", "weight", "bias"]
    assert get_op("aten.linear.default").unit_operands() == [((1,), "linear")]
    assert get_op("moe").unit_operands() == [((4, 5), "experts"), ((6, 7, 8), "shared_experts")]
    assert get_op("moe").packed_variant == "moe.packed"
    assert get_op("aten.linear.default").packed_variant == "linear.packed"
    assert registry.packed_variants() == {"linear.packed", "linear.grouped.packed", "moe.packed"}


def test_torch_dtype_names_the_ir_dtypes_only():
    import torch

    from ds4c.ir.types import DTYPE_NAMES, torch_dtype

    for dtype in DTYPE_NAMES:
        assert torch_dtype(str(dtype)) is dtype and torch_dtype(str(dtype).removeprefix("torch.")) is dtype
    assert torch_dtype("float4_e2m1fn_x2") is None and torch_dtype("Tensor") is None and torch_dtype("nn") is None
    assert torch_dtype("bfloat16") is torch.bfloat16
