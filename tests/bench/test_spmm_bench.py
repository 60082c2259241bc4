"""Smoke test of bench.spmm: the whole benchmark at a tiny size on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.spmm import VARIANTS, main, rmat_adjacency, verdicts


def test_smoke_runs_every_variant_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "spmm.json"
    res = main(
        [
            "--smoke",
            "--device",
            "cpu",
            "--no-drop-caches",
            "--workdir",
            str(tmp_path / "w"),
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "spmm" and saved["io_mode"] == "cpu"
    assert set(saved["spmm"]) == set(VARIANTS)
    for name, entry in saved["spmm"].items():
        assert entry.get("ok", True), (name, entry)
        assert entry["median_ms"] > 0
    host = saved["spmm"]["host"]["stats"]
    assert host["tiles_h2d"] == saved["graph"]["tiles"] and host["tiles_resident"] == 0
    assert saved["spmm"]["nvme"]["stats"]["tiles_disk"] == saved["graph"]["tiles"]
    split = saved["spmm"]["split"]["stats"]
    assert split["tiles_h2d"] > 0 and split["tiles_disk"] > 0
    for density in ("0.1", "0.5"):
        assert saved["spgemm"][density]["aires"]["ok"]
        assert saved["spgemm"][density]["aires"]["check"]["sample_rows"] > 0
    assert saved["floors"]["disk_floor_ms"] > 0
    assert saved["versions"]["torch"] and "bench.spmm" in saved["command"]
    assert res["graph"]["reused"] is False
    assert saved["spmm"]["host-fresh"]["options"] == {"prealloc": False}
    assert saved["spmm"]["host-serial"]["options"] == {"overlap": False}
    for path in ("host", "nvme"):
        assert saved["spmm"][f"{path}-unchecked"]["options"] == {"checks": False}
        cost = saved["targets"][f"{path}_checks_cost"]
        med = [saved["spmm"][v]["median_ms"] for v in (path, f"{path}-unchecked")]
        assert cost == pytest.approx(med[0] / med[1] - 1)
    again = main(
        [
            "--smoke",
            "--device",
            "cpu",
            "--no-drop-caches",
            "--densities",
            "",
            "--variants",
            "incore,host",
            "--workdir",
            str(tmp_path / "w"),
            "--out",
            str(out),
        ]
    )
    assert again["graph"]["reused"] is True and "spgemm" not in again


def test_tile_bytes_sweep_reruns_the_sweep_variants(tmp_path: Path) -> None:
    res = main(
        [
            "--smoke",
            "--device",
            "cpu",
            "--no-drop-caches",
            "--densities",
            "",
            "--variants",
            "incore,host",
            "--tile-bytes",
            "64KiB,32KiB",
            "--sweep-variants",
            "host,host-serial",
            "--workdir",
            str(tmp_path / "w"),
            "--out",
            str(tmp_path / "spmm.json"),
        ]
    )
    [(size, entry)] = res["tile_sweep"].items()
    assert size == "32.0 KiB" and entry["graph"]["tile_bytes"] == 32 * 1024
    assert entry["graph"]["tiles"] > res["graph"]["tiles"]
    assert set(entry["spmm"]) == {"incore", "host", "host-serial"}
    assert all(e.get("ok", True) for e in entry["spmm"].values())


def test_rmat_is_symmetric_with_self_loops() -> None:
    import numpy as np
    import scipy.sparse as sp
    import torch

    indptr, indices, data, shape = rmat_adjacency(1000, 12_000, seed=3, device=torch.device("cpu"))
    a = sp.csr_array((data, indices, indptr), shape=shape)
    assert a.nnz >= 0.99 * 12_000 - 1000
    assert (a != a.T).nnz == 0
    assert (a.diagonal() > 0).all()
    deg = np.diff(indptr)
    np.testing.assert_allclose(a.diagonal(), 1.0 / deg, rtol=1e-6)


def test_unknown_variant_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--smoke", "--variants", "warp-drive", "--workdir", str(tmp_path)])


def test_verdicts_judge_host_by_back_to_back_calls() -> None:
    mb = 10**6
    floors = {"h2d_Bps": 50e9, "h2d_median_Bps": 45e9, "h2d_floor_ms": 10.0, "incore_ms": 8.0}
    floors["disk_floor_ms"] = 400.0
    stats = {"bytes_h2d": 500 * mb, "bytes_prefetched": 50 * mb, "bw_h2d": 50e9}
    host = {"median_ms": 9.9, "ms": [9.8, 9.9, 10.0], "stats": stats}
    host["loop"] = {"calls": 10, "per_call_ms": 10.3}
    spmm = {
        "incore": {"median_ms": 8.0, "ms": [8.0]},
        "host": host,
        "nvme": {"median_ms": 300.0, "ms": [290.0, 310.0]},
        "dual": {"median_ms": 9.7, "ms": [9.6, 10.1]},  # overlaps host's runs: a tie
        "split": {"median_ms": 200.0, "ms": [195.0, 205.0]},
    }
    v = verdicts({"graph": {"store_bytes": 500 * mb}, "floors": floors, "spmm": spmm})
    # Ten calls move ten stores but the first call's prefetch: 9.9 ms a call at 50 GB/s.
    assert v["host_loop_over_bound"] == pytest.approx(10.3 / 9.9)
    assert v["host_target_1.05x"] is True
    # One call copied 450 MB while it ran: 9.0 ms, above the 8.0 ms in core.
    assert v["host_call_bytes_copied"] == 450 * mb
    assert v["host_call_over_bound"] == pytest.approx(9.9 / 9.0)
    assert v["host_call_over_median_bound"] == pytest.approx(9.9 / 10.0)
    assert v["host_call_over_whole_store_bound"] == pytest.approx(9.9 / 10.0)
    assert v["nvme_over_disk_floor"] == pytest.approx(0.75) and v["nvme_target_1.15x"]
    assert v["dual_faster_than_host_and_nvme"] is False
    assert v["split_faster_than_nvme"] is True
    host["loop"]["per_call_ms"] = 10.5  # 1.06x
    assert verdicts({"graph": {"store_bytes": 500 * mb}, "floors": floors, "spmm": spmm})[
        "host_target_1.05x"
    ] is False
