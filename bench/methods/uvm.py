"""``uvm``: adjacency and features in CUDA managed memory, kept on the host, read by the GPU.

What a user gets by moving the graph into unified memory instead of tiling it: ``Â`` (CSR) and
``X`` are allocated with ``cudaMallocManaged`` (CuPy), advised to prefer host memory
(``cudaMemAdviseSetPreferredLocation``: host) and to be mapped for the GPU
(``cudaMemAdviseSetAccessedBy``: the device), so GPU kernels read them over PCIe without page
migration. The products are the same torch CSR (cuSPARSE) and dense kernels on tensors that
wrap the managed memory (CUDA Array Interface, no copy). Activations live on the GPU.

CUDA 13 changed ``cudaMemAdvise`` to take a ``cudaMemLocation``; CuPy's ``runtime.memAdvise``
answers "invalid argument" there, so the advice goes through the ``cuda-bindings`` package
(either signature) and is read back with ``cudaMemRangeGetAttribute``.

Safety: managed memory larger than the GPU's free memory can hang a shared GPU when it is
oversubscribed, so the method refuses (status ``error``) unless the managed bytes are below the
free GPU memory. ``bytes_h2d`` counts the managed bytes the kernels read per epoch (``Â`` once
per product, ``X`` once per feature product): reads over PCIe, not copies.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch

from bench.methods.config import MethodConfig
from bench.methods.gcn import StreamedGCN
from bench.methods.result import MethodResult
from bench.methods.training import Traffic, initial_parameters, layer_dims, train
from bench.methods.workload import Workload

__all__ = [
    "ManagedAdjacency",
    "ManagedFeatures",
    "advise_host_resident",
    "managed_bytes",
    "managed_tensor",
    "run",
]

_COPY_BYTES = 256 << 20


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError as error:
        raise ImportError(
            "the uvm baseline needs the cuda-bindings package (pip install cuda-bindings) to "
            "advise managed memory"
        ) from error
    return runtime


def _check(cudart: Any, result: tuple[Any, ...], what: str) -> Any:
    err = result[0]
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        raise RuntimeError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    return result[1] if len(result) > 1 else None


def _location(cudart: Any, kind: str, ident: int) -> Any:
    location = cudart.cudaMemLocation()
    location.type = getattr(cudart.cudaMemLocationType, kind)
    location.id = ident
    return location


def advise_host_resident(ptr: int, nbytes: int, device: int) -> None:
    """Advise managed memory to stay on the host and be mapped for ``device``; verify it.

    Raises:
        RuntimeError: a CUDA call failed or the advice did not take effect.
    """
    cudart = _cudart()
    advice = cudart.cudaMemoryAdvise
    settings = (
        (advice.cudaMemAdviseSetPreferredLocation, "cudaMemLocationTypeHost", 0, -1),
        (advice.cudaMemAdviseSetAccessedBy, "cudaMemLocationTypeDevice", device, device),
    )
    for setting, kind, ident, ordinal in settings:
        try:
            result = cudart.cudaMemAdvise(ptr, nbytes, setting, _location(cudart, kind, ident))
        except TypeError:
            # cuda-bindings 12.x: cudaMemAdvise(devPtr, count, advice, device), host = -1
            # (cudaCpuDeviceId).
            result = cudart.cudaMemAdvise(ptr, nbytes, setting, ordinal)
        _check(cudart, result, f"cudaMemAdvise({setting.name})")
    attribute = cudart.cudaMemRangeAttribute
    preferred = _check(
        cudart,
        cudart.cudaMemRangeGetAttribute(
            4, attribute.cudaMemRangeAttributePreferredLocation, ptr, nbytes
        ),
        "cudaMemRangeGetAttribute(PreferredLocation)",
    )
    if int(preferred) != -1:
        raise RuntimeError(
            f"cudaMemAdvise did not take effect: preferred location is {int(preferred)}, "
            "expected the host (-1)"
        )
    count = torch.cuda.device_count()
    accessed = _check(
        cudart,
        cudart.cudaMemRangeGetAttribute(
            4 * count, attribute.cudaMemRangeAttributeAccessedBy, ptr, nbytes
        ),
        "cudaMemRangeGetAttribute(AccessedBy)",
    )
    accessed = list(accessed) if isinstance(accessed, (list, tuple)) else [accessed]
    if device not in [int(a) for a in accessed]:
        raise RuntimeError(
            f"cudaMemAdvise did not take effect: accessed-by lists {accessed}, not device {device}"
        )


def managed_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A CUDA tensor over new managed memory holding ``array``, advised to stay on the host.

    The advice is set before the first touch, then the host fills the pages (so they are born
    in host memory).
    """
    try:
        import cupy
    except ImportError as error:
        raise ImportError(
            "the uvm baseline needs CuPy for managed memory (pip install aires[gpu])"
        ) from error
    nbytes = max(array.nbytes, 1)
    memory = cupy.cuda.malloc_managed(nbytes)
    advise_host_resident(memory.ptr, nbytes, device.index or 0)
    pages = (ctypes.c_byte * nbytes).from_address(memory.ptr)
    host = np.frombuffer(pages, dtype=np.uint8)[: array.nbytes].view(array.dtype)
    flat = array.reshape(-1)
    step = max(1, _COPY_BYTES // max(1, array.itemsize))
    for start in range(0, len(flat), step):
        host[start : start + step] = flat[start : start + step]
    return torch.as_tensor(
        cupy.ndarray(array.shape, array.dtype, memptr=memory), device=device
    )


class ManagedAdjacency:
    """``Â`` as a torch CSR tensor over host-resident managed memory."""

    def __init__(self, workload: Workload, device: torch.device, traffic: Traffic) -> None:
        index = np.int32 if max(workload.nnz, workload.num_nodes) < 2**31 else np.int64
        arrays = [
            np.asarray(workload.adj_indptr).astype(index),
            np.asarray(workload.adj_indices).astype(index, copy=False),
            np.asarray(workload.adj_data, dtype=np.float32),
        ]
        self.nbytes = sum(a.nbytes for a in arrays)
        crow, col, val = (managed_tensor(a, device) for a in arrays)
        n = workload.num_nodes
        self.matrix = torch.sparse_csr_tensor(crow, col, val, (n, n), check_invariants=False)
        self.traffic = traffic

    def spmm(self, dense: torch.Tensor) -> torch.Tensor:
        """``Â @ dense`` read from managed memory. Shapes: ``(N, C) -> (N, C)``."""
        self.traffic.h2d += self.nbytes
        return torch.sparse.mm(self.matrix, dense)


class ManagedFeatures:
    """``X`` in host-resident managed memory."""

    def __init__(self, workload: Workload, device: torch.device, traffic: Traffic) -> None:
        self.x = managed_tensor(np.asarray(workload.x, dtype=np.float32), device)
        self.traffic = traffic

    def matmul(self, weight: torch.Tensor) -> torch.Tensor:
        """``X @ weight``. Shapes: ``(F, C) -> (N, C)``."""
        self.traffic.h2d += self.x.nbytes
        return self.x @ weight

    def t_matmul(self, grad: torch.Tensor) -> torch.Tensor:
        """``Xᵀ @ grad``. Shapes: ``(N, C) -> (F, C)``."""
        self.traffic.h2d += self.x.nbytes
        return self.x.T @ grad

    def aggregate(self, adjacency: ManagedAdjacency) -> torch.Tensor:
        """``Â @ X``, both read from managed memory. Shapes: ``() -> (N, F)``."""
        self.traffic.h2d += self.x.nbytes
        return adjacency.spmm(self.x)


def managed_bytes(workload: Workload) -> int:
    """Managed bytes the method allocates for ``workload``."""
    index = 4 if max(workload.nnz, workload.num_nodes) < 2**31 else 8
    return (workload.num_nodes + 1 + workload.nnz) * index + workload.nnz * 4 + workload.x.size * 4


def run(workload: Workload, config: MethodConfig) -> MethodResult:
    """Train with the graph in managed memory; refuse if it exceeds the free GPU memory.

    Raises:
        RuntimeError: no CUDA device, or the managed bytes are not below the GPU's free memory.
    """
    device = config.torch_device()
    if device.type != "cuda":
        raise RuntimeError("uvm needs a CUDA GPU (managed memory); none is in use")
    need = managed_bytes(workload)
    free, _ = torch.cuda.mem_get_info(device)
    if need >= free:
        raise RuntimeError(
            f"uvm refused: {need} bytes of managed memory would not be below the GPU's "
            f"{free} free bytes, and oversubscribed managed memory can hang a shared GPU"
        )
    traffic = Traffic()
    model = StreamedGCN(
        initial_parameters(layer_dims(workload, config), config.seed),
        ManagedFeatures(workload, device, traffic),
        ManagedAdjacency(workload, device, traffic),
        device,
    )
    log = train(model, list(model.parameters()), workload, config, device, traffic)
    return log.result(device, managed_bytes=need, bytes_h2d_kind="managed reads over PCIe")
