"""Checkpoint directories: ``config.json`` + ``*.safetensors`` (one file, or shards listed by
``model.safetensors.index.json``), in transformers' naming, in DeepSeek's release naming (FP8
block-scaled linears, MXFP4-packed routed experts; dequantised here), or the mix of both that
transformers' ``save_pretrained`` writes (``model.layers.N.attn.wq_a.weight``, ``head.weight``).

Everything is checked from the file headers before any tensor data is read (missing, unexpected,
mis-shaped tensors; missing scales; truncated files), then tensor data is read a slab of rows at a
time and written straight into its destination tensor (dtype, device), so loading holds the
result plus one slab, never a second copy of the checkpoint. No pickle is ever read.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ds4c.errors import CheckpointError, ConfigError
from ds4c.frontend.deepseek_format import DS_EXPERT, deepseek_to_hf_name, is_hf_name, scale_name
from ds4c.frontend.formats import dequant_fp8_block, dequant_mxfp4

INDEX = "model.safetensors.index.json"
Spec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
_FP4_DTYPES = ("I8", "U8", "F4")  # packed e2m1 pairs, when the model wants floats
_SLAB_ELEMENTS = 1 << 22  # elements read per slab (multiple of 128 rows)
logger = logging.getLogger(__name__)


def read_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory, as a dict (ConfigError naming the path if absent or bad)."""
    directory = Path(directory)
    path = directory / "config.json"
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory; pass a checkpoint directory with config.json")
    if not path.is_file():
        raise ConfigError(f"{path}: missing config.json; a checkpoint directory needs config.json next to its "
                          "*.safetensors (e.g. from save_pretrained)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); fix or re-save the config") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(cfg).__name__}; re-save the config")
    return cfg


def detect_naming(keys: Iterable[str]) -> str:
    """"hf" for transformers' serialisation (every name under ``model.`` or ``lm_head.``/``head.``,
    as ``save_pretrained`` writes), "deepseek" for the release naming (``embed.weight``, ``layers.N...``)."""
    keys = [k for k in keys if not k.startswith("mtp.")]
    if keys and all(k.startswith(("model.", "lm_head.", "head.")) for k in keys):
        return "hf"
    return "deepseek"


_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu, "F4": torch.uint8,  # F4: e2m1 pairs, read as bytes
}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]    # as the header says (F4: element count, two per byte)
    begin: int                # absolute byte offset of the data in the file
    nbytes: int


def _read_header(f: Path) -> dict[str, _Entry]:
    """Parse a safetensors header (8-byte little-endian length + JSON) and check it against the file size."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in a {size}-byte file")
            header = json.loads(fh.read(n))
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dt, shape, (b, e) = info["dtype"], tuple(int(x) for x in info["shape"]), info["data_offsets"]
            if dt not in _DTYPES:
                raise ValueError(f"tensor '{name}' has dtype {dt}, which ds4c does not read")
            numel = 1
            for x in shape:
                numel *= x
            nbytes = numel // 2 if dt == "F4" else numel * _DTYPES[dt].itemsize
            if e - b != nbytes:
                raise ValueError(f"tensor '{name}' spans {e - b} bytes, its shape {list(shape)} {dt} needs {nbytes}")
            if 8 + n + e > size:
                raise ValueError(f"tensor '{name}' ends at byte {8 + n + e} but the file has {size} bytes")
            entries[name] = _Entry(f, dt, shape, 8 + n + b, nbytes)
        return entries
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{f}: unreadable safetensors file ({e}); it may be truncated or not safetensors: "
                              "re-download or re-save it") from None


class _Files:
    """Which file holds which tensor, from the headers; tensor data read on demand, a row range at a time.

    Reads use plain positioned file reads into the destination-sized slab rather than a memory map:
    mapped file pages count towards the process' resident memory, so an mmap-based loader peaks at
    twice the checkpoint when the result has the file's dtype."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.entries: dict[str, _Entry] = {}
        index = directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("'weight_map' is not an object")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: malformed index ({e}); it needs a 'weight_map' object of tensor "
                                      "name -> file; re-save the checkpoint or delete the index") from None
            headers: dict[Path, dict[str, _Entry]] = {}
            for name, fname in weight_map.items():
                f = directory / str(fname)
                if not f.is_file():
                    raise CheckpointError(f"{index}: tensor '{name}' is in '{fname}', which does not exist; copy "
                                          "the missing shard or fix the index")
                if f not in headers:
                    headers[f] = _read_header(f)
                if name not in headers[f]:
                    raise CheckpointError(f"{index}: says tensor '{name}' is in {f.name}, but that file does not "
                                          "hold it; the index and the shards are from different saves")
                self.entries[name] = headers[f][name]
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{directory}: no *.safetensors files; save the model with safe_serialization "
                                      "(ds4c never reads pickle .bin/.pt files)")
            for f in files:
                for name, entry in _read_header(f).items():
                    if name in self.entries:
                        raise CheckpointError(f"{directory}: tensor '{name}' appears in both "
                                              f"{self.entries[name].file.name} and {f.name}; remove the stale file")
                    self.entries[name] = entry
        self.where = {name: e.file for name, e in self.entries.items()}
        self._open: dict[Path, Any] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> str:
        return self.entries[name].dtype

    def rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor (all of it when start is None), as stored (F4: uint8 pairs)."""
        e = self.entries[name]
        shape = e.shape if e.dtype != "F4" else (*e.shape[:-1], e.shape[-1] // 2)
        n_rows = shape[0] if shape else 1
        row_bytes = e.nbytes // n_rows if n_rows else 0
        start, stop = (0, n_rows) if start is None else (start, min(stop, n_rows))
        buf = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        fh = self._open.get(e.file)
        if fh is None:
            fh = self._open[e.file] = open(e.file, "rb")  # noqa: SIM115 - kept open across reads
        fh.seek(e.begin + start * row_bytes)
        got = fh.readinto(memoryview(buf.numpy())) if buf.numel() else 0
        if got != buf.numel():
            raise CheckpointError(f"{e.file}: cannot read tensor '{name}' (got {got} of {buf.numel()} bytes); the "
                                  "file is truncated: re-download or re-save it")
        return buf.view(_DTYPES[e.dtype]).reshape((stop - start, *shape[1:]) if shape else ())

    def close(self) -> None:
        for fh in self._open.values():
            fh.close()
        self._open.clear()


@dataclass
class _Source:
    """How to produce one destination tensor (or, for experts, one slice of it) from the files."""

    key: str          # name in the files
    kind: str         # "plain", "fp8" or "fp4"
    shape: tuple[int, ...]  # logical (dequantised) shape


@dataclass
class _Plan:
    plain: dict[str, _Source] = field(default_factory=dict)   # destination name -> source
    experts: dict[str, dict[tuple[int, str], _Source]] = field(default_factory=dict)  # stacked name -> (e, w)
    ignored: list[str] = field(default_factory=list)


def _classify(files: _Files, key: str, want_float: bool) -> _Source:
    dt, shape = files.dtype(key), files.shape(key)
    kind = "plain"
    if dt in _FP8_DTYPES:
        kind = "fp8"
    elif dt in _FP4_DTYPES and want_float:
        kind = "fp4"
        shape = shape if dt == "F4" else (*shape[:-1], shape[-1] * 2)
    if kind != "plain":
        s = scale_name(key)
        if s not in files.where:
            raise CheckpointError(f"{files.where[key]}: {dt} tensor '{key}' has no '{s}' scale tensor; quantised "
                                  "weights need their block scales: copy the complete checkpoint")
        rows, cols = shape if len(shape) == 2 else (0, 0)
        want = (-(-rows // 128), -(-cols // 128)) if kind == "fp8" else (rows, -(-cols // 32))
        if len(shape) != 2 or files.shape(s) != want:
            raise CheckpointError(f"{files.where[s]}: scale '{s}' has shape {list(files.shape(s))}, expected "
                                  f"{list(want)} for {dt} weight '{key}' of shape {list(shape)} "
                                  f"({'128x128 blocks' if kind == 'fp8' else 'one per 32 inputs'})")
    return _Source(key, kind, tuple(shape))


def _hf_name(key: str, expected: Spec) -> str | None:
    """The transformers name a file's tensor name stands for (any of the three namings)."""
    if key in expected or is_hf_name(key):
        return key
    bare = key.removeprefix("model.")
    return deepseek_to_hf_name(bare) or (("model." + bare) if is_hf_name("model." + bare) else None)


def _plan(files: _Files, expected: Spec) -> _Plan:
    plan = _Plan()
    directory = files.dir
    for key in files.where:
        bare = key.removeprefix("model.")
        if bare.startswith("mtp."):
            plan.ignored.append(key)  # multi-token-prediction block: the compiled model has none
            continue
        if key.endswith(".scale") and (key.removesuffix(".scale") + ".weight") in files.where:
            continue  # block scales are read with their weight
        name = _hf_name(key, expected)
        if name is None or name not in expected:
            hint = f" (would be '{name}')" if name else ""
            raise CheckpointError(f"{files.where[key]}: unexpected tensor '{key}'{hint}; the model built from "
                                  "config.json has no such parameter: the checkpoint is for another config, or "
                                  "config.json is wrong")
        want_float = expected[name][1].is_floating_point
        m = DS_EXPERT.match(bare)
        if m:
            src = _classify(files, key, want_float)
            slot = (int(m["expert"]), m["part"])
            if slot in plan.experts.setdefault(name, {}):
                raise CheckpointError(f"{files.where[key]}: expert {slot[0]} {slot[1]} of '{name}' appears twice "
                                      f"('{plan.experts[name][slot].key}' and '{key}'); remove one")
            plan.experts[name][slot] = src
            continue
        if name in plan.plain:
            raise CheckpointError(f"{files.where[key]}: tensors '{plan.plain[name].key}' and '{key}' both map to "
                                  f"'{name}'; remove one")
        plan.plain[name] = _classify(files, key, want_float)
    produced = set(plan.plain) | set(plan.experts)
    missing = [k for k in expected if k not in produced]
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} tensor(s) missing: {missing[:10]}"
                              f"{' ...' if len(missing) > 10 else ''} (transformers names); the checkpoint is "
                              "incomplete or for another config")
    for name, src in plan.plain.items():
        want = tuple(expected[name][0])
        if src.shape != want:
            raise CheckpointError(f"{files.where[src.key]}: tensor '{src.key}' has shape {list(src.shape)}, the "
                                  f"model expects {list(want)} for '{name}'; the checkpoint does not match "
                                  "config.json")
    for name, parts in plan.experts.items():
        e_count, rows, cols = tuple(expected[name][0])
        need = ("w2",) if name.endswith("down_proj") else ("w1", "w3")
        part_shape = (rows, cols) if need == ("w2",) else (rows // 2, cols)
        for e in range(e_count):
            for w in need:
                src = parts.get((e, w))
                if src is None:
                    raise CheckpointError(f"{directory}: expert {e} of '{name}' has no {w} weight; the checkpoint "
                                          f"is incomplete or config.json's n_routed_experts ({e_count}) is wrong")
                if src.shape != part_shape:
                    raise CheckpointError(f"{files.where[src.key]}: tensor '{src.key}' has shape {list(src.shape)}, "
                                          f"the model expects {list(part_shape)} (expert {e} {w} of '{name}'); the "
                                          "checkpoint does not match config.json")
        extra = [k for k in parts if k[0] >= e_count]
        if extra:
            src = parts[extra[0]]
            raise CheckpointError(f"{files.where[src.key]}: unexpected tensor '{src.key}': expert {extra[0][0]} but "
                                  f"config.json has n_routed_experts={e_count}")
    return plan


def _fill(files: _Files, src: _Source, dst: torch.Tensor) -> None:
    """Read ``src`` a slab of rows at a time, dequantising, straight into ``dst`` (its dtype/device)."""
    if dst.dim() <= 1 or src.shape[0] == 0:
        dst.copy_(files.rows(src.key).reshape(dst.shape))
        return
    row_elems = max(1, dst[0].numel())
    step = max(128, (_SLAB_ELEMENTS // row_elems) // 128 * 128)
    scale = files.rows(scale_name(src.key)) if src.kind != "plain" else None
    for r in range(0, src.shape[0], step):
        r1 = min(r + step, src.shape[0])
        t = files.rows(src.key, r, r1)
        if src.kind == "fp8":
            t = dequant_fp8_block(t, scale[r // 128: -(-r1 // 128)], 128, out_dtype=dst.dtype)
        elif src.kind == "fp4":
            t = dequant_mxfp4(t, scale[r:r1], 32, out_dtype=dst.dtype)
        dst[r:r1].copy_(t)


@contextlib.contextmanager
def _planned(directory: str | Path, expected: Spec) -> Iterator[tuple[_Files, _Plan]]:
    """The checkpoint in ``directory`` opened and checked against ``expected`` from its headers
    (every check that needs no tensor data), closed on leaving the block."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; pass a checkpoint directory with *.safetensors")
    files = _Files(directory)
    try:
        yield files, _plan(files, expected)
    finally:
        files.close()


def check_checkpoint(directory: str | Path, expected: Spec) -> None:
    """Refuse, from the file headers alone, a checkpoint in ``directory`` that cannot provide
    ``expected``: the checks ``load_checkpoint`` makes before reading data (missing, unexpected and
    mis-shaped tensors, missing scales, unreadable files), without reading any. ``ds4c.compile``
    runs it before tracing, so a bad checkpoint fails in a second instead of after the passes."""
    with _planned(directory, expected):
        pass


def load_checkpoint(directory: str | Path, expected: Spec, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", progress: Callable[[int, int], None] | None = None,
                    ) -> dict[str, torch.Tensor]:
    """Every tensor of ``expected`` (transformers name -> (shape, dtype)) from the checkpoint in ``directory``.

    Floating tensors come back in ``dtype``, others (tid2eid) in their expected dtype, all on
    ``device``, keyed and ordered as ``expected``. ``progress(done, total)`` is called after each tensor.
    Raises CheckpointError naming the file and tensor for anything missing, unexpected, mis-shaped
    or unreadable; every check runs on the file headers before tensor data is read.
    """
    out: dict[str, torch.Tensor] = {}
    with _planned(directory, expected) as (files, plan):
        if plan.ignored:
            logger.info("%s: ignoring %d multi-token-prediction tensors (mtp.*): ds4c compiles the main model only",
                        directory, len(plan.ignored))
        _load_all(files, plan, expected, out, dtype, device, progress)
    return out


def _load_all(files: _Files, plan: _Plan, expected: Spec, out: dict[str, torch.Tensor], dtype: torch.dtype,
              device: str | torch.device, progress: Callable[[int, int], None] | None) -> None:
    total = len(expected)
    for name in expected:
        shape, want = expected[name]
        dst = torch.empty(tuple(shape), dtype=dtype if want.is_floating_point else want, device=device)
        if name in plan.plain:
            _fill(files, plan.plain[name], dst)
        else:
            half = dst.shape[1] // 2
            for (e, w), src in plan.experts[name].items():
                part = dst[e] if w == "w2" else (dst[e, :half] if w == "w1" else dst[e, half:])
                _fill(files, src, part)
        out[name] = dst
        if progress:
            progress(len(out), total)
