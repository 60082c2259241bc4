"""``feature-cache``: what the room buys (``Â`` first, then rows), and training under it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.methods import MethodConfig
from bench.methods.feature_cache import Split, split_room
from bench.methods.pinned import PinnedAdjacency
from bench.methods.run import run_method
from bench.methods.training import Traffic
from bench.methods.workload import load_workload


def test_split_room_caches_the_adjacency_first() -> None:
    assert split_room(1000, adjacency_bytes=600, buffer_bytes=100, row_bytes=40) == Split(
        adjacency=True, rows=10
    )
    # Â does not fit: it is streamed, and the chunk buffers come out of the room.
    assert split_room(500, adjacency_bytes=600, buffer_bytes=100, row_bytes=40) == Split(
        adjacency=False, rows=10
    )
    assert split_room(50, adjacency_bytes=600, buffer_bytes=100, row_bytes=40) == Split(
        adjacency=False, rows=0
    )


def _config(workload_dir: Path, order: str, budget: int | None) -> MethodConfig:
    return MethodConfig(method="feature-cache", workload=str(workload_dir), gpu_budget=budget,
                        budget_scope="data", epochs=2, warmup=1, hidden=16, tile_bytes=2048,
                        device="cpu", order=order)


@pytest.mark.parametrize("order", ["auto", "pyg"])
@pytest.mark.parametrize(("adjacency", "rows"), [(True, 10), (False, 7), (True, 240)])
def test_a_data_budget_buys_what_it_says_and_trains_the_same_model(
    workload_dir: Path, order: str, adjacency: bool, rows: int
) -> None:
    workload = load_workload(workload_dir)
    probe = PinnedAdjacency(workload, 2048, torch.device("cpu"), Traffic(),
                            gather=order == "auto")
    row = workload.x[0:1].nbytes
    budget = (probe.cache_bytes if adjacency else probe.buffer_bytes) + rows * row
    result = run_method(_config(workload_dir, order, budget))
    reference = run_method(_config(workload_dir, order, None))
    assert result.status == "ok", result.error
    assert (result.extra["adjacency_cached"], result.extra["cached_rows"]) == (adjacency, rows)
    np.testing.assert_allclose(result.extra["loss"], reference.extra["loss"], rtol=1e-5)
    if adjacency and rows == workload.num_nodes:
        assert result.bytes_h2d == 0  # everything on the device: nothing crosses per epoch


def test_without_a_budget_half_the_rows_and_a_streamed_adjacency(workload_dir: Path) -> None:
    result = run_method(_config(workload_dir, "auto", None))
    assert result.extra["cached_rows"] == 120
    assert result.extra["cached_fraction"] == pytest.approx(0.5)
    assert result.extra["adjacency_cached"] is False
    assert result.bytes_h2d > 0
