"""Paged serving state of DeepSeek-V4: the page layout, the pools' shapes and one step's addresses.

A serving step (``DeepseekV4Model.step``) runs N tokens of R sequences packed one after another
(no padding), each token at its own position, against state kept in pools of fixed-size pages
(docs/design/serving_engine.md, sections 2-4):

- ``window_kv`` [window pages, Pw, D], every layer: the row of position ``q`` of sequence ``r``
  is row ``q % Pw`` of page ``window_table[r, (q // Pw) % Wp]``;
- ``compressed_kv`` [compressed pages, Pt/m, D] (CSA and HCA) and ``indexer_keys``
  [compressed pages, Pt/m, Di] (CSA): entry ``j`` of sequence ``r`` is row ``j % (Pt/m)`` of page
  ``comp_table[r, j // (Pt/m)]``;
- ``compressor_ring`` [slots, Rk, 2cD] (and ``indexer_compressor_ring`` for the indexer's own
  compressor): position ``q``'s projected kv and gate (position bias added), concatenated, at
  row ``q % Rk`` of the sequence's slot, ``Rk = c*m`` (c = 2 with CSA's overlap). It replaces the
  dense model's compressor tails: a window's entry is computed from its ``c*m`` rows whether
  they come from the ring (earlier steps) or from the step's own tokens.

Every address is a function of (sequence, position) alone, so the state after positions
``0 .. p`` is the same whatever the chunking. Id 0 of every pool is trash: table entries that are
0, padding rows and compress rows that close no window write there, and every read through an
address list masks its ``-1`` entries (their keys are zero rows with a ``-inf`` bias), so nothing
written there is ever used.

This module is addressing only (integer tensor arithmetic, traceable by torch.export); the layer
math that uses it is in ``model.py``; the host bookkeeping of pages (which ids a request holds)
is ``ds4c/runtime/pages.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import ds4c.ops.paged  # noqa: F401 - registers the paged addressing ops (torch.ops.ds4c.paged_rows, ...)

__all__ = ["EMIT_KINDS", "PageLayout", "StepIndex", "all_pools", "default_buckets", "gather_rows", "padded_sizes",
           "page_bytes", "pool_capacity", "serving_layout", "size_pools", "token_buckets"]


@dataclass(frozen=True)
class PageLayout:
    """Page sizes and table widths, as the compiler decides them.

    ``window``: the sliding window W in tokens (a query at p sees p-W+1 .. p). ``window_page``: Pw,
    tokens per window page. ``max_chunk``: the most tokens one request adds in one step.
    ``comp_page``: Pt, tokens per compressed page (a multiple of every compression rate).
    ``max_context``: positions per request. ``draft_tokens``: how many positions a speculative
    verify step may write past what it keeps (MTP drafts, docs/design/mtp.md): the compressor rings
    hold that many rows more, so that a rejected token's row never overwrites one a later step reads."""

    window: int
    window_page: int
    comp_page: int
    max_context: int
    max_chunk: int
    draft_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("window", "window_page", "comp_page", "max_context", "max_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"PageLayout.{name} must be >= 1, got {getattr(self, name)}")
        if self.draft_tokens < 0 or self.draft_tokens >= self.max_chunk:
            raise ValueError(f"PageLayout.draft_tokens must be in [0, max_chunk={self.max_chunk}), "
                             f"got {self.draft_tokens}")

    @property
    def window_slots(self) -> int:
        """Wp: ring entries for the window pages one step can touch: W-1 tokens back plus a chunk,
        plus one for the page boundary."""
        return math.ceil((self.window - 1 + self.max_chunk) / self.window_page) + 1

    @property
    def comp_entries(self) -> int:
        """Compressed pages of a request at ``max_context``."""
        return math.ceil(self.max_context / self.comp_page)

    FIELDS = ("window", "window_page", "comp_page", "max_context", "max_chunk", "draft_tokens")
    OPTIONAL = {"draft_tokens": 0}  # fields an artifact of an older ds4c may lack

    def record(self) -> dict[str, int]:
        """The layout as the manifest's ``serving.layout`` records it (with the derived widths)."""
        return {**{k: getattr(self, k) for k in self.FIELDS}, "window_slots": self.window_slots,
                "comp_entries": self.comp_entries}

    @classmethod
    def from_record(cls, record: dict, where: str) -> PageLayout:
        """The layout of a ``record()`` read back from ``where`` (an artifact's manifest: untrusted);
        a missing or non-integer field raises ValueError naming it."""
        record = {**cls.OPTIONAL, **record}
        bad = [k for k in cls.FIELDS if not isinstance(record.get(k), int) or isinstance(record.get(k), bool)]
        if bad:
            raise ValueError(f"{where}: serving layout fields {bad} are missing or not integers; recompile the "
                             "artifact with --serving")
        try:
            return cls(**{k: record[k] for k in cls.FIELDS})
        except ValueError as e:
            raise ValueError(f"{where}: {e}; recompile the artifact with --serving") from None

    def check_rates(self, rates: dict[str, int]) -> None:
        """Refuse a compressed page that does not hold a whole number of entries of every rate."""
        bad = {kind: m for kind, m in rates.items() if m and self.comp_page % m}
        if bad:
            raise ValueError(f"PageLayout.comp_page={self.comp_page} is not a multiple of the compression rates "
                             f"{bad}; choose a multiple of {math.lcm(*rates.values())}")


SERVING_OPTIONS = ("window_page", "comp_page", "max_chunk", "max_running", "max_step_tokens", "draft_tokens")


def serving_layout(window: int, rates: dict[str, int], max_context: int, options: dict | None = None
                   ) -> tuple[PageLayout, dict[str, int]]:
    """The page layout of a serving compile, and the batch it is planned for (``max_running``,
    ``max_step_tokens``), from the model's window and compression rates and the user's ``options``
    (``SERVING_OPTIONS``; defaults: window pages of W/4 tokens, compressed pages of 256 tokens
    rounded up to a multiple of every rate, chunks up to min(2048, max_context), 64 running
    requests, steps of max(max_chunk, max_running) tokens). An unknown option or a value below 1
    raises ValueError."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(SERVING_OPTIONS))
    if unknown:
        raise ValueError(f"unknown serving option(s) {unknown}; the options are {', '.join(SERVING_OPTIONS)}")
    for k, v in options.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"serving option {k}={v!r}: must be an integer >= 1")
    step = math.lcm(*[m for m in rates.values() if m] or [1])
    layout = PageLayout(window=window, window_page=options.get("window_page", max(1, window // 4)),
                        comp_page=options.get("comp_page", step * math.ceil(256 / step)), max_context=max_context,
                        max_chunk=min(options.get("max_chunk", 2048), max_context),
                        draft_tokens=options.get("draft_tokens", 0))
    max_running = options.get("max_running", 64)
    batch = {"max_running": max_running,
             "max_step_tokens": options.get("max_step_tokens", max(layout.max_chunk, max_running))}
    return layout, batch


@dataclass(frozen=True)
class StepIndex:
    """The addresses of one step, derived from its metadata with tensor ops only.

    ``input_ids``/``positions``/``token_seq`` are per packed token [N]; ``seq_first``/``seq_last``
    are each sequence's first and last packed row [R]; ``window_table`` [R, Wp], ``comp_table``
    [R, Pc] (int32) and ``slot`` [R] are the sequences' pages. Every other tensor is int64. A
    sequence's tokens are consecutive rows at consecutive positions (a chunk); a padding sequence
    (``step_batch.pad_step``: the trash page and slot) holds rows all at position 0."""

    positions: torch.Tensor
    token_seq: torch.Tensor
    seq_first: torch.Tensor
    seq_last: torch.Tensor
    window_table: torch.Tensor
    comp_table: torch.Tensor
    slot: torch.Tensor

    # -- sliding window --------------------------------------------------------------------------

    def window_rows(self, q: torch.Tensor, seq: torch.Tensor, page: int) -> torch.Tensor:
        """[n] row of position ``q`` [n] of sequence ``seq`` [n] in the flattened window pool (q >= 0)."""
        return paged_rows(self.window_table, seq, q, None, 1, page)[:, 0]

    def window_keys(self, window: int, page: int) -> torch.Tensor:
        """[N, W] window rows each token attends, oldest first; -1 before position 0."""
        return paged_rows(self.window_table, self.token_seq, self.positions - (window - 1), None, window, page)

    # -- compressed entries ----------------------------------------------------------------------

    def visible(self, ratio: int) -> torch.Tensor:
        """[N] compressed entries each token may see: those of windows closed at or before it."""
        return torch.div(self.positions + 1, ratio, rounding_mode="floor")

    def comp_keys(self, ratio: int, capacity: int, per_page: int) -> torch.Tensor:
        """[N, capacity] rows of every entry each token may see, by index; -1 for the others."""
        return paged_rows(self.comp_table, self.token_seq, None, self.visible(ratio), capacity, per_page)

    # -- compressor rings ------------------------------------------------------------------------

    def ring_writes(self, ring: int) -> torch.Tensor:
        """[N] ring row each token writes: its slot's row ``p % Rk`` if a later step may read it
        (one of its sequence's last ``Rk`` positions), else the trash slot's (``paged.ring_rows``)."""
        return torch.ops.ds4c.ring_rows(self.positions, self.token_seq, self.seq_last, self.slot, ring_rows=ring)

    def window_index(self, emit: torch.Tensor, ratio: int, span: int, ring_rows: int, per_page: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the window each candidate row ``emit`` [E] (-1: padding) closes: where its ``span``
        (= c*m) rows come from (this step's packed row, >= 0; ``-2 - row`` of its ring slot's
        ``ring_rows`` rows; -1: none), the entry's position (for its RoPE) and the entry's row in
        a compressed pool of ``per_page`` entries per page (0, the trash, for candidates that
        close no window). ``paged.window_index``."""
        return torch.ops.ds4c.window_index(emit, self.positions, self.token_seq, self.seq_first, self.slot,
                                           self.comp_table, ratio=ratio, span=span, ring_rows=ring_rows,
                                           page=per_page)


# -- the engine's buckets ----------------------------------------------------------------------------
# Steps run padded to a few sizes (CUDA graphs are captured per size at engine start, and kernels
# are compiled ahead of time for them): the runtime pads to them (``ds4c.runtime.step_batch``), the
# compiler records their kernel launches (``ds4c.backends.triton.launches``).

EMIT_KINDS = {"emit_csa": "compressed_sparse_attention", "emit_hca": "heavily_compressed_attention"}


def token_buckets(most: int, base: int = 0) -> list[int]:
    """The default token buckets of steps with prompt chunks, up to ``most`` rows: ``base`` (the
    rows every step has anyway: one per padding sequence when few requests run) plus powers of two
    from 64 and the halfway points between them (96, 192, 384, ...), then ``most``; a step pads its
    rows beyond ``base`` to at most 1.5x (one prompt of 512 tokens with 64 padding sequences runs in
    576 rows, not 768)."""
    sizes = [base + b for i in range(6, most.bit_length()) for b in (1 << i, 3 << (i - 1))]
    return sorted({*(b for b in sizes if b < most), most})


def default_buckets(max_running: int, max_step_tokens: int) -> tuple[list[int], list[int], int]:
    """(decode buckets, token buckets of steps with prompt chunks, sequences of such a step) of an
    engine running at most ``max_running`` requests and ``max_step_tokens`` tokens a step: decode
    steps at the powers of two up to max_running and max_running; steps with chunks hold max_running
    + 1 sequences (one for the padding) in ``token_buckets`` rows from that many up."""
    seqs = max_running + 1
    decode = sorted({*(1 << i for i in range(max_running.bit_length()) if 1 << i <= max_running), max_running})
    steps = [b for b in token_buckets(max_step_tokens + seqs, base=seqs - 1) if b >= seqs]
    return decode, steps, seqs


def padded_sizes(tokens: int, seqs: int, rates: dict[str, int], logits: int | None = None) -> dict[str, int]:
    """The first-axis sizes of a step padded to ``tokens`` rows, ``seqs`` sequences and ``logits``
    logits rows (default ``seqs``): what ``step_batch.pad_step`` makes and a graph of that bucket
    is captured for. A chunk of n rows closes at most ``n // m + 1`` windows of rate m, so
    ``tokens // m + seqs`` emit entries cover any step."""
    def emits(kind: str) -> int:
        m = rates.get(kind, 0)
        return tokens // m + seqs if m else 1

    return {"N": tokens, "R": seqs, "L": seqs if logits is None else logits, "Ec": emits(EMIT_KINDS["emit_csa"]),
            "Eh": emits(EMIT_KINDS["emit_hca"])}


def gather_window(rows: torch.Tensor, ring: torch.Tensor, sources: torch.Tensor, overlap: int = 0) -> torch.Tensor:
    """[E, span, W] window rows from this step's ``rows`` [N, W] and the flattened ``ring`` [M, W]
    at ``sources`` (``StepIndex.window_index``); kv 0, gate -inf where no row. ``overlap = m``: an
    overlapping compressor's rows, [E, 2m, W/2] (``paged.window_gather``)."""
    return torch.ops.ds4c.window_gather(rows, ring, sources, overlap=overlap)


def gather_rows(pool: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``pool`` [rows, d] at ``rows`` (any shape); -1 gives a zero row (whatever the trash holds)."""
    return torch.ops.ds4c.paged_gather(pool, rows)


def paged_rows(table: torch.Tensor, seq: torch.Tensor, first: torch.Tensor | None, limit: torch.Tensor | None,
               count: int, page: int) -> torch.Tensor:
    """[N, count] pool rows of positions ``first[n] + i`` of sequence ``seq[n]`` through ``table``;
    -1 outside [0, ``limit[n]``) (``ds4c.ops.paged``: one op, not twenty small ones)."""
    return torch.ops.ds4c.paged_rows(table, seq, first, limit, count=count, page=page)


# -- pool sizes ------------------------------------------------------------------------------------

POOL_KINDS = ("window", "compressed", "slots")


def all_pools(serving: dict) -> list[dict]:
    """Every pool record of a manifest's ``serving`` section: the model's, then the MTP block's
    (window pools addressed by the same tables: they count towards the window page's bytes)."""
    return [*serving["pools"], *((serving.get("mtp") or {}).get("pools") or [])]


def page_bytes(pools: list[dict]) -> dict[str, int]:
    """Bytes of one page id of each pool kind over every layer, from the serving pools' records
    (``{"name", "pool", "shape": [dim, *page], "dtype"}``, ``attrs["serving"]["pools"]``)."""
    out = dict.fromkeys(POOL_KINDS, 0)
    for p in pools:
        itemsize = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
        out[p["pool"]] += math.prod(int(d) for d in p["shape"][1:]) * itemsize
    return out


def size_pools(layout: PageLayout, per_page: dict[str, int], budget: int | None, *, max_running: int,
               max_step_tokens: int) -> dict[str, int]:
    """Pages of each pool (trash page included) for ``budget`` bytes of state: a slot per running
    request, the window pages every running request and one step's new tokens can hold at once, and
    the rest in compressed pages (docs/design/serving_engine.md, section 5); ``budget`` None: as
    many compressed pages as ``max_running`` requests of max_context take. Raises ValueError when
    not even one request of ``layout.max_context`` fits, naming the numbers."""
    if max_running < 1 or max_step_tokens < 1:
        raise ValueError(f"max_running ({max_running}) and max_step_tokens ({max_step_tokens}) must be >= 1")
    slots = max_running + 1
    per_request = math.ceil((layout.window - 1) / layout.window_page) + 1
    window = (max_running * per_request + math.ceil(max_step_tokens / layout.window_page) + max_running + 1)
    window = max(window, layout.window_slots + 1)
    fixed = slots * per_page["slots"] + window * per_page["window"]
    if budget is None or not per_page["compressed"]:
        return {"window": window, "compressed": max_running * layout.comp_entries + 1, "slots": slots}
    comp = (budget - fixed) // per_page["compressed"]
    if comp - 1 < layout.comp_entries:
        need = fixed + (layout.comp_entries + 1) * per_page["compressed"]
        raise ValueError(f"a state budget of {budget} bytes holds {max(comp - 1, 0)} compressed pages of "
                         f"{per_page['compressed']} bytes after {slots} slots and {window} window pages "
                         f"({fixed} bytes); one request of max_context {layout.max_context} needs "
                         f"{layout.comp_entries}: give at least {need} bytes, or lower max_running / max_context")
    return {"window": window, "compressed": comp, "slots": slots}


def pool_capacity(layout: PageLayout, pages: dict[str, int]) -> dict[str, int]:
    """What pools of ``pages`` hold: token positions of compressed state, and requests at 4K / 32K /
    max_context (also bounded by the slots)."""
    tokens = (pages["compressed"] - 1) * layout.comp_page

    def requests(length: int) -> int:
        return min(pages["slots"] - 1, (pages["compressed"] - 1) // math.ceil(length / layout.comp_page))

    return {"tokens": tokens, "requests_at_4k": requests(min(4096, layout.max_context)),
            "requests_at_32k": requests(min(32768, layout.max_context)),
            "requests_at_max_context": requests(layout.max_context)}
