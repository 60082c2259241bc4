"""Whole-model out-of-core GCN training: the model, its epoch program and its traffic model.

:class:`GCN` is the entry point: a multi-layer GCN whose features, activations and gradients
live in row-blocked column panels across the GPU, pinned host memory and NVMe
(:mod:`aires.blocks`), with the aggregations streamed by :mod:`aires.scheduler`.
"""

from aires.nn.dropout import dropout_mask
from aires.nn.gcn import GCN, EpochStats
from aires.nn.plan import Bandwidths, Plan, plan_epoch
from aires.nn.program import Program, build_program

__all__ = [
    "GCN",
    "EpochStats",
    "dropout_mask",
    "Bandwidths",
    "Plan",
    "plan_epoch",
    "Program",
    "build_program",
]
