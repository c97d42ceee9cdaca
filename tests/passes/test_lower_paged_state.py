"""lower_paged_state: serving pools written in place (state.write), only where that is safe."""

from __future__ import annotations

import pytest
import torch

from ds4c.errors import VerificationError
from ds4c.ir.interpreter import run_graph
from ds4c.ir.parser import parse_graph
from ds4c.ir.printer import print_graph
from ds4c.ir.verifier import verify_graph
from ds4c.passes.lower_paged_state import lower_paged_state
from ds4c.passes.manager import PassContext

# a ring read before it is written (the compressor's pattern), and a window written then read
BEFORE = """\
graph @ragged_step(state %ring: f32[4,2,3], state %win: f32[5,3], input %src: i64[2], input %rows: i64[2], \
input %vals: f32[2,3]) {
  %flat = aten.reshape.default(%ring, [-1, 3]) : f32[8,3]
  %old = aten.index_select.default(%flat, 0, %src) : f32[2,3]
  %new = aten.index_put.default(%flat, [%rows], %vals) : f32[8,3]
  %out = aten.view.default(%new, [4, 2, 3]) : f32[4,2,3]
  %w2 = aten.index_put.default(%win, [%rows], %old) : f32[5,3]
  %seen = aten.index_select.default(%w2, 0, %src) : f32[2,3]
  return logits=%seen, ring=%out, win=%w2
}
"""

AFTER = """\
graph @ragged_step(state %ring: f32[4,2,3], state %win: f32[5,3], input %src: i64[2], input %rows: i64[2], \
input %vals: f32[2,3]) {
  %flat = aten.reshape.default(%ring, [-1, 3]) : f32[8,3]
  %old = aten.index_select.default(%flat, 0, %src) : f32[2,3]
  %new = state.write(%flat, %rows, %vals, [%old]) : f32[8,3]
  %out = aten.view.default(%new, [4, 2, 3]) : f32[4,2,3]
  %w2 = state.write(%win, %rows, %old, []) : f32[5,3]
  %seen = aten.index_select.default(%w2, 0, %src) : f32[2,3]
  return logits=%seen, ring=%out, win=%w2
}
"""

# near miss: the old ring is read after the write (and one write is returned under another name)
NEAR_MISS = """\
graph @ragged_step(state %ring: f32[4,2,3], state %win: f32[5,3], input %src: i64[2], input %rows: i64[2], \
input %vals: f32[2,3]) {
  %flat = aten.reshape.default(%ring, [-1, 3]) : f32[8,3]
  %new = aten.index_put.default(%flat, [%rows], %vals) : f32[8,3]
  %late = aten.index_select.default(%flat, 0, %src) : f32[2,3]
  %out = aten.view.default(%new, [4, 2, 3]) : f32[4,2,3]
  %w2 = aten.index_put.default(%win, [%rows], %late) : f32[5,3]
  return logits=%late, ring=%out, win=%w2, also=%w2
}
"""


def _inputs():
    g = torch.Generator().manual_seed(0)
    state = {"ring": torch.randn(4, 2, 3, generator=g), "win": torch.randn(5, 3, generator=g)}  # win rows 0..4
    inputs = {"src": torch.tensor([1, 3]), "rows": torch.tensor([4, 2]), "vals": torch.randn(2, 3, generator=g)}
    return inputs, state


def _run(graph):
    inputs, state = _inputs()
    return run_graph(graph, inputs, {}, state)


def test_golden_and_same_results():
    before = parse_graph(BEFORE)
    after = lower_paged_state(before, PassContext())
    assert print_graph(after) == print_graph(parse_graph(AFTER))
    verify_graph(after)
    want, got = _run(before), _run(after)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_writes_in_place():
    after = lower_paged_state(parse_graph(BEFORE), PassContext())
    inputs, state = _inputs()
    ring = state["ring"]
    out = run_graph(after, inputs, {}, state)
    assert out["ring"].data_ptr() == ring.data_ptr()  # the pool itself, written, not a copy
    torch.testing.assert_close(ring.view(8, 3)[[4, 2]], inputs["vals"])


def test_near_miss_stays_functional():
    g = parse_graph(NEAR_MISS)
    after = lower_paged_state(g, PassContext())
    assert print_graph(after) == print_graph(g)  # a read after the write; a write returned twice


def test_verifier_refuses_a_read_after_an_in_place_write():
    bad = AFTER.replace("%seen = aten.index_select.default(%w2, 0, %src)",
                        "%seen = aten.index_select.default(%win, 0, %src)")
    with pytest.raises(VerificationError, match="reads it after"):
        verify_graph(parse_graph(bad))
    unlisted = AFTER.replace("state.write(%flat, %rows, %vals, [%old])", "state.write(%flat, %rows, %vals, [])")
    with pytest.raises(VerificationError, match="not among its operands"):
        verify_graph(parse_graph(unlisted))
