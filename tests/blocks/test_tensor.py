"""Panels round-trip through every tier, and NVMe transfers split into an ``O_DIRECT`` middle
and page-cache ends exactly covering the bytes asked for."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aires.blocks import PanelTensor, Traffic
from aires.blocks.tensor import PAGE_ROWS, Arenas, _pieces, aligned_empty

ALIGN = 4096


def _aligned(nbytes: int) -> torch.Tensor:
    """Host bytes starting at a 4 KiB boundary (what pinned buffers are on a GPU)."""
    out = aligned_empty(nbytes)
    assert out.data_ptr() % ALIGN == 0 and out.numel() == nbytes
    return out


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(0, 5 * ALIGN),
    offset=st.integers(0, 4 * ALIGN),
    shift=st.integers(0, ALIGN - 1),
    direct=st.booleans(),
)
def test_pieces_cover_the_transfer_with_an_aligned_direct_middle(
    size: int, offset: int, shift: int, direct: bool
) -> None:
    memory = _aligned(size + ALIGN)[shift : shift + size].numpy()
    pieces = _pieces(3, 4 if direct else None, memory, offset)
    at = offset
    base = memory.ctypes.data
    for fd, view, where in pieces:
        assert where == at and view.ctypes.data == base + (at - offset) and view.size > 0
        if fd == 4:
            assert view.ctypes.data % ALIGN == where % ALIGN == view.size % ALIGN == 0
        at += view.size
    assert at == offset + size
    if not direct or (memory.ctypes.data - offset) % ALIGN:
        assert all(fd == 3 for fd, _, _ in pieces)
    elif size - (-offset % ALIGN) >= ALIGN:
        assert any(fd == 4 for fd, _, _ in pieces)


@pytest.mark.parametrize("via", ["flush", "write_host"])
@pytest.mark.parametrize("rows", [3 * PAGE_ROWS, 3 * PAGE_ROWS + 77])
def test_disk_panels_round_trip_by_blocks_aligned_or_not(tmp_path, rows: int, via: str) -> None:
    """Blocks written at page-row starts (direct) and at odd rows (page cache) read back
    exactly, through aligned and unaligned buffers, and the traffic counts every byte."""
    cols, panels = 10, [(0, 4), (4, 10)]
    nbytes = [rows * (c1 - c0) * 4 for c0, c1 in panels]
    offsets = [0, -(-nbytes[0] // ALIGN) * ALIGN]
    arenas = Arenas.allocate(torch.device("cpu"), 0, 0, offsets[1] + nbytes[1], tmp_path,
                             lambda n: torch.empty(n, dtype=torch.uint8))
    traffic = Traffic()
    t = PanelTensor("z", rows, cols, panels, ["disk", "disk"], offsets, torch.float32,
                    torch.device("cpu"), arenas, traffic)
    want = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    starts = [0, PAGE_ROWS, 2 * PAGE_ROWS + 5, 2 * PAGE_ROWS + 900, rows]
    for p, (c0, c1) in enumerate(panels):
        for r0, r1 in zip(starts, starts[1:]):
            if via == "write_host":  # set-up's path: any host tensor, staged aligned
                t.write_host(p, r0, want[r0:r1, c0:c1].contiguous())
                continue
            bounce = _aligned(t.panel_bytes(p, r1 - r0))
            bounce.view(torch.float32).copy_(want[r0:r1, c0:c1].reshape(-1))
            t.flush(p, r0, r1 - r0, bounce)
    arenas.sync()
    assert torch.equal(t.to_host(), want)  # one unaligned whole-panel read per panel
    got = torch.empty(rows, cols)
    for p, (c0, c1) in enumerate(panels):
        for r0, r1 in zip(starts, starts[1:]):
            bounce = _aligned(t.panel_bytes(p, r1 - r0))
            t.read(p, r0, r1, got[r0:r1, c0:c1], bounce)
    assert torch.equal(got, want)
    assert traffic.disk_read == rows * cols * 4
    assert traffic.disk_write == (rows * cols * 4 if via == "flush" else 0)  # set-up: uncounted
    t.close()
    arenas.close()
    assert not list(tmp_path.iterdir())


def test_direct_io_where_the_file_system_allows_it(tmp_path) -> None:
    arenas = Arenas.allocate(torch.device("cpu"), 0, 0, ALIGN, tmp_path,
                             lambda n: torch.empty(n, dtype=torch.uint8))
    try:
        if not arenas.direct:
            pytest.skip(f"{tmp_path}'s file system refuses O_DIRECT")
        block = _aligned(ALIGN).numpy()
        block[:] = np.arange(ALIGN) % 251
        assert os.pwrite(arenas.direct_fd, block, 0) == ALIGN  # would be EINVAL if not direct
        assert os.pread(arenas.fd, ALIGN, 0) == block.tobytes()
    finally:
        arenas.close()


def test_nvme_panels_larger_than_the_free_disk_are_refused_before_writing(tmp_path) -> None:
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ValueError, match=rf"need {free + ALIGN} bytes .* has \d+ bytes"):
        Arenas.allocate(torch.device("cpu"), 0, 0, free + ALIGN, tmp_path,
                        lambda n: torch.empty(n, dtype=torch.uint8))
    assert not list(tmp_path.iterdir())


def test_nvme_panels_beyond_the_free_disk_are_refused_before_any_pinning(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk is checked before the host arena is locked (seconds for a large one), and the
    error names both numbers and the directory; nothing is created there."""
    need = 2 * shutil.disk_usage(tmp_path).free + (1 << 30)  # whatever else writes meanwhile
    pinned = []
    with pytest.raises(ValueError, match=rf"NVMe panels need {need} bytes .* in "
                                         rf"{tmp_path}, which has \d+ bytes"):
        Arenas.allocate(torch.device("cpu"), 0, 1 << 20, need, tmp_path,
                        lambda n: pinned.append(n) or torch.empty(n, dtype=torch.uint8))
    assert pinned == [] and list(tmp_path.iterdir()) == []
