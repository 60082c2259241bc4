"""Scheduler micro-benchmark: out-of-core SpMM and SpGEMM on an RMAT graph against their floors.

The graph is the one DESIGN.md measures ("Physical limits"): RMAT with the Graph500 initiator,
2**21 (~2.1M) nodes, ~58.9M nonzeros (symmetrised, self loops, GCN-normalised values), tiled
into a store once and cached in ``--workdir``. Variants, in one table:

===============  ==================================================================
``incore``       the whole matrix on the GPU, one torch CSR @ dense (cuSPARSE SpMM)
``host``         AIRES, every tile in pinned host memory, none resident, host DMA only
``nvme``         AIRES, every tile on NVMe (page cache dropped before each run)
``dual``         AIRES, every tile pinned *and* the (cold) NVMe path open: the dispatcher splits
``split``        AIRES, half the tiles pinned, half on NVMe (cold), both paths at once
``host-fresh``   ``host`` without the slot ring: a fresh buffer per tile (``prealloc=False``)
``host-serial``  ``host`` without overlap: each tile copied, then computed (``overlap=False``)
===============  ==================================================================

Floors measured in the same run: pinned host-to-GPU copy bandwidth (1 GiB copies, each timed,
before and after the SpMM variants; the floor uses the fastest copy, the physical limit) and
the cold read bandwidth of the tile file through the store's own reader, so ``host`` is judged
against ``max(incore, bytes / h2d)`` and ``nvme`` against ``bytes / cold read``. For one
``host`` call the bytes are those it copies while it runs: each call prefetches the next call's
first tiles (``bytes_prefetched`` in its stats). ``host`` is also run ``4 * --runs`` times back
to back (``loop``), where every copy falls inside the timed span and the whole store's floor
applies; the 1.05x target is judged there. SpGEMM with a sparse ``X`` (``--densities``): in
core (failures caught and recorded) and AIRES under ``--spgemm-budget``, checked against a
reference (row sums for every row, scipy on a sample).
``--tile-bytes`` takes a comma list: the first size runs everything, the others rerun
``--sweep-variants`` (default ``host``) on a store of that tile size (``tile_sweep`` in the JSON).
Peak device memory is read right after each variant's timed runs, before its result is checked.

Timing: CUDA events (``perf_counter`` on the CPU), warm-up first, median of ``--runs``.
``python -m bench.spmm --smoke`` runs a tiny size on the CPU. Results: JSON (``--out``, default
``bench/results/spmm-<date>.json``) with device, date, versions and the command.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from aires.checks import parse_size
from aires.scheduler import Scheduler, spmm_reserve
from aires.scheduler.stats import max_memory_allocated, reset_peak_memory_stats
from aires.scheduler.kernels import narrow_indices
from aires.scheduler.placement import format_bytes
from aires.tiling import TileStore, build_store
from bench.provenance import versions

__all__ = ["VARIANTS", "rmat_adjacency", "run", "main"]

#: The SpMM variants: name -> what it measures.
VARIANTS = {
    "incore": "whole matrix on the device, one cuSPARSE SpMM",
    "host": "AIRES, all tiles pinned in host memory, host DMA only",
    "nvme": "AIRES, all tiles on NVMe (cold page cache)",
    "dual": "AIRES, all tiles pinned, cold NVMe path open: the dispatcher may send pinned "
    "tiles over NVMe (never over a GPU's shared PCIe link), host's device budget",
    "split": "AIRES, half the tiles pinned, half on NVMe (cold), both paths",
    "host-fresh": "as host, a fresh device buffer per tile instead of the slot ring",
    "host-serial": "as host, each tile copied then computed, no overlap",
    "host-unchecked": "as host, tiles not checked (what the checks cost, beside host)",
    "nvme-unchecked": "as nvme, reads not checked (what the checks cost, beside nvme)",
}
#: Scheduler switches of the ablation variants (``bench.methods.aires`` uses the same names).
OPTIONS: dict[str, dict[str, bool]] = {
    "host-fresh": {"prealloc": False},
    "host-serial": {"overlap": False},
    "host-unchecked": {"checks": False},
    "nvme-unchecked": {"checks": False},
}
GRAPH500 = (0.57, 0.19, 0.19, 0.05)
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------- the graph


def rmat_adjacency(
    n_nodes: int, nnz: int, *, seed: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """A symmetric RMAT adjacency with self loops and GCN values, about ``nnz`` entries.

    Edges are drawn level by level with the Graph500 initiator (vectorised over all edges),
    relabelled by a random permutation (hubs spread over the ids), symmetrised and deduplicated;
    rounds of extra edges top it up until it holds at least 99% of ``nnz``. Values are
    ``D^-1/2 (A + I) D^-1/2``.

    Returns:
        ``(indptr int64, indices int32, data float32, shape)`` as numpy arrays.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    bits = max(1, math.ceil(math.log2(n_nodes)))
    perm = torch.randperm(n_nodes, generator=gen, device=device)
    target = nnz - n_nodes
    keys = torch.empty(0, dtype=torch.int64, device=device)
    for _ in range(8):
        missing = target - keys.numel()
        if missing <= 0.01 * target:
            break
        m = int(missing / 2 * 1.2) + 1024
        rows = torch.zeros(m, dtype=torch.int64, device=device)
        cols = torch.zeros(m, dtype=torch.int64, device=device)
        a, b, c, _ = GRAPH500
        for level in range(bits):
            r = torch.rand(m, generator=gen, device=device)
            rows |= (r >= a + b).to(torch.int64) << level
            cols |= (((r >= a) & (r < a + b)) | (r >= a + b + c)).to(torch.int64) << level
        keep = (rows < n_nodes) & (cols < n_nodes) & (rows != cols)
        rows, cols = perm[rows[keep]], perm[cols[keep]]
        keys = torch.unique(torch.cat([keys, rows * n_nodes + cols, cols * n_nodes + rows]))
        del rows, cols
    diag = torch.arange(n_nodes, device=device) * (n_nodes + 1)
    keys = torch.unique(torch.cat([keys, diag]))
    rows, cols = keys // n_nodes, keys % n_nodes
    del keys
    deg = torch.bincount(rows, minlength=n_nodes)
    indptr = torch.zeros(n_nodes + 1, dtype=torch.int64, device=device)
    torch.cumsum(deg, 0, out=indptr[1:])
    inv = deg.to(torch.float32).rsqrt()
    data = inv[rows] * inv[cols]
    return (
        indptr.cpu().numpy(),
        cols.to(torch.int32).cpu().numpy(),
        data.cpu().numpy(),
        (n_nodes, n_nodes),
    )


def graph_store(
    args: argparse.Namespace, device: torch.device, tile_bytes: int
) -> tuple[TileStore, dict[str, Any]]:
    """The RMAT tile store for ``args`` with ``tile_bytes`` tiles, built once under
    ``args.workdir`` and reopened after."""
    name = f"rmat-n{args.nodes}-nnz{int(args.nnz)}-s{args.seed}-t{tile_bytes}"
    path = Path(args.workdir) / name
    info: dict[str, Any] = {"path": str(path)}
    t0 = time.perf_counter()
    if (path / "manifest.json").is_file():
        store = TileStore.open(path)
        info["reused"] = True
    else:
        indptr, indices, data, shape = rmat_adjacency(
            args.nodes, int(args.nnz), seed=args.seed, device=device
        )
        info["generate_s"] = time.perf_counter() - t0
        store = build_store(
            (indptr, indices, data, shape),
            path,
            tile_bytes=tile_bytes,
            symmetric=True,
            progress=False,
            overwrite=True,
        )
        info["reused"] = False
    tiles = store.tiles
    info.update(
        nodes=store.shape[0],
        nnz=store.nnz,
        tile_bytes=store.tile_bytes,
        tiles=len(tiles),
        store_bytes=sum(t.nbytes for t in tiles),
        partial_tiles=sum(t.partial for t in tiles),
        ready_s=time.perf_counter() - t0,
    )
    return store, info


def incore_csr(store: TileStore, device: torch.device) -> torch.Tensor:
    """The whole matrix as one torch CSR on ``device`` (int32 indices when they fit)."""
    m = store.to_scipy()
    index = torch.int32 if m.nnz < 2**31 else torch.int64
    return torch.sparse_csr_tensor(
        torch.from_numpy(m.indptr).to(device=device, dtype=index),
        torch.from_numpy(m.indices).to(device=device, dtype=index),
        torch.from_numpy(m.data).to(device),
        m.shape,
        check_invariants=False,
    )


def sparse_features(
    n: int, f: int, density: float, *, seed: int, device: torch.device
) -> torch.Tensor:
    """An ``n x f`` sparse CSR ``X`` keeping each entry with probability ``density``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    values = torch.rand(n, f, generator=gen, device=device)
    mask = torch.rand(n, f, generator=gen, device=device) < density
    x = (values * mask).to_sparse_csr()
    del values, mask
    return narrow_indices(x)  # int32, as cuSPARSE SpGEMM takes them: no per-call conversion


# ---------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    runs: int,
    warmup: int,
    before: Callable[[], Any] | None = None,
) -> tuple[list[float], Any]:
    """Milliseconds of ``runs`` calls of ``fn`` after ``warmup`` (CUDA events on a GPU).

    ``before`` runs ahead of every call, untimed (dropping the page cache, say).

    Returns:
        The times and the last call's result.
    """
    result = None
    times = []
    for i in range(warmup + runs):
        if before is not None:
            before()
        sync(device)
        result = None
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            result = fn()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return times, result


def back_to_back(fn: Callable[[], Any], device: torch.device, *, calls: int) -> dict[str, Any]:
    """Milliseconds per call of ``calls`` calls of ``fn`` queued one after another with no wait
    between them (:func:`timed` around the whole loop, after one untimed loop): the steady
    state of a loop, where each call's prefetch of the next call's first tiles overlaps its own
    tail."""

    def loop() -> None:
        for _ in range(calls):
            fn()

    (ms,), _ = timed(loop, device, runs=1, warmup=1)
    return {"calls": calls, "per_call_ms": ms / calls}


def peak_start(device: torch.device) -> int:
    """Reset the peak-memory counter; the bytes allocated now (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def summary(times: list[float]) -> dict[str, Any]:
    return {
        "ms": [round(t, 4) for t in times],
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "spread_ms": max(times) - min(times),
    }


def drop_caches(path: Path, *, system: bool = True) -> bool:
    """Evict ``path`` from the page cache: ``posix_fadvise(DONTNEED)`` and, with ``system``
    (root only), ``echo 3 > /proc/sys/vm/drop_caches``. Whether the global drop succeeded."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
    if not system:
        return False
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("3\n")
        return True
    except OSError:
        return False


def h2d_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> list[float]:
    """Pinned host -> device bandwidth of ``repeats`` copies of ``nbytes``, each timed on its
    own, in bytes/s (after one untimed copy; empty on the CPU)."""
    if device.type != "cuda":
        return []
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
    events[0].record()
    for k in range(repeats):
        dev.copy_(host, non_blocking=True)
        events[k + 1].record()
    events[-1].synchronize()
    return [nbytes / (a.elapsed_time(b) / 1e3) for a, b in itertools.pairwise(events)]


def cold_read_bandwidth(store: TileStore, device: torch.device, *, system: bool) -> dict[str, Any]:
    """Read every tile once from a cold page cache through the store's reader into the place
    the scheduler reads it to (a device slot with KvikIO, pinned host memory otherwise)."""
    slot_bytes = max(t.nbytes for t in store.tiles)
    direct = device.type == "cuda" and store.io_mode != "posix"
    if direct:
        buf = torch.empty(slot_bytes, dtype=torch.uint8, device=device)
    else:
        buf = torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    cold = drop_caches(store.data_path, system=system)
    t0 = time.perf_counter()
    total = 0
    for t in store.tiles:
        total += store.read_bytes(t.index, buf, verify=False)
    sync(device)
    seconds = time.perf_counter() - t0
    return {
        "bytes": total,
        "seconds": seconds,
        "bw": total / seconds,
        "cold": cold,
        "into": "device (KvikIO)" if direct else "host",
    }


# ---------------------------------------------------------------------------- variants


def budgets(
    store: TileStore, device: torch.device, f: int, variant: str, workers: int
) -> dict[str, Any]:
    """Scheduler arguments that put the tiles where ``variant`` wants them, none resident."""
    slot = max(t.nbytes for t in store.tiles)
    total = sum(t.nbytes for t in store.tiles)
    reserve = spmm_reserve(store, f, torch.float32, device=device)
    direct = device.type != "cuda" or store.io_mode != "posix"
    staging = 0 if direct else workers * slot
    disk_gpu = (3 + workers) * slot + reserve
    if variant in ("host", "host-fresh", "host-serial", "host-unchecked"):
        return {"gpu_budget": 3 * slot + reserve, "host_budget": total, "dual": False}
    if variant in ("nvme", "nvme-unchecked"):
        return {"gpu_budget": disk_gpu, "host_budget": staging, "dual": False}
    if variant == "dual":
        # The disk slots only where pinned tiles may travel the disk path (not over a GPU's
        # shared link): elsewhere their room would make tiles resident, and dual would be
        # compared with host at a larger budget.
        gpu = disk_gpu if device.type != "cuda" else 3 * slot + reserve
        return {"gpu_budget": gpu, "host_budget": total + staging, "dual": True}
    if variant == "split":
        half = sum(t.nbytes for t in store.tiles[: len(store.tiles) // 2])
        return {"gpu_budget": disk_gpu, "host_budget": half + staging, "dual": True}
    raise ValueError(f"unknown variant {variant!r}")


def bench_spmm(
    args: argparse.Namespace,
    store: TileStore,
    a: torch.Tensor,
    device: torch.device,
    variants: Sequence[str],
) -> dict[str, Any]:
    n = store.shape[1]
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    x = torch.rand(n, args.features, generator=gen, device=device)
    results: dict[str, Any] = {}
    times, reference = timed(partial(torch.matmul, a, x), device, runs=args.runs, warmup=2)
    results["incore"] = summary(times)
    scale = reference.abs().max().item() or 1.0
    cold_files = store.data_path
    for variant in variants:
        if variant == "incore":
            continue
        kw = budgets(store, device, args.features, variant, args.disk_workers)
        options = OPTIONS.get(variant, {})
        # Placed for this output from the start: no tile is made resident only to be moved
        # out again by the first call.
        reserve = spmm_reserve(store, args.features, x.dtype, device=device)
        sched = Scheduler(
            store,
            device=device,
            disk_workers=args.disk_workers,
            reserve_bytes=reserve,
            **kw,
            **options,
        )
        on_disk = variant in ("nvme", "nvme-unchecked", "dual", "split")
        before = partial(drop_caches, cold_files, system=args.drop_caches) if on_disk else None
        base = peak_start(device)
        try:
            times, y = timed(
                partial(sched.spmm, x), device, runs=args.runs, warmup=1, before=before
            )
        except Exception as error:  # noqa: BLE001 - a failing variant is a result, not a crash
            results[variant] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            sched.close()
            continue
        # Before the check below: its temporaries are the benchmark's, not the scheduler's.
        peak = max_memory_allocated(device) - base if device.type == "cuda" else None
        stats = sched.stats
        err = max_rel_err(y, reference, scale)
        results[variant] = {
            **summary(times),
            "ok": err < 1e-4,
            "max_rel_err": err,
            "budgets": {k: v for k, v in kw.items()},
            "options": options,
            "placement": {
                "resident": len(sched.placement.resident),
                "host": len(sched.placement.host),
                "disk": len(sched.placement.disk),
                "disk_workers": sched.placement.n_disk,
            },
            "stats": stats.to_dict() if stats is not None else None,
        }
        if peak is not None:
            results[variant]["peak_gpu_bytes_measured"] = peak
            results[variant]["within_budget"] = peak <= sched.gpu_budget
        del y
        if variant == "host":
            results[variant]["loop"] = back_to_back(
                partial(sched.spmm, x), device, calls=4 * args.runs
            )
        sched.close()
    del reference, x
    return results


def max_rel_err(y: torch.Tensor, reference: torch.Tensor, scale: float) -> float:
    """``max |y - reference| / scale``, a block of rows at a time (bounded temporaries)."""
    worst = 0.0
    step = max(1, (64 << 20) // max(1, y.shape[1] * y.element_size()))
    for start in range(0, y.shape[0], step):
        part = y[start : start + step].to(reference.device) - reference[start : start + step]
        worst = max(worst, part.abs().max().item())
    return worst / scale


def check_spgemm(
    y: torch.Tensor, a: torch.Tensor, x: torch.Tensor, *, sample: int, seed: int
) -> dict[str, Any]:
    """Row sums of every row against ``A @ (X @ 1)``, and ``sample`` rows against scipy."""
    ones = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    got = torch.mv(y.to(x.device), ones)
    expected = torch.mv(a, torch.mv(x, ones))
    rowsum_err = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(a.shape[0], size=min(sample, a.shape[0]), replace=False))
    a_sp = sp.csr_array(
        (a.values().cpu().numpy(), a.col_indices().cpu().numpy(), a.crow_indices().cpu().numpy()),
        shape=tuple(a.shape),
    )
    x_sp = sp.csr_array(
        (x.values().cpu().numpy(), x.col_indices().cpu().numpy(), x.crow_indices().cpu().numpy()),
        shape=tuple(x.shape),
    )
    expected_rows = (a_sp[rows] @ x_sp).toarray()
    crow = y.crow_indices().cpu().numpy()
    col, val = y.col_indices(), y.values()
    got_rows = np.zeros_like(expected_rows)
    for k, r in enumerate(rows):
        lo, hi = int(crow[r]), int(crow[r + 1])
        np.add.at(got_rows[k], col[lo:hi].cpu().numpy(), val[lo:hi].cpu().numpy())
    sample_err = float(
        np.abs(got_rows - expected_rows).max() / max(np.abs(expected_rows).max(), 1e-30)
    )
    return {
        "rowsum_rel_err": rowsum_err,
        "sample_rows": len(rows),
        "sample_rel_err": sample_err,
        "ok": rowsum_err < 1e-3 and sample_err < 1e-4,
    }


def bench_spgemm(
    args: argparse.Namespace, store: TileStore, a: torch.Tensor, device: torch.device
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for density in args.densities:
        entry: dict[str, Any] = {}
        x = sparse_features(
            store.shape[1], args.features, density, seed=args.seed + 2, device=device
        )
        entry["x_nnz"] = x._nnz()
        base = peak_start(device)
        try:
            times, y = timed(partial(torch.matmul, a, x), device, runs=args.spgemm_runs, warmup=1)
            entry["incore"] = {**summary(times), "ok": True, "nnz": y._nnz()}
            del y
        except (RuntimeError, torch.OutOfMemoryError) as error:
            entry["incore"] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
        if device.type == "cuda":
            entry["incore"]["extra_gpu_bytes"] = max_memory_allocated(device) - base
            torch.cuda.empty_cache()
        sched = Scheduler(
            store,
            gpu_budget=args.spgemm_budget,
            host_budget=sum(t.nbytes for t in store.tiles),
            device=device,
        )
        base = peak_start(device)
        try:
            times, y = timed(partial(sched.spgemm, x), device, runs=args.spgemm_runs, warmup=1)
            aires: dict[str, Any] = {**summary(times), "nnz": y._nnz()}
            if device.type == "cuda":
                aires["peak_gpu_bytes_measured"] = max_memory_allocated(device) - base
                aires["within_budget"] = aires["peak_gpu_bytes_measured"] <= sched.gpu_budget
            stats = sched.stats
            aires["stats"] = stats.to_dict() if stats is not None else None
            aires["check"] = check_spgemm(y, a, x, sample=args.check_rows, seed=args.seed)
            aires["ok"] = aires["check"]["ok"]
            del y
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            aires = {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
        aires["gpu_budget"] = sched.gpu_budget
        entry["aires"] = aires
        sched.close()
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results[str(density)] = entry
    return results


def copied_in_call(stats: dict[str, Any]) -> int:
    """Tile bytes a call copied host -> device while it ran: the prefetched ones were copied
    before it began, during the previous call's tail."""
    return int(stats["bytes_h2d"]) - int(stats.get("bytes_prefetched", 0))


def host_bound_ms(stats: dict[str, Any], floors: dict[str, Any], rate: str = "h2d_Bps") -> float:
    """``max(in-core, floor)`` for a host-streamed call: the floor is the bytes it copied while
    it ran at the copy rate ``floors[rate]``."""
    return max(floors["incore_ms"], copied_in_call(stats) / floors[rate] * 1e3)


def loop_over_bound(host: dict[str, Any], graph: dict[str, Any], floors: dict[str, Any]) -> float:
    """``host``'s back-to-back calls against ``max(in-core, floor)``, the target's measure:
    every byte a call moves and all of its time fall inside the timed span, but the first
    call's prefetch (copied before the span, so taken off the floor)."""
    loop = host["loop"]
    moved = loop["calls"] * graph["store_bytes"] - host["stats"].get("bytes_prefetched", 0)
    floor_ms = moved / loop["calls"] / floors["h2d_Bps"] * 1e3
    return loop["per_call_ms"] / max(floors["incore_ms"], floor_ms)


def verdicts(res: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, computed from the measurements (``None`` where not measured)."""
    spmm = res["spmm"]
    floors = res["floors"]
    out: dict[str, Any] = {}

    def med(v: str) -> float | None:
        entry = spmm.get(v)
        return entry.get("median_ms") if entry and entry.get("ok", True) else None

    host, nvme, dual, split, incore = (med(v) for v in ("host", "nvme", "dual", "split", "incore"))
    if host is not None and incore is not None and floors.get("h2d_Bps"):
        stats = spmm["host"].get("stats") or {}
        # One call, timed alone: its floor is the bytes it copied while it ran.
        out["host_call_over_bound"] = host / host_bound_ms(stats, floors)
        out["host_call_bytes_copied"] = copied_in_call(stats)
        # The same call against every tile's copy, as if none had been prefetched.
        out["host_call_over_whole_store_bound"] = host / max(incore, floors["h2d_floor_ms"])
        if floors.get("h2d_median_Bps"):
            # Against the median copy rate (what a sustained stream of copies got).
            out["host_call_over_median_bound"] = host / host_bound_ms(
                stats, floors, "h2d_median_Bps"
            )
        if stats.get("bw_h2d"):
            # Against the copy rate the pipeline's own copies reached in that run: the
            # overhead of the pipeline itself (ramp, tail, launches), whatever the bus did.
            own = copied_in_call(stats) / stats["bw_h2d"] * 1e3
            out["host_call_over_own_copies"] = host / max(incore, own)
        if spmm["host"].get("loop"):
            out["host_loop_over_bound"] = loop_over_bound(spmm["host"], res["graph"], floors)
            out["host_target_1.05x"] = out["host_loop_over_bound"] <= 1.05
    if nvme is not None and floors.get("disk_floor_ms"):
        out["nvme_over_disk_floor"] = nvme / floors["disk_floor_ms"]
        out["nvme_target_1.15x"] = nvme <= 1.15 * floors["disk_floor_ms"]
    # "Faster" only when the slowest run beats the other's fastest: the medians of two
    # variants that do the same work (dual and host on a GPU) differ by run-to-run noise.
    if dual is not None and host is not None and nvme is not None:
        slowest = max(spmm["dual"]["ms"])
        out["dual_over_host"] = dual / host
        out["dual_faster_than_host_and_nvme"] = slowest < min(
            min(spmm["host"]["ms"]), min(spmm["nvme"]["ms"])
        )
    for path, checked in (("host", host), ("nvme", nvme)):
        unchecked = med(f"{path}-unchecked")
        if checked is not None and unchecked is not None:
            # Issue 15: every tile checked on its way, at most 5% over not checking it.
            out[f"{path}_checks_cost"] = checked / unchecked - 1
            out[f"{path}_checks_target_5pct"] = checked <= 1.05 * unchecked
    if split is not None and nvme is not None:
        out["split_over_nvme"] = split / nvme
        out["split_faster_than_nvme"] = max(spmm["split"]["ms"]) < min(spmm["nvme"]["ms"])
    return out


# ---------------------------------------------------------------------------- driver


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by ``args`` and return the JSON-ready results."""
    device = torch.device(args.device)
    res: dict[str, Any] = {
        "benchmark": "spmm",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.spmm", *args.argv]),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "host": platform.node(),
        "versions": versions(),
        "variants": {v: VARIANTS[v] for v in args.variants},
        "params": {k: v for k, v in vars(args).items() if k != "argv"},
    }
    main_tiles, *sweep = args.tile_bytes
    store, res["graph"] = graph_store(args, device, main_tiles)
    res["io_mode"] = store.io_mode if device.type == "cuda" else "cpu"
    print(
        f"[bench.spmm] {res['device']} | io_mode={res['io_mode']} | {res['graph']['nodes']} nodes, "
        f"{res['graph']['nnz']} nnz, {res['graph']['tiles']} tiles of <= "
        f"{format_bytes(store.tile_bytes)} ({format_bytes(res['graph']['store_bytes'])})",
        file=sys.stderr,
    )
    moved = res["graph"]["store_bytes"]
    cold = cold_read_bandwidth(store, device, system=args.drop_caches)
    h2d_before = h2d_bandwidth(device)
    a = incore_csr(store, device)
    res["spmm"] = bench_spmm(args, store, a, device, args.variants)
    h2d_after = h2d_bandwidth(device)
    copies = h2d_before + h2d_after
    h2d = max(copies, default=None)
    res["floors"] = {
        "h2d_Bps": h2d,
        "h2d_median_Bps": statistics.median(copies) if copies else None,
        "h2d_copies_Bps": {"before": h2d_before, "after": h2d_after},
        "h2d_floor_ms": moved / h2d * 1e3 if h2d else None,
        "disk_cold_Bps": cold["bw"],
        "disk_cold": cold["cold"],
        "disk_read_into": cold["into"],
        "disk_floor_ms": moved / cold["bw"] * 1e3,
        "drop_caches_ok": cold["cold"],
        "incore_ms": res["spmm"]["incore"]["median_ms"],
    }
    if args.densities:
        res["spgemm"] = bench_spgemm(args, store, a, device)
    res["targets"] = verdicts(res)
    if sweep:
        res["tile_sweep"] = tile_sweep(args, device, a, sweep, res["floors"])
    return res


def tile_sweep(
    args: argparse.Namespace,
    device: torch.device,
    a: torch.Tensor,
    sizes: Sequence[int],
    floors: dict[str, Any],
) -> dict[str, Any]:
    """``--sweep-variants`` on a store of each further tile size, judged by the same floors."""
    out: dict[str, Any] = {}
    for tile_bytes in sizes:
        store, graph = graph_store(args, device, tile_bytes)
        spmm = bench_spmm(args, store, a, device, args.sweep_variants)
        entry: dict[str, Any] = {"graph": graph, "spmm": spmm}
        host = spmm.get("host")
        if host and host.get("ok") and floors.get("h2d_Bps"):
            entry["host_loop_over_bound"] = loop_over_bound(host, graph, floors)
            entry["host_call_over_bound"] = host["median_ms"] / host_bound_ms(host["stats"], floors)
        out[format_bytes(tile_bytes)] = entry
        store.close()
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.spmm", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=1 << 21, help="RMAT nodes (default 2**21)")
    p.add_argument("--nnz", type=float, default=58.9e6, help="nonzeros incl. self loops")
    p.add_argument("--features", type=int, default=128, help="columns of X (F)")
    p.add_argument(
        "--tile-bytes",
        default="16MiB",
        help="tile size of the store, e.g. 32MiB; a comma list adds a sweep (first size: main run)",
    )
    p.add_argument(
        "--sweep-variants", default="host", help="SpMM variants rerun for each further tile size"
    )
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS)
    )
    p.add_argument(
        "--densities", default="0.1,0.5", help="sparse X densities for SpGEMM ('' skips)"
    )
    p.add_argument("--spgemm-budget", default="8GiB", help="AIRES device budget for SpGEMM")
    p.add_argument("--runs", type=int, default=5, help="timed runs per SpMM variant")
    p.add_argument("--spgemm-runs", type=int, default=2, help="timed runs per SpGEMM")
    p.add_argument("--check-rows", type=int, default=64, help="SpGEMM rows checked with scipy")
    p.add_argument("--disk-workers", type=int, default=2, help="concurrent tile reads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--workdir",
        default=os.environ.get("AIRES_BENCH_DIR", "/tmp/aires-bench-spmm"),
        help="where the tile store is kept between runs (needs ~2x the store bytes)",
    )
    p.add_argument("--out", default=None, help="JSON file (default bench/results/spmm-<date>.json)")
    p.add_argument(
        "--no-drop-caches",
        dest="drop_caches",
        action="store_false",
        help="only fadvise the tile file out of the cache, never drop_caches (root)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes that run on a CPU in seconds")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.smoke:
        args.nodes, args.nnz, args.features = 4096, 60_000, 16
        args.spgemm_budget = "4MiB"
        if args.tile_bytes == p.get_default("tile_bytes"):
            args.tile_bytes = "64KiB"
        args.runs, args.spgemm_runs, args.check_rows = 2, 1, 16
    args.variants = [v for v in args.variants.split(",") if v]
    args.sweep_variants = [v for v in args.sweep_variants.split(",") if v]
    unknown = [v for v in args.variants + args.sweep_variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    try:
        args.tile_bytes = [parse_size(t, "tile_bytes") for t in str(args.tile_bytes).split(",")]
    except (TypeError, ValueError) as error:
        p.error(str(error))
    args.densities = [float(d) for d in args.densities.split(",") if d]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry: run, print a table to stderr, write the JSON; returns the results."""
    args = parse_args(argv)
    res = run(args)
    out = Path(args.out) if args.out else RESULTS / f"spmm-{res['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    for name, entry in res["spmm"].items():
        line = (
            f"{entry['median_ms']:10.3f} ms"
            if "median_ms" in entry
            else f"FAILED {entry.get('error')}"
        )
        print(f"  spmm {name:8s} {line}", file=sys.stderr)
    for key, value in res["floors"].items():
        print(f"  floor {key}: {value}", file=sys.stderr)
    for density, entry in res.get("spgemm", {}).items():
        for kind in ("incore", "aires"):
            e = entry[kind]
            line = (
                f"{e['median_ms']:10.3f} ms ok={e.get('ok')}"
                if "median_ms" in e
                else f"FAILED {e.get('error', '')[:120]}"
            )
            print(f"  spgemm {density} {kind:7s} {line}", file=sys.stderr)
    print(f"  targets: {res['targets']}", file=sys.stderr)
    for size, entry in res.get("tile_sweep", {}).items():
        for name, e in entry["spmm"].items():
            line = f"{e['median_ms']:10.3f} ms" if "median_ms" in e else f"FAILED {e.get('error')}"
            print(f"  sweep {size:>9s} {name:8s} {line}", file=sys.stderr)
        if "host_loop_over_bound" in entry:
            ratio = entry["host_loop_over_bound"]
            print(f"  sweep {size:>9s} host_loop_over_bound {ratio:.3f}", file=sys.stderr)
    print(f"[bench.spmm] wrote {out}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
