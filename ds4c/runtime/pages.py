"""Paged per-request state: pools of fixed-size pages and each request's page tables (#26).

A serving engine keeps the state of every running request in pools allocated once: ``window``
pages (``window_page`` tokens of sliding-window rows), ``compressed`` pages (``comp_page`` tokens'
worth of CSA/HCA entries and indexer keys) and ``slots`` (one per running request: the
compressor rings). One page id names the same page in every layer's pool of that kind, so a
request holds three small tables (docs/design/serving_engine.md, section 2):

- a window row: a ring of ``window_slots`` entries; the logical window page ``lp`` (positions
  ``lp*window_page ..``) sits at ring index ``lp % window_slots``;
- a compressed row: ``comp_entries`` entries, logical page ``j`` (positions ``j*comp_page ..``)
  at index ``j``;
- a slot.

Id 0 of every pool is trash: never handed out, the value of every unused table entry (padding
rows write there; nothing reads it unmasked). Allocation is all or nothing: a request grows to a
new end only if every page it needs is free (``grow`` returns False and takes nothing
otherwise), so the scheduler can preempt and retry. Window pages whose positions no query can
see any more (all before ``end - (window - 1)``) go back to the pool as the request grows.

This module holds the bookkeeping only (host integers); the pools' tensors, their sizes
(``plan_memory``) and the kernels that read through the tables are elsewhere.
"""

from __future__ import annotations

import math

import numpy as np

from ds4c.models.deepseek_v4.paged import PageLayout

__all__ = ["PagePool", "Pools", "RequestPages"]


class PagePool:
    """Ids ``1 .. pages - 1`` of one pool, handed out and taken back; id 0 is trash. Freed ids are
    reused first (last in, first out). A page may have several holders (requests and the prefix
    cache share pages that no longer change): ``share`` adds one, ``free`` drops one, and the page
    goes back to the pool when its last holder frees it. Freeing an id that is not out raises: a
    double free is a bookkeeping bug, not something to absorb."""

    def __init__(self, name: str, pages: int):
        if pages < 2:
            raise ValueError(f"pool '{name}' needs at least 2 pages (page 0 is trash), got {pages}")
        self.name = name
        self.pages = pages
        self._free = list(range(pages - 1, 0, -1))  # pop() hands out 1, 2, ... first
        self._out: dict[int, int] = {}  # id -> holders

    @property
    def capacity(self) -> int:
        """Pages that can be handed out (all but the trash page)."""
        return self.pages - 1

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used_count(self) -> int:
        return len(self._out)

    def alloc(self, n: int = 1) -> list[int] | None:
        """``n`` free ids, or None (and nothing taken) when fewer are free."""
        if n < 0:
            raise ValueError(f"pool '{self.name}': cannot allocate {n} pages")
        if n > len(self._free):
            return None
        ids = [self._free.pop() for _ in range(n)]
        self._out.update(dict.fromkeys(ids, 1))
        return ids

    def share(self, ids: list[int] | tuple[int, ...]) -> None:
        """One more holder for each of ``ids`` (allocated pages)."""
        bad = [i for i in ids if i not in self._out]
        if bad:
            raise ValueError(f"pool '{self.name}': sharing pages that are not allocated: {sorted(bad)}")
        for i in ids:
            self._out[i] += 1

    def free(self, ids: list[int] | tuple[int, ...]) -> None:
        """One holder fewer for each of ``ids``; a page without holders is free again."""
        bad = [i for i in ids if i not in self._out]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"pool '{self.name}': freeing pages that are not allocated (or twice): "
                             f"{sorted(bad) or sorted(ids)}")
        for i in ids:
            self._out[i] -= 1
            if not self._out[i]:
                del self._out[i]
                self._free.append(i)

    def __repr__(self) -> str:
        return f"PagePool({self.name!r}, used {self.used_count} of {self.capacity})"


class Pools:
    """The three pools of an engine: ``window``, ``compressed`` and ``slots``."""

    def __init__(self, window_pages: int, comp_pages: int, slots: int):
        self.window = PagePool("window", window_pages)
        self.compressed = PagePool("compressed", comp_pages)
        self.slots = PagePool("slots", slots)

    def stats(self) -> dict[str, dict[str, int]]:
        """Pages used and free per pool (``Engine.stats``)."""
        return {p.name: {"used": p.used_count, "free": p.free_count, "capacity": p.capacity}
                for p in (self.window, self.compressed, self.slots)}


class RequestPages:
    """One request's tables into ``pools``: the pages for positions ``0 .. end - 1``.

    ``window_row`` (``layout.window_slots`` ids), ``comp_row`` (``layout.comp_entries`` ids, int32
    arrays: a step stacks them as they are) and ``slot`` are what the step's metadata copies; 0
    means no page. Growing by a few positions costs the positions' pages only, not the row: at a
    1M-token context a request's compressed row has 4096 entries."""

    def __init__(self, layout: PageLayout, pools: Pools, history: int = 0):
        self.layout = layout
        self.pools = pools
        self.history = history  # window positions kept beyond the window (the prefix cache's need)
        self.end = 0
        self.slot = 0
        self.window_row = np.zeros(layout.window_slots, dtype=np.int32)
        self.comp_row = np.zeros(layout.comp_entries, dtype=np.int32)
        self._window_pages: dict[int, int] = {}  # logical window page -> page id (live ones)
        self._live_from = 0  # the first logical window page not released yet (grow)

    def _first_live_window_page(self, end: int) -> int:
        """The first logical window page a query at a position >= ``end`` can still read (and
        ``history`` positions before that)."""
        return max(0, end - (self.layout.window - 1) - self.history) // self.layout.window_page

    def seed(self, end: int, comp: dict[int, int], window: dict[int, int]) -> None:
        """Start from a cached prefix: positions ``0 .. end - 1`` are in the pools already.
        ``comp``: compressed row index -> page id, ``window``: logical window page -> page id; the
        caller has taken this request's hold on every one of them (``PagePool.share`` or ``alloc``)."""
        if self.end or self.slot or self._window_pages or self.comp_row.any():
            raise AssertionError("RequestPages.seed: the request already holds pages")
        for j, page in comp.items():
            self.comp_row[j] = page
        for lp, page in window.items():
            self._window_pages[lp] = page
            self.window_row[lp % self.layout.window_slots] = page
        self.end = end

    def _comp_missing(self, end: int) -> list[int]:
        """The compressed row's entries positions ``.. end - 1`` need that hold no page; those of
        positions before ``self.end`` all hold one (``grow`` and ``seed`` fill them, ``release``
        empties the whole row), so only the entries from there on are looked at."""
        start = self.end // self.layout.comp_page
        return (np.flatnonzero(self.comp_row[start:math.ceil(end / self.layout.comp_page)] == 0) + start).tolist()

    def pages_needed(self, end: int) -> tuple[int, int, int]:
        """(window, compressed, slot) pages ``grow(end)`` would take (none are taken here)."""
        lay = self.layout
        if end <= self.end:
            return 0, 0, 0
        window = sum(1 for lp in range(self.end // lay.window_page, (end - 1) // lay.window_page + 1)
                     if lp not in self._window_pages)
        return window, len(self._comp_missing(end)), int(self.slot == 0)

    def grow(self, end: int) -> bool:
        """Take the pages for positions ``self.end .. end - 1`` (all or none); False when a pool
        has too few free pages. Window pages no query from ``self.end`` on can see are freed first."""
        lay = self.layout
        if end > lay.max_context:
            raise ValueError(f"request grows to {end} positions, beyond max_context {lay.max_context}")
        if end - self.end > lay.max_chunk:
            raise ValueError(f"request grows by {end - self.end} positions in one step, beyond max_chunk {lay.max_chunk}")
        if end <= self.end:  # nothing to take (pages kept beyond a rewind stay)
            return True
        live_from = self._first_live_window_page(self.end)
        if live_from > self._live_from:  # window pages no query from self.end on sees (every window_page steps)
            self.release_window_before(live_from * lay.window_page)
            self._live_from = live_from
        if self.end and self.slot and (self.end - 1) // lay.window_page == (end - 1) // lay.window_page \
                and (self.end - 1) // lay.comp_page == (end - 1) // lay.comp_page:
            self.end = end  # within pages it holds (a decode step, mostly): nothing to take
            return True
        n_window, n_comp, n_slot = self.pages_needed(end)
        if (n_window > self.pools.window.free_count or n_comp > self.pools.compressed.free_count
                or n_slot > self.pools.slots.free_count):
            return False
        if n_slot:
            self.slot = self.pools.slots.alloc(1)[0]
        comp_ids = self.pools.compressed.alloc(n_comp)
        for j, page in zip(self._comp_missing(end), comp_ids, strict=True):
            self.comp_row[j] = page
        window_ids = iter(self.pools.window.alloc(n_window))
        for lp in range(self.end // lay.window_page, (end - 1) // lay.window_page + 1):
            if lp in self._window_pages:
                continue
            ring = lp % lay.window_slots
            if self.window_row[ring]:  # the ring holds more pages than the window and a chunk need
                raise AssertionError(f"window ring slot {ring} still holds a live page (logical page {lp})")
            page = next(window_ids)
            self._window_pages[lp] = page
            self.window_row[ring] = page
        self.end = end
        return True

    def rewind(self, end: int) -> None:
        """Positions ``end ..`` are no longer the request's (a verify step's rejected drafts): the
        next ``grow`` counts from ``end``. The pages stay held (what was written there is rewritten
        before it is read: every address is a function of the position, paged.py)."""
        if not 0 <= end <= self.end:
            raise ValueError(f"RequestPages.rewind({end}): the request holds positions 0..{self.end - 1}")
        self.end = end

    def release_window_before(self, position: int) -> None:
        """Free the window pages whose positions all lie before ``position``."""
        dead = [lp for lp in self._window_pages if (lp + 1) * self.layout.window_page <= position]
        if dead:
            self.pools.window.free([self._window_pages[lp] for lp in dead])
            for lp in dead:
                del self._window_pages[lp]
                self.window_row[lp % self.layout.window_slots] = 0

    def release(self) -> None:
        """Free every page and the slot (the request finished, was cancelled or is preempted); pages
        another holder shares stay allocated to it."""
        self.release_window_before((max(self._window_pages, default=0) + 1) * self.layout.window_page)
        used = self.comp_row[self.comp_row != 0].tolist()
        if used:
            self.pools.compressed.free(used)
        if self.slot:
            self.pools.slots.free([self.slot])
        self.comp_row[:] = 0
        self.slot = 0
        self.end = 0
        self._live_from = 0

    def window_pages(self) -> dict[int, int]:
        """Live window pages: logical page -> page id."""
        return dict(self._window_pages)
