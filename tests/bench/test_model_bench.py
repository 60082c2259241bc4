"""``python -m bench.model --smoke``: whole-model training under budgets, beside in-core."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.model import floor_seconds, main


def test_smoke_trains_every_budget_like_in_core(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    assert main(["--smoke", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "bench.model" and doc["git_commit"] is not None
    incore = doc["ceilings"]["incore_losses"]
    assert len(doc["budgets"]) == 2
    for row in doc["budgets"]:
        assert "error" not in row, row
        # Same weights, same model: the losses agree epoch by epoch with the in-core loop's
        # (its warm-up and timed epochs against the budget run's).
        assert row["losses"][: len(incore)] == pytest.approx(incore, rel=1e-5)
        assert row["stats"]["measured"] == row["stats"]["predicted"]
        assert row["floor_s"] > 0
    assert doc["ceilings"]["disk_read"] > 0 and doc["ceilings"]["disk_write"] > 0


def test_floor_is_the_larger_of_transfers_and_in_core() -> None:
    measured = {"h2d": 10e9, "d2h": 5e9, "disk_read": 3e9, "disk_write": 0}
    ceilings = {"h2d": 50e9, "d2h": 50e9}
    assert floor_seconds(measured, ceilings, 0.1) == pytest.approx(0.2)
    assert floor_seconds(measured, ceilings, 0.5) == pytest.approx(0.5)
    assert floor_seconds(measured, {**ceilings, "disk_read": 1e9}, 0.1) == pytest.approx(3.2)
    written = {**measured, "disk_write": 2e9}
    disk = {**ceilings, "disk_read": 1e9, "disk_write": 0.5e9}
    assert floor_seconds(written, disk, 0.1) == pytest.approx(0.2 + 5)
