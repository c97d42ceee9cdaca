"""The runtime: load an artifact, own the model state, run prefill/decode, generate."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ds4c.artifact.artifact import WEIGHTS_MEMBER, read_artifact
from ds4c.errors import ArtifactError, Ds4cError, InputError
from ds4c.ir.graph import Program
from ds4c.ir.interpreter import ReferenceExecutor
from ds4c.ir.types import torch_dtype
from ds4c.passes.last_logits import LAST_ENTRY
from ds4c.passes.plan_memory import host_weights
from ds4c.progress import progress_steps

PREFILL_GRAPHS = 4  # prefill shapes kept as CUDA graphs
# prompts up to this many tokens (batch x length) are captured: short prompts are launch-bound,
# long ones are not (replayed and op by op take the same time at 2048 tokens, docs/PERFORMANCE.md)
# and their graph would hold its activations in a private memory pool
PREFILL_GRAPH_MAX_TOKENS = 4096

def _dtype(name: str) -> torch.dtype:
    dtype = torch_dtype(name)
    if dtype is None:
        raise ArtifactError(f"manifest names unknown dtype '{name}'")
    return dtype


class CompiledModel:
    """A loaded artifact. ``model(ids)`` gives logits; ``model.generate(ids, n)`` gives tokens."""

    def __init__(self, manifest: dict[str, Any], program: Program, weights: dict[str, torch.Tensor],
                 device: torch.device, backend: str = "auto", cuda_graphs: bool = True, container: Any = None,
                 streams: bool = True, trust: Any = None, buffer_plan: bool = True):
        self.manifest = manifest
        # whether the artifact's native code may run (ds4c.artifact.signing.Trust; None: untrusted)
        self.trust = trust
        self.program = program
        self.weights = weights
        self.device = device
        self.max_context = int(manifest["max_context"])
        self.vocab_size = int(manifest["model"]["config"]["vocab_size"])
        self.state_layout = manifest["state"]
        self.backend = _pick_backend(backend, device, manifest)
        self._tuning: dict[str, dict[str, Any]] | None = None  # measured config overrides (ds4c tune)
        self.tuning_status = "none"
        # what ds4c.load did with the artifact's stored kernel binaries (ds4c.runtime.binaries)
        self.kernel_binaries = "unused: the reference backend runs no device kernels"
        # what the kernel backends' launchers are given: the kernel target (the artifact's record,
        # or the device's where it is another arch), the tuning table, the artifact's pdl option
        self.kernel_context: Any = None
        stored_graphs = program.graphs  # what the artifact's plans index
        if self.backend in ("kernels", "compiled"):
            from ds4c.backends.triton.kernels.configs import KernelContext, kernel_target

            self.kernel_context = KernelContext(kernel_target(manifest["target"]), tuning=None,
                                                pdl=compiled_pdl(manifest))
            if manifest["target"].get("backend") in ("cuda", "rocm") and "lowering" not in manifest:
                warnings.warn("this artifact was compiled without the GPU lowering stage (an older ds4c): its "
                              "kernels expand packed weights at every step; recompile it for the fast path",
                              stacklevel=3)
        self.host_weights = _host_resident(manifest, weights, device, self.backend)
        if self.host_weights:
            program = Program({name: _prefetch_to(g, device) for name, g in program.graphs.items()}, program.attrs)
            self.program = program
        self.streams, self.buffer_plan = streams, buffer_plan
        # the compiled stream schedules and memory plans the kernel executor runs (nothing planned here)
        self._plans = _stream_plans(manifest, container, stored_graphs) if self.backend == "kernels" else {}
        self._memory_plans = _memory_plans(manifest, container, stored_graphs) if self.backend == "kernels" else {}
        self.container = container  # the artifact's members (tokenizer, NPU library)
        self._executors = {name: self._make_executor(name, g) for name, g in program.graphs.items()}
        # decode steps captured as CUDA graphs, per batch size (state updated in place)
        # (not the reference backend: its MoE groups tokens on the host, which a graph cannot hold)
        self.cuda_graphs = cuda_graphs and device.type == "cuda" and self.backend != "reference"
        self._graphed: dict[int, Any] = {}
        # prefills captured as CUDA graphs per (logits, ids shape); see _prefill_graph
        self._prefill_graphs: dict[tuple, Any] = {}
        self._prefill_seen: dict[tuple, int] = {}
        self.prefill_graph_errors: dict[tuple, str] = {}

    @property
    def kernel_target(self) -> Any:
        """The target record the kernels' configurations are chosen for (None: no kernel backend)."""
        return None if self.kernel_context is None else self.kernel_context.target

    @property
    def tuning(self) -> dict[str, dict[str, Any]] | None:
        """The tuning table the kernels run with (``ds4c tune``; None: the target's configurations)."""
        return self._tuning

    @tuning.setter
    def tuning(self, table: dict[str, dict[str, Any]] | None) -> None:
        """Give the launchers a kernel context with ``table``; CUDA graphs captured with the previous
        configurations are dropped (captured again at their next use)."""
        self._tuning = table
        if self.kernel_context is None:
            return
        self.kernel_context = dataclasses.replace(self.kernel_context, tuning=table)
        for executor in self._executors.values():
            executor.context = self.kernel_context
        self._graphed.clear()
        self._prefill_graphs.clear()

    def _make_executor(self, name: str, g: Any) -> Any:
        if self.backend == "compiled":
            from ds4c.backends.triton.inductor import InductorExecutor

            return InductorExecutor(g, self.weights, self.device, context=self.kernel_context)
        if self.backend == "kernels":
            from ds4c.runtime.executor import ScheduledExecutor

            return ScheduledExecutor(g, self.device, context=self.kernel_context, schedule=self._plans.get(name),
                                     memory_plan=self._memory_plans.get(name), streams=self.streams,
                                     buffer_plan=self.buffer_plan)
        if self.backend == "npu":  # NPU ops through the TVM host build (ds4c.backends.npu.executor)
            from ds4c.backends.npu.executor import NpuExecutor, load_library

            if self.device.type != "cpu":
                raise InputError(f"backend 'npu' runs the NPU kernels' host simulator on the CPU, not on {self.device}; "
                                 "use device='cpu'")
            if not hasattr(self, "_npu_library"):
                self._npu_library = load_library(self.manifest, self.container, "artifact", trust=self.trust,
                                                 program=self.program)
            vm, section = self._npu_library
            return NpuExecutor(g, vm, section, self.device)
        return ReferenceExecutor(g, self.device)

    def _prefill_graph(self, executor: Any, logits: str, ids: torch.Tensor) -> Any:
        """The CUDA graph of this last-position prefill shape, captured at its second call (a length
        seen once is not worth a capture) when it has at most ``PREFILL_GRAPH_MAX_TOKENS`` tokens;
        None to run it op by op. Keeps ``PREFILL_GRAPHS`` shapes; a
        capture that fails is recorded in ``prefill_graph_errors`` and that shape runs op by op."""
        if not self.cuda_graphs or ids.numel() > PREFILL_GRAPH_MAX_TOKENS:
            return None
        from ds4c.runtime.executor import GraphedPrefill

        key = (logits, tuple(ids.shape))
        if key in self._prefill_graphs:
            return self._prefill_graphs[key]
        self._prefill_seen[key] = self._prefill_seen.get(key, 0) + 1
        if self._prefill_seen[key] < 2 or key in self.prefill_graph_errors:
            return None
        while len(self._prefill_graphs) >= PREFILL_GRAPHS:
            self._prefill_graphs.pop(next(iter(self._prefill_graphs)))
        try:
            graphed = GraphedPrefill(executor, self.weights, tuple(ids.shape), self.device)
        except (RuntimeError, Ds4cError) as e:  # an op that cannot be captured: this shape runs op by op
            self.prefill_graph_errors[key] = str(e).splitlines()[0] if str(e) else type(e).__name__
            torch.cuda.synchronize(self.device)
            return None
        self._prefill_graphs[key] = graphed
        return graphed

    def _last_position_entry(self) -> Any:
        """The executor of the compiled ``prefill_last`` entry point (logits of the last position,
        ds4c.passes.last_logits), or None where the artifact has none (the NPU target, ONNX imports)."""
        return self._executors.get(LAST_ENTRY)

    # -- inputs ---------------------------------------------------------------------------------
    def _check_prompt(self, ids: torch.Tensor, max_new_tokens: int = 0) -> None:
        """What this artifact's entry points can do with ``ids`` [B, S]: an artifact imported from
        an ONNX export has one entry point with fixed shapes, and says so instead of failing deep
        in its graph."""
        static = self._static_prompt_shape()
        origin = self._origin()
        if static is not None and list(ids.shape) != static:
            raise InputError(f"this artifact's @prefill takes exactly {static[0]} x {static[1]} token ids (static shapes, "
                             f"{origin}), got {ids.shape[0]} x {ids.shape[1]}; give {static[1]} ids, or compile the "
                             "model itself for prompts of any length")
        if max_new_tokens > 1 and "decode" not in self.program.graphs:
            raise InputError(f"this artifact has no @decode entry point ({origin}): it computes the next token of a "
                             f"prompt, not {max_new_tokens}; ask for one (--max-new-tokens 1; model(ids) gives all "
                             "logits), or compile the model itself to generate")

    def _static_prompt_shape(self) -> list[int] | None:
        """The [batch, seq] @prefill takes when its input shape is fixed (an ONNX import), else None."""
        graph = self.program.graphs.get("prefill")
        for inp in graph.inputs if graph is not None else ():
            if inp.kind == "input" and inp.value.name == "input_ids" and getattr(inp.value.type, "is_static", False):
                return [int(d) for d in inp.value.type.shape]
        return None

    def _origin(self) -> str:
        source = self.manifest["model"].get("source") or {}
        if source.get("kind") == "onnx":
            return f"imported from the ONNX file '{source.get('name')}'"
        return f"compiled from the {source.get('kind', 'model')} '{source.get('name', '?')}'"

    def _check_ids(self, input_ids: Any, *, extra: int = 0) -> torch.Tensor:
        ids = as_token_ids(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, seq] token ids, got shape {list(ids.shape)}")
        if ids.numel() == 0:
            raise InputError("the prompt is empty (input_ids has no tokens); give at least one token")
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise InputError(f"input_ids must be integer token ids, got {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is out of range: this model's vocabulary has {self.vocab_size} ids "
                             f"(0..{self.vocab_size - 1})")
        if ids.shape[1] + extra > self.max_context:
            what = f"{ids.shape[1]} prompt tokens" + (f" + {extra} new tokens" if extra else "")
            raise InputError(f"context of {what} exceeds the compiled maximum of {self.max_context}; "
                             f"recompile with --max-context {ids.shape[1] + extra} or more")
        return ids.to(device=self.device, dtype=torch.int64)

    def new_state(self, batch: int) -> dict[str, torch.Tensor]:
        """Fresh model state (ring buffers, compressed KV, compressor tails) for ``batch`` sequences."""
        out = {}
        for s in self.state_layout:
            shape = [batch if d == "B" else int(d) for d in s["shape"]]
            out[s["name"]] = torch.full(shape, float(s["fill"]), dtype=_dtype(s["dtype"]), device=self.device)
        return out

    # -- entry points ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: Any, logits: str = "all") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the prompt from an empty state: (logits, state). ``logits="all"`` gives every
        position's [B, S, vocab]; ``"last"`` only the last position's [B, 1, vocab], computing the
        LM head for that position alone (what ``generate`` does)."""
        if logits not in ("all", "last"):
            raise InputError(f"prefill(logits=...) takes 'all' or 'last', got {logits!r}")
        ids = self._check_ids(input_ids)
        self._check_prompt(ids)
        return self._prefill(ids, logits)

    @property
    def data_parallel(self) -> tuple[int, int] | None:
        """(rank, ranks) of a sharded artifact with data-parallel attention (each rank runs its own
        rows of a batch; ds4c.distributed.mesh), else None."""
        mesh = self.manifest.get("mesh")
        if mesh and mesh.get("attention") == "dp":
            return int(self.manifest["rank"]), int(mesh["world"])
        return None

    def _own_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a batch (data-parallel attention); the whole batch otherwise."""
        if self.data_parallel is None:
            return ids
        rank, world = self.data_parallel
        if ids.shape[0] % world:
            raise InputError(f"a batch of {ids.shape[0]} sequences does not split over the {world} ranks of this "
                             f"artifact's data-parallel attention; give a multiple of {world} (or compile with "
                             "--mesh ...,attention=replicated)")
        per = ids.shape[0] // world
        return ids[rank * per:(rank + 1) * per]

    def _all_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``t`` (this rank's), in rank order (data-parallel attention)."""
        if self.data_parallel is None:
            return t
        from ds4c.ir.registry import get_op

        return get_op("dist.all_gather").reference(t.contiguous(), axis="world", world=self.data_parallel[1], dim=0)

    def _prefill(self, ids: torch.Tensor, logits: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.data_parallel is not None:  # this rank's rows; every rank's logits back, the state stays here
            result, state = self._prefill_rows(self._own_rows(ids), logits)
            return self._all_rows(result), state
        return self._prefill_rows(ids, logits)

    def _prefill_rows(self, ids: torch.Tensor, logits: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        entry = self._last_position_entry() if logits == "last" else None
        executor = entry or self._entry("prefill")
        # graphs for the generation path only: a full-logits prefill would pin [B, S, vocab]
        graphed = self._prefill_graph(executor, logits, ids) if entry is not None else None
        out = graphed(ids) if graphed is not None else executor.run({"input_ids": ids}, self.weights)
        result = out.pop("logits")
        if logits == "last" and result.shape[1] != 1:  # no prefill_last, or one the rewrite left whole
            result = result[:, -1:]
        return result, out

    @torch.no_grad()
    def decode(self, token_ids: Any, position: int, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        ids = self._check_ids(token_ids)
        if ids.shape[1] != 1:
            raise InputError(f"decode takes one token per sequence, got {ids.shape[1]}")
        if position >= self.max_context:
            raise InputError(f"position {position} is beyond the compiled maximum context {self.max_context}; "
                             f"recompile with a larger --max-context")
        return self._decode(ids, position, state)

    def _decode(self, ids: torch.Tensor, position: int, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        if self.data_parallel is not None:
            logits, state = self._decode_rows(self._own_rows(ids), position, state)
            return self._all_rows(logits), state
        return self._decode_rows(ids, position, state)

    def _decode_rows(self, ids: torch.Tensor, position: int, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        if self.cuda_graphs:
            from ds4c.runtime.executor import GraphedDecode

            b = ids.shape[0]
            if b not in self._graphed:
                self._graphed[b] = GraphedDecode(self._entry("decode"), self.weights, state, b)
            step = self._graphed[b]
            step.load_state(state)
            logits = step(ids, position).clone()
            return logits, step.state  # on CUDA the state buffers are updated in place
        pos = torch.tensor(position, dtype=torch.int64, device=self.device)
        out = self._entry("decode").run({"input_ids": ids, "position": pos}, self.weights, state)
        logits = out.pop("logits")
        return logits, out

    def _entry(self, name: str) -> Any:
        if name not in self._executors:
            raise InputError(f"this artifact has no '{name}' entry point (it has {', '.join(sorted(self._executors))}); "
                             f"recompile from a source that provides it (an ONNX file exported with --entry {name})")
        return self._executors[name]

    def __call__(self, input_ids: Any) -> torch.Tensor:
        """Full forward of a whole sequence from an empty state: logits [B, S, vocab]."""
        return self.prefill(input_ids)[0]

    @torch.no_grad()
    def generate(self, input_ids: Any, max_new_tokens: int = 32, do_sample: bool = False, *,
                 temperature: float = 1.0, top_k: int | None = None, eos_token_id: int | None = None,
                 seed: int | None = None) -> torch.Tensor:
        """Prefill the prompt, then decode ``max_new_tokens`` tokens; returns prompt + new ids [B, S+N].

        Prompts of different lengths (a list of lists) run on ``ds4c.Engine`` when the artifact has
        serving entry points (``ds4c compile --serving``): then a list of lists (each prompt + its
        new ids, shorter where ``eos_token_id`` stopped it) comes back."""
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if self.manifest.get("serving") and is_ragged(input_ids):
            return self._generate_on_engine(input_ids, max_new_tokens, do_sample, temperature, top_k, eos_token_id,
                                            seed)
        ids = self._check_ids(input_ids, extra=max_new_tokens)
        if max_new_tokens == 0:
            return ids
        self._check_prompt(ids, max_new_tokens)
        gen = torch.Generator(device=self.device)
        if seed is not None:
            gen.manual_seed(seed)
        logits, state = self._prefill(ids, "last")
        tokens = [ids]
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        pos = ids.shape[1]
        for step in range(max_new_tokens):
            nxt = self._pick(logits[:, -1].float(), do_sample, temperature, top_k, gen)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            tokens.append(nxt[:, None])
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            logits, state = self._decode(nxt[:, None], pos, state)  # model-picked ids: in range
            pos += 1
        return torch.cat(tokens, dim=1)

    def _generate_on_engine(self, prompts: Any, max_new_tokens: int, do_sample: bool, temperature: float,
                            top_k: int | None, eos_token_id: int | None, seed: int | None) -> list[list[int]]:
        from ds4c.runtime.engine import Engine
        from ds4c.runtime.sampling import SamplingParams

        rows = [[int(t) for t in r] for r in prompts]
        if max_new_tokens == 0:
            return rows
        if do_sample and temperature <= 0:
            raise InputError(f"temperature must be > 0 when sampling, got {temperature}")
        stop = () if eos_token_id is None else (eos_token_id,)
        params = [SamplingParams(max_new_tokens, temperature=temperature if do_sample else 0.0, top_k=top_k or 0,
                                 stop_token_ids=stop, seed=None if seed is None else seed + i)
                  for i in range(len(rows))]
        engine = Engine(self)
        if engine.rank:  # a sharded artifact's other ranks: rank 0's steps, then its tokens
            from ds4c.runtime.ranks import receive_tokens

            engine.follow()
            return receive_tokens(engine._group)
        outs = engine.generate(rows, params)
        engine.close()
        if "mesh" in self.manifest:
            from ds4c.runtime.ranks import send_tokens

            send_tokens(engine._group, [r + o for r, o in zip(rows, outs, strict=True)])
        return [r + o for r, o in zip(rows, outs, strict=True)]

    @staticmethod
    def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
              gen: torch.Generator) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(dim=-1)
        if temperature <= 0:
            raise InputError(f"temperature must be > 0 when sampling, got {temperature}")
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=gen)[:, 0]

    def buffer_plans(self) -> dict[str, Any]:
        """Per entry point run so far, the kernel executor's static buffer plan
        (``ScheduledExecutor.buffer_stats``: arena bytes, eager and captured in CUDA graphs; the latest
        binding's plan; per op, results written into their planned buffer or allocated). Empty for
        backends that plan no buffers (reference; compiled, whose Inductor code plans its own)."""
        out = {}
        for name, ex in self._executors.items():
            stats = ex.buffer_stats() if hasattr(ex, "buffer_stats") else None
            if stats is not None and stats["plans"]:
                out[name] = stats
        return out

    def __repr__(self) -> str:
        return (f"CompiledModel(target={self.manifest['target']['name']}, device={self.device}, "
                f"max_context={self.max_context}, weights={len(self.weights)} tensors)")


def compiled_pdl(manifest: dict[str, Any]) -> bool:
    """The artifact's compile option ``pdl`` (``ds4c compile --no-pdl``): whether its kernels launch
    with programmatic dependent launch where the hardware has it; on for artifacts that predate it."""
    return bool(((manifest.get("lowering") or {}).get("options") or {}).get("pdl", True))


def _host_resident(manifest: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device,
                   backend: str) -> list[str]:
    """Weights the memory plan keeps in host memory (``--hbm-budget``), moved to pinned host
    memory on a CUDA device (in place in ``weights``); ``ds4c.prefetch`` copies them in at run time."""
    host = sorted(host_weights(manifest.get("memory_plan")) & set(weights))
    if not host or device.type != "cuda":
        return []
    if backend == "compiled":
        raise InputError(f"this artifact keeps {len(host)} weights in host memory (compiled with --hbm-budget); the "
                         "'compiled' backend cannot prefetch them — load it with backend='kernels'")
    for name in host:
        weights[name] = weights[name].to("cpu").pin_memory()
    return host


def _prefetch_to(graph: Any, device: torch.device) -> Any:
    """``graph`` whose ``ds4c.prefetch`` ops copy to ``device`` (host-resident weights, see plan_memory)."""
    from ds4c.ops.memory import PREFETCH

    if not any(op.name == PREFETCH for op in graph.ops):
        return graph
    return graph.copy(ops=[op.replace(kwargs={**op.kwargs, "device": device}) if op.name == PREFETCH else op
                           for op in graph.ops])


def _plan_members(manifest: dict[str, Any], container: Any, graphs: dict[str, Any], key: str) -> Any:
    """(entry, member, plan) for each entry point of ``graphs`` with a plan in the manifest's ``key``
    section (``schedule`` / ``memory_plan``: ``plans/<entry>.<kind>.json``)."""
    import json

    for name, section in (manifest.get(key) or {}).items():
        if container is not None and name in graphs:
            yield name, section["member"], json.loads(container.read_bytes(section["member"]))


def _stream_plans(manifest: dict[str, Any], container: Any, graphs: dict[str, Any]) -> dict[str, Any]:
    """Per entry point, the artifact's ``schedule_streams`` plan: the issue order, streams and events
    the kernel executor runs; empty where none was made."""
    out = {}
    for name, member, schedule in _plan_members(manifest, container, graphs, "schedule"):
        if len(schedule.get("ops", [])) != len(graphs[name].ops):
            raise ArtifactError(f"{member}: the schedule covers {len(schedule.get('ops', []))} ops, graph "
                                f"@{name} has {len(graphs[name].ops)}; the artifact is inconsistent — recompile it")
        out[name] = schedule
    return out


def _memory_plans(manifest: dict[str, Any], container: Any, graphs: dict[str, Any]) -> dict[str, Any]:
    """Per entry point, the artifact's memory plan, whose offsets the kernel executor evaluates at
    each call's sizes; empty where none was made."""
    out = {}
    for name, member, plan in _plan_members(manifest, container, graphs, "memory_plan"):
        if "below" not in next(iter(plan.get("buffers") or [{"below": []}])):
            continue  # an artifact of an older ds4c: its plan has no placement order; results are allocated
        made = {r.name for op in graphs[name].ops for r in op.results}
        missing = [b["value"] for b in plan.get("buffers", []) if b["value"] not in made]
        if missing:
            raise ArtifactError(f"{member}: the memory plan places %{missing[0]}, which graph @{name} does "
                                "not make; the artifact is inconsistent — recompile it")
        out[name] = plan
    return out


BACKENDS = ("auto", "kernels", "compiled", "npu", "reference")


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as one ds4c runs on: ``cpu``, or ``cuda`` / ``cuda:N`` where torch sees that GPU."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {str(device)!r}; use cpu or cuda (cuda:N for GPU N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"ds4c does not run on device '{dev}'; use cpu or cuda (ROCm builds of PyTorch call AMD "
                         "GPUs cuda too)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch sees no CUDA device; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise InputError(f"device '{dev}' does not exist: torch sees {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return dev


def is_ragged(input_ids: Any) -> bool:
    """Whether ``input_ids`` is a list of prompts of different lengths."""
    return (isinstance(input_ids, list | tuple) and len(input_ids) > 1
            and all(isinstance(r, list | tuple) for r in input_ids) and len({len(r) for r in input_ids}) > 1)


def as_token_ids(input_ids: Any) -> torch.Tensor:
    """``input_ids`` as a tensor: prompts of different lengths in one list, and values that are
    not token ids, are refused by name rather than by torch's conversion error."""
    if isinstance(input_ids, list | tuple) and input_ids and all(isinstance(r, list | tuple) for r in input_ids):
        lengths = [len(r) for r in input_ids]
        if len(set(lengths)) > 1:
            raise InputError(f"prompts of different lengths in one batch ({', '.join(map(str, lengths))} tokens): "
                             "a batch runs as one [batch, seq] tensor, so padded batches must have equal length; "
                             "run the prompts one at a time, or compile with --serving (ds4c.Engine serves "
                             "prompts of any lengths)")
    try:
        return torch.as_tensor(input_ids)
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise InputError(f"input_ids must be token ids, a [batch, seq] tensor or equal-length lists of ints ({e})") \
            from None


def _pick_backend(backend: str, device: torch.device, manifest: dict[str, Any] | None = None) -> str:
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend in ("kernels", "compiled") and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputError(f"backend '{backend}' runs Triton kernels, which need a GPU: use --device cuda, or --backend "
                         "reference on the CPU (TRITON_INTERPRET=1 runs the kernels in Triton's slow interpreter)")
    if backend == "auto":
        if device.type == "cpu" and ((manifest or {}).get("kernels") or {}).get("backend") == "npu":
            return "npu"
        return "kernels" if device.type == "cuda" else "reference"
    return backend


def load(path: str | os.PathLike, device: str | torch.device = "cpu", *, progress: bool | None = None,
         backend: str = "auto", cuda_graphs: bool = True, streams: bool = True, buffer_plan: bool = True,
         weights: dict[str, torch.Tensor] | None = None,
         tuning: bool | str | os.PathLike = True, trust_binaries: bool = False,
         weights_from: str | os.PathLike | None = None, rank: int | None = None) -> CompiledModel:
    """Load an artifact written by ``Artifact.save`` / ``ds4c compile``, ready to run on ``device``.

    ``backend``: ``kernels`` (Triton kernels for fused ops, the rest op by op; default on CUDA),
    ``compiled`` (the same kernels, everything between them compiled whole by TorchInductor, once
    per input shape), ``npu`` (an ``npu`` artifact's TVM kernels through their host build, the
    functional simulator; default for such artifacts on CPU), ``reference`` (every op's PyTorch reference; default on CPU) or ``auto``. ``cuda_graphs``: capture decode steps as
    CUDA graphs (CUDA only). ``streams``: the kernels backend runs the compiler's stream schedule
    (``schedule_streams``: main / aux / copy CUDA streams with events, inside the decode graph);
    False runs the same ops in the same order on one stream. ``buffer_plan``: the kernels backend
    places activations at the offsets of the artifact's memory plan (evaluated at each call's
    sizes); False lets every op allocate its results (A/B measurement). ``weights``: tensors to use instead of the artifact's (same names and
    shapes, e.g. a transformers model's parameters, shared without copying; the manifest's weight
    transforms still apply, e.g. concatenations of merged linears take memory of their own). ``tuning``: on CUDA with a
    kernel backend, apply the tuning file ``ds4c tune`` wrote beside the artifact when it was
    measured for this program, device and Triton (``model.tuning_status`` says what happened);
    False ignores it. ``trust_binaries``: use the native code stored in the artifact (kernel
    binaries, the NPU host build) even when it is not signed by a trusted key (ds4c.artifact.signing);
    otherwise such code is rebuilt here or JIT-compiled (``model.trust`` says which applied).
    ``weights_from``: where the checkpoint directory (or ONNX file) of an artifact compiled with
    weights by reference is now, when it moved; its files are checked against the artifact's record
    of them either way (ds4c.frontend.file_record).

    A sharded artifact (compiled with ``--mesh`` / ``--gpus``, ds4c.artifact.sharded) loads in a
    worker that torchrun or ``ds4c run --ranks N`` started: the process joins the mesh's process
    group (ds4c.distributed.runtime.join: NCCL on CUDA, on the GPU of its LOCAL_RANK; gloo on CPU)
    and loads its rank's program and only its slices of the weights. ``rank``: load that rank's
    program and slices without joining (the caller binds the mesh's groups: bind_mesh).
    """
    from safetensors.torch import load as st_load

    from ds4c.artifact.signing import artifact_trust

    device = parse_device(device)
    manifest, program, container = read_artifact(path)
    if "mesh" in manifest or rank is not None:
        manifest, program, device = _rank_program(manifest, container, path, device, rank)
    trust = artifact_trust(container, trust_binaries)
    wman = manifest["weights"]
    dtype = _dtype(wman["dtype"])
    expected = {k: (tuple(v["shape"]), _dtype(v["dtype"])) for k, v in wman["tensors"].items()}
    # what the source provides (differs from ``expected`` when weights are packed at load)
    provided = {k: (tuple(v["shape"]), _dtype(v["dtype"])) for k, v in wman.get("source_tensors", {}).items()} \
        or expected
    shard = wman.get("shard") or {}
    with progress_steps(f"loading {os.fspath(path)}", total=max(len(expected), 1), enabled=progress) as steps:
        if weights is not None and shard:  # the whole model's tensors: this rank's slices of them
            from ds4c.distributed.shards import slice_tensor

            weights = {k: slice_tensor(v, shard[k], k) if k in shard else v for k, v in weights.items()}
        if weights is not None:
            # the program's own tensors (another loaded model's ``weights``), or what the source provides
            wanted = expected if set(expected) <= set(weights) else provided
            missing = sorted(set(wanted) - set(weights))
            if missing:
                raise InputError(f"weights= lacks {len(missing)} tensors the program reads, e.g. '{missing[0]}'")
            weights = {k: weights[k] for k in wanted}
        elif wman["mode"] == "embed":  # (a sharded artifact: the whole tensors, once; this rank cuts its slices)
            from ds4c.distributed.shards import slice_tensor

            if weights_from is not None:
                raise InputError(f"{path}: weights_from / --weights-from given, but this artifact embeds its weights; "
                                 "drop it")
            if WEIGHTS_MEMBER not in container.member_names():
                raise ArtifactError(f"{path}: manifest says weights are embedded but '{WEIGHTS_MEMBER}' is missing")
            raw = st_load(container.read_bytes(WEIGHTS_MEMBER))
            weights = {}
            for k in provided if shard else expected:  # sharded: the source's form, transformed below
                if k not in raw:
                    raise ArtifactError(f"{path}: embedded weights lack tensor '{k}'; recompile the artifact")
                t = raw.pop(k)
                weights[k] = (slice_tensor(t, shard[k], k).clone() if k in shard else t).to(device)
                steps.advance()
        elif wman["source"].get("kind") == "preset" and weights_from is None:  # drawn, packed, placed one at a time
            from ds4c.distributed.shards import whole_spec
            from ds4c.models.deepseek_v4.presets import init_preset_weights

            whole = whole_spec(provided, shard)
            host = host_weights(manifest.get("memory_plan")) if device.type == "cuda" else set()

            def place(name: str, t: torch.Tensor) -> torch.Tensor:
                steps.advance()
                return t.to("cpu").pin_memory() if name in host else t.to(device)

            weights = stream_transforms(init_preset_weights(whole, wman["source"]["seed"], device, dtype, shard=shard),
                                        wman.get("transforms", []), keep=expected, place=place)
        else:
            from ds4c.frontend.source import load_weights

            def tick(i: int, n: int) -> None:
                steps.advance()

            weights = load_weights(wman["source"], provided, dtype=dtype, device=device, progress=tick,
                                   weights_from=weights_from, artifact=os.fspath(path), shard=shard)
        weights = apply_transforms(weights, wman.get("transforms", []), keep=expected)
        weights = {k: weights[k] for k in expected}
    for k, (shape, _) in expected.items():
        t = weights[k]
        if tuple(t.shape) != shape:
            raise ArtifactError(f"{path}: weight '{k}' has shape {list(t.shape)}, the program expects {list(shape)}")
    if device.type == "cuda":
        # what drawing, casting and packing the weights left cached goes back to the device: the
        # caching allocator keeps freed blocks per stream, and the host weights' prefetches (on a
        # copy stream) and the CUDA graphs' pools cannot take them (the full flash at a 60 GB
        # budget on an H100 ran out of memory with 23 GB cached and unused)
        torch.cuda.empty_cache()
    model = CompiledModel(manifest, program, weights, device, backend=backend, cuda_graphs=cuda_graphs,
                          container=container, streams=streams, trust=trust, buffer_plan=buffer_plan)
    if tuning and model.backend in ("kernels", "compiled") and device.type == "cuda":
        from ds4c.runtime.autotune import load_tuning

        model.tuning, model.tuning_status = load_tuning(path, manifest, device,
                                                        None if tuning is True else tuning, model.backend)
    if manifest.get("kernels") or model.backend != "reference":
        from ds4c.runtime.binaries import use_stored_binaries

        model.kernel_binaries = use_stored_binaries(manifest, container, device, model.backend, os.fspath(path),
                                                    trust=trust)
    return model


def _rank_program(manifest: dict[str, Any], container: Any, path: Any, device: torch.device,
                  rank: int | None) -> tuple[dict[str, Any], Program, torch.device]:
    """(manifest, program, device) of this process's rank of a sharded artifact; joins the mesh's
    process group unless ``rank`` is given."""
    from ds4c.artifact.artifact import _read_program, check_manifest
    from ds4c.artifact.sharded import rank_manifest

    where = os.fspath(path)
    if "mesh" not in manifest:
        raise InputError(f"rank={rank}: {where} is not sharded (compiled without --mesh / --gpus); drop rank")
    if rank is None:
        from ds4c.distributed.mesh import Mesh
        from ds4c.distributed.runtime import join

        mesh = Mesh.from_dict(manifest["mesh"], where)
        rank, device = join(mesh, device, where=where)
    own = rank_manifest(manifest, rank, where)
    check_manifest(own, where)
    return own, (_read_program(container, own, where)), device


def stream_transforms(items: Any, transforms: Sequence[dict[str, Any]], *, keep: Any = (),
                      place: Any = None) -> dict[str, torch.Tensor]:
    """``apply_transforms`` on weights arriving one at a time (``items``: (name, tensor) pairs): each
    is cast and packed as the leading ``cast`` / ``quantize`` transforms say and ``place``d (name,
    tensor -> where it lives: the device, or pinned host memory for weights the plan keeps there)
    before the next comes, so the source's form of the whole model (bf16 for a preset: 568 GB for
    V4-Flash) is never held at once. The lowering's transforms run at the end on what was kept
    (``apply_transforms`` again, which leaves what is done as it is)."""
    head = 0
    while head < len(transforms) and transforms[head]["op"] in ("cast", "quantize"):
        head += 1
    first = list(transforms[:head])
    out: dict[str, torch.Tensor] = {}
    for name, t in items:
        one = apply_transforms({name: t}, first, keep=keep)
        del t
        for k, v in one.items():
            out[k] = place(k, v) if place is not None else v
    return out


def apply_transforms(weights: dict[str, torch.Tensor], transforms: Sequence[dict[str, Any]],
                     keep: Any = ()) -> dict[str, torch.Tensor]:
    """Apply the weight transforms recorded by the compiler, in order (idempotent on embedded weights).

    ``quantize`` packs weights (ds4c.quant.packing); packed tensors are never cast. ``keep``: names
    that stay unpacked as well (a graph still reads them). The lowering passes' ``dequantize`` and
    ``concat`` make weights the program reads from packed ones and from parts."""
    from ds4c.quant.packing import concat_weights, dequantize_weights, pack_weights, packed_names

    packed = set().union(*(packed_names(tr["tensors"]) for tr in transforms if tr["op"] == "quantize"))
    for tr in transforms:  # what the lowering makes has its own dtype: concatenated packed parts, dequantised weights
        if tr["op"] == "concat":
            packed.update(name for name, parts in tr["tensors"].items() if packed.intersection(parts))
        elif tr["op"] == "dequantize":
            packed.update(tr["tensors"])
    for tr in transforms:
        op = tr["op"]
        if op == "quantize":
            pack_weights(weights, tr["tensors"], keep=keep)
        elif op == "cast":
            dt = _dtype(tr["dtype"])
            names = [k for k, v in weights.items() if v.is_floating_point() and k not in packed] \
                if tr.get("tensors") == "floating" else list(tr["tensors"])
            for k in names:
                weights[k] = weights[k].to(dt)
        elif op == "dequantize":
            dequantize_weights(weights, tr["tensors"])
        elif op == "concat":
            concat_weights(weights, tr["tensors"])
        else:
            raise ArtifactError(f"artifact records weight transform '{op}' that this ds4c does not know; upgrade ds4c")
    return weights
