"""Ahead-of-time Triton binaries for the ``cuda`` and ``rocm`` targets (cubin for sm_90a / sm_100a,
hsaco for gfx942 / gfx950), built without a GPU.

``lower(target, program)`` is the backend hook ``ds4c.backends.lower_kernels`` calls after the pass
pipeline. It finds every launch the kernel backend will make for the program (decode at batch 1,
prefill at batch 1 and ``launches.PREFILL_LENGTHS`` tokens, and with serving entry points the
engine's steps in each of its buckets; see ``ds4c.backends.triton.launches``)
and compiles each with ``triton.compile`` for ``GPUTarget(*target.triton_target)``, with the
target's kernel configurations (``kernels/configs.py``). The artifact then holds:

- ``kernels/src/<module>.py``: the Triton source of every kernel module;
- ``kernels/<arch>/<kernel>-<key>.{json,cubin|hsaco,ptx|amdgcn}``: per launch, Triton's metadata,
  the binary and its assembly, exactly the files Triton's cache keeps for that kernel;
- ``manifest["kernels"]``: per binary the kernel, its source member, the sha256 of every file, the
  arch, the Triton version, Triton's cache key and specialisation, and the configuration.

At load, ``ds4c.runtime.binaries`` puts the files of a trusted artifact (signed by a key
trusted there, ``ds4c.artifact.signing``) into ds4c's own binary cache under the same key when
the device and the Triton build match, so the JIT finds them instead of compiling.

Recording and compiling run in worker processes (``python -m ds4c.backends.triton.aot``): the
kernels must be ``JITFunction``s, not interpreter functions (``TRITON_INTERPRET=1`` in the
compiling process), recording swaps Triton's driver for a moment, and the launches are split over
the CPU cores. Compiled files come from Triton's own cache (``TRITON_CACHE_DIR``), so a second
compile of the same kernels costs a cache lookup; results are also kept per process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ds4c.errors import ArtifactError, KernelError
from ds4c.ir.graph import Program
from ds4c.passes.manager import LOWERING_OPTIONS
from ds4c.targets import Target

SECTION_FORMAT = 1
MAX_WORKERS = 4
# what each launch keeps of Triton's cache files: metadata, binary, assembly (no MLIR stages)
KEPT_SUFFIXES = {"cuda": (".json", ".cubin", ".ptx"), "hip": (".json", ".hsaco", ".amdgcn")}


def check_file_name(filename: object, backend: str, kernel: str, where: str) -> str:
    """``filename`` is a file Triton writes for ``kernel`` on ``backend``: ``<kernel>[:150]<suffix>``
    with a suffix ``aot.KEPT_SUFFIXES`` keeps; anything else (a path, ``..``) is an ArtifactError."""
    suffixes = KEPT_SUFFIXES.get(backend, ())
    stem = kernel[:150]
    if not isinstance(filename, str) or filename not in {stem + s for s in suffixes}:
        raise ArtifactError(f"{where}: the kernels section names the file {filename!r} for kernel '{kernel}'; Triton "
                            f"writes only {', '.join(stem + s for s in suffixes) or '(none: unknown backend)'} there, "
                            "so the artifact was tampered with: recompile it")
    return filename


def pin_ptxas() -> str | None:
    """Settle which ``ptxas`` Triton uses in this process, the way TorchInductor does, and return it.

    Triton's cache key includes the ptxas build. Inductor, the first time it compiles a kernel,
    points ``TRITON_PTXAS_PATH`` at the ptxas bundled with torch (``torch/bin/ptxas``, when the wheel
    ships one), so a process's keys change midway: binaries installed (or compiled ahead of time)
    under keys made with Triton's own ptxas are then never found by launches made after Inductor
    ran (measured on the H200: an FP8 artifact compiled after a bf16 run reported 0 of 73 stored
    binaries usable). ds4c settles the choice first, with Inductor's own function, wherever it makes
    or checks keys: in the ahead-of-time workers' environment and before installing binaries."""
    import importlib

    # where torch has kept it over the versions (2.13: runtime.compile_tasks)
    for module in ("torch._inductor.runtime.compile_tasks", "torch._inductor.async_compile",
                   "torch._inductor.codecache"):
        try:
            setter = getattr(importlib.import_module(module), "_set_triton_ptxas_path", None)
        except ImportError:  # pragma: no cover
            continue
        if setter is not None:
            setter()
            break
    return os.environ.get("TRITON_PTXAS_PATH")
BINARY_SUFFIX = {"cuda": ".cubin", "hip": ".hsaco"}

_CACHE: dict[str, tuple[dict[str, Any], dict[str, bytes]]] = {}


def triton_version() -> str:
    import triton

    return triton.__version__


def kernel_sources() -> dict[str, tuple[str, bytes]]:
    """{module short name: (file name, source bytes)} of the kernel package's modules."""
    import importlib.util

    from ds4c.backends.triton import kernels

    out = {}
    for mod in (*kernels.KERNEL_MODULES, "configs", "pdl"):
        spec = importlib.util.find_spec(f"{kernels.__name__}.{mod}")
        if spec is not None and spec.origin:
            out[mod] = (Path(spec.origin).name, Path(spec.origin).read_bytes())
    return out


def lower(target: Target, program: Program, *, progress: bool | None = None,
          options: Mapping[str, bool] | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(manifest ``kernels`` section, ``kernels/`` members) of ``program`` compiled for ``target``
    with the compile options the manifest records (``lowering.options``; here ``pdl``: the kernels
    launch with programmatic dependent launch, as ``ds4c.load`` then launches them)."""
    from safetensors.torch import save

    from ds4c.backends.triton.launches import DECODE_BATCH, prefill_lengths, serving_runs
    from ds4c.ir.printer import print_graph

    if target.triton_target is None:
        raise KernelError(f"target '{target.name}' has no Triton target; ds4c.backends.triton.aot compiles "
                          "only for cuda and rocm targets")
    sources = kernel_sources()
    lengths = prefill_lengths(program.attrs.get("max_context"))
    request = {
        "target": target.to_dict(),
        "ir": {name: print_graph(g) for name, g in program.graphs.items()},
        "state": program.attrs.get("state", []),
        "prefill_lengths": lengths,
        "pdl": bool({**LOWERING_OPTIONS, **(options or {})}["pdl"]),
        # the engine's steps (their buckets come from the batch record, their pools from the plan)
        "serving": ({**program.attrs["serving"], "pages": program.attrs["serving_pages"]}
                    if program.attrs.get("serving") and program.attrs.get("serving_pages") else None),
    }
    consts = {name: save({k: v.contiguous() for k, v in g.constants.items()}) for name, g in program.graphs.items()}
    key = hashlib.sha256(json.dumps([request, triton_version(), sorted((k, hashlib.sha256(v).hexdigest())
                                                                      for k, (_, v) in sources.items())],
                                    sort_keys=True).encode())
    for name in sorted(consts):
        key.update(consts[name])
    cache_key = key.hexdigest()
    if cache_key in _CACHE:
        section, members = _CACHE[cache_key]
        return json.loads(json.dumps(section)), dict(members)

    with tempfile.TemporaryDirectory(prefix="ds4c-aot-") as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "request.json").write_text(json.dumps(request))
        for name, blob in consts.items():
            (tmpdir / f"{name}.safetensors").write_bytes(blob)
        results = _run_workers(tmpdir, target, progress)

    arch = target.arch
    backend = target.triton_target[0]
    members: dict[str, bytes] = {}
    section_sources = {}
    for mod, (filename, blob) in sources.items():
        members[f"src/{filename}"] = blob
        section_sources[mod] = {"member": f"kernels/src/{filename}", "sha256": hashlib.sha256(blob).hexdigest()}
    binaries = []
    for r in sorted(results, key=lambda r: (r["function"], r["cache_key"])):
        module = r["function"].split(".")[-2]
        stem = f"{r['name']}-{r['cache_key'][:16]}"
        files = {}
        for filename, path in sorted(r["files"].items()):
            # the names ds4c.load accepts (binaries.check_file_name): refuse here what it would refuse there
            check_file_name(filename, backend, r["function"].rsplit(".", 1)[-1], f"compiling for {target.name}")
            suffix = Path(filename).suffix
            blob = Path(path).read_bytes()
            member = f"{arch}/{stem}{suffix}"
            members[member] = blob
            files[filename] = {"member": f"kernels/{member}", "sha256": hashlib.sha256(blob).hexdigest()}
        if r["shared"] > target.shared_memory_per_block:
            raise KernelError(
                f"kernel {r['name']} (ops {', '.join(r['ops'])}) needs {r['shared']} bytes of shared memory with "
                f"config {r['config']}, but a {target.name} block has {target.shared_memory_per_block}: fix its "
                "tile choice in ds4c/backends/triton/kernels/configs.py")
        binaries.append({
            "name": r["name"], "function": r["function"], "ops": r["ops"],
            "source": section_sources.get(module, {}).get("member"),
            "arch": arch, "triton_version": r["triton_version"], "cache_key": r["cache_key"],
            "specialization": r["specialization"], "config": r["config"], "shared_bytes": r["shared"],
            "binary": files[r["binary_file"]]["member"], "files": files,
        })
    section = {
        "format": SECTION_FORMAT,
        "compiler": "triton",
        "triton_version": triton_version(),
        "target": target.name,
        "arch": arch,
        "triton_target": list(target.triton_target),
        "binary_format": BINARY_SUFFIX[backend].lstrip("."),
        "sources": section_sources,
        "specialised_for": {"decode_batch": DECODE_BATCH, "prefill_batch": 1, "prefill_lengths": lengths,
                            "pdl": request["pdl"],
                            **({"serving_steps": [[e, s] for e, s in serving_runs(program.graphs, request["serving"])]}
                               if request["serving"] else {})},
        "binaries": binaries,
    }
    _CACHE[cache_key] = (section, members)
    return json.loads(json.dumps(section)), dict(members)


def _worker_env() -> dict[str, str]:

    pin_ptxas()  # the ptxas the runtime's keys will name, whether Inductor ran here or not
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the workers need real JITFunctions
    return env


def _run_workers(tmpdir: Path, target: Target, progress: bool | None) -> list[dict[str, Any]]:
    from ds4c.progress import progress_steps

    count = max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, "-m", __name__, str(tmpdir), str(i), str(count)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_worker_env())
             for i in range(count)]
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()
    with progress_steps(f"kernels for {target.arch}", total=1, enabled=progress) as steps:
        totals: list[int] = []

        def read(proc: subprocess.Popen) -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                msg = json.loads(line)
                with lock:
                    if "total" in msg:
                        totals.append(msg["total"])
                        steps.set_total(max(1, msg["total"]))
                    elif "error" in msg:
                        errors.append(msg["error"])
                    else:
                        results.append(msg)
                        steps.advance(f"{target.arch}: {msg['name']}")

        threads = [threading.Thread(target=read, args=(p,), daemon=True) for p in procs]
        for t in threads:
            t.start()
        stderr = [p.stderr.read() if p.stderr else "" for p in procs]
        for p, t in zip(procs, threads, strict=True):
            p.wait()
            t.join()
            for pipe in (p.stdout, p.stderr):  # read to the end: closed here, not left to the garbage collector
                if pipe is not None:
                    pipe.close()
    if errors:
        raise KernelError(errors[0])
    failed = [(p.returncode, err) for p, err in zip(procs, stderr, strict=True) if p.returncode != 0]
    if failed:
        tail = "\n".join(failed[0][1].strip().splitlines()[-15:])
        raise KernelError(f"ahead-of-time kernel compilation for {target.name} ({target.arch}) failed in a worker "
                          f"process (exit {failed[0][0]}):\n{tail}")
    if totals and len(results) != totals[0]:
        raise KernelError(f"ahead-of-time kernel compilation for {target.name}: {len(results)} of {totals[0]} "
                          "kernels came back; rerun the compile")
    return results


# -- worker ---------------------------------------------------------------------------------------

def _config_of(specialization: str, fn: Any) -> dict[str, Any]:
    """Launch options and constexprs of a recorded specialisation, by name (``config`` in the manifest)."""
    data = json.loads(specialization)
    config: dict[str, Any] = {}
    names = list(fn.arg_names)
    for key, value in zip(data["constant_keys"], data["constant_vals"], strict=True):
        if len(key) == 1 and isinstance(value, bool | int | float | str) and key[0] < len(names):
            config[names[key[0]]] = value
    opts = data["options"]
    for name in ("num_warps", "num_stages", "waves_per_eu", "matrix_instr_nonkdim", "kpack"):
        if name in opts:
            config[name] = opts[name]
    return config


def _worker(tmpdir: Path, index: int, count: int) -> None:
    import triton
    from safetensors.torch import load
    from triton.backends.compiler import GPUTarget

    from ds4c.backends.triton.launches import record_launches, triton_source
    from ds4c.ir.parser import parse_graph

    request = json.loads((tmpdir / "request.json").read_text())
    target = Target.from_dict(request["target"])
    graphs = {name: parse_graph(text, load((tmpdir / f"{name}.safetensors").read_bytes()))
              for name, text in request["ir"].items()}
    launches = record_launches(graphs, request["state"], target, request["prefill_lengths"], pdl=request["pdl"],
                               serving=request.get("serving"))
    print(json.dumps({"total": len(launches)}), flush=True)
    gpu_target = GPUTarget(*target.triton_target)
    backend = target.triton_target[0]
    kept = KEPT_SUFFIXES[backend]
    for launch in launches[index::count]:
        fn, src, options = triton_source(launch.function, launch.specialization)
        config = _config_of(launch.specialization, fn)
        try:
            kernel = triton.compile(src, target=gpu_target, options=options)
        except Exception as e:  # noqa: BLE001 - reported with the kernel, ops and config
            print(json.dumps({"error": f"ahead-of-time compilation of kernel {launch.name} (ops {', '.join(launch.ops)}) "
                                       f"for {target.name} ({target.arch}) with config {config} failed: "
                                       f"{type(e).__name__}: {str(e).strip()[-2000:]}"}), flush=True)
            sys.exit(1)
        files = {Path(p).name: str(p) for p in kernel.metadata_group.values() if Path(p).suffix in kept}
        binary = f"{src.name[:150]}{BINARY_SUFFIX[backend]}"
        if binary not in files or not Path(files[binary]).stat().st_size:
            print(json.dumps({"error": f"Triton produced no {BINARY_SUFFIX[backend]} for kernel {launch.name} "
                                       f"on {target.arch}"}), flush=True)
            sys.exit(1)
        print(json.dumps({
            "name": launch.name, "function": launch.function, "ops": list(launch.ops),
            "specialization": launch.specialization, "cache_key": kernel.hash, "config": config,
            "shared": int(kernel.metadata.shared), "triton_version": triton.__version__,
            "files": files, "binary_file": binary,
        }), flush=True)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
