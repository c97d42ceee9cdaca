"""Sensitivity: the error one unit's format causes alone, as its effect on the model's output or as a
noise-to-signal ratio (NSR) of the unit's own output.

Where the model's weights are materialised and the trials are few enough, ``output_effects``
measures what matters: the KL divergence of the model's next-token distributions with only this
unit in the format (the embedding and LM head, whose NSR looks like any linear's, then show how
much more they move the output). Otherwise the NSR below.

``NSR = ||y' - y||² / ||y||²`` where ``y`` is the unit's op output on calibration activations
with exact weights and ``y'`` the same op with only this unit's weights round-tripped through the
format (activation-aware), and its input quantised where that format's GEMM multiplies quantised
activations (FP8 linears and experts on FP8 tensor cores). Without activations (models too large to materialise) the NSR is taken
on a sample of the weights themselves (``||w' - w||² / ||w||²``: the same number for isotropic
inputs). Errors of independent units add: the policy bounds their sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from ds4c.ir.graph import Graph, Value, map_values
from ds4c.ir.interpreter import ReferenceExecutor
from ds4c.ir.registry import get_op, split_results
from ds4c.quant.activations import roundtrip as act_roundtrip
from ds4c.quant.formats import Format
from ds4c.quant.units import MOE_ACT_KWARG, Unit


def _nsr(got: torch.Tensor, want: torch.Tensor) -> float:
    signal = float(want.double().pow(2).sum())
    return float((got.double() - want.double()).pow(2).sum()) / max(signal, 1e-30)


def _cast(obj):
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, list | tuple):
        return type(obj)(_cast(o) for o in obj)
    return obj


def model_tokens(graph: Graph, weights: Mapping[str, torch.Tensor], vocab_size: int, *, sequences: int = 2,
                 length: int = 64, rounds: int = 2, seed: int = 0) -> torch.Tensor:
    """Calibration ids drawn from the model itself: start from random ids, then ``rounds`` times
    replace every position by a sample of the model's next-token distribution at the one before."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (sequences, length), generator=g)
    run = ReferenceExecutor(graph)
    for _ in range(rounds):
        logits = run.run({"input_ids": ids}, weights)["logits"].float()
        nxt = torch.multinomial(torch.softmax(logits[:, :-1].reshape(-1, logits.shape[-1]), -1), 1, generator=g)
        ids = torch.cat([ids[:, :1], nxt.view(sequences, length - 1)], dim=1)
    return ids


def activation_errors(graph: Graph, units: Iterable[Unit], weights: Mapping[str, torch.Tensor],
                      tokens: torch.Tensor, formats: Iterable[Format],
                      act_of: Callable[[Unit, str], str | None] | None = None) -> dict[str, dict[str, float]]:
    """NSR of each unit's op output, per format that can hold the unit, on one prefill of ``tokens``.
    ``act_of(unit, format)`` names the activation format the unit's GEMM would multiply in with its
    weights in ``format`` (None: the compute dtype); the trial quantises the input (a linear's
    ``x``) to it too, so the error is what the target will compute."""
    units, formats = list(units), list(formats)
    kinds = {gi.value: gi.kind for gi in graph.inputs}
    needed = {v for u in units for v in graph.ops[u.op_index].operands if v not in kinds}
    captured: dict[Value, object] = {}

    def keep(i, op, outs):
        for r, o in zip(op.results, outs, strict=True):
            if r in needed:
                captured[r] = o

    feeds = {"input_ids": tokens}
    ReferenceExecutor(graph, on_op=keep).run(feeds, weights)

    def lookup(v: Value):
        kind = kinds.get(v)
        if kind is None:
            return captured[v]
        return {"param": weights, "const": graph.constants, "input": feeds}[kind][v.name]

    out: dict[str, dict[str, float]] = {}
    for u in units:
        op = graph.ops[u.op_index]
        opdef = get_op(op.name)
        args, kwargs = _cast(map_values(op.args, lookup)), _cast(map_values(op.kwargs, lookup))
        want = split_results(opdef.reference(*args, **kwargs))[0]
        positions = [i for i, a in enumerate(op.args) if isinstance(a, Value) and a.name in u.params]
        out[u.name] = {}
        for fmt in formats:
            if not all(fmt.holds(s) for s in u.shapes):
                continue
            trial = list(args)
            for p in positions:
                trial[p] = fmt.roundtrip(weights[op.args[p].name], torch.float32)
            act = act_of(u, fmt.name) if act_of is not None else None
            trial_kwargs = kwargs
            if act is not None:
                if u.kind == "linear":
                    trial[0] = act_roundtrip(trial[0], act)
                elif u.kind in MOE_ACT_KWARG:  # the moe op quantises its GEMMs' inputs itself
                    trial_kwargs = {**kwargs, MOE_ACT_KWARG[u.kind]: act}
                else:
                    raise NotImplementedError(f"{u.name}: activation quantisation of a {u.kind} unit")
            got = split_results(opdef.reference(*trial, **trial_kwargs))[0]
            out[u.name][fmt.name] = _nsr(got, want)
    return out


class _WithActivations:
    """An op whose GEMM multiplies activations quantised to ``act`` (what the target will compute)."""

    def __init__(self, opdef, kind: str, act: str):
        self.opdef, self.kind, self.act = opdef, kind, act

    def reference(self, *args, **kwargs):
        if self.kind == "linear":
            args = (act_roundtrip(args[0], self.act), *args[1:])
        elif self.kind in MOE_ACT_KWARG:  # the moe op quantises its GEMMs' inputs itself
            kwargs = {**kwargs, MOE_ACT_KWARG[self.kind]: self.act}
        else:
            raise NotImplementedError(f"activation quantisation of a {self.kind} unit")
        return self.opdef.reference(*args, **kwargs)


def output_effects(graph: Graph, units: Iterable[Unit], weights: Mapping[str, torch.Tensor],
                   tokens: torch.Tensor, formats: Iterable[Format],
                   act_of: Callable[[Unit, str], str | None] | None = None) -> dict[str, dict[str, float]]:
    """The effect of each unit's format on the model's output: KL(p || p') of the next-token
    distributions, in nats, averaged over every position of a prefill of ``tokens``, where ``p`` is
    the exact model's and ``p'`` the model's with only this unit's weights round-tripped through the
    format (and its GEMM's input quantised to ``act_of(unit, format)``, as in ``activation_errors``).
    One forward per (unit, format): for models whose weights are materialised."""
    units, formats = list(units), list(formats)
    run = ReferenceExecutor(graph)
    feeds = {"input_ids": tokens}
    exact = run.run(feeds, weights)["logits"].double().log_softmax(-1)
    p = exact.exp()
    out: dict[str, dict[str, float]] = {}
    for u in units:
        out[u.name] = {}
        step = run._steps[u.op_index]
        for fmt in formats:
            if not all(fmt.holds(s) for s in u.shapes):
                continue
            trial = {**weights, **{n: fmt.roundtrip(weights[n], weights[n].dtype) for n in u.params}}
            act = act_of(u, fmt.name) if act_of is not None else None
            if act is not None:
                run._steps[u.op_index] = (step[0], _WithActivations(step[1], u.kind, act), step[2], step[3])
            try:
                got = run.run(feeds, trial)["logits"].double().log_softmax(-1)
            finally:
                run._steps[u.op_index] = step
            out[u.name][fmt.name] = max(0.0, float((p * (exact - got)).sum(-1).mean()))
    return out


def weight_errors(samples: Iterable[torch.Tensor], formats: Iterable[Format]) -> dict[str, float]:
    """NSR of the weights themselves, over samples of a unit's tensors, per format that holds them."""
    samples = list(samples)
    out = {}
    for fmt in formats:
        if not all(fmt.holds(tuple(s.shape)) for s in samples):
            continue
        err = sum(float((fmt.roundtrip(s).double() - s.double()).pow(2).sum()) for s in samples)
        out[fmt.name] = err / max(sum(float(s.double().pow(2).sum()) for s in samples), 1e-30)
    return out
