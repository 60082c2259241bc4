"""Physical ceilings measured in the same run as the benchmark, and the machine's banner facts.

Each number bounds what a method can reach on this machine, so the report can say how close
AIRES comes:

- ``h2d_GBps``: pinned host to GPU copies of ``copy_bytes`` (1 GiB), timed with CUDA events;
- ``disk_read_GBps``: a cold sequential read of a ``disk_bytes`` file with one thread, the file's
  pages evicted first (``posix_fadvise(DONTNEED)``, and ``drop_caches`` when running as root);
  ``cold`` says whether eviction was possible;
- ``incore_spmm_ms``: one in-core SpMM ``Â @ X`` with ``X`` of ``hidden`` columns, the torch
  CSR (cuSPARSE) kernel every method uses, median of several runs timed with CUDA events.

These are the measurements DESIGN.md quotes ("host to GPU, pinned, 1 GiB copies"; "disk, cold
read, one thread").

Run as ``python -m bench.ceilings CONFIG.json OUT.json`` in a process of its own (the CLI does),
so its GPU allocations never count against a method.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.methods.chunks import csr_tensor
from bench.methods.cold import drop_page_cache
from bench.methods.result import is_out_of_memory
from bench.methods.workload import Workload, load_workload

__all__ = [
    "device_facts",
    "disk_read_bandwidth",
    "h2d_bandwidth",
    "incore_spmm_ms",
    "io_mode",
    "main",
    "measure",
]

_READ_CHUNK = 16 << 20


def h2d_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float | None:
    """Pinned host to GPU bandwidth in GB/s of ``repeats`` back-to-back ``nbytes`` copies.

    ``None`` without a GPU.
    """
    if not torch.cuda.is_available():
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    device.copy_(host, non_blocking=True)  # warm-up: maps the pages, wakes the link
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        device.copy_(host, non_blocking=True)
    stop.record()
    stop.synchronize()
    return repeats * nbytes / (start.elapsed_time(stop) / 1e3) / 1e9


def disk_read_bandwidth(directory: str | Path, nbytes: int) -> tuple[float, bool]:
    """Cold sequential read bandwidth (GB/s) of a ``nbytes`` file written in ``directory``.

    Returns:
        ``(GB/s, cold)``; ``cold`` is False where the page cache could not be dropped.
    """
    path = Path(directory) / f"ceiling-{nbytes}.bin"
    if not path.is_file() or path.stat().st_size != nbytes:
        block = np.random.default_rng(0).integers(0, 255, _READ_CHUNK, dtype=np.uint8).tobytes()
        with open(path, "wb") as handle:
            for offset in range(0, nbytes, _READ_CHUNK):
                handle.write(block[: min(_READ_CHUNK, nbytes - offset)])
    cold = drop_page_cache([path])
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(view):
            pass
    return nbytes / (time.perf_counter() - start) / 1e9, cold


def incore_spmm_ms(workload: Workload, columns: int, repeats: int = 5) -> float | None:
    """Median time (ms) of ``Â @ X`` in core, ``X`` random with ``columns`` columns.

    Timed with CUDA events on a GPU (``perf_counter`` on a CPU), one warm-up call first.
    ``None`` when ``Â`` and ``X`` do not fit the device (the ceiling is then unmeasurable).
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    index = np.int32 if max(workload.nnz, workload.num_nodes) < 2**31 else np.int64
    try:
        matrix = csr_tensor(
            torch.from_numpy(np.asarray(workload.adj_indptr).astype(index)).to(device),
            torch.from_numpy(np.asarray(workload.adj_indices).astype(index)).to(device),
            torch.from_numpy(np.array(workload.adj_data, dtype=np.float32)).to(device),
            workload.num_nodes,
        )
        dense = torch.randn(workload.num_nodes, columns, device=device)
        torch.sparse.mm(matrix, dense)  # warm-up: cuSPARSE handle and workspace
        times = []
        for _ in range(repeats):
            if cuda:
                start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                torch.sparse.mm(matrix, dense)
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop) / 1e3)
            else:
                t0 = time.perf_counter()
                torch.sparse.mm(matrix, dense)
                times.append(time.perf_counter() - t0)
    except RuntimeError as error:  # torch.OutOfMemoryError included
        if is_out_of_memory(error):
            return None
        raise
    return float(np.median(times) * 1e3)


def io_mode() -> str:
    """How tiles reach the GPU from disk here: ``gds``, ``kvikio-compat`` or ``posix``.

    GPUDirect Storage needs KvikIO and the ``nvidia-fs`` kernel module; with KvikIO but no
    module, KvikIO runs in compatibility mode (POSIX reads through bounce buffers).
    """
    if not torch.cuda.is_available():
        return "posix"
    try:
        import kvikio  # noqa: F401
    except ImportError:
        return "posix"
    return "gds" if Path("/proc/driver/nvidia-fs").exists() else "kvikio-compat"


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    done = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout else None


def device_facts() -> dict[str, Any]:
    """Device name, driver, torch and CUDA versions, GPU memory: the banner's first lines."""
    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "io_mode": io_mode(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(
            device=props.name,
            driver=_driver_version(),
            gpu_total_bytes=props.total_memory,
            gpu_free_bytes=torch.cuda.mem_get_info()[0],
        )
    else:
        facts.update(device=f"CPU ({platform.processor() or platform.machine()}, "
                     f"{os.cpu_count()} cores)", driver=None)
    return facts


def measure(
    workload: Workload, hidden: int, *, copy_bytes: int, disk_bytes: int, scratch: str | Path
) -> dict[str, Any]:
    """All ceilings and device facts, as the CLI stores them.

    Returns:
        ``{"device": {...}, "ceilings": {"h2d_GBps", "disk_read_GBps", "incore_spmm_ms"},
        "disk_cold": bool}``.
    """
    disk, cold = disk_read_bandwidth(scratch, disk_bytes)
    return {
        "device": device_facts(),
        "ceilings": {
            "h2d_GBps": h2d_bandwidth(copy_bytes),
            "disk_read_GBps": disk,
            "incore_spmm_ms": incore_spmm_ms(workload, hidden),
        },
        "disk_cold": cold,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m bench.ceilings CONFIG.json OUT.json``.

    ``CONFIG.json`` holds ``workload``, ``hidden``, ``copy_bytes``, ``disk_bytes``, ``scratch``.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.ceilings CONFIG.json OUT.json", file=sys.stderr)
        return 2
    config = json.loads(Path(args[0]).read_text())
    result = measure(
        load_workload(config["workload"]),
        config["hidden"],
        copy_bytes=config["copy_bytes"],
        disk_bytes=config["disk_bytes"],
        scratch=config["scratch"],
    )
    Path(args[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
