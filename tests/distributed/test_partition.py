"""Row ranges on tile boundaries against a brute-force search, and a rank's view of the store
against scipy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from aires.distributed import RowRangeStore, row_ranges, tile_cuts
from aires.scheduler import Scheduler
from aires.tiling import build_store

N_HUB = 1200  # a full row of this many float32 entries fills more than one 4 KiB tile


def symmetric(n: int, density: float, seed: int, hub: int | None = None) -> sp.csr_array:
    """A random symmetric matrix; ``hub``: a row (and column) with every entry set."""
    rng = np.random.default_rng(seed)
    a = sp.random(n, n, density=density, random_state=rng, format="csr")
    if hub is not None:
        a = sp.lil_matrix(a)
        a[hub, :] = 1.0
        a = sp.csr_matrix(a)
    a = a + a.T + sp.identity(n)
    return sp.csr_array(a.astype(np.float32))


@pytest.fixture
def store(tmp_path: Path):
    return build_store(symmetric(300, 0.05, 0), tmp_path / "a", tile_bytes=4096,
                       symmetric=True, progress=False)


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_ranges_are_the_best_split_at_tile_boundaries(store, parts: int) -> None:
    """No choice of cuts gives a smaller largest deviation from ``nnz / parts`` than ours, one
    cut at a time (each cut is the one closest to its share)."""
    tiles, n = store.tiles, store.shape[0]
    ranges = row_ranges(tiles, n, parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a < b for a, b in ranges)
    assert all(ranges[k][1] == ranges[k + 1][0] for k in range(parts - 1))
    cuts, before = tile_cuts(tiles)
    nnz = {int(c): int(b) for c, b in zip(cuts, before, strict=True)}
    total = store.nnz
    for k, (_, stop) in enumerate(ranges[:-1], start=1):
        best = min(abs(b - total * k / parts) for b in before)
        assert abs(nnz[stop] - total * k / parts) == best
    if parts == 2:  # the brute force over every cut
        best = min(max(b, total - b) for b in before)
        assert max(nnz[ranges[0][1]], total - nnz[ranges[0][1]]) == best


def test_a_split_never_falls_inside_a_hub_row(tmp_path: Path) -> None:
    """Row 150 fills several 4 KiB tiles (``partial``): one range holds all its pieces."""
    hub = build_store(symmetric(N_HUB, 0.002, 1, hub=150), tmp_path / "h", tile_bytes=4096,
                      symmetric=True, progress=False)
    pieces = [t for t in hub.tiles if t.partial]
    assert len(pieces) > 1 and {t.row_start for t in pieces} == {150}
    for parts in range(2, 6):
        owners = [k for k, (a, b) in enumerate(row_ranges(hub.tiles, N_HUB, parts))
                  if a <= 150 < b]
        assert len(owners) == 1
        a, b = row_ranges(hub.tiles, N_HUB, parts)[owners[0]]
        assert RowRangeStore(hub, a, b).nnz == sum(t.nnz for t in hub.tiles
                                                  if a <= t.row_start < b)


def test_too_many_parts_names_the_boundaries(store) -> None:
    cuts, _ = tile_cuts(store.tiles)
    with pytest.raises(ValueError, match=rf"parts={len(cuts) + 2}: .* only {len(cuts)} row"):
        row_ranges(store.tiles, store.shape[0], len(cuts) + 2)


@pytest.mark.parametrize("hub", [None, 150])
def test_a_ranks_tiles_give_its_rows_of_the_product(tmp_path: Path, hub: int | None) -> None:
    matrix = sp.csr_array(symmetric(N_HUB, 0.002, 2, hub=hub).astype(np.float64))
    whole = build_store(matrix, tmp_path / "s", tile_bytes=4096, symmetric=True,
                        progress=False)
    x = torch.from_numpy(
        np.random.default_rng(3).standard_normal((N_HUB, 5)))
    want = matrix @ x.numpy()
    for a, b in row_ranges(whole.tiles, N_HUB, 3):
        view = RowRangeStore(whole, a, b)
        assert view.shape == (b - a, N_HUB)
        assert view.nnz == matrix[a:b].nnz
        with Scheduler(view, device="cpu", gpu_budget=1 << 20, host_budget=1 << 14) as s:
            got = s.spmm(x)
        np.testing.assert_allclose(got.numpy(), want[a:b], rtol=1e-12, atol=1e-12)


def test_a_range_that_cuts_a_tile_is_refused(store) -> None:
    inside = next(t for t in store.tiles if t.n_rows > 1)
    with pytest.raises(ValueError, match=r"rows \[0, \d+\) cut a tile"):
        RowRangeStore(store, 0, inside.row_start + 1)


def test_every_cut_is_a_tile_start_that_no_tile_spans(store) -> None:
    cuts, _ = tile_cuts(store.tiles)
    for c in cuts:
        assert any(t.row_start == c for t in store.tiles)
        assert not any(t.row_start < c < t.row_stop for t in store.tiles)
    assert np.all(np.diff(cuts) > 0)
