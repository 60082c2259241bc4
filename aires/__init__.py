"""AIRES: out-of-core GCN training with row-block aligned tiles and a three-phase scheduler."""

from aires.matmul import matmul
from aires.tiling import TileStore, build_store

__all__ = ["TileStore", "build_store", "matmul"]
