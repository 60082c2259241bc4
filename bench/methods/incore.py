"""``incore``: PyG's ``GCNConv`` on a sparse ``adj_t``, everything on the GPU.

The fastest way to train when the graph fits, and what a PyG user writes (each layer in the
benchmark's product order, :func:`~bench.methods.training.layer_orders`): ``Â`` as a torch
sparse CSR tensor (normalised once, so ``normalize=False``), features, activations and weights on
the device. With ``budget_scope="process"`` the runner caps the process at the budget
(``torch.cuda.set_per_process_memory_fraction``) and an allocation beyond it is an ``oom``;
with ``"data"`` the method reports ``oom`` when ``Â`` and ``X`` alone exceed the budget, on
a CPU as on a GPU (on a CPU the budget is the host memory the method may hold for them).
"""

from __future__ import annotations

import numpy as np
import torch

from bench.methods.chunks import csr_tensor, on_device
from bench.methods.config import MethodConfig
from bench.methods.result import MethodResult, OverBudgetError
from bench.methods.training import layer_dims, layer_orders, stacked_forward, train
from bench.methods.workload import Workload

__all__ = ["check_data_budget", "run"]


def check_data_budget(workload: Workload, config: MethodConfig) -> None:
    """With ``budget_scope="data"``, an in-core method's ``Â`` and ``X`` must fit the budget.

    Raises:
        OverBudgetError: they do not, naming both numbers.
    """
    data_bytes = workload.adjacency_bytes + workload.x.nbytes
    budget = config.gpu_budget
    if budget is not None and config.budget_scope == "data" and data_bytes > budget:
        raise OverBudgetError(
            f"in-core graph data ({data_bytes} bytes: adjacency and features) exceeds the "
            f"budget of {budget} bytes"
        )


def run(workload: Workload, config: MethodConfig) -> MethodResult:
    """Train PyG ``GCNConv`` layers in core; report epoch times and the peak.

    Raises:
        OverBudgetError: ``budget_scope="data"`` and ``Â`` plus ``X`` exceed the budget.
        ImportError: PyTorch Geometric is not installed.
    """
    device = config.torch_device()
    # Checked before PyG is imported: a method that cannot fit says so in a moment.
    check_data_budget(workload, config)
    try:
        from torch_geometric.nn import GCNConv
    except ImportError as error:
        raise ImportError(
            "the incore baseline needs PyTorch Geometric (pip install aires[pyg])"
        ) from error
    index = np.int32 if max(workload.nnz, workload.num_nodes) < 2**31 else np.int64
    x = on_device(workload.x, np.float32, device)  # the largest first: out of memory at once
    adj_t = csr_tensor(
        *(
            on_device(a, dtype, device)
            for a, dtype in (
                (workload.adj_indptr, index),
                (workload.adj_indices, index),
                (workload.adj_data, np.float32),
            )
        ),
        workload.num_nodes,
    )
    dims = layer_dims(workload, config)
    convs = torch.nn.ModuleList(
        GCNConv(i, o, normalize=False) for i, o in zip(dims[:-1], dims[1:])
    ).to(device)
    orders = layer_orders(workload, config)
    forward = stacked_forward(convs, dims, config.seed, x, adj_t, orders)

    log = train(forward, list(convs.parameters()), workload, config, device)
    return log.result(device, order=config.order, orders=orders)
