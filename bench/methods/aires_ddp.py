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
when the ranks hold it whole (``exchange_model_bytes``), and the ceilings that bound the epoch:

- the exchange's: the broadcast bandwidth between the ranks that the model measured at set-up
  and planned with (``broadcast_GBps``), and the seconds an epoch's exchange takes at it
  (``exchange_floor_s``; each piece of a panel is exchanged while the next is copied in, so
  of this time the epoch waits only for each panel's last piece);
- the copies': pinned host to device, and back, on every rank at once (``concurrent_copy_GBps``,
  per rank: ``h2d``, ``d2h``; on a GPU only), where the ranks share the host's memory and links,
  and the seconds the busiest rank's bytes take at them, its two directions overlapped
  (``copy_floor_s``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from bench.methods.aires import run_model, tile_store
from bench.methods.config import MethodConfig
from bench.methods.result import MethodResult
from bench.methods.workload import Workload, load_workload

__all__ = ["COPY_BYTES", "CPU_RANKS", "concurrent_copy_bandwidth", "ranks", "run"]

#: Processes on a CPU, where there are no GPUs to count: enough to exercise the exchange.
CPU_RANKS = 2
#: Bytes of each direction's copy that measures the ranks' concurrent copy bandwidth.
COPY_BYTES = 1 << 30


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
    copies = [r.extra.get("concurrent_copy_GBps") for r in results]
    result.extra.update(
        exchange_floor_s=received / (bandwidth * 1e9) if bandwidth else None,
        processes=nproc,
        per_rank=[{"measured": r.extra["measured_bytes"], "predicted": r.extra["predicted_bytes"]}
                  for r in results],
        exchange_model_bytes=(nproc - 1) * workload.num_nodes
        * result.extra["exchanged_columns"] * item // nproc,
        concurrent_copy_GBps=copies if all(copies) else None,
        copy_floor_s=_copy_floor(results, copies) if all(copies) else None,
    )
    return result


def _copy_floor(results: list[MethodResult], copies: list[dict[str, float]]) -> float:
    """Seconds the busiest rank's copies take at the ranks' concurrent rates, its two
    directions overlapped."""
    return max(
        max(r.extra["measured_bytes"][way] / (rates[way] * 1e9) for way in ("h2d", "d2h"))
        for r, rates in zip(results, copies, strict=True)
    )


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
        result.extra["broadcast_GBps"] = result.extra["exchange_bandwidth"] / 1e9
        if device.type == "cuda":
            result.extra["concurrent_copy_GBps"] = concurrent_copy_bandwidth(device)
    return result


def concurrent_copy_bandwidth(device: torch.device, repeats: int = 3) -> dict[str, float]:
    """GB/s of this rank's pinned copies to the device (``h2d``), then from it (``d2h``), each
    started by every rank together (median of ``repeats``): the bandwidth of each direction
    when the ranks share the host. (Both directions at once on two H200s gave 37.1 and
    50.8 GB/s a rank, yet an epoch copied 41 GB/s to each device: its directions overlap only
    in part, so that pair is no floor.)"""
    host = torch.empty(COPY_BYTES, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    rates = {}
    for key, (dst, src) in {"h2d": (dev, host), "d2h": (host, dev)}.items():
        times = []
        for i in range(repeats + 1):  # the first pass maps the pages and wakes the links
            torch.cuda.synchronize(device)
            dist.barrier()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            stop.record()
            stop.synchronize()
            if i:
                times.append(start.elapsed_time(stop) / 1e3)
        rates[key] = COPY_BYTES / sorted(times)[len(times) // 2] / 1e9
    return rates
