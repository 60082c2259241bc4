"""``aires-bench`` end to end on a CPU: the embedded default, JSON, plot, failures recorded."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
import torch

from bench import cli
from bench.cli import DEFAULT, demo_budget, main, parse_args
from bench.methods import ABLATIONS, MethodConfig
from bench.methods.workload import load_workload
from bench.report import LEGEND, format_bytes, validate


@pytest.fixture(scope="module")
def temp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One temporary root for the module, so the second run reuses the demo's workload."""
    return tmp_path_factory.mktemp("cli")


def test_no_arguments_runs_the_demo_and_its_budget_case(
    temp_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """AIRES, in-core and naive on one graph, then a budget below what in-core holds: in-core
    cannot run there, AIRES trains and streams the tiles that do not fit."""
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "aires-bench  device:" in out and "disk path:" in out and "GPU budget:" in out
    assert LEGEND in out
    table = out[out.index("method  "):].splitlines()
    rows = {line.split()[0]: line.split() for line in table[2:7]}
    assert {name: row[1] for name, row in rows.items()} == {
        "aires": "ok", "incore": "ok", "naive": "ok", "incore@budget": "oom", "aires@budget": "ok",
    }
    workload = load_workload(next((temp_root / "aires-bench").glob("products-*")))
    budget = demo_budget(workload)
    assert budget < workload.adjacency_bytes + workload.x.nbytes  # below what in-core holds
    assert "OverBudgetError: in-core graph data" in table[5]
    # Columns are separated by two spaces or more; a cell sits under its header.
    columns = list(re.finditer(r"\S+(?: \S+)*", table[0]))
    starts = [c.start() for c in columns] + [None]
    row = {c.group(): table[6][a:b].strip() for c, a, b in zip(columns, starts, starts[1:])}
    assert row["budget"] == format_bytes(budget)
    assert row["H2D/epoch"] != "0 B"  # AIRES streamed the tiles the budget leaves out


def test_results_json_plot_and_failed_method(temp_root: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "r" / "bench.json", tmp_path / "bench.png"
    status = main([
        "--dataset", DEFAULT["dataset"], "--scale", str(DEFAULT["scale"]), "--methods", "uvm",
        "--cache-dir", str(temp_root / "aires-bench"), "--out", str(out), "--plot", str(png),
    ])
    assert status == 0
    doc = json.loads(out.read_text())
    validate(doc)
    # uvm has no CPU form: recorded as an error, not a crash of the benchmark.
    assert "needs a CUDA GPU" in doc["methods"]["uvm"]["error"]
    assert doc["dataset"]["nodes"] > 0 and doc["command"].startswith("aires-bench --dataset")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_methods_the_time_limit_leaves_no_room_for_are_recorded_not_run(
    temp_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "MIN_METHOD_SECONDS", 1e6)
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    status = main([
        "--dataset", DEFAULT["dataset"], "--scale", str(DEFAULT["scale"]), "--methods", "naive",
        "--cache-dir", str(temp_root / "aires-bench"), "--time-limit", "3600",
        "--out", str(out), "--plot", str(png),
    ])
    assert status == 0
    entry = json.loads(out.read_text())["methods"]["naive"]
    assert entry["status"] == "error" and "--time-limit" in entry["error"]
    assert png.is_file()


def test_arguments_are_parsed_and_checked() -> None:
    args = parse_args(["--dataset", "cora", "--gpu-budget", "8GiB", "--ablation"])
    assert args.gpu_budget == 8 << 30 and args.hidden == 256
    assert args.methods[:7] == ["aires", "uvm", "feature-cache", "naive", "incore",
                                "incore-tuned", "save-on-cpu"]
    assert args.methods[7:] == [f"aires-{a}" for a in ABLATIONS]
    assert args.order == "auto"
    assert parse_args(["--dataset", "cora", "--order", "pyg"]).order == "pyg"
    demo = parse_args([])
    assert (demo.dataset, demo.scale, demo.methods) == (
        "products", 0.001, ["aires", "incore", "naive"]
    )
    assert demo.budget_scope == "data"  # the CPU's only scope


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "aires,fast"], "unknown method 'fast'"),
        (["--gpu-budget", "lots"], "--gpu-budget"),
        (["--epochs", "0"], "--epochs"),
        (["--scale", "-1"], "--scale"),
        (["--time-limit", "0"], "--time-limit"),
        (["--timeout", "-5"], "--timeout"),
    ],
)
def test_bad_arguments_exit_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the process scope is valid on a GPU")
def test_a_process_budget_on_a_cpu_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """A CPU has no allocator cap: a process-wide budget there would be silently ignored, and
    the scope is no option of the CLI (a GPU's budget is always the process's)."""
    with pytest.raises(SystemExit, match="2"):
        main(["--gpu-budget", "1GiB", "--budget-scope", "process"])
    assert "unrecognized arguments: --budget-scope" in capsys.readouterr().err
    with pytest.raises(ValueError, match="budget_scope='process'"):
        MethodConfig(method="aires", workload="w", gpu_budget=1 << 30, device="cpu")


def test_a_budget_sweep_writes_one_json_and_a_plot_and_records_failures(
    temp_root: Path, tmp_path: Path
) -> None:
    """Every method at every budget: one JSON with a sweep table per method, and a PNG; a
    method that cannot run at a budget is recorded with its error and the sweep goes on."""
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert main(["--dataset", "tiny", "--scale", "1", "--methods", "aires,incore",
                 "--budgets", "4MiB,64KiB,32KiB", "--epochs", "1", "--tile-bytes", "8KiB",
                 "--cache-dir", str(temp_root), "--out", str(out), "--plot", str(png)]) == 0
    doc = json.loads(out.read_text())
    validate(doc)
    assert doc["order"] == "auto" and isinstance(doc["disk_cold"], bool)
    assert set(doc["sweep"]) == {"aires", "incore"}
    # Each method down its budgets, largest first (a line is whole before the next starts).
    assert list(doc["methods"]) == [f"{m}@{b}" for m in ("aires", "incore")
                                    for b in ("4.00 MiB", "64.00 KiB", "32.00 KiB")]
    for name in ("aires", "incore"):
        runs = {r["budget_bytes"]: r for r in doc["sweep"][name]}
        assert set(runs) == {4 << 20, 64 << 10, 32 << 10}
        assert runs[4 << 20]["status"] == "ok" and runs[4 << 20]["epoch_s"]
        assert runs[64 << 10]["status"] == "oom" and runs[64 << 10]["error"]
        # Out of memory at 64 KiB proves it at 32 KiB: recorded so, and not run again.
        assert runs[32 << 10]["status"] == "oom"
        assert runs[32 << 10]["error"] == "not run: out of memory at the larger budget 64.00 KiB"
    assert "minimum working set" in doc["sweep"]["aires"][1]["error"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budgets_and_gpu_budget_are_exclusive() -> None:
    with pytest.raises(ValueError, match="--budgets runs a sweep; --gpu-budget sets one"):
        parse_args(["--dataset", "tiny", "--budgets", "1GiB", "--gpu-budget", "1GiB"])
