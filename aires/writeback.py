"""Bytes written at file offsets, their writeback to the disk started at once.

A large machine's page cache absorbs gigabytes of writes before the kernel starts writing them
back (``vm.dirty_background_ratio`` of the RAM), so a producer that writes a file and then
``fsync``-s it waits for the whole file at the end: computing and writing run in series. Asking
for each range's writeback as soon as it is written (``sync_file_range``, Linux) keeps the disk
busy while the next ranges are computed; the final ``fsync`` then finds little left to do.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

__all__ = ["pwrite_all", "start_writeback"]

_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


_SYNC = _sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Start writing bytes ``[offset, offset + nbytes)`` of ``fd`` to the disk, without waiting
    for them (the GIL is released meanwhile). Whether the kernel took the request: ``False``
    off Linux, where writeback is left to the final ``fsync``."""
    if _SYNC is None or nbytes <= 0:
        return False
    return _SYNC(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) == 0


def pwrite_all(fd: int, data: memoryview, offset: int, what: str) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` and start its writeback; an ``OSError``
    (a full disk, a file size limit) says ``"writing {what} failed"``."""
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as error:
        raise OSError(error.errno, f"writing {what} failed: {error.strerror}") from error
    start_writeback(fd, offset, len(data))
