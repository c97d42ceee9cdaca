"""The serving engine: continuous batching of requests over paged state (#26; design in
docs/design/serving_engine.md, section 8).

Requests are submitted at any time and join the running batch at the next ``step``. Each step
packs one chunk per running request under a token budget (``max_step_tokens``): first the next
token of every request that is decoding (oldest first, so a long prompt never stalls them), then
prompt chunks of requests still prefilling (oldest first), then new requests from the waiting
queue (first come, first served; no skipping ahead of a request that does not fit). A request
whose chunk ends its known tokens samples its next token in the same step; finished requests
leave at once and give their pages back.

With ``overlap`` (default on CUDA) a step of decodes only leaves its sampled tokens on the device:
the next step, if it is again every running request's next decode (none waiting, cancelled or at
its last token by length), is planned and launched with those tokens as its input ids before the
host reads them, so the GPU runs step n + 1 while the host appends step n's tokens, checks stop
tokens and notifies streams. A request that stopped at step n has one wasted row in step n + 1
(discarded). Every other step runs as before.

Pages (``ds4c.runtime.pages``) are taken as requests grow. When a running request cannot grow,
the youngest running request is preempted: its pages are freed and it goes back to the front of
the queue with its prompt and the tokens it has generated, which it recomputes later (the tokens
already emitted are inputs, never sampled again). A request therefore finishes with the tokens it
would have produced without preemption (docs/design/serving_engine.md, section 8.3).

The engine drives a *step runner*: something that owns the pools' tensors and runs one
``StepBatch``, returning the logits of its logit rows. ``CompiledStepRunner`` runs an artifact's
serving entry points (``ds4c compile --serving``: ``ragged_step``, and ``ragged_decode`` for steps
that only decode); ``EagerStepRunner`` runs the model's eager ``step`` (their oracle in tests).
``Engine(path_or_model)`` builds the compiled one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from ds4c.artifact.artifact import Artifact
from ds4c.errors import ArtifactError, Ds4cError, InputError
from ds4c.models.deepseek_v4.model import MTP_STEP_INPUTS
from ds4c.models.deepseek_v4.paged import (
    POOL_KINDS,
    PageLayout,
    all_pools,
    default_buckets,
    page_bytes,
    size_pools,
    token_buckets,  # noqa: F401 - the default token buckets, named here too
)
from ds4c.runtime.pages import PagePool, Pools, RequestPages
from ds4c.runtime.prefix_cache import PrefixCache
from ds4c.runtime.sampling import SamplerState, SamplingParams, finish_reasons, sample
from ds4c.runtime.speculative import (
    accept,
    accept_greedy,
    draft_token,
    generator_for,
    penalty_context,
    processed_logits,
)
from ds4c.runtime.step_batch import Chunk, StepBatch, build_step

__all__ = ["CompiledStepRunner", "EagerStepRunner", "Engine", "Request", "StepRunner"]

RequestStatus = Literal["waiting", "running", "finished"]


class StepRunner(Protocol):
    """What the engine needs from a model: its facts, the pools, and one step."""

    layout: PageLayout
    pools: Pools
    rates: dict[str, int]
    vocab_size: int
    device: torch.device  # where run() returns the logits (and where sampling runs); the host if absent
    # copy_pages(pool, src_ids, dst_ids): copy page contents within a pool (needed by the prefix cache)

    def run(self, batch: StepBatch) -> torch.Tensor:
        """Run one step (updating the pools in place or by replacement); logits [L, vocab]."""
        ...


SERVING_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "int8", "uint8")


def check_serving_record(serving: dict) -> None:
    """Refuse an artifact whose manifest ``serving`` section (untrusted) is not what a ``--serving``
    compile writes, naming the field: the engine sizes and allocates the pools from it."""
    def bad(field: str, want: str):
        return ArtifactError(f"the artifact's manifest field serving.{field} must be {want}; recompile the artifact "
                             "with `ds4c compile ... --serving`")

    def positive(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    batch = serving.get("batch")
    if not isinstance(batch, dict) or not all(positive(batch.get(k)) for k in ("max_running", "max_step_tokens")):
        raise bad("batch", "{max_running, max_step_tokens} as integers >= 1")
    rates = serving.get("rates")
    if not isinstance(rates, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                              and v >= 0 for k, v in rates.items()):
        raise bad("rates", "a map of layer type to a compression rate >= 0")
    pools = serving.get("pools")
    if not isinstance(pools, list) or not pools:
        raise bad("pools", "a non-empty list of pool records")
    for i, p in enumerate(pools):
        if (not isinstance(p, dict) or not isinstance(p.get("name"), str) or p.get("pool") not in POOL_KINDS
                or p.get("dtype") not in SERVING_DTYPES or not isinstance(p.get("shape"), list)
                or len(p["shape"]) < 2 or not all(positive(d) for d in p["shape"][1:])):
            raise bad(f"pools[{i}]", f"{{name, pool in {POOL_KINDS}, shape [pages, integers >= 1...], dtype in "
                                     f"{SERVING_DTYPES}}}")
    pages = (serving.get("pages") or {}).get("pages") if isinstance(serving.get("pages"), dict) else None
    if not isinstance(pages, dict) or not all(positive(pages.get(k)) and pages[k] >= 2 for k in POOL_KINDS):
        raise bad("pages.pages", f"pages per pool ({', '.join(POOL_KINDS)}) as integers >= 2")
    mtp = serving.get("mtp")
    if mtp is not None and (not isinstance(mtp, dict) or not isinstance(mtp.get("pools"), list)
                            or not all(isinstance(p, dict) and p.get("pool") == "window" and isinstance(p.get("name"), str)
                                       and p.get("dtype") in SERVING_DTYPES and isinstance(p.get("shape"), list)
                                       and len(p["shape"]) >= 2 and all(positive(d) for d in p["shape"][1:])
                                       for p in mtp["pools"])
                            or not isinstance(mtp.get("hidden"), list) or len(mtp["hidden"]) != 2
                            or not all(positive(d) for d in mtp["hidden"])):
        raise bad("mtp", "{inputs, hidden: [streams, width], pools: [window pool records]}")
    inputs = serving.get("inputs")
    if (not isinstance(inputs, dict) or any(not isinstance(inputs.get(k), list)
                                            or not all(isinstance(x, str) for x in inputs[k])
                                            for k in ("ragged_step", "ragged_decode"))):
        raise bad("inputs", "the input names of ragged_step and ragged_decode")


def _pool_kind(name: str) -> str:
    """The pool a paged state tensor belongs to, from its name (``paged_state_specs``)."""
    if name.endswith("window_kv_pool"):
        return "window"
    if name.endswith("_ring"):
        return "slots"
    return "compressed"


def _copy_pages(tensors: list[torch.Tensor], src: list[int], dst: list[int]) -> None:
    if not src:
        return
    for t in tensors:
        s = torch.tensor(src, dtype=torch.long, device=t.device)
        d = torch.tensor(dst, dtype=torch.long, device=t.device)
        t.index_copy_(0, d, t.index_select(0, s))


class MTPRows:
    """The MTP steps by rows of streams a step runner holds (base of the step runners).

    ``hidden`` holds the last main-model step's final streams, ``mtp_hidden`` the last MTP step's
    output streams (one row per logits row). ``run_mtp_rows`` runs the MTP block on some rows of
    one of them, so the engine names rows, never tensors: the ranks of a sharded artifact, which
    all hold the same streams, then make the same call from a few integers (``ds4c.runtime.ranks``)."""

    hidden: torch.Tensor | None = None
    mtp_hidden: torch.Tensor | None = None

    def run_mtp(self, batch: StepBatch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def run_mtp_rows(self, batch: StepBatch, rows: torch.Tensor, chained: bool = False) -> torch.Tensor:
        """The MTP block over ``batch`` with rows ``rows`` of the main model's streams (``chained``:
        of the last MTP step's); its logits. Its output streams become ``mtp_hidden``."""
        source = self.mtp_hidden if chained else self.hidden
        if source is None:
            raise AssertionError(f"run_mtp_rows: no {'MTP' if chained else 'main-model'} streams yet")
        logits, self.mtp_hidden = self.run_mtp(batch, source.index_select(0, rows.to(source.device)))
        return logits


class EagerStepRunner(MTPRows):
    """``DeepseekV4Model.step`` in eager PyTorch over pools allocated here (``window_pages``,
    ``comp_pages``, ``slots``; id 0 of each is trash)."""

    def __init__(self, model, layout: PageLayout, *, window_pages: int, comp_pages: int, slots: int,
                 device: torch.device | str = "cpu"):
        self.model = model
        self.layout = layout
        self.pools = Pools(window_pages, comp_pages, slots)
        self.rates = model.compression_rates()
        self.vocab_size = model.config.vocab_size
        self.device = torch.device(device)
        specs = model.paged_state_specs(layout, window_pages, comp_pages, slots)
        self.state = tuple(torch.zeros(s.shape, dtype=s.dtype, device=self.device) for s in specs)
        self._pool_kinds = [_pool_kind(s.name) for s in specs]
        self.mtp = model.has_mtp
        if self.mtp:
            self.mtp_state = tuple(torch.zeros(s.shape, dtype=s.dtype, device=self.device)
                                   for s in model.mtp_state_specs(layout, window_pages))
            self._pool_kinds += ["window"] * len(self.mtp_state)
        self.hidden: torch.Tensor | None = None  # the last step's final streams [N, n, D] (MTP models)

    accepts_device_tokens = True  # run(batch, input_ids=tensor on the device): Engine(overlap=...)

    @torch.no_grad()
    def run(self, batch: StepBatch, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids is not None:  # the previous step's tokens, where they are
            batch = dataclasses.replace(batch, input_ids=input_ids.to(batch.input_ids.device))
        out = self.model.step(*batch.args(), *self.state)
        if self.mtp:
            self.hidden, out = out[1], (out[0], *out[2:])
        self.state = out[1:]
        return out[0]

    @torch.no_grad()
    def run_mtp(self, batch: StepBatch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP block over ``batch``'s rows (``DeepseekV4Model.mtp_step``): (logits, streams) of
        its logit rows."""
        out = self.model.mtp_step(hidden, *mtp_args(batch), *self.mtp_state)
        self.mtp_state = out[2:]
        return out[0], out[1]

    @torch.no_grad()
    def copy_pages(self, pool: str, src: list[int], dst: list[int]) -> None:
        """Page ``src[i]``'s contents into page ``dst[i]``, in every tensor of ``pool``."""
        tensors = (*self.state, *(self.mtp_state if self.mtp else ()))
        _copy_pages([t for t, kind in zip(tensors, self._pool_kinds, strict=True) if kind == pool], src, dst)


def mtp_args(batch: StepBatch) -> tuple[torch.Tensor, ...]:
    """A ``StepBatch``'s tensors that ``mtp_step`` reads (after the streams), in its argument order."""
    return tuple(getattr(batch, name) for name in MTP_STEP_INPUTS)


class CompiledStepRunner(MTPRows):
    """An artifact's serving entry points over pools allocated here, on the artifact's device.

    ``pages``: pages per pool (``{"window", "compressed", "slots"}``); default: the compiled plan's
    (``manifest["serving"]["pages"]``; a GPU artifact loaded on the CPU gets room for max_running
    requests of max_context instead). ``state_budget`` (bytes) sizes them again with the same
    formula (``size_pools``), for another device or memory share.

    Steps run in *buckets* of input sizes, padded (padding rows and sequences sit on the pools'
    trash page and slot): a decode-only step of r sequences runs ``ragged_decode`` for the smallest
    decode bucket >= r (``executor.decode_buffers``); a step with prompt chunks runs ``ragged_step``
    for the smallest token bucket that holds its rows and one padding row per missing sequence,
    with max_running + 1 sequences (``step_batch.pad_step``). On CUDA (with the model's
    ``cuda_graphs``) ``warm_up`` captures every bucket as a CUDA graph over the pools
    (``GraphedServingStep``, largest first, one memory pool and one arena per entry point), so a
    step is one graph replay and no request pays a capture. ``decode_buckets`` / ``step_buckets``
    choose them (default on CUDA: powers of two up to max_running, and max_running; token buckets
    from 64 by powers of two and the halfway points between them up to max_step_tokens +
    max_running + 1; elsewhere none: every step runs at its own size, unpadded)."""

    def __init__(self, model, *, pages: dict[str, int] | None = None, state_budget: int | None = None,
                 max_running: int | None = None, max_step_tokens: int | None = None,
                 decode_buckets: Sequence[int] | None = None, step_buckets: Sequence[int] | None = None):
        serving = model.manifest.get("serving")
        if not serving:
            raise InputError("this artifact has no serving entry points (ragged_step / ragged_decode): recompile it "
                             "with `ds4c compile ... --serving` (Python: ds4c.compile(..., serving=True))")
        self.model = model
        try:
            self.layout = PageLayout.from_record(serving.get("layout") or {}, "the artifact's manifest")
        except ValueError as e:
            raise InputError(str(e)) from None
        check_serving_record(serving)
        batch = serving["batch"]
        if pages is None and state_budget is not None:
            try:
                pages = size_pools(self.layout, page_bytes(all_pools(serving)), int(state_budget),
                                   max_running=max_running or batch["max_running"],
                                   max_step_tokens=max_step_tokens or batch["max_step_tokens"])
            except ValueError as e:
                raise InputError(f"Engine(state_budget={state_budget}): {e}") from None
        if pages is None and model.device.type == "cpu" and model.manifest["target"].get("backend") != "reference":
            # a GPU artifact on the host: its pools were sized for the GPU's memory; here, room for
            # max_running requests of max_context (as a cpu-target compile plans them)
            pages = size_pools(self.layout, page_bytes(all_pools(serving)), None,
                               max_running=max_running or batch["max_running"],
                               max_step_tokens=max_step_tokens or batch["max_step_tokens"])
        pages = dict(pages or serving["pages"]["pages"])
        self.pools = Pools(pages["window"], pages["compressed"], pages["slots"])
        self.rates = dict(serving["rates"])
        self.vocab_size = model.vocab_size
        self.max_running = batch["max_running"]
        self.inputs = serving["inputs"]
        self._pools = serving["pools"]
        self.device = model.device
        # the MTP block (artifacts compiled with --speculative): its pools, in window pages
        self.mtp = "mtp" in serving
        self._mtp_pools = serving["mtp"]["pools"] if self.mtp else []
        try:
            self.state = {p["name"]: self._pool_tensor(p, pages[p["pool"]]) for p in serving["pools"]}
            self.mtp_state: dict[str, torch.Tensor] = {p["name"]: self._pool_tensor(p, pages["window"])
                                                       for p in self._mtp_pools}
        except torch.OutOfMemoryError:
            self.state = self.mtp_state = {}
            sizes = page_bytes(all_pools(serving))
            need = sum(sizes[k] * n for k, n in pages.items())
            free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
            raise InputError(f"the serving pools ({need / 1e9:.1f} GB: {pages['window']} window, {pages['compressed']} "
                             f"compressed pages, {pages['slots']} slots) do not fit in the device memory left beside "
                             f"the loaded model{f' ({free / 1e9:.1f} GB free)' if free is not None else ''}; give them "
                             "less: Engine(..., state_budget=BYTES) / --state-budget, or recompile with a smaller "
                             "--hbm-budget") from None
        self.hidden: torch.Tensor | None = None  # the last step's final streams [N, n, D] (MTP artifacts)
        self._graphing = (model.device.type == "cuda" and getattr(model, "cuda_graphs", False)
                          and getattr(model, "backend", "reference") != "reference")
        top = max_running or batch["max_running"]
        default_decode, default_steps, self.step_seqs = default_buckets(top, max_step_tokens or batch["max_step_tokens"])
        if self._graphing:
            decode_buckets = default_decode if decode_buckets is None else decode_buckets
            step_buckets = default_steps if step_buckets is None else step_buckets
        for name, given in (("decode_buckets", decode_buckets), ("step_buckets", step_buckets)):
            if given is not None and not all(isinstance(b, int) and b >= 1 for b in given):
                raise InputError(f"CompiledStepRunner({name}={given!r}): give sizes >= 1")
        self.decode_buckets = sorted(set(decode_buckets or ()))
        self.step_buckets = sorted(b for b in set(step_buckets or ()) if b >= self.step_seqs)
        self.decode_graphs: dict[int, object] = {}  # bucket -> GraphedServingStep (warm_up)
        self.step_graphs: dict[int, object] = {}
        self.mtp_graphs: dict[int, object] = {}  # mtp_step in the token buckets of ragged_step
        # speculative artifacts: small steps of r requests of up to draft_tokens + 1 rows each (a
        # verify; the MTP block's catch-up and chained drafts), keyed by the decode bucket r
        self.verify_graphs: dict[int, object] = {}
        self.mtp_small_graphs: dict[int, object] = {}
        self.graph_errors: dict[str, str] = {}  # "ragged_decode/4" -> why its capture failed (it runs op by op)
        self._captured_state: dict[str, torch.Tensor] = {}  # the pools the graphs were captured over (warm_up)

    def release(self) -> None:
        """Drop the pools and the captured graphs (their memory goes back to the allocator, even
        if something still holds this runner or a graph): the runner runs no more steps."""
        for graphs in (self.decode_graphs, self.step_graphs, self.mtp_graphs, self.verify_graphs,
                       self.mtp_small_graphs):
            for g in graphs.values():
                g.release()
            graphs.clear()
        self._captured_state.clear()  # in place: the graphs' step closures hold this very dict
        self.state.clear()
        self.mtp_state.clear()
        self.hidden = None

    def _pool_tensor(self, record: dict, pages: int) -> torch.Tensor:
        return torch.zeros([pages, *record["shape"][1:]], dtype=getattr(torch, record["dtype"]), device=self.device)

    @torch.no_grad()
    def copy_pages(self, pool: str, src: list[int], dst: list[int]) -> None:
        """Page ``src[i]``'s contents into page ``dst[i]``, in every tensor of ``pool`` (the MTP
        block's window pool with the window pages)."""
        tensors = [self.state[p["name"]] for p in self._pools if p["pool"] == pool]
        if pool == "window":
            tensors += list(self.mtp_state.values())
        _copy_pages(tensors, src, dst)

    def add_window_pages(self, n: int) -> None:
        """``n`` more window pages, before any request holds one (the prefix cache's window history).
        The window pool grows in place: whoever holds ``self.pools`` sees it."""
        if self.pools.window.used_count:
            raise AssertionError("add_window_pages: the window pool is in use")
        pages = self.pools.window.pages + n
        self.pools.window = PagePool("window", pages)
        self.decode_graphs.clear()  # they address the old window tensors
        self.step_graphs.clear()
        self.mtp_graphs.clear()
        self.verify_graphs.clear()
        self.mtp_small_graphs.clear()
        for p in self._pools:
            if p["pool"] == "window":
                self.state[p["name"]] = self._pool_tensor(p, pages)
        for p in self._mtp_pools:
            self.mtp_state[p["name"]] = self._pool_tensor(p, pages)

    @torch.no_grad()
    def warm_up(self, max_rows: int | None = None, max_tokens: int | None = None) -> None:
        """Capture the buckets (decode buckets up to ``max_rows`` sequences, step buckets up to
        ``max_tokens`` + max_running + 1 rows) as CUDA graphs before any request runs: Triton
        compiles and autotunes here, not in the first request. A bucket whose capture fails keeps
        running op by op (``graph_errors`` says why)."""
        if not self._graphing:
            return
        from ds4c.runtime.executor import GraphedServingStep, decode_buffers
        from ds4c.runtime.step_batch import padding_step

        pool = torch.cuda.graph_pool_handle()
        lay = self.layout
        self._captured_state = self.state  # what the graphs' steps read and write (release clears it)

        def capture(name: str, graphs: dict, buckets: list[int], buffers, state=None, label: str = "") -> None:
            executor = self.model._entry(name)
            if hasattr(executor, "share_captured_arenas"):
                executor.share_captured_arenas()
            for size in sorted(buckets, reverse=True):
                key = f"{name}{label}/{size}"
                if size in graphs or key in self.graph_errors:
                    continue
                try:
                    graphs[size] = GraphedServingStep(executor, self.model.weights, self.state if state is None
                                                      else state, buffers(size), pool=pool)
                except (RuntimeError, Ds4cError) as e:
                    self.graph_errors[key] = str(e).splitlines()[0] if str(e) else type(e).__name__
                    torch.cuda.synchronize(self.device)
            if hasattr(executor, "drop_eager_arena"):
                executor.drop_eager_arena()

        def step_buffers(tokens: int) -> dict[str, torch.Tensor]:
            pad = padding_step(tokens, self.step_seqs, self.rates, lay.window_slots, lay.comp_entries)
            return {k: v.to(self.device) for k, v in zip(self.inputs["ragged_step"], pad.args(), strict=True)}

        # the token buckets a step of up to max_tokens rows can need: those below its largest
        # padded size, and the first that holds it
        room = None if max_tokens is None else max_tokens + self.step_seqs
        top = next((b for b in self.step_buckets if room is not None and b >= room), None)
        capture("ragged_step", self.step_graphs,
                [b for b in self.step_buckets if room is None or b < room or b == top], step_buffers)
        capture("ragged_decode", self.decode_graphs,
                [b for b in self.decode_buckets if max_rows is None or b <= max_rows],
                lambda rows: decode_buffers(lay, rows, self.device))
        if self.mtp:  # the MTP block in the same token buckets (its catch-up and chained drafts)
            capture("mtp_step", self.mtp_graphs,
                    [b for b in self.step_buckets if room is None or b < room or b == top],
                    lambda tokens: self._mtp_inputs(padding_step(tokens, self.step_seqs, self.rates, lay.window_slots,
                                                                 lay.comp_entries), None, tokens),
                    self.mtp_state)
            small = [b for b in self.decode_buckets if max_rows is None or b <= max_rows]

            def small_step(r: int, mtp: bool):
                tokens, seqs = self._small_shape(r)
                pad = padding_step(tokens, seqs, self.rates, lay.window_slots, lay.comp_entries,
                                   logits=seqs if mtp else tokens)
                if mtp:
                    return self._mtp_inputs(pad, None, tokens)
                return {k: v.to(self.device) for k, v in zip(self.inputs["ragged_step"], pad.args(), strict=True)}

            capture("ragged_step", self.verify_graphs, small, lambda r: small_step(r, False), label=":verify")
            capture("mtp_step", self.mtp_small_graphs, small, lambda r: small_step(r, True), self.mtp_state,
                    label=":small")

    accepts_device_tokens = True  # run(batch, input_ids=tensor on the device): Engine(overlap=...)

    @torch.no_grad()
    def run(self, batch: StepBatch, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One step; ``input_ids``: the rows' token ids as a tensor on the device (the previous
        step's sampled tokens, not yet read by the host), instead of ``batch.input_ids``."""
        from ds4c.runtime.executor import decode_buffers, fill_buffers
        from ds4c.runtime.step_batch import pad_step

        device = self.model.device
        n_logits = batch.logit_rows.shape[0]
        decode_only = batch.tokens == batch.seq_first.shape[0] == n_logits
        name = "ragged_decode" if decode_only else "ragged_step"
        if decode_only:
            rows = batch.tokens
            bucket = next((b for b in self.decode_buckets if b >= rows), None)
            padded, graphs = batch, self.decode_graphs
        else:
            need = batch.tokens + self.step_seqs - batch.seq_first.shape[0]
            bucket = next((b for b in self.step_buckets if b >= need), None)
            padded = None if bucket is None else pad_step(batch, bucket, self.step_seqs, self.rates)
            bucket = None if padded is None else bucket
            graphs = self.step_graphs
        if not decode_only:  # a small step (a verify) fits a small bucket better than the token buckets
            small = self._small_bucket(self.verify_graphs, batch, logits_all=True)
            if small is not None:
                graph, padded = small
                args = dict(zip(self.inputs["ragged_step"], padded.args(), strict=True))
                logits = graph({k: args[k] for k in self.inputs["ragged_step"]}, n_logits)
                if self.mtp:
                    self.hidden = graph.hidden[:batch.tokens].clone()
                return logits
        if bucket not in graphs and self._graphing:  # its capture failed: op by op at the step's own size
            padded, bucket = batch, None
        args = dict(zip(self.inputs["ragged_step"], (padded or batch).args(), strict=True))
        inputs = {k: args[k] for k in self.inputs[name]}
        device_inputs = None if input_ids is None else {"input_ids": input_ids}
        if bucket in graphs:
            graph = graphs[bucket]
            logits = graph(inputs, n_logits, device_inputs)
            if self.mtp:
                self.hidden = graph.hidden[:batch.tokens].clone()
            return logits
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if input_ids is not None:
            inputs["input_ids"] = torch.cat([input_ids.to(device), inputs["input_ids"][input_ids.shape[0]:]])
        if decode_only and bucket is not None and bucket != rows:  # padded to the bucket, op by op
            buffers = decode_buffers(self.layout, bucket, device)
            fill_buffers(buffers, inputs)
            inputs = buffers
        out = self.model._entry(name).run(inputs, self.model.weights, self.state)
        logits = out.pop("logits")
        hidden = out.pop("hidden", None)
        if hidden is not None:
            self.hidden = hidden[:batch.tokens]
        self.state = out
        return logits[:n_logits]

    def _small_shape(self, r: int) -> tuple[int, int]:
        """(rows, sequences) of the small bucket of ``r`` requests: up to draft_tokens + 1 rows each,
        and one padding sequence (which holds the padding rows)."""
        return (r + 1) * (self.layout.draft_tokens + 1), r + 1

    def _small_bucket(self, graphs: dict, batch: StepBatch, logits_all: bool):
        """(graph, ``batch`` padded to it) of the smallest small bucket ``batch`` fits, or None;
        ``logits_all``: the bucket has a logits row per row (a verify), else one per sequence."""
        from ds4c.runtime.step_batch import pad_step

        r = int(batch.seq_first.shape[0])
        for size in sorted(graphs):
            if size < r:
                continue
            tokens, seqs = self._small_shape(size)
            padded = pad_step(batch, tokens, seqs, self.rates, logits=tokens if logits_all else seqs)
            if padded is not None:
                return graphs[size], padded
        return None

    def _mtp_inputs(self, batch: StepBatch, hidden: torch.Tensor | None, rows: int) -> dict[str, torch.Tensor]:
        """``mtp_step``'s inputs on the device: ``batch``'s tensors and ``hidden`` padded with zero rows
        to ``rows`` (None: all zeros, a capture's padding step)."""
        mtp = self.model.manifest["serving"]["mtp"]
        streams = torch.zeros([rows, *mtp["hidden"]], dtype=getattr(torch, mtp.get("dtype", self._pools[0]["dtype"])),
                              device=self.device)
        if hidden is not None:
            streams[:hidden.shape[0]] = hidden
        tensors = dict(zip(MTP_STEP_INPUTS, mtp_args(batch), strict=True))
        return {"hidden": streams, **{k: tensors[k].to(self.device) for k in mtp["inputs"] if k != "hidden"}}

    @torch.no_grad()
    def run_mtp(self, batch: StepBatch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The artifact's ``mtp_step`` over ``batch``'s rows with the main model's streams ``hidden``:
        (logits, the block's streams) of its logit rows; a CUDA graph of the smallest token bucket
        that holds it where one was captured (``warm_up``), else op by op at its own size."""
        from ds4c.runtime.step_batch import pad_step

        n_logits = int(batch.logit_rows.shape[0])
        small = self._small_bucket(self.mtp_small_graphs, batch, logits_all=False)
        if small is None:
            need = batch.tokens + self.step_seqs - batch.seq_first.shape[0]
            bucket = next((b for b in self.step_buckets if b >= need and b in self.mtp_graphs), None)
            padded = None if bucket is None else pad_step(batch, bucket, self.step_seqs, self.rates)
            small = None if padded is None else (self.mtp_graphs[bucket], padded)
        if small is not None:
            graph, padded = small
            logits = graph(self._mtp_inputs(padded, hidden, padded.tokens), n_logits)
            return logits, graph.hidden[:n_logits].clone()
        inputs = self._mtp_inputs(batch, hidden, batch.tokens)
        out = self.model._entry("mtp_step").run(inputs, self.model.weights, self.mtp_state)
        logits, streams = out.pop("logits"), out.pop("hidden")
        self.mtp_state = out
        return logits, streams


@dataclass(eq=False)
class Request:
    """One request: what was asked, what it has produced, where it stands.

    ``output_ids`` grows as the engine steps (iterate the request, or ``async for`` over
    ``stream()``, to get tokens as they come); ``finish_reason`` is "stop", "length",
    "cancelled" or "error" (``error`` says why) once it is done. ``logprobs`` (when ``params.logprobs`` is not None) holds per
    generated token (its logprob, [(token id, logprob), ...] of the ``params.logprobs`` most
    likely)."""

    id: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    status: RequestStatus = "waiting"
    preemptions: int = 0
    error: str | None = None  # why the engine failed it (finish reason "error")
    # engine bookkeeping
    _pages: RequestPages | None = field(default=None, repr=False)
    _computed: int = 0  # positions whose state is in the pools
    _emit_from: int = 0  # positions before it are recomputed from a prefix-cache hit: they close no window
    cached_tokens: int = 0  # prompt positions a prefix-cache hit saved computing (last admission)
    verifies: int = 0  # speculative verify steps this request took (Engine(speculative=k))
    accepted_drafts: int = 0  # MTP drafts they accepted
    _drafts: list[int] = field(default_factory=list, repr=False)  # proposed tokens after the next one
    _draft_q: list = field(default_factory=list, repr=False)  # their draft distributions (sampled requests)
    _seed: int | None = None  # the random stream of its speculative draws
    _pending_insert: bool = False  # an overlapped step computed a position whose token is still in flight
    _cancel: bool = False
    _engine: weakref.ref | None = field(default=None, repr=False)
    _on_progress: Callable[[Request], None] | None = field(default=None, repr=False)

    def _notify(self) -> None:
        """Tell the submitter's ``on_progress`` that a token came or the request finished (from the
        engine's thread, under its lock); a failing callback is the submitter's problem, not the batch's."""
        if self._on_progress is not None:
            try:
                self._on_progress(self)
            except Exception:  # noqa: BLE001 - e.g. the server's event loop already closed
                pass

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def _waited_on(self):
        """The engine that will produce more of this request's tokens, or None when none will come."""
        if self.finished or self._engine is None:
            return None
        return self._engine()

    def __iter__(self) -> Iterator[int]:
        """The generated tokens as they come: steps the engine when no background loop
        (``Engine.start``) does, waits for it otherwise."""
        seen = 0
        while True:
            new = self.output_ids[seen:]  # a copy: a background loop may append meanwhile
            seen += len(new)
            yield from new
            engine = self._waited_on()
            if engine is None:
                yield from self.output_ids[seen:]
                return
            engine._advance(wait=True)

    async def stream(self) -> AsyncIterator[int]:
        """``__iter__`` for asyncio: the engine steps in a worker thread (or its background loop
        does), so the event loop is never blocked."""
        seen = 0
        while True:
            new = self.output_ids[seen:]
            seen += len(new)
            for tok in new:
                yield tok
            engine = self._waited_on()
            if engine is None:
                for tok in self.output_ids[seen:]:
                    yield tok
                return
            await asyncio.to_thread(engine._advance, wait=True)

    @property
    def tokens(self) -> list[int]:
        """Prompt and output so far: what the model has seen or will see next."""
        return [*self.prompt_ids, *self.output_ids]

    @property
    def n_tokens(self) -> int:
        """``len(self.tokens)``, without making the list (the scheduler asks every step)."""
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """``self.tokens[start:end]``, making only that part (a step's chunk of a long context)."""
        p = len(self.prompt_ids)
        return [*self.prompt_ids[start:min(end, p)], *self.output_ids[max(start - p, 0):max(end - p, 0)]]

    @property
    def acceptance_length(self) -> float | None:
        """Tokens emitted per speculative verify step (accepted drafts + 1), None before the first."""
        return acceptance_length(self.accepted_drafts, self.verifies)


def acceptance_length(accepted_drafts: int, verifies: int) -> float | None:
    """Tokens emitted per verify step: the accepted drafts and one more each; None without one."""
    return (accepted_drafts + verifies) / verifies if verifies else None


@dataclass
class _Inflight:
    """A decode step whose sampled tokens are still on the device (``Engine(overlap=...)``): its
    requests in sampler-row order, the sample, the sampler's parameters and generated counts
    (after this token) as they were, and the tokens' copy to pinned host memory with its event."""

    reqs: list[Request]
    result: object  # SampleResult
    params: list[SamplingParams]
    generated: list[int]
    chained: bool = False  # launched by _chain (with the previous step's tokens)
    launched: float = 0.0  # time.perf_counter() when its step was launched
    host: torch.Tensor | None = None
    event: object = None

    @classmethod
    def start(cls, reqs, result, params, generated, chained: bool = False, launched: float | None = None) -> _Inflight:
        out = cls(reqs, result, params, generated, chained, time.perf_counter() if launched is None else launched)
        tokens = result.tokens
        if tokens.device.type == "cuda":  # copied as soon as sampled; read without waiting for later steps
            stream = torch.cuda.current_stream(tokens.device)
            out.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                out.host.copy_(tokens, non_blocking=True)
            out.event = torch.cuda.Event()
            out.event.record(stream)
        return out

    def tokens(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
            return self.host.tolist()
        return self.result.tokens.tolist()


class Engine:
    """Continuous batching (see the module docstring) over ``source``: an artifact path (loaded on
    ``device``), a ``CompiledModel`` or a ``StepRunner``. ``pages`` / ``state_budget``: the pools'
    sizes (``CompiledStepRunner``).

    ``max_running``: requests in the batch at once (at most the slots). ``max_step_tokens``: tokens
    per step (at least ``max_running``, so every decode fits). ``max_chunk``: tokens one request adds
    in one step (at most the layout's ``max_chunk``, less the prefix cache's window history).
    ``prefix_cache``: reuse the state of earlier requests' shared prefixes (``ds4c.runtime.prefix_cache``;
    the runner must be able to copy pages); ``prefix_granule``: tokens between its nodes."""

    def __init__(self, source, *, device: str | torch.device = "cpu", max_running: int | None = None,
                 max_step_tokens: int | None = None, max_chunk: int | None = None, seed: int | None = None,
                 pages: dict[str, int] | None = None, state_budget: int | None = None, prefix_cache: bool = False,
                 prefix_granule: int | None = None, speculative: int = 0, overlap: bool | None = None):
        runner = source
        self.rank = 0  # of a sharded artifact: rank 0 schedules, the others follow (``follow``)
        self._closed = False
        self._inflight = None
        if isinstance(source, str | os.PathLike):
            from ds4c.runtime.model import load  # at call time: model's generate builds on this module

            source = load(source, device=device)
        if isinstance(source, Artifact):  # ds4c.compile's result, not loaded
            raise InputError("Engine(source): an in-memory Artifact (what ds4c.compile returns) is not loaded; save it "
                             "and pass the path, Engine(art.save('model.ds4')), or a loaded model, "
                             "Engine(ds4c.load(path, device=...))")
        planned = False
        if hasattr(source, "manifest"):  # a CompiledModel
            runner = CompiledStepRunner(source, pages=pages, state_budget=state_budget, max_running=max_running,
                                        max_step_tokens=max_step_tokens)
            max_running = max_running or min(runner.max_running, runner.pools.slots.capacity)
            planned = pages is None  # pool sizes from the plan (or a budget): this engine may add to them
            if "mesh" in source.manifest:  # every rank runs rank 0's steps (ds4c.runtime.ranks)
                from ds4c.runtime.ranks import LeaderStepRunner, control_group

                self.rank = int(source.manifest.get("rank", 0))
                self._group = control_group()
                if self.rank:
                    self.runner = runner  # driven by rank 0's calls in follow(); nothing scheduled here
                    return
                runner = LeaderStepRunner(runner, self._group)
        elif not all(hasattr(source, a) for a in ("run", "pools", "layout", "rates", "vocab_size")):
            raise InputError(f"Engine({type(source).__name__}): give an artifact path, a CompiledModel (ds4c.load) "
                             "or a step runner")
        self.runner = runner
        self.layout = runner.layout
        self.pools = runner.pools
        slots = self.pools.slots.capacity
        self.max_running = slots if max_running is None else max_running
        self._cache = None
        if prefix_cache:
            if not hasattr(runner, "copy_pages"):
                raise InputError(f"Engine(prefix_cache=True): the step runner {type(runner).__name__} cannot copy "
                                 "pages (copy_pages)")
            try:
                self._cache = PrefixCache(self.layout, self.pools, runner.rates, prefix_granule)
            except ValueError as e:
                raise InputError(f"Engine(prefix_granule={prefix_granule}): {e}") from None
            if planned and self._cache.history:
                # each running request keeps `history` window positions more than the plan counted
                extra = math.ceil(self._cache.history / self.layout.window_page) + 1
                runner.add_window_pages(self.max_running * extra)
        history = self._cache.history if self._cache else 0
        chunk_room = self.layout.max_chunk - history  # a chunk and the kept history share the window ring
        if chunk_room < 1:
            raise InputError(f"Engine(prefix_cache=True): the layout's max_chunk {self.layout.max_chunk} leaves no room "
                             f"next to the cache's {history} positions of window history; compile with a larger "
                             "--serving-opt max_chunk")
        self.max_chunk = chunk_room if max_chunk is None else max_chunk
        self.max_step_tokens = (max(self.max_running, self.max_chunk) if max_step_tokens is None
                                else max_step_tokens)
        if not 1 <= self.max_running <= slots:
            raise InputError(f"Engine(max_running={self.max_running}): must be in [1, {slots}] (the slots of the pools)")
        if not 1 <= self.max_chunk <= chunk_room:
            raise InputError(f"Engine(max_chunk={self.max_chunk}): must be in [1, {chunk_room}] (the layout's "
                             f"max_chunk, which sizes the window tables{', less the prefix cache history' * bool(history)})")
        if self.pools.window.capacity < self.layout.window_slots:
            raise InputError(f"Engine: the window pool has {self.pools.window.capacity} pages, one request needs up to "
                             f"{self.layout.window_slots}; allocate more window pages")
        if self.max_step_tokens < self.max_running:
            raise InputError(f"Engine(max_step_tokens={self.max_step_tokens}) is below max_running="
                             f"{self.max_running}: every running request must be able to decode in each step")
        self.vocab_size = runner.vocab_size
        self.speculative = self._check_speculative(speculative, runner)
        # plan and launch the next decode step before reading this one's tokens (module docstring);
        # default: where the runner's device runs ahead of the host (CUDA)
        can_overlap = getattr(runner, "accepts_device_tokens", False)
        if overlap and not can_overlap:
            raise InputError(f"Engine(overlap=True): the step runner {type(runner).__name__} cannot take the "
                             "previous step's tokens on the device")
        self.overlap = can_overlap and (overlap if overlap is not None
                                        else torch.device(getattr(runner, "device", "cpu")).type == "cuda")
        # sampling runs where the logits are: the runner's device (a step runner without one is on the host)
        self._sampler = SamplerState(self.vocab_size, getattr(runner, "device", "cpu"), seed=seed)
        self._sampling: list[Request] = []  # the sampler's rows: the running requests that decode
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # in age order (oldest first)
        self._ids = itertools.count()
        self._lock = threading.RLock()  # one step at a time; submit/cancel between steps
        self._progress = threading.Condition(self._lock)  # notified after every step and submit
        self._loop: threading.Thread | None = None
        self._stopping = False
        self._stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "preemptions": 0, "finished": 0,
                       "prefix_query_tokens": 0, "prefix_hit_tokens": 0, "decode_steps": 0, "decode_only_tokens": 0,
                       "verifies": 0,
                       "accepted_drafts": 0, "overlapped_steps": 0}
        self._busy = {"mixed": 0.0, "decode": 0.0}  # seconds in steps with prompt chunks / decodes only
        self._busy_mark = 0.0  # when the time counted in _busy last ended
        if hasattr(runner, "warm_up"):  # step graphs captured now, not by the first request
            runner.warm_up(self.max_running, self.max_step_tokens)

    def _check_speculative(self, k: int, runner) -> int:
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise InputError(f"Engine(speculative={k!r}): give the number of MTP drafts per step, an integer >= 0")
        if not k:
            return 0
        if not (getattr(runner, "mtp", False) and hasattr(runner, "run_mtp_rows")):
            raise InputError(f"Engine(speculative={k}): this model has no compiled MTP block; compile it with "
                             f"`ds4c compile ... --serving --speculative {k}` (its config needs num_nextn_predict_layers=1)")
        if k > self.layout.draft_tokens:
            raise InputError(f"Engine(speculative={k}): the artifact was compiled for at most {self.layout.draft_tokens} "
                             f"drafts per step (its compressor rings hold that many rows more); recompile with "
                             f"--speculative {k}")
        if k + 1 > self.max_chunk:
            raise InputError(f"Engine(speculative={k}): a verify of {k + 1} tokens exceeds max_chunk={self.max_chunk}")
        return k

    # -- requests ---------------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
               on_progress: Callable[[Request], None] | None = None) -> Request:
        """Queue a request; it joins the batch at the next step. Bad input raises InputError for
        this request only (nothing is queued). ``on_progress(request)`` is called from the stepping
        thread whenever the request gets a token or finishes (e.g. to wake an asyncio consumer with
        ``loop.call_soon_threadsafe``); it must be quick and must not call back into the engine."""
        if self.rank:
            raise InputError(f"Engine.submit on rank {self.rank}: rank 0 of a sharded artifact takes the requests; "
                             "this rank runs its steps in engine.follow()")
        if self._closed:
            raise InputError("Engine.submit: this engine is closed (Engine.close); make a new one")
        params = SamplingParams(max_new_tokens=16) if params is None else params
        if not isinstance(params, SamplingParams):
            raise InputError(f"Engine.submit: params must be a SamplingParams, got {type(params).__name__}")
        try:
            prompt = tuple(int(t) for t in prompt_ids)
        except (TypeError, ValueError) as e:
            raise InputError(f"Engine.submit: prompt_ids must be a sequence of token ids ({e})") from None
        if not prompt:
            raise InputError("Engine.submit: the prompt is empty; pass at least one token id")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise InputError(f"Engine.submit: prompt token ids {bad[:5]} are outside [0, {self.vocab_size})")
        params.validate(self.vocab_size)
        total = len(prompt) + params.max_new_tokens
        if total > self.layout.max_context:
            raise InputError(f"Engine.submit: prompt of {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} "
                             f"= {total} exceeds max_context={self.layout.max_context}; shorten one of them")
        need = math.ceil(total / self.layout.comp_page)
        if need > self.pools.compressed.capacity:
            raise InputError(f"Engine.submit: {total} positions need {need} compressed pages, the pool has "
                             f"{self.pools.compressed.capacity}; give the engine more memory or shorten the request")
        with self._lock:
            req = Request(next(self._ids), prompt, params, _engine=weakref.ref(self), _on_progress=on_progress)
            self._waiting.append(req)
            self._progress.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Stop ``req`` at the next step boundary (its pages are freed then); a finished request is left as is."""
        with self._lock:
            if req.finished:
                return
            if req.status == "waiting":
                self._waiting.remove(req)
                self._finish(req, "cancelled")
                self._progress.notify_all()
            else:
                req._cancel = True

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._running

    def run_until_idle(self, max_steps: int | None = None) -> None:
        steps = 0
        while not self.idle:
            self.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                raise RuntimeError(f"Engine.run_until_idle: not idle after {max_steps} steps")

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[list[int]]:
        """Submit every prompt, run until idle, return each request's output ids."""
        many = params if isinstance(params, Sequence) else [params] * len(prompts)
        reqs = [self.submit(p, sp) for p, sp in zip(prompts, many, strict=True)]
        self.run_until_idle()
        return [r.output_ids for r in reqs]

    def stats(self) -> dict:
        """Requests running and waiting, pages per pool, counters, and tokens per second of the
        engine's busy time: prompt tokens over steps that held prompt chunks, decode tokens over
        decode-only steps (each step timed up to its tokens on the host)."""
        busy = self._busy

        def rate(tokens: int, seconds: float) -> float | None:
            return tokens / seconds if seconds > 0 else None

        cache = None
        if self._cache is not None:
            query, hit = self._stats["prefix_query_tokens"], self._stats["prefix_hit_tokens"]
            cache = {**self._cache.stats(), "query_tokens": query, "hit_tokens": hit,
                     "hit_rate": hit / query if query else None}
        return {"running": len(self._running), "waiting": len(self._waiting), "pages": self.pools.stats(),
                "prefix_cache": cache, "decode_graphs": sorted(getattr(self.runner, "decode_graphs", ())),
                "step_graphs": sorted(getattr(self.runner, "step_graphs", ())),
                "graph_errors": dict(getattr(self.runner, "graph_errors", {})),
                **self._stats, "speculative": self.speculative,
                "acceptance_length": acceptance_length(self._stats["accepted_drafts"], self._stats["verifies"]),
                "busy_s": busy["mixed"] + busy["decode"], "decode_busy_s": busy["decode"],
                "prefill_tokens_per_s": rate(self._stats["prefill_tokens"], busy["mixed"]),
                "decode_tokens_per_s": rate(self._stats["decode_only_tokens"], busy["decode"])}

    # -- one step ---------------------------------------------------------------------------------

    # -- background loop -----------------------------------------------------------------------

    def start(self) -> None:
        """Step in a background thread whenever there is work (``stop`` ends it). Submitting,
        cancelling and iterating requests stay safe from other threads."""
        with self._lock:
            if self._loop is not None:
                return
            self._stopping = False
            self._loop = threading.Thread(target=self._run_loop, name="ds4c-engine", daemon=True)
            self._loop.start()

    def follow(self) -> int:
        """Ranks 1.. of a sharded artifact: run rank 0's steps until rank 0's engine ``close``s (or its
        process ends); the number of steps run. A rank 0 that dies ends this with RankFailure."""
        if not self.rank:
            raise InputError("Engine.follow: this engine schedules (rank 0, or an unsharded artifact): submit requests")
        from ds4c.runtime.ranks import follow

        return follow(self.runner, self._group)

    def close(self) -> None:
        """Stop the background loop, give the pools and CUDA graphs back to the device allocator
        (a benchmark's next engine can take its own), and on rank 0 of a sharded artifact release
        the other ranks from ``follow`` (also done at exit). The engine takes no more steps."""
        if self.rank:
            return
        self.stop()
        with self._lock:
            if self._inflight is not None:
                inflight, self._inflight = self._inflight, None
                self._finalize(inflight)
        if hasattr(self.runner, "stop"):
            self.runner.stop()
        for req in list(self._running) + list(self._waiting):
            req.error = "the engine was closed"
            if req in self._running:
                self._retire(req, "error")
            else:
                self._finish(req, "error")
        self._waiting.clear()
        if hasattr(self.runner, "release"):
            self.runner.release()
        self._closed = True

    def stop(self, timeout: float | None = None) -> None:
        """End the background loop after its current step (requests stay where they are)."""
        with self._lock:
            loop, self._stopping = self._loop, True
            self._progress.notify_all()
        if loop is not None:
            loop.join(timeout)
        with self._lock:
            self._loop = None

    def _run_loop(self) -> None:
        while True:
            with self._lock:
                while self.idle and not self._stopping:
                    self._progress.wait()
                if self._stopping:
                    return
                try:
                    self.step()
                except Exception:  # noqa: BLE001 - the step's requests carry the error; the others go on
                    continue

    def _advance(self, wait: bool = False) -> None:
        """Make progress for a waiting consumer: one step here, or (with a background loop) wait
        for the loop's next step."""
        with self._lock:
            if self._loop is not None:
                if wait:
                    self._progress.wait(timeout=1.0)
            elif not self.idle:
                self.step()

    def step(self) -> list[Request]:
        """Plan, run and sample one step; returns the requests that got a token in it. A failure
        of the model itself (not of a request: those are refused at ``submit``) finishes every
        request of the step with finish reason "error" and the message in ``request.error``, frees
        their pages and is raised; the engine goes on with the others."""
        with self._lock:
            try:
                return self._step()
            finally:
                self._progress.notify_all()

    def _step(self) -> list[Request]:
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            try:
                chained = self._chain(inflight)  # the next decode step is queued behind this one, or None
            except Exception as e:  # its tokens still count; then the step failed as any step fails
                self._finalize(inflight)
                for req in inflight.reqs:
                    if req.status == "running":
                        req.error = f"{type(e).__name__}: {e}"
                        self._retire(req, "error")
                raise
            done = self._finalize(inflight)
            if chained is not None:
                self._inflight = chained
                return done
            return done + self._plan_and_run()
        return self._plan_and_run()

    def _plan_and_run(self) -> list[Request]:
        for req in [r for r in self._running if r._cancel]:
            self._retire(req, "cancelled")
        plan: dict[Request, Chunk] = {}
        budget = [self.max_step_tokens]
        preemptions_before = self._stats["preemptions"]

        def take(req: Request, n: int, room_by_preempting: str, drafts: Sequence[int] = ()) -> bool:
            end = req._computed + n
            # pages taken for last step's drafts: the window pages to keep count from where this chunk starts
            req._pages.rewind(min(req._pages.end, req._computed))
            if drafts and not req._pages.grow(end + len(drafts)):  # drafts never take pages from others
                drafts = ()
            while not drafts and not req._pages.grow(end):
                if self._cache is not None and self._cache.evict():
                    continue
                if room_by_preempting == "none":
                    return False
                victim = self._running[-1]
                if victim is req and room_by_preempting != "self":
                    return False
                if victim in plan:
                    budget[0] += len(plan.pop(victim).token_ids)
                self._preempt(victim)
                if victim is req:
                    return False
            last = end == req.n_tokens
            plan[req] = Chunk(req._pages, [*req.token_slice(req._computed, end), *drafts], req._computed,
                              "all" if drafts else "last" if last else "none", emit_from=req._emit_from)
            budget[0] -= n + len(drafts)
            return True

        decoding = [r for r in self._running if r.n_tokens - r._computed == 1]
        for i, req in enumerate(decoding):  # decodes (a speculative one verifies its drafts), oldest first
            if req.status == "running":
                room = budget[0] - (len(decoding) - i)  # every later decode keeps its one token
                take(req, 1, "self", req._drafts[:max(0, room)])
        for req in [r for r in self._running if r.n_tokens - r._computed > 1]:  # prompts being prefilled
            n = min(req.n_tokens - req._computed, budget[0], self.max_chunk)
            if req.status == "running" and n > 0 and not take(req, n, "younger"):
                break
        preempted = self._stats["preemptions"] > preemptions_before
        while self._waiting and len(self._running) < self.max_running and not preempted:
            req = self._waiting[0]
            if budget[0] <= 0:
                break
            req._pages = RequestPages(self.layout, self.pools, self._cache.history if self._cache else 0)
            if self._cache is not None:
                while (hit := self._cache.match(req.tokens)) is not None:
                    if self._cache.seed(hit, req._pages, self.runner.copy_pages):
                        req._computed, req._emit_from = hit.start, hit.position
                        break
                    if not self._cache.evict():  # no room for the pages a hit copies: make some, look again
                        break
            n = min(req.n_tokens - req._computed, budget[0], self.max_chunk)
            while (not self._admissible(req, req._computed + n) and self._cache is not None
                   and self._cache.evict()):
                pass
            if not self._admissible(req, req._computed + n) or not take(req, n, "none"):
                req._pages.release()
                req._pages = None
                req._computed = req._emit_from = 0
                break
            req.cached_tokens = req._computed
            self._stats["prefix_query_tokens"] += req.n_tokens
            self._stats["prefix_hit_tokens"] += req._computed
            self._waiting.popleft()
            req.status = "running"
            self._running.append(req)
            self._running.sort(key=lambda r: r.id)
        if not plan:
            return []
        try:
            return self._run(plan)
        except Exception as e:
            for req in list(plan):
                if req.status == "running":
                    req.error = f"{type(e).__name__}: {e}"
                    self._retire(req, "error")
            raise

    WATERMARK = 0.01  # share of a pool kept free when admitting (vLLM's default): room for the running to grow

    def _admissible(self, req: Request, end: int) -> bool:
        """Admit a new request only if its first chunk (to position ``end``) leaves ``WATERMARK`` of
        each pool free."""
        window, comp, slot = req._pages.pages_needed(end)

        def keep(pool) -> int:
            return math.ceil(self.WATERMARK * pool.capacity) if self._running else 0

        return (self.pools.compressed.free_count - comp >= keep(self.pools.compressed)
                and self.pools.window.free_count - window >= keep(self.pools.window)
                and self.pools.slots.free_count >= slot)

    def _run(self, plan: dict[Request, Chunk]) -> list[Request]:
        started = time.perf_counter()
        decoded = self._stats["decode_tokens"]
        try:
            return self._run_timed(plan)
        finally:
            decode_only = all((len(c.token_ids) == 1 or c.logits == "all") and r.output_ids for r, c in plan.items())
            self._busy_mark = time.perf_counter()
            self._busy["decode" if decode_only else "mixed"] += self._busy_mark - started
            self._stats["decode_steps"] += decode_only
            if decode_only:  # the tokens of decode-only steps (decode_tokens counts those of mixed steps too)
                self._stats["decode_only_tokens"] += self._stats["decode_tokens"] - decoded

    def _run_timed(self, plan: dict[Request, Chunk]) -> list[Request]:
        reqs = list(plan)
        # With speculation every request takes its tokens from the verify rules (ds4c.runtime.speculative);
        # without, from the sampler, whose rows follow the logits' rows: the plan's order of the
        # chunks that end their request's known tokens (requests joining the sampler, e.g. at the end
        # of a recompute, may sit anywhere in it).
        spec = [r for r in reqs if self.speculative and plan[r].logits != "none"]
        rows = [r for r in reqs if plan[r].logits == "last" and r not in spec]
        at = {id(r): i for i, r in enumerate(self._sampling)}  # (identity: a list's `in` is O(batch) per request)
        for r in rows:
            if id(r) not in at:
                at[id(r)] = self._sampler.add(r.params, r.prompt_ids, r.output_ids)
                self._sampling.append(r)
        self._sampler.select([at[id(r)] for r in rows])
        self._sampling = rows
        batch = build_step([plan[r] for r in reqs], self.runner.rates)
        logits = self.runner.run(batch)
        logit_at: dict[Request, tuple[int, int]] = {}  # a chunk's first logits row and their count
        row_at: dict[Request, int] = {}  # a chunk's first packed row
        at = row = 0
        for r in reqs:
            c = plan[r]
            n_logits = len(c.token_ids) if c.logits == "all" else int(c.logits == "last")
            logit_at[r], row_at[r] = (at, n_logits), row
            at, row = at + n_logits, row + len(c.token_ids)
        for r in reqs:
            if r in spec:
                continue  # advanced by what it accepts (_verify)
            n = len(plan[r].token_ids)
            before = r._computed
            r._computed += n
            if self._cache is not None and self._cache.crosses(before, r._computed):  # while their pages are live
                self._cache.insert(r.tokens, r._pages, before, r._computed)
            self._stats["decode_tokens" if n == 1 and r.output_ids else "prefill_tokens"] += n
        self._stats["steps"] += 1
        sampled: list[Request] = []
        if self._sampling:
            picked = logits
            if spec:
                index = torch.tensor([logit_at[r][0] for r in self._sampling], device=logits.device)
                picked = logits.index_select(0, index)
            # a step of decodes only (every request of the batch, none asking for logprobs) leaves its
            # tokens on the device: the next step may be launched before they are read
            defer = (self.overlap and not spec and len(self._sampling) == len(reqs)
                     and all(len(plan[r].token_ids) == 1 and r.output_ids for r in reqs)
                     and all(r.params.logprobs is None for r in reqs))
            sampled = self._sample(picked, defer=defer)
        # greedy requests' picks: one argmax and one read for the whole step, not one per request
        plain_greedy = [r for r in spec if r.params.greedy and not r.params.penalised]
        picks = logits.argmax(dim=-1).tolist() if plain_greedy else []
        for r in spec:
            at, n = logit_at[r]
            self._verify(r, plan[r], logits[at:at + n], picks[at:at + n] if r in plain_greedy else None)
        sampled += spec
        if self.speculative:
            drafting = [r for r in reqs if r.status == "running"]
            if drafting:
                self._draft(drafting, plan, row_at)
        return sampled

    def _sample(self, logits: torch.Tensor, defer: bool = False) -> list[Request]:
        """Sample the sampler's rows from ``logits`` (one row each); append, retire, notify. With
        ``defer`` the tokens stay on the device (``_inflight``): the next step reads them."""
        if defer:
            self._inflight = self._sample_in_flight(logits)
            return []
        result = sample(logits, self._sampler)
        tokens = result.tokens.tolist()
        reasons = finish_reasons(tokens, self._sampler.params, self._sampler.generated)
        top = None
        if result.logprobs is not None:
            top = (result.logprobs.tolist(), result.top_token_ids.tolist(), result.top_logprobs.tolist())
        sampled = list(self._sampling)
        for i, (r, tok, why) in enumerate(zip(sampled, tokens, reasons, strict=True)):
            r.output_ids.append(tok)
            if top is not None and r.params.logprobs is not None:
                k = r.params.logprobs
                r.logprobs.append((top[0][i], list(zip(top[1][i][:k], top[2][i][:k], strict=True))))
            if why is not None:
                self._retire(r, why)
            else:
                r._notify()
        return sampled

    # -- overlap: the next decode step launched before this one's tokens are read ----------------

    def _chain(self, inflight: _Inflight) -> _Inflight | None:
        """Launch the decode step after ``inflight`` with its tokens as they are on the device, when
        nothing needs the host to decide first: every running request decodes in it, none is
        waiting, cancelled or at its last token by length, and each can grow a page-free position.
        The new step's sampler rows are ``inflight``'s (same requests, same order). None when it
        cannot; the caller then finalizes and plans as usual."""
        reqs = inflight.reqs
        if (self._waiting or len(reqs) != len(self._running) or set(reqs) != set(self._running)
                or any(r._cancel or r.status != "running" for r in reqs)
                or any(g >= r.params.max_new_tokens for r, g in zip(reqs, inflight.generated, strict=True))
                or self._sampling != reqs):
            return None
        if not all(r._pages.grow(r._computed + 1) for r in reqs):  # pages taken stay for the next step
            return None
        started = time.perf_counter()
        chunks = [Chunk(r._pages, [0], r._computed, "last", emit_from=r._emit_from) for r in reqs]
        batch = build_step(chunks, self.runner.rates)
        logits = self.runner.run(batch, input_ids=inflight.result.tokens)
        for r in reqs:
            r._computed += 1
            if self._cache is not None and self._cache.crosses(r._computed - 1, r._computed):
                # the chunk's token is the one in flight: insert once it is known (_finalize)
                r._pending_insert = True
        self._stats["decode_tokens"] += len(reqs)
        self._stats["decode_only_tokens"] += len(reqs)
        self._stats["steps"] += 1
        self._stats["decode_steps"] += 1
        self._stats["overlapped_steps"] += 1
        return self._sample_in_flight(logits, chained=True, launched=started)

    def _sample_in_flight(self, logits: torch.Tensor, chained: bool = False, launched: float | None = None) -> _Inflight:
        """Sample the sampler's rows, leaving the tokens on the device (``_Inflight``), with the
        parameters and counts (this token included) that ``_finalize`` checks them against."""
        params, generated = list(self._sampler.params), [g + 1 for g in self._sampler.generated]
        return _Inflight.start(list(self._sampling), sample(logits, self._sampler), params, generated, chained, launched)

    def _finalize(self, inflight: _Inflight) -> list[Request]:
        """Read ``inflight``'s tokens (waiting for that step only) and give them to their requests:
        append, finish by stop token or length, notify. Requests that left since (cancelled,
        finished, preempted) are skipped."""
        tokens = inflight.tokens()
        # decode time: the wall time until its tokens were read, less what was counted already (steps
        # overlap: a chained step runs while the host finalizes the one before)
        now = time.perf_counter()
        self._busy["decode"] += max(0.0, now - max(inflight.launched, self._busy_mark))
        self._busy_mark = now
        reasons = finish_reasons(tokens, inflight.params, inflight.generated)
        out = []
        for r, tok, why in zip(inflight.reqs, tokens, reasons, strict=True):
            if r.status != "running" or r.finished:
                if inflight.chained:  # its row was computed for nothing: not a decoded token
                    self._stats["decode_tokens"] -= 1
                continue
            r.output_ids.append(tok)
            if self._cache is not None and r._pending_insert:
                r._pending_insert = False
                self._cache.insert(r.tokens, r._pages, r._computed - 1, r._computed)
            out.append(r)
            if why is not None:
                self._retire(r, why)
            else:
                r._notify()
        return out

    # -- speculative decoding (docs/design/mtp.md) --------------------------------------------------

    def _random(self, req: Request, salt: int) -> torch.Generator | None:
        """The request's random stream for this step's draws (None for greedy: nothing is drawn)."""
        if req.params.greedy:
            return None
        if req._seed is None:
            req._seed = (req.params.seed if req.params.seed is not None
                         else int(torch.randint(0, 2**62, (), generator=self._sampler._generator)))
        device = getattr(self.runner, "device", torch.device("cpu"))
        return generator_for(req._seed * 2 + salt, len(req.output_ids), torch.device(device))

    def _verify(self, req: Request, chunk: Chunk, target: torch.Tensor, picks: list[int] | None = None) -> None:
        """Accept ``req``'s drafts against the main model's ``target`` logits (a chunk ending its
        known tokens: a verify of drafts, or a prompt's last chunk with none), emit the tokens,
        and keep the state of the accepted positions only. ``picks``: the target's argmax per row,
        read already (greedy requests)."""
        drafts = list(chunk.token_ids[1:]) if chunk.logits == "all" else []
        penalties = penalty_context(req.params, list(req.prompt_ids), req.output_ids, drafts, self.vocab_size,
                                    target.device)
        if picks is not None:
            tokens, accepted = accept_greedy(drafts, picks)
        else:
            tokens, accepted = accept(target, drafts, req._draft_q[:len(drafts)], req.params, self._random(req, 0),
                                      penalties)
        if req.params.logprobs is not None:  # each emitted token's, from its row's distribution
            table = processed_logits(target[:len(tokens)], req.params,
                                     None if penalties is None else tuple(t[:len(tokens)] for t in penalties))
            table = table.log_softmax(dim=-1)
            n = min(req.params.logprobs, self.vocab_size)
            chosen = table.gather(1, torch.tensor(tokens, device=table.device)[:, None])[:, 0].tolist()
            top_lp, top_ids = table.topk(n, dim=-1) if n else (table[:, :0], table[:, :0].long())
            top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
        kept = len(chunk.token_ids) - len(drafts) + accepted  # positions whose state stays
        req._computed = chunk.start + kept
        req._pages.rewind(req._computed)
        if self._cache is not None and self._cache.crosses(chunk.start, req._computed):
            # the boundaries the kept positions crossed, while their pages are live
            self._cache.insert(req.tokens + tokens[:accepted], req._pages, chunk.start, req._computed)
        req._drafts, req._draft_q = [], []
        self._stats["decode_tokens" if req.output_ids else "prefill_tokens"] += kept
        if drafts:
            req.verifies += 1
            req.accepted_drafts += accepted
            self._stats["verifies"] += 1
            self._stats["accepted_drafts"] += accepted
        p = req.params
        for i, tok in enumerate(tokens):
            req.output_ids.append(tok)
            if p.logprobs is not None:
                req.logprobs.append((chosen[i], list(zip(top_ids[i], top_lp[i], strict=True))))
            why = finish_reasons([tok], [p], [len(req.output_ids)])[0]
            if why is not None:
                self._retire(req, why)
                return
        req._notify()

    def _draft(self, reqs: list[Request], plan: dict[Request, Chunk], row_at: dict[Request, int]) -> None:
        """Run the MTP block over the positions this step kept (the main model's final streams there,
        and the tokens after them), then chain it for the drafts of the requests that decode next."""
        chunks, index, drafting = [], [], []
        for r in reqs:
            c = plan[r]
            kept = r._computed - c.start
            if kept < 1:
                continue
            wants = r.n_tokens - r._computed == 1
            chunks.append(Chunk(r._pages, r.token_slice(c.start + 1, r._computed + 1), c.start,
                                "last" if wants else "none"))
            index.extend(range(row_at[r], row_at[r] + kept))
            if wants:
                drafting.append(r)
        if not chunks:
            return
        logits = self.runner.run_mtp_rows(build_step(chunks, self.runner.rates), torch.tensor(index, dtype=torch.long))
        # one random stream per request for this call's k draws (a fresh one per draw would repeat them)
        draws = {r: self._random(r, 1) for r in drafting}
        # drafts per request: k, fewer near max_new_tokens, none where no page is free for them
        depth = {}
        for r in drafting:
            want = min(self.speculative, r.params.max_new_tokens - len(r.output_ids) - 1)
            while want > 0 and not r._pages.grow(r._computed + want + 1):
                want -= 1
            depth[r] = want
        at = torch.arange(len(drafting))  # each drafting request's row of the runner's MTP streams
        for j in range(self.speculative):
            live = [i for i, r in enumerate(drafting) if depth[r] > j]
            if not live:
                return
            pick = torch.tensor(live, dtype=torch.long)
            if j:  # one more MTP row each: at the previous draft's position, reading it
                chunks = [Chunk(drafting[i]._pages, [drafting[i]._drafts[-1]], drafting[i]._computed + j - 1, "last")
                          for i in live]
                logits = self.runner.run_mtp_rows(build_step(chunks, self.runner.rates), at[pick], chained=True)
                at = torch.arange(len(live))
            else:
                logits, at = logits.index_select(0, pick.to(logits.device)), at[pick]
            drafting = [drafting[i] for i in live]
            argmax = logits.argmax(dim=-1).tolist() if any(r.params.greedy for r in drafting) else []
            for i, r in enumerate(drafting):
                if r.params.greedy:  # one read for the whole call
                    tok, q = argmax[i], None
                else:
                    tok, q = draft_token(logits[i], r.params, draws[r])
                r._drafts.append(tok)
                r._draft_q.append(q)

    # -- leaving the batch ------------------------------------------------------------------------

    def _release(self, req: Request) -> None:
        if req in self._sampling:
            self._sampler.remove([self._sampling.index(req)])
            self._sampling.remove(req)
        if req._pages is not None:
            req._pages.release()
            req._pages = None
        req._computed = req._emit_from = 0
        req._drafts, req._draft_q = [], []
        self._running.remove(req)

    def _retire(self, req: Request, reason: str) -> None:
        self._release(req)
        self._finish(req, reason)

    def _finish(self, req: Request, reason: str) -> None:
        req.status = "finished"
        req.finish_reason = reason
        self._stats["finished"] += 1
        req._notify()

    def _preempt(self, req: Request) -> None:
        """Free all of ``req``'s state; it waits at the front of the queue and recomputes its
        prompt and output later."""
        self._release(req)
        req.status = "waiting"
        req.preemptions += 1
        self._stats["preemptions"] += 1
        self._waiting.appendleft(req)
