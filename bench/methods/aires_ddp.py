"""``aires-ddp``: ``aires`` split by rows over every visible GPU (two processes on a CPU).

The same model, weights and budget per device as ``aires``
(:func:`bench.methods.aires.run_model`), run as ``aires.nn.GCN(distributed=True)`` by one
process per GPU through :func:`aires.distributed.launch` (NCCL; ``gloo`` on the CPU), each
capped at the budget on its own GPU. Run beside ``aires`` in one call, the two give the
speed-up at the same per-GPU budget. The tile store is built here once; every rank opens it
and streams its own tiles.

Reported: rank 0's result (its epochs end at the same collectives as every rank's), the ranks'
measured and predicted bytes per path (``per_rank``; ``exchange`` is what each received), the
balanced model of the exchange, ``(P - 1) / P`` of every aggregated panel but those of ``x``
when the ranks hold it whole (``exchange_model_bytes``), and the exchange's ceiling: the
broadcast bandwidth between the ranks, measured after training over the same backend
(``broadcast_GBps``), and the seconds an epoch's exchange takes at it (``exchange_floor_s``;
the exchange is not overlapped with compute, so this is time the epoch spends on it).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.distributed as dist

from bench.methods.aires import run_model, tile_store
from bench.methods.config import MethodConfig
from bench.methods.result import MethodResult
from bench.methods.workload import Workload, load_workload

__all__ = ["BROADCAST_BYTES", "CPU_RANKS", "broadcast_bandwidth", "ranks", "run"]

#: Processes on a CPU, where there are no GPUs to count: enough to exercise the exchange.
CPU_RANKS = 2
#: Bytes of the broadcast that measures the exchange's bandwidth (a GPU's, a CPU's).
BROADCAST_BYTES = {"cuda": 256 << 20, "cpu": 16 << 20}


def ranks(device: torch.device) -> int:
    """Every visible GPU, or :data:`CPU_RANKS` on the CPU."""
    return torch.cuda.device_count() if device.type == "cuda" else CPU_RANKS


def run(workload: Workload, config: MethodConfig) -> MethodResult:
    """Train ``aires`` over :func:`ranks` processes; report rank 0's epochs and every rank's
    traffic."""
    from aires.distributed import launch

    device = config.torch_device()
    nproc = ranks(device)
    tile_store(workload, config, 4096)  # built here, once, for every rank to open
    results = launch(_rank, nproc, (config,), device=device.type)
    result = results[0]
    item = 4  # the workload's features are float32
    received = max(r.extra["measured_bytes"]["exchange"] for r in results)
    bandwidth = result.extra.get("broadcast_GBps")
    result.extra.update(
        exchange_floor_s=received / (bandwidth * 1e9) if bandwidth else None,
        processes=nproc,
        per_rank=[{"measured": r.extra["measured_bytes"], "predicted": r.extra["predicted_bytes"]}
                  for r in results],
        exchange_model_bytes=(nproc - 1) * workload.num_nodes
        * result.extra["exchanged_columns"] * item // nproc,
    )
    return result


def _rank(config: MethodConfig) -> MethodResult:
    """One rank: the ``aires`` run on this rank's GPU, capped at the budget there."""
    from aires.distributed import init_from_env
    from bench.methods.run import cap_process

    device = init_from_env(torch.device(config.device).type)
    config = replace(config, device=str(device))
    cap_process(config, device)
    # A failure raises, and the launcher stops every rank and raises it here (as ``oom`` when
    # the rank ran out of memory, by its message).
    result = run_model(load_workload(config.workload), config, device, distributed=True)
    if result.status == "ok":
        result.extra["broadcast_GBps"] = broadcast_bandwidth(device)
    return result


def broadcast_bandwidth(device: torch.device, repeats: int = 5) -> float:
    """GB/s of one rank's broadcast to the others (median of ``repeats``): what the exchange,
    one broadcast per owner, moves at."""
    buf = torch.empty(BROADCAST_BYTES[device.type], dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=0)  # warm-up: NCCL sets up its channels on the first call
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        dist.broadcast(buf, src=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return buf.numel() / sorted(times)[len(times) // 2] / 1e9
