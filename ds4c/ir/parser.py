"""Parse IR text (as written by ds4c.ir.printer) back into graphs.

Constants' data is not part of the text; ``parse_graph(text, constants=...)`` reattaches it.

IR text comes from artifacts and caches that may have been edited, so parsing is strict and
resolves no names: an op must be one ``ds4c.ir.registry.get_op`` admits (ds4c's ops, ``sym.*``,
the ATen allow-list of ``ds4c.ir.allowed_aten``), and a literal is a number, string, bool, none,
list, or a ``dtype(...)``, ``device(...)``, ``layout(...)`` or ``memfmt(...)`` looked up in the
fixed tables below; nothing is evaluated, imported or fetched with ``getattr``. Every malformed
input is an ``IRError`` naming the line.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from ds4c.errors import IRError
from ds4c.ir.graph import INPUT_KINDS, Graph, GraphInput, Op, Value
from ds4c.ir.registry import get_op
from ds4c.ir.types import IRType, ListType, TensorType, parse_dtype, parse_type

# What device(), layout() and memfmt() may name: only what traced graphs hold. Devices are
# retargeted by the runtime anyway; ``cuda:N`` is accepted for graphs traced on a GPU.
DEVICE_TYPES = ("cpu", "cuda", "meta")
LAYOUTS: dict[str, torch.layout] = {"strided": torch.strided}
MEMORY_FORMATS: dict[str, torch.memory_format] = {"contiguous_format": torch.contiguous_format,
                                                  "preserve_format": torch.preserve_format}
_NAME = re.compile(r"[A-Za-z0-9_.:\-]+")
MAX_NESTING = 32  # lists in a literal: IR holds shapes and index lists, never deep structures

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<value>%[A-Za-z0-9_.:\-]+)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+)(?![A-Za-z_]))
  | (?P<ident>-?[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[()\[\],=])
    """,
    re.VERBOSE,
)


class _Cursor:
    def __init__(self, text: str, where: str):
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise IRError(f"{where}: unexpected character {text[pos]!r} at column {pos + 1}")
            if m.lastgroup != "ws":
                self.tokens.append((m.lastgroup or "", m.group()))
            pos = m.end()
        self.i = 0
        self.where = where

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def next(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise IRError(f"{self.where}: unexpected end of line")
        self.i += 1
        return tok

    def expect(self, text: str) -> None:
        kind, tok = self.next()
        if tok != text:
            raise IRError(f"{self.where}: expected '{text}', found '{tok}'")

    def at(self, text: str) -> bool:
        tok = self.peek()
        return tok is not None and tok[1] == text


def _parse_literal(cur: _Cursor, values: dict[str, Value], depth: int = 0) -> Any:
    kind, tok = cur.next()
    if kind == "value":
        name = tok[1:]
        if name not in values:
            raise IRError(f"{cur.where}: use of undefined value %{name}")
        return values[name]
    if kind == "string":
        return _string(tok, cur.where)
    if kind == "number":
        try:
            return float(tok) if any(c in tok for c in ".eE") else int(tok)
        except ValueError:  # more digits than Python converts
            raise IRError(f"{cur.where}: number '{tok[:40]}...' is too long") from None
    if tok == "[":
        if depth >= MAX_NESTING:
            raise IRError(f"{cur.where}: lists nested deeper than {MAX_NESTING} levels")
        items = []
        while not cur.at("]"):
            items.append(_parse_literal(cur, values, depth + 1))
            if not cur.at("]"):
                cur.expect(",")
        cur.expect("]")
        return items
    if kind == "ident":
        simple = {"none": None, "true": True, "false": False, "inf": float("inf"), "-inf": float("-inf"),
                  "nan": float("nan")}
        if tok in simple:
            return simple[tok]
        if tok in ("dtype", "device", "layout", "memfmt"):
            cur.expect("(")
            arg_kind, arg = cur.next()
            cur.expect(")")
            if tok == "dtype":
                return parse_dtype(arg)
            if tok == "device":
                return _device(arg if arg_kind != "string" else _string(arg, cur.where), arg_kind, cur.where)
            table: dict[str, Any] = LAYOUTS if tok == "layout" else MEMORY_FORMATS
            if arg not in table:
                raise IRError(f"{cur.where}: {tok}({arg[:40]}) is not one that ds4c's IR admits; known: {', '.join(table)}")
            return table[arg]
    raise IRError(f"{cur.where}: cannot parse literal starting at '{tok[:40]}'")


def _string(tok: str, where: str) -> str:
    try:
        return json.loads(tok)
    except ValueError:
        raise IRError(f"{where}: string literal {tok[:40]} has an invalid escape; write strings as JSON does") from None


def _device(arg: str, kind: str, where: str) -> torch.device:
    """A device literal: a quoted ``cpu``, ``cuda``, ``cuda:N`` or ``meta``, nothing else."""
    bad = IRError(f"{where}: device({arg[:40]}) is not one that ds4c's IR admits; write device(\"cpu\"), "
                  f"device(\"cuda\") or device(\"cuda:N\") (types: {', '.join(DEVICE_TYPES)})")
    if kind != "string" or not re.fullmatch(r"[a-z]+(:\d{1,4})?", arg):
        raise bad
    try:
        device = torch.device(arg)
    except RuntimeError:
        raise bad from None
    if device.type not in DEVICE_TYPES:
        raise bad
    return device


_SIG = re.compile(r"^graph @(?P<name>[A-Za-z0-9_.]+)\((?P<ins>.*)\) \{$")
_OP = re.compile(r"^(?:(?P<lhs>%[^=]+?) = )?(?P<name>[A-Za-z_][A-Za-z0-9_.]*)\((?P<rest>.*)$")


def _split_types(text: str) -> list[str]:
    from ds4c.ir.types import _split_top

    return [t.strip() for t in _split_top(text)]


def _find_call_end(rest: str, where: str) -> int:
    """Index just past the ')' closing the call whose '(' was consumed already."""
    depth, in_str, esc = 1, False, False
    for i, ch in enumerate(rest):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth == 0:
                return i
    raise IRError(f"{where}: unbalanced parentheses")


def parse_graph(text: str, constants: dict[str, torch.Tensor] | None = None) -> Graph:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not ln.strip().startswith("//")]
    if not lines:
        raise IRError("empty IR text")
    m = _SIG.match(lines[0])
    if not m:
        raise IRError(f"line 1: expected 'graph @name(...) {{', found '{lines[0][:80]}'")
    values: dict[str, Value] = {}
    inputs: list[GraphInput] = []
    ins_text = m.group("ins").strip()
    if ins_text:
        from ds4c.ir.types import _split_top

        for part in _split_top(ins_text):
            part = part.strip()
            km = re.match(r"^(\w+) %([A-Za-z0-9_.:\-]+): (.+)$", part)
            if not km or km.group(1) not in INPUT_KINDS:
                raise IRError(f"line 1: bad graph input '{part}'; expected '<kind> %name: type' with kind in "
                              f"{INPUT_KINDS}")
            v = Value(km.group(2), parse_type(km.group(3)))
            if v.name in values:
                raise IRError(f"line 1: input %{v.name} defined twice")
            values[v.name] = v
            inputs.append(GraphInput(km.group(1), v))
    ops: list[Op] = []
    outputs: list[tuple[str, Value]] = []
    saw_return = False
    for lineno, line in enumerate(lines[1:], start=2):
        where = f"line {lineno}"
        if line == "}":
            if not saw_return:
                raise IRError(f"{where}: graph @{m.group('name')} has no return")
            if lineno < len(lines):
                raise IRError(f"line {lineno + 1}: text after the end of graph @{m.group('name')}: "
                              f"'{lines[lineno][:80]}'; parse several graphs with parse_program")
            break
        if saw_return:
            raise IRError(f"{where}: op after the return of graph @{m.group('name')}")
        if line.startswith("return"):
            saw_return = True
            rest = line[len("return"):].strip()
            if rest:
                from ds4c.ir.types import _split_top

                for part in _split_top(rest):
                    name, _, ref = part.strip().partition("=%")
                    if ref not in values:
                        raise IRError(f"{where}: return of undefined value %{ref}")
                    outputs.append((name, values[ref]))
            continue
        om = _OP.match(line)
        if not om:
            raise IRError(f"{where}: cannot parse op line '{line[:80]}'")
        try:
            get_op(om.group("name"))  # the allow-list: nothing else is parsed, loaded or run
        except IRError as e:
            raise IRError(f"{where}: {e}") from None
        rest = om.group("rest")
        end = _find_call_end(rest, where)
        call_text, tail = rest[:end], rest[end + 1:].strip()
        cur = _Cursor(call_text, where)
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        while cur.peek() is not None:
            tok = cur.peek()
            assert tok is not None
            if tok[0] == "ident" and cur.i + 1 < len(cur.tokens) and cur.tokens[cur.i + 1][1] == "=":
                cur.next()
                cur.next()
                if tok[1] in kwargs:
                    raise IRError(f"{where}: keyword argument '{tok[1]}' given twice")
                kwargs[tok[1]] = _parse_literal(cur, values)
            else:
                if kwargs:
                    raise IRError(f"{where}: positional argument after keyword argument")
                args.append(_parse_literal(cur, values))
            if cur.peek() is not None:
                cur.expect(",")
        loc = None
        lm = re.search(r'\s*loc\(("(?:[^"\\]|\\.)*")\)$', tail)
        if lm:
            loc = _string(lm.group(1), where)
            tail = tail[: lm.start()].strip()
        results: list[Value] = []
        if om.group("lhs"):
            names = [n.strip().removeprefix("%") for n in om.group("lhs").split(",")]
            for n in names:
                if not _NAME.fullmatch(n):
                    raise IRError(f"{where}: result name '%{n[:40]}' is not a value name (letters, digits, '_.:-')")
            if not tail.startswith(":"):
                raise IRError(f"{where}: op {om.group('name')} has results but no ': type'")
            types: list[IRType] = [parse_type(t) for t in _split_types(tail[1:])]
            if len(types) != len(names):
                raise IRError(f"{where}: {len(names)} results but {len(types)} types")
            for n, t in zip(names, types, strict=True):
                if n in values:
                    raise IRError(f"{where}: value %{n} defined twice (SSA)")
                v = Value(n, t)
                values[n] = v
                results.append(v)
        elif tail:
            raise IRError(f"{where}: unexpected trailing text '{tail}'")
        ops.append(Op(om.group("name"), tuple(args), kwargs, tuple(results), loc))
    else:
        raise IRError(f"graph @{m.group('name')}: missing closing '}}'")
    graph = Graph(m.group("name"), inputs, ops, outputs, dict(constants or {}))
    return graph


def parse_program(text: str) -> list[Graph]:
    """Parse several graphs written one after another."""
    chunks, cur = [], []
    for ln in text.splitlines():
        cur.append(ln)
        if ln.strip() == "}":
            chunks.append("\n".join(cur))
            cur = []
    if any(ln.strip() and not ln.strip().startswith("//") for ln in cur):
        raise IRError("IR text ends inside a graph: missing closing '}'")
    return [parse_graph(c) for c in chunks if c.strip()]


__all__ = ["parse_graph", "parse_program", "ListType", "TensorType"]
