"""What one benchmark method reports, and how failures are classified."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["STATUSES", "MethodResult", "OverBudgetError", "is_out_of_memory"]

STATUSES = ("ok", "oom", "error")

_OOM_MARKERS = (
    "out of memory",
    "CUSPARSE_STATUS_INSUFFICIENT_RESOURCES",
    "CUSPARSE_STATUS_ALLOC_FAILED",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "cudaErrorMemoryAllocation",
)


class OverBudgetError(RuntimeError):
    """A method's data cannot fit the GPU budget: reported as ``oom`` without trying."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` means the GPU ran out of (budgeted) memory rather than a bug."""
    import torch

    if isinstance(error, (OverBudgetError, torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _OOM_MARKERS)


@dataclass
class MethodResult:
    """One method's measurements.

    Args:
        status: ``"ok"``, ``"oom"`` or ``"error"``.
        epoch_s: wall time of each timed epoch in seconds (CUDA synchronised).
        peak_gpu_bytes: peak bytes held by the PyTorch allocator (``None`` on a CPU).
        bytes_h2d: bytes moved host to GPU per epoch (mean over the timed epochs).
        bytes_disk: bytes read from disk per epoch (mean over the timed epochs).
        error: what went wrong, for ``oom`` and ``error``.
        extra: method-specific measurements (overlap efficiency, cache size, ablation, ...),
            stored beside the schema's keys in the method's JSON entry.
    """

    status: str
    epoch_s: list[float] = field(default_factory=list)
    peak_gpu_bytes: int | None = None
    bytes_h2d: int | None = None
    bytes_disk: int | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The method's entry of the benchmark JSON (schema keys first, then ``extra``)."""
        entry: dict[str, Any] = {
            "status": self.status,
            "epoch_s": [float(t) for t in self.epoch_s],
            "peak_gpu_bytes": self.peak_gpu_bytes,
            "bytes_h2d": self.bytes_h2d,
            "bytes_disk": self.bytes_disk,
            "error": self.error,
        }
        entry.update({k: v for k, v in self.extra.items() if k not in entry})
        return entry

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> MethodResult:
        """Inverse of :meth:`to_json`."""
        keys = ("status", "epoch_s", "peak_gpu_bytes", "bytes_h2d", "bytes_disk", "error")
        return cls(
            **{k: entry.get(k) for k in keys if k != "epoch_s"},
            epoch_s=list(entry.get("epoch_s") or []),
            extra={k: v for k, v in entry.items() if k not in keys},
        )
