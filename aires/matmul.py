"""The out-of-core product ``Y = A @ X`` with autograd, on top of :mod:`aires.scheduler`.

``matmul`` accepts ``A`` as a tile store or as any matrix ``build_store`` accepts (tiled once
into a temporary store, cached while ``A`` lives), keeps one :class:`~aires.scheduler.Scheduler`
per store, budgets and device (so placement and allocation happen once), and is
differentiable with respect to a dense ``X``:

.. math:: \\frac{\\partial L}{\\partial X} = A^\\top \\frac{\\partial L}{\\partial Y}

computed out of core as well, from the same tiles when the store is marked symmetric (a GCN's
``Â``) and from the transposed store (built once, cached beside the original) otherwise.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aires.checks import parse_size
from aires.scheduler import RunStats, Scheduler, spmm_reserve
from aires.tiling import TileStore, build_store

__all__ = ["matmul", "clear_cache"]

#: Schedulers kept alive at once; each holds device memory, so the least recently used
#: beyond this many is closed.
MAX_SCHEDULERS = 4

#: The Scheduler arguments ``scheduler_options`` may set.
SCHEDULER_OPTIONS = ("slots", "disk_workers", "dual", "prealloc", "overlap")

_lock = threading.RLock()
_schedulers: OrderedDict[
    tuple[str, int | None, int | None, str, tuple[tuple[str, Any], ...]], Scheduler
] = OrderedDict()
# (id of A, or of its indptr for a tuple; value dtype) -> (weak reference to it, store)
_stores: dict[tuple[int, str], tuple[Any, TileStore]] = {}


def matmul(
    A: Any,
    X: torch.Tensor,
    *,
    gpu_budget: int | str | None = None,
    host_budget: int | str | None = None,
    device: torch.device | str | None = None,
    out: str | None = None,
    return_stats: bool = False,
    scheduler_options: dict[str, Any] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, RunStats]:
    """``A @ X`` out of core: cuSPARSE SpMM for a dense ``X``, SpGEMM for a sparse one.

    Args:
        A: A ``TileStore``, or a matrix ``build_store`` accepts (scipy sparse, torch sparse
            CSR/COO, or ``(indptr, indices, data, shape)``), tiled once into a temporary store
            that is cached while ``A`` is alive (``A`` must not be modified in place after).
            Values are stored as float32, or float64 when ``X`` is float64.
        X: Dense ``(A.shape[1], F)`` float tensor (differentiable), or sparse CSR/COO
            (forward only; the result is sparse CSR).
        gpu_budget: Device bytes (or a size such as ``"8GiB"``) the product may allocate;
            ``None``: the free device memory less a margin. Applies per store: a non-symmetric
            ``A`` whose gradient is needed also runs its transpose under the same budget.
        host_budget: Pinned host bytes for tiles held in host memory; ``None``: half the RAM.
        device: Where the product runs; ``None``: ``X``'s device. ``X`` must be there.
        out: ``None`` (result on ``device``) or ``"host"`` (result in pinned host memory,
            written back tile by tile, for outputs that must not stay on the GPU).
        return_stats: Also return the call's :class:`~aires.scheduler.RunStats`.
        scheduler_options: Further :class:`~aires.scheduler.Scheduler` arguments, by name:
            ``slots``, ``disk_workers``, ``dual``, and the ablation switches ``prealloc``
            (``False``: a fresh device buffer per tile instead of the slot ring) and
            ``overlap`` (``False``: each tile's load and compute run one after the other).
            Schedulers are cached per store, budgets, device and these options.

    Returns:
        ``Y`` of shape ``(A.shape[0], F)`` and ``X``'s dtype, or ``(Y, stats)``.

    Raises:
        ValueError: shapes that do not chain (naming both), ``X`` without columns, ``X`` on
            another device, ``device="cuda"`` with no CUDA device, a bad ``out``, a malformed
            ``A`` (``build_store``'s message, naming ``A``), or a budget below the minimum
            working set (stated in the message, and including this call's output: a budget of
            exactly that minimum runs).
        TypeError: ``X`` is not a floating torch tensor; ``A`` is not a matrix
            ``build_store`` accepts; ``scheduler_options`` is not a dict of known option names.
        NotImplementedError: ``X`` is sparse and requires a gradient.

    Shapes:
        A: ``(N, K)``; X: ``(K, F)``; Y: ``(N, F)``.
    """
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
    if X.dim() != 2:
        raise ValueError(f"X must be 2-D, got shape {tuple(X.shape)}")
    if X.shape[1] == 0:
        raise ValueError(f"X must have at least one column, got shape {tuple(X.shape)}")
    if not X.is_floating_point():
        raise TypeError(f"X must have a floating dtype, got {X.dtype}")
    if out is not None and out != "host":
        raise ValueError(f"out must be None or 'host', got {out!r}")
    dev = X.device if device is None else _check_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if X.device != dev:
        raise ValueError(f"X is on {X.device} but device={dev}; move X there first")
    sparse = X.layout in (torch.sparse_csr, torch.sparse_coo)
    if not sparse and X.layout != torch.strided:
        raise TypeError(f"X must be dense, sparse CSR or sparse COO, got layout {X.layout}")
    store = _as_store(A, torch.float64 if X.dtype == torch.float64 else torch.float32)
    if store.shape[1] != X.shape[0]:
        raise ValueError(
            f"A has shape {tuple(store.shape)} and X has shape {tuple(X.shape)}: "
            f"A.shape[1] must equal X.shape[0]"
        )
    gpu = None if gpu_budget is None else parse_size(gpu_budget, "gpu_budget")
    host = None if host_budget is None else parse_size(host_budget, "host_budget", allow_zero=True)
    options = _check_options(scheduler_options)
    # The first call's output and workspace are reserved when its scheduler is created, so a
    # budget error states the minimum this call needs, not the slots' alone.
    f, dtype = int(X.shape[1]), X.dtype
    reserve = 0 if sparse else spmm_reserve(store, f, dtype, device=dev, out=out)
    scheduler = _scheduler(store, gpu, host, dev, options, reserve)
    if sparse:
        if X.requires_grad:
            raise NotImplementedError("the gradient with respect to a sparse X is not supported")
        y = scheduler.spgemm(X, out=out)
    else:

        def transposed() -> Scheduler:
            t = store.transpose()
            return _scheduler(t, gpu, host, dev, options, spmm_reserve(t, f, dtype, device=dev))

        y = _Product.apply(X, scheduler, transposed, out)
    if return_stats:
        stats = scheduler.stats
        assert stats is not None
        return y, stats
    return y


def clear_cache() -> None:
    """Close every cached scheduler (freeing its device and pinned memory) and forget temporary
    stores (their files are removed when ``A`` is garbage collected or at exit)."""
    with _lock:
        while _schedulers:
            _, scheduler = _schedulers.popitem(last=False)
            scheduler.close()
        _stores.clear()


class _Product(torch.autograd.Function):
    """``Y = A @ X`` with ``dX = A.T @ dY``; ``A`` is data, not a differentiable input.

    The scheduler computes without autograd (its kernels write into buffers); this function
    supplies the gradient. The backward pass is itself a ``_Product`` (of ``A.T``, whose
    transpose is ``A`` again), so higher-order gradients (``create_graph=True``) are right too.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        scheduler: Scheduler,
        transposed: Callable[[], Scheduler],
        out: str | None,
    ) -> torch.Tensor:
        ctx.scheduler = scheduler
        ctx.transposed = transposed
        ctx.device = x.device
        return scheduler.spmm(x, out=out)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        scheduler = ctx.scheduler
        dy = dy.to(ctx.device, non_blocking=True).contiguous()
        dx = _Product.apply(dy, ctx.transposed(), lambda: scheduler, None)
        return dx, None, None, None


def _check_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device``; CUDA only when a CUDA device is visible."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: cannot use {device!r} ({error})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is visible")
    return dev


def _check_options(options: Any) -> tuple[tuple[str, Any], ...]:
    """``scheduler_options`` as a sorted, hashable tuple (values are checked by Scheduler)."""
    if options is None:
        return ()
    if not isinstance(options, dict):
        raise TypeError(f"scheduler_options must be a dict or None, got {type(options).__name__}")
    unknown = sorted(set(options) - set(SCHEDULER_OPTIONS))
    if unknown:
        raise TypeError(
            f"scheduler_options has unknown names {unknown}; choose from {list(SCHEDULER_OPTIONS)}"
        )
    return tuple(sorted(options.items()))


def _scheduler(
    store: TileStore,
    gpu: int | None,
    host: int | None,
    device: torch.device,
    options: tuple[tuple[str, Any], ...] = (),
    reserve: int = 0,
) -> Scheduler:
    """The cached scheduler for these arguments; a new one reserves ``reserve`` device bytes
    for its first call's output (a cached one re-places itself if a call needs more)."""
    key = (str(Path(store.path).resolve()), gpu, host, str(device), options)
    with _lock:
        scheduler = _schedulers.get(key)
        if scheduler is None:
            scheduler = Scheduler(
                store,
                gpu_budget=gpu,
                host_budget=host,
                device=device,
                reserve_bytes=reserve,
                **dict(options),
            )
            _schedulers[key] = scheduler
            while len(_schedulers) > MAX_SCHEDULERS:
                _, old = _schedulers.popitem(last=False)
                old.close()
        _schedulers.move_to_end(key)
        return scheduler


def _as_store(A: Any, value_dtype: torch.dtype) -> TileStore:
    """``A`` itself if it is a store, else its temporary store (built on first use)."""
    if isinstance(A, TileStore):
        return A
    anchor = A[0] if isinstance(A, tuple) and A else A
    dtype = str(value_dtype).removeprefix("torch.")
    key = (id(anchor), dtype)
    with _lock:
        entry = _stores.get(key)
        if entry is not None and entry[0]() is anchor:
            return entry[1]
        try:
            ref = weakref.ref(anchor)
        except TypeError:
            raise TypeError(
                f"A must be a TileStore or a matrix build_store accepts, got {type(A).__name__}"
            ) from None
        tmp = tempfile.mkdtemp(prefix="aires-matmul-")
        try:
            store = build_store(A, Path(tmp) / "A", value_dtype=np.dtype(dtype), progress=False)
        except (ValueError, TypeError) as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise type(error)(_naming_a(str(error))) from error
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        weakref.finalize(anchor, _forget, key, tmp)
        _stores[key] = (ref, store)
        return store


def _naming_a(message: str) -> str:
    """``build_store``'s message about its ``matrix`` argument, naming ``A`` instead."""
    if message.startswith("matrix"):
        return "A" + message.removeprefix("matrix")
    return f"A: {message}"


def _forget(key: tuple[int, str], tmp: str) -> None:
    """``A`` is gone: close its schedulers and remove its temporary store (and transpose)."""
    with _lock:
        entry = _stores.pop(key, None)
        if entry is not None:
            entry[1].close()
        for skey in [k for k in _schedulers if k[0].startswith(str(Path(tmp).resolve()))]:
            _schedulers.pop(skey).close()
    shutil.rmtree(tmp, ignore_errors=True)
