"""Bytes moved per path: what the traffic model predicts and what a run measures, one type."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from aires.checks import format_bytes

__all__ = ["Traffic", "PATHS"]

PATHS = ("h2d", "d2h", "disk_read", "disk_write", "exchange")


@dataclass
class Traffic:
    """Bytes over each path: host to device, device to host, NVMe reads and writes, and the
    bytes a rank receives from the other ranks (``exchange``; 0 in one process).

    Counters are added to from the main thread and from disk writer threads, under a lock.
    """

    h2d: int = 0
    d2h: int = 0
    disk_read: int = 0
    disk_write: int = 0
    exchange: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, path: str, nbytes: int) -> None:
        """Count ``nbytes`` on ``path`` (a field name)."""
        with self._lock:
            setattr(self, path, getattr(self, path) + int(nbytes))

    def reset(self) -> None:
        """Zero every counter (the start of an epoch)."""
        with self._lock:
            for path in PATHS:
                setattr(self, path, 0)

    def as_dict(self) -> dict[str, int]:
        return {path: getattr(self, path) for path in PATHS}

    def __str__(self) -> str:
        return ", ".join(f"{k} {format_bytes(v)}" for k, v in self.as_dict().items())
