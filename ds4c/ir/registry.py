"""The op registry: every op name maps to one ``OpDef`` holding its reference implementation.

Three families live here:
- ATen-level ops (``aten.mm.default``): resolved from ``torch.ops`` on first use, but only those
  on ds4c's allow-list (``ds4c.ir.allowed_aten``: pure tensor ops, nothing that touches files,
  writes in place or draws random numbers); the reference is the ATen kernel itself, the
  verifier checks arguments against its schema.
- ``sym.*``: integer arithmetic on symbolic sizes (what torch.export emits as ``operator.mul`` ...).
- ds4c's own ops (fused attention, MoE, ...), declared with ``@register_op``.

``get_op`` is the one gate every IR op name passes (parser, verifier, passes, backends), so an
op outside these families cannot be parsed, loaded, folded or run.

An ``OpDef`` also holds what passes and backends need to know about the op, so that no table of
op names elsewhere restates it: its operands by name and role (``operands``), its result types
from its operands' types and attributes (``infer_types``: the verifier checks every declared
result against it), its ``traits`` (``TRAITS`` says what each means), the op that reads its
weights packed (``packed_variant``) and the formulation exporters trace (``portable``). ds4c's ops declare them where they are defined;
ATen ops derive them from their torch schema (operand names; a result that aliases an input is a
view) plus the declarations below (``_ATEN_TRAITS``, ``_ATEN_OPERANDS``, ``_ATEN_PACKED``), the one
place that names ATen ops for their facts. A declaration naming an op that does not exist or a
trait nobody defined is an ``IRError`` at import, so such names cannot go stale.

    >>> sorted(get_op("aten.view.default").traits)
    ['reshape', 'view']
    >>> [o.name for o in get_op("moe").operands if o.unit]
    ['gate_up', 'down', 's_gate', 's_up', 's_down']
    >>> from ds4c.ir.types import parse_type
    >>> [str(t) for t in get_op("linear.packed").infer_types(
    ...     [parse_type("bf16[B,S,64]"), None, None], {"format": "fp8", "shape": [32, 64]})]
    ['bf16[B,S,32]']
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ds4c.errors import IRError, VerificationError
from ds4c.ir.allowed_aten import ALLOWED_ATEN_OPS, is_allowed, refusal
from ds4c.ir.types import IRType, ScalarType, TensorType

# What an operand is to the op.
ROLES = {
    "data": "an activation the op computes on",
    "index": "integer ids or positions that select, not values that are computed on",
    "weight": "a model parameter (for packed ops: the packed tensors of one, scales included)",
}

# What an op may be known to be; passes and backends ask ``has_trait`` / ``ops_with`` instead of
# keeping lists of op names.
TRAITS = {
    "view": "every result is a view of the first tensor operand: no buffer of its own (for ATen ops, "
            "derived: the schema lets a result alias an input and the op is not copy_if_needed)",
    "copy_if_needed": "returns its input itself when there is nothing to do, a fresh tensor otherwise "
                      "(contiguous, to): its result may alias an input, but it is not a view",
    "reshape": "a view that only reshapes: the elements in row-major order are the input's",
    "broadcast": "repeats its input's elements along new or size-1 dimensions, computing nothing",
    "cast": "converts its input elementwise to another dtype",
    "identity": "returns its input's values unchanged (a copy or an alias)",
    "layout": "moves, selects or joins elements without arithmetic (concatenation, gathers, scatters)",
    "factory": "makes a filled tensor from sizes (arange, full, zeros)",
    "transfer": "moves a tensor between memories (host and device): a copy the runtime issues",
    "writes_in_place": "writes its first operand in place and returns it: every other reader of that operand "
                       "(or of a view of it) is among its operands, so that it runs after them (the verifier checks)",
    "topk": "selects the k largest entries",
    "commutative": "its first two operands may be swapped without changing the result",
    "host_sync": "its reference reads operand values on the host to size tensors (MoE groups tokens by "
                 "expert): it cannot be traced with fake tensors or captured in a CUDA graph; ``portable`` can",
    "positionwise": "maps each position (dimension 1) of its inputs to the same position of its result, "
                    "so slicing the positions commutes with it",
    "npu": "runs fused on the NPU (ds4c.backends.npu: its reference is traced into Relax)",
}


@dataclass(frozen=True)
class Operand:
    """One operand of an op, by position. ``unit``: for a weight, the precision unit it belongs to
    (``ds4c.quant.units``: the weights of one unit get one storage format); ``variadic``: this
    operand and all after it (packed weight tensors, whose number depends on their format)."""

    name: str
    role: str = "data"
    unit: str | None = None
    variadic: bool = False


class OpDef:
    """Declaration of an op: name, reference implementation, result type inference, optional
    verifier, and its facts.

    Subclasses override ``reference`` (torch, any device) and ``infer_types`` (result types from
    operand types and attributes), and may override ``verify`` to check operands and attributes.
    ``pure`` ops may be removed when unused and merged by CSE. ``operands`` (by position),
    ``traits`` (names from ``TRAITS``), ``packed_variant`` (the op that reads this op's weights
    packed) and ``portable`` (the formulation exporters trace) are the facts the rest of ds4c asks
    for by op name. An op that cannot infer says why in ``no_inference``.
    """

    name: str = ""
    pure: bool = True
    num_results: int | None = None  # None: any
    operands: tuple[Operand, ...] = ()
    traits: frozenset[str] = frozenset()
    packed_variant: str | None = None
    no_inference: str = ""  # why ``infer_types`` is None for this op (empty: it infers)

    def reference(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"op {self.name} has no reference implementation")

    def infer_types(self, operand_types: list[IRType | Any], kwargs: dict[str, Any]) -> list[IRType] | None:
        """The types of the results of an instance whose positional operands are ``operand_types``
        (a value's type, a literal as itself: ``None`` for an absent weight, a number) and whose
        attributes are ``kwargs``; None: this op does not infer (``no_inference`` says why). The
        verifier checks every declared result type against it (``ds4c.ir.verifier``); operands it
        cannot type are a ``VerificationError`` naming them (``tensor_operand``)."""
        return None

    @property
    def infers(self) -> bool:
        return type(self).infer_types is not OpDef.infer_types

    def tensor_operand(self, operand_types: list[IRType | Any], index: int, min_rank: int = 0) -> TensorType:
        """Operand ``index``'s type, which must be a tensor of at least ``min_rank`` dimensions."""
        name = self.operands[min(index, len(self.operands) - 1)].name if self.operands else f"#{index}"
        t = operand_types[index] if index < len(operand_types) else None
        if not isinstance(t, TensorType) or t.rank < min_rank:
            want = f"a tensor of rank >= {min_rank}" if min_rank else "a tensor"
            raise VerificationError(f"{self.name}: operand {name} must be {want}, got {t}")
        return t

    def portable(self, kwargs: Mapping[str, Any]) -> Callable[..., Any]:
        """The op's computation (for an instance with attributes ``kwargs``) in a form every
        exporter can trace and fake tensors can run: static shapes, no float8_e8m0. By default the
        reference; ops whose reference is not so (MoE groups tokens by expert with host-side
        counts) override it."""
        return self.reference

    def unit_operands(self) -> list[tuple[tuple[int, ...], str]]:
        """The precision units among the operands: (positions, unit kind), in operand order."""
        units: dict[str, list[int]] = {}
        for i, o in enumerate(self.operands):
            if o.unit is not None:
                units.setdefault(o.unit, []).append(i)
        return [(tuple(pos), kind) for kind, pos in units.items()]

    def verify(self, op: Any) -> None:
        if self.num_results is not None and len(op.results) != self.num_results:
            raise VerificationError(f"op {op.name} must have {self.num_results} results, has {len(op.results)}")


_REGISTRY: dict[str, OpDef] = {}


def _check_facts(name: str, traits: frozenset[str], operands: tuple[Operand, ...]) -> None:
    unknown = sorted(traits - TRAITS.keys())
    if unknown:
        raise IRError(f"op {name} declares unknown traits {unknown}; the traits are {', '.join(TRAITS)} "
                      "(ds4c.ir.registry.TRAITS: add one there, with what it means)")
    for o in operands:
        if o.role not in ROLES:
            raise IRError(f"op {name}: operand {o.name} has unknown role '{o.role}'; roles: {', '.join(ROLES)}")


def register_op(cls_or_def: type[OpDef] | OpDef) -> Any:
    opdef = cls_or_def() if isinstance(cls_or_def, type) else cls_or_def
    if not opdef.name:
        raise IRError(f"{cls_or_def} declares no op name")
    if opdef.name in _REGISTRY:
        raise IRError(f"op {opdef.name} registered twice")
    opdef.traits = frozenset(opdef.traits)
    _check_facts(opdef.name, opdef.traits, opdef.operands)
    _REGISTRY[opdef.name] = opdef
    return cls_or_def


def check_declarations() -> None:
    """Every op name a declaration refers to (a packed variant) is a registered op; ``ds4c.ops``
    runs this once all its ops are registered, so a stale name fails the import."""
    for opdef in list(_REGISTRY.values()):
        if opdef.packed_variant is not None and opdef.packed_variant not in _REGISTRY:
            raise IRError(f"op {opdef.name} declares packed variant '{opdef.packed_variant}', which is not a "
                          "registered op")


# Facts about ATen ops that their schemas do not state, by trait. A view needs no entry: the schema
# says when a result aliases an input. Every name must be on the allow-list (checked at import).
_ATEN_TRAITS: dict[str, tuple[str, ...]] = {
    "view": ("aten._unsafe_view.default",),  # its schema does not mark the alias
    "copy_if_needed": ("aten.contiguous.default", "aten.to.dtype", "aten.to.device"),
    "reshape": ("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default"),
    "broadcast": ("aten.unsqueeze.default", "aten.expand.default", "aten.repeat_interleave.self_int"),
    "cast": ("aten._to_copy.default", "aten.to.dtype"),
    "identity": ("aten.clone.default", "aten.contiguous.default", "aten.alias.default", "aten.detach.default"),
    "layout": ("aten.cat.default", "aten.stack.default", "aten.flip.default", "aten.roll.default",
               "aten.repeat.default", "aten.repeat_interleave.self_int", "aten.index.Tensor",
               "aten.index_select.default", "aten.index_put.default", "aten.gather.default", "aten.scatter.src",
               "aten.scatter.value", "aten.scatter_add.default", "aten.slice_scatter.default",
               "aten.select_scatter.default", "aten.embedding.default", "aten.copy.default",
               "aten.lift_fresh_copy.default"),
    "factory": ("aten.arange.default", "aten.arange.start", "aten.arange.start_step", "aten.full.default",
                "aten.full_like.default", "aten.zeros.default", "aten.zeros_like.default", "aten.ones.default",
                "aten.ones_like.default", "aten.new_full.default", "aten.new_zeros.default",
                "aten.new_ones.default"),
    "transfer": ("aten.to.device",),
    "topk": ("aten.topk.default",),
    "positionwise": ("aten.linear.default", "aten.to.dtype", "aten.mul.Tensor", "aten.add.Tensor"),
    "commutative": ("aten.add.Tensor", "aten.mul.Tensor", "aten.maximum.default", "aten.minimum.default"),
    # matrix-unit ops and vector-unit elementwise math
    "npu": ("aten.linear.default", "aten.matmul.default", "aten.mm.default", "aten.bmm.default",
            "aten.mul.Tensor", "aten.add.Tensor", "aten.sub.Tensor", "aten.div.Tensor", "aten.neg.default",
            "aten.cos.default", "aten.sin.default", "aten.exp.default", "aten.rsqrt.default",
            "aten.sqrt.default", "aten.silu.default", "aten.sigmoid.default", "aten._softmax.default",
            "aten.softmax.int"),
}
# Roles of ATen operands other than "data", by schema argument name.
_ATEN_OPERANDS: dict[str, dict[str, Operand]] = {
    "aten.linear.default": {"weight": Operand("weight", "weight", unit="linear")},
    "aten.embedding.default": {"weight": Operand("weight", "weight", unit="embedding"),
                               "indices": Operand("indices", "index")},
}
_ATEN_PACKED: dict[str, str] = {"aten.linear.default": "linear.packed"}


def _checked_aten_declarations(traits: Mapping[str, tuple[str, ...]], *tables: Mapping[str, Any]
                               ) -> dict[str, frozenset[str]]:
    """``traits`` by op name, after checking that every name the declarations use is an allowed ATen op."""
    by_op: dict[str, set[str]] = {}
    for trait, names in traits.items():
        _check_facts(f"table entry '{trait}' of ds4c.ir.registry", frozenset({trait}), ())
        for name in names:
            by_op.setdefault(name, set()).add(trait)
    for name in [*by_op, *(n for t in tables for n in t)]:
        if not is_allowed(name):
            raise IRError(f"ds4c.ir.registry declares facts of '{name}', which is not an ATen op ds4c admits "
                          "(ds4c.ir.allowed_aten); fix or remove the declaration")
    return {name: frozenset(t) for name, t in by_op.items()}


_ATEN_TRAITS_BY_OP = _checked_aten_declarations(_ATEN_TRAITS, _ATEN_OPERANDS, _ATEN_PACKED)


class TorchOpDef(OpDef):
    """An op that is a ``torch.ops`` overload (``aten.view.default``); reference = the kernel."""

    no_inference = ("an ATen op: its result types are what its kernel computes, which check_types derives by running "
                    "it on meta tensors (torch's shape functions), at sizes, not symbolically")

    def __init__(self, name: str, overload: torch._ops.OpOverload):
        self.name = name
        self.overload = overload
        self.schema = overload._schema
        self.pure = not self.schema.is_mutable
        self.num_results = None
        declared = _ATEN_TRAITS_BY_OP.get(name, frozenset())
        aliases = any(r.alias_info is not None and not r.alias_info.is_write for r in self.schema.returns)
        self.traits = declared | ({"view"} if aliases and "copy_if_needed" not in declared else set())
        roles = _ATEN_OPERANDS.get(name, {})
        self.operands = tuple(roles.get(a.name, Operand(a.name)) for a in self.schema.arguments if not a.kwarg_only)
        self.packed_variant = _ATEN_PACKED.get(name)

    @property
    def may_alias(self) -> bool:
        """Whether the schema lets a result share bytes with an input (views and copy_if_needed ops)."""
        return any(r.alias_info is not None for r in self.schema.returns)

    def reference(self, *args: Any, **kwargs: Any) -> Any:
        return self.overload(*args, **kwargs)

    def verify(self, op: Any) -> None:
        params = self.schema.arguments
        if len(op.args) > len(params):
            raise VerificationError(
                f"op {op.name}: {len(op.args)} positional arguments, schema takes at most {len(params)}: {self.schema}")
        names = {p.name for p in params}
        for k in op.kwargs:
            if k not in names:
                raise VerificationError(f"op {op.name}: unknown keyword argument '{k}'; schema: {self.schema}")
        bound = {p.name for p in params[: len(op.args)]} | set(op.kwargs)
        for p in params:
            if p.name not in bound and not p.has_default_value() and not p.kwarg_only:
                raise VerificationError(f"op {op.name}: missing argument '{p.name}'; schema: {self.schema}")


def _resolve_torch_op(name: str) -> TorchOpDef | None:
    parts = name.split(".")
    if len(parts) != 3:
        return None
    ns, opname, overload = parts
    try:
        packet = getattr(getattr(torch.ops, ns), opname)
        ov = getattr(packet, overload)
    except (AttributeError, RuntimeError):
        return None
    if not isinstance(ov, torch._ops.OpOverload):
        return None
    return TorchOpDef(name, ov)


class SymOpDef(OpDef):
    """Host arithmetic on (symbolic) scalars. ``result``: the kind of scalar it returns, or
    ``arithmetic`` (Python's rule: float when an operand is, else int)."""

    num_results = 1

    def __init__(self, name: str, fn: Callable[..., Any], result: str):
        self.name = name
        self.fn = fn
        self.result = result

    def reference(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def infer_types(self, operand_types: list[IRType | Any], kwargs: dict[str, Any]) -> list[IRType] | None:
        kinds = [_scalar_kind(self.name, t) for t in [*operand_types, *kwargs.values()]]
        if self.result != "arithmetic":
            return [ScalarType(self.result)]
        if "float" in kinds:
            return [ScalarType("float")]
        if self.name in ("sym.max", "sym.min") and kinds and all(k == "bool" for k in kinds):
            return [ScalarType("bool")]  # max(True, False) is True
        exponent = operand_types[1] if self.name == "sym.pow" and len(operand_types) == 2 else None
        if isinstance(exponent, int) and exponent < 0:
            return [ScalarType("float")]  # 2 ** -1 is 0.5
        return [ScalarType("int")]


def _scalar_kind(op_name: str, t: Any) -> str:
    """The kind of a host scalar operand: a value's ScalarType, or a literal bool, int or float."""
    if isinstance(t, ScalarType):
        return t.kind
    if isinstance(t, bool | int | float):
        return "bool" if isinstance(t, bool) else "int" if isinstance(t, int) else "float"
    raise VerificationError(f"{op_name} computes on host scalars (int, float, bool), got {t}")


SYM_OPS: dict[Any, str] = {
    operator.add: "sym.add",
    operator.sub: "sym.sub",
    operator.mul: "sym.mul",
    operator.floordiv: "sym.floordiv",
    operator.truediv: "sym.truediv",
    operator.mod: "sym.mod",
    operator.neg: "sym.neg",
    operator.pow: "sym.pow",
    operator.eq: "sym.eq",
    operator.ne: "sym.ne",
    operator.lt: "sym.lt",
    operator.le: "sym.le",
    operator.gt: "sym.gt",
    operator.ge: "sym.ge",
    torch.sym_max: "sym.max",
    torch.sym_min: "sym.min",
    torch.sym_float: "sym.float",
    torch.sym_int: "sym.int",
    math.ceil: "sym.ceil",
    math.floor: "sym.floor",
}
# What each sym op returns; the rest follow Python's arithmetic (``SymOpDef.result``).
_SYM_RESULTS = {"sym.eq": "bool", "sym.ne": "bool", "sym.lt": "bool", "sym.le": "bool", "sym.gt": "bool",
                "sym.ge": "bool", "sym.truediv": "float", "sym.float": "float", "sym.int": "int", "sym.ceil": "int",
                "sym.floor": "int"}
for _fn, _name in SYM_OPS.items():
    register_op(SymOpDef(_name, _fn, _SYM_RESULTS.get(_name, "arithmetic")))


_TORCH_NAMESPACES = {"aten", "prims", "quantized", "_c10d_functional", "c10d_functional"}


# Op sets: the modules whose import registers op definitions (``@register_op``), loaded by name on
# the first lookup of an op the registry does not hold yet. The IR layer imports no op definitions
# (the import contract in pyproject.toml puts ds4c.ops above it); ``ds4c.ops`` is ds4c's own set.
OP_SETS: list[str] = ["ds4c.ops"]


def load_op_sets() -> None:
    """Import every module of ``OP_SETS`` (each registers its ops once; later calls are free)."""
    import importlib
    import sys

    for module in OP_SETS:
        if module not in sys.modules:
            importlib.import_module(module)


def get_op(name: str) -> OpDef:
    """Return the OpDef for ``name``: ds4c's own ops and ``sym.*`` from the registry, ATen ops from
    ``torch.ops`` when ``ds4c.ir.allowed_aten`` lists them. Anything else is an ``IRError``."""
    opdef = _REGISTRY.get(name)
    if opdef is not None:
        return opdef
    if name.split(".")[0] not in _TORCH_NAMESPACES:
        load_op_sets()
        opdef = _REGISTRY.get(name)
        if opdef is not None:
            return opdef
        raise IRError(f"unknown op '{name[:200]}': not one of ds4c's ops (ds4c.ops) or sym.*, and ATen ops are "
                      "spelled aten.<op>.<overload>; check the name, or recompile the model with this ds4c")
    if not is_allowed(name):
        raise IRError(refusal(name[:200]))
    opdef = _resolve_torch_op(name)
    if opdef is None:
        raise IRError(f"op '{name}' is on ds4c's allow-list but this torch {torch.__version__} has no such overload; "
                      "install a torch version ds4c supports (pyproject.toml)")
    _REGISTRY[name] = opdef
    return opdef


def is_ds4c_op(name: str) -> bool:
    """Whether ``name`` is one of ds4c's own ops (declared with ``@register_op``; not ATen, not sym.*)."""
    try:
        opdef = get_op(name)
    except IRError:
        return False
    return not isinstance(opdef, TorchOpDef | SymOpDef)


def is_registered(name: str) -> bool:
    try:
        get_op(name)
    except IRError:
        return False
    return True


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def has_trait(name: str, trait: str) -> bool:
    """Whether op ``name`` has ``trait`` (a name from ``TRAITS``); an unknown op is an ``IRError``."""
    if trait not in TRAITS:
        raise IRError(f"unknown trait '{trait}'; the traits are {', '.join(TRAITS)}")
    return trait in get_op(name).traits


def packed_variants() -> frozenset[str]:
    """The ops that read packed weights: every op's declared ``packed_variant``."""
    load_op_sets()

    return frozenset({*(o.packed_variant for o in _REGISTRY.values() if o.packed_variant), *_ATEN_PACKED.values()})


@functools.cache
def ops_with(trait: str) -> frozenset[str]:
    """The names of every op (ds4c's own, sym.*, the ATen ops ds4c admits) that has ``trait``."""
    if trait not in TRAITS:
        raise IRError(f"unknown trait '{trait}'; the traits are {', '.join(TRAITS)}")
    load_op_sets()
    names = [n for n in (*_REGISTRY, *ALLOWED_ATEN_OPS) if is_registered(n)]  # an ATen op this torch lacks: none
    return frozenset(n for n in names if trait in get_op(n).traits)


def split_results(out: Any) -> list[Any]:
    """An op's return value as the list of its IR results (tuples and lists are flattened)."""
    return list(out) if isinstance(out, tuple | list) else [out]
