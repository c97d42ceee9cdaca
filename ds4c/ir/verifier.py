"""Structural verifier for graphs. Errors name the op (index, result, name) and what is wrong.

Besides SSA form and each op's own ``verify``, every result of an op that infers its types
(``OpDef.infer_types``) must be declared with the type its definition infers: a pass that writes
a wrong type fails ``VerifyAfterEach``, and an artifact whose IR was edited is refused at load.
"""

from __future__ import annotations

from typing import Any

import torch

from ds4c.errors import Ds4cError, IRError, VerificationError
from ds4c.ir.graph import INPUT_KINDS, Graph, Op, Value, iter_values, map_values
from ds4c.ir.registry import get_op, split_results
from ds4c.ir.shapes import same_dim
from ds4c.ir.types import IRType, ListType, ScalarType, TensorType


def _describe(index: int, op: Op) -> str:
    lhs = ", ".join(f"%{r.name}" for r in op.results)
    return f"op #{index} ({lhs + ' = ' if lhs else ''}{op.name})"


def infer_result_types(op: Op) -> list[IRType] | None:
    """The result types ``op``'s definition infers from its operands' types and its attributes
    (``OpDef.infer_types``); None for an op that does not infer (ATen ops)."""
    def typed(a: Any) -> Any:
        return a.type if isinstance(a, Value) else a

    opdef = get_op(op.name)
    if not opdef.infers:
        return None
    return opdef.infer_types([map_values(a, typed) for a in op.args], map_values(op.kwargs, typed))


def _same_type(declared: IRType, inferred: IRType) -> bool:
    if declared == inferred:
        return True
    return (isinstance(declared, TensorType) and isinstance(inferred, TensorType) and declared.dtype == inferred.dtype
            and declared.rank == inferred.rank
            and all(same_dim(a, b) for a, b in zip(declared.shape, inferred.shape, strict=True)))


def _check_inferred(op: Op) -> None:
    """Every declared result type is the one the op's definition infers."""
    inferred = infer_result_types(op)
    if inferred is None:
        return
    if len(inferred) != len(op.results):
        raise VerificationError(f"declares {len(op.results)} results, {op.name} makes {len(inferred)}")
    for r, want in zip(op.results, inferred, strict=True):
        if not _same_type(r.type, want):
            at = f" at {op.loc}" if op.loc else ""
            raise VerificationError(
                f"result %{r.name}{at} is declared {r.type}, but {op.name} infers {want} from its operands' types "
                f"and attributes (ds4c.ops); the pass or edit that wrote this op must give it the inferred type: "
                "fix that pass, or recompile the artifact")


def verify_graph(graph: Graph, *, require_constants: bool = False) -> None:
    """Check SSA form, admitted ops (``get_op``: ds4c's, ``sym.*``, the ATen allow-list), argument
    binding, types (declared result types against each op's inferred ones) and outputs.

    Raises VerificationError naming the first offending op.
    """
    defined: set[Value] = set()
    names: set[str] = set()
    for inp in graph.inputs:
        if inp.kind not in INPUT_KINDS:
            raise VerificationError(f"graph @{graph.name}: input %{inp.value.name} has unknown kind '{inp.kind}'")
        if inp.value.name in names:
            raise VerificationError(f"graph @{graph.name}: input %{inp.value.name} defined twice")
        if inp.kind in ("param", "state", "const") and not isinstance(inp.value.type, TensorType):
            raise VerificationError(f"graph @{graph.name}: {inp.kind} %{inp.value.name} must be a tensor")
        if inp.kind == "const" and require_constants:
            t = graph.constants.get(inp.value.name)
            if t is None:
                raise VerificationError(f"graph @{graph.name}: const %{inp.value.name} has no data attached")
            ty = inp.value.type
            assert isinstance(ty, TensorType)
            if t.dtype != ty.dtype or tuple(t.shape) != tuple(ty.shape):
                raise VerificationError(
                    f"graph @{graph.name}: const %{inp.value.name} data is {t.dtype}{list(t.shape)}, type says {ty}")
        defined.add(inp.value)
        names.add(inp.value.name)
    for index, op in enumerate(graph.ops):
        where = _describe(index, op)
        try:
            opdef = get_op(op.name)
        except IRError as e:
            raise VerificationError(f"graph @{graph.name}: {where}: {e}") from None
        for v in op.operands:
            if v not in defined:
                raise VerificationError(
                    f"graph @{graph.name}: {where} uses %{v.name} before it is defined (or from another graph)")
        for r in op.results:
            if not isinstance(r.type, TensorType | ScalarType | ListType):
                raise VerificationError(f"graph @{graph.name}: {where} result %{r.name} has no valid type")
            if r.name in names:
                raise VerificationError(f"graph @{graph.name}: {where} redefines %{r.name} (SSA)")
        try:
            opdef.verify(op)
            _check_inferred(op)
        except VerificationError as e:
            raise VerificationError(f"graph @{graph.name}: {where}: {e}") from None
        except Ds4cError as e:  # an op's declaration refusing an attribute (an unknown weight format ...)
            raise VerificationError(f"graph @{graph.name}: {where}: {e}") from None
        except (TypeError, ValueError, AttributeError, IndexError, KeyError, ArithmeticError) as e:
            # an op's own verifier meeting operands of the wrong kind (a number where it reads a
            # tensor's type): the graph is malformed, which is this function's error to report
            raise VerificationError(f"graph @{graph.name}: {where}: malformed operands or attributes "
                                    f"({type(e).__name__}: {e}); check the op's arguments against its "
                                    "declaration in ds4c.ops") from None
        for r in op.results:
            defined.add(r)
            names.add(r.name)
    _check_in_place_writes(graph)
    seen_out: set[str] = set()
    for name, v in graph.outputs:
        if name in seen_out:
            raise VerificationError(f"graph @{graph.name}: output '{name}' returned twice")
        seen_out.add(name)
        if v not in defined:
            raise VerificationError(f"graph @{graph.name}: output '{name}' returns undefined %{v.name}")


def _check_in_place_writes(graph: Graph) -> None:
    """An op that writes its first operand in place (``writes_in_place``) must be the last to touch
    it: every other reader of that tensor (or of a view of it) reads before it and is among its
    operands, and no op reads the tensor or its views after it (they would see the new rows)."""
    from ds4c.ir.registry import has_trait

    writers = [(i, op) for i, op in enumerate(graph.ops) if has_trait(op.name, "writes_in_place")]
    if not writers:
        return
    producer = {r: i for i, op in enumerate(graph.ops) for r in op.results}
    for index, op in writers:
        target = op.args[0]
        aliases = {target}
        root = target
        while root in producer and has_trait(graph.ops[producer[root]].name, "view"):
            root = graph.ops[producer[root]].args[0]
            aliases.add(root)
        for j, other in enumerate(graph.ops):  # views of the written tensor, wherever they are made
            if j != index and has_trait(other.name, "view") and other.args and other.args[0] in aliases:
                aliases.update(other.results)
        listed = set(iter_values(op.args[3])) if len(op.args) > 3 else set()
        for j, other in enumerate(graph.ops):
            if j == index or has_trait(other.name, "view") or not any(v in aliases for v in other.operands):
                continue
            reads = [r for r in other.results if isinstance(r.type, TensorType)]
            if j < index and not reads:
                continue  # a size query, not a read of the data
            if j > index or not any(r in listed for r in reads):
                raise VerificationError(
                    f"graph @{graph.name}: {_describe(index, op)} writes %{target.name} in place, but "
                    f"{_describe(j, other)} reads it {'after' if j > index else 'and is not among its operands'}: "
                    "list every earlier reader in the write's last operand, and read the written result, not "
                    "the old tensor, after it")


def check_types(graph: Graph, sizes: dict[str, int]) -> None:
    """Re-derive every result type by running each op on meta tensors with symbols bound to ``sizes``.

    Catches ops whose declared result type disagrees with what the op computes.
    """
    from ds4c.ir.shapes import eval_dim

    env: dict[Value, object] = {}
    for inp in graph.inputs:
        ty = inp.value.type
        if isinstance(ty, TensorType):
            shape = [eval_dim(d, sizes) for d in ty.shape]
            try:
                env[inp.value] = torch.empty(shape, dtype=ty.dtype, device="meta")
            except (RuntimeError, TypeError, OverflowError) as e:  # negative or overflowing sizes
                raise VerificationError(f"graph @{graph.name}: input %{inp.value.name}: {ty} is {shape} at {sizes}, "
                                        f"not a tensor shape ({str(e).splitlines()[0]})") from None
        else:
            env[inp.value] = sizes.get(inp.value.name, 1)
    for index, op in enumerate(graph.ops):
        opdef = get_op(op.name)
        args = map_values(op.args, lambda v: env[v])
        kwargs = map_values(op.kwargs, lambda v: env[v])
        kwargs = {k: (torch.device("meta") if isinstance(a, torch.device) else a) for k, a in kwargs.items()}
        try:
            out = opdef.reference(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported with the op's name
            raise VerificationError(f"graph @{graph.name}: {_describe(index, op)} fails on meta tensors: {e}") from e
        outs = split_results(out)
        if len(outs) != len(op.results):
            raise VerificationError(
                f"graph @{graph.name}: {_describe(index, op)} computes {len(outs)} results, declares {len(op.results)}")
        for r, o in zip(op.results, outs, strict=True):
            ty = r.type
            if isinstance(ty, TensorType):
                if not isinstance(o, torch.Tensor):
                    raise VerificationError(f"graph @{graph.name}: {_describe(index, op)} result %{r.name} is not a tensor")
                want = [eval_dim(d, sizes) for d in ty.shape]
                if o.dtype != ty.dtype or list(o.shape) != want:
                    raise VerificationError(
                        f"graph @{graph.name}: {_describe(index, op)} result %{r.name} declared {ty} "
                        f"(= {list(want)} at {sizes}) but computes {o.dtype} {list(o.shape)}")
            env[r] = o
