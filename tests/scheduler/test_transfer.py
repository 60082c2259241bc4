"""The dispatcher's rule with fake throughputs, and the copy paths on the CPU."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from aires.scheduler import Dispatcher
from aires.scheduler.stats import Recorder
from aires.scheduler.transfer import (
    HUGE_PAGE,
    LARGE_PINNED,
    DiskPath,
    HostPath,
    WriteBack,
    copy_rate,
    host_pages,
    pinned_empty,
    word_sum,
)
from aires.tiling import TileCorruptError, TileStore

from .stores import flip_byte


def test_steal_when_disk_delivers_before_host_reaches_the_tile() -> None:
    d = Dispatcher(host_rate=10.0, disk_rate=5.0)
    # Host needs 30/10 = 3 s to reach the last tile; disk delivers 10 bytes in 2 s.
    assert d.steal(10, host_remaining=30)
    # Host needs 1.5 s; disk would need 2 s.
    assert not d.steal(10, host_remaining=15)
    # A tie goes to the host path.
    assert not d.steal(10, host_remaining=20)


def test_nothing_is_stolen_over_a_shared_link() -> None:
    """A GPU's host DMA saturates the PCIe link the disk path's bytes also cross: however fast
    the disk, a steal cannot end the host path sooner."""
    d = Dispatcher(host_rate=10.0, disk_rate=1e12, shared_link=True)
    assert not d.steal(10, host_remaining=10**9)
    assert Dispatcher(host_rate=10.0, disk_rate=1e12).steal(10, host_remaining=10**9)


def test_an_unmeasured_disk_path_steals_only_what_a_cold_read_would_win() -> None:
    """The H100 case: 33 pinned 16 MiB tiles (10 ms of host DMA at 54.7 GB/s) and a cold disk
    at 1.2 GB/s (14 ms a tile). Unmeasured, the disk is assumed cold and steals nothing; once
    a read measures a fast disk (page cache), it steals; the measured rate is kept over a
    later prior."""
    tile = 16 << 20
    d = Dispatcher(host_rate=54.7e9)
    assert d.measured == set()
    assert not d.steal(tile, host_remaining=33 * tile)
    # A queue long enough that even a cold read of its last tile wins.
    assert d.steal(tile, host_remaining=1000 * tile)
    d.update("disk", tile, tile / 8e9)
    assert d.measured == {"disk"}
    assert d.steal(tile, host_remaining=33 * tile)
    d.prime("disk", 1.0)  # a prior never overrides a measurement
    d.prime("host", 1e9)  # but sets an unmeasured path's rate
    assert d.rates["disk"] > 1e9 and d.rates["host"] == 1e9


def simulate(d: Dispatcher, n_tiles: int) -> tuple[int, int]:
    """Run the rule in time as the pipeline does, for ``n_tiles`` one-byte tiles in pinned
    memory: the host path drains its queue from the front at its rate while one disk worker,
    each time it is free, asks for the queue's last tile.

    Returns:
        Tiles delivered by the host path and by the disk path.
    """
    queue, stolen, t = n_tiles, 0, 0.0
    while True:
        remaining = queue - t * d.rates["host"]  # host bytes not yet delivered at time t
        if remaining <= 0 or not d.steal(1, remaining):
            return queue, stolen
        queue -= 1
        stolen += 1
        t += d.eta("disk", 1)


@pytest.mark.parametrize(
    ("host_rate", "disk_rate", "expected"),
    [(1.0, 1.0, (5, 5)), (3.0, 1.0, (8, 2)), (1.0, 1e-9, (10, 0)), (1e-9, 1.0, (0, 10))],
)
def test_both_paths_finish_together(
    host_rate: float, disk_rate: float, expected: tuple[int, int]
) -> None:
    d = Dispatcher(host_rate=host_rate, disk_rate=disk_rate)
    assert simulate(d, 10) == expected


def test_rates_are_moving_averages() -> None:
    d = Dispatcher(host_rate=100.0, disk_rate=10.0, smoothing=0.5)
    d.update("disk", 30, 1.0)
    assert d.rates["disk"] == pytest.approx(20.0)
    d.update("host", 50, 1.0)
    assert d.rates["host"] == pytest.approx(75.0)
    d.update("host", 0, 1.0)  # nothing measured: no change
    d.update("host", 10, 0.0)
    assert d.rates["host"] == pytest.approx(75.0)
    assert d.eta("disk", 40) == pytest.approx(2.0)


@pytest.mark.parametrize("kw", [{"smoothing": 0.0}, {"smoothing": 1.5}, {"disk_rate": 0.0}])
def test_dispatcher_rejects_bad_arguments(kw: dict[str, float]) -> None:
    args = {"host_rate": 1.0, **kw}
    with pytest.raises(ValueError):
        Dispatcher(**args)


def test_host_path_and_write_back_copy_bytes_exactly() -> None:
    rec = Recorder("spmm", torch.device("cpu"), "cpu", 1)
    src = torch.arange(100, dtype=torch.uint8)
    slot = torch.zeros(128, dtype=torch.uint8)
    assert HostPath(torch.device("cpu")).load(slot, src, None, rec) is None
    assert torch.equal(slot[:100], src) and not slot[100:].any()
    dst = torch.zeros(100, dtype=torch.uint8)
    WriteBack(torch.device("cpu")).copy(dst, slot[:100], None, rec)
    assert torch.equal(dst, src)
    stats = rec.finish()
    assert stats.bytes_h2d == 100 and stats.bytes_d2h == 100


def test_copy_rate_and_pinned_empty_on_cpu() -> None:
    buf = pinned_empty(1 << 16, torch.device("cpu"))
    assert buf.numel() == 1 << 16 and buf.dtype == torch.uint8 and not buf.is_pinned()
    assert copy_rate(torch.empty_like(buf), buf) > 0


def test_word_sum_is_the_sum_of_64_bit_words() -> None:
    """Against numpy's wrapping uint64 sum, and any one flipped bit changes it."""
    rng = np.random.default_rng(3)
    buf = torch.from_numpy(rng.integers(0, 256, 4096, dtype=np.uint8))
    expected = int(buf.numpy().view(np.uint64).sum(dtype=np.uint64))
    assert word_sum(buf) == expected
    for k in rng.choice(buf.numel(), 64, replace=False):
        bit = int(rng.integers(8))
        buf[k] ^= 1 << bit
        assert word_sum(buf) != expected
        buf[k] ^= 1 << bit
    with pytest.raises(ValueError, match="multiple of 8 bytes long, got 12 bytes"):
        word_sum(buf[:12])


def disk_path(store: TileStore, crc_every_read: bool | None) -> DiskPath:
    return DiskPath(
        store, torch.device("cpu"), None, Dispatcher(1e9), crc_every_read=crc_every_read
    )


def fetch(path: DiskPath, store: TileStore, tile: int) -> torch.Tensor:
    slot = torch.zeros(store.max_tile_nbytes, dtype=torch.uint8)
    rec = Recorder("spmm", torch.device("cpu"), "cpu", len(store))
    path.fetch(0, tile, store.tile_info(tile).nbytes, slot, None, rec)
    return slot[: store.tile_info(tile).nbytes]


def test_disk_path_checks_first_reads_by_crc_and_later_ones_by_word_sum(
    make_store: Callable[..., TileStore],
) -> None:
    """The GPU (KvikIO) rule, run on the CPU: a tile's first read is CRC-checked and gives
    the word sum every later read must match; either check names the tile and the path."""
    store = make_store()
    path = disk_path(store, crc_every_read=False)
    good = fetch(path, store, 2).clone()
    host = np.empty(store.max_tile_nbytes, np.uint8)
    store.read_bytes(2, host)
    assert torch.equal(good, torch.from_numpy(host[: good.numel()]))
    flip_byte(store, 2)
    with pytest.raises(TileCorruptError, match=r"tile 2 of .*word sum.*\(read by the disk path"):
        fetch(path, store, 2)
    flip_byte(store, 3)
    with pytest.raises(TileCorruptError, match=r"tile 3 of .*CRC-32.*\(read by the disk path"):
        fetch(path, store, 3)
    assert disk_path(store, crc_every_read=None).crc_every_read  # host memory: CRC each read


@pytest.mark.gpu
def test_reads_into_gpu_memory_queue_their_sums_and_the_call_compares_them(
    make_store: Callable[..., TileStore],
) -> None:
    """A read into GPU memory after the first is summed on the device where its compute is
    queued, without the worker waiting, and :meth:`DiskPath.verify` (the end of the
    scheduler's call) raises for a tile changed since its first read, naming it."""
    store = make_store()
    dev = torch.device("cuda")
    path = DiskPath(store, dev, None, Dispatcher(1e9), crc_every_read=False)
    slot = torch.zeros(store.max_tile_nbytes, dtype=torch.uint8, device=dev)
    rec = Recorder("spmm", dev, store.io_mode, len(store))
    nbytes = store.tile_info(2).nbytes
    seen = []
    compute = path.checked(0, lambda tile, buf: seen.append(tile))
    for _ in range(2):  # the first read is checked at once, the second by its queued sum
        path.fetch(0, 2, nbytes, slot, None, rec)
        compute(2, slot)
    path.verify()
    flip_byte(store, 2)
    path.fetch(0, 2, nbytes, slot, None, rec)
    compute(2, slot)
    assert seen == [2, 2, 2]
    with pytest.raises(TileCorruptError, match=r"tile 2 of .*word sum.*\(read by the disk path"):
        path.verify()
    path.verify()  # the sums were compared once


@pytest.mark.gpu
def test_gpu_paths_are_bit_exact() -> None:
    dev = torch.device("cuda")
    rec = Recorder("spmm", dev, "posix", 1)
    src = pinned_empty(1 << 20, dev)
    # Locked with cudaHostRegister, so the budget counts its exact pages; torch's is_pinned()
    # does not report such memory (seen on the H200, 2026-11-30), so it is not asserted here.
    src.copy_(torch.randint(0, 255, (1 << 20,), dtype=torch.uint8))
    slot = torch.zeros(1 << 21, dtype=torch.uint8, device=dev)
    ready = HostPath(dev).load(slot, src, None, rec)
    torch.cuda.current_stream().wait_event(ready)
    back = pinned_empty(1 << 20, dev)
    done = WriteBack(dev).copy(back, slot[: 1 << 20], ready, rec)
    done.synchronize()
    assert torch.equal(back, src)
    assert copy_rate(slot[: 1 << 20], src) > 1e9


def test_host_pages_are_aligned_zeroed_and_writable() -> None:
    block = host_pages(3 * HUGE_PAGE + 4096)
    assert block.numel() == 3 * HUGE_PAGE + 4096 and block.data_ptr() % HUGE_PAGE == 0
    assert int(block.count_nonzero()) == 0
    block[-1] = 7
    assert int(block.sum()) == 7


@pytest.mark.gpu
def test_large_pinned_buffers_round_trip_through_the_gpu() -> None:
    """A buffer from :data:`LARGE_PINNED` on (huge pages, faulted in by threads, then locked)
    copies to the device and back bit for bit, at a pinned buffer's rate."""
    dev = torch.device("cuda")
    src = pinned_empty(LARGE_PINNED, dev)
    src.copy_(torch.randint(0, 255, (LARGE_PINNED,), dtype=torch.uint8))
    slot = torch.empty(LARGE_PINNED, dtype=torch.uint8, device=dev)
    assert copy_rate(slot, src) > 10e9  # pageable memory would be staged, at a few GB/s
    back = torch.empty_like(src)
    back.copy_(slot)
    assert torch.equal(back, src)
