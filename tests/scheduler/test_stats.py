"""RunStats from a recorder's marks (CPU clock)."""

from __future__ import annotations

import json

import pytest
import torch

from aires.scheduler import RunStats
from aires.scheduler.stats import (
    Recorder,
    begin_peak,
    max_memory_allocated,
    reset_peak_memory_stats,
)


def test_finish_reduces_marks_to_stats() -> None:
    rec = Recorder("spmm", torch.device("cpu"), "cpu", 4)
    rec.start = 0.0
    rec.loads += [("resident", 100, None, None), ("h2d", 200, 1.0, 3.0), ("h2d", 200, 3.0, 5.0)]
    rec.loads.append(("disk", 400, None, None))
    rec.disk_reads.append((400, 0.5, 8.5))
    rec.computes += [("resident", 0.0, 1.0), ("stream", 5.0, 6.0), ("stream", 8.5, 10.0)]
    rec.writebacks.append((50, 6.0, 7.0))
    rec.end = 10.0
    rec.stolen = 1
    s = rec.finish()
    assert (s.tiles_resident, s.tiles_h2d, s.tiles_disk, s.tiles_stolen) == (1, 2, 1, 1)
    assert (s.bytes_resident, s.bytes_h2d, s.bytes_disk, s.bytes_d2h) == (100, 400, 400, 50)
    assert s.bytes_moved == 900
    assert s.t_h2d_s == 4.0 and s.t_disk_s == 8.0 and s.t_io_s == 8.0
    assert s.t_compute_s == 3.5 and s.t_resident_s == 1.0 and s.t_total_s == 10.0
    assert s.bw_h2d == 100.0 and s.bw_disk == 50.0 and s.bw_d2h == 50.0
    assert s.overlap_efficiency == 0.8


def test_wall_clock_wins_when_the_call_waited_for_itself() -> None:
    rec = Recorder("spmm", torch.device("cpu"), "cpu", 0)
    rec.start, rec.end = 0.0, 1.0
    rec.wall_end = rec.wall_start + 2.5
    assert rec.finish().t_total_s == 2.5


def test_to_dict_is_json_ready() -> None:
    s = RunStats(op="spgemm", device="cpu", io_mode="cpu", bytes_h2d=3, extra={"pieces": 2})
    d = json.loads(json.dumps(s.to_dict()))
    assert d["op"] == "spgemm" and d["bytes_moved"] == 3 and d["extra"] == {"pieces": 2}
    assert s.overlap_efficiency == 0.0


class FakeAllocator:
    """The three CUDA allocator counters the peak bookkeeping reads, on one fake device."""

    def __init__(self) -> None:
        self.allocated = 0
        self.peak = 0

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)

        def reset(device: object = None) -> None:
            self.peak = self.allocated

        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)


def test_call_peaks_and_the_process_peak_across_their_resets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call's window starts at its reset; the process peak before it is kept, and a reset
    by the caller forgets it."""
    fake = FakeAllocator()
    fake.install(monkeypatch)
    reset_peak_memory_stats(torch.device("cuda"))
    fake.alloc(1000)  # an earlier peak of 1000, then back to 100
    fake.alloc(-900)
    assert begin_peak(torch.device("cuda")) == 100
    fake.alloc(300)  # the call's own allocations
    fake.alloc(-300)
    assert torch.cuda.max_memory_allocated() == 400  # the call's window: 100 held + 300
    assert max_memory_allocated(torch.device("cuda")) == 1000
    assert max_memory_allocated(0) == 1000
    reset_peak_memory_stats()
    assert max_memory_allocated() == 100


def test_cpu_stats_report_the_planned_peak_and_no_pinned_memory() -> None:
    rec = Recorder("spmm", torch.device("cpu"), "cpu", 1)
    rec.start, rec.end, rec.planned_bytes = 0.0, 1.0, 4096
    s = rec.finish()
    assert s.peak_gpu_bytes == s.planned_gpu_bytes == 4096 and s.pinned_host_bytes == 0
    rec.measured_peak = 5000
    assert rec.finish().peak_gpu_bytes == 5000 and rec.finish().planned_gpu_bytes == 4096
