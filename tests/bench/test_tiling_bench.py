"""The tiler benchmark runs end to end on a tiny matrix and writes the JSON it promises."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aires.tiling import build_store
from bench import tiling


def test_smoke_run_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "results" / "tiling.json"
    argv = [
        "--nnz",
        "20000",
        "--rows",
        "500",
        "--dir",
        str(tmp_path / "scratch"),
        "--tile-sizes",
        "64KiB",
        "--default-tile",
        "256KiB",
        "--repeats",
        "2",
        "--threads",
        "1,4",
        "--no-drop-caches",
        "--out",
        str(out),
    ]
    assert tiling.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "tiling" and result["command"].endswith("--out " + str(out))
    assert result["matrix"]["nnz"] == 20000 and result["io_mode"] in (
        "posix",
        "kvikio-compat",
        "gds",
    )
    assert {"device", "versions", "date", "cache", "seq_write", "seq_read"} <= result.keys()
    assert [b["tile_bytes"] for b in result["builds"]] == [64 * 1024, 256 * 1024]
    variants = {(r["tile_bytes"], r["variant"], r["threads"]) for r in result["reads"]}
    assert {(256 * 1024, "posix-host", 1), (256 * 1024, "posix-host", 4)} <= variants
    assert (64 * 1024, "posix-host-verified", 4) in variants
    assert {"threads_1", "threads_4"} <= result["seq_read"].keys()
    assert all(len(r["seconds"]) == 2 and r["GBps"] > 0 for r in result["reads"])
    assert result["targets"]["build_vs_seq_write"]["ratio"] > 0
    assert isinstance(result["targets"]["read_vs_seq_read"]["met"], bool)
    assert not (tmp_path / "scratch" / "matrix").exists()  # removed without --keep


def test_matrix_is_reused_and_valid(tmp_path: Path) -> None:
    indptr, indices, data = tiling.make_matrix(tmp_path, 5000, 100, seed=3)
    again = tiling.make_matrix(tmp_path, 5000, 100, seed=3)
    assert isinstance(again[0], np.memmap) and np.array_equal(again[1], indices)
    assert indptr[-1] == 5000 and np.all(np.diff(indptr) >= 0) and indices.max() < 100
    store = build_store((indptr, indices, data, (100, 100)), tmp_path / "s", progress=False)
    for variant in ("posix-host", "posix-host-verified"):
        assert tiling.read_tiles(store.path, variant, threads=2, drop_caches=False) > 0
    with pytest.raises(ValueError, match="variant must be one of"):
        tiling.read_tiles(store.path, "carrier-pigeon", threads=2)


def test_sequential_baselines(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    assert tiling.sequential_write(path, 5_000_000) > 0 and not path.exists()
    path.write_bytes(b"x" * 3_000_000)
    assert (
        tiling.sequential_read(path, threads=1) > 0 and tiling.sequential_read(path, threads=3) > 0
    )
    assert tiling.human(64 << 20) == "64MiB" and tiling.human(1000) == "1000B"
