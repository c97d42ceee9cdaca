"""Symbolic dimensions print in the grammar they are read back in (ds4c/ir/shapes.py)."""

from __future__ import annotations

import pytest

from ds4c.ir.shapes import dim_expr, eval_dim, floordiv_dim, format_dim


@pytest.mark.parametrize("text", ["S", "(S//4)", "(S+3)//4", "((S//4)+1)//2", "B*S", "(S%4)", "Max(S,4)", "S-1",
                                  "CeilDiv(S,4)", "CeilDiv(S+7,8)*2", "ceiling(S)", "(2*S+1)//3"])
def test_a_dimension_prints_as_text_that_reads_back_to_the_same_value(text):
    printed = format_dim(dim_expr(text))
    for s in range(1, 40):
        assert eval_dim(printed, {"S": s, "B": 3}) == eval_dim(text, {"S": s, "B": 3}), (text, printed, s)


def test_floordiv_of_a_sum_keeps_its_parentheses():
    """Near miss of the old printer: floor((S+3)/4) printed as '(S+3//4)', which reads as S + 0."""
    assert floordiv_dim("S+3", 4) == "((S+3)//4)"
    assert eval_dim(floordiv_dim("S+3", 4), {"S": 9}) == 3
    assert all(eval_dim(floordiv_dim("(S//4)", 2), {"S": s}) == s // 8 for s in range(1, 40))
    assert floordiv_dim(32, 2) == 16
