"""What one scheduler call did: bytes per path, time per phase, bandwidth and overlap.

A :class:`Recorder` collects raw marks while a call runs (CUDA events on the GPU, so the hot
loop never waits for the clock; ``time.perf_counter`` on the CPU and on the disk threads) and
turns them into a :class:`RunStats` only when asked, after the call's work has finished.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "RunStats",
    "Recorder",
    "begin_peak",
    "max_memory_allocated",
    "reset_peak_memory_stats",
]

#: Paths a tile's bytes can travel to reach the compute: already on the device, host DMA,
#: NVMe read. ``d2h`` is the write-back path of outputs.
PATHS = ("resident", "h2d", "disk")


@dataclass
class RunStats:
    """The record of one ``spmm``/``spgemm`` call.

    Bytes are tile bytes (the store's aligned ``nbytes``) except ``bytes_d2h``, which counts
    output bytes written back to host memory. ``bytes_resident + bytes_h2d + bytes_disk`` is
    the store's total tile bytes: every tile is used exactly once per call.

    Times are seconds. ``t_total_s`` is the call from its first load to its last result;
    ``t_compute_s`` sums the per-tile kernel times; ``t_io_s`` is the busier of the two input
    paths (they run at the same time); ``overlap_efficiency = max(t_io_s, t_compute_s) /
    t_total_s`` is 1.0 when transfers hide completely behind compute or the other way round.
    Phase times: ``t_resident_s`` is the compute of phase-1 tiles, ``t_h2d_s`` the busy time of
    the host copy path, ``t_disk_s`` the span of the NVMe path, ``t_d2h_s`` the write-back copies.
    Bandwidths are bytes per second over those busy times (0.0 when a path moved nothing).

    ``bytes_prefetched`` (``tiles_prefetched``) of ``bytes_h2d`` were copied before the call
    began: the previous call queued them into free ring slots once its own work was queued.
    Their copy time belongs to no call's ``t_h2d_s``, and ``bw_h2d`` counts only the bytes
    copied during the call.

    ``io_mode`` is ``"gds"``, ``"kvikio-compat"``, ``"posix"`` (the disk path's mechanism on a
    GPU) or ``"cpu"`` (the product ran on the CPU).

    Memory. On CUDA ``peak_gpu_bytes`` is measured: the caching allocator's peak across the
    call (its peak statistic is reset when the call starts; :func:`max_memory_allocated`
    keeps the process-wide peak across those resets), less what others held when the call
    began, so it counts the scheduler's buffers (slots, resident tiles, staging), the output
    and every temporary, cuSPARSE's buffers included (PyTorch allocates them). Nothing here
    allocates through CuPy. On the CPU nothing measures device memory and it is
    ``planned_gpu_bytes``, the most device bytes the scheduler's arithmetic says it holds.
    ``pinned_host_bytes`` is the host memory the scheduler holds page-locked for tiles and
    bounce buffers, exactly the ranges registered with the driver (``pinned_empty``), which
    the placement keeps within ``host_budget``; 0 on the CPU. The pinned output of
    ``out="host"`` is the caller's result and not part of it.
    """

    op: str
    device: str
    io_mode: str
    n_tiles: int = 0
    tiles_resident: int = 0
    tiles_h2d: int = 0
    tiles_disk: int = 0
    tiles_stolen: int = 0
    tiles_prefetched: int = 0
    bytes_resident: int = 0
    bytes_h2d: int = 0
    bytes_disk: int = 0
    bytes_d2h: int = 0
    bytes_prefetched: int = 0
    t_total_s: float = 0.0
    t_io_s: float = 0.0
    t_compute_s: float = 0.0
    t_resident_s: float = 0.0
    t_h2d_s: float = 0.0
    t_disk_s: float = 0.0
    t_d2h_s: float = 0.0
    bw_h2d: float = 0.0
    bw_disk: float = 0.0
    bw_d2h: float = 0.0
    overlap_efficiency: float = 0.0
    peak_gpu_bytes: int = 0
    planned_gpu_bytes: int = 0
    pinned_host_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_moved(self) -> int:
        """Tile bytes that reached the compute, over all three input paths."""
        return self.bytes_resident + self.bytes_h2d + self.bytes_disk

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field plus ``bytes_moved``."""
        out = asdict(self)
        out["bytes_moved"] = self.bytes_moved
        return out


class Recorder:
    """Collects the marks of one call; :meth:`finish` turns them into :class:`RunStats`.

    Lists are only appended to (atomic under the GIL), so the disk threads and the main thread
    record without a lock. On CUDA a mark is a timing event recorded on a stream; elsewhere it
    is a ``perf_counter`` reading.
    """

    def __init__(self, op: str, device: torch.device, io_mode: str, n_tiles: int) -> None:
        self.op = op
        self.device = device
        self.io_mode = io_mode
        self.n_tiles = n_tiles
        self.cuda = device.type == "cuda"
        self.start: Any = None
        self.end: Any = None
        self.wall_start = time.perf_counter()
        # Set when the call waited for its own end (calls with a disk path do): the wall
        # clock then spans the CPU-side disk reads as well as the GPU work.
        self.wall_end: float | None = None
        # (path, nbytes, start_mark, end_mark) for loads; marks are events or floats.
        self.loads: list[tuple[str, int, Any, Any]] = []
        # (phase, start_mark, end_mark) per computed tile: phase "resident" or "stream".
        self.computes: list[tuple[str, Any, Any]] = []
        self.writebacks: list[tuple[int, Any, Any]] = []
        # Disk reads timed on the worker threads (wall clock): (nbytes, t0, t1).
        self.disk_reads: list[tuple[int, float, float]] = []
        self.stolen = 0
        self.planned_bytes = 0
        # Set on CUDA when the call ends: the allocator's measured peak for the call.
        self.measured_peak: int | None = None
        self.pinned_bytes = 0
        self.extra: dict[str, Any] = {}

    def mark(self, stream: Any = None) -> Any:
        """A timestamp: a recorded timing event on ``stream`` (CUDA) or ``perf_counter()``."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def done(self) -> bool:
        """Whether the call's last mark has completed (never blocks)."""
        return not self.cuda or self.end is None or self.end.query()

    def _elapsed(self, a: Any, b: Any) -> float:
        if self.cuda:
            return a.elapsed_time(b) / 1e3
        return b - a

    def finish(self) -> RunStats:
        """Wait for the call's last mark and reduce the marks to a :class:`RunStats`."""
        if self.cuda and self.end is not None:
            self.end.synchronize()
        stats = RunStats(
            op=self.op,
            device=str(self.device),
            io_mode=self.io_mode,
            n_tiles=self.n_tiles,
            tiles_stolen=self.stolen,
            peak_gpu_bytes=(
                self.planned_bytes if self.measured_peak is None else self.measured_peak
            ),
            planned_gpu_bytes=self.planned_bytes,
            pinned_host_bytes=self.pinned_bytes,
            extra=dict(self.extra),
        )
        h2d_busy = 0.0
        for path, nbytes, a, b in self.loads:
            if path == "resident":
                stats.tiles_resident += 1
                stats.bytes_resident += nbytes
            elif path == "h2d":
                stats.tiles_h2d += 1
                stats.bytes_h2d += nbytes
                h2d_busy += self._elapsed(a, b)
            elif path == "prefetch":
                stats.tiles_h2d += 1
                stats.bytes_h2d += nbytes
                stats.tiles_prefetched += 1
                stats.bytes_prefetched += nbytes
            else:
                stats.tiles_disk += 1
                stats.bytes_disk += nbytes
        for phase, a, b in self.computes:
            dt = self._elapsed(a, b)
            stats.t_compute_s += dt
            if phase == "resident":
                stats.t_resident_s += dt
        for nbytes, a, b in self.writebacks:
            stats.bytes_d2h += nbytes
            stats.t_d2h_s += self._elapsed(a, b)
        if self.disk_reads:
            first = min(t0 for _, t0, _ in self.disk_reads)
            last = max(t1 for _, _, t1 in self.disk_reads)
            stats.t_disk_s = last - first
        stats.t_h2d_s = h2d_busy
        if self.wall_end is not None:
            stats.t_total_s = self.wall_end - self.wall_start
        elif self.start is not None and self.end is not None:
            stats.t_total_s = self._elapsed(self.start, self.end)
        stats.t_io_s = max(stats.t_h2d_s, stats.t_disk_s)
        in_call = stats.bytes_h2d - stats.bytes_prefetched
        stats.bw_h2d = in_call / stats.t_h2d_s if stats.t_h2d_s > 0 else 0.0
        stats.bw_disk = stats.bytes_disk / stats.t_disk_s if stats.t_disk_s > 0 else 0.0
        stats.bw_d2h = stats.bytes_d2h / stats.t_d2h_s if stats.t_d2h_s > 0 else 0.0
        if stats.t_total_s > 0:
            stats.overlap_efficiency = max(stats.t_io_s, stats.t_compute_s) / stats.t_total_s
        return stats


# CUDA device index -> the highest allocator peak seen before a call of ours reset it.
_carried_peaks: dict[int, int] = {}


def _index(device: torch.device | int | None) -> int:
    if isinstance(device, int):
        return device
    if device is None or torch.device(device).index is None:
        return torch.cuda.current_device()
    return int(torch.device(device).index)


def begin_peak(device: torch.device) -> int:
    """Start measuring a call's peak on CUDA ``device``: reset the allocator's peak statistic
    (keeping the earlier peak for :func:`max_memory_allocated`); return the bytes allocated now.
    """
    index = _index(device)
    earlier = torch.cuda.max_memory_allocated(index)
    _carried_peaks[index] = max(_carried_peaks.get(index, 0), earlier)
    torch.cuda.reset_peak_memory_stats(index)
    return torch.cuda.memory_allocated(index)


def max_memory_allocated(device: torch.device | int | None = None) -> int:
    """``torch.cuda.max_memory_allocated``, across the resets of scheduler calls."""
    index = _index(device)
    return max(torch.cuda.max_memory_allocated(index), _carried_peaks.get(index, 0))


def reset_peak_memory_stats(device: torch.device | int | None = None) -> None:
    """``torch.cuda.reset_peak_memory_stats``, forgetting the peaks kept across calls too."""
    index = _index(device)
    torch.cuda.reset_peak_memory_stats(index)
    _carried_peaks.pop(index, None)
