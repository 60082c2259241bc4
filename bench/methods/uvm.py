"""``uvm``: the in-core loop with every CUDA tensor, activations included, in managed memory.

What a user gets by letting unified memory do the out-of-core work: the ``incore-tuned``
training loop (:func:`~bench.methods.incore_tuned.incore_forward`, the same arithmetic) with
PyTorch's allocator replaced by one that allocates CUDA managed memory
(:mod:`bench.methods.managed`), so ``Â``, ``X``, weights, activations, gradients and kernel
workspaces all live in memory the driver can page between host and GPU.

Policy, named in the result's ``policy``:

- ``migrating`` (the driver's default) where the data fits the device: no budget, or one
  untimed pass needs no more managed bytes (Adam's state included) than the budget;
- ``host-preferred`` under a smaller budget: every block advised to stay in host memory and be
  mapped for the GPU, so kernels read and write it over PCIe (zero-copy) and the device holds
  none of it.

Safety: managed memory beyond the GPU's free memory can hang a shared GPU when it is
oversubscribed, so the method refuses (``ValueError``) when ``Â`` and ``X`` alone are not below
the free memory, and the allocator holds at most the free memory in all (a request past it is an
out-of-memory error, not an allocation).

The allocator must be installed before the process's first CUDA allocation, so the runner
leaves this method's process uncapped (:data:`CAPS_ITSELF`): the budget is the policy's.
``peak_gpu_bytes`` is the device memory the managed data took (free memory after one untimed
host-preferred pass, which loads the kernels and library handles but leaves the data in host
memory, less free memory after training: the managed blocks are kept to the end, so whatever
migrated is still counted); ``bytes_h2d`` is ``None``: the driver moves the pages, and nothing
here counts them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bench.methods.config import MethodConfig
from bench.methods.incore_tuned import incore_forward
from bench.methods.managed import Shim, build_shim, free_device_memory
from bench.methods.result import MethodResult
from bench.methods.training import labels, layer_orders, train
from bench.methods.workload import Workload

__all__ = ["CAPS_ITSELF", "check_fits", "managed_bytes", "run"]

#: The runner must not touch the CUDA allocator (cap, statistics) before :func:`run`.
CAPS_ITSELF = True


def managed_bytes(workload: Workload) -> int:
    """Managed bytes of ``Â`` and ``X`` as the in-core loop holds them (int64 CSR indices,
    float32 values and features)."""
    return (workload.num_nodes + 1 + workload.nnz) * 8 + workload.nnz * 4 + workload.x.size * 4


def check_fits(need: int, free: int) -> None:
    """Refuse managed memory that is not below the GPU's free memory.

    Raises:
        ValueError: ``need >= free``, naming both.
    """
    if need >= free:
        raise ValueError(
            f"uvm refused: {need} bytes of managed memory for the adjacency and features would "
            f"not be below the GPU's {free} free bytes, and oversubscribed managed memory can "
            "hang a shared GPU"
        )


def _pass_bytes(forward: Callable[[], torch.Tensor], params: list[torch.Tensor],
                workload: Workload, device: torch.device, shim: Shim) -> int:
    """Managed bytes one forward and backward pass holds, Adam's two moments on top."""
    y_train, train_idx = labels(workload, device)
    F.cross_entropy(forward()[train_idx], y_train).backward()
    for param in params:
        param.grad = None
    torch.cuda.synchronize(device)
    return shim.held + 2 * sum(p.nbytes for p in params)


def run(workload: Workload, config: MethodConfig) -> MethodResult:
    """Train the in-core loop in managed memory; the policy follows the budget.

    Raises:
        RuntimeError: no CUDA device, no C++ compiler, or an allocator already in use.
        ValueError: ``Â`` and ``X`` are not below the GPU's free memory.
    """
    device = config.torch_device()
    if device.type != "cuda":
        raise RuntimeError("uvm needs a CUDA GPU (managed memory); none is in use")
    free_before = free_device_memory(device.index or 0)
    check_fits(managed_bytes(workload), free_before)
    shim = Shim.for_device(build_shim(), limit=free_before, device=device.index or 0)
    try:
        torch.cuda.memory.change_current_allocator(torch.cuda.memory.CUDAPluggableAllocator(
            str(shim.path), "aires_uvm_malloc", "aires_uvm_free"))
    except RuntimeError as error:
        raise RuntimeError(f"uvm: cannot install the managed allocator ({error}); it must "
                           "come before the process's first CUDA allocation") from None
    shim.set_policy("host-preferred")  # safe while the need is unknown
    forward, params = incore_forward(workload, config, device)
    need = _pass_bytes(forward, params, workload, device, shim)
    # After one host-preferred pass the device holds what CUDA itself took (kernels loaded on
    # first use, library handles: some 235 MB on the H200), none of the managed data.
    free_base = torch.cuda.mem_get_info(device)[0]
    fits = config.gpu_budget is None or need <= config.gpu_budget
    policy = "migrating" if fits else "host-preferred"
    shim.set_policy(policy)
    torch.cuda.synchronize(device)  # a migrating policy's prefetches land before the epochs
    weight = params[0]  # any managed block shows whether the advice took
    preferred = shim.preferred_location(weight.data_ptr(), weight.nbytes)
    if (preferred == -1) != (policy == "host-preferred"):
        raise RuntimeError(f"uvm: the {policy} advice did not take (preferred location "
                           f"{preferred})")
    log = train(forward, params, workload, config, device)
    used = free_base - torch.cuda.mem_get_info(device)[0]
    return log.result(
        device,
        peak_gpu_bytes=int(np.clip(used, 0, None)),
        policy=policy,
        managed_bytes=shim.held,
        managed_peak_in_use=shim.peak,
        managed_pass_bytes=need,
        order=config.order,
        orders=layer_orders(workload, config),
    )
