"""Sampling for serving: a request's parameters, the batched sampler and the stop conditions (the engine's, under ds4c.runtime).

``SamplingParams`` is one request's choice, checked when it is made: a bad value raises
``InputError`` naming the field, the value and the allowed range, for that request only.
``SamplerState`` holds one row per running request, in batch order: the parameters as device
tensors, the tokens each request has seen (for the penalties) and how many it has generated. The
engine ``add``s a row when a request joins and ``select``s (or ``remove``s) rows when requests
leave. ``sample(logits, state)`` picks one token per row on the logits' device, reading nothing
back to the host, and advances every row by one step. ``finish_reasons`` says which requests are
done and why.

The order of processing is vLLM's: penalties (repetition, then frequency and presence),
temperature, min-p, then top-k and top-p. A greedy row (temperature 0) takes exactly the argmax of
its penalised logits. A sampled row takes argmax(processed logits + Gumbel noise), which is a draw
from the softmax of the processed logits (the Gumbel-max race: no softmax, no cumsum, no sync).

Randomness is counter-based and per request: the noise of request r at its step t for token v is a
hash of (seed of r, t, v). A request with a seed therefore gives the same tokens alone or in any
batch, at any row, on CPU or GPU, and after a preemption that adds it again with its output so far
(``add(..., output_ids=...)``). A request without a seed gets one from the state's own generator
when it joins (``SamplerState(seed=...)`` makes those reproducible too); ``state.seeds`` tells it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Literal

import torch
from torch import Tensor

from ds4c.errors import InputError

MAX_LOGPROBS = 20  # OpenAI's top_logprobs bound
MAX_ABS_FREQUENCY_PENALTY = 2.0  # OpenAI's range for frequency and presence penalties: [-2, 2]
GREEDY_BELOW = 1e-5  # a smaller temperature is greedy: logits / T would overflow fp32
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens, and when it stops.

    max_new_tokens: tokens to generate at most (finish reason "length").
    temperature: 0 is greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens; 0 or -1 keeps all.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p; 1 keeps all.
    min_p: drop tokens less likely than min_p times the most likely one; 0 keeps all.
    repetition_penalty: HF/vLLM semantics: a token seen in the prompt or the output has its logit
        divided by it when positive, multiplied by it when negative; 1 is off.
    frequency_penalty, presence_penalty: OpenAI semantics, over the output tokens: the logit is
        lowered by frequency_penalty x (times generated) and presence_penalty x (generated at all).
    seed: same seed, same prompt, same logits -> same tokens, whatever else is in the batch.
    stop_token_ids: generating one of these finishes the request (finish reason "stop").
    logprobs: None for none; n in [0, 20] for the chosen token's logprob and the n most likely
        tokens with theirs (logprobs of the distribution the token was drawn from).
    """

    max_new_tokens: int
    _: KW_ONLY
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop_token_ids, Iterable) and not isinstance(self.stop_token_ids, str | bytes):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._check("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1")
        self._check("temperature", _is_finite(self.temperature) and self.temperature >= 0,
                    "a finite number >= 0 (0 is greedy)")
        self._check("top_k", _is_int(self.top_k) and self.top_k >= -1, "an integer >= 1, or 0 or -1 for all tokens")
        self._check("top_p", _is_finite(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]")
        self._check("min_p", _is_finite(self.min_p) and 0 <= self.min_p < 1, "a number in [0, 1)")
        self._check("repetition_penalty", _is_finite(self.repetition_penalty) and self.repetition_penalty > 0,
                    "a finite number > 0 (1 is no penalty)")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            self._check(name, _is_finite(value) and abs(value) <= MAX_ABS_FREQUENCY_PENALTY,
                        f"a number in [-{MAX_ABS_FREQUENCY_PENALTY:g}, {MAX_ABS_FREQUENCY_PENALTY:g}]")
        self._check("seed", self.seed is None or _is_int(self.seed), "an integer or None")
        self._check("stop_token_ids", isinstance(self.stop_token_ids, tuple)
                    and all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "a sequence of token ids >= 0")
        self._check("logprobs", self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
                    f"None, or an integer in [0, {MAX_LOGPROBS}] (the number of top tokens returned)")

    def validate(self, vocab_size: int) -> None:
        """The checks that need the model's vocabulary: stop token ids must be token ids."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise InputError(f"SamplingParams.stop_token_ids = {self.stop_token_ids!r}: {bad} not below the "
                             f"vocabulary size {vocab_size}; pass token ids in [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

    def _check(self, name: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise InputError(f"SamplingParams.{name} = {getattr(self, name)!r}: must be {allowed}")


@dataclass(frozen=True)
class SampleResult:
    """One step's picks for a batch of N rows, on the logits' device.

    tokens: [N] int64. logprobs: [N] fp32, the chosen tokens' (None when no row asked).
    top_token_ids, top_logprobs: [N, K], K the largest ``logprobs`` asked in the batch, most likely
    first; a row that asked for n < K reads the first n, a row that asked for none ignores them.
    """

    tokens: Tensor
    logprobs: Tensor | None = None
    top_token_ids: Tensor | None = None
    top_logprobs: Tensor | None = None


@dataclass(frozen=True)
class _RowTensors:
    """The rows' parameters as device tensors, and what the batch needs (host facts, no sync)."""

    greedy: Tensor  # [N] bool
    temperature: Tensor  # [N] fp32, 1 on greedy rows (so dividing is harmless)
    log_min_p: Tensor  # [N] fp32, -inf where min-p is off
    top_k: Tensor  # [N] int64, the vocabulary size where off
    top_p: Tensor  # [N] fp32
    repetition: Tensor  # [N] fp32
    frequency: Tensor  # [N] fp32
    presence: Tensor  # [N] fp32
    seed_low: Tensor  # [N] int64, the seed's low and high 32 bits
    seed_high: Tensor
    steps: Tensor  # [N] int64, tokens generated so far; advanced on the device
    row_index: Tensor  # [N] int64, arange
    any_greedy: bool
    any_sampled: bool
    any_min_p: bool
    any_top_k_or_p: bool
    max_logprobs: int | None


class SamplerState:
    """One row per running request, in batch order: parameters, seen tokens, step counts.

    ``params``, ``seeds`` (the seed each row draws from, given or assigned) and ``generated``
    (tokens generated so far) are host lists in row order: read them, change rows only through
    ``add``, ``select`` and ``remove``. While some row has a penalty the state keeps two [N, vocab]
    tables on the device (output token counts, int32, and tokens seen in prompt or output, bool);
    without one it keeps none.
    """

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu", *, seed: int | None = None):
        self.vocab_size = vocab_size
        self.device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as the logits say
        self.params: list[SamplingParams] = []
        self.seeds: list[int] = []
        self.generated: list[int] = []
        self._generator = torch.Generator()  # host side: draws the seeds of requests without one
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        self._counts: Tensor | None = None
        self._seen: Tensor | None = None
        self._rows: _RowTensors | None = None  # rebuilt after rows change

    def __len__(self) -> int:
        return len(self.params)

    def add(self, params: SamplingParams, prompt_ids: Sequence[int] = (), output_ids: Sequence[int] = ()) -> int:
        """Append a row for a request and return its index. ``output_ids``: tokens it generated
        before (a preempted request added again), so penalties and its random stream go on where
        they stopped. The prompt is read only when the request has a penalty."""
        params.validate(self.vocab_size)
        counts = seen = None
        if params.penalised:  # checked before the state changes: a refused request leaves no trace
            prompt, output = self._token_ids("prompt_ids", prompt_ids), self._token_ids("output_ids", output_ids)
            counts = torch.zeros(1, self.vocab_size, dtype=torch.int32, device=self.device)
            counts[0].index_add_(0, output, torch.ones_like(output, dtype=torch.int32))
            seen = torch.zeros(1, self.vocab_size, dtype=torch.bool, device=self.device)
            seen[0, prompt] = True
            seen[0, output] = True
            if self._counts is None:
                self._counts = torch.zeros(len(self), self.vocab_size, dtype=torch.int32, device=self.device)
                self._seen = torch.zeros(len(self), self.vocab_size, dtype=torch.bool, device=self.device)
        if self._counts is not None and self._seen is not None:
            zeros = torch.zeros(1, self.vocab_size, dtype=torch.int32, device=self.device)
            self._counts = torch.cat([self._counts, zeros if counts is None else counts])
            self._seen = torch.cat([self._seen, zeros.bool() if seen is None else seen])
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (), generator=self._generator))
        self.params.append(params)
        self.seeds.append(seed)
        self.generated.append(len(output_ids))
        self._rows = None
        return len(self) - 1

    def select(self, rows: Sequence[int]) -> None:
        """Keep these rows, in this order (the engine's new batch order); the others leave."""
        rows = list(rows)
        if rows == list(range(len(self))):
            return
        bad = [r for r in rows if not 0 <= r < len(self)]
        if bad or len(set(rows)) != len(rows):
            raise InputError(f"SamplerState.select({rows}): rows must be distinct and in [0, {len(self)})")
        self.params = [self.params[r] for r in rows]
        self.seeds = [self.seeds[r] for r in rows]
        self.generated = [self.generated[r] for r in rows]
        if not any(p.penalised for p in self.params):
            self._counts = self._seen = None
        elif self._counts is not None and self._seen is not None:
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            self._counts, self._seen = self._counts[index], self._seen[index]
        self._rows = None

    def remove(self, rows: Iterable[int]) -> None:
        """Drop these rows; the others keep their order."""
        gone = set(rows)
        self.select([r for r in range(len(self)) if r not in gone])

    def _token_ids(self, name: str, ids: Sequence[int]) -> Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()  # checked on the host: a bad index on a GPU is a device assert
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.vocab_size):
            raise InputError(f"SamplerState.add: {name} hold token ids outside [0, {self.vocab_size})")
        return ids.to(self.device)

    def _row_tensors(self) -> _RowTensors:
        if self._rows is None:
            self._rows = self._build_rows()
        return self._rows

    def _build_rows(self) -> _RowTensors:
        params, v = self.params, self.vocab_size

        def floats(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=self.device)

        def ints(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        seeds = [s % 2**64 for s in self.seeds]
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return _RowTensors(
            greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool, device=self.device),
            temperature=floats([1.0 if p.greedy else p.temperature for p in params]),
            log_min_p=floats([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params]),
            top_k=ints([min(p.top_k, v) if p.top_k > 0 else v for p in params]),
            top_p=floats([p.top_p for p in params]),
            repetition=floats([p.repetition_penalty for p in params]),
            frequency=floats([p.frequency_penalty for p in params]),
            presence=floats([p.presence_penalty for p in params]),
            seed_low=ints([s & _MASK32 for s in seeds]),
            seed_high=ints([s >> 32 for s in seeds]),
            steps=ints(self.generated),
            row_index=torch.arange(len(params), device=self.device),
            any_greedy=any(p.greedy for p in params),
            any_sampled=not all(p.greedy for p in params),
            any_min_p=any(p.min_p > 0 and not p.greedy for p in params),
            any_top_k_or_p=any((0 < p.top_k < v or p.top_p < 1) and not p.greedy for p in params),
            max_logprobs=min(max(logprobs), v) if logprobs else None,  # a tiny vocabulary has fewer
        )

    def _advance(self, tokens: Tensor) -> None:
        rows = self._row_tensors()
        rows.steps.add_(1)
        self.generated = [g + 1 for g in self.generated]
        if self._counts is not None and self._seen is not None:
            self._counts[rows.row_index, tokens] += 1
            self._seen[rows.row_index, tokens] = True


def sample(logits: Tensor, state: SamplerState) -> SampleResult:
    """One token per row of ``logits`` [N, vocab] (fp32 or bf16; row i is state row i), on their
    device, without a host sync; every row of ``state`` advances by one step."""
    n, v = len(state), state.vocab_size
    if tuple(logits.shape) != (n, v):
        raise InputError(f"sample: logits of shape {tuple(logits.shape)} for a state of {n} rows and vocabulary "
                         f"{v}: pass one row of logits per request, in the state's row order")
    if logits.device != state.device:
        raise InputError(f"sample: logits on {logits.device} for a sampler state on {state.device}: "
                         "make the state on the logits' device")
    rows = state._row_tensors()
    logits = logits.float()
    if state._counts is not None and state._seen is not None:
        logits = _apply_penalties(logits, state._counts, state._seen, rows)
    processed = logits
    if rows.any_sampled:
        scaled = logits / rows.temperature[:, None]
        if rows.any_min_p:  # p < min_p * p_max  <=>  logit < max logit + log(min_p)
            threshold = scaled.amax(dim=-1, keepdim=True) + rows.log_min_p[:, None]
            scaled = scaled.masked_fill(scaled < threshold, -math.inf)
        if rows.any_top_k_or_p:
            scaled = _apply_top_k_top_p(scaled, rows.top_k, rows.top_p)
        processed = torch.where(rows.greedy[:, None], logits, scaled) if rows.any_greedy else scaled
        noise = _gumbel_noise(rows.seed_low, rows.seed_high, rows.steps, v)
        sampled = (scaled + noise).argmax(dim=-1)
        tokens = torch.where(rows.greedy, logits.argmax(dim=-1), sampled) if rows.any_greedy else sampled
    else:
        tokens = logits.argmax(dim=-1)
    result = SampleResult(tokens)
    if rows.max_logprobs is not None:
        table = processed.log_softmax(dim=-1)
        top_logprobs, top_token_ids = table.topk(rows.max_logprobs, dim=-1)
        result = SampleResult(tokens, table.gather(-1, tokens[:, None]).squeeze(-1), top_token_ids, top_logprobs)
    state._advance(tokens)
    return result


def finish_reasons(tokens: Sequence[int], params: Sequence[SamplingParams],
                   generated: Sequence[int]) -> list[FinishReason | None]:
    """Per request: "stop" if its new token is one of its stop tokens, else "length" if it has
    generated ``max_new_tokens`` (``generated`` counts the new token), else None (it goes on)."""
    reasons: list[FinishReason | None] = []
    for token, p, count in zip(tokens, params, generated, strict=True):
        reasons.append("stop" if token in p.stop_token_ids else "length" if count >= p.max_new_tokens else None)
    return reasons


def _apply_penalties(logits: Tensor, counts: Tensor, seen: Tensor, rows: _RowTensors) -> Tensor:
    repetition = rows.repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    return logits - rows.frequency[:, None] * counts - rows.presence[:, None] * (counts > 0)


def _apply_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Mask to -inf all but each row's top_k tokens, then all but the smallest most-likely set
    whose renormalised probability reaches top_p (a token stays if the mass before it is < top_p).
    Ties keep the lower token id first, as argmax does."""
    ordered, order = logits.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    keep = rank[None, :] < top_k[:, None]
    probs = ordered.masked_fill(~keep, -math.inf).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1)
    drop = torch.empty_like(keep).scatter_(-1, order, ~keep)
    return logits.masked_fill(drop, -math.inf)


_MASK32 = 0xFFFFFFFF


def _multiply32(x: Tensor, factor: int) -> Tensor:
    """x * factor mod 2**32 for x in [0, 2**32) held in int64: the factor taken as a signed 32-bit
    number keeps the product inside int64."""
    return (x * (factor - 2**32 if factor >= 2**31 else factor)) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """lowbias32 (Chris Wellons, hash-prospector): a bijection of 32-bit values with low bias."""
    x = x ^ (x >> 16)
    x = _multiply32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _multiply32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _gumbel_noise(seed_low: Tensor, seed_high: Tensor, steps: Tensor, vocab_size: int) -> Tensor:
    """[N, vocab] fp32 Gumbel(0, 1) noise, a pure function of (seed, step, token id) per row."""
    row_key = _hash32(_hash32(_hash32(seed_low ^ 0x9E3779B9) ^ seed_high) ^ (steps & _MASK32))
    token_key = _hash32(torch.arange(vocab_size, device=steps.device) ^ 0x85EBCA6B)
    bits = _hash32(row_key[:, None] ^ token_key[None, :])
    uniform = ((bits >> 9).float() + 0.5) * 2.0**-23  # 23 bits: in (0, 1), 1 - 2**-24 at most, exact in fp32
    return -torch.log(-torch.log(uniform))


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
