"""The kernel executor runs whole programs: same logits as the reference backend."""

from __future__ import annotations

import torch

import ds4c
from ds4c.backends.cuda.executor import KernelExecutor
from ds4c.backends.cuda.kernels import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_tiny_prefill_and_decode_match_reference(tmp_path):
    art = ds4c.compile("tiny", target="h100", precision="fp32", max_context=64, progress=False)
    art.save(tmp_path / "t.ds4")
    ref = ds4c.load(tmp_path / "t.ds4", device=DEVICE, backend="reference")
    ker = ds4c.load(tmp_path / "t.ds4", device=DEVICE, backend="kernels", cuda_graphs=False)
    assert ker.backend == "kernels" and isinstance(ker._executors["prefill"], KernelExecutor)
    ids = torch.randint(0, 512, (2, 21), generator=torch.Generator().manual_seed(0))
    la, sa = ref.prefill(ids)
    lb, sb = ker.prefill(ids)
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
    tok = la[:, -1].argmax(-1, keepdim=True)
    da, _ = ref.decode(tok, 21, sa)
    db, _ = ker.decode(tok, 21, sb)
    torch.testing.assert_close(db, da, rtol=1e-4, atol=1e-4)
    stats = ker._executors["prefill"].stats()
    # every fused op with a kernel ran it (none declined on this model)
    for name in kernels():
        if name in stats:
            assert stats[name].get("reference", 0) == 0, (name, stats[name])
    assert any(v.get("kernel") for v in stats.values())


def test_generate_equal_tokens(tmp_path):
    art = ds4c.compile("tiny", target="h100", precision="fp32", max_context=64, progress=False)
    art.save(tmp_path / "t.ds4")
    ref = ds4c.load(tmp_path / "t.ds4", device=DEVICE, backend="reference")
    ker = ds4c.load(tmp_path / "t.ds4", device=DEVICE, backend="kernels")
    ids = [[5, 17, 99, 3, 250, 7, 8, 9, 10]]
    assert ker.generate(ids, 12).tolist() == ref.generate(ids, 12).tolist()


def test_compiled_backend_matches_reference(tmp_path):
    art = ds4c.compile("tiny", target="h100", precision="fp32", max_context=64, progress=False)
    art.save(tmp_path / "t.ds4")
    ref = ds4c.load(tmp_path / "t.ds4", device=DEVICE, backend="reference")
    comp = ds4c.load(tmp_path / "t.ds4", device=DEVICE, backend="compiled")
    ids = torch.randint(0, 512, (1, 19), generator=torch.Generator().manual_seed(1))
    la, sa = ref.prefill(ids)
    lb, sb = comp.prefill(ids)
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
    tok = la[:, -1].argmax(-1, keepdim=True)
    da, _ = ref.decode(tok, 19, sa)
    db, _ = comp.decode(tok, 19, sb)
    torch.testing.assert_close(db, da, rtol=1e-4, atol=1e-4)
