"""SRAM tiling of TIR kernels: every block's per-tile working set fits the NPU's on-chip buffer.

A scratchpad NPU computes on tiles it has DMA'd into its software-managed SRAM, so a kernel's
loop nest must be cut into tiles whose data (the regions of every buffer one tile reads and
writes) fit ``NpuFacts.sram_bytes``. For each block of a PrimFunc:

1. choose tile sizes, innermost loop first: a loop keeps its whole extent while the working set
   still fits (the vector unit wants long inner rows), else the largest power of two that fits
   (at most ``vector_width`` x the matrix unit's M, the DMA-friendly burst); loops outside it get 1;
2. split the loops at those sizes and reorder: tile loops (spatial, then reduction) outside,
   the tile body inside;
3. ``blockize`` the tile body, so TIR holds one block per tile whose read/write regions TVM
   computes itself; their sum is the working set recorded per kernel and checked against SRAM.

Regions read through data-dependent indices (a gather's table) cannot be bounded by the loop
tiles; they are counted as the rows the tile touches would be DMA'd one by one (one element per
access point), and the kernel record says so (``gathered``).

Working sets are computed analytically while choosing (``tvm.sym`` interval analysis of each
access's indices over the tile's loop ranges) and then measured on the scheduled TIR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ds4c.errors import TargetError

# Tile sizes tried for loops that do not fit whole (and for symbolic extents), largest first.
_POW2 = tuple(1 << i for i in range(14, -1, -1))


@dataclass
class BlockTiling:
    block: str
    tiles: list[int]  # per loop, outermost first (the loop's extent when kept whole)
    working_set_bytes: int
    gathered: bool = False  # some region is read through data-dependent indices


@dataclass
class KernelTiling:
    """The tiling of one PrimFunc; ``working_set_bytes`` is the largest of its blocks'."""

    name: str
    blocks: list[BlockTiling] = field(default_factory=list)

    @property
    def working_set_bytes(self) -> int:
        return max((b.working_set_bytes for b in self.blocks), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {"working_set_bytes": self.working_set_bytes,
                "blocks": [{"block": b.block, "tiles": b.tiles, "working_set_bytes": b.working_set_bytes,
                            **({"gathered": True} if b.gathered else {})} for b in self.blocks]}


def _static(extent: Any) -> int | None:
    from tvm import tirx

    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


class _BlockModel:
    """A block's loops and per-instance accesses, for working-set arithmetic over candidate tiles.

    Legalized kernels bind each block var to one loop var (``T.axis.remap``); a tile of loop ``i``
    is then a range of block var ``i``, and the block's own read/write regions (in block vars) give
    the tile's regions by interval analysis."""

    def __init__(self, sch: Any, block_rv: Any):
        from tvm import s_tir

        self.loops = list(sch.get_loops(block_rv))
        self.loop_nodes = [sch.get(lp) for lp in self.loops]
        self.block = sch.get(block_rv)
        self.name = self.block.name_hint
        realize = self.loop_nodes[-1].body if self.loop_nodes else None
        if not self.loops:  # a single instance (a 0-d result): nothing to cut
            self.vars = []
            return
        if not isinstance(realize, s_tir.SBlockRealize) or len(realize.iter_values) != len(self.loops) or not all(
                val.same_as(lp.loop_var) for val, lp in zip(realize.iter_values, self.loop_nodes, strict=True)):
            raise TargetError(f"block '{self.name}' is not a plain loop grid; the NPU tiler cannot cut it")
        self.vars = [iv.var for iv in self.block.iter_vars]

    def accesses(self) -> list[tuple[Any, list[Any]]]:
        return [(r.source, [(x.min, x.extent) for x in r.region]) for r in [*self.block.reads, *self.block.writes]]


def _itemsize(buf: Any) -> int:
    import tvm

    dt = tvm.runtime.DataType(str(buf.dtype))
    return (dt.bits * dt.lanes + 7) // 8


def _region_bytes(accesses: list[tuple[Any, list[Any]]], dom: dict[Any, Any], analyzer: Any,
                  ) -> tuple[int | None, bool]:
    """Bytes of the regions touched while the block vars in ``dom`` range over their tiles.

    A region whose per-instance extent is symbolic is read through data-dependent indices (TVM
    then gives the whole dimension): it is gathered, one element per access point of the tile.
    (None, _) when a region cannot be bounded."""
    total, gathered = 0, False
    points = 1
    for iset in dom.values():
        points *= (_static(analyzer.simplify(iset.max_value - iset.min_value + 1)) or 1)
    for buf, ranges in accesses:
        n = 1
        for lo, ext in ranges:
            if _static(ext) is None:
                gathered = True
                n = points
                break
            s = analyzer.int_set(lo, dom)
            w = _static(analyzer.simplify(s.max_value - s.min_value + ext))
            if w is None:
                return None, gathered
            n *= w
        total += n * _itemsize(buf)
    return total, gathered


def tile_block(sch: Any, block_rv: Any, sram_bytes: int, max_inner: int) -> BlockTiling:
    """Choose tiles for one block, apply them (split, reorder, blockize) and measure the working set."""
    from tvm import sym

    model = _BlockModel(sch, block_rv)
    analyzer = sym.Analyzer()
    accesses = model.accesses()
    extents = [_static(lp.extent) for lp in model.loop_nodes]
    tiles = [1] * len(model.loops)
    dom: dict[Any, Any] = {}
    fits, gathered = _region_bytes(accesses, dom, analyzer)
    if fits is None or fits > sram_bytes:
        raise TargetError(f"block '{model.name}': even a single point's data ({fits} bytes) does not fit "
                          f"the NPU's {sram_bytes}-byte SRAM")
    for i in reversed(range(len(model.loops))):
        var = model.vars[i]
        ext = extents[i]
        candidates = ([ext] if ext is not None else []) + [t for t in _POW2 if t <= max_inner
                                                           and (ext is None or t < ext)]
        chosen = None
        for t in candidates:
            trial = {**dom, var: sym.IntervalSet(0, t - 1)}
            size, g = _region_bytes(accesses, trial, analyzer)
            if size is not None and size <= sram_bytes:
                chosen, gathered = t, gathered or g
                break
        if chosen is None or chosen == 1:
            break
        tiles[i] = chosen
        dom[var] = sym.IntervalSet(0, chosen - 1)
        if ext is None or chosen < ext:
            break  # this loop is cut: loops outside it step one at a time
    working_set = _apply(sch, model, tiles, extents)
    if working_set is None:  # blockize declined (e.g. an opaque block): trust the analysis
        working_set, _ = _region_bytes(accesses, dom, analyzer)
    if working_set is None or working_set > sram_bytes:
        raise TargetError(f"block '{model.name}': tiles {tiles} need {working_set} bytes of SRAM, "
                          f"more than the NPU's {sram_bytes}")
    return BlockTiling(model.name, tiles, int(working_set), gathered)


def _apply(sch: Any, model: _BlockModel, tiles: list[int], extents: list[int | None]) -> int | None:
    """Split/reorder the loops into tile loops + tile body; blockize the body; its regions' bytes."""
    from tvm.s_tir import ScheduleError

    outer, inner = [], []
    for lp, t, ext in zip(model.loops, tiles, extents, strict=True):
        if t == 1:
            outer.append(lp)
        elif ext is not None and t >= ext:
            inner.append(lp)
        else:
            o, i = sch.split(lp, factors=[None, t])
            outer.append(o)
            inner.append(i)
    try:
        if inner:
            sch.reorder(*outer, *inner)
            tile = sch.blockize(inner[0])
        else:
            return None
    except ScheduleError:
        return None
    node = sch.get(tile)
    total = 0
    for region in [*node.reads, *node.writes]:
        n = 1
        for r in region.region:
            e = _static(r.extent)
            if e is None:
                return None
            n *= e
        total += n * _itemsize(region.source)
    return total


def tile_prim_func(name: str, func: Any, sram_bytes: int, max_inner: int) -> tuple[Any, KernelTiling]:
    """``func`` with every top-level block tiled for ``sram_bytes``, and the tiling record."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    record = KernelTiling(name)
    root = sch.get_sblock("root") if _has_root(sch) else None
    blocks = list(sch.get_child_blocks(root)) if root is not None else []
    for b in blocks:
        record.blocks.append(tile_block(sch, b, sram_bytes, max_inner))
    return sch.mod["main"], record


def _has_root(sch: Any) -> bool:
    try:
        sch.get_sblock("root")
    except Exception:  # noqa: BLE001 - TVM raises its own error types for a missing block
        return False
    return True
