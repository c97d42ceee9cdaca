"""IR types: tensors with (possibly symbolic) shapes, and scalars.

A dimension is an ``int`` or a ``str`` holding a sympy-parsable expression over symbols
(``B``, ``S``, ``s0``, ``(S//4)``). Types print as ``f32[B,S,64]`` or ``int``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from ds4c.errors import IRError

Dim = int | str

# Short names used in IR text. Order matters only for printing ties (none here).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "f8e4m3",
    torch.float8_e5m2: "f8e5m2",
    torch.float8_e8m0fnu: "f8e8m0",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
    torch.complex64: "c64",
    torch.complex128: "c128",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise IRError(f"dtype {dtype} has no IR name; add it to ds4c.ir.types.DTYPE_NAMES") from None


def torch_dtype(name: str) -> torch.dtype | None:
    """The dtype torch spells ``name`` (``'bfloat16'``, ``'torch.int64'``: how manifests and numpy
    name dtypes) among those the IR has (``DTYPE_NAMES``); None for any other name."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES else None


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES_BY_NAME[name]
    except KeyError:
        raise IRError(f"unknown dtype '{name}'; known: {', '.join(DTYPES_BY_NAME)}") from None


@dataclass(frozen=True)
class TensorType:
    dtype: torch.dtype
    shape: tuple[Dim, ...]

    def __str__(self) -> str:
        return f"{dtype_name(self.dtype)}[{','.join(str(d) for d in self.shape)}]"

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int | None:
        if not self.is_static:
            return None
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def nbytes(self) -> int | None:
        n = self.numel()
        return None if n is None else n * self.dtype.itemsize


@dataclass(frozen=True)
class ScalarType:
    """A host scalar (symbolic sizes, python numbers) carried between ops: ``int``, ``float``, ``bool``."""

    kind: str

    def __str__(self) -> str:
        return self.kind


@dataclass(frozen=True)
class ListType:
    """A list of tensors whose length is fixed at trace time (``list<f32[2,3],f32[2,3]>``)."""

    elements: tuple[TensorType, ...]

    def __str__(self) -> str:
        return "list<" + ",".join(str(e) for e in self.elements) + ">"


IRType = TensorType | ScalarType | ListType

SCALAR_KINDS = ("int", "float", "bool")
MAX_DIM = 2**62  # torch sizes are int64; products of dims must stay representable too


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets/parentheses."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "([<":
            depth += 1
        elif ch in ")]>":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur or out:
        out.append("".join(cur))
    return out


@functools.lru_cache(maxsize=16384)
def parse_dim(text: str) -> Dim:
    """An integer, or a symbolic expression checked here against the grammar of ``ds4c.ir.shapes``."""
    text = text.strip()
    if not text:
        raise IRError("empty dimension in a type")
    if re.fullmatch(r"-?\d{1,30}", text):
        if not 0 <= int(text) <= MAX_DIM:
            raise IRError(f"dimension {text} is out of range (0 to 2**62)")
        return int(text)
    import sympy

    from ds4c.ir.shapes import dim_expr

    expr = dim_expr(text)  # IRError when it is not an expression of ours
    if expr.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan) or (expr.is_number and not 0 <= expr <= MAX_DIM):
        raise IRError(f"dimension '{text[:80]}' has no size value (a division by zero, or out of 0 to 2**62)")
    return text


@functools.lru_cache(maxsize=16384)
def parse_type(text: str) -> IRType:
    """The type ``text`` spells (types are immutable: an artifact's many repeats are parsed once)."""
    text = text.strip()
    if text in SCALAR_KINDS:
        return ScalarType(text)
    if text.startswith("list<") and text.endswith(">"):
        inner = text[5:-1]
        elems = [parse_type(t) for t in _split_top(inner)] if inner else []
        if not all(isinstance(e, TensorType) for e in elems):
            raise IRError(f"list type may only hold tensors: '{text}'")
        return ListType(tuple(elems))  # type: ignore[arg-type]
    if "[" in text and text.endswith("]"):
        head, _, rest = text.partition("[")
        dims = rest[:-1]
        shape = tuple(parse_dim(d) for d in _split_top(dims)) if dims.strip() else ()
        return TensorType(parse_dtype(head), shape)
    raise IRError(f"cannot parse type '{text}'; expected e.g. f32[B,S,64], int, float or bool")


def type_of_tensor(t: torch.Tensor) -> TensorType:
    return TensorType(t.dtype, tuple(int(s) for s in t.shape))
