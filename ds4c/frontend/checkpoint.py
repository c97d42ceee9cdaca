"""Checkpoint directories: ``config.json`` + ``*.safetensors`` (one file, or shards listed by
``model.safetensors.index.json``), in transformers' naming, in DeepSeek's release naming (FP8
block-scaled linears, MXFP4-packed routed experts), or the mix of both that transformers'
``save_pretrained`` writes (``model.layers.N.attn.wq_a.weight``, ``head.weight``).

A quantised tensor is dequantised where its parameter is asked for, and handed over with its
bytes unchanged where its packed tensors are asked for instead (``<name>.qdata`` / ``<name>.scale``
in a format of ds4c.quant.formats, the one it ships in: ``packable`` says which): an artifact
compiled in the format a checkpoint ships stores, or loads, the checkpoint's own bytes.

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
from ds4c.frontend.file_record import RecordCheck
from ds4c.quant.formats import (
    FP8_BLOCK,
    MX_BLOCK,
    dequant_fp8_block,
    dequant_mxfp4,
    from_checkpoint,
    get_format,
    packed_format,
)

INDEX = "model.safetensors.index.json"
Spec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
_FP4_DTYPES = ("I8", "U8", "F4")  # packed e2m1 pairs, when the model wants floats
_INT_DTYPES = ("I64", "I32", "I16", "I8", "U8", "BOOL")
_SCALE_DTYPES = ("F8_E8M0", "U8", "F32", "BF16", "F16")  # U8: UE8M0 exponents as plain bytes
_SLAB_ELEMENTS = 1 << 22  # elements read per slab (whole FP8 block rows)
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


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


class _BadFile(ValueError):
    """What is wrong with a safetensors file, and the fix (prefixed with the file by ``_read_header``)."""

    def __init__(self, what: str, fix: str = "it is damaged or not safetensors: re-download or re-save it"):
        super().__init__(f"{what}; {fix}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _BadFile(f"tensor '{k}' is listed twice in the header")
        out[k] = v
    return out


def _header_entry(f: Path, name: str, info: Any, data_start: int) -> _Entry:
    """One header record, checked as safetensors checks it: dtype, shape, offsets, dtype x shape == bytes."""
    if not isinstance(info, dict):
        raise _BadFile(f"tensor '{name}' has a header record of type {type(info).__name__}, not an object")
    dt, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dt, str) or dt not in _DTYPES:
        raise _BadFile(f"tensor '{name}' has dtype {dt!r}, which ds4c does not read ({', '.join(_DTYPES)})",
                       "convert the tensor to one of those (e.g. with safetensors.torch.save_file)")
    if not isinstance(shape, list) or not all(type(x) is int and x >= 0 for x in shape):
        raise _BadFile(f"tensor '{name}' has shape {shape!r}; a shape is a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(x) is int for x in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _BadFile(f"tensor '{name}' has data_offsets {offsets!r}; they must be [begin, end] with "
                       "0 <= begin <= end, counted from the end of the header")
    numel = 1
    for x in shape:
        numel *= x
    if dt == "F4" and (not shape or shape[-1] % 2):
        raise _BadFile(f"tensor '{name}' is F4 of shape {shape}: its last dimension must be even (two values a byte)")
    nbytes = numel // 2 if dt == "F4" else numel * _DTYPES[dt].itemsize
    b, e = offsets
    if e - b != nbytes:
        raise _BadFile(f"tensor '{name}' spans {e - b} bytes [{b}, {e}), but its shape {shape} of {dt} needs "
                       f"{nbytes}", "the header's dtype or shape is wrong for its data: re-save the file")
    return _Entry(f, dt, tuple(shape), data_start + b, nbytes)


def _read_header(f: Path) -> dict[str, _Entry]:
    """The tensors of a safetensors file, from its header (8-byte little-endian length + JSON object).

    The checks are safetensors' own (``Metadata::validate`` and ``read_metadata``): a header that
    fits the file and is a JSON object, string metadata, known dtypes, shapes of non-negative ints,
    ``dtype x shape == end - begin``, and data ranges that tile the data section exactly (sorted,
    contiguous from 0 to the end of the file: none overlaps another, points into the header or
    past the end, and no byte belongs to no tensor). What no header check can see is a dtype
    that reinterprets data of the same size (``I32`` over ``F32`` bytes, ``F16`` over ``BF16``):
    the loader refuses integer dtypes for floating parameters and the reverse, and non-finite
    values while reading, which catches most but not all such mix-ups."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n <= 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise _BadFile(f"header length {n} does not fit in a {size}-byte file",
                               "it is truncated or not safetensors: re-download or re-save it")
            raw = fh.read(n)
        try:
            header = json.loads(raw, object_pairs_hook=_unique_keys)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _BadFile(f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise _BadFile(f"header is a JSON {type(header).__name__}, not an object of tensor records")
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise _BadFile("header's __metadata__ is not an object of strings")
        entries = {name: _header_entry(f, name, info, 8 + n) for name, info in header.items()}
        at, last = 8 + n, None
        for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].nbytes)):
            if e.begin != at:
                where = f"after tensor '{last}'" if last else "at the start of the data"
                if e.begin < at:
                    raise _BadFile(f"tensor '{name}' [{e.begin - 8 - n}, {e.begin - 8 - n + e.nbytes}) overlaps "
                                   f"tensor '{last}', which ends at {at - 8 - n}")
                raise _BadFile(f"bytes [{at - 8 - n}, {e.begin - 8 - n}) {where} belong to no tensor (tensor "
                               f"'{name}' starts at {e.begin - 8 - n})")
            at, last = e.begin + e.nbytes, name
        if at != size:
            what = (f"tensor '{last}' ends at byte {at}" if last else f"the header ends at byte {at}")
            raise _BadFile(f"{what} but the file has {size} bytes",
                           "it is truncated: re-download or re-save it" if at > size else
                           "bytes after the last tensor belong to none: re-download or re-save it")
        return entries
    except _BadFile as e:
        raise CheckpointError(f"{f}: unreadable safetensors file: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{f}: cannot read ({e.strerror or e}); check the file's permissions") from None


def _inside(directory: Path, fname: Any, what: str) -> Path:
    """``directory / fname`` when ``fname`` is a plain relative file name that stays inside the
    checkpoint directory once symlinks are resolved; CheckpointError (``what`` + why) otherwise.

    A checkpoint comes from anywhere, so its index must not make ds4c read (and embed in an
    artifact) a file elsewhere on this machine: no absolute names, no ``..``, no symlink out of the
    directory. One exception: a Hugging Face hub snapshot (``.../snapshots/<revision>/``) holds
    symlinks into its repository's ``blobs/`` folder, so those targets are inside too."""
    if not isinstance(fname, str) or not fname or "\\" in fname or fname.startswith("/") \
            or ".." in fname.split("/") or Path(fname).is_absolute():
        raise CheckpointError(f"{what} is not a file name inside the checkpoint directory {directory} (absolute "
                              "names, '..' and backslashes are refused); name the shard relative to the directory")
    path = directory / fname
    real, root = path.resolve(), directory.resolve()
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(real.is_relative_to(r) for r in roots):
        raise CheckpointError(f"{what} is a symlink to {real}, outside the checkpoint directory {directory}; copy "
                              "the file into the directory instead of linking to it")
    return path


class _Files:
    """Which file holds which tensor, from the headers; tensor data read on demand, a row range at a time.

    Reads use plain positioned file reads into the destination-sized slab rather than a memory map:
    mapped file pages count towards the process' resident memory, so an mmap-based loader peaks at
    twice the checkpoint when the result has the file's dtype."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.entries: dict[str, _Entry] = {}
        self.files: list[Path] = []  # every file read: the index (if any), then the shards
        index = directory / INDEX
        if index.is_file():
            _inside(directory, INDEX, f"{index}")
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("'weight_map' is not an object")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
                raise CheckpointError(f"{index}: malformed index ({e}); it needs a 'weight_map' object of tensor "
                                      "name -> file; re-save the checkpoint or delete the index") from None
            self.files.append(index)
            headers: dict[Path, dict[str, _Entry]] = {}
            for name, fname in weight_map.items():
                f = _inside(directory, fname, f"{index}: tensor '{name}' is in '{fname}', which")
                if not f.is_file():
                    raise CheckpointError(f"{index}: tensor '{name}' is in '{fname}', which does not exist; copy "
                                          "the missing shard or fix the index")
                if f not in headers:
                    headers[f] = _read_header(f)
                    self.files.append(f)
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
                _inside(directory, f.name, f"{f}")
                self.files.append(f)
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


def _classify(files: _Files, key: str, want_float: bool, name: str) -> _Source:
    """How ``key`` becomes parameter ``name``: as stored, or dequantised with its scale. A stored
    dtype of the wrong class is refused (integers for a floating parameter would be converted
    value by value, floats for an integer one truncated: a wrong header, never a format)."""
    dt, shape = files.dtype(key), files.shape(key)
    if want_float and dt in _INT_DTYPES and dt not in _FP4_DTYPES:
        raise CheckpointError(f"{files.where[key]}: tensor '{key}' is stored as {dt}, but '{name}' is a floating "
                              "point parameter; the header's dtype is wrong or the checkpoint is for another model: "
                              "re-save it with the tensor's real dtype")
    if not want_float and dt not in _INT_DTYPES:
        raise CheckpointError(f"{files.where[key]}: tensor '{key}' is stored as {dt}, but '{name}' holds integers "
                              "(indices); the header's dtype is wrong or the checkpoint is for another model: "
                              "re-save it with an integer dtype")
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
        if files.dtype(s) not in _SCALE_DTYPES:
            raise CheckpointError(f"{files.where[s]}: scale '{s}' is stored as {files.dtype(s)}; block scales are "
                                  f"{', '.join(_SCALE_DTYPES)} (U8: UE8M0 exponent bytes): re-save the checkpoint")
        rows, cols = shape if len(shape) == 2 else (0, 0)
        want = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)) if kind == "fp8" else (rows, -(-cols // MX_BLOCK))
        if len(shape) != 2 or files.shape(s) != want:
            raise CheckpointError(f"{files.where[s]}: scale '{s}' has shape {list(files.shape(s))}, expected "
                                  f"{list(want)} for {dt} weight '{key}' of shape {list(shape)} "
                                  f"({f'{FP8_BLOCK}x{FP8_BLOCK} blocks' if kind == 'fp8' else f'one per {MX_BLOCK} inputs'})")
    return _Source(key, kind, tuple(shape))


def _hf_name(key: str, expected: Spec) -> str | None:
    """The transformers name a file's tensor name stands for (any of the three namings)."""
    if key in expected or is_hf_name(key):
        return key
    bare = key.removeprefix("model.")
    return deepseek_to_hf_name(bare) or (("model." + bare) if is_hf_name("model." + bare) else None)


def _plan(files: _Files, expected: Spec, partial: bool = False) -> _Plan:
    plan = _Plan()
    directory = files.dir
    for key in files.where:
        bare = key.removeprefix("model.")
        if key.endswith(".scale") and (key.removesuffix(".scale") + ".weight") in files.where:
            continue  # block scales are read with their weight
        if bare.startswith("mtp.") and _hf_name(key, expected) not in expected:
            plan.ignored.append(key)  # multi-token-prediction block: compiled only with --speculative
            continue
        name = _hf_name(key, expected)
        if partial and name is not None and name not in expected:
            continue  # a parameter not asked for this time (one weight read alone)
        if name is None or name not in expected:
            hint = f" (would be '{name}')" if name else ""
            raise CheckpointError(f"{files.where[key]}: unexpected tensor '{key}'{hint}; the model built from "
                                  "config.json has no such parameter: the checkpoint is for another config, or "
                                  "config.json is wrong")
        want_float = expected[name][1].is_floating_point
        m = DS_EXPERT.match(bare)
        if m:
            src = _classify(files, key, want_float, name)
            slot = (int(m["expert"]), m["part"])
            if slot in plan.experts.setdefault(name, {}):
                raise CheckpointError(f"{files.where[key]}: expert {slot[0]} {slot[1]} of '{name}' appears twice "
                                      f"('{plan.experts[name][slot].key}' and '{key}'); remove one")
            plan.experts[name][slot] = src
            continue
        if name in plan.plain:
            raise CheckpointError(f"{files.where[key]}: tensors '{plan.plain[name].key}' and '{key}' both map to "
                                  f"'{name}'; remove one")
        plan.plain[name] = _classify(files, key, want_float, name)
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


def _rows_alone(src: _Source, rows: tuple[int, int], shape: tuple[int, ...]) -> bool:
    """Whether rows [start, stop) of a stored tensor can be read without the others: a matrix,
    stored plain or FP8 with the slice on block boundaries (MXFP4 and vectors are read whole)."""
    start, stop = rows
    if len(shape) < 2 or src.kind == "fp4":
        return False
    return src.kind == "plain" or (start % FP8_BLOCK == 0 and (stop % FP8_BLOCK == 0 or stop == shape[0]))


def _fill(files: _Files, src: _Source, dst: torch.Tensor, allow_nonfinite: bool = False, first: int = 0) -> None:
    """Read ``src`` a slab of rows at a time, dequantising, straight into ``dst`` (its dtype/device);
    ``first``: ``dst`` holds rows ``first ..`` of the tensor (a rank's slice; a multiple of the FP8
    block for FP8 tensors), which alone are read.

    Each slab is checked for NaN/Inf on its way (``_finite``) unless ``allow_nonfinite``: a
    non-finite weight makes every logit NaN, and greedy decoding then emits token 0 forever."""
    if first:
        if not _rows_alone(src, (first, first + dst.shape[0]), src.shape):
            raise AssertionError(f"_fill: rows from {first} of {src.key} cannot be read alone")
    elif dst.dim() <= 1 or src.shape[0] == 0:
        t = files.rows(src.key).reshape(dst.shape)
        if not allow_nonfinite:
            _finite(files, src, t, 0)
        dst.copy_(t)
        return
    row_elems = max(1, dst[0].numel())
    step = max(FP8_BLOCK, (_SLAB_ELEMENTS // row_elems) // FP8_BLOCK * FP8_BLOCK)  # whole FP8 block rows
    scale = None
    if src.kind != "plain":
        s = scale_name(src.key)
        scale = files.rows(s)
        if files.dtype(s) == "U8":  # UE8M0 exponents stored as bytes: the same bits as F8_E8M0
            scale = scale.view(torch.float8_e8m0fnu)
    for r in range(0, dst.shape[0], step):
        r1 = min(r + step, dst.shape[0])
        a, b = first + r, first + r1  # rows of the stored tensor
        t = files.rows(src.key, a, b)
        if src.kind == "fp8":
            t = dequant_fp8_block(t, scale[a // FP8_BLOCK: -(-b // FP8_BLOCK)], FP8_BLOCK, out_dtype=dst.dtype)
        elif src.kind == "fp4":
            t = dequant_mxfp4(t, scale[a:b], MX_BLOCK, out_dtype=dst.dtype)
        if not allow_nonfinite:
            _finite(files, src, t, a)
        dst[r:r1].copy_(t)


def _finite(files: _Files, src: _Source, t: torch.Tensor, first_row: int) -> None:
    """Refuse a slab (rows from ``first_row``) holding NaN or Inf, naming the tensor and the place.

    One reduction per slab, on the slab just read (still in cache): a NaN or Inf anywhere makes
    the fp32 sum non-finite, so the exact per-element test runs only then (or when finite values
    overflow the sum, which that test then clears). Quantised weights are checked dequantised, so
    a NaN scale or FP8 NaN code counts too."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return
    bad = ~torch.isfinite(t.to(acc) if t.element_size() == 1 else t)
    if not bool(bad.any()):
        return
    where = [int(i) for i in bad.nonzero()[0]]
    if where and t.dim() >= 2:
        where[0] += first_row
    raise CheckpointError(f"{files.where[src.key]}: tensor '{src.key}' holds {int(bad.sum())} NaN/Inf value(s) "
                          f"(the first at index {where}); they would make every logit NaN: use an intact "
                          "checkpoint, or pass --allow-nonfinite-weights (ds4c.compile(..., allow_nonfinite=True)) "
                          "if they are meant")


@contextlib.contextmanager
def _planned(directory: str | Path, expected: Spec, record: RecordCheck | None = None, partial: bool = False,
             ) -> Iterator[tuple[_Files, _Plan]]:
    """The checkpoint in ``directory`` opened and checked against ``expected`` from its headers
    (every check that needs no tensor data; first, that ``record`` names every file read),
    closed on leaving the block."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; pass a checkpoint directory with *.safetensors")
    files = _Files(directory)
    try:
        if record is not None:
            record.files_read(directory, files.files)
        yield files, _plan(files, _split_packed(expected)[0], partial)
    finally:
        files.close()


def shipped_format(files: _Files, src: _Source) -> str | None:
    """The format of ds4c.quant.formats a checkpoint tensor is stored in (None: not quantised)."""
    if src.kind == "fp4":
        return "mxfp4"
    if src.kind == "fp8":
        return "fp8" if files.dtype(scale_name(src.key)) in ("F8_E8M0", "U8") else "fp8-f32scale"
    return None


_PACKED_PARTS = ("qdata", "scale")


def _split_packed(expected: Spec) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]],
                                           dict[str, tuple[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]]]:
    """``expected`` with the weights asked for as packed tensors (``<name>.qdata`` + ``<name>.scale``,
    the artifact's names, in a format's exact shapes and dtypes) planned as the weights themselves:
    (weights to plan, name -> (format, parts))."""
    groups: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}
    for k, (shape, dt) in expected.items():
        base, _, part = k.rpartition(".")
        if part in _PACKED_PARTS and f"{base}.qdata" in expected:
            groups.setdefault(base, {})[part] = (tuple(shape), dt)
    weights = {k: (tuple(v[0]), v[1]) for k, v in expected.items()}
    packed = {}
    for base, parts in groups.items():
        found = packed_format(parts)
        if found is None:
            continue
        fmt, shape = found
        packed[base] = (fmt, parts)
        for part in parts:
            weights.pop(f"{base}.{part}")
        weights.setdefault(base, (shape, torch.float32))
    return weights, packed


def _sources(plan: _Plan, name: str) -> list[list[_Source]]:
    """Per matrix of ``name`` (one, or one per expert), its checkpoint tensors stacked along rows."""
    if name in plan.plain:
        return [[plan.plain[name]]]
    parts = plan.experts[name]
    order = ("w2",) if name.endswith("down_proj") else ("w1", "w3")
    return [[parts[(e, w)] for w in order] for e in range(1 + max(e for e, _ in parts))]


def _packable_layout(files: _Files, plan: _Plan, name: str, fmt: str, shape: tuple[int, ...]) -> str | None:
    """Why ``name`` cannot be handed over as ``fmt`` with the checkpoint's bytes, or None."""
    mats = _sources(plan, name)
    shipped = {shipped_format(files, src) for mat in mats for src in mat}
    if shipped != {fmt}:
        return f"the checkpoint stores it as {' / '.join(sorted(str(f) for f in shipped))}"
    if fmt.startswith("fp8") and any(files.dtype(src.key) != "F8_E4M3" for mat in mats for src in mat):
        return "the checkpoint stores it as e5m2, not e4m3"
    f = get_format(fmt)
    rows = [src.shape for src in mats[0]]
    stacked = {part: sum(f.packed_spec(r)[part][0][0] for r in rows) for part in f.parts}
    want = f.packed_spec(shape)
    if any(want[part][0][-2] != stacked[part] for part in f.parts):  # e.g. w1 | w3 scale blocks straddling
        return f"its {len(rows)} stacked matrices' {fmt} blocks are not those of the stack"
    return None


def packable(directory: str | Path, expected: Spec, formats: Mapping[str, str]) -> dict[str, str]:
    """Of ``formats`` (weight -> format), the weights the checkpoint in ``directory`` stores in that
    format with the layout of its packed tensors: loading their packed tensors reads the bytes as
    stored, no dequantise / requantise (``load_checkpoint`` with ``<name>.qdata`` / ``.scale``)."""
    with _planned(directory, expected) as (files, plan):
        return {name: fmt for name, fmt in formats.items() if name in expected
                and (name in plan.plain or name in plan.experts)
                and _packable_layout(files, plan, name, fmt, tuple(expected[name][0])) is None}


def _read_packed(files: _Files, plan: _Plan, name: str, fmt: str,
                 parts: Mapping[str, tuple[tuple[int, ...], torch.dtype]], allow_nonfinite: bool
                 ) -> dict[str, torch.Tensor]:
    """The packed tensors of ``name`` in ``fmt``: the checkpoint's tensors as stored (stacked per
    expert, w1 above w3), checked for NaN codes unless ``allow_nonfinite``."""
    shape = packed_format(dict(parts))[1]
    why = _packable_layout(files, plan, name, fmt, shape)
    if why is not None:
        raise CheckpointError(f"{files.dir}: '{name}' is asked for packed as {fmt}, but {why}; the checkpoint is not "
                              "the one the artifact was compiled against: recompile it")
    mats = []
    for mat in _sources(plan, name):
        pieces = [from_checkpoint(fmt, files.rows(src.key), _scale_rows(files, src)) for src in mat]
        for src, p in zip(mat, pieces, strict=True):
            if not allow_nonfinite:
                _finite_packed(files, src, p)
        mats.append({part: torch.cat([p[part] for p in pieces]) for part in pieces[0]})
    out = {part: (mats[0][part] if name in plan.plain else torch.stack([m[part] for m in mats])) for part in parts}
    for part, (want_shape, want_dtype) in parts.items():
        if tuple(out[part].shape) != tuple(want_shape) or out[part].dtype != want_dtype:
            raise CheckpointError(f"{files.dir}: '{name}.{part}' is {out[part].dtype}{list(out[part].shape)} in the "
                                  f"checkpoint, {want_dtype}{list(want_shape)} expected; recompile the artifact")
    return out


def _scale_rows(files: _Files, src: _Source) -> torch.Tensor:
    s = scale_name(src.key)
    scale = files.rows(s)
    return scale.view(torch.float8_e8m0fnu) if files.dtype(s) == "U8" else scale


def _finite_packed(files: _Files, src: _Source, packed: Mapping[str, torch.Tensor]) -> None:
    """Refuse packed tensors with NaN codes (e4m3 0x7F / 0xFF, UE8M0 0xFF, non-finite fp32 scales):
    what ``_finite`` finds in dequantised weights, found in the bytes."""
    q, s = packed["qdata"], packed["scale"]
    bad = int(((q.view(torch.uint8) & 0x7F) == 0x7F).sum()) if q.dtype == torch.float8_e4m3fn else 0
    bad += int((s == 255).sum()) if s.dtype == torch.uint8 else int((~torch.isfinite(s)).sum())
    if bad:
        raise CheckpointError(f"{files.where[src.key]}: tensor '{src.key}' or its scale holds {bad} NaN/Inf code(s); "
                              "they would make every logit NaN: use an intact checkpoint, or pass "
                              "--allow-nonfinite-weights (ds4c.compile(..., allow_nonfinite=True)) if they are meant")


def check_checkpoint(directory: str | Path, expected: Spec) -> None:
    """Refuse, from the file headers alone, a checkpoint in ``directory`` that cannot provide
    ``expected``: the checks ``load_checkpoint`` makes before reading data (missing, unexpected and
    mis-shaped tensors, missing scales, unreadable files), without reading any. ``ds4c.compile``
    runs it before tracing, so a bad checkpoint fails in a second instead of after the passes."""
    with _planned(directory, expected):
        pass


def load_checkpoint(directory: str | Path, expected: Spec, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", progress: Callable[[int, int], None] | None = None,
                    allow_nonfinite: bool = False, record: RecordCheck | None = None, partial: bool = False,
                    shard: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``expected`` (transformers name -> (shape, dtype)) from the checkpoint in ``directory``.

    Floating tensors come back in ``dtype``, others (tid2eid) in their expected dtype, all on
    ``device``, keyed and ordered as ``expected``. ``progress(done, total)`` is called after each tensor.
    Raises CheckpointError naming the file and tensor for anything missing, unexpected, mis-shaped
    or unreadable; every check runs on the file headers before tensor data is read. NaN/Inf
    values are refused as they are read, unless ``allow_nonfinite``. ``record``: a reference-mode
    artifact's record of the checkpoint's files, checked before any header is parsed (every
    recorded file unchanged) and after (every file read is recorded; ``ds4c.frontend.file_record``).
    ``partial``: ``expected`` names some of the model's parameters (one weight read alone); the
    checkpoint's other tensors are not read. Weights asked for as packed tensors (``<name>.qdata``
    and ``<name>.scale`` in the format the checkpoint ships them in) come with its bytes unchanged.
    ``shard``: name -> slices of a rank of a sharded artifact (ds4c.passes.shard_experts; ``expected``
    has the whole shapes): those tensors come as the rank's slices; of routed experts stored one
    per tensor (DeepSeek's release naming) only the rank's experts are read.
    """
    out: dict[str, torch.Tensor] = {}
    if record is not None:
        record.before_reading(Path(directory))
    weights, packed = _split_packed(expected)
    with _planned(directory, expected, record, partial) as (files, plan):
        if plan.ignored:
            logger.info("%s: ignoring %d multi-token-prediction tensors (mtp.*): compile with --speculative to use them",
                        directory, len(plan.ignored))
        _load_all(files, plan, {k: v for k, v in weights.items() if k in expected}, out, dtype, device, progress,
                  allow_nonfinite, shard or {})
        for name, (fmt, parts) in packed.items():
            for part, t in _read_packed(files, plan, name, fmt, parts, allow_nonfinite).items():
                out[f"{name}.{part}"] = t.to(device)
    return {k: out[k] for k in expected}


def checkpoint_files(directory: str | Path, expected: Spec) -> list[Path]:
    """The files loading ``expected`` from ``directory`` reads: the index (if any), then the shards."""
    with _planned(directory, expected) as (files, _):
        return list(files.files)


def _load_all(files: _Files, plan: _Plan, expected: Spec, out: dict[str, torch.Tensor], dtype: torch.dtype,
              device: str | torch.device, progress: Callable[[int, int], None] | None,
              allow_nonfinite: bool, shard: Mapping[str, Any]) -> None:
    from ds4c.distributed.shards import leading_rows, slice_tensor

    total = len(expected)
    for name in expected:
        shape, want = expected[name]
        rows, slices = leading_rows(shard.get(name, []))
        first, last = 0, shape[0] if shape else 0
        if rows is not None and name in plan.plain and not _rows_alone(plan.plain[name], rows, shape):
            rows = None
        if rows is None:  # read whole, then cut
            slices = list(shard.get(name, []))
        else:  # only this rank's rows (its experts, its heads' rows) are read
            first, last = rows
            shape = (last - first, *shape[1:])
        dst = torch.empty(tuple(shape), dtype=dtype if want.is_floating_point else want, device=device)
        if name in plan.plain:
            _fill(files, plan.plain[name], dst, allow_nonfinite, first)
        else:
            half = dst.shape[1] // 2
            for (e, w), src in plan.experts[name].items():
                if not first <= e < last:
                    continue
                part = dst[e - first] if w == "w2" else (dst[e - first, :half] if w == "w1" else dst[e - first, half:])
                _fill(files, src, part, allow_nonfinite)
        out[name] = slice_tensor(dst, slices, name).clone() if slices else dst
        if progress:
            progress(len(out), total)
