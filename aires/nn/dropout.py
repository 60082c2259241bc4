"""Dropout masks that are a pure function of an element's position.

A row block's mask must be the same whether it is drawn in the forward pass or again in the
backward pass, by row blocks or by column panels, on the CPU or on a GPU: the multiplier of
element ``(i, j)`` of a ``cols``-wide tensor is ``uniform(i * cols + j, key) >= p``, scaled by
``1 / (1 - p)`` (:func:`aires.data._splitmix.uniform`, SplitMix64's finaliser).

Written as torch ops the hash takes a dozen int64 temporaries, 48 bytes per element at its
peak: a block of products' hidden stage at 2 GiB (55,296 x 256) would have held 680 MB beside a
row room of 413 MB, and launched some twenty kernels. On a GPU with CuPy the mask is one
elementwise kernel with the same integer arithmetic and the same float32 comparison and scale,
so the bits equal the torch path's; without CuPy the torch path runs in row chunks whose
temporaries take no more than the mask itself.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from aires.data._splitmix import uniform

__all__ = ["MASK_BYTES", "csr_dropout_mask", "dropout_mask"]

#: Device bytes an element takes while the torch path draws its mask (the counters, their hash
#: and the multipliers), for sizing the row chunks masked at once.
MASK_BYTES = 48

_KERNEL = r"""
unsigned long long x = ((unsigned long long)(r0 + i / width) * (unsigned long long)cols
                        + (unsigned long long)(c0 + i % width)) * 0x9E3779B97F4A7C15ull
                       + (unsigned long long)key;
x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
x ^= x >> 31;
mask = (float)(x >> 40) * 5.9604644775390625e-08f >= p ? scale : 0.0f;
"""


def dropout_mask(
    r0: int, rows: int, cols: int, p: float, key: int, device: torch.device,
    columns: tuple[int, int] | None = None,
) -> Tensor:
    """The dropout multipliers (0 or ``1/(1-p)``, float32) of rows ``[r0, r0 + rows)`` of a
    ``cols``-wide tensor (of its ``columns`` ``[c0, c1)`` only, when given): a pure function
    of the element's position and ``key``, so a block's mask is the same whatever the
    blocking, row blocks or column panels, on any device, when recomputed in the backward
    pass."""
    c0, c1 = (0, cols) if columns is None else columns
    device = torch.device(device)
    if device.type == "cuda" and (kernel := _kernel()) is not None:
        return _fused(kernel, r0, rows, cols, c0, c1, p, key, device)
    return _torch_mask(r0, rows, cols, c0, c1, p, key, device)


def _torch_mask(
    r0: int, rows: int, cols: int, c0: int, c1: int, p: float, key: int, device: torch.device
) -> Tensor:
    """The mask by torch ops; on a GPU in row chunks whose temporaries fit in the mask's own
    bytes (:data:`MASK_BYTES` per element, against the mask's 4)."""
    def part(a: int, b: int) -> Tensor:
        counter = (
            torch.arange(r0 + a, r0 + b, device=device, dtype=torch.int64)[:, None] * cols
            + torch.arange(c0, c1, device=device, dtype=torch.int64)[None, :]
        )
        return _multipliers(counter, p, key, torch.float32)

    if device.type != "cuda":
        return part(0, rows)
    out = torch.empty((rows, c1 - c0), dtype=torch.float32, device=device)
    step = max(1, rows * 4 // MASK_BYTES)
    for a in range(0, rows, step):
        b = min(a + step, rows)
        out[a:b] = part(a, b)
    return out


def csr_dropout_mask(
    r0: int, crow: Tensor, col: Tensor, cols: int, p: float, key: int, dtype: torch.dtype
) -> Tensor:
    """The multipliers of the stored entries of a CSR row block (rows from ``r0`` of a
    ``cols``-wide tensor, ``crow`` and ``col`` its indices): the draws of :func:`dropout_mask`
    at those positions, scaled in ``dtype``."""
    rows = torch.repeat_interleave(torch.arange(len(crow) - 1, device=crow.device),
                                   crow[1:] - crow[:-1])
    return _multipliers((rows + r0) * cols + col, p, key, dtype)


def _multipliers(counter: Tensor, p: float, key: int, dtype: torch.dtype) -> Tensor:
    """0 or ``1/(1-p)`` in ``dtype`` for each counter: kept where its uniform is at least
    ``p``."""
    return (uniform(counter, key) >= p).to(dtype) / (1.0 - p)


def _fused(
    kernel: Any, r0: int, rows: int, cols: int, c0: int, c1: int, p: float, key: int,
    device: torch.device,
) -> Tensor:
    """The mask by one CuPy kernel on the current stream, into a tensor torch allocates."""
    import cupy

    out = torch.empty((rows, c1 - c0), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    # The scale as torch computes it: ``1 / (1 - p)`` with ``1 - p`` rounded to float32 first.
    scale = np.float32(1.0) / np.float32(1.0 - p)
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(stream.device_index), _cupy_stream(cupy, stream.cuda_stream):
        kernel(np.int64(r0), np.int64(cols), np.int64(c0), np.int64(c1 - c0), np.int64(key),
               np.float32(p), scale, cupy.asarray(out))
    return out


class _StreamHandle:
    """A raw CUDA stream, presented by the CUDA stream protocol."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


def _cupy_stream(cupy: Any, handle: int) -> Any:
    """CuPy's view of the stream ``handle`` (torch's current one), to launch on."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is None:  # CuPy 13
        return cupy.cuda.ExternalStream(handle)
    return from_external(_StreamHandle(handle))


@cache
def _kernel() -> Any:
    """The CuPy elementwise kernel, or ``None`` without CuPy (the torch path then)."""
    try:
        import cupy
    except ImportError:
        return None
    return cupy.ElementwiseKernel(
        "int64 r0, int64 cols, int64 c0, int64 width, int64 key, float32 p, float32 scale",
        "float32 mask", _KERNEL, "aires_dropout_mask")
