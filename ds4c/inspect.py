"""``ds4c inspect``: what an artifact holds, per layer."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from ds4c.ir.graph import Graph, Program
from ds4c.ir.registry import packed_variants

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_of(loc: str | None) -> int | None:
    if not loc:
        return None
    m = _LAYER.search(loc)
    return int(m.group(1)) if m else None


def ops_by_layer(graph: Graph) -> dict[int | None, Counter]:
    out: dict[int | None, Counter] = {}
    for op in graph.ops:
        out.setdefault(layer_of(op.loc), Counter())[op.name] += 1
    return out


# Plain GEMMs go to the vendor BLAS; these compute ops should live inside fused ops.
PLAIN_GEMMS = {"aten.linear.default", "aten.mm.default", "aten.addmm.default"}
UNFUSED_COMPUTE = {"aten.softmax.int", "aten._softmax.default", "aten.topk.default", "aten.matmul.default",
                   "aten.bmm.default", "aten.baddbmm.default", "aten.sigmoid.default", "aten.rsqrt.default",
                   "aten.exp.default", "aten.silu.default", "aten.softplus.default"}
ATTN_SHORT = {"sliding_attention": "sliding", "compressed_sparse_attention": "CSA",
              "heavily_compressed_attention": "HCA"}
MLP_SHORT = {"hash_moe": "hash MoE", "moe": "MoE"}


def _short(name: str) -> str:
    parts = name.split(".")
    return parts[1] if parts[0] == "aten" and len(parts) == 3 else name


def summarize(manifest: dict[str, Any], program: Program, console: Console) -> None:
    t = manifest["target"]
    w = manifest["weights"]
    cfg = manifest["model"]["config"]
    console.print(f"[bold]target[/] {t['name']} ({t.get('backend')}, {t.get('arch')})   "
                  f"[bold]ds4c[/] {manifest.get('ds4c_version')}   [bold]format[/] {manifest.get('format_version')}")
    console.print(f"[bold]model[/] {manifest['model']['source']}  layers={cfg.get('num_hidden_layers')} "
                  f"hidden={cfg.get('hidden_size')} vocab={cfg.get('vocab_size')}")
    prec = manifest["precision"]
    console.print(f"[bold]precision[/] {prec.get('policy')} (compute {prec.get('compute_dtype')})   "
                  f"[bold]max_context[/] {manifest['max_context']}")
    console.print(f"[bold]pipeline[/] {' -> '.join(manifest.get('pipeline', [])) or '(none)'}")
    console.print(f"[bold]weights[/] {w['mode']} ({w['bytes'] / 2**20:.1f} MiB {w['dtype']}, {len(w['tensors'])} tensors)"
                  f" source={w['source']}; transforms={[tr['op'] for tr in w.get('transforms', [])]}")
    if prec.get("units"):
        console.print(precision_table(prec))
    st = Table(title="model state per sequence")
    st.add_column("tensor")
    st.add_column("shape")
    st.add_column("dtype")
    st.add_column("KiB", justify="right")
    total = 0
    for s in manifest["state"]:
        n = 1
        for d in s["shape"][1:]:
            n *= int(d)
        nbytes = n * (2 if s["dtype"] in ("bfloat16", "float16") else 4 if s["dtype"] in ("float32", "int32") else 8)
        total += nbytes
        st.add_row(s["name"], str(s["shape"]), s["dtype"], f"{nbytes / 1024:.1f}")
    console.print(st)
    console.print(f"state total per sequence: {total / 2**20:.2f} MiB")
    if manifest.get("serving"):
        console.print(serving_table(manifest["serving"]))
    if manifest.get("memory_plan") or manifest.get("schedule"):
        console.print(plan_table(manifest))
    layer_types = cfg.get("layer_types") or []
    mlp_types = cfg.get("mlp_layer_types") or []
    for name, g in program.graphs.items():
        tb = Table(title=f"@{name}: {len(g.ops)} ops, {len(g.inputs_of_kind('param'))} weights, "
                         f"{len(g.inputs_of_kind('const'))} consts")
        tb.add_column("layer")
        tb.add_column("attention")
        tb.add_column("mlp")
        tb.add_column("ops", justify="right")
        tb.add_column("fused ops")
        tb.add_column("GEMMs", justify="right")
        tb.add_column("left unfused (compute)")
        tb.add_column("other", justify="right")
        for layer, counts in sorted(ops_by_layer(g).items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            attn = ATTN_SHORT.get(layer_types[layer], "?") if layer is not None and layer < len(layer_types) else "-"
            mlp = MLP_SHORT.get(mlp_types[layer], "?") if layer is not None and layer < len(mlp_types) else "-"
            fused = {k: v for k, v in counts.items() if not k.startswith(("aten.", "sym."))}
            gemms = sum(v for k, v in counts.items() if k in PLAIN_GEMMS)
            unfused = {k: v for k, v in counts.items() if k in UNFUSED_COMPUTE}
            other = sum(counts.values()) - sum(fused.values()) - gemms - sum(unfused.values())
            tb.add_row("model" if layer is None else str(layer), attn, mlp, str(sum(counts.values())),
                       ", ".join(f"{k}×{v}" for k, v in sorted(fused.items())) or "-", str(gemms),
                       ", ".join(f"{_short(k)}×{v}" for k, v in sorted(unfused.items())) or "none", str(other))
        console.print(tb)
    if t.get("backend") in ("cuda", "rocm"):
        console.print(lowered_program_table(manifest, program))
        console.print(lowering_line(manifest, program))
        line = runtime_buffer_plan_line(manifest, program.graphs)
        if line:
            console.print(line)
    kernels = manifest.get("kernels") or {}
    if kernels.get("backend") == "npu":  # NPU vs host per op kind, SRAM working sets (ds4c.backends.npu.report)
        from ds4c.backends.npu.report import kernel_table, placement_table

        console.print(placement_table(kernels))
        console.print(kernel_table(kernels))
    console.print(f"[bold]kernels[/] {len(kernels)} stored" + ("" if kernels else " (reference backend: none needed)"))


def lowering_line(manifest: dict[str, Any], program: Program) -> str:
    """The GPU lowering stage as the artifact records it: its passes and options, and what the
    kernels read (packed-weight ops, fused norm+rope, merged linears, weights made at load)."""
    lowering = manifest.get("lowering")
    if not lowering:
        return ("[bold]lowering[/] none recorded (compiled by an older ds4c): the kernels expand packed "
                "weights at every step; recompile")
    counts: dict[str, int] = {}
    for g in program.graphs.values():
        for op in g.ops:
            if op.name in packed_variants() or op.name == "rms_norm.rope":
                counts[op.name] = counts.get(op.name, 0) + 1
    made = {tr["op"]: len(tr["tensors"]) for tr in manifest["weights"].get("transforms", [])
            if tr["op"] in ("dequantize", "concat")}
    options = ", ".join(f"{k}={'on' if v else 'off'}" for k, v in lowering.get("options", {}).items())
    ops = ", ".join(f"{k}×{v}" for k, v in sorted(counts.items())) or "none"
    return (f"[bold]lowering[/] {' -> '.join(lowering.get('passes', []))} ({options}); kernel ops {ops}; "
            f"weights made at load: {made.get('concat', 0)} concatenations (merged linears), "
            f"{made.get('dequantize', 0)} expanded from packed")


def packed_formats(graph: Graph) -> Counter:
    """(op, weight format(s) and the activation format it multiplies in) -> count, for each op of
    ``graph`` that reads packed weights as stored."""
    reads_packed = packed_variants()
    out: Counter = Counter()
    for op in graph.ops:
        if op.name in reads_packed:
            formats = op.kwargs.get("formats") or [op.kwargs.get("format")]
            fmt = "+".join(sorted({str(f) for f in formats if f not in (None, "none")})) or "none"
            act = op.kwargs.get("act")
            out[f"{op.name} {fmt}" + (f" (act {act})" if act else "")] += 1
    return out


def merged_linears(graph: Graph, concats: dict[str, list[str]]) -> tuple[int, int]:
    """(GEMMs over a concatenated weight, linears they replace) in ``graph``; ``concats``: the
    manifest's ``concat`` weight transforms (merged name -> part names)."""
    gemms = parts = 0
    for op in graph.ops:
        if op.name in ("aten.linear.default", "linear.packed") and len(op.args) > 1:
            w = op.args[1]
            name = getattr(w, "name", None)
            if name in concats:
                gemms += 1
                parts += len(concats[name])
    return gemms, parts


def lowered_program_table(manifest: dict[str, Any], program: Program) -> Table:
    """Per entry point, the program the kernels run as the artifact stores it (no pass is rerun):
    ops per kind, packed-weight ops by format, merged linears, the runtime's activation arena and
    the stream schedule."""
    concats = {name: list(parts) for tr in manifest["weights"].get("transforms", []) if tr["op"] == "concat"
               for name, parts in tr["tensors"].items()}
    plans, scheds = manifest.get("memory_plan") or {}, manifest.get("schedule") or {}
    t = Table(title="lowered program per entry point (the artifact's IR, as the kernels run it)")
    for col in ("entry", "ops", "ops per kind", "packed weights", "merged linears", "arena", "streams (ops)"):
        t.add_column(col, justify="right" if col in ("ops", "arena") else "left")
    for entry, g in program.graphs.items():
        counts = Counter(op.name for op in g.ops)
        kinds = {k: v for k, v in counts.items() if not k.startswith(("aten.", "sym."))}
        gemms = sum(v for k, v in counts.items() if k in PLAIN_GEMMS)
        rest = sum(counts.values()) - sum(kinds.values()) - gemms
        per_kind = [f"{k}×{v}" for k, v in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))]
        per_kind += [f"GEMM×{gemms}"] * bool(gemms) + [f"ATen other×{rest}"] * bool(rest)
        packed = packed_formats(g)
        merged, replaced = merged_linears(g, concats)
        plan, sched = plans.get(entry) or {}, scheds.get(entry) or {}
        arena = (plan.get("runtime_arena") or {}).get("bytes", plan.get("arena_bytes"))
        streams = " ".join(f"{k}={v}" for k, v in (sched.get("ops_per_stream") or {}).items())
        t.add_row(entry, str(len(g.ops)), ", ".join(per_kind) or "-",
                  ", ".join(f"{k}×{v}" for k, v in sorted(packed.items())) or "none",
                  f"{merged} GEMMs for {replaced} linears" if merged else "none",
                  "-" if arena is None else _size(int(arena)),
                  (streams + (f", {sched['events']} events" if "events" in sched else "")) or "-")
    return t


def runtime_buffer_plan_line(manifest: dict[str, Any], graphs: dict[str, Graph]) -> str:
    """The GPU runtime's arena per entry point, as the artifact's memory plan gives it at the plan's
    sizes (``placed_arena_bytes``: graph outputs left out; the runtime evaluates the same plan at each
    call's sizes and places the results its ops can write into a given buffer)."""
    plans = manifest.get("memory_plan") or {}
    parts = []
    for name in graphs:
        section = plans.get(name) or {}
        arena = section.get("runtime_arena") or {}
        if arena.get("bytes") is None:
            continue
        binding = ", ".join(f"{k}={v}" for k, v in sorted(section["sizes"].items()))
        parts.append(f"@{name} ({binding}) {_size(arena['bytes'])} for {arena['buffers']} results "
                     f"({_size(arena['bytes_apart'])} apart; valid in {' and '.join(arena['orders'])} order)")
    if not parts:
        return ""
    return "[bold]GPU activations[/] (the compiled plan, evaluated by the runtime at each call's sizes; here at " \
        "the plan's): " + "; ".join(parts)


def serving_table(serving: dict[str, Any]) -> Table:
    """The serving pools (ds4c compile --serving): page size, bytes per page id over every layer,
    pages planned, and what they hold."""
    lay, plan = serving["layout"], serving.get("pages") or {}
    pages, per_page, cap = plan.get("pages") or {}, plan.get("page_bytes") or {}, plan.get("capacity") or {}
    batch = serving.get("batch") or {}
    tb = Table(title=f"serving pools (max_running {batch.get('max_running')}, {batch.get('max_step_tokens')} tokens "
                     f"per step, chunks up to {lay['max_chunk']})")
    for col in ("pool", "page", "bytes per page", "pages", "total"):
        tb.add_column(col, justify="left" if col in ("pool", "page") else "right")
    mtp = serving.get("mtp")
    what = {"window": f"{lay['window_page']} tokens of window rows" + (" (MTP block's included)" if mtp else ""),
            "compressed": f"{lay['comp_page']} tokens of CSA/HCA entries + indexer keys",
            "slots": "one running request's compressor rings"
                     + (f" ({lay.get('draft_tokens')} rows more for drafts)" if lay.get("draft_tokens") else "")}
    for pool in ("window", "compressed", "slots"):
        n, b = pages.get(pool), per_page.get(pool)
        tb.add_row(pool, what[pool], "-" if b is None else _size(b), str(n),
                   "-" if n is None or b is None else _size(n * b))
    notes = []
    if cap:
        notes.append(f"compressed state for {cap['tokens']} token positions: requests at 4K {cap['requests_at_4k']}, "
                     f"at 32K {cap['requests_at_32k']}, at max_context {cap['requests_at_max_context']}")
    if plan.get("state_budget") is not None:
        notes.append(f"sized from a state budget of {_size(plan['state_budget'])} (HBM budget less the weights), "
                     f"less the largest step's activations ({_size(plan.get('activations') or 0)})")
    if mtp:
        notes.append(f"speculative decoding: the MTP block (entry point mtp_step) drafts up to "
                     f"{lay.get('draft_tokens')} tokens per step (Engine(speculative=k), --speculative K)")
    tb.caption = "; ".join(notes) or None
    return tb


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _mib(n: Any) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def collective_bytes(graph: Graph) -> dict[str, tuple[int, int]]:
    """Collective op -> (count, bytes of their operands per token: symbolic sizes taken as 1)."""
    from ds4c.ir.types import TensorType

    out: dict[str, tuple[int, int]] = {}
    for op in graph.ops:
        if not op.name.startswith("dist.") or not isinstance(op.args[0].type, TensorType):
            continue
        t = op.args[0].type
        n = 1
        for d in t.shape:
            n *= d if isinstance(d, int) else 1
        count, nbytes = out.get(op.name, (0, 0))
        out[op.name] = (count + 1, nbytes + n * t.dtype.itemsize)
    return out


def mesh_table(manifest: dict[str, Any], ranks: list[Program]) -> Table:
    """Per rank of a sharded artifact: its weights, state, decode plan and communication per step.
    Communication: operand bytes per token of the decode step's collectives, and what a ring
    all-reduce moves per rank (2 (W-1)/W of it) at the target's peer link."""
    mesh = manifest["mesh"]
    target = manifest["target"]
    link = target.get("peer_link_bandwidth")
    t = Table(title=f"mesh ep={mesh['axes'].get('ep', 1)},tp={mesh['axes'].get('tp', 1)}: {mesh['world']} ranks, "
                    f"attention {mesh.get('attention', 'replicated')} (peer link: {target.get('peer_link', 'none')})")
    for col in ("rank", "weights MiB", "state KiB/seq", "decode device MiB / target", "collectives / decode step",
                "KiB per token", "link us per token"):
        t.add_column(col, justify="left" if col in ("rank", "collectives / decode step") else "right")
    from ds4c.artifact.sharded import rank_manifest

    for r, program in enumerate(ranks):
        own = rank_manifest(manifest, r)
        state = 0
        for s in own["state"]:
            n = 1
            for d in s["shape"][1:]:
                n *= int(d)
            state += n * getattr(torch, s["dtype"]).itemsize
        plan = (own.get("memory_plan") or {}).get("decode") or {}
        device = f"{_mib(plan.get('device_bytes'))} / {_mib(plan.get('target_hbm_bytes'))}" if plan else "-"
        comm = collective_bytes(program.graphs["decode"]) if "decode" in program.graphs else {}
        nbytes = sum(b for _, b in comm.values())
        moved = nbytes * 2 * (mesh["world"] - 1) / mesh["world"]
        t.add_row(str(r), _mib(own["weights"]["bytes"]), f"{state / 1024:.1f}", device,
                  ", ".join(f"{k.removeprefix('dist.')} ×{c}" for k, (c, _) in comm.items()) or "-",
                  f"{nbytes / 1024:.1f}", f"{moved / link * 1e6:.2f}" if link else "-")
    return t


def plan_table(manifest: dict[str, Any]) -> Table:
    """Per entry point: the memory plan (plan_memory) and the stream schedule (schedule_streams)."""
    t = Table(title="memory plan and streams (per entry point; sizes at the plan's binding)")
    for col in ("entry", "binding", "arena MiB", "peak live MiB", "weights HBM / host MiB", "device MiB / target",
                "streams (ops)", "events", "makespan us (1 stream)"):
        t.add_column(col, justify="left" if col in ("entry", "binding", "streams (ops)") else "right")
    plans, scheds = manifest.get("memory_plan") or {}, manifest.get("schedule") or {}
    for entry in sorted(set(plans) | set(scheds)):
        p, sc = plans.get(entry, {}), scheds.get(entry, {})
        w = p.get("weights") or {}
        fits = p.get("fits")
        dev = f"{_mib(p.get('device_bytes'))} / {_mib(p.get('target_hbm_bytes'))}" + (" [red]over[/]" if fits is False else "")
        t.add_row(entry, " ".join(f"{k}={v}" for k, v in (p.get("sizes") or {}).items()), _mib(p.get("arena_bytes")),
                  _mib(p.get("peak_live_bytes")), f"{_mib(w.get('hbm_bytes'))} / {_mib(w.get('host_bytes'))}", dev,
                  " ".join(f"{k}={v}" for k, v in (sc.get("ops_per_stream") or {}).items()), str(sc.get("events", "-")),
                  f"{sc['makespan_s'] * 1e6:,.1f} ({sc['single_stream_makespan_s'] * 1e6:,.1f})" if sc else "-")
    return t


def write_plan_plots(manifest: dict[str, Any], program: Program, container: Any, out_dir: Any) -> list[Any]:
    """For each entry point with stored plans: ``<entry>.memory.png`` (live bytes over the program),
    ``<entry>.schedule.png`` and ``<entry>.trace.json`` (Chrome trace: open in Perfetto)."""
    import json
    from pathlib import Path

    from ds4c.passes.timeline import plot_memory_png, plot_schedule_png, write_chrome_trace

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for entry, section in (manifest.get("memory_plan") or {}).items():
        plan = json.loads(container.read_bytes(section["member"]))
        written.append(plot_memory_png(out / f"{entry}.memory.png", program.graphs[entry], plan,
                                       title=f"@{entry}: live activation bytes ({manifest['target']['name']})"))
    for entry, section in (manifest.get("schedule") or {}).items():
        sched = json.loads(container.read_bytes(section["member"]))
        written.append(plot_schedule_png(out / f"{entry}.schedule.png", program.graphs[entry], sched,
                                         title=f"@{entry}: stream schedule ({manifest['target']['name']})"))
        written.append(write_chrome_trace(out / f"{entry}.trace.json", program.graphs[entry], sched))
    return written


def precision_table(prec: dict[str, Any]) -> Table:
    """Per unit: the chosen weight format, bytes, measured error and why (assign_precision's report)."""
    bf16 = prec.get("bf16_weight_bytes") or 1
    tb = Table(title=f"precision: {prec.get('policy')}, weights {prec.get('weight_bytes', 0) / 2**20:.1f} MiB = "
                     f"{prec.get('weight_bytes', 0) / bf16:.3f}x bf16; total error {prec.get('total_error', 0):.3g} "
                     f"(bound {prec.get('error_bound', 0):.3g}, measured on {prec.get('measured')})")
    metric = "error (KL, nats)" if prec.get("measured") == "output KL" else "error (NSR)"
    for col in ("layer", "unit", "format", "activations", "KiB", "vs bf16", metric, "why"):
        tb.add_column(col, justify="right" if col in ("KiB", "vs bf16", metric) else "left")
    for u in prec["units"]:
        err = "-" if u.get("error") is None else f"{u['error']:.2e}"
        tb.add_row("model" if u.get("layer") is None else str(u["layer"]), u["unit"], u["format"], u["activations"],
                   f"{u['bytes'] / 1024:.1f}", f"{u['bytes'] / max(u['bf16_bytes'], 1):.3f}x", err, u["why"])
    return tb
