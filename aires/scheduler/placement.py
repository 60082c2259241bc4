"""Tier placement: which tiles stay on the device, which in pinned host memory, which on NVMe.

Placement happens once per store and budget (DESIGN.md, "Scheduler"). The device budget first
pays for the fixed working set (a ring of ``slots`` tile-sized buffers for the host path, one
buffer per disk worker for the NVMe path, and the reserve for the output and kernel workspace);
what is left holds phase-1 tiles, which never move again. The host budget pays for the disk
path's pinned bounce buffers and then holds phase-2 tiles. Every other tile is phase 3, read
from the tile file on each use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aires.checks import format_bytes, memory_available, parse_size

__all__ = ["Placement", "place", "default_gpu_budget", "default_host_budget", "format_bytes"]

#: The least number of device slots: one being filled, one being computed, one free.
MIN_SLOTS = 3


@dataclass(frozen=True)
class Placement:
    """Where each tile lives and what the fixed working set costs.

    Attributes:
        slot_bytes: Size of one slot: the largest tile's ``nbytes`` (a multiple of the store's
            alignment, so whole-tile direct reads are legal).
        n_slots: Device slots in the host path's ring (at least 3).
        n_disk: Disk workers; each owns one device slot (and, unless reads go straight to the
            device, one pinned bounce buffer). 0 when no tile ever takes the disk path.
        direct_disk: Whether disk reads land straight in device slots (GDS or KvikIO), so the
            disk path needs no host bounce buffers.
        reserve_bytes: Device bytes kept free for the output and kernel workspace.
        resident, host, disk: Tile indices of phases 1, 2 and 3, in tile order.
        resident_bytes: Bytes of the phase-1 tiles.
        host_bytes: Pinned bytes of the phase-2 tiles, each rounded up to ``pinned_page``.
        gpu_budget, host_budget: The budgets this placement was made for.
        pinned_page: Granularity of pinned host memory: each pinned tile and the bounce
            buffers take whole pages of it (1 where nothing is pinned).
    """

    slot_bytes: int
    n_slots: int
    n_disk: int
    direct_disk: bool
    reserve_bytes: int
    resident: tuple[int, ...]
    host: tuple[int, ...]
    disk: tuple[int, ...]
    resident_bytes: int
    host_bytes: int
    gpu_budget: int
    host_budget: int
    pinned_page: int = 1

    @property
    def working_gpu_bytes(self) -> int:
        """Device bytes of the slots alone (host ring plus one slot per disk worker)."""
        return (self.n_slots + self.n_disk) * self.slot_bytes

    @property
    def min_gpu_bytes(self) -> int:
        """The least device budget that runs: slots plus the output and workspace reserve."""
        return self.working_gpu_bytes + self.reserve_bytes

    @property
    def gpu_bytes(self) -> int:
        """Device bytes this placement holds at most: working set, reserve, resident tiles."""
        return self.min_gpu_bytes + self.resident_bytes

    @property
    def staging_host_bytes(self) -> int:
        """Pinned bounce buffers of the disk path (none when reads go straight to the device)."""
        return 0 if self.direct_disk else self.n_disk * self.pinned_slot_bytes

    @property
    def pinned_slot_bytes(self) -> int:
        """A slot's bytes rounded up to :attr:`pinned_page`: one pinned bounce buffer."""
        return round_up(self.slot_bytes, self.pinned_page)

    @property
    def pinned_bytes(self) -> int:
        """Pinned host bytes this placement holds: phase-2 tiles and bounce buffers."""
        return self.host_bytes + self.staging_host_bytes

    def tier(self, tile: int) -> str:
        """``"resident"``, ``"host"`` or ``"disk"``: the phase of ``tile``."""
        if tile in self.resident:
            return "resident"
        if tile in self.host:
            return "host"
        if tile in self.disk:
            return "disk"
        raise ValueError(f"tile {tile} is not in this placement")


def place(
    tile_nbytes: Sequence[int],
    *,
    gpu_budget: int | str,
    host_budget: int | str,
    slots: int = MIN_SLOTS,
    disk_workers: int = 2,
    direct_disk: bool = False,
    reserve_bytes: int = 0,
    dual: bool = True,
    pinned_page: int = 1,
) -> Placement:
    """Place tiles on the device, in pinned host memory or on NVMe under two budgets.

    Tiles are taken in order: the first ones that fit the device budget stay resident, the
    next ones that fit the host budget are pinned, the rest stay on NVMe. Every tile is used
    once per product, so which tiles are resident does not change the bytes moved; taking
    them in order keeps the placement stable and predictable.

    Args:
        tile_nbytes: Each tile's ``nbytes`` (aligned length in the tile file).
        gpu_budget: Device bytes (or a size string) the scheduler may allocate.
        host_budget: Pinned host bytes (or a size string) for phase-2 tiles and bounce buffers.
        slots: Device slots in the host path's ring, at least 3.
        disk_workers: Concurrent disk reads, each with its own slot (at least 1).
        direct_disk: Disk reads land in device slots directly (no host bounce buffers).
        reserve_bytes: Device bytes to keep free for the output and kernel workspace.
        dual: Keep the disk path available even when every tile fits in memory, so the
            dispatcher can send some tiles over both paths at once.
        pinned_page: Pinned host memory is locked in whole pages of this size: each pinned
            tile and bounce buffer counts against ``host_budget`` rounded up to it, so the
            bytes really locked stay within the budget.

    Returns:
        The :class:`Placement`.

    Raises:
        ValueError: a budget is below the minimum working set (the message states the minimum
            in bytes and in binary units), or ``slots``/``disk_workers`` is too small.
    """
    gpu = parse_size(gpu_budget, "gpu_budget")
    host = parse_size(host_budget, "host_budget", allow_zero=True)
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < MIN_SLOTS:
        raise ValueError(f"slots must be an int >= {MIN_SLOTS}, got {slots!r}")
    if isinstance(disk_workers, bool) or not isinstance(disk_workers, int) or disk_workers < 1:
        raise ValueError(f"disk_workers must be an int >= 1, got {disk_workers!r}")
    reserve = parse_size(reserve_bytes, "reserve_bytes", allow_zero=True)
    if isinstance(pinned_page, bool) or not isinstance(pinned_page, int) or pinned_page < 1:
        raise ValueError(f"pinned_page must be an int >= 1, got {pinned_page!r}")
    sizes = [int(n) for n in tile_nbytes]
    slot_bytes = max(sizes, default=0)

    def staging(n_disk: int) -> int:
        return 0 if direct_disk else n_disk * round_up(slot_bytes, pinned_page)

    def minimum(n_disk: int) -> int:
        return (slots + n_disk) * slot_bytes + reserve

    def fits(n_disk: int) -> bool:
        return gpu >= minimum(n_disk) and host >= staging(n_disk)

    def attempt(n_disk: int) -> Placement:
        room_gpu = gpu - minimum(n_disk)
        room_host = host - staging(n_disk)
        resident: list[int] = []
        pinned: list[int] = []
        disk: list[int] = []
        for tile, nbytes in enumerate(sizes):
            if nbytes <= room_gpu:
                resident.append(tile)
                room_gpu -= nbytes
            elif round_up(nbytes, pinned_page) <= room_host:
                pinned.append(tile)
                room_host -= round_up(nbytes, pinned_page)
            else:
                disk.append(tile)
        return Placement(
            slot_bytes=slot_bytes,
            n_slots=slots,
            n_disk=n_disk,
            direct_disk=direct_disk,
            reserve_bytes=reserve,
            resident=tuple(resident),
            host=tuple(pinned),
            disk=tuple(disk),
            resident_bytes=sum(sizes[t] for t in resident),
            host_bytes=sum(round_up(sizes[t], pinned_page) for t in pinned),
            gpu_budget=gpu,
            host_budget=host,
            pinned_page=pinned_page,
        )

    without = attempt(0) if fits(0) else None
    if without is not None and not without.disk and not (dual and without.host):
        return without
    # The disk path is needed (phase-3 tiles) or wanted (dual-way over pinned tiles): give it
    # as many workers as fit, down to one.
    for n_disk in range(disk_workers, 0, -1):
        if fits(n_disk):
            return attempt(n_disk)
    if without is not None and not without.disk:
        return without
    # At the minimum no tile is resident: a disk slot is part of it unless host memory
    # holds every tile.
    n_disk = 1 if sum(round_up(n, pinned_page) for n in sizes) > host else 0
    if gpu < minimum(n_disk):
        parts = f"{slots} slots"
        if n_disk:
            parts += " + 1 disk slot"
        raise ValueError(
            f"gpu_budget={gpu} bytes ({format_bytes(gpu)}) is below the minimum working set "
            f"of {minimum(n_disk)} bytes ({format_bytes(minimum(n_disk))}): {parts} of "
            f"{format_bytes(slot_bytes)} plus {format_bytes(reserve)} reserved for the output "
            "and workspace"
        )
    raise ValueError(
        f"host_budget={host} bytes ({format_bytes(host)}) is below the minimum of "
        f"{staging(n_disk)} bytes ({format_bytes(staging(n_disk))}) for the disk path's pinned "
        "bounce buffer"
    )


def round_up(nbytes: int, granularity: int) -> int:
    """``nbytes`` rounded up to a multiple of ``granularity``."""
    return -(-nbytes // granularity) * granularity


def default_gpu_budget(device: torch.device) -> int:
    """The device budget when none is given.

    On CUDA: the free device memory (``torch.cuda.mem_get_info``) less a margin of
    max(512 MiB, 10%) for the caching allocator's rounding, cuSPARSE handles and the caller's
    own tensors. On the CPU: a quarter of the available RAM.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(int(free - max(512 << 20, free // 10)), 1)
    return max(memory_available() // 4, 1)


def default_host_budget() -> int:
    """The host budget when none is given: half of the available RAM."""
    return max(memory_available() // 2, 1)
