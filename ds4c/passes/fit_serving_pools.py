"""``fit_serving_pools``: the engine's state pools take what the weights and the steps leave.

``plan_memory`` sizes a serving program's pools (``Program.attrs['serving_pages']``) from the
state budget (``hbm_budget``, or 92% of the target's HBM) less the weights, before any step's
activations are known for certain: ``schedule_streams`` re-packs each arena for the streams' issue
order afterwards, which can grow it (a step of 8192 tokens on flash-slice: 15 GB). The 8% left
over covered the arena of 2048-token steps, but not a bigger token budget, and the plan then
overcommitted the device (pools + weights + arena above its HBM, ``fits: false``) and the engine
would have run out of memory in its first long step.

This pass runs last, when every arena is final: it takes the largest arena of the engine's entry
points (the serving graphs and the MTP block's ``mtp_step``) off the state budget and sizes the
pools again (``size_pools``: slots and window pages as before, fewer compressed pages), then
restates each serving plan's state bytes, device bytes and fit. Nothing else changes: the arenas
do not depend on the pools' page counts, and the graphs are returned as they came.

    flash-slice --serving-opt max_step_tokens=8192, h200 (state budget 88.1 GB: 92% of HBM less weights)
    serving_pages before:  compressed pages 1,048,107, activations not counted (plan: 138.9 GB of 134.5 GB)
    after:                 compressed pages   857,778, activations 16.0 GB (ragged_step's final arena)
"""

from __future__ import annotations

from ds4c.ir import Graph
from ds4c.passes.liveness import SizeEvaluator
from ds4c.passes.manager import PassContext, register_pass
from ds4c.passes.plan_memory import plan_device_bytes, plan_state, serving_entry_points, serving_pools

__all__ = ["fit_serving_pools"]


@register_pass("fit_serving_pools")
def fit_serving_pools(graph: Graph, ctx: PassContext) -> Graph:
    """Size the serving pools from the state budget less the largest final activation arena of the
    engine's steps, so weights + pools + any step's arena fit; restate the serving plans' bytes.

    Needs: ``plan_memory`` (and ``schedule_streams``, if in the pipeline) ran on every graph.
    Guarantees: the graph is unchanged; ``serving_pages['activations']`` is that arena, and each
    serving plan's ``device_bytes`` stays within the budget. Works once per program (on the first
    graph it sees); a program without serving pools, or without a budget (host targets), is left as
    it is."""
    from ds4c.models.deepseek_v4.paged import PageLayout, pool_capacity

    attrs = ctx.program_attrs
    pages = attrs.get("serving_pages")
    if not pages or pages.get("fitted") or pages.get("state_budget") is None:
        return graph
    plans = attrs.get("memory_plan") or {}
    names = [n for n in serving_entry_points(attrs, list(ctx.graphs)) if n in plans]
    if not names:
        return graph
    largest = max(names, key=lambda n: plans[n]["arena_bytes"])
    activations = plans[largest]["arena_bytes"]
    serving = attrs["serving"]
    layout = PageLayout.from_record(serving["layout"], "fit_serving_pools")
    batch = serving["batch"]
    new = serving_pools(layout, pages["page_bytes"], pages["state_budget"] - activations, batch, "fit_serving_pools",
                        f", after the largest step's activations ({activations} bytes, {largest}); raise "
                        "--hbm-budget or lower --serving max_step_tokens / max_running")
    pages.update(pages=new, activations=activations, capacity=pool_capacity(layout, new), fitted=True)
    for name in names:
        plan = plans[name]
        sizes = {**plan["sizes"], "PW": new["window"], "PC": new["compressed"], "SLOTS": new["slots"]}
        state = plan_state(ctx.graphs[name], SizeEvaluator(sizes), ctx.options, attrs, ctx.target)
        plan.update(sizes=sizes, state=state)
        plan["device_bytes"] = plan_device_bytes(plan, plan["weights"]["hbm_bytes"], state,
                                             bool(ctx.graphs[name].inputs_of_kind("state")))
        if plan.get("target_hbm_bytes"):
            plan["fits"] = plan["device_bytes"] <= plan["target_hbm_bytes"]
    return graph
