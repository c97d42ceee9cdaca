"""IR parser and verifier fuzz: random mutations of valid IR text (a real tiny graph, as its
artifact stores it, and small hand-written graphs) raise nothing but ``Ds4cError`` subclasses, and
text that parses prints back to text that parses to the same print (hypothesis; bounded, no deadline).

Mutations are what an edited or damaged file holds: characters deleted, inserted (IR punctuation,
quotes, escapes, digits), tokens swapped for others of the text or for hostile ones (ops outside
the allow-list, names of torch attributes, huge and negative numbers, symbolic-dimension syntax),
lines dropped, duplicated or swapped.
"""

from __future__ import annotations

import re

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ds4c  # noqa: E402
from ds4c.errors import Ds4cError  # noqa: E402
from ds4c.ir import check_types, parse_graph, parse_program, print_graph, verify_graph  # noqa: E402

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW_FUZZ = settings(FUZZ, max_examples=2000)

HAND = [
    """\
graph @demo(input %x: f32[B,S,8], param %w: f32[8,8], const %c: f32[4], state %st: f32[B,3,8]) {
  %S = aten.sym_size.int(%x, 1) : int
  %lin = aten.linear.default(%x, %w) : f32[B,S,8] loc("model.layers.0.self_attn")
  %half = sym.floordiv(%S, 2) : int
  %sl = aten.slice.Tensor(%lin, 1, 0, %half) : f32[B,(S//2),8]
  %v, %i = aten.topk.default(%lin, 2, -1, true, true) : f32[B,S,2], i64[B,S,2]
  %m = aten.masked_fill.Scalar(%lin, %lin, -inf) : f32[B,S,8]
  %z = aten.full.default([2, 3], 0.5, dtype=dtype(bf16), device=device("cpu"), pin_memory=false) : bf16[2,3]
  %cat = aten.cat.default([%st, %lin], 1) : f32[B,3+S,8]
  return y=%sl, idx=%i, layers.0.st=%cat
}
""",
    """\
graph @static(input %x: f32[2,8], param %w: f32[8], input %ids: i64[2,3]) {
  %n = rms_norm(%x, %w, eps=1e-06) : f32[2,8]
  %c = aten._to_copy.default(%n, dtype=dtype(f16), layout=layout(strided), memory_format=memfmt(preserve_format)) : f16[2,8]
  %e = aten.embedding.default(%x, %ids) : f32[2,3,8]
  %r = aten.reshape.default(%e, [6, 8]) : f32[6,8]
  %a = aten.arange.start_step(0, 8, 2, dtype=dtype(i64), device=device("cuda:0")) : i64[4]
  %s = aten.sum.dim_IntList(%r, [0], false) : f32[8]
  return c=%c, s=%s, a=%a
}
""",
]
HOSTILE_TOKENS = [
    "aten.from_file.default", "aten.fill_.Scalar", "aten.add_.Tensor", "aten.add.out", "aten.rand_like.default",
    "prims.add.default", "os.system", "__import__", "torch", "load", "save", "eval", "getattr", "sym.add",
    "rms_norm", "moe", "dtype(", "device(", "layout(", "memfmt(", "dtype(f32)", 'device("xla")', "layout(load)",
    "memfmt(__class__)", "list<", "list<f32[2]>", "int", "float", "bool", "none", "nan", "-inf", "true",
    "9" * 400, "-1", "0", "1e999", "-0.0", "Max(", "ceiling(", "//", "%", "(", ")", "[", "]", "{", "}", ",", "=",
    ":", '"', "\\", '"\\u0000"', '"\\q"', "loc(", "return", "graph @", "}", "%x", "%", "@", "<", ">",
]
INSERTS = st.one_of(st.sampled_from(HOSTILE_TOKENS), st.text(alphabet='%()[]{},=:"\\@<>/-. \n\tabcdefxyzBS0123456789_',
                                                              max_size=6))
_TOKEN = re.compile(r'%[\w.:\-]+|"(?:[^"\\]|\\.)*"|[\w.\-]+|[^\s\w]')


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[str]:
    """The hand-written graphs and the decode graph of tiny as its artifact stores it (lowered:
    fused ops with their attributes, constants, state)."""
    art = ds4c.compile("tiny", target="cpu", precision="fp32", max_context=32, progress=False)
    return HAND + [art.ir_text("decode")]


def _mutate(data: st.DataObject, text: str) -> str:
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        how = data.draw(st.sampled_from(["delete", "insert", "replace", "lines"]), label="how")
        if how == "lines":
            lines = text.splitlines()
            if not lines:
                continue
            i = data.draw(st.integers(0, len(lines) - 1), label="line")
            j = data.draw(st.integers(0, len(lines) - 1), label="other line")
            what = data.draw(st.sampled_from(["drop", "duplicate", "swap"]), label="line op")
            if what == "drop":
                del lines[i]
            elif what == "duplicate":
                lines.insert(j, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
            continue
        pos = data.draw(st.integers(0, len(text)), label="position")
        if how == "delete":
            text = text[:pos] + text[pos + data.draw(st.integers(1, 8), label="length"):]
        elif how == "insert":
            text = text[:pos] + data.draw(INSERTS, label="inserted") + text[pos:]
        else:
            tokens = list(_TOKEN.finditer(text))
            if not tokens:
                continue
            m = tokens[data.draw(st.integers(0, len(tokens) - 1), label="token")]
            new = data.draw(st.one_of(st.sampled_from(HOSTILE_TOKENS),
                                      st.sampled_from([t.group() for t in tokens])), label="replacement")
            text = text[:m.start()] + new + text[m.end():]
    return text


def _check(text: str) -> None:
    """Parse and verify ``text``: a Ds4cError or a graph whose print round-trips; nothing else."""
    try:
        graphs = parse_program(text)
        for g in graphs:
            verify_graph(g)
    except Ds4cError:
        return
    for g in graphs:
        printed = print_graph(g)
        assert print_graph(parse_graph(printed)) == printed


@FUZZ
@given(data=st.data())
def test_mutated_ir_parses_or_raises_ds4c_errors(seeds, data):
    seed = data.draw(st.sampled_from(seeds), label="seed")
    _check(_mutate(data, seed))


@FUZZ
@given(data=st.data())
def test_mutated_hand_ir_type_checks_or_raises_ds4c_errors(data):
    """Also through check_types, which runs every op's reference on meta tensors."""
    text = _mutate(data, data.draw(st.sampled_from(HAND), label="seed"))
    try:
        g = parse_graph(text)
        verify_graph(g)
        check_types(g, {"B": 2, "S": 5})
    except Ds4cError:
        pass


@pytest.mark.slow
@SLOW_FUZZ
@given(data=st.data())
def test_mutated_ir_parses_or_raises_ds4c_errors_long(seeds, data):
    seed = data.draw(st.sampled_from(seeds), label="seed")
    _check(_mutate(data, seed))


def test_seeds_are_valid(seeds):
    """The fuzz starts from IR that parses, verifies and round-trips."""
    for text in seeds:
        g = parse_graph(text)
        verify_graph(g)
        assert print_graph(g) == text
