"""Tier placement: which tiles go where, and the minimum-budget errors."""

from __future__ import annotations

import pytest
import torch

from aires.scheduler import Placement, place
from aires.scheduler.placement import (
    default_gpu_budget,
    default_host_budget,
    format_bytes,
)

SIZES = [100, 100, 100, 100, 100, 100]  # six tiles of 100 bytes; slots are 100 bytes


def test_everything_fits_on_the_device() -> None:
    p = place(SIZES, gpu_budget=300 + 600, host_budget=0, dual=True)
    assert p.resident == tuple(range(6)) and p.host == () and p.disk == ()
    assert p.n_disk == 0  # nothing for a disk path to do
    assert p.gpu_bytes == 900 and p.min_gpu_bytes == 300


def test_tiers_are_filled_in_tile_order() -> None:
    p = place(
        SIZES,
        gpu_budget=300 + 200 + 200,
        host_budget=100,
        disk_workers=2,
        direct_disk=True,
        dual=False,
    )
    # Some tiles must stay on disk, so 2 disk slots join the 3 ring slots (500 bytes): 2 tiles
    # are resident, 1 pinned, 3 on disk.
    assert (p.resident, p.host, p.disk) == ((0, 1), (2,), (3, 4, 5))
    assert p.n_disk == 2 and p.working_gpu_bytes == 500
    assert p.tier(0) == "resident" and p.tier(2) == "host" and p.tier(5) == "disk"
    with pytest.raises(ValueError, match="not in this placement"):
        p.tier(6)


def test_no_disk_path_when_memory_holds_every_tile() -> None:
    p = place(SIZES, gpu_budget=700, host_budget=200, direct_disk=True, dual=False)
    assert (p.resident, p.host, p.disk, p.n_disk) == ((0, 1, 2, 3), (4, 5), (), 0)


def test_host_only_and_disk_only() -> None:
    host_only = place(SIZES, gpu_budget=300, host_budget=600, dual=False)
    assert host_only.host == tuple(range(6)) and host_only.n_disk == 0
    disk_only = place(SIZES, gpu_budget=500, host_budget=0, direct_disk=True)
    assert disk_only.disk == tuple(range(6)) and disk_only.n_disk == 2


def test_dual_keeps_a_disk_path_for_pinned_tiles() -> None:
    p = place(SIZES, gpu_budget=500, host_budget=600, direct_disk=True, dual=True)
    assert p.host == tuple(range(6)) and p.n_disk == 2
    # Without room for disk slots dual-way is dropped, not an error.
    tight = place(SIZES, gpu_budget=300, host_budget=600, direct_disk=True, dual=True)
    assert tight.n_disk == 0 and tight.host == tuple(range(6))


def test_disk_workers_shrink_to_fit() -> None:
    p = place(SIZES, gpu_budget=400, host_budget=0, disk_workers=4, direct_disk=True)
    assert p.n_disk == 1 and p.disk == tuple(range(6))


def test_bounce_buffers_take_host_budget() -> None:
    sizes = [100] * 8
    p = place(sizes, gpu_budget=500, host_budget=450, direct_disk=False, dual=False)
    assert p.staging_host_bytes == 200 and p.resident == ()
    assert p.host == (0, 1) and p.pinned_bytes == 400
    direct = place(sizes, gpu_budget=500, host_budget=450, direct_disk=True, dual=False)
    assert direct.staging_host_bytes == 0 and direct.host == (0, 1, 2, 3)


def test_pinned_memory_is_counted_in_whole_pages() -> None:
    """Page-locking works in pages: with 256-byte pages, each 100-byte tile and 100-byte bounce
    buffer takes a page of the host budget, so the bytes really locked never exceed it."""
    sizes = [100] * 8
    p = place(
        sizes, gpu_budget=500, host_budget=1100, direct_disk=False, dual=False, pinned_page=256
    )
    assert p.staging_host_bytes == 2 * 256 and p.host == (0, 1)
    assert p.host_bytes == 2 * 256 and p.pinned_bytes == 1024 <= 1100
    # Too little for one page-rounded bounce buffer: refused up front, naming the minimum.
    with pytest.raises(ValueError, match=r"host_budget=200 bytes .* minimum of 256 bytes"):
        place(sizes, gpu_budget=500, host_budget=200, pinned_page=256, dual=False)
    with pytest.raises(ValueError, match="pinned_page must be an int >= 1, got 0"):
        place(sizes, gpu_budget=500, host_budget=200, pinned_page=0)


def test_reserve_comes_before_resident_tiles() -> None:
    # Two disk slots would not fit beside the reserve; one does, and leaves no room for tiles.
    p = place(SIZES, gpu_budget=900, host_budget=0, reserve_bytes=450, direct_disk=True)
    assert p.reserve_bytes == 450 and p.n_disk == 1 and p.resident == ()
    assert p.min_gpu_bytes == 300 + 100 + 450


def test_too_small_a_gpu_budget_states_the_minimum() -> None:
    with pytest.raises(
        ValueError,
        match=r"gpu_budget=299 bytes .*minimum working set of 300 bytes \(300 B\): 3 slots of",
    ):
        place(SIZES, gpu_budget=299, host_budget=10**6, dual=False)
    sizes = [64 << 20] * 4
    with pytest.raises(
        ValueError, match=r"of 268435456 bytes \(256\.0 MiB\): 3 slots \+ 1 disk slot of 64\.0 MiB"
    ):
        place(sizes, gpu_budget="200MiB", host_budget=0, direct_disk=True)


def test_too_small_a_host_budget_for_bounce_buffers() -> None:
    with pytest.raises(ValueError, match=r"host_budget=50 bytes .*minimum of 100 bytes .*bounce"):
        place(SIZES, gpu_budget=400, host_budget=50, direct_disk=False)


def test_budgets_accept_size_strings() -> None:
    p = place([1024] * 8, gpu_budget="5KiB", host_budget="3 KiB", direct_disk=True, dual=False)
    assert p.gpu_budget == 5 * 1024 and p.host_budget == 3 * 1024
    # 3 ring slots + 2 disk slots take the 5 KiB; 3 tiles are pinned, 5 stay on disk.
    assert (len(p.resident), len(p.host), len(p.disk)) == (0, 3, 5)
    with pytest.raises(ValueError, match="gpu_budget"):
        place(SIZES, gpu_budget="much", host_budget=0)


@pytest.mark.parametrize("bad", [2, 0, 3.0, True])
def test_slots_must_be_at_least_three(bad: object) -> None:
    with pytest.raises(ValueError, match="slots must be an int >= 3"):
        place(SIZES, gpu_budget=10**6, host_budget=0, slots=bad)  # type: ignore[arg-type]


def test_no_tiles() -> None:
    p = place([], gpu_budget=1, host_budget=0)
    assert isinstance(p, Placement) and p.slot_bytes == 0 and p.resident == ()


def test_defaults_are_positive() -> None:
    assert default_host_budget() > 0
    assert default_gpu_budget(torch.device("cpu")) > 0


@pytest.mark.gpu
def test_default_gpu_budget_leaves_a_margin() -> None:
    free, _ = torch.cuda.mem_get_info()
    assert 0 < default_gpu_budget(torch.device("cuda")) <= free - (512 << 20)


def test_format_bytes() -> None:
    assert format_bytes(300) == "300 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(64 << 20) == "64.0 MiB"
    assert format_bytes(3 << 40) == "3.0 TiB"
