"""Packed weights under their artifact names: ``<param>.qdata`` and ``<param>.scale``.

The same function packs embedded weights at compile time and referenced weights at load time
(the manifest's ``quantize`` transform), so both paths store identical bytes. Weights a source
hands over packed already (a checkpoint's FP8 / MXFP4 tensors in their assigned format,
ds4c.frontend.checkpoint.packable) keep those bytes: ``pack_weights`` leaves them as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping

import torch

from ds4c.quant.formats import get_format


def packed_name(param: str, part: str) -> str:
    return f"{param}.{part}"


def packed_names(assignment: Mapping[str, str]) -> set[str]:
    """Names of every packed tensor of an assignment (param -> format)."""
    return {packed_name(p, part) for p, f in assignment.items() for part in get_format(f).parts}


def pack_weights(weights: MutableMapping[str, torch.Tensor], assignment: Mapping[str, str], *,
                 keep: Iterable[str] = ()) -> MutableMapping[str, torch.Tensor]:
    """Replace each assigned weight by its packed tensors, in place; weights already packed (or absent)
    are skipped, so applying it twice changes nothing and packed tensors a source provided keep their
    bytes. Names in ``keep`` keep their unpacked tensor too."""
    keep = set(keep)
    for param, fmt_name in assignment.items():
        if param not in weights:
            continue
        fmt = get_format(fmt_name)
        if all(packed_name(param, part) in weights for part in fmt.parts):
            if param not in keep:
                del weights[param]
            continue
        w = weights[param] if param in keep else weights.pop(param)
        for part, t in fmt.pack(w).items():
            weights[packed_name(param, part)] = t.contiguous()
        del w
    return weights


def provided_spec(spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]], packed: Mapping[str, str],
                  keep: Iterable[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What a weight source gives when the weights in ``packed`` (name -> format) come as their
    packed tensors: those in place of each (which is given too where it is in ``keep``)."""
    keep = set(keep)
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, (shape, dtype) in spec.items():
        if name not in packed or name in keep:
            out[name] = (tuple(shape), dtype)
        if name in packed:
            for part, (s, dt) in get_format(packed[name]).packed_spec(tuple(shape)).items():
                out[packed_name(name, part)] = (s, dt)
    return out


def stored_spec(spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]], assignment: Mapping[str, str],
                read: Iterable[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors an artifact stores, in ``spec`` order: packed parts in place of each assigned weight
    (which is kept too where some graph still reads it unpacked, ``read``)."""
    read = set(read)
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, (shape, dtype) in spec.items():
        if name in assignment:
            for part, (s, dt) in get_format(assignment[name]).packed_spec(tuple(shape)).items():
                out[packed_name(name, part)] = (s, dt)
        if name not in assignment or name in read:
            out[name] = (tuple(shape), dtype)
    return out


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dequantize_weights(weights: MutableMapping[str, torch.Tensor], tensors: Mapping[str, Mapping]) -> None:
    """The manifest's ``dequantize`` transform (ds4c.passes.lower_packed_weights), in place: each
    ``name`` made from its packed tensors (``from``) in ``format`` / ``shape`` / ``dtype``. Where the
    packed tensors are absent the weight must be there already (an embedded artifact stores it)."""
    from ds4c.errors import ArtifactError

    for name, spec in tensors.items():
        sources = list(spec["from"])
        if not all(s in weights for s in sources):
            if name not in weights:
                raise ArtifactError(f"weight transform dequantize: '{name}' lacks its packed tensors {sources}")
            continue
        if spec["dtype"] not in _DTYPES:
            raise ArtifactError(f"weight transform dequantize: '{name}' names dtype {spec['dtype']!r}; "
                                f"one of {', '.join(_DTYPES)} expected")
        fmt = get_format(spec["format"])
        shape = tuple(int(d) for d in spec["shape"])
        packed = dict(zip(fmt.packed_spec(shape), (weights[s] for s in sources), strict=True))
        weights[name] = fmt.unpack(packed, shape, _DTYPES[spec["dtype"]])


def concat_weights(weights: MutableMapping[str, torch.Tensor], tensors: Mapping[str, list[str]]) -> None:
    """The manifest's ``concat`` transform (ds4c.passes.merge_sibling_linears), in place: each
    merged weight is its parts concatenated along dim 0 (skipped where it is there already)."""
    from ds4c.errors import ArtifactError

    for name, parts in tensors.items():
        if name in weights:
            continue
        missing = [p for p in parts if p not in weights]
        if missing:
            raise ArtifactError(f"weight transform concat: '{name}' lacks its part '{missing[0]}'")
        weights[name] = torch.cat([weights[p] for p in parts], 0)
