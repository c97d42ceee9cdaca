"""Loading checkpoints: save_pretrained output (one file, sharded), raw transformers names, DeepSeek
release naming with FP8/MXFP4, and every refusal naming its file and tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ds4c.errors import CheckpointError, ConfigError
from ds4c.frontend.checkpoint import detect_naming, load_checkpoint, read_config
from ds4c.frontend.deepseek_format import (
    deepseek_to_hf_name,
    hf_to_deepseek_name,
    release_dtype_class,
    write_deepseek_checkpoint,
)
from ds4c.quant.formats import dequant_fp8_block, dequant_mxfp4, quant_fp8_block, quant_mxfp4
from tests.hf_configs import SMALL_CONFIGS, make_hf_model


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(SMALL_CONFIGS["mixed"], 3)


@pytest.fixture(scope="module")
def spec(hf_model):
    with torch.device("meta"):
        meta = type(hf_model)(hf_model.config)
    return {k: (tuple(v.shape), v.dtype) for k, v in meta.state_dict().items()}


def _assert_same(got, want):
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def _keys(d):
    from safetensors import safe_open

    out = []
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out += list(h.keys())
    return out


def test_save_pretrained_one_file_and_sharded(hf_model, spec, tmp_path):
    sd = hf_model.state_dict()
    hf_model.save_pretrained(tmp_path / "one")
    calls = []
    got = load_checkpoint(tmp_path / "one", spec, progress=lambda i, n: calls.append((i, n)))
    _assert_same(got, sd)
    assert calls[-1] == (len(spec), len(spec))
    assert detect_naming(_keys(tmp_path / "one")) == "hf"
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _assert_same(load_checkpoint(tmp_path / "sharded", spec), sd)
    assert read_config(tmp_path / "one")["model_type"] == "deepseek_v4"


def test_raw_transformers_names_and_destination_dtype(hf_model, spec, tmp_path):
    sd = hf_model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    got = load_checkpoint(tmp_path, spec, dtype=torch.bfloat16)
    for k, v in sd.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
    assert got["model.layers.0.mlp.gate.tid2eid"].dtype == torch.int64


def test_release_names_agree_with_transformers_conversion_mapping(hf_model, spec):
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conv = get_checkpoint_conversion_mapping("deepseek_v4")
    renames = [c for c in conv if isinstance(c, WeightRenaming)]
    converters = [c for c in conv if isinstance(c, WeightConverter) and not isinstance(c, WeightRenaming)]
    release = [hf_to_deepseek_name(k) for k in spec if "mlp.experts." not in k]
    release += ["layers.1.ffn.experts.3.w1.weight", "layers.1.ffn.experts.3.w3.weight", "layers.2.ffn.experts.0.w2.weight"]
    for name in release:
        theirs, _ = rename_source_key(name, renames, converters, "model", spec)
        assert deepseek_to_hf_name(name) == theirs, name
    for k in spec:
        if "mlp.experts." not in k:
            assert deepseek_to_hf_name(hf_to_deepseek_name(k)) == k


def _reference(sd, fp8, fp4):
    """What the loader must return for a release checkpoint written from ``sd``: quantise -> dequantise."""
    want = {}
    for k, v in sd.items():
        if "mlp.experts." in k:
            if k.endswith("gate_up_proj"):
                half = v.shape[1] // 2
                parts = [(v[e, :half], v[e, half:]) for e in range(v.shape[0])]
                want[k] = torch.stack([torch.cat([_rt(g, fp8, fp4), _rt(u, fp8, fp4)]) for g, u in parts])
            else:
                want[k] = torch.stack([_rt(m, fp8, fp4) for m in v])
            continue
        cls = release_dtype_class(hf_to_deepseek_name(k))
        if cls == "fp8" and fp8:
            want[k] = dequant_fp8_block(*quant_fp8_block(v))
        elif cls in ("bf16", "fp8") and fp8:
            want[k] = v.to(torch.bfloat16).float()
        else:
            want[k] = v
    return want


def _rt(m, fp8, fp4):
    if fp4:
        return dequant_mxfp4(*quant_mxfp4(m))
    return dequant_fp8_block(*quant_fp8_block(m)) if fp8 else m


@pytest.mark.parametrize("fp8,fp4,shard", [(True, True, 150_000), (True, False, None), (False, False, None)])
def test_release_format_loads_as_its_dequantisation(hf_model, spec, tmp_path, fp8, fp4, shard):
    sd = hf_model.state_dict()
    write_deepseek_checkpoint(sd, hf_model.config.to_dict(), tmp_path, fp8=fp8, fp4_experts=fp4, shard_bytes=shard)
    keys = _keys(tmp_path)
    assert detect_naming(keys) == "deepseek"
    assert "layers.0.attn.wq_a.weight" in keys and "head.weight" in keys and "embed.weight" in keys
    assert ("layers.0.attn.wq_a.scale" in keys) == fp8
    assert ("layers.1.ffn.experts.2.w3.scale" in keys) == (fp8 or fp4)
    got = load_checkpoint(tmp_path, spec)
    _assert_same(got, _reference(sd, fp8, fp4))
    cfg = read_config(tmp_path)
    assert (cfg.get("expert_dtype") == "fp4") == fp4
    from ds4c.models.deepseek_v4 import ModelConfig

    ModelConfig.from_hf_dict(cfg)  # the release config.json (quantization_config, expert_dtype) is accepted


def test_release_dtypes_as_shipped(hf_model, tmp_path):
    write_deepseek_checkpoint(hf_model.state_dict(), hf_model.config.to_dict(), tmp_path)
    t = load_file(tmp_path / "model.safetensors")
    assert t["layers.1.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert t["layers.1.attn.wq_b.scale"].dtype == torch.float8_e8m0fnu
    assert t["layers.1.attn.indexer.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert t["layers.1.ffn.shared_experts.w2.weight"].dtype == torch.float8_e4m3fn
    e = t["layers.1.ffn.experts.0.w1.weight"]
    assert e.dtype == torch.int8 and e.shape == (32, 32) and t["layers.1.ffn.experts.0.w1.scale"].shape == (32, 2)
    for k in ("embed.weight", "head.weight", "layers.1.attn.compressor.wkv.weight", "layers.1.ffn.gate.weight",
              "layers.1.attn.indexer.weights_proj.weight", "layers.1.attn_norm.weight"):
        assert t[k].dtype == torch.bfloat16, k
    for k in ("layers.1.hc_attn_fn", "layers.1.attn.attn_sink", "layers.1.ffn.gate.bias", "hc_head_scale",
              "layers.1.attn.compressor.ape"):
        assert t[k].dtype == torch.float32, k
    assert t["layers.0.ffn.gate.tid2eid"].dtype == torch.int64


def test_fp32_block_scales_packed_fp4_dtype_and_mtp_are_handled(hf_model, spec, tmp_path):
    sd = hf_model.state_dict()
    write_deepseek_checkpoint(sd, hf_model.config.to_dict(), tmp_path)
    f = tmp_path / "model.safetensors"
    t = load_file(f)
    for k in [k for k in t if k.endswith(".scale") and t[k.removesuffix(".scale") + ".weight"].dtype.is_floating_point]:
        t[k] = t[k].float()  # sgl-project style FP8 repacks store fp32 block scales
    t["mtp.0.e_proj.weight"] = torch.zeros(4, 4)  # the MTP block is ignored
    save_file(t, f)
    _assert_same(load_checkpoint(tmp_path, spec), _reference(sd, True, True))


def test_hand_written_f4_dtype(tmp_path):
    """A safetensors 'F4' tensor (element count in the header, two per byte) with its UE8M0 scale."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 64, generator=g)
    q, s = quant_mxfp4(w)
    header = {"model.layers.0.mlp.shared_experts.gate_proj.weight": {"dtype": "F4", "shape": [4, 64],
                                                                      "data_offsets": [0, q.numel()]},
              "model.layers.0.mlp.shared_experts.gate_proj.scale": {"dtype": "F8_E8M0", "shape": [4, 2],
                                                                     "data_offsets": [q.numel(), q.numel() + 8]}}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    data = q.numpy().tobytes() + s.view(torch.uint8).numpy().tobytes()
    (tmp_path / "model.safetensors").write_bytes(len(h).to_bytes(8, "little") + h + data)
    got = load_checkpoint(tmp_path, {"model.layers.0.mlp.shared_experts.gate_proj.weight": ((4, 64), torch.float32)})
    assert torch.equal(got["model.layers.0.mlp.shared_experts.gate_proj.weight"], dequant_mxfp4(q, s))


def test_missing_or_bad_config(tmp_path):
    with pytest.raises(ConfigError, match="missing config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        read_config(tmp_path)
    with pytest.raises(ConfigError, match="not a directory"):
        read_config(tmp_path / "absent")


def test_missing_extra_misshaped_tensors(hf_model, spec, tmp_path):
    hf_model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    base = load_file(f)

    def write(edit):
        t = dict(base)
        edit(t)
        save_file(t, f, metadata={"format": "pt"})

    write(lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing: \['model.norm.weight'\]"):
        load_checkpoint(tmp_path, spec)
    write(lambda t: t.__setitem__("model.bogus.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'model.bogus.weight'"):
        load_checkpoint(tmp_path, spec)
    write(lambda t: t.__setitem__("model.layers.7.attn.wq_a.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.7.attn.wq_a.weight' \(would be "
                                              r"'model.layers.7.self_attn.q_a_proj.weight'\)"):
        load_checkpoint(tmp_path, spec)
    write(lambda t: t.__setitem__("model.norm.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.norm.weight' has shape \[3\], the "
                                              r"model expects \[64\]"):
        load_checkpoint(tmp_path, spec)
    write(lambda t: t.pop("model.layers.1.ffn.experts.2.w3.weight"))
    with pytest.raises(CheckpointError, match=r"expert 2 of 'model.layers.1.mlp.experts.gate_up_proj' has no w3"):
        load_checkpoint(tmp_path, spec)
    write(lambda t: t.__setitem__("model.layers.1.ffn.experts.9.w2.weight", torch.zeros(64, 32)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.1.ffn.experts.9.w2.weight': expert 9"):
        load_checkpoint(tmp_path, spec)
    write(lambda t: t.__setitem__("model.layers.1.ffn.experts.1.w2.weight", torch.zeros(64, 31)))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.ffn.experts.1.w2.weight' has shape \[64, 31\]"):
        load_checkpoint(tmp_path, spec)


def test_missing_or_misshaped_scale(hf_model, spec, tmp_path):
    write_deepseek_checkpoint(hf_model.state_dict(), hf_model.config.to_dict(), tmp_path)
    f = tmp_path / "model.safetensors"
    base = load_file(f)
    t = dict(base)
    t.pop("layers.0.attn.wq_a.scale")
    save_file(t, f)
    with pytest.raises(CheckpointError, match=r"model.safetensors: F8_E4M3 tensor 'layers.0.attn.wq_a.weight' has no "
                                              r"'layers.0.attn.wq_a.scale' scale tensor"):
        load_checkpoint(tmp_path, spec)
    t = dict(base)
    t["layers.1.ffn.experts.0.w2.scale"] = t["layers.1.ffn.experts.0.w2.scale"][:, :0]
    save_file(t, f)
    with pytest.raises(CheckpointError, match=r"scale 'layers.1.ffn.experts.0.w2.scale' has shape \[64, 0\], expected "
                                              r"\[64, 1\]"):
        load_checkpoint(tmp_path, spec)


def test_truncated_file_and_bad_index(hf_model, spec, tmp_path):
    one = tmp_path / "one"
    hf_model.save_pretrained(one)
    f = one / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: unreadable safetensors file: .*truncated"):
        load_checkpoint(one, spec)
    f.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        load_checkpoint(one, spec)

    s = tmp_path / "sharded"
    hf_model.save_pretrained(s, max_shard_size="100KB")
    index = s / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    first = next(iter(good["weight_map"]))
    bad = json.loads(json.dumps(good))
    bad["weight_map"][first] = "nope.safetensors"
    index.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=rf"tensor '{first}' is in 'nope.safetensors', which does not exist"):
        load_checkpoint(s, spec)
    other = next(v for v in good["weight_map"].values() if v != good["weight_map"][first])
    bad["weight_map"][first] = other
    index.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=rf"says tensor '{first}' is in {other}, but that file does not hold it"):
        load_checkpoint(s, spec)
    index.write_text("{}")
    with pytest.raises(CheckpointError, match="malformed index"):
        load_checkpoint(s, spec)
    with pytest.raises(CheckpointError, match=r"no \*.safetensors files"):
        load_checkpoint(tmp_path, spec)


def test_loading_streams_without_doubling_memory(tmp_path):
    """Peak RSS growth while loading a 192 MiB fp32 checkpoint into fp32 stays below 1.5x its size."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, torch
        from safetensors.torch import save_file
        from ds4c.frontend.checkpoint import load_checkpoint
        names = {{f"model.layers.{{i}}.w": (4096, 2048) for i in range(6)}}  # 6 x 32 MiB fp32
        save_file({{k: torch.ones(s) for k, s in names.items()}}, "{tmp_path}/model.safetensors")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = load_checkpoint("{tmp_path}", {{k: (s, torch.float32) for k, s in names.items()}})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert all(bool((v == 1).all()) for v in out.values())
        print((after - before) * 1024)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth = int(res.stdout.strip().splitlines()[-1])
    ckpt = 6 * 4096 * 2048 * 4
    assert growth < 1.5 * ckpt, f"peak RSS grew by {growth / 2**20:.0f} MiB for a {ckpt / 2**20:.0f} MiB checkpoint"


@pytest.mark.parametrize("fp8", [True, False])
def test_the_mtp_block_loads_from_the_release_naming_when_asked_for(tmp_path, fp8):
    """``mtp.0.*`` in DeepSeek's naming and precision (FP8 projections, MXFP4 experts) loads into ds4c's
    MTP block (``DeepseekV4Model(mtp=True)``) when the expected weights name it, and is ignored otherwise."""
    from ds4c.frontend.trace import build_meta_model, param_spec
    from ds4c.models.deepseek_v4 import ModelConfig
    from tests.mtp_model import mtp_model

    model, _ = mtp_model(0)
    sd = model.state_dict()
    cfg = dict(SMALL_CONFIGS["mixed"], num_nextn_predict_layers=1)
    write_deepseek_checkpoint(sd, cfg, tmp_path, fp8=fp8, fp4_experts=fp8)
    keys = _keys(tmp_path)
    assert {"mtp.0.e_proj.weight", "mtp.0.attn.wq_a.weight", "mtp.0.ffn.experts.3.w2.weight", "mtp.0.hc_head_fn",
            "mtp.0.hc_attn_fn", "mtp.0.enorm.weight"} <= set(keys)
    assert ("mtp.0.e_proj.scale" in keys) == fp8 and ("mtp.0.ffn.experts.3.w2.scale" in keys) == fp8
    config = ModelConfig.from_hf_dict(cfg)
    with_mtp = param_spec(build_meta_model(config, 64, torch.float32, mtp=True))
    got = load_checkpoint(tmp_path, with_mtp)
    want = _reference(sd, fp8, fp8)
    assert sorted(got) == sorted(want) and any(k.startswith("mtp.0.") for k in got)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v.to(got[k].dtype), rtol=0, atol=0, msg=k)
    without = param_spec(build_meta_model(config, 64, torch.float32))
    assert not any(k.startswith("mtp.") for k in load_checkpoint(tmp_path, without))


def test_a_ranks_rows_of_a_plain_or_block_aligned_tensor_are_read_alone(hf_model, spec, tmp_path, monkeypatch):
    """A rank's leading-row slice of a non-expert tensor (its heads' rows of q_b_proj) is read alone
    where the storage allows (plain, or FP8 on block boundaries), and equals the whole tensor's rows."""
    from ds4c.frontend import checkpoint as ck

    name = "model.layers.1.self_attn.q_b_proj.weight"
    rows = spec[name][0][0]
    for fp8, start, alone in ((False, rows // 2, True), (True, rows // 2, rows // 2 % 128 == 0)):
        out = tmp_path / f"fp8_{fp8}"
        write_deepseek_checkpoint(hf_model.state_dict(), hf_model.config.to_dict(), out, fp8=fp8, fp4_experts=False)
        whole = load_checkpoint(out, spec)[name]
        seen: list[tuple] = []
        real = ck._Files.rows

        def spy(self, key, a=None, b=None, real=real, seen=seen):
            if key == "layers.1.attn.wq_b.weight":
                seen.append((a, b))
            return real(self, key, a, b)

        monkeypatch.setattr(ck._Files, "rows", spy)
        shard = {name: [{"dim": 0, "start": start, "stop": rows, "of": rows}]}
        part = load_checkpoint(out, spec, shard=shard)[name]
        monkeypatch.setattr(ck._Files, "rows", real)
        assert torch.equal(part, whole[start:])
        if alone:
            assert seen and all(a is not None and a >= start for a, _ in seen), seen
        else:
            assert (None, None) in seen or any(a == 0 for a, _ in seen)
