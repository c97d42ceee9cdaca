"""The batched sampler: greedy, temperature, min-p, top-k, top-p, penalties, per-request seeds,
logprobs, bad parameters and stop conditions. CPU; the same code runs on the logits' device."""

from __future__ import annotations

import math

import pytest
import torch

from ds4c.errors import InputError
from ds4c.runtime.sampling import (
    MAX_LOGPROBS,
    SamplerState,
    SamplingParams,
    _hash32,
    finish_reasons,
    sample,
)

CHI_SQUARE_DF7_P001 = 24.32  # chi-square critical value, 7 degrees of freedom, p = 0.001


def batch(vocab_size: int, *params: SamplingParams, seed: int = 0) -> SamplerState:
    state = SamplerState(vocab_size, seed=seed)
    for p in params:
        state.add(p)
    return state


def request_logits(request: int, step: int, vocab_size: int) -> torch.Tensor:
    """The logits a model would give request ``request`` at its step ``step``: its own, whatever the batch."""
    return torch.randn(vocab_size, generator=torch.Generator().manual_seed(1000 * request + step)) * 3


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return float(((observed - expected) ** 2 / expected).sum())


# -- greedy and its limits ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(dtype):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    state = batch(50, *[SamplingParams(4) for _ in range(6)])
    assert torch.equal(sample(logits, state).tokens, logits.float().argmax(-1))


def test_low_temperature_is_argmax():
    """Logits 0.1 apart: at T = 1e-3 the gaps (100) dwarf the Gumbel noise (< 20); at T = 1 they do not."""
    vocab = 40
    logits = torch.stack([torch.randperm(vocab, generator=torch.Generator().manual_seed(r)).float() * 0.1
                          for r in range(32)])
    cold = batch(vocab, *[SamplingParams(4, temperature=1e-3, seed=r) for r in range(32)])
    warm = batch(vocab, *[SamplingParams(4, temperature=1.0, seed=r) for r in range(32)])
    for _ in range(3):
        assert torch.equal(sample(logits, cold).tokens, logits.argmax(-1))
    assert not torch.equal(sample(logits, warm).tokens, logits.argmax(-1))


def test_top_k_one_and_tiny_top_p_are_greedy():
    vocab = 64
    logits = torch.randn(16, vocab, generator=torch.Generator().manual_seed(1))
    top_k = batch(vocab, *[SamplingParams(4, temperature=1.5, top_k=1, seed=r) for r in range(16)])
    top_p = batch(vocab, *[SamplingParams(4, temperature=1.5, top_p=1e-6, seed=r) for r in range(16)])
    plain = batch(vocab, *[SamplingParams(4, temperature=1.5, seed=r) for r in range(16)])
    for _ in range(3):
        assert torch.equal(sample(logits, top_k).tokens, logits.argmax(-1))
        assert torch.equal(sample(logits, top_p).tokens, logits.argmax(-1))
    assert not torch.equal(sample(logits, plain).tokens, logits.argmax(-1))


# -- filters -----------------------------------------------------------------------------------

def test_min_p_keeps_tokens_at_least_min_p_of_the_most_likely():
    probs = torch.tensor([0.40, 0.25, 0.15, 0.09, 0.06, 0.03, 0.015, 0.005])
    logits = probs.log()[None].expand(400, -1).contiguous()
    state = batch(8, *[SamplingParams(4, temperature=1.0, min_p=0.2, logprobs=8) for _ in range(400)], seed=3)
    result = sample(logits, state)
    kept = {0, 1, 2, 3}  # p >= 0.2 * 0.40 = 0.08
    assert set(result.tokens.tolist()) == kept
    renormalised = probs[:4] / probs[:4].sum()
    top = result.top_logprobs[0]
    assert torch.allclose(top[:4], renormalised.log(), atol=1e-5)
    assert torch.isinf(top[4:]).all()


def test_top_k_and_top_p_keep_the_most_likely_set():
    probs = torch.tensor([0.40, 0.25, 0.15, 0.09, 0.06, 0.03, 0.015, 0.005])
    logits = probs.log()[None].expand(400, -1).contiguous()
    top_k = batch(8, *[SamplingParams(4, temperature=1.0, top_k=3) for _ in range(400)], seed=4)
    top_p = batch(8, *[SamplingParams(4, temperature=1.0, top_p=0.7) for _ in range(400)], seed=5)
    assert set(sample(logits, top_k).tokens.tolist()) == {0, 1, 2}
    assert set(sample(logits, top_p).tokens.tolist()) == {0, 1, 2}  # mass before token 2 is 0.65 < 0.7


# -- penalties ---------------------------------------------------------------------------------

def test_penalties_match_a_hand_computation():
    """Repetition over prompt and output (divide positive, multiply negative logits), then frequency
    and presence over the output only."""
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0, -2.0]])
    params = SamplingParams(8, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, logprobs=6)
    state = SamplerState(6)
    state.add(params, prompt_ids=[1, 2], output_ids=[2, 3, 3])
    # token 1: 2 / 2; token 2: -1 * 2 - 0.5 * 1 - 0.25; token 3: 0.5 / 2 - 0.5 * 2 - 0.25
    expected = torch.tensor([1.0, 1.0, -2.75, -1.0, 3.0, -2.0])
    result = sample(logits, state)
    full = torch.empty(6).scatter_(0, result.top_token_ids[0], result.top_logprobs[0])
    assert torch.allclose(full, expected.log_softmax(-1), atol=1e-6)
    assert result.tokens.tolist() == [4]


def test_penalties_follow_the_generated_tokens_of_their_row_only():
    """Flat-ish logits, frequency penalty 1: each pick lowers that token for the next step; the
    unpenalised row beside it keeps picking its argmax."""
    logits = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.5, 1.0]])
    state = batch(3, SamplingParams(8, frequency_penalty=1.0), SamplingParams(8))
    picks = [sample(logits, state).tokens.tolist() for _ in range(3)]
    assert picks == [[2, 2], [1, 2], [0, 2]]  # 1.0 -> 0.0; then 0.5 -> -0.5; then 0.0 ties, lower id wins


def test_repetition_penalty_covers_the_prompt():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    state = SamplerState(3)
    state.add(SamplingParams(4, repetition_penalty=2.0), prompt_ids=[0])
    assert sample(logits, state).tokens.tolist() == [1]  # 2.0 / 2 < 1.5


# -- per-request seeds -------------------------------------------------------------------------

def run_requests(order: list[int], steps: int, vocab: int, params: dict[int, SamplingParams],
                 join_at: dict[int, int] | None = None, leave_at: dict[int, int] | None = None) -> dict[int, list[int]]:
    """Run requests as a batch in the given row order; some join late or leave early."""
    join_at, leave_at = join_at or {}, leave_at or {}
    state, running = SamplerState(vocab, seed=99), []
    tokens: dict[int, list[int]] = {r: [] for r in order}
    for step in range(steps):
        for r in order:
            if join_at.get(r, 0) == step:
                state.add(params[r])
                running.append(r)
        gone = [i for i, r in enumerate(running) if leave_at.get(r) == step]
        state.remove(gone)
        running = [r for i, r in enumerate(running) if i not in gone]
        logits = torch.stack([request_logits(r, len(tokens[r]), vocab) for r in running])
        for r, t in zip(running, sample(logits, state).tokens.tolist(), strict=True):
            tokens[r].append(t)
    return tokens


def test_a_seeded_request_gives_the_same_tokens_alone_and_in_any_batch():
    vocab = 300
    params = {0: SamplingParams(64, temperature=0.9, top_k=40, top_p=0.95, seed=1234),
              1: SamplingParams(64, temperature=1.3, seed=7),
              2: SamplingParams(64),
              3: SamplingParams(64, temperature=0.7, min_p=0.05, repetition_penalty=1.3),
              4: SamplingParams(64, temperature=1.0, logprobs=3)}
    alone = run_requests([0], 12, vocab, params)[0]
    first = run_requests([0, 1, 2, 3, 4], 12, vocab, params)[0]
    last = run_requests([4, 3, 2, 1, 0], 12, vocab, params, join_at={1: 2, 3: 5}, leave_at={4: 3, 2: 6})[0]
    middle = run_requests([2, 0, 1], 12 + 4, vocab, params, join_at={0: 4})[0]
    assert alone == first == last == middle
    assert len(set(alone)) > 3  # it samples: a greedy stream would be a weaker check
    other_seed = run_requests([0], 12, vocab, {0: SamplingParams(64, temperature=0.9, top_k=40, top_p=0.95, seed=4321)})
    assert other_seed[0] != alone


def test_a_seeded_request_added_again_with_its_output_goes_on_where_it_stopped():
    """Preemption: the engine drops a request and adds it again with the tokens it generated."""
    vocab, params = 200, SamplingParams(64, temperature=1.0, frequency_penalty=0.5, seed=5)
    whole = run_requests([0], 10, vocab, {0: params})[0]
    state = SamplerState(vocab)
    state.add(params, prompt_ids=[1, 2, 3], output_ids=whole[:6])
    rest = [sample(request_logits(0, step, vocab)[None], state).tokens.item() for step in range(6, 10)]
    assert rest == whole[6:]


def test_hash_is_lowbias32():
    def lowbias32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF, 123456789]
    assert _hash32(torch.tensor(values)).tolist() == [lowbias32(v) for v in values]


# -- distributions -----------------------------------------------------------------------------

LOGITS_8 = torch.tensor([1.2, 0.3, -0.5, 2.0, 0.0, -1.5, 0.8, 1.0])


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_unseeded_draws_follow_the_softmax(temperature):
    """3000 draws (1000 requests, 3 steps) of an unseeded sampler: chi-square against
    softmax(logits / T) passes, and against the softmax at the other temperature fails."""
    state = batch(8, *[SamplingParams(8, temperature=temperature) for _ in range(1000)], seed=11)
    logits = LOGITS_8[None].expand(1000, -1).contiguous()
    tokens = torch.cat([sample(logits, state).tokens for _ in range(3)])
    assert chi_square(tokens, (LOGITS_8 / temperature).softmax(-1)) < CHI_SQUARE_DF7_P001
    other = 0.5 if temperature == 1.0 else 1.0
    assert chi_square(tokens, (LOGITS_8 / other).softmax(-1)) > 10 * CHI_SQUARE_DF7_P001


def test_one_seeded_request_draws_the_softmax_over_its_steps():
    """The random stream of one request along its steps (not only across requests) is fair."""
    state = batch(8, SamplingParams(4000, temperature=1.0, seed=2024))
    tokens = torch.cat([sample(LOGITS_8[None], state).tokens for _ in range(2000)])
    assert chi_square(tokens, LOGITS_8.softmax(-1)) < CHI_SQUARE_DF7_P001


# -- logprobs ----------------------------------------------------------------------------------

def test_logprobs_are_of_the_processed_distribution():
    vocab = 30
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(8))
    state = batch(vocab, SamplingParams(4, logprobs=5),
                  SamplingParams(4, temperature=0.5, logprobs=2, seed=1),
                  SamplingParams(4, temperature=0.8, top_k=3, logprobs=5, seed=2),
                  SamplingParams(4, temperature=2.0, seed=3))
    result = sample(logits, state)
    processed = torch.stack([logits[0], logits[1] / 0.5,
                             (logits[2] / 0.8).masked_fill(logits[2] < logits[2].topk(3).values[-1], -math.inf),
                             logits[3] / 2.0])
    table = processed.log_softmax(-1)
    assert torch.allclose(result.logprobs, table.gather(-1, result.tokens[:, None]).squeeze(-1), atol=1e-5)
    assert result.top_logprobs.shape == result.top_token_ids.shape == (4, 5)
    assert torch.allclose(result.top_logprobs, table.gather(-1, result.top_token_ids), atol=1e-5)
    assert (result.top_logprobs[:, :-1] >= result.top_logprobs[:, 1:]).all()
    assert torch.equal(result.top_token_ids[:, 0], table.argmax(-1))
    assert torch.isinf(result.top_logprobs[2, 3:]).all()  # beyond its top-3
    assert torch.isfinite(result.logprobs).all()


def test_no_logprobs_asked_none_returned():
    result = sample(torch.randn(2, 10), batch(10, SamplingParams(4), SamplingParams(4, temperature=1.0)))
    assert result.logprobs is None and result.top_logprobs is None and result.top_token_ids is None
    only_chosen = sample(torch.randn(1, 10), batch(10, SamplingParams(4, logprobs=0)))
    assert only_chosen.logprobs.shape == (1,) and only_chosen.top_logprobs.shape == (1, 0)


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("temperature", math.nan), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -5),
    ("min_p", 1.0), ("min_p", -0.1), ("max_new_tokens", 0), ("logprobs", MAX_LOGPROBS + 1), ("logprobs", -1),
    ("repetition_penalty", 0.0), ("frequency_penalty", 2.5), ("presence_penalty", -3.0), ("seed", 1.5),
    ("stop_token_ids", (3, -1)), ("top_k", 2.0), ("max_new_tokens", True),
])
def test_a_bad_value_names_its_field_value_and_range(field, value):
    kwargs = {"max_new_tokens": 4, field: value}
    with pytest.raises(InputError, match=rf"SamplingParams\.{field} = .*: must be") as caught:
        SamplingParams(**kwargs)
    assert repr(value) in str(caught.value) or field == "stop_token_ids"


def test_good_edge_values_pass():
    SamplingParams(1, temperature=0.0, top_k=-1, top_p=1.0, min_p=0.0, logprobs=MAX_LOGPROBS,
                   frequency_penalty=-2.0, presence_penalty=2.0, seed=-3, stop_token_ids=[1, 2])


def test_stop_token_ids_are_checked_against_the_vocabulary():
    state = SamplerState(100)
    with pytest.raises(InputError, match=r"stop_token_ids = \(5, 100\).*\[100\].*vocabulary size 100"):
        state.add(SamplingParams(4, stop_token_ids=(5, 100)))
    with pytest.raises(InputError, match="prompt_ids hold token ids outside"):
        state.add(SamplingParams(4, repetition_penalty=1.1), prompt_ids=[3, 100])
    assert len(state) == 0 and state._counts is None  # a refused request leaves no row and no table


def test_logits_must_match_the_state():
    state = batch(10, SamplingParams(4), SamplingParams(4))
    with pytest.raises(InputError, match=r"logits of shape \(3, 10\) for a state of 2 rows"):
        sample(torch.zeros(3, 10), state)
    with pytest.raises(InputError, match="rows must be distinct"):
        state.select([1, 1])


# -- stop conditions ---------------------------------------------------------------------------

def test_finish_reasons():
    params = [SamplingParams(3, stop_token_ids=(7,)), SamplingParams(3, stop_token_ids=(7,)), SamplingParams(5)]
    assert finish_reasons([7, 1, 7], params, [1, 1, 1]) == ["stop", None, None]
    assert finish_reasons([7, 1, 2], params, [3, 3, 4]) == ["stop", "length", None]


def test_state_counts_generated_tokens_for_the_length_limit():
    state = batch(10, SamplingParams(2), SamplingParams(3))
    logits = torch.zeros(2, 10)
    logits[:, 4] = 1
    reasons = []
    for _ in range(3):
        tokens = sample(logits[:len(state)], state).tokens.tolist()
        reasons.append(finish_reasons(tokens, state.params, state.generated))
        state.remove([i for i, reason in enumerate(reasons[-1]) if reason])
    assert reasons == [[None, None], ["length", None], ["length"]]


def test_a_penalised_request_joining_and_leaving_a_running_batch():
    """The penalty tables appear when the first penalised request joins and go when the last leaves."""
    logits = torch.tensor([[0.0, 0.5, 1.0]] * 3)
    state = batch(3, SamplingParams(8), SamplingParams(8, temperature=1.0))
    sample(logits[:2], state)
    assert state._counts is None
    state.add(SamplingParams(8, frequency_penalty=1.0))
    picks = [sample(logits, state).tokens[2].item() for _ in range(3)]
    assert picks == [2, 1, 0]
    state.remove([2])
    assert state._counts is None and len(state) == 2
