"""The collectives of a GCN epoch split by rows over the ranks of ``torch.distributed``.

Every row-local stage is local to a rank. What crosses ranks:

- **An aggregation's input panel.** ``Â`` is symmetric, so the forward ``Â · Z`` and the
  backward ``Âᵀ · G`` are the same product: for each column panel of the source, every rank
  contributes its rows and receives everyone else's (:meth:`Exchange.complete`), then
  multiplies its own tiles against the whole panel to get its own rows of the output. The
  ranges are unequal, so the panel is completed by broadcasts from each owner, in place, with
  no padding, a piece at a time as the owner copies its rows in (the exchange runs over NVLink
  beside the copies over PCIe). A rank receives ``(N - n_rank) * w * item`` bytes per panel, about
  ``(P - 1) / P`` of the panel when the ranges are balanced.
- **The loss**, a sum over ranks of each rank's labelled rows (divided by the global count).
- **The weight gradients**, each rank's sum over its rows, summed over ranks.

The same calls run over ``gloo`` (CPU tensors, CI) and ``nccl`` (the panel is on the GPU). Only
the default process group is used.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from aires.distributed.partition import row_ranges

__all__ = ["HOST_CHUNK_BYTES", "PIECE_BYTES", "PROBE_BYTES", "Exchange", "rank_zero_first"]

T = TypeVar("T")

#: Bytes per step when host rows are exchanged through the device (NCCL reads device memory
#: only): a bounded buffer, large enough that each broadcast is bandwidth-bound.
HOST_CHUNK_BYTES = 64 << 20
#: Bytes of the broadcast that measures the exchange's bandwidth, per device type: on a GPU large
#: enough to be bandwidth-bound over NVLink (256 MiB took 0.8 ms between two H200s), on a CPU
#: enough to exercise ``gloo``.
PROBE_BYTES = {"cuda": 256 << 20, "cpu": 4 << 20}
#: Bytes of a panel's rows a rank sends in one broadcast when it loads them piece by piece
#: (:meth:`Exchange.complete`'s ``load``): small enough that the last piece's exchange, the
#: only one not beside a copy, is short (256 MiB: 0.8 ms over NVLink), large enough that each
#: broadcast is bandwidth-bound.
PIECE_BYTES = 256 << 20


class Exchange:
    """This rank's rows of the graph and the collectives that join its epoch to the others'.

    Args:
        ranges: every rank's ``[start, stop)`` rows, in rank order, covering ``[0, N)``.
        device: where the collectives' tensors live (the compute device).

    Raises:
        ValueError: ``torch.distributed`` is not initialised, or ``ranges`` does not have one
            range per rank.
    """

    def __init__(self, ranges: list[tuple[int, int]], device: torch.device) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("distributed=True needs torch.distributed initialised "
                             "(aires.distributed.launch, or torchrun and init_process_group)")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        if len(ranges) != self.size:
            raise ValueError(f"ranges: {len(ranges)} ranges for {self.size} ranks")
        self.ranges = [(int(a), int(b)) for a, b in ranges]
        self.start, self.stop = self.ranges[self.rank]
        self.rows = self.ranges[-1][1]
        self.device = device

    @classmethod
    def over(cls, store: Any, device: torch.device) -> Exchange:
        """The ranks' ranges of ``store``'s rows, balanced by nonzeros (:func:`row_ranges`)."""
        return cls(row_ranges(store.tiles, int(store.shape[0]), dist.get_world_size()), device)

    @property
    def local_rows(self) -> int:
        return self.stop - self.start

    def complete(
        self,
        panel: torch.Tensor,
        ranges: list[tuple[int, int]] | None = None,
        load: Callable[[int, int], None] | None = None,
        piece_bytes: int = PIECE_BYTES,
    ) -> int:
        """Fill the other ranks' rows of ``panel`` (``(N, w)``) from their owners; returns the
        bytes this rank received. ``ranges``: each rank's rows of ``panel`` when they are not
        its rows of the graph.

        ``load(r0, r1)``: puts this rank's rows ``[r0, r1)`` of ``panel`` in place (queued on
        the current stream). Each rank's rows are then sent in pieces of about ``piece_bytes``
        (at least two), each piece as soon as it is loaded, so the exchange runs beside the
        next piece's copy instead of after the whole panel's. ``None``: the rows are in place.
        """
        ranges = self.ranges if ranges is None else ranges
        pieces = 1
        if load is not None:
            pieces = max(2, -(-panel.numel() * panel.element_size() // piece_bytes))
        works = []
        for k in range(pieces):
            for q, (a, b) in enumerate(ranges):
                lo, hi = a + (b - a) * k // pieces, a + (b - a) * (k + 1) // pieces
                if lo == hi:
                    continue
                if q == self.rank and load is not None:
                    load(lo, hi)
                works.append(dist.broadcast(panel[lo:hi], src=q, async_op=True))
        for work in works:
            work.wait()
        return self._received(ranges, panel)

    def complete_host(self, out: torch.Tensor,
                      ranges: list[tuple[int, int]] | None = None) -> int:
        """:meth:`complete` for a host tensor (the logits): directly over ``gloo``, through a
        device buffer of at most :data:`HOST_CHUNK_BYTES` over ``nccl``."""
        if self.device.type == "cpu":
            return self.complete(out, ranges)
        ranges = self.ranges if ranges is None else ranges
        row_bytes = max(out[0].numel() * out.element_size(), 1) if len(out) else 1
        step = max(1, HOST_CHUNK_BYTES // row_bytes)
        for q, (a, b) in enumerate(ranges):
            for r0 in range(a, b, step):
                r1 = min(r0 + step, b)
                buf = out[r0:r1].to(self.device) if q == self.rank else torch.empty(
                    (r1 - r0, *out.shape[1:]), dtype=out.dtype, device=self.device)
                dist.broadcast(buf, src=q)
                if q != self.rank:
                    out[r0:r1].copy_(buf)
        return self._received(ranges, out)

    def _received(self, ranges: list[tuple[int, int]], out: torch.Tensor) -> int:
        """Bytes of ``out``'s rows that the other ranks own under ``ranges``."""
        rows = sum(b - a for q, (a, b) in enumerate(ranges) if q != self.rank)
        return rows * out[0].numel() * out.element_size() if len(out) else 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def minimum(self, value: int) -> int:
        """The least of every rank's ``value`` (so that all agree, e.g. on a panel width)."""
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def bandwidth(self, repeats: int = 5) -> float:
        """Bytes per second of one rank's broadcast to the others, the rate every panel is
        completed at: the median of ``repeats`` timed broadcasts of :data:`PROBE_BYTES` after a
        warm-up (NCCL sets up its channels on the first call), the same on every rank (their
        least). Between two H200s joined by NVLink it was 338 GB/s, seven times a PCIe copy,
        which decides what the planner exchanges (:func:`~aires.nn.plan.plan_epoch`)."""
        buf = torch.empty(PROBE_BYTES[self.device.type], dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, src=0)
        times = []
        for _ in range(repeats):
            _barrier(self.device)
            self._sync()
            start = time.perf_counter()
            dist.broadcast(buf, src=0)
            self._sync()
            times.append(time.perf_counter() - start)
        rate = int(buf.numel() / max(sorted(times)[len(times) // 2], 1e-9))
        return float(self.minimum(rate))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank, in place (replicated weights start equal)."""
        dist.broadcast(tensor, src=0)
        return tensor


def rank_zero_first(fn: Callable[[], T], device: torch.device) -> T:
    """``fn()`` on rank 0, then on the others: rank 0 builds what they then reuse (a tile
    store in a shared directory) instead of every rank racing to build it."""
    if dist.get_rank() != 0:
        _barrier(device)
    value = fn()
    if dist.get_rank() == 0:
        _barrier(device)
    return value


def _barrier(device: torch.device) -> None:
    """Wait for every rank, over a tensor on ``device`` (NCCL needs to know the GPU)."""
    dist.all_reduce(torch.zeros(1, device=device))
