"""The whole-model out-of-core GCN over several processes (``torch.distributed``).

:mod:`~aires.distributed.partition` splits ``Â``'s rows over the ranks on tile boundaries;
:mod:`~aires.distributed.exchange` holds the collectives an epoch runs; and
:mod:`~aires.distributed.launch` starts the ranks (or joins those ``torchrun`` started).
``aires.nn.GCN(..., distributed=True)`` puts them together.
"""

from aires.distributed.exchange import Exchange, rank_zero_first
from aires.distributed.launch import (
    DEFAULT_TIMEOUT,
    RankFailedError,
    backend_for,
    free_port,
    init_from_env,
    launch,
    world_size_from_env,
)
from aires.distributed.partition import RowRangeStore, row_ranges, tile_cuts

__all__ = [
    "DEFAULT_TIMEOUT",
    "Exchange",
    "RankFailedError",
    "RowRangeStore",
    "backend_for",
    "free_port",
    "init_from_env",
    "launch",
    "rank_zero_first",
    "row_ranges",
    "tile_cuts",
    "world_size_from_env",
]
