"""Disk numbers measured cold: a file's pages dropped from the page cache before it is read.

Without this, a file read every epoch is served from RAM after the first one, and a number
labelled disk or NVMe is a memory copy (the ablation's "NVMe only" read 3.61 GB an epoch at
about 13 GB/s against a cold ceiling of 1.36 GB/s).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["drop_page_cache"]


def drop_page_cache(paths: Iterable[Path], *, system: bool = True) -> bool:
    """Drop the pages of ``paths`` (files, or directories: every file below) from the page
    cache: each file synced and ``posix_fadvise(DONTNEED)``, then, with ``system``, every file
    system synced and the whole cache dropped where the process may
    (``/proc/sys/vm/drop_caches``, root only). Pages a process has memory-mapped stay; so do
    pages a GPU-direct read never put there.

    The whole cache holds the code of every library the process runs (PyTorch's and CUDA's,
    gigabytes): dropped before an epoch, it is read back from disk inside the epoch, page by
    page. A method whose disk reads are all of ``paths`` by ``pread`` (not memory maps) should
    pass ``system=False``.

    Returns:
        Whether every file's pages were dropped (each fadvise, or the global drop, took).
    """
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))
             if f.is_file()]
    evicted = True
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (AttributeError, OSError):
            evicted = False
    if not system:
        return evicted
    os.sync()  # drop_caches drops clean pages only
    try:
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("3\n")
        return True
    except OSError:
        return evicted
