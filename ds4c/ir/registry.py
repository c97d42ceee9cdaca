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
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch

from ds4c.errors import IRError, VerificationError
from ds4c.ir.allowed_aten import is_allowed, refusal


class OpDef:
    """Declaration of an op: name, reference implementation, optional verifier.

    Subclasses override ``reference`` (torch, any device) and may override ``verify`` to check
    operand/result types. ``pure`` ops may be removed when unused and merged by CSE.
    """

    name: str = ""
    pure: bool = True
    num_results: int | None = None  # None: any

    def reference(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"op {self.name} has no reference implementation")

    def verify(self, op: Any) -> None:
        if self.num_results is not None and len(op.results) != self.num_results:
            raise VerificationError(f"op {op.name} must have {self.num_results} results, has {len(op.results)}")


_REGISTRY: dict[str, OpDef] = {}


def register_op(cls_or_def: type[OpDef] | OpDef) -> Any:
    opdef = cls_or_def() if isinstance(cls_or_def, type) else cls_or_def
    if not opdef.name:
        raise IRError(f"{cls_or_def} declares no op name")
    if opdef.name in _REGISTRY:
        raise IRError(f"op {opdef.name} registered twice")
    _REGISTRY[opdef.name] = opdef
    return cls_or_def


class TorchOpDef(OpDef):
    """An op that is a ``torch.ops`` overload (``aten.view.default``); reference = the kernel."""

    def __init__(self, name: str, overload: torch._ops.OpOverload):
        self.name = name
        self.overload = overload
        self.schema = overload._schema
        self.pure = not self.schema.is_mutable
        self.num_results = None

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
    """Host arithmetic on (symbolic) scalars."""

    num_results = 1

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name = name
        self.fn = fn

    def reference(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


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
for _fn, _name in SYM_OPS.items():
    register_op(SymOpDef(_name, _fn))


_TORCH_NAMESPACES = {"aten", "prims", "quantized", "_c10d_functional", "c10d_functional"}


def get_op(name: str) -> OpDef:
    """Return the OpDef for ``name``: ds4c's own ops and ``sym.*`` from the registry, ATen ops from
    ``torch.ops`` when ``ds4c.ir.allowed_aten`` lists them. Anything else is an ``IRError``."""
    opdef = _REGISTRY.get(name)
    if opdef is not None:
        return opdef
    if name.split(".")[0] not in _TORCH_NAMESPACES:
        import ds4c.ops  # noqa: F401 - registers ds4c's fused ops

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


def split_results(out: Any) -> list[Any]:
    """An op's return value as the list of its IR results (tuples and lists are flattened)."""
    return list(out) if isinstance(out, tuple | list) else [out]
