"""Whole-model out-of-core training (``aires.nn.GCN``) under process-wide GPU budgets.

Each budget runs in a fresh process whose CUDA allocator is capped at the budget
(``torch.cuda.set_per_process_memory_fraction``) before anything is allocated, so the whole
process, not only the model, lives within it; the result records the allocator's measured peak
and the device's used memory (which adds the CUDA context). In the same run, one more process
measures the ceilings that bound every epoch:

- pinned host-to-device and device-to-host copy bandwidth (best of several 1 GiB copies);
- the in-core epoch: the same model, same product orders, every tensor on the device, as a
  plain PyTorch loop (cuSPARSE SpMM, autograd, Â reused for Âᵀ).

An epoch's **floor** is the larger of (bytes it moved per path / the measured bandwidths) and
the in-core epoch; the JSON reports the epoch over its floor, and the traffic model's
prediction beside the measured bytes.

Usage::

    python -m bench.model --dataset products --budgets 16GiB,4GiB,2GiB,1GiB
    python -m bench.model --smoke          # the tiny preset on the CPU, in seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from aires.checks import parse_size
from aires.scheduler.placement import format_bytes
from aires.scheduler.stats import max_memory_allocated, reset_peak_memory_stats
from aires.data.prepare import write_rate
from bench.ceilings import disk_read_bandwidth
from bench.methods.cold import drop_page_cache
from bench.provenance import git_commit, versions

__all__ = ["main", "parse_args", "floor_seconds"]

RESULTS = Path(__file__).resolve().parent / "results"
_COPY_BYTES = 1 << 30


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="products", help="synthetic preset or dataset name")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="data root for OGB/Planetoid datasets")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "aires-bench"))
    p.add_argument("--scratch-dir", default=tempfile.gettempdir(),
                   help="where NVMe panels go (and the disk ceilings are measured)")
    p.add_argument("--budgets", default="16GiB,4GiB,2GiB,1GiB", help="process GPU budgets")
    p.add_argument("--host-budget", default=None, help="pinned host bytes (default: half the RAM)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout of every layer (the in-core ceiling runs without it, so its "
                        "losses then differ)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tile-bytes", default="32MiB")
    p.add_argument("--device", default=None)
    p.add_argument("--no-incore", action="store_true", help="skip the in-core ceiling")
    p.add_argument("--disk-ceiling-bytes", default="1GiB",
                   help="size of the file the disk's ceilings are read and written on: a "
                        "sustained rate needs one as large as an epoch's NVMe reads (a disk "
                        "may burst faster on a small file)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per budget")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/...)")
    p.add_argument("--profile", default=None,
                   help="directory: write a torch.profiler table of one epoch per budget there")
    p.add_argument("--smoke", action="store_true", help="tiny preset on the CPU")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.dataset, args.scale, args.hidden, args.epochs, args.warmup = "tiny", 1.0, 16, 2, 1
        args.budgets, args.tile_bytes, args.device = "4MiB,1MiB", "16KiB", "cpu"
        args.host_budget = args.host_budget or "256KiB"
    return args


def floor_seconds(
    measured: dict[str, int], ceilings: dict[str, float], incore: float | None
) -> float:
    """The larger of the transfer time at the measured bandwidths and the in-core epoch: both
    PCIe directions at once, and the disk's reads and writes on top, together at the disk's
    best measured rate (an NVMe drive reads and writes at once: on the H200 machine an epoch
    moved 41 GiB of both in 23.5 s, less than reads and writes would take one after the
    other)."""
    transfer = max(
        measured["h2d"] / ceilings["h2d"] if ceilings.get("h2d") else 0.0,
        measured["d2h"] / ceilings["d2h"] if ceilings.get("d2h") else 0.0,
    )
    disk = max(ceilings.get("disk_read", 0.0), ceilings.get("disk_write", 0.0))
    if disk:
        transfer += (measured["disk_read"] + measured["disk_write"]) / disk
    return max(transfer, incore or 0.0)


# --------------------------------------------------------------------------- children


def _inputs(spec: dict[str, Any]) -> tuple[Any, Any, torch.Tensor, torch.Tensor, int]:
    """Features, the tile store of ``Â``, labels, training rows and classes of the workload."""
    from aires.tiling import TileStore

    if spec.get("prepared"):
        from aires.data.prepare import open_prepared

        p = open_prepared(spec["prepared"])
        y, train, x, classes = p.labels, p.train_idx, p.features, p.num_classes
    else:
        from bench.methods.workload import load_workload

        w = load_workload(spec["workload"])
        y, train, x, classes = w.y, w.train_idx, w.x, w.num_classes
    store = TileStore.open(spec["store"])
    return x, store, torch.from_numpy(np.array(y)), torch.from_numpy(np.array(train)), classes


def _timed(device: torch.device, step: Any) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def run_budget(spec: dict[str, Any]) -> dict[str, Any]:
    """One budget: train ``aires.nn.GCN`` for warm-up plus timed epochs in this process."""
    from aires.nn import GCN
    from bench.methods.config import MethodConfig
    from bench.methods.run import cap_process
    from bench.methods.training import initial_parameters

    budget = spec["budget"]
    # The process is capped on a GPU; on the CPU the budget is the model's own (no allocator
    # to cap), which MethodConfig calls the data scope.
    scope = "process" if torch.device(spec["device"]).type == "cuda" else "data"
    config = MethodConfig(method="aires", workload=spec["workload"], gpu_budget=budget,
                          budget_scope=scope, device=spec["device"])
    device = config.torch_device()
    cap_process(config, device)
    x, store, y, train, classes = _inputs(spec)
    model = GCN(
        x.shape[1], spec["hidden"], classes, num_layers=spec["layers"], device=device,
        gpu_budget=budget, host_budget=spec["host_budget"], scratch_dir=spec["scratch"],
        dropout=spec.get("dropout", 0.0),
    )
    # The weights every aires-bench method starts from, so the losses compare with in-core's.
    dims = [x.shape[1]] + [spec["hidden"]] * (spec["layers"] - 1) + [classes]
    with torch.no_grad():
        for layer, (weight, bias) in zip(model.convs, initial_parameters(dims, 0)):
            layer.lin.weight.copy_(weight.T)
            layer.bias.copy_(bias)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    times, losses, stats = [], [], []
    t0 = time.perf_counter()
    plan = model.plan(x, store)
    setup = time.perf_counter() - t0

    def step() -> None:
        opt.zero_grad()
        loss = model.loss(x, store, y, train)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    # An NVMe tier's reads are the disk's, not the page cache's: dropped before each epoch
    # where the machine allows it (the JSON says whether it did).
    on_disk = bool(plan.disk_bytes or plan.adjacency_disk)
    cold = on_disk and drop_page_cache([])  # the whole cache: needs root
    for k in range(spec["warmup"] + spec["epochs"]):
        if cold and k:  # before the first epoch: just dropped
            drop_page_cache([])
        seconds = _timed(device, step)
        if k >= spec["warmup"]:
            times.append(seconds)
            stats.append(model.stats.as_dict())
    if spec.get("profile"):
        _profile(step, Path(spec["profile"]) / f"profile-{budget}.txt")
    result = {
        "budget": budget,
        "setup_s": setup,
        "setup_steps_s": model.setup_seconds,
        "nvme_page_cache_dropped": cold if on_disk else None,
        "epoch_s": statistics.median(times),
        "epochs_s": times,
        "losses": losses,
        "stats": stats[-1],
        "plan": {
            "panel_cols": plan.panel_cols,
            "block_rows": plan.block_rows,
            "passes": plan.passes,
            "gpu_bytes": plan.gpu_bytes,
            "breakdown": plan.breakdown,
            "host_bytes": plan.host_bytes,
            "tiers": {n: list(t.tiers) for n, t in plan.tensors.items()},
            "adjacency": {"resident": plan.adjacency_resident, "host": plan.adjacency_host,
                          "disk": plan.adjacency_disk},
        },
    }
    if device.type == "cuda":
        result["peak_allocated"] = max_memory_allocated(device)
        result["peak_reserved"] = torch.cuda.max_memory_reserved(device)
    model.close()
    return result


def _profile(step: Any, path: Path) -> None:
    """One more epoch under ``torch.profiler``: the ops by total device time, into ``path``,
    and its timeline (copies and kernels per stream) as a Chrome trace beside it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    path.parent.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    table += "\n\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)
    path.write_text(table)
    prof.export_chrome_trace(str(path.with_suffix(".trace.json")))


def run_ceilings(spec: dict[str, Any]) -> dict[str, Any]:
    """Copy bandwidths, and the in-core epoch of the same model as a plain PyTorch loop."""
    from bench.methods.config import MethodConfig

    device = MethodConfig(method="incore-tuned", workload=spec["workload"], gpu_budget=None,
                          device=spec["device"]).torch_device()
    out: dict[str, Any] = {}
    if device.type == "cuda":
        host = torch.empty(_COPY_BYTES, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(_COPY_BYTES, dtype=torch.uint8, device=device)
        for name, (dst, src) in {"h2d": (dev, host), "d2h": (host, dev)}.items():
            best = min(_timed(device, lambda d=dst, s=src: d.copy_(s, non_blocking=True))
                       for _ in range(5))
            out[name] = _COPY_BYTES / best
        del host, dev
    # The disk the NVMe panels and tiles live on, cold: the floor of any byte they move.
    with tempfile.TemporaryDirectory(dir=spec.get("scratch")) as disk:
        out["disk_read"], out["disk_read_cold"] = disk_read_bandwidth(disk, spec["disk_bytes"])
        out["disk_read"] *= 1e9
        out["disk_write"] = write_rate(Path(disk), spec["disk_bytes"])
        out["disk_ceiling_bytes"] = spec["disk_bytes"]
    if spec.get("incore", True):
        out["incore_epoch_s"], out["incore_peak_allocated"], out["incore_losses"] = _incore(
            spec, device
        )
    return out


def _incore(spec: dict[str, Any], device: torch.device) -> tuple[float, int, list[float]]:
    """The ``incore-tuned`` loop of ``aires-bench`` on this workload: epoch, peak, losses."""
    from bench.methods.config import MethodConfig
    from bench.methods.incore_tuned import incore_forward
    from bench.methods.training import labels
    from bench.methods.workload import load_workload

    workload = load_workload(spec["workload"])
    config = MethodConfig(method="incore-tuned", workload=spec["workload"], gpu_budget=None,
                          layers=spec["layers"], hidden=spec["hidden"], device=str(device))
    forward, params = incore_forward(workload, config, device)
    y_train, train_idx = labels(workload, device)
    opt = torch.optim.Adam(params, lr=0.01)
    losses: list[float] = []

    def step() -> None:
        opt.zero_grad()
        loss = F.cross_entropy(forward()[train_idx], y_train)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    for _ in range(spec["warmup"]):
        step()
    if device.type == "cuda":
        reset_peak_memory_stats(device)
    times = [_timed(device, step) for _ in range(spec["epochs"])]
    peak = max_memory_allocated(device) if device.type == "cuda" else 0
    return statistics.median(times), peak, losses


# --------------------------------------------------------------------------- parent


def _child(kind: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps({"kind": kind, **spec}))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "bench.model", "--child", str(path)],
                capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        result = Path(tmp) / "result.json"
        if proc.returncode == 0 and result.is_file():
            return json.loads(result.read_text())
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit status {proc.returncode}"}


def _prepare(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The workload (prepared once, in a child process) and the facts the JSON records.

    A synthetic preset's workload is a prepared graph: its tile store is the one copy of ``Â``
    every process reads, and its feature file is read in place. Other datasets get a tile
    store of the workload's normalised ``Â`` beside it, built once.
    """
    from aires.tiling import TileStore, build_store

    t0 = time.perf_counter()
    # In a process of its own: generation may use the GPU, and this process must hold none of
    # it while the budgets run (their "device used" would count it).
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"dataset": args.dataset, "cache_dir": args.cache_dir,
                                    "root": args.root, "scale": args.scale, "seed": args.seed}))
        subprocess.run([sys.executable, "-m", "bench.methods.workload", str(spec), str(out)],
                       check=True)
        path = Path(json.loads(out.read_text())["path"])
    meta = json.loads((path / "meta.json").read_text())
    found: dict[str, Any] = {"workload": str(path)}
    if "prepared" in meta:
        from aires.data.prepare import open_prepared

        p = open_prepared(meta["prepared"])
        found.update(prepared=str(p.path), store=str(p.adjacency.path))
        nodes, features_bytes, preparation = p.num_nodes, int(p.features.nbytes), p.report
    else:
        from bench.methods.workload import load_workload

        w = load_workload(path)
        store_path = path / f"tiles-{parse_size(args.tile_bytes, 'tile_bytes')}"
        if not store_path.is_dir():
            build_store(w.scipy_adjacency(), store_path, tile_bytes=args.tile_bytes,
                        symmetric=True)
        found["store"] = str(store_path)
        nodes, features_bytes, preparation = w.num_nodes, int(w.x.nbytes), None
    store = TileStore.open(found["store"])
    facts = {"name": meta["name"], "nodes": nodes, "nnz": int(store.nnz),
             "adjacency_bytes": sum(int(t.nbytes) for t in store.tiles),
             "features_bytes": features_bytes, "prepare_s": time.perf_counter() - t0,
             "preparation": preparation}
    store.close()
    return found, facts


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        run = run_budget if spec["kind"] == "budget" else run_ceilings
        result = run(spec)
        (Path(args.child).parent / "result.json").write_text(json.dumps(result))
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    found, dataset = _prepare(args)
    host = None if args.host_budget is None else parse_size(args.host_budget, "host_budget",
                                                              allow_zero=True)
    spec = {**found, "device": device, "hidden": args.hidden, "dropout": args.dropout,
            "layers": args.layers, "epochs": args.epochs, "warmup": args.warmup,
            "host_budget": host, "incore": not args.no_incore, "profile": args.profile,
            "scratch": args.scratch_dir,
            "disk_bytes": 16 << 20 if args.smoke else parse_size(args.disk_ceiling_bytes,
                                                                 "disk_ceiling_bytes")}
    print(f"{dataset['name']}: {dataset['nodes']:,} nodes, {dataset['nnz']:,} nonzeros, "
          f"Â {format_bytes(dataset['adjacency_bytes'])}, "
          f"X {format_bytes(dataset['features_bytes'])}"
          f"; device {device}", flush=True)
    ceilings = _child("ceilings", spec, args.timeout)
    incore = ceilings.get("incore_epoch_s")
    rows = []
    for text in args.budgets.split(","):
        budget = parse_size(text.strip(), "budgets")
        result = {"budget_text": text.strip(), **_child("budget", {**spec, "budget": budget},
                                                       args.timeout)}
        if "error" not in result:
            floor = floor_seconds(result["stats"]["measured"], ceilings, incore)
            result["floor_s"] = floor
            result["floor_ratio"] = result["epoch_s"] / floor if floor else None
        rows.append(result)
        _print_row(result)
    out = {
        "benchmark": "bench.model",
        "command": "python -m bench.model " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "versions": versions(),
        "git_commit": git_commit(),
        "dataset": dataset,
        "model": {"hidden": args.hidden, "layers": args.layers, "dropout": args.dropout},
        "ceilings": ceilings,
        "budgets": rows,
    }
    path = Path(args.out) if args.out else RESULTS / f"model-{args.dataset}-{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"in-core epoch {incore}; ceilings {ceilings}; wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


def _print_row(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"{r['budget_text']:>8}: {r['error']}", flush=True)
        return
    s = r["stats"]
    print(
        f"{r['budget_text']:>8}: epoch {r['epoch_s'] * 1e3:8.1f} ms (the planner's model "
        f"{sum(s.get('predicted_seconds', [])) * 1e3:.1f} ms at its prior rates), floor ratio "
        f"{r.get('floor_ratio') or 0:.2f}, peak alloc {format_bytes(r.get('peak_allocated', 0))}, "
        f"device used {format_bytes(s['peak_device_used'])}, measured "
        f"{ {k: format_bytes(v) for k, v in s['measured'].items()} }, predicted "
        f"{ {k: format_bytes(v) for k, v in s['predicted'].items()} }, losses "
        f"{[round(x, 5) for x in r['losses']]}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
