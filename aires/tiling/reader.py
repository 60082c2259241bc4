"""File I/O of a tile store: POSIX reads into host memory, KvikIO reads into GPU memory.

Two readers, both reading ``nbytes`` bytes at a file offset into a caller's buffer:

- :class:`PosixReader` uses ``os.preadv`` straight into a numpy (or pinned torch) buffer,
  splitting large reads into ``task_size`` pieces read by a thread pool (one thread per request
  leaves an NVMe drive's queue and the page cache's copy bandwidth mostly idle), and folding the
  CRC-32 in as the pieces arrive. GPU buffers go through a pinned host bounce buffer
  (:meth:`PosixReader.read_to_tensor`).
- :class:`KvikioReader` uses ``kvikio.CuFile.pread`` into host or GPU buffers: GPUDirect Storage
  when the ``nvidia-fs`` driver is loaded, else KvikIO's compatibility mode (POSIX reads through
  its own pinned bounce buffers, in its thread pool).

:func:`io_mode` says which path GPU reads take. KvikIO imports on machines without an NVIDIA
driver but every read fails there, so it is used only when CUDA is available too.
"""

from __future__ import annotations

import os
import threading
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch

from aires.checks import check_positive_int

__all__ = ["IoMode", "KvikioReader", "PosixReader", "io_mode"]

IoMode = Literal["gds", "kvikio-compat", "posix"]

DEFAULT_THREADS = 16
DEFAULT_TASK_SIZE = 4 * 1024**2


def io_mode() -> IoMode:
    """How reads into GPU memory run here.

    Returns:
        ``"gds"`` when KvikIO is installed, CUDA is available and GPUDirect Storage is usable;
        ``"kvikio-compat"`` when KvikIO runs in its compatibility mode (no ``nvidia-fs``, or
        ``KVIKIO_COMPAT_MODE=ON``); ``"posix"`` without KvikIO or CUDA (pinned bounce buffer).
    """
    kvikio = _import_kvikio(required=False)
    if kvikio is None or not torch.cuda.is_available():
        return "posix"
    if _compat_mode_preferred(kvikio):
        return "kvikio-compat"
    try:
        from kvikio import cufile_driver

        gds = bool(cufile_driver.get("is_gds_available"))
    except Exception:  # noqa: BLE001 - any failure to query the cuFile driver means no GDS
        gds = False
    return "gds" if gds else "kvikio-compat"


class PosixReader:
    """Reads byte ranges of one file with ``os.preadv`` from a small thread pool.

    Args:
        path: the file.
        threads: concurrent requests for one large read.
        task_size: bytes per request; reads up to this size run on the calling thread.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int = DEFAULT_THREADS,
        task_size: int = DEFAULT_TASK_SIZE,
    ) -> None:
        self.path = Path(path)
        self._threads = check_positive_int(threads, "threads")
        self._task_size = check_positive_int(task_size, "task_size")
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._pool: ThreadPoolExecutor | None = None
        self._bounce: torch.Tensor | None = None
        self._pool_lock = threading.Lock()
        self._bounce_lock = threading.Lock()

    def read(
        self, offset: int, nbytes: int, out: np.ndarray, *, checksum: bool = False
    ) -> int | None:
        """Read ``nbytes`` bytes at ``offset`` into ``out[:nbytes]``.

        Args:
            out: a writable, contiguous, one-dimensional uint8 array of at least ``nbytes``.
            checksum: also return the CRC-32 of the bytes read, computed piece by piece as the
                pieces arrive so it overlaps the reads still in flight.

        Returns:
            The CRC-32, or ``None`` when ``checksum`` is false.

        Raises:
            EOFError: the file ends before ``offset + nbytes``.
        """
        view = memoryview(out)[:nbytes]
        starts = range(0, nbytes, self._task_size)
        if len(starts) <= 1 or self._threads == 1:
            self._pread(view, offset)
            return zlib.crc32(view) if checksum else None
        pool = self._executor()
        pieces = [view[s : s + self._task_size] for s in starts]
        futures = [pool.submit(self._pread, piece, offset + s) for s, piece in zip(starts, pieces)]
        crc = 0
        try:
            for piece, future in zip(pieces, futures):
                future.result()
                if checksum:
                    crc = zlib.crc32(piece, crc)
        finally:
            wait(futures)  # never return while a thread may still write into ``out``
        return crc if checksum else None

    def read_to_tensor(
        self, offset: int, nbytes: int, out: torch.Tensor, *, checksum: bool = False
    ) -> int | None:
        """Like :meth:`read`, into a uint8 tensor on any device through a host bounce buffer.

        The bounce buffer is pinned when CUDA is available, so the copy to the GPU is a DMA;
        it is kept (grown to the largest read) and reused, one read at a time.
        """
        with self._bounce_lock:
            if self._bounce is None or self._bounce.numel() < nbytes:
                self._bounce = None  # free the old pinned buffer before pinning a larger one
                self._bounce = torch.empty(
                    nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available()
                )
            crc = self.read(offset, nbytes, self._bounce.numpy(), checksum=checksum)
            out[:nbytes].copy_(self._bounce[:nbytes])
        return crc

    def close(self) -> None:
        """Close the file and stop the thread pool."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._bounce = None
        self._file.close()

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="aires-pread")
            return self._pool

    def _pread(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if n == 0:
                raise EOFError(
                    f"{self.path}: file ends at byte {offset + done}, before the "
                    f"{len(view)} bytes asked for at offset {offset}"
                )
            done += n


class KvikioReader:
    """Reads byte ranges of one file with ``kvikio.CuFile`` into host or CUDA buffers.

    KvikIO's thread pool size is process-wide. While readers are open it is the largest
    ``threads`` any open reader asked for (so a reader never gets fewer threads than it asked
    for because another was opened first); when the last reader closes (or is garbage
    collected) the value found before the first one opened is restored. Nothing is changed at
    import time.

    Args:
        path: the file.
        threads: KvikIO worker threads (its default of 1 reads ~4x slower from the page cache).

    Raises:
        ImportError: KvikIO is not installed.
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int = DEFAULT_THREADS) -> None:
        kvikio = _import_kvikio(required=True)
        self.path = Path(path)
        threads = check_positive_int(threads, "threads")
        self._closed = False
        self._token = _THREADS.acquire(kvikio.defaults, threads)
        # A reader dropped without close() still gives its request back.
        self._release = weakref.finalize(self, _THREADS.release, kvikio.defaults, self._token)
        self._release.atexit = False  # at exit KvikIO may already be torn down
        try:
            self._file = kvikio.CuFile(self.path, "r")
        except BaseException:
            self._release()
            raise

    def read(self, offset: int, nbytes: int, out: Any) -> None:
        """Read ``nbytes`` bytes at ``offset`` into ``out`` (numpy, cupy or torch, host or CUDA).

        Raises:
            EOFError: fewer bytes than asked were read (the file is shorter).
        """
        got = self._file.pread(out, nbytes, offset).get()
        if got != nbytes:
            raise EOFError(
                f"{self.path}: read {got} of the {nbytes} bytes asked for at offset {offset}"
            )

    def close(self) -> None:
        """Close the file and give back this reader's thread request (idempotent)."""
        if not self._closed:
            self._closed = True
            self._file.close()
            self._release()


class _ThreadRequests:
    """The KvikIO thread counts open readers asked for, and the value to restore.

    ``kvikio.defaults.set`` (KvikIO >= 24.12; ``num_threads_reset`` before) applies a value at
    once, and its context manager restores what *it* saw, which is wrong when readers close
    out of order; so the previous value is kept here and every change is an explicit set.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[int, int] = {}
        self._next = 0
        self._saved: int | None = None

    def acquire(self, defaults: ModuleType, threads: int) -> int:
        """Register a request for ``threads``; apply the largest open request. Returns a token."""
        with self._lock:
            if not self._requests:
                self._saved = _get_threads(defaults)
            token = self._next
            self._next += 1
            self._requests[token] = threads
            self._apply(defaults, max(self._requests.values()))
            return token

    def release(self, defaults: ModuleType, token: int) -> None:
        """Drop request ``token``; restore the saved value when it was the last one."""
        with self._lock:
            if self._requests.pop(token, None) is None:
                return
            if self._requests:
                self._apply(defaults, max(self._requests.values()))
            elif self._saved is not None:
                self._apply(defaults, self._saved)
                self._saved = None

    @staticmethod
    def _apply(defaults: ModuleType, threads: int) -> None:
        if _get_threads(defaults) == threads:
            return  # resetting the pool waits for running tasks: skip when nothing changes
        if hasattr(defaults, "get") and hasattr(defaults, "set"):
            defaults.set({"num_threads": threads})  # applied on creation, no ``with`` needed
        else:
            defaults.num_threads_reset(threads)


_THREADS = _ThreadRequests()


def _get_threads(defaults: ModuleType) -> int:
    if hasattr(defaults, "get") and hasattr(defaults, "set"):
        return int(defaults.get("num_threads"))
    return int(defaults.get_num_threads())


def _compat_mode_preferred(kvikio: ModuleType) -> bool:
    """KvikIO's own verdict, across the API versions that spell it differently."""
    defaults = kvikio.defaults
    preferred = getattr(defaults, "is_compat_mode_preferred", None)
    if preferred is not None:
        return bool(preferred())
    mode = (
        defaults.compat_mode() if hasattr(defaults, "compat_mode") else defaults.get("compat_mode")
    )
    return mode if isinstance(mode, bool) else getattr(mode, "name", str(mode)).upper() == "ON"


def _import_kvikio(*, required: bool) -> ModuleType | None:
    try:
        import kvikio
        import kvikio.defaults
    except ImportError as error:
        if required:
            raise ImportError(
                "KvikIO is needed for this read path; install the GPU extra: "
                "pip install aires[gpu] (CUDA 13) or aires[gpu-cu12]"
            ) from error
        return None
    return kvikio
