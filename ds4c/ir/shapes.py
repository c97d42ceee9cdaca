"""Symbolic dimensions: evaluation and simplification with sympy."""

from __future__ import annotations

import functools
import re
import warnings
from typing import TYPE_CHECKING

import sympy

from ds4c.errors import IRError

if TYPE_CHECKING:  # types parses dims through this module
    from ds4c.ir.types import Dim

MAX_DIM_TEXT = 400  # a dimension is a short expression over a few symbols
_DIM_CHARS = re.compile(r"[A-Za-z0-9_+\-*/%(), ]+")


@functools.lru_cache(maxsize=8192)
def _parse_floordiv(text: str) -> sympy.Expr:
    # Python's grammar handles '//' precedence; the parsed tree is walked (never evaluated) into
    # sympy: integers, symbols, + - * // %, and the functions of _LOCALS only.
    import ast

    if len(text) > MAX_DIM_TEXT:
        raise IRError(f"symbolic dimension '{text[:40]}...' is longer than {MAX_DIM_TEXT} characters")
    if not _DIM_CHARS.fullmatch(text):
        raise IRError(f"symbolic dimension '{text[:80]}' has characters no dimension has; write e.g. S, (S//4) or B*S")
    try:
        with warnings.catch_warnings():  # "invalid decimal literal" for '4S': refused below, not printed
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise IRError(f"symbolic dimension '{text[:80]}' is not an expression; write e.g. S, (S//4) or B*S") from None

    def ev(node: ast.AST) -> sympy.Expr:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return sympy.Integer(node.value)
        if isinstance(node, ast.Name) and node.id not in _LOCALS:
            return sympy.Symbol(node.id, integer=True, positive=True)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            if isinstance(node.op, ast.FloorDiv):
                return sympy.floor(a / b)
            if isinstance(node.op, ast.Mod):
                return sympy.Mod(a, b)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _LOCALS
                and not node.keywords and _ARITY[node.func.id][0] <= len(node.args) <= _ARITY[node.func.id][1]):
            return _LOCALS[node.func.id](*[ev(a) for a in node.args])
        raise IRError(f"unsupported construct in symbolic dimension '{text[:80]}'; dimensions use integers, "
                      f"symbols, + - * // % and {', '.join(_LOCALS)}")

    try:
        return ev(tree)
    except RecursionError:
        raise IRError(f"symbolic dimension '{text[:40]}...' is nested too deeply") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:  # sympy on e.g. x//0
        raise IRError(f"symbolic dimension '{text[:80]}' has no value ({type(e).__name__}: {e})") from None


_LOCALS = {"Max": sympy.Max, "Min": sympy.Min, "Mod": sympy.Mod, "floor": sympy.floor, "ceiling": sympy.ceiling,
           "FloorDiv": lambda a, b: sympy.floor(a / b), "CeilDiv": lambda a, b: sympy.ceiling(a / b)}
_ARITY = {"Max": (1, 16), "Min": (1, 16), "Mod": (2, 2), "floor": (1, 1), "ceiling": (1, 1), "FloorDiv": (2, 2),
          "CeilDiv": (2, 2)}


def dim_expr(dim: Dim) -> sympy.Expr:
    if isinstance(dim, int):
        return sympy.Integer(dim)
    return _parse_floordiv(dim)


def eval_dim(dim: Dim, sizes: dict[str, int]) -> int:
    """Value of a dimension once its symbols are bound, e.g. eval_dim('(S//4)', {'S': 9}) == 2."""
    if isinstance(dim, int):
        return dim
    expr = dim_expr(dim)
    subs = {s: sizes[s.name] for s in expr.free_symbols if s.name in sizes}
    missing = [s.name for s in expr.free_symbols if s.name not in sizes]
    if missing:
        raise IRError(f"dimension '{dim}' uses unbound symbols {missing}; bound: {sorted(sizes)}")
    try:
        return int(expr.subs(subs))
    except (TypeError, ValueError, ZeroDivisionError) as e:  # x//0 is zoo, which has no int value
        raise IRError(f"dimension '{dim}' has no integer value at {subs} ({e})") from None


def same_dim(a: Dim, b: Dim) -> bool:
    """Whether two dimensions are equal for every value of their symbols ('S-1' and '-1+S' are)."""
    if a == b:
        return True
    if isinstance(a, int) and isinstance(b, int):
        return False
    return sympy.simplify(dim_expr(a) - dim_expr(b)) == 0


def floordiv_dim(dim: Dim, divisor: int) -> Dim:
    """``dim // divisor`` as a dimension: floordiv_dim(32, 2) == 16, floordiv_dim('S', 4) == '(S//4)'."""
    if isinstance(dim, int):
        return dim // divisor
    return format_dim(sympy.floor(dim_expr(dim) / divisor))


def format_dim(expr: sympy.Expr) -> Dim:
    """Canonical text of a sympy dimension, in the grammar ``dim_expr`` reads back: ints stay ints;
    floor(a/b) prints as (a//b), ceiling(a/b) as CeilDiv(a,b)."""
    expr = sympy.simplify(expr) if not expr.is_Integer else expr
    if expr.is_Integer:
        return int(expr)
    return _to_text(expr)


def _to_text(e: sympy.Expr) -> str:
    if isinstance(e, sympy.floor | sympy.ceiling):  # floor(S/4 + 3/4) is ((S+3)//4): one fraction
        num, den = sympy.fraction(sympy.together(e.args[0]))
        if den != 1:
            if isinstance(e, sympy.floor):
                return f"({_paren(num)}//{_paren(den)})"
            return f"CeilDiv({_to_text(num)},{_to_text(den)})"
    if isinstance(e, sympy.Add):
        terms = sorted(e.args, key=lambda t: (t.is_Number, str(t)))
        out = _to_text(terms[0])
        for t in terms[1:]:
            if t.could_extract_minus_sign():
                out += "-" + _to_text(-t)
            else:
                out += "+" + _to_text(t)
        return out
    if isinstance(e, sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        if coeff != 1:
            return f"{coeff}*{_to_text(rest)}"
        return "*".join(_paren(a) for a in e.args)
    if isinstance(e, sympy.Mod):
        return f"({_to_text(e.args[0])}%{_to_text(e.args[1])})"
    if isinstance(e, sympy.Max | sympy.Min):
        return f"{type(e).__name__}({','.join(_to_text(a) for a in e.args)})"
    if isinstance(e, sympy.ceiling):
        return f"ceiling({_to_text(e.args[0])})"
    return str(e).replace(" ", "")


def _paren(e: sympy.Expr) -> str:
    t = _to_text(e)
    return f"({t})" if isinstance(e, sympy.Add) else t
