"""Target records: complete, plausible, and errors that list the valid names."""

import json

import pytest

from ds4c.errors import TargetError
from ds4c.targets import get_target, list_targets

NAMES = {"h100", "h200", "b200", "b300", "gb200", "mi300x", "mi355x", "npu", "cpu"}


def test_all_required_targets_present():
    assert NAMES <= {t.name for t in list_targets()}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_record_is_complete(name):
    t = get_target(name)
    assert t.hbm_bytes > 0 and t.hbm_bandwidth > 0 and t.host_link_bandwidth > 0
    assert t.peak("bf16") > 0
    assert json.loads(json.dumps(t.to_dict()))["name"] == name
    if t.backend in ("cuda", "rocm"):
        assert t.triton_target is not None and t.compute_units > 0 and t.shared_memory_per_block > 0


def test_relations_between_records():
    h100, h200, b200 = get_target("h100"), get_target("h200"), get_target("b200")
    assert h200.hbm_bytes > h100.hbm_bytes and h200.hbm_bandwidth > h100.hbm_bandwidth
    assert h200.peak("bf16") == h100.peak("bf16")
    assert b200.native_fp4 and not h100.native_fp4 and h100.native_fp8
    assert get_target("mi300x").warp_size == 64 and get_target("mi300x").arch == "gfx942"
    assert get_target("npu").npu is not None


def test_roofline():
    h100 = get_target("h100")
    # 2.8 GB read at 3.35 TB/s is memory bound
    assert h100.roofline_seconds(1e9, 2.8e9) == pytest.approx(2.8e9 / 3.35e12)


def test_unknown_target_lists_valid_names():
    with pytest.raises(TargetError) as e:
        get_target("tpu9")
    assert all(n in str(e.value) for n in NAMES)
