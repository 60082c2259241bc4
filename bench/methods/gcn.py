"""The GCN the data-movement baselines train: ``GCNConv`` arithmetic over pluggable tiers.

Each layer computes ``Â (H W) + b`` (transform first, PyG's order) or ``(Â H) W + b``
(aggregate first), in the orders the benchmark gives
(:func:`~bench.methods.training.layer_orders`), with ReLU between layers. Where the adjacency
``Â`` and the input features ``X`` live is the only thing a baseline changes: it supplies an
:class:`Adjacency` (computes ``Â Y``) and a :class:`Features` (computes ``X W``, ``Xᵀ G`` and
``Â X``). The products are the same torch CSR (cuSPARSE) and dense (cuBLAS) kernels for every
method.

The backward of the aggregation reuses ``Â`` because ``Â = Âᵀ`` for an undirected graph (the
benchmark graphs are undirected), so the baselines stream the adjacency once per pass.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

__all__ = ["Adjacency", "Features", "StreamedGCN"]


class Adjacency(Protocol):
    """Computes ``Â Y`` on the compute device, wherever ``Â`` is kept."""

    def spmm(self, dense: torch.Tensor) -> torch.Tensor:
        """``Â @ dense``. Shapes: ``(N, C) -> (N, C)``."""
        ...


class Features(Protocol):
    """Products with the input features ``X``, wherever ``X`` is kept."""

    def matmul(self, weight: torch.Tensor) -> torch.Tensor:
        """``X @ weight``. Shapes: ``(F, C) -> (N, C)``."""
        ...

    def t_matmul(self, grad: torch.Tensor) -> torch.Tensor:
        """``Xᵀ @ grad``. Shapes: ``(N, C) -> (F, C)``."""
        ...

    def aggregate(self, adjacency: Adjacency) -> torch.Tensor:
        """``Â @ X`` (a constant: ``X`` needs no gradient). Shapes: ``() -> (N, F)``."""
        ...


class _Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, dense: torch.Tensor, adjacency: Adjacency) -> torch.Tensor:
        ctx.adjacency = adjacency
        return adjacency.spmm(dense)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.adjacency.spmm(grad.contiguous()), None


class _FeatureProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, features: Features) -> torch.Tensor:
        ctx.features = features
        return features.matmul(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.features.t_matmul(grad.contiguous()), None


class StreamedGCN(torch.nn.Module):
    """A GCN whose first-layer input and aggregation are computed by the given tiers.

    Args:
        parameters: ``(weight (in, out), bias (out,))`` per layer, copied.
        features: where ``X`` lives.
        adjacency: where ``Â`` lives.
        device: where weights, activations and products live.
        orders: each layer's ``"aggregate_first"`` or ``"transform_first"``.
    """

    def __init__(
        self,
        parameters: list[tuple[torch.Tensor, torch.Tensor]],
        features: Features,
        adjacency: Adjacency,
        device: torch.device,
        orders: list[str],
    ) -> None:
        super().__init__()
        if len(orders) != len(parameters):
            raise ValueError(f"orders: one per layer ({len(parameters)}), got {orders!r}")
        self.orders = list(orders)
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(w.clone().to(device)) for w, _ in parameters]
        )
        self.biases = torch.nn.ParameterList(
            [torch.nn.Parameter(b.clone().to(device)) for _, b in parameters]
        )
        self.features = features
        self.adjacency = adjacency

    def forward(self) -> torch.Tensor:
        """Logits of all nodes. Shapes: ``() -> (N, classes)``."""
        h = torch.empty(0)
        last = len(self.weights) - 1
        for i, (weight, bias, order) in enumerate(zip(self.weights, self.biases, self.orders)):
            if order == "aggregate_first":
                a = self.features.aggregate(self.adjacency) if i == 0 else _Aggregate.apply(
                    h, self.adjacency
                )
                h = a @ weight + bias
            else:
                z = _FeatureProduct.apply(weight, self.features) if i == 0 else h @ weight
                h = _Aggregate.apply(z, self.adjacency) + bias
            if i < last:
                h = F.relu(h)
        return h
