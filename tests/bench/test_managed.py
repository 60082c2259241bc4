"""The managed-memory allocator shim, compiled here and driven by fake driver functions."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from bench.methods.managed import Shim, build_shim

ALLOC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_size_t,
                         ctypes.c_uint)
FREE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_ulonglong)
ADVISE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_ulonglong, ctypes.c_size_t, ctypes.c_int,
                          ctypes.c_int)
PREFETCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_ulonglong, ctypes.c_size_t, ctypes.c_int,
                            ctypes.c_void_p)


class FakeDriver:
    """``cuMemAllocManaged``, ``cuMemFree``, ``cuMemAdvise`` and ``cuMemPrefetchAsync`` over
    host buffers, recorded."""

    def __init__(self) -> None:
        self.buffers: dict[int, ctypes.Array] = {}
        self.advice: list[tuple[int, int, int, int]] = []
        self.alloc = ALLOC(self._alloc)
        self.free = FREE(lambda ptr: 0)
        self.advise = ADVISE(self._advise)
        self.prefetches: list[tuple[int, int, int]] = []
        self.prefetch = PREFETCH(self._prefetch)

    def _alloc(self, out: ctypes._Pointer, size: int, flags: int) -> int:
        buffer = ctypes.create_string_buffer(size)
        self.buffers[ctypes.addressof(buffer)] = buffer
        out[0] = ctypes.addressof(buffer)
        return 0 if flags == 1 else 1  # CU_MEM_ATTACH_GLOBAL expected

    def _advise(self, ptr: int, size: int, advice: int, device: int) -> int:
        self.advice.append((ptr, size, advice, device))
        return 0

    def _prefetch(self, ptr: int, size: int, device: int, stream: int | None) -> int:
        self.prefetches.append((ptr, size, device))
        return 0

    def shim(self, path: Path, limit: int, device: int = 3) -> Shim:
        address = [ctypes.cast(f, ctypes.c_void_p).value
                   for f in (self.alloc, self.free, self.advise, self.prefetch)]
        return Shim(path, *address, limit=limit, device=device)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory.mktemp("shim"))


def test_the_shim_builds_once_per_source(library: Path) -> None:
    assert library.is_file()
    assert build_shim(library.parent) == library


def test_freed_blocks_are_reused_by_size_and_the_limit_holds(
    tmp_path: Path, library: Path
) -> None:
    # Each test gets its own copy: the shim's state is per loaded library.
    copy = tmp_path / "shim.so"
    copy.write_bytes(library.read_bytes())
    driver = FakeDriver()
    shim = driver.shim(copy, limit=1000)
    malloc, free = shim.lib.aires_uvm_try_malloc, shim.lib.aires_uvm_free
    a = malloc(400, 0, None)
    b = malloc(300, 0, None)
    assert a in driver.buffers and b in driver.buffers
    assert (shim.in_use, shim.held, shim.peak) == (700, 700, 700)
    free(a, 400, 0, None)
    assert malloc(400, 0, None) == a  # same size: the freed block again, no new allocation
    assert len(driver.buffers) == 2
    assert malloc(400, 0, None) is None  # 700 + 400 > 1000: refused, not allocated
    free(b, 300, 0, None)
    assert (shim.in_use, shim.held, shim.peak) == (400, 700, 700)


def test_policies_advise_every_block(tmp_path: Path, library: Path) -> None:
    copy = tmp_path / "shim.so"
    copy.write_bytes(library.read_bytes())
    driver = FakeDriver()
    shim = driver.shim(copy, limit=1 << 20, device=3)
    shim.set_policy("host-preferred")
    ptr = shim.lib.aires_uvm_try_malloc(64, 0, None)
    # Preferred location the CPU (-1), accessed by device 3.
    assert driver.advice == [(ptr, 64, 3, -1), (ptr, 64, 5, 3)]
    assert driver.prefetches == []  # host-preferred moves nothing
    driver.advice.clear()
    shim.set_policy("migrating")  # re-advises the blocks already held: unset both
    assert driver.advice == [(ptr, 64, 4, 3), (ptr, 64, 6, 3)]
    # ... and moves them to the device: mapped for it before, they would never fault there.
    assert driver.prefetches == [(ptr, 64, 3)]
    with pytest.raises(ValueError, match="policy must be one of"):
        shim.set_policy("pinned")
