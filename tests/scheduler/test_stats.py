"""RunStats from a recorder's marks (CPU clock)."""

from __future__ import annotations

import json

import torch

from aires.scheduler import RunStats
from aires.scheduler.stats import Recorder


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
