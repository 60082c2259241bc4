"""What every benchmark result records about the software it ran on."""

from __future__ import annotations

import importlib
import platform
import subprocess
from pathlib import Path

import torch

import aires

__all__ = ["git_commit", "versions"]

_REPO = Path(__file__).resolve().parent.parent


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


def git_commit() -> str | None:
    """The checkout's commit, ``-dirty`` when tracked files changed (``None`` outside git)."""
    try:
        head = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head
