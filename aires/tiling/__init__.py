"""Row-block alignment tiler: CSR matrices as on-disk stores of aligned, self-contained tiles."""

from aires.tiling.plan import TilePlan, plan_tiles
from aires.tiling.store import TileCorruptError, TileStore, build_store
from aires.tiling.tile import TileCSR, TileInfo

__all__ = [
    "TileCSR",
    "TileCorruptError",
    "TileInfo",
    "TilePlan",
    "TileStore",
    "build_store",
    "plan_tiles",
]
