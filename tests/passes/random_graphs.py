"""Seeded random IR graphs of elementwise / matmul / cat / view ops, for the planners' property tests."""

from __future__ import annotations

import random

import torch

from ds4c.ir import parse_graph
from ds4c.ir.graph import Graph

DIMS = (4, 8, 12, 16, 24)


def random_graph(seed: int, num_ops: int | None = None) -> Graph:
    rng = random.Random(seed)
    num_ops = num_ops or rng.randint(15, 40)
    values: list[tuple[str, tuple[int, int], bool]] = []  # (name, shape, contiguous)
    header = []
    for k in range(rng.randint(1, 3)):
        shape = (rng.choice(DIMS), rng.choice(DIMS))
        header.append(f"input %x{k}: f32[{shape[0]},{shape[1]}]")
        values.append((f"x{k}", shape, True))
    for k in range(rng.randint(1, 2)):
        shape = (rng.choice(DIMS), rng.choice(DIMS))
        header.append(f"param %w{k}: f32[{shape[0]},{shape[1]}]")
        values.append((f"w{k}", shape, True))
    lines = []
    for i in range(num_ops):
        name = f"v{i}"
        kind = rng.choice(["unary", "unary", "binary", "binary", "mm", "mm", "cat", "t", "slice", "view"])
        a, shape, contig = rng.choice(values[-8:] if rng.random() < 0.7 else values)
        if kind == "binary":
            same = [v for v in values if v[1] == shape]
            b = rng.choice(same)[0]
            op = rng.choice(["add", "mul", "sub"])
            lines.append(f"%{name} = aten.{op}.Tensor(%{a}, %{b}) : f32[{shape[0]},{shape[1]}]")
            values.append((name, shape, True))
        elif kind == "mm":
            rhs = [v for v in values if v[1][0] == shape[1]]
            if rhs:
                b, bshape, _ = rng.choice(rhs)
                lines.append(f"%{name} = aten.mm.default(%{a}, %{b}) : f32[{shape[0]},{bshape[1]}]")
                values.append((name, (shape[0], bshape[1]), True))
            else:
                n = rng.choice(DIMS)
                header.append(f"param %r{i}: f32[{shape[1]},{n}]")
                lines.append(f"%{name} = aten.mm.default(%{a}, %r{i}) : f32[{shape[0]},{n}]")
                values.append((name, (shape[0], n), True))
        elif kind == "cat":
            same = [v for v in values if v[1][1] == shape[1]]
            b, bshape, _ = rng.choice(same)
            lines.append(f"%{name} = aten.cat.default([%{a}, %{b}]) : f32[{shape[0] + bshape[0]},{shape[1]}]")
            values.append((name, (shape[0] + bshape[0], shape[1]), True))
        elif kind == "t":
            lines.append(f"%{name} = aten.t.default(%{a}) : f32[{shape[1]},{shape[0]}]")
            values.append((name, (shape[1], shape[0]), False))
        elif kind == "slice" and shape[0] >= 2:
            m = shape[0] // 2
            lines.append(f"%{name} = aten.slice.Tensor(%{a}, 0, 0, {m}) : f32[{m},{shape[1]}]")
            values.append((name, (m, shape[1]), contig))
        elif kind == "view" and contig:
            lines.append(f"%{name} = aten.view.default(%{a}, [{shape[1]}, {shape[0]}]) : f32[{shape[1]},{shape[0]}]")
            values.append((name, (shape[1], shape[0]), True))
        else:
            op = rng.choice(["relu", "exp", "neg", "sigmoid", "tanh"])
            lines.append(f"%{name} = aten.{op}.default(%{a}) : f32[{shape[0]},{shape[1]}]")
            values.append((name, shape, True))
    made = [v[0] for v in values if v[0].startswith("v")]
    outs = {made[-1]} | set(rng.sample(made, k=min(len(made), rng.randint(0, 2))))
    ret = ", ".join(f"y{k}=%{n}" for k, n in enumerate(sorted(outs)))
    text = f"graph @g{seed}({', '.join(header)}) {{\n" + "\n".join("  " + ln for ln in lines) + f"\n  return {ret}\n}}\n"
    return parse_graph(text)


def random_feeds(graph: Graph, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    inputs, params = {}, {}
    for gi in graph.inputs:
        t = torch.randn(tuple(gi.value.type.shape), generator=g) * 0.5
        (inputs if gi.kind == "input" else params)[gi.value.name] = t
    return inputs, params
