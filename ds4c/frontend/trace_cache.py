"""Traces kept on disk between processes, like Inductor's FX graph cache.

torch.export is most of a small model's compile time (``tiny``: ~20 of ~25 s on a 2-core CPU), and
every ``ds4c compile`` is a new process. A trace depends only on the model config, the context,
the compute dtype, the per-kind proxy choice, torch (and sympy, which its export reasons with),
Python and ds4c's own source (weights stay on the meta device; the entry points, the model and
the frontend are that source; no environment variable is read while tracing), so it is stored
under a key of exactly those, as one safetensors file: the graphs' constants as tensors, the
printed IR (``ds4c.ir.printer``, which ``ds4c.ir.parser`` reads back exactly) and the program's
attrs as JSON metadata. No pickle.

An entry is used only if it is what was traced under its key: it carries the key's inputs
(whose sha256 must be its file name and its recorded key) and a sha256 of its whole content
(inputs, IR text, attrs, every constant's name, dtype, shape and bytes), checked on every read;
the context length it holds must be its key's. A hand-edited entry, a damaged one, or one copied
under another key is reported with a warning, removed and traced anew, never used. The hash
guards against accidents and edits, not against someone who rewrites an entry and its hash
together: whoever can write the cache can also edit ds4c's sources.

- Where: ``$DS4C_CACHE_DIR/traces`` (default ``$XDG_CACHE_HOME/ds4c`` or ``~/.cache/ds4c``);
  ``DS4C_TRACE_CACHE=0`` turns the cache off. ``ds4c cache`` shows it, ``ds4c cache --clear``
  empties it.
- Entries are written atomically (a temporary file renamed into place). At most ``MAX_ENTRIES``
  are kept, the least recently used go first.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ds4c.ir.graph import Program

FORMAT = "ds4c-trace/2"
MAX_ENTRIES = 64
_SUFFIX = ".safetensors"


def cache_root() -> Path:
    """ds4c's cache directory (``DS4C_CACHE_DIR``, else the XDG cache home)."""
    if os.environ.get("DS4C_CACHE_DIR"):
        return Path(os.environ["DS4C_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ds4c"


def trace_dir() -> Path:
    return cache_root() / "traces"


def enabled() -> bool:
    """On unless ``DS4C_TRACE_CACHE=0``, and only where ds4c runs from its sources (the key hashes them)."""
    return (os.environ.get("DS4C_TRACE_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")
            and bool(_source_digest()))


@cache
def _source_digest() -> str:
    """sha256 over ds4c's Python sources: any change to the frontend, the model or the IR may
    change a trace, and telling which cannot is not worth a stale graph ("" without sources)."""
    from ds4c.version import __version__

    root = Path(__file__).resolve().parents[1]  # the ds4c package
    paths = sorted(root.rglob("*.py"))
    if not paths:
        return ""
    h = hashlib.sha256(__version__.encode())
    for path in paths:
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def key_inputs(config: Any, max_context: int, dtype: torch.dtype, per_kind: bool, extra: str | None = None) -> str:
    """Everything a trace depends on, as the JSON text its key hashes (stored in the entry);
    ``extra``: what else the traced entry points depend on (the serving page layout)."""
    import sympy

    parts = [FORMAT, repr(config), int(max_context), str(dtype), bool(per_kind), torch.__version__,
             sympy.__version__, f"{sys.version_info.major}.{sys.version_info.minor}", _source_digest()]
    return json.dumps(parts + ([extra] if extra is not None else []))


_MAX_CONTEXT_AT = 2  # where key_inputs puts the context length


# The inputs of the keys ``trace_key`` made in this process, for ``store`` to record with the entry.
_KEY_INPUTS: dict[str, str] = {}


def trace_key(config: Any, max_context: int, dtype: torch.dtype, per_kind: bool, extra: str | None = None) -> str:
    inputs = key_inputs(config, max_context, dtype, per_kind, extra)
    key = hashlib.sha256(inputs.encode()).hexdigest()
    _KEY_INPUTS[key] = inputs
    while len(_KEY_INPUTS) > 4 * MAX_ENTRIES:
        del _KEY_INPUTS[next(iter(_KEY_INPUTS))]
    return key


def _content_sha256(inputs: str, attrs: str, graphs: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of an entry's content: its key inputs, attrs and IR text (JSON), and every tensor."""
    h = hashlib.sha256()
    for text in (inputs, attrs, graphs):
        h.update(len(text).to_bytes(8, "little") + text.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _path(key: str) -> Path:
    return trace_dir() / f"{key}{_SUFFIX}"


def load(key: str) -> Program | None:
    """The stored trace under ``key``, or None (absent, cache off, or unreadable: then removed)."""
    if not enabled():
        return None
    try:
        path = _path(key)
        if not path.is_file():
            return None
    except (OSError, RuntimeError):  # no home directory, a directory we may not read: a miss
        return None
    try:
        program = _read(path, key)
    except FileNotFoundError:  # pruned by another process meanwhile: a miss
        return None
    except Exception as e:  # noqa: BLE001 - any unreadable or unverified entry is traced anew, and said so
        warnings.warn(f"{path}: cached trace not used ({type(e).__name__}: {e}); removed, tracing anew",
                      stacklevel=3)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
        return None
    try:
        os.utime(path)  # least recently used goes first when pruning
    except OSError:
        pass
    return program


class StaleEntry(ValueError):
    """A cache entry that is not what was traced under its key."""


def _read(path: Path, key: str) -> Program:
    from safetensors import safe_open

    from ds4c.ir.parser import parse_graph

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise StaleEntry(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    inputs, attrs_text, graphs_text = meta.get("inputs", ""), meta.get("attrs", ""), meta.get("graphs", "")
    if meta.get("key") != key or hashlib.sha256(inputs.encode()).hexdigest() != key:
        raise StaleEntry("it was stored under another key (copied or renamed)")
    if _content_sha256(inputs, attrs_text, graphs_text, tensors) != meta.get("content_sha256"):
        raise StaleEntry("its content does not match its sha256 (edited or damaged)")
    attrs = json.loads(attrs_text)
    if attrs.get("max_context") != json.loads(inputs)[_MAX_CONTEXT_AT]:
        raise StaleEntry(f"it holds a trace for context {attrs.get('max_context')}, not its key's")
    graphs = {}
    for name, text in json.loads(graphs_text).items():
        prefix = f"{name}/"
        constants = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        graphs[name] = parse_graph(text, constants)
    return Program(graphs, attrs)


def store(key: str, program: Program, inputs: str | None = None) -> None:
    """Write ``program`` under ``key`` atomically, with the key's inputs (``key_inputs``; by
    default those ``trace_key`` hashed into ``key`` in this process: a key made otherwise could
    never be verified, so no entry is written for it) and a sha256 of its content; a trace whose
    attrs are not JSON, or a cache directory that cannot be written, is skipped with a warning
    (the compile goes on)."""
    inputs = inputs if inputs is not None else _KEY_INPUTS.get(key)
    if not enabled() or inputs is None or hashlib.sha256(inputs.encode()).hexdigest() != key:
        return
    from safetensors.torch import save_file

    from ds4c.ir.printer import print_graph

    try:
        attrs = json.dumps(program.attrs, sort_keys=True)
    except (TypeError, ValueError):
        return  # not representable as JSON (tensors, sets): keep it in memory only
    if json.loads(attrs) != program.attrs:
        return  # tuples would come back as lists: keep it in memory only
    # own copies: safetensors refuses tensors that share memory
    tensors = {f"{name}/{k}": v.detach().cpu().clone().contiguous() for name, g in program.graphs.items()
               for k, v in g.constants.items()}
    graphs = json.dumps({name: print_graph(g) for name, g in program.graphs.items()})
    meta = {"format": FORMAT, "key": key, "inputs": inputs, "attrs": attrs, "graphs": graphs,
            "content_sha256": _content_sha256(inputs, attrs, graphs, tensors)}
    try:
        directory = trace_dir()
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}-", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.chmod(tmp, 0o666 & ~_umask())  # as an ordinary file (mkstemp makes it private)
            os.replace(tmp, _path(key))
        finally:
            Path(tmp).unlink(missing_ok=True)
        _prune(directory)
    except Exception as e:  # noqa: BLE001 - a full disk, no home, ...: the compile goes on untraced-cached
        warnings.warn(f"trace cache not written ({type(e).__name__}: {e}); set DS4C_CACHE_DIR to a writable "
                      "directory or DS4C_TRACE_CACHE=0", stacklevel=3)


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread
    for a moment); 0o022 where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by another process
        return 0.0


def _prune(directory: Path) -> None:
    """Keep the ``MAX_ENTRIES`` most recently used traces; drop temporary files a killed writer
    left (older than an hour)."""
    for old in sorted(directory.glob(f"*{_SUFFIX}"), key=_mtime, reverse=True)[MAX_ENTRIES:]:
        old.unlink(missing_ok=True)
    now = time.time()
    for tmp in directory.glob("*.tmp"):
        if now - _mtime(tmp) > 3600:
            tmp.unlink(missing_ok=True)


def entries() -> list[Path]:
    d = trace_dir()
    return sorted(d.glob(f"*{_SUFFIX}")) if d.is_dir() else []


def clear() -> int:
    """Remove every stored trace (and stray temporary files); returns how many traces went."""
    gone = 0
    d = trace_dir()
    if d.is_dir():
        for p in d.iterdir():
            if p.suffix in (_SUFFIX, ".tmp") and p.is_file():
                gone += p.suffix == _SUFFIX
                p.unlink(missing_ok=True)
    return gone
