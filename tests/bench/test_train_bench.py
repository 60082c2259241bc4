"""Smoke tests of ``bench/train.py`` on the CPU: both variants train on the tiny preset with
AIRES's product streamed, and the JSON record carries the device, the versions, the command
and an epoch time per variant; a variant also runs isolated in its own process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import train as bench_train

pytest.importorskip(
    "torch_geometric", reason="the in-core baseline needs torch-geometric"
)


def test_smoke_run_writes_a_complete_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--smoke",
        "--in-process",
        "--out",
        str(tmp_path),
        "--cache-dir",
        str(tmp_path / "g"),
    ]
    assert bench_train.main(argv) == 0
    [path] = tmp_path.glob("train-tiny-cpu-*.json")
    record = json.loads(path.read_text())
    assert record["command"][-len(argv) :] == argv
    assert record["device"]["kind"] == "cpu" and record["versions"]["torch"]
    assert record["graph"]["nodes"] == 1000
    for name in ("pyg-incore", "aires"):
        result = record["results"][name]
        assert result["status"] == "ok", result
        assert len(result["epoch_ms"]["all"]) == bench_train.SMOKE["epochs"]
    aires = record["results"]["aires"]
    assert aires["store"]["tiles"] > 1 and aires["store"]["symmetric"] is True
    assert aires["product_stats"]["tiles_disk"] > 0
    assert record["aires_over_incore"] > 0
    assert "aires / in-core" in capsys.readouterr().out


def test_variant_runs_isolated(tmp_path: Path) -> None:
    argv = ["--smoke", "--cache-dir", str(tmp_path / "g")]
    args = bench_train.parse_args(argv)
    bench_train._graph(
        args
    )  # generated here, as the parent does, so the child only opens it
    result = bench_train._run_isolated("aires", args, argv)
    assert result["status"] == "ok", result


def test_arguments_are_checked() -> None:
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--epochs", "0"])
    args = bench_train.parse_args(["--smoke"])
    assert args.device == "cpu" and args.hidden == bench_train.SMOKE["hidden"]
