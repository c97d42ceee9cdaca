"""The formats' math on one matrix (ds4c.quant.formats): FP8 block and MXFP4 round trips, rounding, bounds."""

import torch

from ds4c.quant.formats import (
    E2M1_VALUES,
    dequant_fp8_block,
    dequant_mxfp4,
    pack_fp4_e2m1,
    quant_fp8_block,
    quant_mxfp4,
    round_to_e2m1,
    unpack_fp4_e2m1,
)


def test_fp4_pack_unpack_is_exact_and_low_nibble_first():
    g = torch.Generator().manual_seed(0)
    vals = E2M1_VALUES[torch.randint(0, 16, (5, 64), generator=g)]
    packed = pack_fp4_e2m1(vals)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_fp4_e2m1(packed), vals)
    one = pack_fp4_e2m1(torch.tensor([[0.5, 6.0]]))  # codes 1 (low) and 7 (high)
    assert one.item() == 0x71


def test_round_to_e2m1_ties_to_even():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -2.5])
    assert round_to_e2m1(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -2.0]


def test_mxfp4_round_trip_exact_on_representable_values():
    g = torch.Generator().manual_seed(1)
    codes = E2M1_VALUES[torch.randint(0, 16, (8, 64), generator=g)]
    codes[:, ::32] = 6.0  # every block reaches the max so its scale is exactly 2^k
    scales = torch.exp2(torch.randint(-4, 4, (8, 2), generator=g).float())
    w = codes * scales.repeat_interleave(32, -1)
    q, s = quant_mxfp4(w)
    assert torch.equal(dequant_mxfp4(q, s), w)


def test_mxfp4_error_bound():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    q, s = quant_mxfp4(w)
    scale = s.float().repeat_interleave(32, -1)
    # gaps of the e2m1 grid are at most 2 (between 4 and 6): error <= 1 * scale
    assert ((dequant_mxfp4(q, s) - w).abs() <= scale + 1e-7).all()


def test_fp8_round_trip_exact_on_representable_values():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(256, 256, generator=g).to(torch.float8_e4m3fn).float()
    base[::128, ::128] = 448.0  # block max = 448 so the UE8M0 scale is exactly 1 * 2^k
    scales = torch.exp2(torch.randint(-3, 3, (2, 2), generator=g).float())
    w = base * scales.repeat_interleave(128, 0).repeat_interleave(128, 1)
    q, s = quant_fp8_block(w)
    assert s.dtype == torch.float8_e8m0fnu
    assert torch.equal(dequant_fp8_block(q, s), w)


def test_fp8_error_bound_and_ragged_edges():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(4))
    q, s = quant_fp8_block(w)
    assert s.shape == (3, 2)
    d = dequant_fp8_block(q, s)
    scale = s.float().repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    # e4m3 has 3 mantissa bits: relative error <= 2^-4 for normals; absolute floor for subnormals
    assert ((d - w).abs() <= w.abs() * 2 ** -4 + scale * 2 ** -9).all()


def test_unpack_accepts_torch_float4_dtype_and_deepseek_nibble_order():
    # DeepSeek's convert.py decodes table[x & 0xF] first, then table[x >> 4]: low nibble = even index
    byte = torch.tensor([[0x2F, 0x07]], dtype=torch.uint8)  # codes (F, 2), (7, 0)
    assert unpack_fp4_e2m1(byte).tolist() == [[-6.0, 1.0, 6.0, 0.0]]
    assert unpack_fp4_e2m1(byte.view(torch.int8)).tolist() == [[-6.0, 1.0, 6.0, 0.0]]
    if hasattr(torch, "float4_e2m1fn_x2"):
        assert unpack_fp4_e2m1(byte.view(torch.float4_e2m1fn_x2)).tolist() == [[-6.0, 1.0, 6.0, 0.0]]


def test_fp8_fp32_scales_and_output_dtype():
    w = torch.randn(130, 260, generator=torch.Generator().manual_seed(5))
    q, s = quant_fp8_block(w, scale_fmt="fp32")
    assert s.dtype == torch.float32 and s.shape == (2, 3)
    d = dequant_fp8_block(q, s)
    assert ((d - w).abs() <= w.abs() * 2 ** -4 + s.max() * 2 ** -9).all()
    assert torch.equal(dequant_fp8_block(q, s, out_dtype=torch.bfloat16), d.to(torch.bfloat16))
    q8, s8 = quant_fp8_block(torch.zeros(4, 4))
    assert torch.equal(dequant_fp8_block(q8, s8), torch.zeros(4, 4))  # all-zero blocks: finite scale
