"""The Engine over a sharded artifact: rank 0 schedules, every rank runs the same steps.

Each rank of a sharded artifact holds its slice of the model and its own pools (the state of
every request, replicated: attention is replicated). Rank 0's Engine does all the scheduling
(admission, pages, prefix cache, sampling); what touches the device goes through its step
runner, so ``LeaderStepRunner`` sends each such call to the other ranks before making it, and
``follow`` (``Engine.follow()`` on ranks 1..) makes the same call on their runner: a step's
inputs (``StepBatch``: integer tensors), MTP steps (a step's inputs and the rows of the streams
they read, which every rank holds alike), page copies (prefix cache), window pages added,
warm-up (CUDA graph capture), stop. The collectives inside the steps then meet, rank for rank.

Messages go over a gloo group (CPU tensors, also when the steps run on NCCL): a header of
``HEADER`` int64 (command, integer arguments, each tensor's dtype and shape) and one int64
payload with the tensors' values. No pickle: a follower rebuilds tensors from numbers.
"""

from __future__ import annotations

import atexit
import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from ds4c.errors import RankFailure
from ds4c.runtime.step_batch import StepBatch

__all__ = ["LeaderStepRunner", "control_group", "follow", "receive_tokens", "send_tokens"]

HEADER = 128
RUN, COPY_PAGES, ADD_WINDOW_PAGES, WARM_UP, STOP, TOKENS, RUN_MTP = 1, 2, 3, 4, 5, 6, 7
_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
_POOLS = ("window", "compressed", "slots")
_MAX_RANK = 4  # tensor ranks a message carries (StepBatch's are 1-D and 2-D)

_group: Any = None


def control_group() -> Any:
    """The gloo group of all ranks that carries these messages (made once; every rank calls this)."""
    global _group
    import torch.distributed as dist

    if _group is None:
        _group = dist.new_group(backend="gloo")
    return _group


def _send(group: Any, cmd: int, ints: Sequence[int] = (), tensors: Sequence[torch.Tensor] = ()) -> None:
    import torch.distributed as dist

    header = torch.zeros(HEADER, dtype=torch.int64)
    meta = [cmd, len(ints), len(tensors), sum(t.numel() for t in tensors), *ints]
    for t in tensors:
        if t.dtype not in _DTYPES or t.dim() > _MAX_RANK:
            raise AssertionError(f"step message: a {t.dtype} tensor of rank {t.dim()} cannot be sent")
        meta += [_DTYPES.index(t.dtype), t.dim(), *t.shape, *[0] * (_MAX_RANK - t.dim())]
    if len(meta) > HEADER:
        raise AssertionError(f"step message: {len(meta)} header numbers, room for {HEADER}")
    header[:len(meta)] = torch.tensor(meta, dtype=torch.int64)
    try:
        dist.broadcast(header, 0, group=group)
        if meta[3]:
            payload = torch.cat([t.detach().to("cpu", torch.int64).reshape(-1) for t in tensors])
            dist.broadcast(payload, 0, group=group)
    except RuntimeError as e:
        raise RankFailure(f"rank 0: sending a step to the other ranks failed ({str(e).splitlines()[0][:200]}); "
                          "another rank has exited (see its log)") from None


def _receive(group: Any) -> tuple[int, list[int], list[torch.Tensor]]:
    import torch.distributed as dist

    header = torch.zeros(HEADER, dtype=torch.int64)
    try:
        dist.broadcast(header, 0, group=group)
        cmd, n_ints, n_tensors, total = (int(v) for v in header[:4])
        payload = torch.zeros(total, dtype=torch.int64)
        if total:
            dist.broadcast(payload, 0, group=group)
    except RuntimeError as e:
        raise RankFailure(f"rank {dist.get_rank()}: waiting for rank 0's next step failed "
                          f"({str(e).splitlines()[0][:200]}); rank 0 has exited (see its log)") from None
    values = header.tolist()
    ints = values[4:4 + n_ints]
    at, offset, tensors = 4 + n_ints, 0, []
    for _ in range(n_tensors):
        dtype, ndim = _DTYPES[values[at]], values[at + 1]
        shape = values[at + 2:at + 2 + ndim]
        at += 2 + _MAX_RANK
        n = math.prod(shape)
        tensors.append(payload[offset:offset + n].reshape(shape).to(dtype))
        offset += n
    return cmd, ints, tensors


class LeaderStepRunner:
    """Rank 0's step runner: ``runner``'s calls, each sent to the other ranks first (``follow``)."""

    def __init__(self, runner: Any, group: Any):
        self._runner, self._group = runner, group
        self._stopped = False
        me = weakref.ref(self)  # the exit hook must not keep this runner (and its pools) alive

        def at_exit() -> None:
            runner = me()
            if runner is not None:
                runner.stop()

        self._at_exit = at_exit
        atexit.register(at_exit)

    # Not across ranks (yet): steps fed with the previous step's tokens on the device (the others
    # would get placeholder ids). The engine then runs without overlapped steps.
    accepts_device_tokens = False

    def __getattr__(self, name: str) -> Any:  # pools, layout, rates, graphs, ...: the local runner's
        return getattr(self._runner, name)

    def run(self, batch: StepBatch) -> torch.Tensor:
        _send(self._group, RUN, (), batch.args())
        return self._runner.run(batch)

    def run_mtp_rows(self, batch: StepBatch, rows: torch.Tensor, chained: bool = False) -> torch.Tensor:
        # every rank holds the same streams (the steps end in all-reduces): the rows name them
        _send(self._group, RUN_MTP, (int(chained),), (*batch.args(), rows.to("cpu", torch.int64)))
        return self._runner.run_mtp_rows(batch, rows, chained)

    def run_mtp(self, batch: StepBatch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise AssertionError("a sharded engine runs the MTP block by rows (run_mtp_rows): the other ranks hold "
                             "the streams, not this tensor")

    def copy_pages(self, pool: str, src: list[int], dst: list[int]) -> None:
        _send(self._group, COPY_PAGES, (_POOLS.index(pool),),
              (torch.tensor(src, dtype=torch.int64), torch.tensor(dst, dtype=torch.int64)))
        self._runner.copy_pages(pool, src, dst)

    def add_window_pages(self, n: int) -> None:
        _send(self._group, ADD_WINDOW_PAGES, (n,))
        self._runner.add_window_pages(n)

    def warm_up(self, max_rows: int | None = None, max_tokens: int | None = None) -> None:
        _send(self._group, WARM_UP, (-1 if max_rows is None else max_rows, -1 if max_tokens is None else max_tokens))
        self._runner.warm_up(max_rows, max_tokens)

    def stop(self) -> None:
        """Tell the other ranks to leave ``follow`` (once; also at exit)."""
        if not self._stopped:
            self._stopped = True
            atexit.unregister(self._at_exit)
            try:
                _send(self._group, STOP)
            except RankFailure:
                pass  # they are gone already


def follow(runner: Any, group: Any) -> int:
    """Make rank 0's runner calls on ``runner`` until rank 0 stops; the number of steps run."""
    steps = 0
    while True:
        cmd, ints, tensors = _receive(group)
        if cmd == RUN:
            runner.run(StepBatch(*tensors, logit_owners=()))
            steps += 1
        elif cmd == RUN_MTP:
            runner.run_mtp_rows(StepBatch(*tensors[:-1], logit_owners=()), tensors[-1], bool(ints[0]))
        elif cmd == COPY_PAGES:
            runner.copy_pages(_POOLS[ints[0]], tensors[0].tolist(), tensors[1].tolist())
        elif cmd == ADD_WINDOW_PAGES:
            runner.add_window_pages(ints[0])
        elif cmd == WARM_UP:
            runner.warm_up(None if ints[0] < 0 else ints[0], None if ints[1] < 0 else ints[1])
        elif cmd == STOP:
            return steps
        else:
            raise RankFailure(f"rank 0 sent an unknown step command {cmd}: the ranks run different ds4c versions?")


def send_tokens(group: Any, rows: Sequence[Sequence[int]]) -> None:
    """Rank 0: the token rows a generate call produced, to the other ranks (``receive_tokens``)."""
    flat = [t for row in rows for t in row]
    _send(group, TOKENS, (), (torch.tensor([len(r) for r in rows], dtype=torch.int64),
                              torch.tensor(flat, dtype=torch.int64)))


def receive_tokens(group: Any) -> list[list[int]]:
    cmd, _, tensors = _receive(group)
    if cmd != TOKENS:
        raise RankFailure(f"expected rank 0's tokens, got step command {cmd}: the ranks fell out of step")
    lengths, flat = tensors[0].tolist(), tensors[1].tolist()
    out, at = [], 0
    for n in lengths:
        out.append(flat[at:at + n])
        at += n
    return out
