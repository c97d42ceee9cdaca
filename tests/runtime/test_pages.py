"""Paged request state bookkeeping (ds4c/runtime/pages.py): pools hand out each page once, page 0
never; growth is all or nothing; window pages go back once no query can see them; releasing every
request leaves the pools as they started."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds4c.models.deepseek_v4.paged import PageLayout
from ds4c.runtime.pages import PagePool, Pools, RequestPages

TINY = PageLayout(window=8, window_page=4, comp_page=16, max_context=96, max_chunk=7)


def check_invariants(pools: Pools, requests: list[RequestPages]) -> None:
    lay = TINY
    for pool, held in ((pools.window, [p for r in requests for p in r.window_row if p]),
                       (pools.compressed, [p for r in requests for p in r.comp_row if p]),
                       (pools.slots, [r.slot for r in requests if r.slot])):
        assert len(held) == len(set(held)), f"{pool.name}: a page held twice"
        assert 0 not in held
        assert pool.used_count == len(held) and pool.free_count + pool.used_count == pool.capacity
    for r in requests:
        # the compressed row covers exactly the pages of positions 0 .. end-1
        assert [bool(p) for p in r.comp_row] == [j < math.ceil(r.end / lay.comp_page) for j in range(lay.comp_entries)]
        live = r.window_pages()
        if r.end:
            first = max(0, r.end - (lay.window - 1)) // lay.window_page
            # every page a query at end-1 .. can read is there, at its ring index
            for lp in range(first, (r.end - 1) // lay.window_page + 1):
                assert r.window_row[lp % lay.window_slots] == live[lp]
            assert r.slot
        assert sum(1 for p in r.window_row if p) == len(live)


def test_pool_hands_out_each_page_once_and_never_the_trash_page():
    pool = PagePool("window", 4)
    assert pool.alloc(4) is None and pool.free_count == 3  # all or nothing
    ids = pool.alloc(3)
    assert sorted(ids) == [1, 2, 3] and pool.alloc(1) is None
    pool.free([ids[0]])
    assert pool.alloc(1) == [ids[0]]
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([0])
    pool.free(ids)
    with pytest.raises(ValueError, match="not allocated"):  # near miss: the same pages again
        pool.free(ids)


def test_window_pages_are_freed_once_out_of_every_querys_window():
    pools = Pools(window_pages=64, comp_pages=16, slots=4)
    r = RequestPages(TINY, pools)
    assert r.grow(7)
    assert sorted(r.window_pages()) == [0, 1] and pools.slots.used_count == 1
    assert r.grow(14)  # queries from 7 on see 0 .. : page 0 (positions 0..3) stays
    assert sorted(r.window_pages()) == [0, 1, 2, 3]
    assert r.grow(21)  # queries from 14 see 7 ..: pages 0 (0..3) dead, 1 (4..7) live
    assert sorted(r.window_pages()) == [1, 2, 3, 4, 5]
    check_invariants(pools, [r])
    r.release()
    assert pools.stats() == Pools(64, 16, 4).stats()


def test_growth_is_all_or_nothing():
    pools = Pools(window_pages=64, comp_pages=3, slots=4)  # two compressed pages: 32 positions
    a, b = RequestPages(TINY, pools), RequestPages(TINY, pools)
    assert a.grow(7) and a.grow(14) and a.grow(17)  # a holds both compressed pages
    before = (b.end, list(b.window_row), list(b.comp_row), b.slot, pools.stats())
    assert not b.grow(5)
    assert (b.end, list(b.window_row), list(b.comp_row), b.slot, pools.stats()) == before
    a.release()
    assert b.grow(5)
    check_invariants(pools, [a, b])


def test_growth_beyond_the_layout_is_refused():
    r = RequestPages(TINY, Pools(64, 16, 4))
    with pytest.raises(ValueError, match="max_chunk"):
        r.grow(8)
    for end in range(7, 96, 7):
        assert r.grow(end)
    with pytest.raises(ValueError, match="max_context"):
        r.grow(97)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 9)), min_size=1, max_size=120))
def test_random_growth_and_release_keep_the_invariants(ops):
    pools = Pools(window_pages=12, comp_pages=8, slots=4)
    requests = [RequestPages(TINY, pools) for _ in range(6)]
    for who, n in ops:
        r = requests[who]
        if n == 0:
            r.release()
        else:
            end = min(r.end + min(n, TINY.max_chunk), TINY.max_context)
            need = r.pages_needed(end)
            free = (pools.window.free_count, pools.compressed.free_count, pools.slots.free_count)
            grew = r.grow(end)
            # pages_needed tells the truth (window pages freed on the way only add to what is free)
            if all(k <= f for k, f in zip(need, free, strict=True)):
                assert grew
        check_invariants(pools, requests)
    for r in requests:
        r.release()
    assert pools.stats() == Pools(12, 8, 4).stats()


def test_ten_thousand_requests_leave_the_pools_as_they_started():
    rng = random.Random(0)
    pools = Pools(window_pages=40, comp_pages=24, slots=9)
    start = pools.stats()
    running: list[RequestPages] = []
    finished = 0
    while finished < 10_000:
        if len(running) < 8:
            running.append(RequestPages(TINY, pools))
        r = rng.choice(running)
        target = rng.randint(1, TINY.max_context)
        if r.end >= target or not r.grow(min(target, r.end + rng.randint(1, TINY.max_chunk))):
            r.release()  # finished, or preempted for want of pages
            running.remove(r)
            finished += 1
    for r in running:
        r.release()
    assert pools.stats() == start


def test_token_buckets_pad_a_step_by_at_most_half():
    from ds4c.runtime.engine import token_buckets

    assert token_buckets(53) == [53]
    assert token_buckets(2048 + 65) == [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 2113]
    buckets = token_buckets(4096 + 65)
    for rows in range(33, 4096 + 65):
        fit = next(b for b in buckets if b >= rows)
        assert fit <= max(64, 1.5 * rows), rows
    # rows every step has (one per padding sequence) come on top: only the rest is padded
    assert token_buckets(2048 + 65, base=64)[:8] == [128, 160, 192, 256, 320, 448, 576, 832]
    buckets = token_buckets(2048 + 65, base=64)
    for rows in range(65, 2048 + 65):
        fit = next(b for b in buckets if b >= rows)
        assert fit - 64 <= max(64, 1.5 * (rows - 64)), rows
