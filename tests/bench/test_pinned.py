"""``Â`` in pinned chunks: streamed and cached products against scipy, the gather lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.methods.pinned import PinnedAdjacency, gather_lists
from bench.methods.training import Traffic
from bench.methods.workload import load_workload

CPU = torch.device("cpu")


def _adjacency(workload_dir: Path, cached: bool, slot: np.ndarray | None = None) -> tuple:
    workload = load_workload(workload_dir)
    traffic = Traffic()
    adjacency = PinnedAdjacency(workload, 2048, CPU, traffic, gather=slot is not None)
    if cached:
        adjacency.cache()
    if slot is not None:
        adjacency.bind(slot)
    return workload, adjacency, traffic


@pytest.mark.parametrize("cached", [False, True])
def test_spmm_matches_scipy_streamed_or_cached(workload_dir: Path, cached: bool) -> None:
    workload, adjacency, traffic = _adjacency(workload_dir, cached)
    assert len(adjacency.chunks) > 2  # the streamed form really streams
    dense = np.random.default_rng(0).standard_normal((workload.num_nodes, 5)).astype(np.float32)
    out = adjacency.spmm(torch.from_numpy(dense))
    np.testing.assert_allclose(out.numpy(), workload.scipy_adjacency() @ dense, rtol=1e-5,
                               atol=1e-6)
    # Streamed: every chunk's row pointer (rows + 1), indices and values crossed once.
    expected = 0 if cached else (
        workload.nnz * 8 + (workload.num_nodes + len(adjacency.chunks)) * 4
    )
    assert traffic.h2d == expected


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("hot", [0, 17, 240])
def test_gather_spmm_matches_scipy_for_any_cache(workload_dir: Path, cached: bool, hot: int) -> None:
    """``Â X`` from a cache of ``hot`` rows and the other rows read where they lie."""
    workload = load_workload(workload_dir)
    x = np.asarray(workload.x, dtype=np.float32)
    rows = np.random.default_rng(1).permutation(workload.num_nodes)[:hot]
    slot = np.full(workload.num_nodes, -1, dtype=np.int64)
    slot[rows] = np.arange(hot)
    _, adjacency, _ = _adjacency(workload_dir, cached, slot)
    cache = torch.from_numpy(x[rows])
    read: list[int] = []

    def gather(slots: torch.Tensor, misses: torch.Tensor) -> torch.Tensor:
        read.append(len(misses))
        return torch.cat([cache[slots.long()], torch.from_numpy(x)[misses.long()]])

    out = adjacency.gather_spmm(gather, x.shape[1])
    np.testing.assert_allclose(out.numpy(), workload.scipy_adjacency() @ x, rtol=1e-5, atol=1e-6)
    assert (sum(read) == 0) == (hot == workload.num_nodes)


def test_gather_lists_put_cached_rows_first() -> None:
    # Rows 0-1 read columns {0, 2, 3}; row 2 reads {1, 3}. Nodes 3 and 1 are cached.
    indptr = np.array([0, 2, 3, 5])
    indices = np.array([3, 0, 2, 1, 3], dtype=np.int32)
    slot = np.array([-1, 0, -1, 1])
    local, slots, misses = gather_lists(indptr, indices, [(0, 2), (2, 3)], slot)
    assert [s.tolist() for s in slots] == [[1], [0, 1]]
    assert [m.tolist() for m in misses] == [[0, 2], []]
    # Chunk 0's block is [X3, X0, X2]; chunk 1's [X1, X3].
    assert local.tolist() == [0, 1, 2, 0, 1]


def test_gather_lists_agree_with_a_sort_on_random_chunks() -> None:
    """Against the definition by ``np.unique``: each chunk's distinct columns, cached first
    (in node order within each group), and every entry renumbered into that block."""
    rng = np.random.default_rng(5)
    n = 300
    indptr = np.concatenate([[0], np.cumsum(rng.integers(0, 9, n))])
    indices = rng.integers(0, n, indptr[-1]).astype(np.int32)
    slot = np.where(rng.random(n) < 0.3, rng.permutation(n), -1)
    chunks = [(0, 40), (40, 41), (41, 200), (200, n)]
    local, slots, misses = gather_lists(indptr, indices, chunks, slot)
    for k, (r0, r1) in enumerate(chunks):
        s, e = indptr[r0], indptr[r1]
        columns = np.unique(indices[s:e])
        cached, other = columns[slot[columns] >= 0], columns[slot[columns] < 0]
        np.testing.assert_array_equal(slots[k], slot[cached])
        np.testing.assert_array_equal(misses[k], other)
        block = np.concatenate([cached, other])
        np.testing.assert_array_equal(block[local[s:e]], indices[s:e])
