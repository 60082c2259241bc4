"""``aires-bench``: full-graph GCN training epochs with AIRES and the baselines, at one GPU budget.

With no arguments it runs a small embedded demo in seconds on a CPU-only machine: AIRES, in-core
PyG and the naive baseline on a small synthetic graph, then the budget case that AIRES exists
for: a budget of half what in-core PyG holds (:data:`DEMO_BUDGET_SHARE`), at which in-core cannot
run and AIRES trains, streaming the tiles that do not fit. On the CPU the "device" is host memory
and the budget bounds what a method holds there for the graph; on a GPU it is the whole
process's (the CUDA allocator capped at it, every peak measured). On a GPU, for example::

    aires-bench --dataset products --scale 1 --methods aires,uvm,feature-cache,naive,incore \\
        --gpu-budget 8GiB --epochs 3 --layers 2 --hidden 256 \\
        --out bench/results/products-8GiB.json --plot bench/results/products-8GiB.png

Every method (and the ceiling measurements) runs in a process of its own, so each starts with
clean GPU memory and one method's out-of-memory or crash is recorded (status ``oom``/``error``)
while the others still run. The workload (graph generated or loaded, adjacency normalised,
files written) is prepared once per run, in a process of its own, and memory-mapped by every
method; it is kept in ``--cache-dir`` and reused by later runs with the same dataset, scale and
seed. AIRES's tile stores are kept there too.

Time: ``--timeout`` bounds each method, ``--time-limit`` the whole run (preparation, ceilings
and methods). A method that the time limit leaves no room for is recorded as ``error`` (not
run), and the JSON and the plot are rewritten after every method, so a run stopped from outside
keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from aires.checks import check_positive_int, parse_size
from bench.methods import ABLATIONS, METHODS, MethodConfig, MethodResult, check_method
from bench.methods.config import ORDERS
from bench.methods.workload import Workload, load_workload
from bench.provenance import git_commit
from bench.report import format_bytes, format_table, plot_result, validate

__all__ = [
    "DEFAULT", "DEMO_BUDGET_SHARE", "MIN_METHOD_SECONDS", "banner", "demo_budget", "document",
    "main", "parse_args", "run_method", "sweep",
]

#: The embedded default run: small enough for a CPU in seconds, no data files needed. Tiles of
#: 128 KiB cut the 1 MB adjacency into 8, so that half of it is a budget AIRES can stream under.
DEFAULT: dict[str, Any] = {
    "dataset": "products",
    "scale": 0.001,
    "methods": "aires,incore,naive",
    "hidden": 64,
    "tile_bytes": "128KiB",
}
#: The demo's budget case: this share of what in-core PyG holds (adjacency and features).
DEMO_BUDGET_SHARE = 0.5
#: The methods the demo runs at that budget: the one that cannot, and the one that can.
DEMO_BUDGET_METHODS = ("incore", "aires")
ALL_METHODS = "aires,uvm,feature-cache,naive,incore,incore-tuned,save-on-cpu"
_REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (sizes such as ``8GiB`` become bytes)."""
    parser = argparse.ArgumentParser(
        prog="aires-bench",
        description="Full-graph GCN training: AIRES against UVM, feature caching, naive "
        "chunking and in-core PyG at the same GPU budget. No arguments: a small CPU demo.",
    )
    parser.add_argument("--dataset", help="dataset (cora, ogbn-products, ...) or synthetic "
                        f"preset with --scale; default: {DEFAULT['dataset']} at scale "
                        f"{DEFAULT['scale']}")
    parser.add_argument("--root", help="data root for OGB/Planetoid datasets")
    parser.add_argument("--scale", type=float, help="size of a synthetic preset (1 = full size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of graph and weights")
    parser.add_argument("--methods", help=f"comma-separated, from {','.join(METHODS)}; default: "
                        f"{DEFAULT['methods']} for the demo, else {ALL_METHODS}")
    parser.add_argument("--ablation", action="store_true",
                        help="also run AIRES without each of its parts: "
                        + ", ".join(f"aires-{a}" for a in ABLATIONS))
    parser.add_argument("--gpu-budget", help="GPU bytes per method, e.g. 8GiB (default: none)")
    parser.add_argument("--budgets", help="a sweep: every method at each of these budgets, e.g. "
                        "16GiB,8GiB,4GiB,2GiB,1GiB; one JSON, and a plot of epoch time against "
                        "budget, one line per method (instead of --gpu-budget)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs first (default 1)")
    parser.add_argument("--layers", type=int, default=2, help="GCN layers (default 2)")
    parser.add_argument("--hidden", type=int, help="hidden channels (default 256; demo 64)")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    parser.add_argument("--tile-bytes",
                        help="AIRES tile / baseline chunk size (default 64MiB; demo "
                        f"{DEFAULT['tile_bytes']})")
    parser.add_argument("--order", choices=ORDERS, default="auto",
                        help="every method's product order: AIRES's cost model per layer "
                        "(default), or PyG's A(HW) in every layer")
    parser.add_argument("--out", help="write the JSON here")
    parser.add_argument("--plot", help="write the PNG here (with --budgets, epoch time "
                        "against budget; else bars)")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "aires-bench"),
                        help="prepared workloads, tile stores, ceiling scratch file")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds per method (and for the ceilings) before it is stopped "
                        "(default 600)")
    parser.add_argument("--time-limit", type=float,
                        help="seconds for the whole run, preparation included: methods that "
                        "would start after it are recorded as not run (default: none)")
    parser.add_argument("--copy-bytes", default="1GiB", help="size of the h2d ceiling copies")
    parser.add_argument("--disk-bytes", help="size of the disk ceiling file (GPU 1GiB, CPU 16MiB)")
    args = parser.parse_args(argv)
    demo = args.demo = args.dataset is None
    if demo:
        args.dataset = DEFAULT["dataset"]
        args.scale = DEFAULT["scale"] if args.scale is None else args.scale
    args.methods = _methods(args.methods or (DEFAULT["methods"] if demo else ALL_METHODS))
    if args.ablation:
        args.methods += [f"aires-{a}" for a in ABLATIONS if f"aires-{a}" not in args.methods]
    if args.hidden is None:
        args.hidden = DEFAULT["hidden"] if demo else 256
    for name in ("epochs", "layers", "hidden"):
        check_positive_int(getattr(args, name), f"--{name}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    for name in ("timeout", "time_limit"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.scale is not None and not args.scale > 0:
        raise ValueError(f"--scale must be positive, got {args.scale}")
    if args.gpu_budget is not None:
        args.gpu_budget = parse_size(args.gpu_budget, "--gpu-budget")
    if args.budgets is not None:
        if args.gpu_budget is not None:
            raise ValueError("--budgets runs a sweep; --gpu-budget sets one budget: give one")
        args.budgets = [parse_size(b.strip(), "--budgets") for b in args.budgets.split(",")
                        if b.strip()]
        if not args.budgets:
            raise ValueError("--budgets: no budget given")
    args.tile_bytes = parse_size(
        args.tile_bytes or (DEFAULT["tile_bytes"] if demo else "64MiB"), "--tile-bytes"
    )
    args.copy_bytes = parse_size(args.copy_bytes, "--copy-bytes")
    gpu = torch.cuda.is_available()
    args.disk_bytes = parse_size(args.disk_bytes or ("1GiB" if gpu else "16MiB"), "--disk-bytes")
    args.device = "cuda" if gpu else "cpu"
    # A GPU's budget is the whole process's (the allocator capped at it, the peaks measured);
    # a CPU has no allocator to cap, so there it bounds what a method keeps for the graph.
    args.budget_scope = "process" if gpu else "data"
    return args


def _methods(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--methods: no method named in {spec!r}")
    for name in names:
        check_method(name, "--methods")
    return list(dict.fromkeys(names))


def _child_env() -> dict[str, str]:
    """Environment of the subprocesses: this checkout importable, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_child(
    module: str, config: Path, out: Path, timeout: float | None
) -> tuple[dict | None, str]:
    """Run ``python -m module config out``; its JSON result (or None) and its output's tail.

    A child still running after ``timeout`` seconds is killed (its GPU memory goes with it).
    """
    command = [sys.executable, "-m", module, str(config), str(out)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=_child_env(), check=False)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:g} s"
    tail = (done.stdout + done.stderr).strip()[-1500:]
    if out.is_file():
        return json.loads(out.read_text()), tail
    return None, f"exited with status {done.returncode} and no result: {tail}"


def _seconds_left(timeout: float | None, deadline: float | None) -> float | None:
    """Seconds a child may run: its own ``timeout``, cut to what the run has left."""
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    return left if timeout is None else min(timeout, left)


def run_method(
    args: argparse.Namespace, name: str, workload: Path, scratch: Path,
    timeout: float | None = None, gpu_budget: int | None = None, label: str | None = None,
    budget_scope: str | None = None,
) -> MethodResult:
    """Run one method in a subprocess; a crash or timeout becomes an ``error`` result.

    Args:
        timeout: seconds before the method is stopped (default ``args.timeout``).
        gpu_budget: the budget of this run (default ``args.gpu_budget``).
        label: the run's name in the results (default: the method, or ``method@budget``).
        budget_scope: the budget's scope (default ``args.budget_scope``: the process's on a
            GPU, the graph data's on a CPU).
    """
    label = label or (name if gpu_budget is None else f"{name}@budget")
    config = MethodConfig(
        method=name, workload=str(workload),
        gpu_budget=args.gpu_budget if gpu_budget is None else gpu_budget,
        budget_scope=budget_scope or args.budget_scope,
        epochs=args.epochs, warmup=args.warmup,
        layers=args.layers, hidden=args.hidden, lr=args.lr, tile_bytes=args.tile_bytes,
        seed=args.seed, device=args.device, order=args.order,
        store_dir=str(Path(args.cache_dir) / "stores"),
    )
    config_path, out = scratch / f"{label}.config.json", scratch / f"{label}.result.json"
    config.dump(config_path)
    start = time.monotonic()
    entry, tail = _run_child("bench.methods.run", config_path, out,
                             args.timeout if timeout is None else timeout)
    result = (MethodResult(status="error", error=tail) if entry is None
              else MethodResult.from_json(entry))
    result.extra["wall_s"] = round(time.monotonic() - start, 2)
    if gpu_budget is not None:
        result.extra["budget_bytes"] = gpu_budget
    return result


def banner(args: argparse.Namespace, facts: dict[str, Any], dataset: dict[str, Any],
           ceilings: dict[str, Any], cold: bool) -> str:
    """What ran where: device, driver, torch, disk mode, budgets, graph, ceilings."""
    def number(value: float | None, unit: str) -> str:
        return "-" if value is None else f"{value:.2f} {unit}"

    budget = format_bytes(args.gpu_budget) if args.gpu_budget else "none"
    return "\n".join([
        f"aires-bench  device: {facts['device']}  driver: {facts.get('driver') or '-'}  "
        f"torch {facts['torch']} (CUDA {facts['cuda'] or '-'})",
        f"disk path: {facts['io_mode']}  GPU budget: {budget} (scope: {args.budget_scope})  "
        f"tile/chunk: {format_bytes(args.tile_bytes)}",
        f"graph: {dataset['name']}: {dataset['nodes']:,} nodes, {dataset['edges']:,} edges, "
        f"{dataset['features']} features; GCN {args.layers} layers, hidden {args.hidden}, "
        f"{args.epochs} timed epochs after {args.warmup} warm-up",
        f"ceilings: h2d {number(ceilings['h2d_GBps'], 'GB/s')} (pinned), disk read "
        f"{number(ceilings['disk_read_GBps'], 'GB/s')} ({'cold' if cold else 'page cache'}), "
        f"in-core SpMM F={args.hidden}: {number(ceilings['incore_spmm_ms'], 'ms')}",
    ])


def demo_budget(workload: Workload) -> int:
    """The demo's budget: :data:`DEMO_BUDGET_SHARE` of the bytes in-core PyG holds for the
    graph (adjacency and features), so in-core cannot run and AIRES must stream."""
    return int((workload.adjacency_bytes + workload.x.nbytes) * DEMO_BUDGET_SHARE)


#: A method is not started with fewer seconds than this left of ``--time-limit``.
MIN_METHOD_SECONDS = 15.0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``aires-bench``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except (ValueError, TypeError) as error:
        print(f"aires-bench: {error}", file=sys.stderr)
        return 2
    started = time.monotonic()
    deadline = None if args.time_limit is None else started + args.time_limit
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="aires-bench-") as tmp:
        scratch = Path(tmp)
        spec = scratch / "workload.spec.json"
        spec.write_text(json.dumps({"dataset": args.dataset, "cache_dir": str(cache),
                                    "root": args.root, "scale": args.scale, "seed": args.seed}))
        prepared, tail = _run_child("bench.methods.workload", spec, scratch / "workload.json",
                                    _seconds_left(None, deadline))
        if prepared is None:
            print(f"aires-bench: preparing {args.dataset!r} failed: {tail}", file=sys.stderr)
            return 1
        workload_dir = Path(prepared["path"])
        dataset = load_workload(workload_dir).describe()
        prepare_s = time.monotonic() - started
        probe = scratch / "ceilings.config.json"
        probe.write_text(json.dumps({
            "workload": str(workload_dir), "hidden": args.hidden, "copy_bytes": args.copy_bytes,
            "disk_bytes": args.disk_bytes, "scratch": str(cache),
        }))
        measured, tail = _run_child("bench.ceilings", probe, scratch / "ceilings.json",
                                    _seconds_left(args.timeout, deadline))
        if measured is None:
            print(f"aires-bench: measuring the ceilings failed: {tail}", file=sys.stderr)
            return 1
        facts, ceilings = measured["device"], measured["ceilings"]
        print(banner(args, facts, dataset, ceilings, measured["disk_cold"]), flush=True)
        print(f"workload {workload_dir} ready in {prepare_s:.1f} s; ceilings in "
              f"{time.monotonic() - started - prepare_s:.1f} s", flush=True)
        runs: list[tuple[str, int | None]] = [(name, None) for name in args.methods]
        if args.budgets:
            # Each method down its budgets, largest first: a method's line is whole before
            # the next starts (under --time-limit, the first methods' lines are complete),
            # and one out of memory is not run at the smaller budgets.
            runs = [(name, budget) for name in args.methods
                    for budget in sorted(args.budgets, reverse=True)]
        elif args.demo:
            budget = demo_budget(load_workload(workload_dir))
            runs += [(name, budget) for name in DEMO_BUDGET_METHODS]
            print(f"budget case: {format_bytes(budget)}, {DEMO_BUDGET_SHARE:.0%} of what "
                  "in-core holds (adjacency and features)", flush=True)
        results: dict[str, MethodResult] = {}
        # A method out of memory at one budget is out of memory at every smaller one: in a
        # sweep it is recorded so there, with the budget that proved it, and not run again.
        out_of_memory: dict[str, int] = {}
        for name, budget in runs:
            label = (name if budget is None else
                     f"{name}@{format_bytes(budget)}" if args.budgets else f"{name}@budget")
            print(f"  running {label} ...", end=" ", flush=True)
            timeout = _seconds_left(args.timeout, deadline)
            proved = out_of_memory.get(name)
            if proved is not None and budget < proved:
                results[label] = MethodResult(
                    status="oom",
                    error=f"not run: out of memory at the larger budget {format_bytes(proved)}",
                )
            elif timeout is not None and timeout < MIN_METHOD_SECONDS:
                results[label] = MethodResult(
                    status="error",
                    error=f"not run: --time-limit of {args.time_limit:g} s reached",
                )
            else:
                results[label] = run_method(
                    args, name, workload_dir, scratch, timeout, budget, label,
                )
                if args.budgets and results[label].status == "oom":
                    out_of_memory.setdefault(name, budget)  # the largest: budgets descend
            print(f"{results[label].status} ({results[label].extra.get('wall_s', 0):.1f} s)",
                  flush=True)
            doc = document(args, argv, facts, dataset, ceilings, measured["disk_cold"],
                           results)
            # After every method, so a run stopped from outside keeps what it measured.
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
            if args.plot:
                Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
                try:
                    plot_result(doc, args.plot)
                except ImportError as error:  # the JSON is the result; the plot can follow
                    print(f"\naires-bench: no plot: {error}; render it later with "
                          f"python -m bench.report {args.out or 'RESULT.json'} --plot "
                          f"{args.plot}", file=sys.stderr)
                    args.plot = None
    print(format_table(doc))
    print(f"total {time.monotonic() - started:.1f} s")
    if args.out:
        print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def document(
    args: argparse.Namespace,
    argv: list[str],
    facts: dict[str, Any],
    dataset: dict[str, Any],
    ceilings: dict[str, Any],
    disk_cold: bool,
    results: dict[str, MethodResult],
) -> dict[str, Any]:
    """The benchmark JSON document (checked against the schema of :mod:`bench.report`).

    ``disk_cold``: whether the disk ceiling was read with the page cache dropped; each method
    that reads files says the same of its epochs in its own ``disk_cold``.
    """
    aires_mode = results["aires"].extra.get("io_mode") if "aires" in results else None
    doc = {
        "device": facts["device"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": shlex.join(["aires-bench", *argv]),
        "dataset": dataset,
        "gpu_budget_bytes": args.gpu_budget,
        "mode": aires_mode if aires_mode not in (None, "cpu") else facts["io_mode"],
        "ceilings": ceilings,
        "order": args.order,
        "disk_cold": disk_cold,
        "methods": {name: result.to_json() for name, result in results.items()},
    }
    if args.budgets:
        doc["budget_scope"] = args.budget_scope
        doc["sweep"] = sweep(args.methods, args.budgets, doc["methods"])
    validate(doc)
    return doc


def sweep(
    methods: list[str], budgets: list[int], runs: dict[str, dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """Per method, its run at each budget: ``{budget_bytes, status, epoch_s, error}``."""
    table: dict[str, list[dict[str, Any]]] = {}
    for name in methods:
        for budget in budgets:
            run = runs.get(f"{name}@{format_bytes(budget)}")
            if run is None:
                continue
            table.setdefault(name, []).append({
                "budget_bytes": budget, "status": run["status"],
                "epoch_s": run.get("epoch_s") or [], "error": run.get("error"),
            })
    return table

if __name__ == "__main__":
    sys.exit(main())
