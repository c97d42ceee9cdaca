"""What ``ds4c inspect`` shows for an ``npu`` artifact: per op kind NPU vs host (with the reason),
kernel count, and the SRAM working set of every kernel."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def placement_table(section: dict[str, Any]) -> Table:
    tb = Table(title=f"npu: {section.get('kernel_count', 0)} kernels (TVM {section.get('tvm_version')}); "
                     "per op kind, where it runs")
    for col in ("op", "npu", "host", "host because"):
        tb.add_column(col, justify="right" if col in ("npu", "host") else "left")
    for name, row in section.get("placement", {}).items():
        tb.add_row(name, str(row["npu"]), str(row["host"]), "; ".join(row["reasons"]) or "-")
    return tb


def kernel_table(section: dict[str, Any]) -> Table:
    sram = section.get("sram_bytes") or 0
    tb = Table(title=f"npu kernels: SRAM working set per kernel (bound {sram / 1024:.0f} KiB)")
    for col in ("kernel", "op", "TIR funcs", "blocks", "working set KiB", "of SRAM"):
        tb.add_column(col, justify="left" if col in ("kernel", "op") else "right")
    for name, k in section.get("kernels", {}).items():
        ws = k.get("working_set_bytes", 0)
        blocks = sum(len(p["blocks"]) for p in k.get("prim_funcs", {}).values())
        tb.add_row(name, k["op"], str(len(k.get("prim_funcs", {}))), str(blocks), f"{ws / 1024:.1f}",
                   f"{ws / max(sram, 1):.0%}")
    return tb
