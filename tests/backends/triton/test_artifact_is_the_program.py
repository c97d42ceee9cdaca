"""What the GPU runtime executes is the artifact's program, op for op, for every Triton target and
entry point: nothing is rewritten, added or dropped at load (issue #25). On CPU the kernels run
through Triton's interpreter; on a GPU the same test runs them for real."""

from __future__ import annotations

import json

import pytest
import torch

import ds4c
from ds4c.artifact.artifact import read_artifact
from ds4c.ir.printer import format_op
from ds4c.targets import list_targets

TRITON_TARGETS = [t.name for t in list_targets() if t.triton_target is not None]


def test_every_triton_target_is_covered():
    assert {"h100", "h200", "b200", "mi300x"} <= set(TRITON_TARGETS)


@pytest.mark.slow
@pytest.mark.parametrize("target", TRITON_TARGETS)
def test_executor_runs_the_artifacts_ops_in_its_issue_order(target, tmp_path):
    path = tmp_path / f"tiny-{target}.ds4"
    ds4c.compile("tiny", target=target, precision="fp8", max_context=64, progress=False).save(path)
    manifest, program, container = read_artifact(path)
    assert manifest["lowering"]["passes"] == ["lower_packed_weights", "fuse_norm_rope", "fuse_paged_reads",
                                             "merge_sibling_linears"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = ds4c.load(path, device=device, backend="kernels", cuda_graphs=False, progress=False)
    assert set(model._executors) == set(program.graphs) >= {"prefill", "prefill_last", "decode"}
    for name, stored in program.graphs.items():
        schedule = json.loads(container.read_bytes(manifest["schedule"][name]["member"]))
        want = [format_op(stored.ops[i]) for i in schedule["issue"]]
        ran = [format_op(op) for op, *_ in model._executors[name]._steps]
        assert ran == want, f"@{name}: the executor's ops differ from the artifact's program"
        # the lowered ops are the ones the kernels run (packed weights, norm+rope)
        kinds = {op.name for op in stored.ops}
        assert {"linear.packed", "moe.packed", "rms_norm.rope"} <= kinds, (name, sorted(kinds))
    # and it runs: one decode step from a prefill
    ids = torch.tensor([[3, 7, 11, 5]], device=device)
    logits, state = model.prefill(ids, logits="last")
    assert logits.shape[1] == 1 and torch.isfinite(logits).all()
    nxt, _ = model.decode(logits.argmax(-1), 4, state)
    assert torch.isfinite(nxt).all()
