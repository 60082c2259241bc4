"""The training loop every method runs: same weights, same loss, same optimizer, same timing."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from aires.scheduler.stats import max_memory_allocated, reset_peak_memory_stats

from bench.methods.config import MethodConfig
from bench.methods.result import MethodResult
from bench.methods.workload import Workload

__all__ = [
    "EpochLog",
    "Traffic",
    "initial_parameters",
    "labels",
    "layer_dims",
    "layer_orders",
    "peak_of_one_pass",
    "stacked_forward",
    "train",
    "train_loss",
]


@dataclass
class Traffic:
    """Bytes a method moved since the last :meth:`reset`, per path.

    Attributes:
        h2d: bytes copied (or read through unified addressing) from host memory to the GPU.
        disk: bytes read from files.
    """

    h2d: int = 0
    disk: int = 0

    def reset(self) -> None:
        """Start counting a new epoch."""
        self.h2d = 0
        self.disk = 0


@dataclass
class EpochLog:
    """What :func:`train` measured: one entry per timed epoch."""

    epoch_s: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    bytes_h2d: list[int] = field(default_factory=list)
    bytes_disk: list[int] = field(default_factory=list)
    disk_cold: list[bool] = field(default_factory=list)

    def result(
        self, device: torch.device, peak_gpu_bytes: int | None = None, **extra: object
    ) -> MethodResult:
        """An ``ok`` result: epoch times, per-epoch mean traffic, the peak and ``extra``.

        ``peak_gpu_bytes``: a method's own measure of its peak (default: the PyTorch
        allocator's, on CUDA).
        """
        peak = peak_gpu_bytes
        if peak is None and device.type == "cuda":
            peak = max_memory_allocated(device)
        return MethodResult(
            status="ok",
            epoch_s=self.epoch_s,
            peak_gpu_bytes=peak,
            bytes_h2d=int(np.mean(self.bytes_h2d)) if self.bytes_h2d else None,
            bytes_disk=int(np.mean(self.bytes_disk)) if self.bytes_disk else None,
            extra={"loss": self.loss,
                   **({"disk_cold": all(self.disk_cold)} if self.disk_cold else {}), **extra},
        )


def layer_dims(workload: Workload, config: MethodConfig) -> list[int]:
    """Channel widths ``[F, hidden, ..., hidden, classes]`` of a ``config.layers``-layer GCN."""
    return [workload.num_features] + [config.hidden] * (config.layers - 1) + [workload.num_classes]


def layer_orders(workload: Workload, config: MethodConfig) -> list[str]:
    """Each layer's product order, ``"aggregate_first"`` (``(Â H) W``) or ``"transform_first"``
    (``Â (H W)``): AIRES's cost model (:meth:`aires.nn.GCN.orders`) for ``order="auto"``,
    PyG's transform first everywhere for ``"pyg"``. Every method asks here, so all of them run
    the same arithmetic."""
    if config.order == "pyg":
        return ["transform_first"] * config.layers
    from aires.nn import GCN

    dims = layer_dims(workload, config)
    model = GCN(dims[0], config.hidden, dims[-1], num_layers=config.layers, device="cpu")
    return model.orders(workload.num_nodes, workload.nnz, None)


def initial_parameters(dims: list[int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Glorot-uniform weights ``(in, out)`` and zero biases, identical for every method.

    Every method starts from these values, so their losses agree epoch by epoch up to float
    rounding: a check that they train the same model.
    """
    generator = torch.Generator().manual_seed(seed)
    params = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        weight = (torch.rand(fan_in, fan_out, generator=generator) * 2 - 1) * bound
        params.append((weight, torch.zeros(fan_out)))
    return params


def stacked_forward(
    convs: torch.nn.ModuleList,
    dims: list[int],
    seed: int,
    x: torch.Tensor,
    adj_t: object,
    orders: list[str],
) -> Callable[[], torch.Tensor]:
    """Load :func:`initial_parameters` into PyG ``GCNConv`` layers and return the forward of
    the stack (ReLU between layers) in the given product orders.

    A transform-first layer is the layer's own ``forward``; an aggregate-first one calls the
    same layer's parts the other way round, ``lin(propagate(Â, H)) + bias`` (PyG's
    ``GCNConv`` has no order switch; this is how its user gets ``(Â H) W``).
    """
    with torch.no_grad():
        for conv, (weight, bias) in zip(convs, initial_parameters(dims, seed)):
            conv.lin.weight.copy_(weight.T)
            conv.bias.copy_(bias)

    def forward() -> torch.Tensor:
        h = x
        for i, (conv, order) in enumerate(zip(convs, orders)):
            if order == "aggregate_first":
                h = conv.lin(conv.propagate(adj_t, x=h, edge_weight=None)) + conv.bias
            else:
                h = conv(h, adj_t)
            if i < len(convs) - 1:
                h = F.relu(h)
        return h

    return forward


def labels(workload: Workload, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels of the training rows and those rows' indices, on ``device``."""
    train_idx = torch.from_numpy(np.array(workload.train_idx, dtype=np.int64)).to(device)
    y = torch.from_numpy(np.array(workload.y, dtype=np.int64)).to(device)
    return y[train_idx], train_idx


def train(
    forward: Callable[[], torch.Tensor],
    parameters: list[torch.nn.Parameter],
    workload: Workload,
    config: MethodConfig,
    device: torch.device,
    traffic: Traffic | None = None,
    before_epoch: Callable[[], bool] | None = None,
) -> EpochLog:
    """Run ``config.warmup`` untimed and ``config.epochs`` timed full-graph training epochs.

    An epoch is: ``forward()`` over the whole graph, cross-entropy on the training rows,
    backward, one Adam step (:func:`train_loss` with that loss).

    Args:
        forward: returns the logits of all nodes.
        parameters: the trainable tensors.
        workload: the problem (labels, training rows).
        config: epochs, warm-up, learning rate.
        device: where the computation runs.
        traffic: the method's byte counters, read after each timed epoch.
        before_epoch: run untimed before every epoch (:func:`train_loss`).
    """
    y_train, train_idx = labels(workload, device)
    return train_loss(
        lambda: F.cross_entropy(forward()[train_idx], y_train), parameters, config, device, traffic,
        before_epoch,
    )


def train_loss(
    loss_fn: Callable[[], torch.Tensor],
    parameters: list[torch.nn.Parameter],
    config: MethodConfig,
    device: torch.device,
    traffic: Traffic | None = None,
    before_epoch: Callable[[], bool] | None = None,
) -> EpochLog:
    """Epochs of ``loss_fn()``, backward and one Adam step, timed as :func:`train` says.

    The time of an epoch is wall time between two device synchronisations, so asynchronous GPU
    work is counted in the epoch that queued it. ``loss_fn`` is the loss over the training
    rows (a model that never holds the logits, such as ``aires.nn.GCN``, computes it itself).
    ``before_epoch`` runs untimed before every epoch (a method that reads files drops them from
    the page cache, :func:`bench.methods.cold.drop_page_cache`); what it returns for the timed
    epochs becomes the result's ``disk_cold``.

    Returns:
        Epoch times, losses and per-epoch traffic.
    """
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    log = EpochLog()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for epoch in range(config.warmup + config.epochs):
        if traffic is not None:
            traffic.reset()
        cold = before_epoch() if before_epoch is not None else None
        sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        sync()
        elapsed = time.perf_counter() - start
        if epoch >= config.warmup:
            log.epoch_s.append(elapsed)
            log.loss.append(float(loss.detach()))
            if traffic is not None:
                log.bytes_h2d.append(traffic.h2d)
                log.bytes_disk.append(traffic.disk)
            if cold is not None:
                log.disk_cold.append(cold)
    return log


def peak_of_one_pass(
    forward: Callable[[], torch.Tensor],
    parameters: list[torch.nn.Parameter],
    workload: Workload,
    device: torch.device,
) -> int:
    """Peak GPU bytes of one forward and backward pass (no optimizer step, weights unchanged).

    Lets a method size what it keeps on the GPU (a cache) to the room training leaves.
    """
    y_train, train_idx = labels(workload, device)
    torch.cuda.synchronize(device)
    reset_peak_memory_stats(device)
    F.cross_entropy(forward()[train_idx], y_train).backward()
    for parameter in parameters:
        parameter.grad = None
    torch.cuda.synchronize(device)
    # Adam's two moment buffers per parameter come on top once training starts.
    state = 2 * sum(p.nbytes for p in parameters)
    return max_memory_allocated(device) + state
