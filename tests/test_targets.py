"""Target records: complete, plausible, immutable, JSON round-trips, errors that list valid names."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from ds4c.errors import TargetError
from ds4c.targets import DTYPES, Target, canonical_dtype, get_target, list_targets, peak_dtype, target_names

NAMES = ["h100", "h200", "b200", "b300", "gb200", "mi300x", "mi355x", "npu", "cpu"]


def test_all_required_targets_present_in_order():
    assert target_names() == NAMES
    assert [t.name for t in list_targets()] == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_record_is_complete_and_positive(name):
    t = get_target(name)
    for f in dataclasses.fields(t):
        value = getattr(t, f.name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            assert value > 0, f"{name}.{f.name}"
    assert t.peak_flops["fp32"] > 0 and t.peak("bf16") > 0
    assert set(t.peak_flops) <= set(DTYPES) and all(v > 0 for v in t.peak_flops.values())
    assert t.shared_memory_per_block <= t.shared_memory_per_unit
    assert t.l2_bytes <= t.last_level_cache_bytes
    assert t.host_link and t.arch
    if t.backend in ("cuda", "rocm"):
        assert t.triton_target is not None and t.triton_target[2] == t.warp_size
        assert t.peak("fp16") > t.peak("fp32")  # matrix units beat the FP32 rate
    if t.native_fp8:
        assert t.peak("fp8") >= t.peak("bf16")
    if t.native_fp4:
        assert t.peak("fp4") >= t.peak("fp8")


@pytest.mark.parametrize("name", NAMES)
def test_json_and_pickle_round_trip(name):
    t = get_target(name)
    d = json.loads(json.dumps(t.to_dict()))
    assert d["name"] == name and isinstance(d["peak_flops"], dict)
    assert Target.from_dict(d) == t
    assert pickle.loads(pickle.dumps(t)) == t and hash(t) == hash(Target.from_dict(d))


def test_relations_between_records():
    h100, h200, b200, b300 = (get_target(n) for n in ("h100", "h200", "b200", "b300"))
    mi300x, mi355x = get_target("mi300x"), get_target("mi355x")
    assert h200.hbm_bytes > h100.hbm_bytes and h200.hbm_bandwidth > h100.hbm_bandwidth
    assert h200.peak_flops == h100.peak_flops and h200.arch == h100.arch == "sm_90a"
    assert h100.native_fp8 and not h100.native_fp4
    assert b200.native_fp4 and b300.native_fp4 and mi355x.native_fp4 and not mi300x.native_fp4
    assert b200.peak("bf16") > h100.peak("bf16") and b200.hbm_bandwidth > h200.hbm_bandwidth
    assert b300.hbm_bytes > b200.hbm_bytes and b300.peak("fp4") > b200.peak("fp4")
    assert get_target("gb200").host_link_bandwidth > b200.host_link_bandwidth  # NVLink-C2C beats PCIe
    assert mi300x.warp_size == 64 and mi300x.arch == "gfx942" and mi355x.arch == "gfx950"
    assert mi355x.shared_memory_per_unit > mi300x.shared_memory_per_unit
    assert all(get_target(n).arch.startswith("sm_10") for n in ("b200", "b300", "gb200"))
    npu = get_target("npu")
    assert npu.npu is not None and npu.triton_target is None and npu.npu.sram_bytes > 0
    assert len(npu.npu.matrix_unit) == 3 and npu.npu.vector_width > 0 and "fp16" in npu.npu.dtypes
    assert get_target("cpu").backend == "reference" and get_target("cpu").npu is None


def test_peak_falls_back_to_what_runs_instead():
    h100, mi355x, npu = get_target("h100"), get_target("mi355x"), get_target("npu")
    assert h100.peak("fp4") == h100.peak("fp8")  # no FP4 units: FP4 weights run as FP8
    assert mi355x.peak("tf32") == mi355x.peak("fp32")  # CDNA 4 has no TF32 hardware
    assert npu.peak("bf16") == npu.peak("fp16")
    assert h100.peak("bfloat16") == h100.peak("torch.bfloat16") == h100.peak("bf16")
    assert canonical_dtype("mxfp4") == "fp4" and canonical_dtype("float8_e4m3fn") == "fp8"
    with pytest.raises(TargetError, match="unknown dtype 'fp3'.*fp32"):
        h100.peak("fp3")


def test_roofline():
    h100 = get_target("h100")
    # decode-like: 2.8 GB of weights read for 1 GFLOP is memory bound
    assert h100.roofline_seconds(1e9, 2.8e9) == pytest.approx(2.8e9 / 3.35e12)
    # prefill-like: 1 PFLOP over 1 GB is compute bound, and FP8 halves it
    assert h100.roofline_seconds(1e15, 1e9, "bf16") == pytest.approx(1e15 / 989.4e12)
    assert h100.roofline_seconds(1e15, 1e9, "fp8") == pytest.approx(1e15 / 1978.9e12)
    assert h100.host_transfer_seconds(64e9) == pytest.approx(1.0)


def test_unknown_target_lists_valid_names():
    with pytest.raises(TargetError, match="unknown target 'tpu9'; valid targets: ") as e:
        get_target("tpu9")
    assert all(n in str(e.value) for n in NAMES)
    assert get_target("H100") is get_target("h100")
    assert get_target(get_target("b200")).name == "b200"


def test_records_are_immutable_and_validated():
    h100 = get_target("h100")
    with pytest.raises(dataclasses.FrozenInstanceError):
        h100.hbm_bytes = 1  # type: ignore[misc]
    with pytest.raises(TypeError, match="read-only"):
        h100.peak_flops["fp32"] = 1.0  # type: ignore[index]
    with pytest.raises(TargetError, match="hbm_bandwidth must be positive"):
        dataclasses.replace(h100, name="broken", hbm_bandwidth=0)
    with pytest.raises(TargetError, match="native_fp8/native_fp4"):
        dataclasses.replace(h100, name="broken", native_fp4=True)
    with pytest.raises(TargetError, match="unknown fields"):
        Target.from_dict({**h100.to_dict(), "sm_count": 1})
    with pytest.raises(TargetError, match="vendor 'intel'"):
        dataclasses.replace(h100, vendor="intel")


def test_every_target_says_what_is_verified_here_and_on_hardware():
    from typer.testing import CliRunner

    from ds4c.cli import app
    from ds4c.verification import verification

    for t in list_targets():
        here, hardware = verification(t.backend)
        assert here and hardware
    out = CliRunner().invoke(app, ["targets"], env={"COLUMNS": "200"}).output
    assert "verified where" in out and all(t.name in out for t in list_targets())


def test_peak_dtype_of_every_ir_dtype():
    """What a cost model reads for a tensor's dtype: its peak key, fp32 where it has none."""
    from ds4c.ir.types import DTYPE_NAMES

    expected = {"float32": "fp32", "float64": "fp32", "bfloat16": "bf16", "float16": "fp16",
                "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "int8": "int8"}
    for dtype in DTYPE_NAMES:
        name = str(dtype).removeprefix("torch.")
        assert peak_dtype(name) == expected.get(name, "fp32"), name
        assert peak_dtype(name) in DTYPES
