"""Input checks at the public boundary.

Every public entry point validates here, so a bad argument is answered by a ``ValueError`` or
``TypeError`` that names the argument and the value received, never by a CUDA crash or a silent
wrong result deep inside a kernel.
"""

from __future__ import annotations

import os
import re
from fractions import Fraction
from typing import Any

import numpy as np

__all__ = ["parse_size", "format_bytes", "check_csr", "check_positive_int", "memory_available"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
# A sign is matched so that "-1MB" is reported as negative rather than as unparseable.
_SIZE = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | float | str, name: str = "size", *, allow_zero: bool = False) -> int:
    """Bytes from an int or a human size such as ``"8GiB"``, ``"512 MiB"`` or ``"1.5e9"``.

    Units are decimal (``kB``, ``MB``, ``GB``) or binary (``KiB``, ``MiB``, ``GiB``), case-blind.
    ``name`` is the argument's name, used in the error message.

    Raises:
        ValueError: an unparseable string (``"8 GiBs"``, ``"abc"``), a fraction of a byte, a
            negative size, or zero unless ``allow_zero``; the message names ``name`` and value.
        TypeError: ``value`` is not an int, float or str (``bool`` included).
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a byte count or a size string, got {value!r}")
    if isinstance(value, (int, np.integer)):
        nbytes = int(value)
    elif isinstance(value, (float, np.floating)):
        if not np.isfinite(value) or value != int(value):
            raise ValueError(f"{name} must be a whole number of bytes, got {value!r}")
        nbytes = int(value)
    elif isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"{name}: cannot parse {value!r} as a size; use bytes or a number with a unit "
                "such as '512MiB', '8GiB' or '2GB'"
            )
        nbytes = int(Fraction(match.group(1)) * _UNITS[unit])  # exact, also past 2**53
    else:
        raise TypeError(f"{name} must be a byte count or a size string, got {type(value).__name__}")
    if nbytes < 0 or (nbytes == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return nbytes


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` > 0, or a ``ValueError``/``TypeError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return int(value)


def check_csr(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray | None,
    shape: tuple[int, int],
    name: str = "matrix",
    *,
    chunk: int = 1 << 24,
) -> None:
    """Raise a ``ValueError``/``TypeError`` naming ``name`` unless the arrays form a valid CSR.

    Checks the shape, the dtypes (integer indices, real values), the row pointer (length
    ``rows + 1``, starting at 0, non-decreasing, ending at ``nnz``), column indices in
    ``[0, cols)`` and finite values. Arrays may be memory maps larger than RAM: they are scanned
    in chunks of ``chunk`` entries, so the check needs a bounded amount of extra memory.
    """
    if len(shape) != 2 or any(isinstance(s, bool) or int(s) != s or s < 0 for s in shape):
        raise ValueError(f"{name}: shape must be two non-negative ints, got {shape!r}")
    rows, cols = int(shape[0]), int(shape[1])
    for label, arr in (("indptr", indptr), ("indices", indices)):
        if arr.ndim != 1:
            raise ValueError(f"{name}: {label} must be one-dimensional, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{name}: {label} must have an integer dtype, got {arr.dtype}")
    if len(indptr) != rows + 1:
        raise ValueError(
            f"{name}: indptr has length {len(indptr)}, expected rows + 1 = {rows + 1}"
        )
    nnz = len(indices)
    if data is not None:
        if data.ndim != 1 or len(data) != nnz:
            raise ValueError(
                f"{name}: data has shape {data.shape}, expected ({nnz},) like indices"
            )
        if not (np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.integer)):
            raise TypeError(f"{name}: data must be real numbers, got dtype {data.dtype}")
    if int(indptr[0]) != 0:
        raise ValueError(f"{name}: indptr[0] must be 0, got {int(indptr[0])}")
    if int(indptr[-1]) != nnz:
        raise ValueError(
            f"{name}: indptr[-1] is {int(indptr[-1])} but there are {nnz} column indices"
        )
    for start in range(0, rows, chunk):
        part = np.asarray(indptr[start : min(start + chunk, rows) + 1])
        bad = np.flatnonzero(np.diff(part) < 0)
        if bad.size:
            row = start + int(bad[0])
            raise ValueError(
                f"{name}: indptr decreases at row {row} ({int(part[bad[0]])} -> "
                f"{int(part[bad[0] + 1])})"
            )
    for start in range(0, nnz, chunk):
        part = np.asarray(indices[start : start + chunk])
        bad = np.flatnonzero((part < 0) | (part >= cols))
        if bad.size:
            raise ValueError(
                f"{name}: column index {int(part[bad[0]])} at position {start + int(bad[0])} "
                f"is out of range [0, {cols})"
            )
        if data is not None and np.issubdtype(data.dtype, np.floating):
            values = np.asarray(data[start : start + chunk])
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                raise ValueError(
                    f"{name}: value {values[bad[0]]} at position {start + int(bad[0])} is not finite"
                )


def memory_available() -> int:
    """Host memory available without swapping, in bytes: Linux's ``MemAvailable`` (free memory
    plus the page cache it can drop), else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def format_bytes(nbytes: int | float) -> str:
    """``nbytes`` in binary units with one decimal, e.g. ``"1.5 GiB"``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
