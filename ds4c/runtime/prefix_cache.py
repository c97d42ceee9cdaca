"""Prefix caching over DeepSeek-V4's hybrid state (#27): a radix tree of token blocks whose nodes
hold pages of the engine's pools.

What a request's state after positions ``0 .. R-1`` is made of, and how each part is shared
(``ds4c.models.deepseek_v4.paged`` has the layout):

- compressed pages (CSA/HCA entries, indexer keys): an entry depends only on the tokens before
  the position that closes its window and is written once. A page whose positions all lie
  before ``R`` is shared as it is; the page that holds ``R`` is copied (the request writes its
  later entries into it).
- window pages: a position's window row is written once too. Pages that lie wholly before the
  positions the request recomputes are shared; the ones it writes into are copied.
- compressor rings (one slot per request): rows of the last positions, overwritten as a request
  grows, so never shared. They are rebuilt by recomputing a few positions before ``R``: CSA's
  compressor overlaps the previous window (``m`` rows before a window boundary), HCA's needs the
  rows since its last boundary. ``start(R)`` is the first recomputed position; those positions
  write their window and ring rows but close no compressed window (``Chunk.emit_from``), their
  entries being in the shared pages already. So a hit at ``R`` computes ``len(prompt) - start(R)``
  tokens, with ``R - start(R) <= max(m_csa, m_hca - G)``.

Nodes sit every ``G`` tokens (``granule``: a multiple of the window page and of CSA's rate, so
``start(R)`` never splits a window page that must stay shared). A node at ``R`` holds one hold
(``PagePool.share``) on the compressed page holding position ``R - 1`` and, while it is useful, on
the window pages a resume at ``R`` reads (from ``start(R) - (W - 1)``). The engine inserts nodes
after every step for the boundaries its requests crossed (their pages are live then: requests keep
``history`` window positions more than the window for this), and matches a new request's tokens
against the tree when it is admitted.

Eviction runs only under page pressure (the engine asks before it preempts): first the window
pages of nodes on plain paths (one child: a resume there needs a prompt that leaves the path at
exactly that node; a session's next turn resumes at its path's end, new sessions at the branch
point of their shared system prompt), then least-recently-used window pages of any node and whole
leaves. Pages held by running requests stay allocated
until they finish; the cache drops its hold only. The candidates wait in a heap keyed by that order,
pushed again whenever a node's key changes (used, window, children) and checked when popped, so an
eviction costs O(log nodes), not a walk of the tree: at saturation the engine evicts every step
(flash-slice's 256-request trace: ~30,000 evictions over ~8,000 nodes).
"""

from __future__ import annotations

import heapq
import itertools
import math
import weakref
from dataclasses import dataclass, field

from ds4c.models.deepseek_v4.paged import PageLayout
from ds4c.runtime.pages import Pools, RequestPages

__all__ = ["Hit", "PrefixCache"]

CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"


@dataclass(eq=False)
class _Node:
    depth: int  # blocks from the root: the node stands at position depth * granule
    parent: _Node | None
    block: tuple[int, ...] = ()
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)
    comp: tuple[int, int] | None = None  # (compressed row index, page id) of position R - 1
    window: dict[int, int] | None = None  # logical window page -> page id, while kept
    used: int = 0  # LRU clock


@dataclass(frozen=True)
class Hit:
    """A match: resume at ``position`` (tokens before it are in the cache), recomputing from
    ``start``; ``node`` is where it ends in the tree."""

    position: int
    start: int
    node: _Node


class PrefixCache:
    def __init__(self, layout: PageLayout, pools: Pools, rates: dict[str, int], granule: int | None = None):
        self.layout = layout
        self.pools = pools
        self.m_csa = rates.get(CSA, 0)
        self.m_hca = rates.get(HCA, 0)
        self.granule = granule or math.lcm(layout.window_page, self.m_csa or 1)
        if self.granule % layout.window_page or (self.m_csa and self.granule % self.m_csa):
            raise ValueError(f"prefix cache granule {self.granule}: must be a multiple of the window page "
                             f"({layout.window_page}) and of CSA's rate ({self.m_csa})")
        period = math.lcm(self.granule, self.m_hca or 1)
        self.history = max(r - self.start(r) for r in range(self.granule, period + 1, self.granule))
        self.root = _Node(0, None)
        self._clock = itertools.count(1)
        self.nodes = 0
        self.evictions = 0
        self._window_holds = 0  # window pages held, over all nodes
        self._queue: list[tuple[tuple[int, int, int], int, _Node]] = []  # eviction candidates (see evict)
        self._pushes = itertools.count()
        # each running request's deepest node: its next insert continues from there, not from the root
        self._path_end: weakref.WeakKeyDictionary[RequestPages, _Node] = weakref.WeakKeyDictionary()

    # -- where a resume starts -------------------------------------------------------------------

    def start(self, position: int) -> int:
        """The first position a request resuming at ``position`` (a multiple of the granule)
        recomputes: CSA's overlapping compressor needs the rows of the ``m`` positions before a
        window boundary, HCA's the rows since its last boundary."""
        s = position
        if self.m_csa:
            s = min(s, position - self.m_csa)
        if self.m_hca:
            s = min(s, position - position % self.m_hca)
        return max(s, 0)

    def _window_span(self, position: int) -> range:
        """Logical window pages a resume at ``position`` reads or rewrites."""
        first = max(0, self.start(position) - (self.layout.window - 1)) // self.layout.window_page
        return range(first, (position - 1) // self.layout.window_page + 1)

    # -- lookup ------------------------------------------------------------------------------------

    def match(self, tokens: list[int] | tuple[int, ...]) -> Hit | None:
        """The deepest resumable node on ``tokens``' path, leaving at least one token to compute."""
        node, best = self.root, None
        g = self.granule
        while (node.depth + 1) * g <= len(tokens) - 1:
            block = tuple(tokens[node.depth * g:(node.depth + 1) * g])
            child = node.children.get(block)
            if child is None:
                break
            node = child
            if node.window is not None:
                best = node
        if best is None:
            return None
        position = best.depth * g
        hit = Hit(position, self.start(position), best)
        if hit.start <= 0:
            return None
        walk: _Node | None = best
        now = next(self._clock)
        while walk is not None:
            walk.used = now
            self._requeue(walk)
            walk = walk.parent
        return hit

    def seed(self, hit: Hit, pages: RequestPages, copy) -> bool:
        """Give ``pages`` (a new request's) the state of ``hit``: shared pages, and copies of the
        pages it writes into (``copy(pool, src_ids, dst_ids)`` copies page contents). False (and
        nothing taken) when the pools have no room for the copies."""
        lay = self.layout
        position, start = hit.position, hit.start
        comp: dict[int, int] = {}
        node = hit.node
        while node.parent is not None:  # the compressed page of each node's last position
            j, page = node.comp
            comp.setdefault(j, page)
            node = node.parent
        if set(comp) != set(range(math.ceil(position / lay.comp_page))):
            return False  # a path with a page unaccounted for (cannot happen with granule <= comp_page)
        # copied: the pages the request writes into - compressed entries from ``position`` on (the
        # positions before it close no window), window rows from ``start`` on
        copy_comp = [j for j in comp if (j + 1) * lay.comp_page > position]
        window = dict(hit.node.window)
        copy_window = [lp for lp in window if (lp + 1) * lay.window_page > start]
        new_comp = self.pools.compressed.alloc(len(copy_comp))
        if new_comp is None:
            return False
        new_window = self.pools.window.alloc(len(copy_window))
        if new_window is None:
            self.pools.compressed.free(new_comp)
            return False
        if copy_comp:
            copy("compressed", [comp[j] for j in copy_comp], new_comp)
        if copy_window:
            copy("window", [window[lp] for lp in copy_window], new_window)
        shared_comp = {j: p for j, p in comp.items() if j not in copy_comp}
        shared_window = {lp: p for lp, p in window.items() if lp not in copy_window}
        self.pools.compressed.share(list(shared_comp.values()))
        self.pools.window.share(list(shared_window.values()))
        pages.seed(start, {**shared_comp, **dict(zip(copy_comp, new_comp, strict=True))},
                   {**shared_window, **dict(zip(copy_window, new_window, strict=True))})
        return True

    # -- insertion ---------------------------------------------------------------------------------

    def crosses(self, before: int, after: int) -> bool:
        """Whether computing positions ``before .. after - 1`` crossed a granule boundary, i.e.
        ``insert`` would record a node (the engine asks first: a request's tokens are only listed
        then, not every step)."""
        last = after // self.granule
        return last > 0 and last * self.granule > before

    def insert(self, tokens: list[int] | tuple[int, ...], pages: RequestPages, before: int, after: int) -> None:
        """Record the nodes of the boundaries a request crossed in a step (positions ``before ..
        after - 1`` were computed): ``tokens`` are its known tokens, ``pages`` its pages. The walk
        starts at the node this request's previous insert ended on while it is in the tree (a
        request's tokens never change; only leaves are evicted, so its ancestors are there too):
        a decode crossing a boundary adds one node in O(1), not a walk of its whole context. The nodes
        it adds or passes are marked used; the ones above its previous end keep that insert's time
        (they hold what the request holds anyway while it runs)."""
        g = self.granule
        last = after // g
        if not self.crosses(before, after):
            return
        node = self.root
        end = self._path_end.get(pages)
        if end is not None and self._in_tree(end) and end.depth <= last:
            node = end
        now = next(self._clock)
        for depth in range(node.depth + 1, last + 1):
            position = depth * g
            block = tuple(tokens[(depth - 1) * g:position])
            child = node.children.get(block)
            if child is None:
                j = (position - 1) // self.layout.comp_page
                page = int(pages.comp_row[j])
                if not page:
                    return
                child = _Node(depth, node, block, comp=(j, page))
                self.pools.compressed.share([page])
                node.children[block] = child
                self.nodes += 1
                self._requeue(node)  # one more child: its key changed
            child.used = now
            if child.window is None and position > before:
                live = pages.window_pages()
                span = self._window_span(position)
                if all(lp in live for lp in span):
                    child.window = {lp: live[lp] for lp in span}
                    self.pools.window.share(list(child.window.values()))
                    self._window_holds += len(child.window)
            self._requeue(child)
            node = child
            self._path_end[pages] = node

    # -- eviction ----------------------------------------------------------------------------------

    @staticmethod
    def _key(node: _Node) -> tuple[int, int, int] | None:
        """``node``'s place in the eviction order, None when it holds nothing to drop (the root; an
        inner node without window pages: its compressed page goes with its last descendant)."""
        if node.parent is None or node.window is None and node.children:
            return None
        plain = node.window is not None and len(node.children) == 1
        return (0 if plain else 1, node.used, 0 if node.children else 1)

    def _requeue(self, node: _Node) -> None:
        """Queue ``node`` under its current key (an entry whose key went stale is skipped when popped)."""
        key = self._key(node)
        if key is not None:
            heapq.heappush(self._queue, (key, next(self._pushes), node))
        if len(self._queue) > 4 * self.nodes + 64:  # mostly stale entries: rebuild from the live ones
            live = {id(n): (k, c, n) for k, c, n in self._queue if self._key(n) == k and self._in_tree(n)}
            self._queue = list(live.values())
            heapq.heapify(self._queue)

    @staticmethod
    def _in_tree(node: _Node) -> bool:
        return node.parent is not None and node.parent.children.get(node.block) is node

    def evict(self) -> bool:
        """Drop holds until a page comes free (or the cache holds nothing): least useful first, then
        least recently used. Least useful are the window pages of a node on a plain path (one child):
        a resume there needs a prompt that leaves the path exactly at it, while the path's end
        (a session's history) and branch points (a shared system prompt) are where the next
        requests resume. Then, least recently used first, window pages of any node (inner ones
        before leaves of the same age) and whole leaves. False when the cache held nothing."""
        free = self.pools.window.free_count + self.pools.compressed.free_count
        dropped = False
        while self._queue:
            key, _, victim = heapq.heappop(self._queue)
            if not self._in_tree(victim) or self._key(victim) != key:
                continue  # evicted already, or queued again under a newer key
            dropped = True
            self.evictions += 1
            if victim.window is not None:
                self.pools.window.free(list(victim.window.values()))
                self._window_holds -= len(victim.window)
                victim.window = None
                self._requeue(victim)  # a leaf still holds its compressed page
            else:  # a leaf
                self.pools.compressed.free([victim.comp[1]])
                del victim.parent.children[victim.block]
                self.nodes -= 1
                self._requeue(victim.parent)
            if self.pools.window.free_count + self.pools.compressed.free_count > free:
                break
        return dropped

    def clear(self) -> None:
        while self.evict():
            pass

    def stats(self) -> dict:
        held = {"window": self._window_holds, "compressed": self.nodes}  # each node holds one compressed page
        return {"nodes": self.nodes, "granule": self.granule, "history": self.history, "holds": held,
                "evictions": self.evictions}
