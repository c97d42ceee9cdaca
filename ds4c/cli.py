"""The ``ds4c`` command line: compile, run, tune, inspect, export, targets, cache, trust, sign."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ds4c.errors import ConfigError, Ds4cError, InputError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ds4c: ahead-of-time compiler and runtime for DeepSeek-V4-class models.")
# Wide output when piped (tests, logs), the terminal's width otherwise.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _fail(e: Exception) -> None:
    """Print ``e`` as one line on stderr and exit with status 2: every error ds4c raises on purpose
    names the thing and the fix, and a user needs that line, not a traceback."""
    message = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    err.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True, highlight=False)
    raise typer.Exit(2)


Command = TypeVar("Command", bound=Callable[..., Any])


def one_line_errors(command: Command) -> Command:
    """Every command: a ``Ds4cError`` raised anywhere in it ends the command as one line (``_fail``).
    Anything else is a bug in ds4c and keeps its traceback."""

    @functools.wraps(command)
    def run_command(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except Ds4cError as e:
            _fail(e)

    return run_command  # type: ignore[return-value]


@app.command()
@one_line_errors
def compile(
    model: Annotated[str, typer.Argument(help="preset (tiny, flash-slice, flash, pro), checkpoint directory "
                                             "or ONNX file")] = "tiny",
    target: Annotated[str, typer.Option("--target", "-t", help="target name; see `ds4c targets`")] = "b200",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="artifact path (default MODEL-TARGET.ds4)")] = None,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp8 | mxfp4-experts | TABLE.json "
                                                "(per-unit formats; see ds4c inspect)")] = "auto",
    max_context: Annotated[int | None, typer.Option("--max-context", help="longest sequence the artifact serves")] = None,
    dump_ir: Annotated[Path | None, typer.Option("--dump-ir", help="write the IR after every pass into DIR")] = None,
    print_after_all: Annotated[bool, typer.Option("--print-after-all", help="print the IR after every pass")] = False,
    print_after: Annotated[list[str] | None, typer.Option("--print-after", help="print the IR after PASS")] = None,
    stop_after: Annotated[str | None, typer.Option("--stop-after", help="end the pipeline after PASS")] = None,
    bisect: Annotated[int | None, typer.Option("--bisect", help="apply only the first N rewrites")] = None,
    weights: Annotated[str, typer.Option(help="auto | embed | reference (checkpoint path or preset seed)")] = "auto",
    seed: Annotated[int | None, typer.Option(help="seed of a preset's random weights")] = None,
    hbm_budget: Annotated[str | None, typer.Option("--hbm-budget", help="device memory for weights + state + "
                                                   "activations, e.g. 40GB or 2.5e10 (bytes); the rest stays "
                                                   "in host memory, prefetched")] = None,
    csa_kv_on_host: Annotated[bool, typer.Option("--csa-kv-on-host", help="keep CSA compressed KV in host "
                                                 "memory; fetch only the selected entries")] = False,
    kernel_binaries: Annotated[bool | None, typer.Option(
        "--kernel-binaries/--no-kernel-binaries",
        help="store Triton binaries compiled ahead of time (cuda/rocm targets; default yes unless "
             "DS4C_KERNEL_BINARIES=0); without them the runtime JIT-compiles")] = None,
    activations: Annotated[str, typer.Option(
        help="native: FP8 linears multiply FP8 activations where the target's tensor cores do (h100, "
             "b200, ...); compute: weight-only quantisation, activations in the compute dtype")] = "native",
    allow_nonfinite_weights: Annotated[bool, typer.Option(
        "--allow-nonfinite-weights", help="accept NaN/Inf weights (refused by default, naming the tensor)")] = False,
    sign_key: Annotated[Path | None, typer.Option(
        "--sign-key", help="sign the artifact with this Ed25519 private key (PEM) instead of your own key "
                           "(made on first use under $DS4C_HOME, see `ds4c trust`)")] = None,
    fuse_norm_rope: Annotated[bool, typer.Option(
        "--fuse-norm-rope/--no-fuse-norm-rope", help="GPU lowering: a query's or key's norm and rotary "
                                                     "embedding as one op (off: apart, for A/B runs)")] = True,
    fuse_paged_reads: Annotated[bool, typer.Option(
        "--fuse-paged-reads/--no-fuse-paged-reads", help="GPU lowering: a serving step's indexer reads its keys "
                                                         "through the page tables (off: a gathered copy per token, "
                                                         "for A/B runs)")] = True,
    merge_linears: Annotated[bool, typer.Option(
        "--merge-linears/--no-merge-linears", help="GPU lowering: linears of one input as one GEMM over "
                                                   "concatenated weights")] = True,
    merge_packed: Annotated[bool, typer.Option(
        "--merge-packed/--no-merge-packed", help="GPU lowering: merge packed (FP8/INT8/MXFP4) siblings too")] = True,
    serving: Annotated[bool, typer.Option(
        "--serving", help="also compile the serving entry points (ragged_step, ragged_decode) that ds4c.Engine "
                          "runs: packed requests of any lengths over paged state")] = False,
    serving_opt: Annotated[list[str] | None, typer.Option(
        "--serving-opt", help="serving page layout / batch, KEY=VALUE (repeatable): window_page, comp_page, "
                              "max_chunk, max_running, max_step_tokens")] = None,
    pdl: Annotated[bool, typer.Option(
        "--pdl/--no-pdl", help="GPU kernels launch with programmatic dependent launch on sm_90+ (off: after the "
                               "previous kernel ends, for A/B runs; binaries and runtime follow it)")] = True,
    mesh: Annotated[str | None, typer.Option(
        "--mesh", help="shard over a device mesh, e.g. ep=4 or ep=2,tp=2: expert parallelism (ep) and tensor "
                       "parallelism of the experts (tp); add attention=dp for data-parallel attention (each "
                       "rank its rows of a batch); one program per rank in the artifact")] = None,
    gpus: Annotated[int | None, typer.Option(
        "--gpus", help="shard over N GPUs (the mesh chosen for the model: expert parallelism where the "
                       "experts split evenly)")] = None,
    speculative: Annotated[int, typer.Option(
        "--speculative", help="with --serving: also compile the MTP block for speculative decoding with up to K "
                              "drafts per step (ds4c serve / bench serve --speculative K)")] = 0,
    error_bound: Annotated[float | None, typer.Option(
        "--error-bound", help="--precision auto: the most error the chosen formats may add up to (KL of the "
                              "next-token distributions in nats where measured on the output, default 0.02; "
                              "NSR otherwise, default 0.1)")] = None,
) -> None:
    """Compile MODEL for TARGET into a .ds4 artifact."""
    import ds4c

    if Path(model).suffix == ".ds4" and Path(model).is_file():
        raise InputError(f"{model} is a ds4c artifact, compiled already: run it with `ds4c run {model}`, or compile "
                         f"the model it came from (`ds4c inspect {model}` shows its source)")
    _check_output(output if output is not None else Path(f"{Path(model).name}-{target}.ds4"), "--output", "model.ds4")
    try:
        if sign_key is not None:  # a key that cannot sign is refused before the compile, not after
            from ds4c.artifact.signing import load_signing_key

            load_signing_key(sign_key)
        art = ds4c.compile(model, target=target, precision=precision, max_context=max_context, dump_ir=dump_ir,
                           print_after_all=print_after_all, print_after=print_after or (), stop_after=stop_after,
                           bisect=bisect, weights=weights, seed=seed, progress=True,
                           hbm_budget=_parse_bytes(hbm_budget) if hbm_budget else None,
                           csa_kv_on_host=csa_kv_on_host, kernel_binaries=kernel_binaries,
                           activations=activations, allow_nonfinite=allow_nonfinite_weights,
                           lowering={"fuse_norm_rope": fuse_norm_rope, "fuse_paged_reads": fuse_paged_reads,
                                     "merge_linears": merge_linears,
                                     "merge_packed": merge_packed, "pdl": pdl},
                           serving=(_serving_options(serving_opt) or True) if serving or serving_opt else None,
                           mesh=mesh, gpus=gpus, speculative=speculative, error_bound=error_bound)
        if output is None:
            output = Path(f"{Path(model).name}-{target}.ds4")
        art.save(output, sign_key=sign_key if sign_key is not None else True)
    except Ds4cError as e:
        _fail(e)
    m = art.manifest
    ops = ", ".join(f"{n}: {len(g.ops)} ops" for n, g in art.program.graphs.items())
    if bisect is not None:
        r = m["rewrites"]
        console.print(f"bisect: applied {r['applied']} of {r['attempted']} rewrites")
    console.print(f"[green]compiled[/] {model} for {m['target']['name']} -> {output} "
                  f"({ops}; weights {m['weights']['mode']}, {m['weights']['bytes'] / 2**20:.1f} MiB "
                  f"{m['weights']['dtype']})")
    if "mesh" in m:
        per = ", ".join(f"{b / 2**20:.1f}" for b in m["weights"]["rank_bytes"])
        console.print(f"sharded over {m['mesh']['world']} ranks (mesh ep={m['mesh']['axes']['ep']},"
                      f"tp={m['mesh']['axes']['tp']}): weights per rank {per} MiB; run it with "
                      f"`ds4c run {output} --ranks {m['mesh']['world']}` (or --gpus on GPUs)")


def _check_output(path: Path, option: str, example: str) -> None:
    """Refuse, before any work, an output path that cannot be written: a folder, or one under a file."""
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file path, e.g. {path / example}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{option} {path}: {parent} is a file, not a folder; choose another path")
            break


def _parse_bytes(text: str) -> int:
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            t, scale = t[: -len(u)].strip(), units[u]
            break
    else:
        scale = 1
    try:
        value = float(t) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"--hbm-budget {text!r}: give a positive, finite number of bytes, e.g. 40GB, 512MiB "
                          "or 2.5e10")
    return int(value)


def _serving_options(items: list[str] | None) -> dict[str, int]:
    """``--serving-opt KEY=VALUE`` pairs as a dict of integers."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise ConfigError(f"--serving-opt {item!r}: give KEY=INTEGER, e.g. --serving-opt max_running=32") from None
        if not sep:
            raise ConfigError(f"--serving-opt {item!r}: give KEY=INTEGER, e.g. --serving-opt max_running=32")
    return out


def _parse_ids(text: str) -> list[list[int]]:
    """``--prompt-ids``: comma-separated token ids; ``;`` separates the rows of a batch."""
    rows = []
    for i, row in enumerate(text.split(";")):
        try:
            ids = [int(t) for t in row.replace(" ", "").split(",") if t]
        except ValueError:
            raise InputError(f"--prompt-ids {text!r}: give comma-separated integer token ids, e.g. 1,2,3 "
                             "(a batch: rows separated by ';', e.g. '1,2;3,4')") from None
        if not ids:
            where = "is empty" if ";" not in text else f"has an empty row (row {i})"
            raise InputError(f"--prompt-ids {where}: give at least one token id per row, e.g. --prompt-ids 1,2,3")
        rows.append(ids)
    return rows


@app.command()
@one_line_errors
def run(
    artifact: Annotated[Path, typer.Argument(help="a .ds4 artifact")],
    prompt_ids: Annotated[str | None, typer.Option("--prompt-ids", help="comma-separated token ids")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="text, tokenized with the artifact's tokenizer")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 16,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    backend: Annotated[str, typer.Option(help="auto | kernels (Triton) | compiled (Triton + Inductor) | npu (TVM host simulator) | reference")] = "auto",
    weights_from: Annotated[Path | None, typer.Option(
        "--weights-from", help="where the checkpoint an artifact compiled with --weights reference now is, "
                               "when it moved (checked against the artifact's record of its files)")] = None,
    trust_binaries: Annotated[bool, typer.Option(
        "--trust-binaries", help="use the native code stored in ARTIFACT (kernel binaries, NPU host build) even "
                                 "if no trusted key signed it")] = False,
    ranks: Annotated[int | None, typer.Option(
        "--ranks", help="run a sharded ARTIFACT as N processes on this machine (gloo on --device cpu); "
                        "torchrun ... -m ds4c run ARTIFACT starts them too")] = None,
    gpus: Annotated[int | None, typer.Option(
        "--gpus", help="run a sharded ARTIFACT on N GPUs of this machine, one process each (NCCL)")] = None,
    speculative: Annotated[int, typer.Option(
        "--speculative", help="draft K tokens per step with the MTP block (an artifact compiled with --serving "
                              "--speculative K; same tokens, fewer steps)")] = 0,
) -> None:
    """Load ARTIFACT and greedily generate tokens."""
    import ds4c
    from ds4c.distributed.runtime import leave
    from ds4c.runtime.model import as_token_ids, is_ragged
    from ds4c.runtime.tokenizer import tokenizer_for

    if (prompt_ids is None) == (prompt is None):
        _fail(Ds4cError("give exactly one of --prompt-ids 1,2,3 or --prompt TEXT"))
    if prompt is not None and not prompt:
        _fail(InputError("--prompt is empty: give some text, e.g. --prompt 'Hello', or token ids, e.g. --prompt-ids 1,2,3"))
    start_ranks(artifact, ranks, gpus, device)  # a sharded artifact's workers run this same command
    rows = _parse_ids(prompt_ids) if prompt_ids is not None else []
    ragged = is_ragged(rows)
    if not ragged:
        as_token_ids(rows)  # refused before the (possibly long) load
    try:
        model = ds4c.load(artifact, device=device, backend=backend, weights_from=weights_from,
                          trust_binaries=trust_binaries)
        tok = tokenizer_for(model)
        if prompt is not None:
            rows = [tok.encode(prompt)]
            if not rows[0]:
                raise InputError(f"--prompt {prompt!r} encodes to no tokens; give other text, or --prompt-ids")
        if ragged and not model.manifest.get("serving"):
            as_token_ids(rows)  # refuses the ragged batch with how to serve it
        accepted = None
        if speculative:
            if max_new_tokens < 1:
                raise InputError(f"--max-new-tokens {max_new_tokens}: give at least 1 with --speculative")
            engine = ds4c.Engine(model, speculative=speculative)
            if engine.rank:  # a sharded artifact's other ranks run rank 0's steps; rank 0 prints
                engine.follow()
                leave()
                return
            new_ids = engine.generate(rows, ds4c.SamplingParams(max_new_tokens=max_new_tokens))
            accepted = engine.stats()["acceptance_length"]
            engine.close()
            out = [list(ids) + new for ids, new in zip(rows, new_ids, strict=True)]
        else:
            out = model.generate(rows, max_new_tokens=max_new_tokens)
    except Ds4cError as e:
        _fail(e)
    if model.manifest.get("rank", 0):  # a sharded artifact's other ranks: rank 0 prints
        leave()
        return
    for i, ids in enumerate(rows):
        row = f" (row {i})" if len(rows) > 1 else ""
        new = list(out[i][len(ids):]) if isinstance(out, list) else out[i, len(ids):].tolist()
        console.print(f"prompt ids{row}: {ids}")
        console.print(f"generated ids{row}: {new}")
        if prompt is not None or tok.kind != "none":
            console.print(f"text{row}: {tok.decode(new)!r}")
    if speculative:
        console.print(f"speculative decoding, {speculative} drafts per step: "
                      + (f"{accepted:.2f} tokens per verify step" if accepted else "no verify step ran"))
    line = buffer_plan_line(model.buffer_plans())
    if line:
        console.print(line)
    leave()  # a sharded artifact's ranks: all here, then the group torn down (a no-op otherwise)


def buffer_plan_line(plans: dict) -> str:
    """One line on the kernels backend's static buffer plan per entry point that ran (empty if none)."""
    parts = []
    for entry, st in sorted(plans.items()):
        placed = sum(c.get("placed", 0) for c in st["results"].values())
        other = sum(n for c in st["results"].values() for k, n in c.items() if k != "placed")
        text = f"{entry} {st['arena_bytes'] / 2**20:.2f} MiB, {placed} results placed"
        if other:
            text += f" ({other} allocated by their op)"
        if st["captured_arena_bytes"]:
            text += f", CUDA graphs {st['captured_arena_bytes'] / 2**20:.2f} MiB"
        parts.append(text)
    return ("activations in planned arenas (model.buffer_plans()): " + "; ".join(parts)) if parts else ""


@app.command()
@one_line_errors
def tune(
    artifact: Annotated[Path, typer.Argument(help="a .ds4 artifact")],
    device: Annotated[str, typer.Option(help="the GPU to tune on")] = "cuda",
    backend: Annotated[str, typer.Option(help="kernels | compiled")] = "compiled",
    batch: Annotated[int, typer.Option(help="decode batch size to time")] = 1,
    only: Annotated[str | None, typer.Option(
        help="tune only these, comma-separated: a family (row_gemv) or family.field (row_gemv.prefetch)")] = None,
) -> None:
    """Time kernel configurations on this GPU (whole decode steps as CUDA graphs) and write the best
    as ARTIFACT.tune.json, which ds4c.load applies on the same device and Triton."""
    import ds4c
    from ds4c.runtime.autotune import restrict, tuning_path
    from ds4c.runtime.autotune import tune as run_tune

    if batch < 1:
        raise InputError(f"--batch must be 1 or more, got {batch}")
    try:
        candidates = restrict(only)
        model = ds4c.load(artifact, device=device, backend=backend, tuning=False)
        res = run_tune(model, artifact=artifact, batch=batch, log=console.print, candidates=candidates)
    except Ds4cError as e:
        _fail(e)
    console.print(f"decode step {res['baseline_s'] * 1e3:.3f} ms with the target's configurations, "
                  f"{res['best_s'] * 1e3:.3f} ms tuned: {json.dumps(res['table'])}")
    console.print(f"wrote {tuning_path(artifact)}")


@app.command()
@one_line_errors
def inspect(
    artifact: Annotated[Path, typer.Argument(help="a .ds4 artifact")],
    plots: Annotated[Path | None, typer.Option(help="write memory / schedule PNGs and Chrome traces to this folder")] = None,
) -> None:
    """Show target, pipeline, ops per layer, precision, weights, state layout, memory plan and streams of ARTIFACT."""
    from ds4c.artifact.artifact import read_artifact
    from ds4c.inspect import summarize, write_plan_plots

    if plots is not None and plots.exists() and not plots.is_dir():
        raise InputError(f"--plots {plots} is a file; give a folder (it is made if missing)")
    try:
        manifest, program, container = read_artifact(artifact)
    except Ds4cError as e:
        _fail(e)
    summarize(manifest, program, console)
    if "mesh" in manifest:
        from ds4c.inspect import mesh_table

        ranks = [program] + [read_artifact(artifact, rank=r)[1] for r in range(1, manifest["mesh"]["world"])]
        console.print(mesh_table(manifest, ranks))
    if plots is not None:
        for path in write_plan_plots(manifest, program, container, plots):
            console.print(f"wrote {path}")


@app.command()
@one_line_errors
def export(
    artifact: Annotated[Path, typer.Argument(help="a .ds4 artifact")],
    format: Annotated[str, typer.Option("--format", "-f", help="onnx | mlir-torch | mlir-linalg | stablehlo | tosa")],
    output: Annotated[Path, typer.Option("--output", "-o", help="file to write (.onnx, .mlir)")],
    entry: Annotated[str, typer.Option(help="prefill | decode")] = "prefill",
    batch: Annotated[int, typer.Option(help="static batch size")] = 1,
    seq: Annotated[int, typer.Option(help="static prompt length (prefill)")] = 16,
    dtype: Annotated[str | None, typer.Option(help="float32: compute in fp32 where the artifact uses bf16 "
                                                   "(onnxruntime's CPU provider lacks bf16 kernels)")] = None,
) -> None:
    """Export ARTIFACT's compiled graph (static shapes) to ONNX or MLIR; see ds4c.export."""
    from ds4c.export import export as export_to

    _check_output(output, "--output", "model.onnx" if format == "onnx" else "model.mlir")
    try:
        path = export_to(artifact, format, output, entry=entry, batch=batch, seq=seq, dtype=dtype)
    except Ds4cError as e:
        _fail(e)
    shape = f"batch {batch}" + (f", seq {seq}" if entry == "prefill" else "")
    console.print(f"[green]exported[/] {artifact} @{entry} ({shape}) as {format} -> {path} "
                  f"({path.stat().st_size / 2**20:.1f} MiB)")


@app.command()
@one_line_errors
def targets() -> None:
    """List the target records (hardware facts the passes read)."""
    from ds4c.targets import list_targets

    t = Table(title="ds4c targets")
    for col in ("name", "backend", "arch", "units", "HBM GB", "HBM TB/s", "bf16 TFLOP/s", "fp8", "fp4",
                "peer link GB/s"):
        t.add_column(col)
    for tg in list_targets():
        d = tg.to_dict()
        t.add_row(tg.name, str(d.get("backend")), str(d.get("arch")), str(d.get("compute_units")),
                  f"{(d.get('hbm_bytes') or 0) / 1e9:.0f}", f"{(d.get('hbm_bandwidth') or 0) / 1e12:.2f}",
                  f"{tg.peak('bf16') / 1e12:.0f}", "yes" if d.get("native_fp8") else "no",
                  "yes" if d.get("native_fp4") else "no",
                  f"{tg.peer_link_bandwidth / 1e9:.0f} ({tg.peer_link})" if tg.peer_link_bandwidth else "-")
    console.print(t)
    from ds4c.verification import verification

    v = Table(title="verified where", show_lines=True)
    for col in ("targets", "backend", "verified here (CPU, CI)", "on hardware"):
        v.add_column(col)
    by_backend: dict[str, list[str]] = {}
    for tg in list_targets():
        by_backend.setdefault(tg.backend, []).append(tg.name)
    for backend, names in by_backend.items():
        v.add_row(", ".join(names), backend, *verification(backend))
    console.print(v)


@app.command()
@one_line_errors
def cache(
    clear: Annotated[bool, typer.Option("--clear", help="remove every stored trace")] = False,
) -> None:
    """Show (or clear) the trace cache: torch.export traces kept between compiles."""
    from ds4c.frontend import trace_cache

    where = trace_cache.trace_dir()
    if clear:
        console.print(f"removed {trace_cache.clear()} traces from {where}")
        return
    entries = trace_cache.entries()
    size = sum(p.stat().st_size for p in entries)
    state = "on" if trace_cache.enabled() else "off (DS4C_TRACE_CACHE=0)"
    console.print(f"trace cache {where}: {state}, {len(entries)} traces, {size / 2**20:.1f} MiB "
                  f"(at most {trace_cache.MAX_ENTRIES}; DS4C_CACHE_DIR moves it)")


trust_app = typer.Typer(no_args_is_help=True, help="Keys whose signed artifacts may run their native code "
                                                    "(kernel binaries, NPU host builds) here.")
app.add_typer(trust_app, name="trust")


@trust_app.command("add")
@one_line_errors
def trust_add(key: Annotated[Path, typer.Argument(help="a publisher's Ed25519 public key (PEM, e.g. signing-key.pub)")]
              ) -> None:
    """Trust artifacts signed by KEY."""
    from ds4c.artifact import signing

    try:
        kid = signing.trust_key(key)
    except Ds4cError as e:
        _fail(e)
    console.print(f"trusted key {kid} ({signing.ds4c_home() / signing.TRUSTED_DIR / (kid + '.pub')})")


@trust_app.command("remove")
@one_line_errors
def trust_remove(key_id: Annotated[str, typer.Argument(help="key id, as `ds4c trust list` shows it")]) -> None:
    """Stop trusting the key KEY_ID."""
    from ds4c.artifact import signing

    try:
        path = signing.untrust_key(key_id)
    except Ds4cError as e:
        _fail(e)
    console.print(f"removed {path}")


@trust_app.command("list")
@one_line_errors
def trust_list() -> None:
    """The keys trusted here: your own and the ones added."""
    from ds4c.artifact import signing

    try:
        keys = signing.trusted_keys()
    except (Ds4cError, ImportError) as e:
        _fail(Ds4cError(f"cannot read the trusted keys ({e}); install the 'cryptography' package"))
    for kid, (_, where) in keys.items():
        console.print(f"{kid}  {where}", markup=False, highlight=False)
    if not keys:
        console.print(f"no keys yet under {signing.ds4c_home()}: yours is made at the first compile")


@trust_app.command("export")
@one_line_errors
def trust_export(output: Annotated[Path | None, typer.Option("--output", "-o", help="write to FILE (default: "
                                                                                    "print it)")] = None) -> None:
    """Your public key (made if needed), to give to those who run your artifacts (`ds4c trust add`)."""
    from ds4c.artifact import signing

    if output is not None:
        _check_output(output, "--output", "signing-key.pub")
        if not output.parent.is_dir():
            raise InputError(f"--output {output}: folder {output.parent} does not exist; make it or choose another")
    try:
        pem = signing.public_key_pem(signing.local_key())
    except (Ds4cError, ImportError) as e:
        _fail(Ds4cError(f"no signing key ({e}); install the 'cryptography' package"))
    if output is None:
        console.print(pem.decode().strip(), markup=False, highlight=False)
    else:
        output.write_bytes(pem)
        console.print(f"wrote {output}")


@app.command()
@one_line_errors
def sign(
    artifact: Annotated[Path, typer.Argument(help="a .ds4 artifact, signed anew in place")],
    key: Annotated[Path | None, typer.Option("--key", help="Ed25519 private key (PEM); default: yours")] = None,
) -> None:
    """Sign ARTIFACT with your key (or KEY): after checking its contents, or to publish it under KEY."""
    from ds4c.artifact import signing

    try:
        kid = signing.sign_file(artifact, key if key is not None else True)
    except Ds4cError as e:
        _fail(e)
    console.print(f"signed {artifact} with key {kid}")


@app.command()
@one_line_errors
def serve(
    artifact: Annotated[Path, typer.Argument(help="a .ds4 artifact compiled with --serving")],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on (0: a free one, printed)")] = 8000,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    backend: Annotated[str, typer.Option(help="auto | kernels | compiled | reference")] = "auto",
    model_name: Annotated[str | None, typer.Option("--model-name", help="the model id clients name "
                                                                       "(default: the artifact's file name)")] = None,
    max_waiting: Annotated[int, typer.Option("--max-waiting", help="queued requests beyond which new ones get "
                                                                    "429 Retry-After")] = 256,
    max_running: Annotated[int | None, typer.Option("--max-running", help="requests in the running batch "
                                                                          "(default: the artifact's)")] = None,
    grace: Annotated[float, typer.Option(help="seconds in-flight requests get to finish after SIGTERM")] = 30.0,
    prefix_cache: Annotated[bool, typer.Option("--prefix-cache/--no-prefix-cache",
                                               help="reuse the state of shared prompt prefixes")] = True,
    state_budget: Annotated[str | None, typer.Option(
        "--state-budget", help="device memory for the requests' state pools, e.g. 20GB (default: the "
                               "compiled plan's)")] = None,
    trust_binaries: Annotated[bool, typer.Option(
        "--trust-binaries", help="use the native code stored in ARTIFACT even if no trusted key signed it")] = False,
    ranks: Annotated[int | None, typer.Option("--ranks", help="a sharded ARTIFACT as N CPU processes (rank 0 "
                                                              "serves, the others run its steps)")] = None,
    gpus: Annotated[int | None, typer.Option("--gpus", help="a sharded ARTIFACT on N GPUs, one process each")] = None,
    speculative: Annotated[int, typer.Option(
        "--speculative", help="draft K tokens per step with the MTP block (an artifact compiled with "
                              "--speculative)")] = 0,
) -> None:
    """Serve ARTIFACT with the OpenAI API over HTTP: /v1/completions, /v1/chat/completions (when the
    checkpoint shipped a chat template), /v1/models, /health, /metrics (Prometheus)."""
    try:
        from ds4c.server import serve as run_server
    except ImportError as e:
        _fail(InputError(f"ds4c serve needs the server packages ({e.name} is missing): pip install 'ds4c[serve]'"))
    import ds4c
    from ds4c.runtime.tokenizer import tokenizer_for

    if max_waiting < 1:
        _fail(InputError(f"--max-waiting {max_waiting}: must be >= 1"))
    if not 0 <= port <= 65535:
        _fail(InputError(f"--port {port}: must be in [0, 65535]"))
    if grace < 0:
        _fail(InputError(f"--grace {grace}: must be >= 0 seconds"))
    start_ranks(artifact, ranks, gpus, device)
    try:
        model = ds4c.load(artifact, device=device, backend=backend, trust_binaries=trust_binaries)
        engine = ds4c.Engine(model, max_running=max_running, prefix_cache=prefix_cache,
                             state_budget=_parse_bytes(state_budget) if state_budget else None, speculative=speculative)
        if engine.rank:  # a sharded artifact's other ranks run rank 0's steps
            engine.follow()
            return
        tokenizer = tokenizer_for(model)
    except Ds4cError as e:
        _fail(e)
    name = model_name or artifact.stem
    chat = "with chat" if tokenizer.chat_template else "no chat template: completions only"
    if prefix_cache:
        chat += ", prefix cache"

    def ready(bound: int) -> None:
        console.print(f"serving {name} ({chat}) on http://{host}:{bound}/v1 - {engine.max_running} running at "
                      f"most, {max_waiting} waiting; SIGTERM drains ({grace:g} s)", highlight=False, soft_wrap=True)

    run_server(engine, tokenizer, model_name=name, host=host, port=port, max_waiting=max_waiting, grace=grace,
               log_level="warning", on_ready=ready)


bench_app = typer.Typer(no_args_is_help=True, help="Measure an artifact under a workload.")
app.add_typer(bench_app, name="bench")


@bench_app.command("serve")
@one_line_errors
def bench_serve(
    artifact: Annotated[Path | None, typer.Argument(help="a .ds4 artifact compiled with --serving (or --url)")] = None,
    url: Annotated[str | None, typer.Option("--url", help="drive a running `ds4c serve` at this address instead, "
                                                          "e.g. http://127.0.0.1:8000")] = None,
    requests: Annotated[int, typer.Option("--requests", help="requests in the trace")] = 64,
    rate: Annotated[float | None, typer.Option("--rate", help="Poisson arrivals, requests per second")] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", help="closed loop: requests in flight")] = None,
    prompt_len: Annotated[str, typer.Option("--prompt-len", help="LOW:HIGH prompt tokens")] = "16:128",
    output_len: Annotated[str, typer.Option("--output-len", help="LOW:HIGH output tokens")] = "8:64",
    dist: Annotated[str, typer.Option("--dist", help="uniform | lognormal")] = "uniform",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    shared_prefix: Annotated[str | None, typer.Option(
        "--shared-prefix", help="LEN[:FRACTION]: that fraction of requests starts with one LEN-token system prompt")] = None,
    turns: Annotated[int, typer.Option("--turns", help="multi-turn sessions: each of --requests sessions sends this "
                                                       "many turns, each with the whole history")] = 1,
    prefix_cache: Annotated[bool, typer.Option("--prefix-cache/--no-prefix-cache",
                                               help="the engine reuses shared prefixes")] = True,
    compare: Annotated[str, typer.Option("--compare", help="baselines, comma-separated: static (padded batches), "
                                                          "nocache (the engine without the prefix cache), "
                                                          "transformers (its generate, padded batches), or none")
                       ] = "static",
    static_batch: Annotated[int, typer.Option("--static-batch", help="the padded baselines' batch size")] = 8,
    state_budget: Annotated[str | None, typer.Option(
        "--state-budget", help="device memory for the engine's state pools, e.g. 20GB (default: the compiled "
                               "plan's)")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
    ranks: Annotated[int | None, typer.Option("--ranks", help="a sharded ARTIFACT as N CPU processes")] = None,
    gpus: Annotated[int | None, typer.Option("--gpus", help="a sharded ARTIFACT on N GPUs, one process each")] = None,
    speculative: Annotated[int, typer.Option(
        "--speculative", help="the engine drafts K tokens per step with the MTP block; the report gives the "
                              "acceptance length")] = 0,
    overlap: Annotated[bool | None, typer.Option(
        "--overlap/--no-overlap", help="launch each decode step before the previous one's tokens are read "
                                       "(default: on CUDA)")] = None,
    trust_binaries: Annotated[bool, typer.Option(
        "--trust-binaries", help="use the kernel binaries stored in ARTIFACT even if no trusted key signed it "
                                 "(otherwise Triton compiles the kernels at the engine's start)")] = False,
) -> None:
    """Serve a synthetic trace on ds4c.Engine (or a running `ds4c serve`, --url) and report
    throughput, TTFT and TPOT (p50/p90/p99), pages, preemptions, prompt tokens computed and prefix
    hits, against static batching of the same requests and/or the engine without the prefix cache."""
    import json

    import ds4c
    from ds4c.bench.serve import make_workload, run_engine, run_http, run_static, summarize
    from ds4c.progress import progress_steps

    start_ranks(artifact, ranks, gpus, device)
    if concurrency is None and rate is None:
        concurrency = 8
    if (artifact is None) == (url is None):
        _fail(InputError("give an artifact to serve here, or --url of a running `ds4c serve` (not both)"))
    bases = [b for b in compare.split(",") if b and b != "none"]
    bad = [b for b in bases if b not in ("static", "nocache", "transformers")]
    if bad:
        _fail(InputError(f"--compare {','.join(bad)}: the baselines are static, nocache, transformers (or none)"))
    if url is not None:
        bases = []  # a running server is measured as it is
    elif turns > 1:
        bases = [b for b in bases if b not in ("static", "transformers")]  # padded batches cannot continue sessions
    try:
        if url is not None:
            import httpx

            try:
                info = httpx.get(url.rstrip("/") + "/v1/models", timeout=30).json()["data"][0]
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
                raise InputError(f"--url {url}: no ds4c serve answering /v1/models there ({e})") from None
            vocab, max_context, where = info.get("vocab_size", 100), info["max_model_len"], url
            model = None
        else:
            model = ds4c.load(artifact, device=device, trust_binaries=trust_binaries)
            vocab, max_context, where = model.vocab_size, model.max_context, str(model.device)
            budget = _parse_bytes(state_budget) if state_budget else None
            if "mesh" in model.manifest:  # sharded: the engine alone (baselines would need every rank too)
                if model.manifest["rank"]:
                    ds4c.Engine(model, prefix_cache=prefix_cache, state_budget=budget).follow()
                    return
                if bases:
                    console.print(f"a sharded artifact: --compare {','.join(bases)} skipped (the engine alone)")
                bases = []
        work = make_workload(requests, prompt_len, output_len, vocab, max_context=max_context, rate=rate,
                             concurrency=concurrency, dist=dist, seed=seed, shared_prefix=shared_prefix, turns=turns)
        report: dict = {"artifact": str(artifact) if artifact else None, "url": url, "device": where,
                        "workload": {"requests": requests, "rate": rate, "concurrency": concurrency,
                                     "prompt_len": prompt_len, "output_len": output_len, "dist": dist, "seed": seed,
                                     "shared_prefix": shared_prefix, "turns": turns,
                                     "shareable_tokens": work.shareable()}}
        total = work.total_requests
        if url is not None:
            with progress_steps(f"ds4c serve at {url}", total=total, enabled=True) as steps:
                report["server"] = summarize(run_http(url, work, on_finish=steps.advance))
        else:
            sync = torch_sync(model.device)
            name = ("engine" + (" (prefix cache)" if prefix_cache else "")
                    + (f" (speculative, {speculative} drafts)" if speculative else ""))
            memory = report["device_memory"] = {"after_load": device_memory(model.device)}
            with progress_steps(name, total=total, enabled=True) as steps:
                engine = ds4c.Engine(model, prefix_cache=prefix_cache, state_budget=budget, speculative=speculative,
                                     overlap=overlap)
                memory["engine_started"] = device_memory(model.device)
                samples = memory["during"] = []  # allocated bytes after every tenth of the requests finished
                every, count = max(1, total // 10), [0]

                def finished() -> None:
                    steps.advance()
                    count[0] += 1
                    if model.device.type == "cuda" and count[0] % every == 0:
                        samples.append([count[0], device_memory(model.device)["allocated"]])

                report["engine"] = summarize(run_engine(engine, work, sync=sync, on_finish=finished))
                report["engine"]["overlap"] = {"on": engine.overlap,
                                               "overlapped_steps": engine.stats()["overlapped_steps"]}
                if speculative:
                    report["engine"]["speculative"] = {"drafts": speculative,
                                                       "acceptance_length": engine.stats()["acceptance_length"]}
                memory["engine_peak"] = device_memory(model.device, peak=True)
                engine.close()  # its pools and graphs back to the allocator before a baseline takes memory
                engine = None
            main = report["engine"]
            if main.get("decode_batch") and main.get("decode_tokens_per_s"):
                from ds4c.bench.serve import decode_bound

                bound = decode_bound(model, main["decode_batch"], main["mean_context"])
                main["decode_hbm_bound"] = bound
                main["decode_vs_bound"] = main["decode_tokens_per_s"] / bound["tokens_per_s"]
            if "nocache" in bases and prefix_cache:
                release_device_memory(model.device)  # the first engine's pools, before the second takes its own
                with baseline(report, "nocache", model.device), \
                        progress_steps("engine without the prefix cache", total=total, enabled=True) as steps:
                    engine = ds4c.Engine(model, state_budget=budget)
                    report["nocache"] = summarize(run_engine(engine, work, sync=sync, on_finish=steps.advance))
                    engine.close()
                    engine = None
            if "static" in bases:
                release_device_memory(model.device)
                with baseline(report, "static", model.device), \
                        progress_steps(f"static batches of {static_batch}", total=total, enabled=True) as steps:
                    report["static"] = summarize(run_static(model, work, static_batch, sync=sync,
                                                            on_finish=steps.advance))
            if "transformers" in bases:
                from ds4c.bench.peers import transformers_generate, transformers_model

                manifest, dev = model.manifest, model.device
                model = None  # its weights leave the device before transformers' copy comes
                release_device_memory(dev)
                hf = None
                with baseline(report, "transformers", dev):
                    with progress_steps("transformers: loading the artifact's weights", total=1,
                                        enabled=True) as steps:
                        hf = transformers_model(manifest, dev)
                        steps.advance()
                    with progress_steps(f"transformers generate, batches of {static_batch}", total=total,
                                        enabled=True) as steps:
                        report["transformers"] = summarize(run_static(
                            hf, work, static_batch, sync=sync, on_finish=steps.advance,
                            generate=transformers_generate(hf, sync), name="transformers"))
                hf = None
                release_device_memory(dev)
    except Ds4cError as e:
        _fail(e)
    table = Table(title=f"bench serve: {work.total_requests} requests on {where}")
    for col in ("", "out tok/s", "req/s", "TTFT p50 / p99 (ms)", "TPOT p50 / p99 (ms)", "prompt tok computed",
                "prefix hits", "preemptions"):
        table.add_column(col, justify="left" if not col else "right")
    for name in ("server", "engine", "nocache", "static", "transformers"):
        r = report.get(name)
        if r is None:
            continue

        def ms(d: dict) -> str:
            return "-" if d["p50"] is None else f"{1e3 * d['p50']:.1f} / {1e3 * d['p99']:.1f}"

        hits = "-" if "prefix_hit_tokens" not in r else str(r["prefix_hit_tokens"])
        table.add_row(name, f"{r['output_tokens_per_s']:.1f}", f"{r['requests_per_s']:.2f}", ms(r["ttft_s"]),
                      ms(r["tpot_s"]), str(r.get("prompt_tokens_computed", "-")), hits, str(r.get("preemptions", "-")))
    console.print(table)
    main = report.get("engine") or report.get("server")
    for base in ("static", "nocache", "transformers"):
        if base in report:
            console.print(f"{'engine' if 'engine' in report else 'server'} / {base} output tokens/s: "
                          f"{main['output_tokens_per_s'] / report[base]['output_tokens_per_s']:.2f}x")
    if "nocache" in report and main["ttft_s"]["p50"]:
        console.print(f"TTFT p50 without / with the prefix cache: "
                      f"{report['nocache']['ttft_s']['p50'] / main['ttft_s']['p50']:.2f}x")
    if main.get("shareable_tokens"):
        console.print(f"prefix hits {main.get('prefix_hit_tokens', 0)} of {main['shareable_tokens']} tokens shareable "
                      f"by construction ({main.get('hit_vs_ideal', 0):.0%})")
    if "decode_vs_bound" in main:
        b = main["decode_hbm_bound"]
        console.print(f"decode-only steps: batch {main['decode_batch']:.1f}, {main['decode_tokens_per_s']:.0f} tok/s = "
                      f"{main['decode_vs_bound']:.2f} of the HBM bound ({b['tokens_per_s']:.0f} tok/s: "
                      f"{b['step_bytes'] / 1e9:.3f} GB per step at {b['hbm_bandwidth'] / 1e12:.2f} TB/s, {b['target']})")
    if main.get("prompt_step_s"):
        console.print(f"steps with prompt chunks: {main['prompt_steps']}, {main['prompt_step_s'] * 1e3:.1f} ms each on "
                      f"average (against TTFT p50 {main['ttft_s']['p50'] * 1e3:.1f} ms)")
    if "pages_peak" in main:
        console.print(f"pages in use at most: {main['pages_peak']}")
    during = (report.get("device_memory") or {}).get("during") or []
    if len(during) >= 3:  # the first tenth warms up (graphs, allocator); growth after it is a leak
        after = [b for _, b in during[1:]]
        console.print(f"device memory allocated over the run: {during[0][1] / 2**30:.3f} GiB after {during[0][0]} "
                      f"requests, then {min(after) / 2**30:.3f} .. {max(after) / 2**30:.3f} GiB up to {during[-1][0]} "
                      f"(growth after warm-up {(after[-1] - after[0]) / 2**20:+.1f} MiB)")
    for name, why in (report.get("baseline_errors") or {}).items():
        console.print(f"[yellow]{name}: not measured[/] ({why})")
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=1))
        console.print(f"report: {json_out}")


def start_ranks(artifact: Path | None, ranks: int | None, gpus: int | None, device: str) -> None:
    """With ``--ranks N`` / ``--gpus N``: run this command as one worker process per rank of the
    sharded ``artifact`` and exit with their status (ds4c.runtime.launch); otherwise nothing."""
    if ranks is None and gpus is None:
        return
    from ds4c.runtime.launch import launch_workers

    if artifact is None:
        raise InputError("--ranks / --gpus start the ranks of a sharded artifact; give the artifact")
    raise typer.Exit(launch_workers(artifact, ranks=ranks, gpus=gpus, device=device, argv=sys.argv[1:]))


@contextlib.contextmanager
def baseline(report: dict, name: str, device) -> Iterator[None]:
    """Run a bench serve baseline; one that runs out of device memory is reported as not measured
    (``report["baseline_errors"]``), and the measurements before it are kept."""
    import torch

    try:
        yield
    except (torch.OutOfMemoryError, Ds4cError) as e:
        # the executors name the op that failed (an IRError whose cause is the out-of-memory error)
        if not isinstance(e, torch.OutOfMemoryError) and not isinstance(e.__cause__, torch.OutOfMemoryError):
            raise
        e = e if isinstance(e, torch.OutOfMemoryError) else e.__cause__
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "out of memory")
        report.setdefault("baseline_errors", {})[name] = f"out of device memory: {first[:200]}"
        report.pop(name, None)
        release_device_memory(device)


def device_memory(device, peak: bool = False) -> dict | None:
    """Bytes allocated (or the peak so far) and reserved by PyTorch on a CUDA device; None elsewhere."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    allocated = torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
    return {"allocated": allocated, "reserved": torch.cuda.memory_reserved(device),
            "total": torch.cuda.get_device_properties(device).total_memory}


def release_device_memory(device) -> None:
    """Give the memory of dropped engines (their pools and CUDA graphs) back to the device, so the
    next engine of a benchmark can take its planned pools."""
    import gc

    import torch

    gc.collect()
    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.empty_cache()


def torch_sync(device):
    """A function that waits for ``device``'s queued work (a no-op on the CPU)."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.synchronize
    return lambda: None


debug_app = typer.Typer(no_args_is_help=True, help="Find what a pass did to the numbers.")
app.add_typer(debug_app, name="debug")


@debug_app.command("numerics")
@one_line_errors
def debug_numerics(
    model: Annotated[str, typer.Argument(help="preset, checkpoint directory, or a .ds4 artifact")],
    against: Annotated[Path | None, typer.Option(help="a second artifact to compare side by side")] = None,
    pipeline: Annotated[str, typer.Option(help="pipeline name, or comma-separated pass names")] = "default",
    target: Annotated[str | None, typer.Option("--target", "-t", help="for a model (default cpu): a Triton "
                                               "target (h100, b200, ...) adds its GPU lowering passes; an "
                                               "artifact keeps its own")] = None,
    entry: Annotated[str, typer.Option(help="prefill | decode")] = "prefill",
    atol: Annotated[float, typer.Option(help="tolerance (max abs error)")] = 1e-4,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="prompt tokens to run (default: up to 64)")] = None,
    max_context: Annotated[int | None, typer.Option("--max-context", help="for a model (default 256); an "
                                                    "artifact keeps its own")] = None,
) -> None:
    """Run the graph after every pass on the same inputs; name the first pass and op that diverge.
    An artifact is recompiled from its source as its manifest records (target, precision, context,
    pipeline); with --against, two artifacts of one model (any precision or context) side by side."""
    from ds4c.debug.session import (
        is_artifact,
        numerics_for_artifact,
        numerics_for_artifacts,
        numerics_for_model,
    )

    passes = pipeline if "," not in pipeline else [p for p in pipeline.split(",") if p]
    notes: list[str] = []
    if is_artifact(model) and (pipeline != "default" or max_context is not None or target is not None):
        raise InputError(f"{model} is an artifact: it is debugged with its own pipeline, target and context; drop "
                         "--pipeline / --target / --max-context, or give the model it was compiled from")
    if against is not None and not is_artifact(model):
        raise InputError(f"--against compares two artifacts: {model} is not a .ds4 artifact file")
    try:
        if against is not None:
            div, notes = numerics_for_artifacts(model, against, entry=entry, atol=atol, seq_len=seq_len)
        elif is_artifact(model):
            div, notes = numerics_for_artifact(model, entry=entry, atol=atol, seq_len=seq_len)
        else:
            div, _ = numerics_for_model(model, target=target or "cpu", pipeline=passes, entry=entry, atol=atol,
                                        seq_len=seq_len, max_context=max_context if max_context is not None else 256)
    except Ds4cError as e:
        _fail(e)
    for note in notes:
        console.print(note, markup=False, highlight=False)
    if div is None:
        console.print(f"[green]no divergence[/] beyond {atol:g} on @{entry}")
        return
    console.print(str(div), markup=False, highlight=False)
    raise typer.Exit(1)


@debug_app.command("bisect")
@one_line_errors
def debug_bisect(
    model: Annotated[str, typer.Argument(help="preset or checkpoint directory (an artifact: bisect its source)")],
    pipeline: Annotated[str, typer.Option(help="pipeline name, or comma-separated pass names")] = "default",
    target: Annotated[str, typer.Option("--target", "-t", help="a Triton target (h100, b200, ...) adds its GPU "
                                        "lowering passes")] = "cpu",
    entry: Annotated[str, typer.Option(help="prefill | decode")] = "prefill",
    atol: Annotated[float, typer.Option(help="tolerance (max abs error)")] = 1e-4,
    max_context: Annotated[int | None, typer.Option("--max-context")] = 256,
) -> None:
    """Binary-search the pipeline's rewrites for the first one that breaks the numbers (reproduce it
    with `ds4c compile --target T --precision fp32 --bisect N`)."""
    from ds4c.debug.session import bisect_model

    passes = pipeline if "," not in pipeline else [p for p in pipeline.split(",") if p]
    try:
        res = bisect_model(model, target=target, pipeline=passes, entry=entry, atol=atol, max_context=max_context)
    except Ds4cError as e:
        _fail(e)
    if res["first_bad_rewrite"] is None:
        console.print(f"[green]all {res['total_rewrites']} rewrites keep the numbers[/] ({res['runs']} run)")
        return
    console.print(f"first bad rewrite: #{res['first_bad_rewrite']} of {res['total_rewrites']} in pass "
                  f"'{res['pass']}': {res['rewrite']} (found in {res['runs']} runs; "
                  f"reproduce with `ds4c compile {model} --target {target} --precision fp32 "
                  f"--bisect {res['first_bad_rewrite'] + 1}`)",
                  markup=False)
    raise typer.Exit(1)


def main() -> None:
    """The ``ds4c`` executable: a usage error (an unknown option, a missing argument, a value of
    the wrong type) or a ``Ds4cError`` is one line on stderr and exit status 2; anything else is a
    bug and keeps its traceback."""
    try:
        code = app(prog_name="ds4c", standalone_mode=False)
    except _usage_errors() as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `ds4c debug`: the group's help page
            e.show()
        else:
            ctx = getattr(e, "ctx", None)
            where = f" (`{ctx.command_path} --help` lists what it takes)" if ctx is not None else ""
            err.print(Text("error: ", style="bold red") + Text(e.format_message() + where), soft_wrap=True,
                      highlight=False)
        code = e.exit_code
    except typer.Abort:
        err.print("aborted")
        code = 1
    except Ds4cError as e:  # commands catch their own (one_line_errors); this is a safety net
        try:
            _fail(e)
        except typer.Exit as done:
            code = done.exit_code
    sys.exit(code if isinstance(code, int) else 0)


def _usage_errors() -> tuple[type[Exception], ...]:
    """What command-line parsing raises: typer's own exceptions (typer >= 0.29 vendors click),
    or click's where typer still uses the click package."""
    errors: list[type[Exception]] = [typer.TyperException] if hasattr(typer, "TyperException") else []
    try:
        import click

        errors.append(click.ClickException)
    except ImportError:  # pragma: no cover - typer >= 0.29 does not need click
        pass
    return tuple(errors)


if __name__ == "__main__":
    main()
