"""Smoke test of bench.spmm: the whole benchmark at a tiny size on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.spmm import VARIANTS, main, rmat_adjacency


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
