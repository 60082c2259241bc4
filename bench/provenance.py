"""What every benchmark result records about the software it ran on."""

from __future__ import annotations

import importlib
import platform

import torch

import aires

__all__ = ["versions"]


def versions() -> dict[str, str | None]:
    """Versions of Python, CUDA and the packages on the measured paths (``None``: absent)."""
    found: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "aires": aires.__version__,
    }
    for module in ("numpy", "scipy", "torch_geometric", "cupy", "kvikio"):
        try:
            found[module] = getattr(importlib.import_module(module), "__version__", "unknown")
        except Exception:  # noqa: BLE001 - absent, or a GPU package unusable here: recorded as None
            found[module] = None
    return found
