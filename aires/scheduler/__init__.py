"""The three-phase scheduler: tier placement, transfer paths, the pipeline, per-tile kernels.

``Scheduler`` computes ``A @ X`` for a tiled ``A`` (``aires.tiling.TileStore``) under device
and host memory budgets, streaming tiles from the device (phase 1), pinned host memory
(phase 2) and NVMe (phase 3) at once, and reports what it did in a ``RunStats``.
"""

from aires.scheduler.pipeline import Scheduler, resolve_device, spmm_reserve
from aires.scheduler.placement import Placement, place
from aires.scheduler.stats import RunStats
from aires.scheduler.transfer import Dispatcher

__all__ = [
    "Scheduler", "resolve_device", "spmm_reserve", "Placement", "place", "RunStats", "Dispatcher",
]
