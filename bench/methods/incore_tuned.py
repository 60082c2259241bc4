"""``incore-tuned`` and ``save-on-cpu``: the in-core GCN as its best user writes it.

``incore-tuned`` is a plain PyTorch loop with everything on the device: ``Â`` as one torch
sparse CSR tensor (cuSPARSE SpMM), used again for the backward pass because ``Â = Âᵀ`` (no
transposed copy), each layer's product order the benchmark's
(:func:`~bench.methods.training.layer_orders`), no per-layer module overhead. Its epoch is the
ceiling every out-of-core method is measured against.

``save-on-cpu`` is that loop under ``torch.autograd.graph.save_on_cpu(pin_memory=True)``: what
a PyTorch user reaches for first when activations do not fit, tensors saved for backward moved
to pinned host memory and back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.methods.chunks import csr_tensor, on_device
from bench.methods.config import MethodConfig
from bench.methods.incore import check_data_budget
from bench.methods.result import MethodResult
from bench.methods.training import initial_parameters, layer_dims, layer_orders, train
from bench.methods.workload import Workload

__all__ = ["incore_forward", "run"]


def incore_forward(
    workload: Workload, config: MethodConfig, device: torch.device
) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """The tuned in-core forward over the whole graph, and its parameters."""
    x = on_device(workload.x, np.float32, device)  # the largest first: out of memory at once
    adj = csr_tensor(
        on_device(workload.adj_indptr, np.int64, device),
        on_device(workload.adj_indices, np.int64, device),
        on_device(workload.adj_data, np.float32, device),
        workload.num_nodes,
    )
    dims = layer_dims(workload, config)
    orders = layer_orders(workload, config)
    params = [t.to(device).requires_grad_() for pair in initial_parameters(dims, config.seed)
              for t in pair]

    class Aggregate(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return adj @ h

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return adj @ g.contiguous()  # Â is symmetric: its own transpose

    def forward() -> torch.Tensor:
        h = x
        for layer, order in enumerate(orders):
            weight, bias = params[2 * layer], params[2 * layer + 1]
            if order == "aggregate_first":
                h = Aggregate.apply(h) @ weight + bias
            else:
                h = Aggregate.apply(h @ weight) + bias
            if layer < len(orders) - 1:
                h = F.relu(h)
        return h

    return forward, params


def run(workload: Workload, config: MethodConfig) -> MethodResult:
    """Train the tuned in-core loop (``save-on-cpu``: under ``save_on_cpu``).

    Raises:
        OverBudgetError: ``budget_scope="data"`` and ``Â`` plus ``X`` exceed the budget.
    """
    device = config.torch_device()
    check_data_budget(workload, config)
    forward, params = incore_forward(workload, config, device)
    saving = (
        torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
        if config.method == "save-on-cpu"
        else contextlib.nullcontext()
    )
    with saving:
        log = train(forward, params, workload, config, device)
    return log.result(device, order=config.order, orders=layer_orders(workload, config))
