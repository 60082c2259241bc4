"""AIRES: out-of-core GCN training with row-block aligned tiles and a three-phase scheduler."""

from importlib.metadata import PackageNotFoundError, version

from aires.gcn_conv import AiresGCNConv, gcn_norm
from aires.matmul import matmul
from aires.tiling import TileStore, build_store

try:
    __version__ = version("aires")
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed (the GPU machine)
    __version__ = "0+source"

__all__ = ["AiresGCNConv", "TileStore", "build_store", "gcn_norm", "matmul"]
