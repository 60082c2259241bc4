"""Row-block planning: every tile fits, tiles are few and balanced, hub rows are split.

The checks here recompute everything from the documented cost model with plain per-row loops:
a tile of ``n`` rows and ``m`` nonzeros has payload ``(n+1)*isz + m*(isz+vsz)`` and fits when
the payload is at most ``floor(tile_bytes/alignment)*alignment - 2*255``.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aires.tiling import TilePlan, plan_tiles
from aires.tiling import plan as plan_module
from aires.tiling._layout import align_up, array_offsets


def capacity(tile_bytes: int, alignment: int) -> int:
    return (tile_bytes // alignment) * alignment - 2 * 255


def runs_and_hubs(
    lengths: list[int], isz: int, vsz: int, cap: int
) -> tuple[list[tuple[int, int]], list[int]]:
    """Maximal row ranges between hub rows (rows too big for a tile of their own), and the hubs."""
    runs, hubs, start = [], [], 0
    for r, length in enumerate(lengths):
        if isz + isz + length * (isz + vsz) > cap:
            hubs.append(r)
            if r > start:
                runs.append((start, r))
            start = r + 1
    if len(lengths) > start:
        runs.append((start, len(lengths)))
    return runs, hubs


def greedy_count(weights: list[int], isz: int, cap: int) -> int:
    """Fewest tiles for a run: first-fit in row order is optimal for contiguous blocks."""
    count, load = 0, None
    for w in weights:
        if load is None or load + w > cap:
            count, load = count + 1, isz + w
        else:
            load += w
    return count


def check_plan(plan: TilePlan, lengths: list[int]) -> None:
    """Coverage, alignment, fit, minimality, hub splitting and the documented balance bound."""
    isz, vsz = plan.index_dtype.itemsize, plan.value_dtype.itemsize
    indptr = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
    cap = capacity(plan.tile_bytes, plan.alignment)

    # Tiles cover rows and nonzeros in order, back to back, aligned, each fitting its slot.
    assert plan.nnz_start[0:1].tolist() == ([0] if len(plan) else [])
    assert np.array_equal(plan.nnz_start[1:], plan.nnz_stop[:-1])
    assert (plan.nnz_stop[-1] if len(plan) else 0) == indptr[-1]
    assert np.all(plan.offset % plan.alignment == 0) and np.all(plan.nbytes % plan.alignment == 0)
    assert np.array_equal(plan.offset, np.cumsum(plan.nbytes) - plan.nbytes)
    assert np.all(plan.nbytes <= plan.tile_bytes)
    n = plan.row_stop - plan.row_start
    end = array_offsets(n, plan.tile_nnz, isz, vsz)[2]
    assert np.array_equal(plan.nbytes, align_up(end, plan.alignment))
    whole = ~plan.partial
    assert np.array_equal(plan.nnz_start[whole], indptr[plan.row_start[whole]])
    assert np.array_equal(plan.nnz_stop[whole], indptr[plan.row_stop[whole]])

    runs, hubs = runs_and_hubs(lengths, isz, vsz, cap)
    # Hub rows, and only they, are split, into the fewest pieces, even to within one nonzero.
    assert sorted(set(plan.row_start[plan.partial].tolist())) == hubs
    assert np.all(n[plan.partial] == 1)
    max_piece = (cap - 2 * isz) // (isz + vsz)
    for h in hubs:
        pieces = plan.tile_nnz[plan.partial & (plan.row_start == h)]
        assert len(pieces) == -(-lengths[h] // max_piece)
        assert pieces.sum() == lengths[h] and pieces.max() - pieces.min() <= 1

    # Each run between hubs gets the fewest tiles and, when rows are small next to the mean
    # tile, tiles within one heaviest row of the mean.
    weights = [isz + length * (isz + vsz) for length in lengths]
    covered = np.zeros(len(lengths), dtype=int)
    for a, b in runs:
        inside = whole & (plan.row_start >= a) & (plan.row_stop <= b)
        starts, stops = plan.row_start[inside], plan.row_stop[inside]
        covered[a:b] += 1
        assert starts[0] == a and stops[-1] == b and np.array_equal(starts[1:], stops[:-1])
        tiles = len(starts)
        assert tiles == greedy_count(weights[a:b], isz, cap)
        costs = [sum(weights[s:e]) for s, e in zip(starts, stops)]
        mean, heaviest = sum(weights[a:b]) / tiles, max(weights[a:b])
        if mean + heaviest <= cap - isz:
            assert all(abs(c - mean) <= heaviest for c in costs), (costs, mean, heaviest)
    assert whole.sum() == sum(greedy_count(weights[a:b], isz, cap) for a, b in runs)


row_lengths = st.lists(
    st.one_of(st.integers(0, 12), st.integers(0, 200), st.integers(0, 4000)), max_size=300
)


@settings(max_examples=150, deadline=None)
@given(
    lengths=row_lengths,
    tile_bytes=st.sampled_from([4096, 8192, 12288, 20000, 65536]),
    alignment=st.sampled_from([256, 4096]),
    index_dtype=st.sampled_from([np.int32, np.int64]),
    value_dtype=st.sampled_from([np.float32, np.float64, np.float16]),
    block=st.sampled_from([2, 8, 4096]),
)
def test_plan_properties(
    lengths: list[int],
    tile_bytes: int,
    alignment: int,
    index_dtype: type,
    value_dtype: type,
    block: int,
) -> None:
    indptr = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
    # Small search blocks exercise the two-level search a large memmapped indptr takes.
    with (
        mock.patch.object(plan_module, "_BLOCK", block),
        mock.patch.object(plan_module, "_SCAN", block * 4),
    ):
        plan = plan_tiles(
            indptr,
            n_cols=7,
            tile_bytes=tile_bytes,
            alignment=alignment,
            index_dtype=index_dtype,
            value_dtype=value_dtype,
        )
    assert plan.index_dtype == np.dtype(index_dtype) and plan.value_dtype == np.dtype(value_dtype)
    check_plan(plan, lengths)


def test_large_power_law_matrix_from_memmap(tmp_path) -> None:
    rng = np.random.default_rng(0)
    lengths = (rng.pareto(1.3, 50_000) * 3).astype(np.int64)
    lengths[[10, 20_000]] = 30_000  # hubs several tiles long
    indptr = np.lib.format.open_memmap(tmp_path / "indptr.npy", "w+", np.int64, (len(lengths) + 1,))
    indptr[0] = 0
    np.cumsum(lengths, out=indptr[1:])
    plan = plan_tiles(indptr, n_cols=50_000, tile_bytes="16KiB")
    assert len(plan) > 100 and plan.partial.sum() >= 2 * 7
    check_plan(plan, lengths.tolist())


def test_balanced_when_rows_are_small() -> None:
    lengths = np.random.default_rng(1).integers(0, 40, 20_000)
    plan = plan_tiles(np.concatenate(([0], np.cumsum(lengths))), n_cols=100, tile_bytes="64KiB")
    payload = plan.payload
    # Row weights are at most 4 + 39 * 8 = 316 bytes; all tiles sit within that of the mean.
    assert payload.max() - payload.min() <= 2 * 316
    assert plan.nbytes.max() <= 65536


def test_empty_matrices() -> None:
    no_rows = plan_tiles(np.zeros(1, np.int64), n_cols=5)
    assert len(no_rows) == 0 and no_rows.total_bytes == 0 and no_rows.shape == (0, 5)
    empty_rows = plan_tiles(np.zeros(5001, np.int64), n_cols=0, tile_bytes=4096)
    check_plan(empty_rows, [0] * 5000)
    assert empty_rows.nnz == 0 and len(empty_rows) == -(-5000 * 4 // (capacity(4096, 4096) - 4))


def test_single_row_and_single_hub() -> None:
    check_plan(plan_tiles(np.array([0, 3]), n_cols=3, tile_bytes=4096), [3])
    hub = plan_tiles(np.array([0, 10_000]), n_cols=10_000, tile_bytes=4096)
    assert len(hub) == -(-10_000 // ((capacity(4096, 4096) - 8) // 8)) and hub.partial.all()
    check_plan(hub, [10_000])


def test_index_dtype_narrowest_that_fits() -> None:
    indptr = np.array([0, 2, 3])
    assert plan_tiles(indptr, n_cols=2**31 - 1).index_dtype == np.int32
    assert plan_tiles(indptr, n_cols=2**31).index_dtype == np.int64
    assert plan_tiles(indptr, n_cols=5, index_dtype="int64").index_dtype == np.int64
    with pytest.raises(ValueError, match="index_dtype=int32 cannot hold column indices"):
        plan_tiles(indptr, n_cols=2**31, index_dtype=np.int32)


def test_tile_nnz_past_int32_forces_int64() -> None:
    # A tile of more than 2**31 - 1 nonzeros needs a 16 GiB slot; shrink the limit to test it.
    indptr = np.array([0, 50, 300])
    with mock.patch.object(plan_module, "INT32_MAX", 100):
        assert plan_tiles(indptr, n_cols=10, tile_bytes=4096).index_dtype == np.int64
        with pytest.raises(ValueError, match="cannot index a tile of 300 nonzeros"):
            plan_tiles(indptr, n_cols=10, tile_bytes=4096, index_dtype=np.int32)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"alignment": 1000}, ValueError, "alignment must be a power of two >= 256, got 1000"),
        ({"alignment": 128}, ValueError, "alignment must be a power of two >= 256, got 128"),
        ({"tile_bytes": 1024}, ValueError, r"tile_bytes \(1024\) must be at least alignment"),
        ({"tile_bytes": 256, "alignment": 256}, ValueError, "cannot hold even one nonzero"),
        ({"tile_bytes": "lots"}, ValueError, "tile_bytes: cannot parse 'lots'"),
        ({"value_dtype": np.int8}, ValueError, "value_dtype must be one of"),
        ({"index_dtype": np.int16}, ValueError, "index_dtype must be one of"),
        ({"index_dtype": "nonsense"}, TypeError, "index_dtype must be a numpy dtype"),
        ({"n_cols": -1}, ValueError, "n_cols must be non-negative, got -1"),
        ({"n_cols": 2.5}, TypeError, "n_cols must be an int, got 2.5"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, message: str) -> None:
    args = {"n_cols": 3, **kwargs}
    with pytest.raises(error, match=message):
        plan_tiles(np.array([0, 1, 2]), **args)


@pytest.mark.parametrize(
    ("indptr", "error", "message"),
    [
        (np.array([0, 3, 2, 4]), ValueError, r"indptr decreases at row 1 \(3 -> 2\)"),
        (np.array([1, 2]), ValueError, "indptr\\[0\\] must be 0, got 1"),
        (np.array([0.0, 1.0]), TypeError, "indptr must have an integer dtype"),
        (np.zeros((2, 2), np.int64), ValueError, "indptr must be one-dimensional"),
        ([0, 1], TypeError, "indptr must be a numpy array"),
    ],
)
def test_bad_indptr(indptr: np.ndarray, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        plan_tiles(indptr, n_cols=3)
