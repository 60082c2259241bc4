"""``aires``: the whole-model out-of-core GCN (:class:`aires.nn.GCN`), and its ablations.

``aires`` trains what an AIRES user writes: ``aires.nn.GCN`` with ``gpu_budget`` set to the
benchmark's budget, over the workload's tiled ``Â`` (``tile_bytes``), the features read from the
workload's file. Every tensor with one row per node lives where the model's planner puts it
(device, pinned host memory, NVMe), so the process stays within the budget the runner caps it
at. The product order is the benchmark's (``config.order``): the model's cost model per layer
(``"auto"``, its default) or PyG's ``Â (H W)`` (``"pyg"``).

Ablations (``aires-<variant>``):

- ``pyg-order``: ``aires`` with PyG's product order ``Â (H W)`` whatever ``config.order``
  says: how much of AIRES's time the order alone is worth. The variants below train the
  benchmark's arithmetic (:class:`~bench.methods.gcn.StreamedGCN` in ``config.order``) with an
  :class:`aires.scheduler.Scheduler` built with one part of AIRES removed:

- ``no-align``: tiles aligned to 256 bytes instead of 4 KiB (no direct I/O, no GDS);
- ``no-prealloc``: a fresh device buffer per streamed tile instead of the slot ring
  (``prealloc=False``);
- ``sync``: each tile loaded, then computed, one at a time: no copy/compute overlap
  (``overlap=False``);
- ``host-only``: pinned tiles never travel the NVMe path (``dual=False``; on a GPU the
  scheduler already sends them all over host DMA, so there this equals ``pyg-order``);
- ``disk-only``: no host tier: every streamed tile from NVMe (``host_budget=0``).

A variant whose option the installed scheduler does not have reports ``error`` saying so.

Budget: with ``budget_scope="data"`` the budget bounds the graph data the scheduler keeps on
the GPU (resident tiles and slots; on a CPU, in the memory it computes from); like every
method, AIRES keeps its activations on the GPU on top of it, and the output of each product is
one of them, so the scheduler is given the budget plus its output reserve for the widest
product training runs (:func:`product_widths`). The features stay on the GPU as AIRES's first
activation (also on top, and in the peak). With
``"process"`` one untimed pass at a quarter of the budget measures what training needs beside
the scheduler, and the scheduler gets the rest (less a margin).

Disk: where the model's plan reads the disk (NVMe-tier panels, or tiles of ``Â`` on NVMe),
before every epoch (untimed) the tile file and the panel files are dropped from the page cache
(:func:`bench.methods.cold.drop_page_cache`, those files only), so what the epoch reads from
disk comes from the disk; ``disk_cold`` in the result says whether the drop took. Panels
written and read back within one epoch may still be served by the cache. The whole cache is
not dropped: it holds the code of PyTorch and CUDA, which an epoch would then read back from
disk (the products sweep of 2026-11-30 dropped it before every epoch of epochs that read no
file, and AIRES's epochs there ran 72 to 166 ms at one budget).

Statistics: after the timed epochs one more (untimed) product with the widest product's columns
returns the scheduler's :class:`~aires.scheduler.RunStats`; bytes per epoch are that pass's
bytes times the passes an epoch makes (forward and backward of each layer over the same
symmetric tiles).
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aires.scheduler.stats import reset_peak_memory_stats

from bench.methods.cold import drop_page_cache
from bench.methods.config import MethodConfig
from bench.methods.gcn import StreamedGCN
from bench.methods.result import MethodResult, OverBudgetError
from bench.methods.training import (
    initial_parameters,
    layer_dims,
    layer_orders,
    peak_of_one_pass,
    train,
    train_loss,
)
from bench.methods.workload import Workload

__all__ = [
    "PYG_ORDER", "VARIANTS", "SchedulerAdjacency", "missing_options", "product_widths", "run",
    "run_model", "tile_store",
]

#: Ablation variant -> (tile alignment, Scheduler keyword arguments).
VARIANTS: dict[str, tuple[int, dict[str, Any]]] = {
    "no-align": (256, {}),
    "no-prealloc": (4096, {"prealloc": False}),
    "sync": (4096, {"overlap": False}),
    "host-only": (4096, {"dual": False}),
    "disk-only": (4096, {"host_budget": 0}),
}
#: The ablation that changes the arithmetic, not the scheduler.
PYG_ORDER = "pyg-order"
#: A budget no placement exhausts: for a scheduler that only answers questions (no memory).
_ANY_BUDGET = 1 << 50
_MARGIN_BYTES = 128 << 20


def _budget_error(error: ValueError) -> Exception:
    """A scheduler budget below its minimum working set is an out-of-memory outcome."""
    if "minimum working set" in str(error):
        return OverBudgetError(str(error))
    return error


def missing_options(options: dict[str, Any]) -> list[str]:
    """The keyword arguments of ``options`` that :class:`aires.scheduler.Scheduler` lacks."""
    from aires.scheduler import Scheduler

    accepted = inspect.signature(Scheduler).parameters
    return [name for name in options if name not in accepted]


def product_widths(dims: list[int], orders: list[str]) -> list[int]:
    """Columns of every product with ``Â`` in one epoch: each layer's forward and backward.

    A transform-first layer multiplies ``Â`` by ``H W`` (``F_out`` columns) forward and by the
    output gradient backward; an aggregate-first layer multiplies by ``H`` (``F_in`` columns),
    backward only if ``H`` needs a gradient (not the input features).
    """
    widths: list[int] = []
    for i, (fan_in, fan_out, order) in enumerate(zip(dims[:-1], dims[1:], orders)):
        if order == "aggregate_first":
            widths += [fan_in] * (2 if i > 0 else 1)
        else:
            widths += [fan_out] * 2
    return widths


def _output_reserve(store: Any, width: int, device: torch.device) -> int:
    """Device bytes a scheduler over ``store`` keeps beside its tiles for a product with
    ``width`` columns: the output and the kernel workspace (the scheduler's own rule)."""
    from aires.scheduler import Scheduler

    return Scheduler(store, gpu_budget=_ANY_BUDGET, device=device).spmm_reserve(width)


class SchedulerAdjacency:
    """``Â`` as a tile store multiplied by an :class:`aires.scheduler.Scheduler`."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def spmm(self, dense: torch.Tensor) -> torch.Tensor:
        """``Â @ dense`` out of core. Shapes: ``(N, C) -> (N, C)``."""
        return self.scheduler.spmm(dense)


class _DenseFeatures:
    """``X`` on the compute device (AIRES keeps features and activations there)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def matmul(self, weight: torch.Tensor) -> torch.Tensor:
        return self.x @ weight

    def t_matmul(self, grad: torch.Tensor) -> torch.Tensor:
        return self.x.T @ grad

    def aggregate(self, adjacency: SchedulerAdjacency) -> torch.Tensor:
        return adjacency.spmm(self.x)


def _features(workload: Workload, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(workload.x, dtype=np.float32)).to(device)


def _scheduler_budget(
    config: MethodConfig,
    device: torch.device,
    probe: Callable[[int], tuple[int, int]],
    reserve: Callable[[], int],
) -> int | None:
    """The scheduler's GPU budget (see the module notes).

    Args:
        probe: ``probe(budget)`` returns ``(peak of one training pass, scheduler peak)`` with
            the scheduler at ``budget`` (``budget_scope="process"``).
        reserve: ``reserve()`` returns the scheduler's output reserve for the widest product
            (``budget_scope="data"``).
    """
    if config.gpu_budget is None:
        return None
    budget = config.gpu_budget
    if config.budget_scope == "data":
        return budget + reserve()
    # "process": CUDA only (MethodConfig refuses it on a CPU).
    for share in (4, 2, 1):
        try:
            peak, scheduler_peak = probe(budget // share)
            break
        except ValueError as error:
            if share == 1:
                raise _budget_error(error) from error
    return budget - (peak - scheduler_peak) - max(_MARGIN_BYTES, budget // 20)


def _stats_result(
    log: Any, device: torch.device, stats: Any, passes: int, **extra: Any
) -> MethodResult:
    """An ``ok`` result with bytes per epoch from one pass's ``RunStats`` times ``passes``."""
    result = log.result(
        device,
        overlap_efficiency=stats.overlap_efficiency,
        io_mode=stats.io_mode,
        passes_per_epoch=passes,
        run_stats=stats.to_dict(),
        **extra,
    )
    result.bytes_h2d = int(stats.bytes_h2d) * passes
    result.bytes_disk = int(stats.bytes_disk) * passes
    return result


def run_model(
    workload: Workload, config: MethodConfig, device: torch.device, *, distributed: bool = False
) -> MethodResult:
    """``aires``: the whole-model out-of-core :class:`aires.nn.GCN` under the process budget
    (one rank of ``aires-ddp`` when ``distributed``)."""
    from aires.nn import GCN

    dims = layer_dims(workload, config)
    order = "auto" if config.order == "auto" else "transform_first"
    scratch = tempfile.TemporaryDirectory(prefix="aires-bench-panels-")
    model = GCN(dims[0], config.hidden, dims[-1], num_layers=config.layers, device=device,
                order=order, gpu_budget=config.gpu_budget, scratch_dir=scratch.name,
                distributed=distributed)
    with torch.no_grad():
        for layer, (weight, bias) in zip(model.convs, initial_parameters(dims, config.seed)):
            layer.lin.weight.copy_(weight.T)
            layer.bias.copy_(bias)
    store = tile_store(workload, config, 4096)
    y = torch.from_numpy(np.array(workload.y, dtype=np.int64))
    rows = torch.from_numpy(np.array(workload.train_idx, dtype=np.int64))
    files = [store.data_path, Path(scratch.name)]
    try:
        if device.type == "cuda":
            reset_peak_memory_stats(device)  # set-up's peak (the plan below) counts too
        plan = model.plan(workload.x, store)
        # Only an epoch that reads the disk has pages to drop: the tile file's and the NVMe
        # panels', both read by pread, so the rest of the cache (the libraries' code) stays.
        reads_disk = bool(plan.disk_bytes or plan.adjacency_disk)
        log = train_loss(lambda: model.loss(workload.x, store, y, rows),
                         list(model.parameters()), config, device,
                         before_epoch=(lambda: drop_page_cache(files, system=False))
                         if reads_disk else None)
    except ValueError as error:
        raise _budget_error(error) from error
    stats = model.stats
    result = log.result(device, order=config.order,
                        orders=model.orders(workload.num_nodes, workload.nnz, None),
                        plan=stats.plan,
                        passes_per_epoch=stats.passes, io_mode=stats.io_mode,
                        predicted_bytes=stats.predicted, measured_bytes=stats.measured,
                        peak_device_used=stats.peak_device_used,
                        pass_columns=plan.pass_columns,
                        exchanged_columns=plan.exchanged_columns)
    if distributed:
        result.extra["exchange_bandwidth"] = stats.exchange_bandwidth
    result.bytes_h2d = stats.measured["h2d"]
    result.bytes_disk = stats.measured["disk_read"]
    model.close()
    scratch.cleanup()
    return result


def tile_store(workload: Workload, config: MethodConfig, alignment: int) -> Any:
    """The tile store of ``Â`` at ``alignment``, built once per workload, tile size, alignment."""
    from aires.tiling import TileStore, build_store

    root = Path(config.store_dir) if config.store_dir else workload.path
    path = root / f"{workload.path.name}-t{config.tile_bytes}-a{alignment}"
    if path.exists():
        return TileStore.open(path)
    return build_store(workload.scipy_adjacency(), path, tile_bytes=config.tile_bytes,
                       alignment=alignment, symmetric=True, progress=False)


def _run_ablation(
    workload: Workload, config: MethodConfig, device: torch.device, variant: str
) -> MethodResult:
    from aires.scheduler import Scheduler

    alignment, options = VARIANTS[variant]
    missing = missing_options(options)
    if missing:
        raise NotImplementedError(
            f"ablation {variant!r} is not available: aires.scheduler.Scheduler has no option "
            f"{', '.join(map(repr, missing))}"
        )
    store = tile_store(workload, config, alignment)
    x = _features(workload, device)
    dims = layer_dims(workload, config)
    orders = layer_orders(workload, config)
    widths = product_widths(dims, orders)
    state: dict[str, Any] = {}

    def build(budget: int | None) -> StreamedGCN:
        if "scheduler" in state:
            state["scheduler"].close()
        state["scheduler"] = Scheduler(store, gpu_budget=budget, device=device, **options)
        return StreamedGCN(initial_parameters(dims, config.seed), _DenseFeatures(x),
                           SchedulerAdjacency(state["scheduler"]), device, orders)

    def product_stats() -> Any:
        state["scheduler"].spmm(torch.randn(workload.num_nodes, max(widths), device=device))
        return state["scheduler"].stats

    def probe(budget: int) -> tuple[int, int]:
        model = build(budget)
        peak = peak_of_one_pass(model, list(model.parameters()), workload, device)
        return peak, product_stats().peak_gpu_bytes

    try:
        model = build(_scheduler_budget(
            config, device, probe, lambda: _output_reserve(store, max(widths), device)
        ))
        if device.type == "cuda":
            reset_peak_memory_stats(device)
        log = train(model, list(model.parameters()), workload, config, device,
                    before_epoch=lambda: drop_page_cache([store.data_path], system=False))
        stats = product_stats()
    except ValueError as error:
        raise _budget_error(error) from error
    finally:
        if "scheduler" in state:
            state["scheduler"].close()
    return _stats_result(log, device, stats, len(widths), order=config.order, orders=orders,
                         ablation={"variant": variant, "alignment": alignment, **options},
                         gpu_budget_scheduler=state["scheduler"].gpu_budget,
                         features_on_gpu_bytes=x.nbytes)


def run(workload: Workload, config: MethodConfig) -> MethodResult:
    """Train with AIRES (or an ablation ``aires-<variant>``); report times, traffic, overlap.

    Raises:
        OverBudgetError: the budget is below AIRES's minimum working set.
        NotImplementedError: an ablation the scheduler has no option for.
    """
    device = config.torch_device()
    variant = config.method.removeprefix("aires").removeprefix("-")
    if not variant:
        return run_model(workload, config, device)
    if variant == PYG_ORDER:
        return run_model(workload, replace(config, order="pyg"), device)
    return _run_ablation(workload, config, device, variant)
