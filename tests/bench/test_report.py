"""The benchmark JSON schema check, the table and the plot."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from bench.report import (
    LEGEND,
    format_bytes,
    format_table,
    main,
    plot,
    speedups,
    sweep_lines,
    validate,
)


@pytest.fixture
def doc() -> dict[str, Any]:
    return {
        "device": "NVIDIA H100 PCIe",
        "date": "2025-01-01T00:00:00+00:00",
        "git_commit": "0123abc",
        "command": "aires-bench --dataset products --scale 1",
        "dataset": {"name": "products-x1-s0", "nodes": 2449029, "edges": 123718280,
                    "features": 100},
        "gpu_budget_bytes": 8 << 30,
        "mode": "kvikio-compat",
        "ceilings": {"h2d_GBps": 54.6, "disk_read_GBps": 1.9, "incore_spmm_ms": 7.15},
        "methods": {
            "aires": {"status": "ok", "epoch_s": [1.0, 1.2, 0.9], "peak_gpu_bytes": 7 << 30,
                      "bytes_h2d": 3 << 30, "bytes_disk": 0, "error": None,
                      "overlap_efficiency": 0.91},
            "uvm": {"status": "ok", "epoch_s": [3.0, 3.1, 2.9], "peak_gpu_bytes": 6 << 30,
                    "bytes_h2d": 5 << 30, "bytes_disk": None, "error": None},
            "incore": {"status": "oom", "epoch_s": [], "peak_gpu_bytes": 8 << 30,
                       "bytes_h2d": None, "bytes_disk": None,
                       "error": "OutOfMemoryError: CUDA out of memory"},
        },
    }


def test_valid_document_passes_and_survives_json(doc: dict[str, Any]) -> None:
    validate(doc)
    validate(json.loads(json.dumps(doc)))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ((), {"surprise": 1}, "unexpected keys"),
        (("dataset",), {"name": "x", "nodes": 1, "edges": 1}, "missing keys"),
        (("dataset", "nodes"), -1, "dataset.nodes"),
        (("ceilings", "h2d_GBps"), "fast", "ceilings.h2d_GBps"),
        (("ceilings",), {"h2d_GBps": 1.0, "disk_read_GBps": 1.0, "incore_spmm_ms": 1.0,
                         "extra": 1}, "unexpected keys"),
        (("gpu_budget_bytes",), 0, "gpu_budget_bytes"),
        (("methods", "uvm", "status"), "slow", "methods.uvm.status"),
        (("methods", "uvm", "epoch_s"), [], "is empty for status ok"),
        (("methods", "uvm", "bytes_h2d"), 1.5, "methods.uvm.bytes_h2d"),
        (("methods", "incore", "error"), None, "must say why"),
        (("methods",), {}, "non-empty"),
        (("git_commit",), 5, "git_commit"),
    ],
)
def test_schema_violations_are_named(
    doc: dict[str, Any], path: tuple[str, ...], value: Any, message: str
) -> None:
    broken = copy.deepcopy(doc)
    if path:
        target = broken
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    else:
        broken.update(value)
    with pytest.raises(ValueError, match=message):
        validate(broken)


def test_missing_top_level_key_is_named(doc: dict[str, Any]) -> None:
    del doc["ceilings"]
    with pytest.raises(ValueError, match=r"missing keys \['ceilings'\]"):
        validate(doc)


def test_method_entries_may_carry_extra_keys(doc: dict[str, Any]) -> None:
    doc["methods"]["aires"]["ablation"] = {"dual": False}
    validate(doc)


def test_speedups_are_median_ratios(doc: dict[str, Any]) -> None:
    ratio = speedups(doc)
    assert ratio["aires"] == pytest.approx(1.0)
    assert ratio["uvm"] == pytest.approx(3.0)
    assert ratio["incore"] is None


def test_table_shows_every_method(doc: dict[str, Any]) -> None:
    table = format_table(doc)
    legend, *lines = table.splitlines()
    assert legend == LEGEND and "AIRES speed-up" in legend
    assert lines[0].split()[:2] == ["method", "status"]
    assert len(lines) == 2 + 3
    assert "3.00x" in table and "overlap 0.91" in table and "OutOfMemoryError" in table
    assert "1000.0 ms" not in table and "1.00 s" in table


def test_format_bytes() -> None:
    assert format_bytes(None) == "-"
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 << 29) == "1.50 GiB"


def test_plot_writes_a_png(doc: dict[str, Any], tmp_path: Path) -> None:
    path = plot(doc, tmp_path / "bench.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


def test_report_command_tabulates_and_plots(
    doc: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = tmp_path / "bench.json"
    result.write_text(json.dumps(doc))
    assert main([str(result), "--plot", str(tmp_path / "bench.png")]) == 0
    assert "overlap 0.91" in capsys.readouterr().out
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    del doc["mode"]
    result.write_text(json.dumps(doc))
    assert main([str(result)]) == 2
    assert "missing keys ['mode']" in capsys.readouterr().err


def test_a_sweep_line_marks_out_of_memory_and_names_what_was_not_measured() -> None:
    """Out of memory is a result (``x`` on the axis); a run that timed out or was never reached
    under ``--time-limit`` is not, and the method's label says how many such budgets it has."""
    def run(gib: int, status: str, epochs: list[float]) -> dict[str, Any]:
        return {"budget_bytes": gib << 30, "status": status, "epoch_s": epochs}

    doc = {"sweep": {
        "aires": [run(16, "ok", [2.0, 3.0, 4.0]), run(8, "ok", [5.0])],
        "incore": [run(16, "ok", [1.0]), run(8, "oom", [])],
        "uvm": [run(16, "error", []), run(8, "oom", [])],
    }}
    assert sweep_lines(doc) == [
        ("aires", [(16.0, 3.0), (8.0, 5.0)], []),
        ("incore", [(16.0, 1.0)], [8.0]),
        ("uvm (1 not measured)", [], [8.0]),
    ]
