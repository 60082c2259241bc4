"""Row-blocked dense tensors across the tiers: GPU, pinned host memory, NVMe.

The whole-model executor (:mod:`aires.nn`) keeps every tensor with one row per node (features,
aggregation outputs, gradients) as a :class:`PanelTensor`: column panels, each on one tier,
streamed to and from the device a row block at a time, or a whole panel at a time for an
aggregation. :class:`Traffic` counts the bytes each path carries.
"""

from aires.blocks.tensor import PanelTensor
from aires.blocks.traffic import Traffic

__all__ = ["PanelTensor", "Traffic"]
