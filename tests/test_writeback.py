"""aires.writeback: bytes land where asked, whatever pwrite returns, and failures name them."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from aires.writeback import pwrite_all, start_writeback


def test_short_writes_are_continued_and_writeback_is_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8)
    path = tmp_path / "f"
    path.write_bytes(b"\0" * 20_000)
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, b, off: real(fd, bytes(b)[:777], off))
    fd = os.open(path, os.O_WRONLY)
    try:
        pwrite_all(fd, memoryview(data), 4096, "test bytes")
    finally:
        os.close(fd)
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    np.testing.assert_array_equal(raw[4096:14_096], data)
    assert not raw[:4096].any() and not raw[14_096:].any()


def test_a_failed_write_names_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="^.*writing rows 0 to 9 failed: No space") as caught:
            pwrite_all(fd, memoryview(b"abc"), 0, "rows 0 to 9")
    finally:
        os.close(fd)
    assert caught.value.errno == errno.ENOSPC


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_is_requested_of_the_kernel(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * 8192)
        assert start_writeback(fd, 0, 8192)
        assert not start_writeback(fd, 0, 0)  # nothing to write back
    finally:
        os.close(fd)
    assert not start_writeback(fd, 0, 8192)  # a closed descriptor: refused, not raised
