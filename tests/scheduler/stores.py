"""Helpers shared by the scheduler tests: a matrix with hub rows and budgets that force tiers.

The matrix (sketch): 300 x 500, ~10 nonzeros per row, two hub rows (rows 5 and 123, 480
entries each) longer than a tile, so each is split into partial tiles that must be summed, and
rows 200-219 empty. Tiles are ~2 KiB, so the matrix spans dozens of tiles.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp
import torch

from aires.scheduler import Scheduler, spmm_reserve
from aires.scheduler.transfer import PAGE
from aires.tiling import TileStore

TILE_BYTES = 2048
ALIGNMENT = 256


def hub_matrix(
    seed: int = 0,
    shape: tuple[int, int] = (300, 500),
    hubs: tuple[int, ...] = (5, 123),
    empty: tuple[int, int] = (200, 220),
) -> sp.csr_array:
    """Random CSR with hub rows longer than a tile (480 entries) and a block of empty rows."""
    rng = np.random.default_rng(seed)
    a = sp.random_array(shape, density=0.02, random_state=rng, format="lil")
    for hub in hubs:
        cols = rng.choice(shape[1], size=min(480, shape[1]), replace=False)
        a[hub, cols] = rng.standard_normal(cols.size)
    a = sp.csr_array(a)
    a[empty[0] : empty[1]] = 0
    a.eliminate_zeros()
    return sp.csr_array(a)


def tier_budgets(
    store: TileStore,
    *,
    resident: int,
    host: int,
    reserve: int,
    disk_workers: int = 2,
    bounce: bool = False,
    device: str = "cpu",
) -> tuple[int, int]:
    """``(gpu_budget, host_budget)`` placing exactly the first ``resident`` tiles on the device,
    the next ``host`` in host memory and the rest on disk (``dual=False``). ``bounce``: disk
    reads go through pinned bounce buffers (POSIX on a GPU), which the host budget pays for.
    On CUDA pinned memory is locked in whole pages, each pinned tile and bounce buffer
    rounded up to one (``Placement.pinned_page``)."""
    sizes = [t.nbytes for t in store.tiles]
    slot = max(sizes)
    page = PAGE if device == "cuda" else 1
    pinned = [-(-n // page) * page for n in sizes]
    n_disk = disk_workers if resident + host < len(sizes) else 0
    gpu = (3 + n_disk) * slot + reserve + sum(sizes[:resident])
    staging = n_disk * (-(-slot // page) * page) if bounce else 0
    return gpu, sum(pinned[resident : resident + host]) + staging


def bounces(store: TileStore, device: str) -> bool:
    """Whether disk reads for ``device`` go through pinned bounce buffers."""
    return device == "cuda" and store.io_mode == "posix"


def reserve_of(store: TileStore, f: int, out: str | None = None, device: str = "cpu") -> int:
    """The device reserve an ``spmm`` with ``f`` float64 columns needs (no scheduler made)."""
    return spmm_reserve(store, f, torch.float64, device=device, out=out)


def spgemm_budgets(
    store: TileStore, x: torch.Tensor, *, resident: int, host: int, out: str | None = None
) -> tuple[int, int]:
    """Like :func:`tier_budgets` for an ``spgemm`` with ``x`` and ``out``, whose reserve (the
    scheduler's own :meth:`~aires.scheduler.Scheduler.spgemm_reserve` on ``x``'s device: the
    operand, a quarter of the budget, and the result's room unless ``out="host"``) depends on
    the budget: iterate ``budget = base + reserve(budget)`` to its fixed point."""
    gpu, host_bytes = tier_budgets(
        store,
        resident=resident,
        host=host,
        reserve=0,
        bounce=bounces(store, x.device.type),
        device=x.device.type,
    )
    base = gpu
    for _ in range(60):
        probe = Scheduler(store, gpu_budget=gpu, host_budget="1GiB", device=x.device)
        nxt = base + probe.spgemm_reserve(x, out=out)
        if nxt == gpu:
            break
        gpu = nxt
    return gpu, host_bytes


def flip_byte(store: TileStore, tile: int, where: float = 0.5) -> None:
    """Flip one bit of ``tile`` in the store's data file (through the page cache readers see)."""
    info = store.tile_info(tile)
    offset = info.offset + min(int(info.nbytes * where), info.nbytes - 1)
    with open(store.data_path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))
        f.flush()
        os.fsync(f.fileno())  # for reads that bypass the page cache (GDS)
