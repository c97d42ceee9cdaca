"""Weight formats: exact round trips on representable values, error within each format's bound,
exact byte accounting from shapes, and the quant.dequant op."""

from __future__ import annotations

import pytest
import torch

from ds4c.ir import parse_graph, print_graph, verify_graph
from ds4c.ir.registry import get_op
from ds4c.quant import FORMATS, get_format, pack_weights, packed_names
from ds4c.quant.formats import E2M1_VALUES, FormatError

SHAPES = [(256, 384), (130, 96), (3, 160, 64)]  # whole blocks, ragged blocks, an expert stack


def _pow2(g: torch.Generator, shape, lo: int = -20, hi: int = 4) -> torch.Tensor:
    return torch.exp2(torch.randint(lo, hi, shape, generator=g).float())


def _representable(name: str, shape, g: torch.Generator) -> torch.Tensor:
    """Values the format holds exactly, with each block's maximum at the top of the grid (so the
    packer derives the same scale back)."""
    *lead, rows, cols = shape
    if name == "bf16":
        return torch.randn(shape, generator=g).bfloat16().float()
    if name in ("fp8", "fp8-f32scale"):
        all_e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        grid = all_e4m3[all_e4m3.isfinite()]
        q = grid[torch.randint(0, grid.numel(), shape, generator=g)]
        q[..., ::128, ::128] = 448.0
        br, bc = -(-rows // 128), -(-cols // 128)
        s = _pow2(g, (*lead, br, bc)).repeat_interleave(128, -2)[..., :rows, :].repeat_interleave(128, -1)[..., :cols]
        return q * s
    if name == "int8":
        q = torch.randint(-127, 128, shape, generator=g).float()
        q[..., 0] = 127.0
        return q * _pow2(g, (*lead, rows, 1))
    if name == "mxfp4":
        q = E2M1_VALUES[torch.randint(0, 16, shape, generator=g)]
        q[..., ::32] = -6.0
        return q * _pow2(g, (*lead, rows, cols // 32)).repeat_interleave(32, -1)
    raise AssertionError(name)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_round_trip_exact_on_representable_values(name, shape):
    w = _representable(name, shape, torch.Generator().manual_seed(1))
    fmt = get_format(name)
    packed = fmt.pack(w)
    assert torch.equal(fmt.unpack(packed, shape), w)
    # and packing what came back gives the same bytes
    again = fmt.pack(fmt.unpack(packed, shape))
    assert all(torch.equal(packed[k].view(torch.uint8), again[k].view(torch.uint8)) for k in packed)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_error_within_theoretical_bound(name, shape):
    g = torch.Generator().manual_seed(2)
    fmt = get_format(name)
    # Gaussian weights, a heavy tail, tiny values (subnormal ranges) and exact zeros
    w = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 2)
    w.view(-1)[::7] *= 1e-6
    w.view(-1)[::11] = 0
    err = (fmt.roundtrip(w) - w).abs()
    assert (err <= fmt.error_bound(w)).all(), f"{name}: max excess {(err - fmt.error_bound(w)).max()}"


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_bytes_exact_from_shapes(name):
    fmt = get_format(name)
    for shape in SHAPES:
        packed = fmt.pack(torch.randn(shape))
        spec = fmt.packed_spec(shape)
        assert list(packed) == list(spec) == list(fmt.parts)
        for part, (s, dt) in spec.items():
            assert tuple(packed[part].shape) == s and packed[part].dtype == dt, (part, packed[part].shape, s)
        assert fmt.nbytes(shape) == sum(t.numel() * t.element_size() for t in packed.values())


def test_bits_per_weight_and_layouts():
    assert get_format("mxfp4").nbytes((4096, 4096)) == 4096 * 4096 // 2 + 4096 * 4096 // 32
    assert get_format("fp8").nbytes((4096, 4096)) == 4096 * 4096 + 32 * 32
    assert get_format("int8").nbytes((4096, 4096)) == 4096 * 4096 + 4096 * 4
    # MXFP4 packs along the input dimension: low nibble = even index, UE8M0 exponent bytes
    packed = get_format("mxfp4").pack(torch.tensor([[0.5, -6.0] + [0.0] * 30]))
    assert packed["qdata"][0, 0].item() == 0x01 | (0x0F << 4) and packed["scale"][0, 0].item() == 127
    with pytest.raises(FormatError, match="divisible by 32"):
        get_format("mxfp4").packed_spec((8, 48))


def test_target_support():
    from ds4c.targets import get_target

    def support(fmt, t):
        return get_format(fmt).support(get_target(t))

    assert support("fp8", "h100") == "native" and support("mxfp4", "h100") is None
    assert support("mxfp4", "b200") == "native" and support("int8", "b300") == "dequant"
    assert all(support(f, "cpu") is None for f in FORMATS)


def test_pack_weights_is_idempotent_and_names_parts():
    w = {"a.weight": torch.randn(64, 64), "b": torch.randn(4)}
    assignment = {"a.weight": "mxfp4"}
    pack_weights(w, assignment)
    assert set(w) == {"a.weight.qdata", "a.weight.scale", "b"} == packed_names(assignment) | {"b"}
    before = {k: v.clone() for k, v in w.items()}
    pack_weights(w, assignment)
    assert all(torch.equal(before[k], w[k]) for k in w)


def test_dequant_op_text_verifies_and_runs():
    text = ('graph @g(param %w.qdata: u8[4,32], param %w.scale: u8[4,2], input %x: bf16[2,64]) {\n'
            '  %w = quant.dequant(%w.qdata, %w.scale, format="mxfp4", shape=[4, 64], dtype=dtype(bf16)) : bf16[4,64]\n'
            '  %y = aten.linear.default(%x, %w) : bf16[2,4]\n'
            '  return y=%y\n}\n')
    g = parse_graph(text)
    verify_graph(g)
    assert print_graph(g) == text
    w = torch.randn(4, 64)
    p = get_format("mxfp4").pack(w)
    got = get_op("quant.dequant").reference(p["qdata"], p["scale"], format="mxfp4", shape=[4, 64], dtype=torch.bfloat16)
    assert torch.equal(got, get_format("mxfp4").roundtrip(w, torch.bfloat16))
    bad = parse_graph(text.replace("u8[4,2]", "u8[4,3]"))
    with pytest.raises(Exception, match="scale"):
        verify_graph(bad)
