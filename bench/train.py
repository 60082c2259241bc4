"""GCN training epoch time: ``AiresGCNConv`` out of core against PyG's ``GCNConv`` in core.

Both train the same 2-layer GCN (ReLU, dropout, Adam) on the same graph in the same run; each
variant runs in its own subprocess, so an out-of-memory in one (the in-core baseline on a graph
that does not fit) is recorded as ``"oom"`` instead of ending the benchmark, and each starts
with an empty GPU. The result, with the device, date, versions and the command, is written as
JSON into ``bench/results/``.

Variants (baseline first):

- ``pyg-incore``: ``torch_geometric.nn.GCNConv(cached=True)`` on the graph's ``adj_t`` as a
  torch sparse CSR tensor on the GPU: what a PyG user writes when the graph fits.
- ``aires``: :class:`aires.train.GCN` (``AiresGCNConv`` layers) with the adjacency on the host,
  tiled once, streamed within ``--gpu-budget`` / ``--host-budget``.

Usage::

    python -m bench.train                       # H100: synthetic ogbn-products, hidden 256
    python -m bench.train --gpu-budget 256MiB --process-cap 12GiB
    python -m bench.train --smoke               # seconds, on the CPU (the smoke test)
"""

from __future__ import annotations

import argparse
import functools
import dataclasses
import datetime as dt
import itertools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from aires.checks import parse_size
from aires.scheduler.stats import max_memory_allocated, reset_peak_memory_stats
from bench.provenance import versions

__all__ = ["VARIANTS", "main", "parse_args", "run_variant"]

RESULTS = Path(__file__).resolve().parent / "results"
# --smoke: what the CPU smoke test runs (all of it in a few seconds).
# The budgets stream the tiny graph's 8 KiB tiles: the device budget is the scheduler's minimum
# at the widest product (1,000 x 16 float32 output, 3 ring slots, 2 disk slots) plus a tile.
SMOKE = {
    "preset": "tiny",
    "scale": 1.0,
    "hidden": 16,
    "epochs": 3,
    "warmup": 1,
    "device": "cpu",
    "tile_bytes": "8KiB",
    "gpu_budget": "112KiB",
    "host_budget": "32KiB",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The benchmark's options (``--help`` lists them)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--preset",
        default="products",
        help="aires.data.synthetic preset (default: products, ogbn-products size)",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="graph size relative to the preset"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=10, help="timed epochs")
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed epochs first (they tile / normalise the graph)",
    )
    parser.add_argument(
        "--gpu-budget",
        default="auto",
        help="GPU bytes for AIRES's products ('3GiB': outputs, slots, resident tiles); "
        "auto: their working set plus a quarter of the adjacency, so most tiles stream",
    )
    parser.add_argument(
        "--host-budget", default=None, help="pinned host bytes for tiles"
    )
    parser.add_argument(
        "--tile-bytes", default=None, help="tile capacity (default: the tiler's)"
    )
    parser.add_argument(
        "--process-cap",
        default=None,
        help="cap the whole AIRES process's GPU memory (torch allocator) to show "
        "it trains below what the in-core run needs",
    )
    parser.add_argument(
        "--device", default=None, help="default: cuda if available, else cpu"
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS)
    )
    parser.add_argument(
        "--cache-dir",
        default=str(Path(tempfile.gettempdir()) / "aires-graphs"),
        help="where the generated graph is cached between variants and runs",
    )
    parser.add_argument(
        "--store-dir", default=None, help="keep AIRES's tile stores here"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="directory of the JSON result"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny graph on the CPU: " + str(SMOKE)
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the variants in this process, one after the other (no OOM "
        "isolation, no fresh GPU per variant): for smoke tests and debugging",
    )
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("layers", "hidden", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 1:
        parser.error(
            f"--warmup must be >= 1 (the first epoch tiles the graph), got {args.warmup}"
        )
    return args


def _graph(args: argparse.Namespace) -> Any:
    from aires.data import synthetic

    return synthetic(
        args.preset,
        scale=args.scale,
        seed=args.seed,
        cache_dir=args.cache_dir,
        progress=args.variant is None,
    )


def _adjacency_bytes(graph: Any) -> int:
    """CSR bytes of the adjacency with int32 indices and float32 values (what the GPU holds)."""
    return 8 * graph.num_edges + 4 * (graph.num_nodes + 1)


def _layer_products(
    graph: Any, args: argparse.Namespace, order: str = "auto"
) -> list[tuple[str, int]]:
    """``(order, columns)`` of each layer's product with ``A`` in training (see
    :func:`aires.gcn_conv.choose_order`, or ``order`` on every layer when it is not ``auto``):
    the input features need no gradient, hidden ones do."""
    from aires.gcn_conv import choose_order

    widths = (
        [graph.num_features] + [args.hidden] * (args.layers - 1) + [graph.num_classes]
    )
    x_nnz = int(graph.x.nnz) if graph.sparse_features else None
    products = []
    for i, (f_in, f_out) in enumerate(itertools.pairwise(widths)):
        layer_order = order if order != "auto" else choose_order(
            nnz=graph.num_edges + graph.num_nodes,
            num_nodes=graph.num_nodes,
            in_columns=f_in,
            out_columns=f_out,
            x_nnz=x_nnz if i == 0 else None,
            x_requires_grad=i > 0,
        )
        products.append((layer_order, f_in if layer_order == "aggregate_first" else f_out))
    return products


def _gpu_budget(args: argparse.Namespace, graph: Any, order: str = "auto") -> int | None:
    """AIRES's device budget: ``--gpu-budget``, or for ``auto`` the scheduler's working set at
    the widest product training runs (its dense output, 16 MiB of cuSPARSE workspace with
    margin, 3 ring and 2 disk slots of one tile) plus a quarter of the adjacency: at least three
    quarters of the tiles stream on every product."""
    if args.gpu_budget in (None, "none"):
        return None
    if args.gpu_budget != "auto":
        return parse_size(args.gpu_budget, "--gpu-budget")
    from aires.tiling.plan import DEFAULT_TILE_BYTES

    tile = (
        DEFAULT_TILE_BYTES if args.tile_bytes is None else parse_size(args.tile_bytes)
    )
    widest = max(columns for _, columns in _layer_products(graph, args, order))
    output = graph.num_nodes * widest * 4
    return output + (48 << 20) + 5 * tile + _adjacency_bytes(graph) // 4


class _Timer:
    """Epoch times with CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, step: Callable[[], None]) -> float:
        if self.cuda:
            start, stop = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            start.record()
            step()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / 1e3
        begin = time.perf_counter()
        step()
        return time.perf_counter() - begin


def _pyg_model(
    graph: Any, args: argparse.Namespace, device: torch.device
) -> tuple[torch.nn.Module, Any]:
    from torch_geometric.nn import GCNConv

    from aires.train import adjacency_t

    widths = (
        [graph.num_features] + [args.hidden] * (args.layers - 1) + [graph.num_classes]
    )
    convs = torch.nn.ModuleList(
        GCNConv(i, o, cached=True) for i, o in itertools.pairwise(widths)
    )
    dropout = args.dropout

    class PygGCN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = convs

        def forward(self, x: torch.Tensor, adj_t: Any) -> torch.Tensor:
            h = F.dropout(x, dropout, self.training)
            for i, conv in enumerate(self.convs):
                h = conv(h, adj_t)
                if i < len(self.convs) - 1:
                    h = F.dropout(h.relu(), dropout, self.training)
            return h

    return PygGCN().to(device), adjacency_t(graph).to(device)


def _aires_model(
    graph: Any, args: argparse.Namespace, device: torch.device, order: str = "auto"
) -> tuple[torch.nn.Module, Any]:
    from aires.train import GCN, adjacency_t

    model = GCN(
        graph.num_features,
        args.hidden,
        graph.num_classes,
        args.layers,
        args.dropout,
        gpu_budget=_gpu_budget(args, graph, order),
        host_budget=args.host_budget,
        tile_bytes=args.tile_bytes,
        store_dir=args.store_dir,
        order=order,
    )
    return model.to(device), adjacency_t(graph)


def _aires_details(
    model: Any, x: torch.Tensor, adj_t: Any, args: argparse.Namespace, graph: Any
) -> dict[str, Any]:
    """The store's layout, each layer's product order and width, and the statistics of one
    product at the widest width (where its bytes came from)."""
    from aires.matmul import matmul

    conv = model.convs[0]
    store = conv.adjacency_store(x, adj_t)
    products = _layer_products(graph, args, conv.order)
    widest = max(columns for _, columns in products)
    h = torch.randn(x.size(0), widest, device=x.device)
    _, stats = matmul(
        store,
        h,
        gpu_budget=conv.gpu_budget,
        host_budget=conv.host_budget,
        device=x.device,
        return_stats=True,
    )
    return {
        "gpu_budget": conv.gpu_budget,
        "host_budget": conv.host_budget,
        "store": {
            "tiles": len(store),
            "tile_bytes": int(store.tile_bytes),
            "bytes": int(sum(t.nbytes for t in store.tiles)),
            "nnz": int(store.nnz),
            "symmetric": store.symmetric,
            "io_mode": store.io_mode,
        },
        "layers": [{"order": order, "columns": columns} for order, columns in products],
        "product_stats": _jsonable(dataclasses.asdict(stats)),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


VARIANTS: dict[
    str, Callable[[Any, argparse.Namespace, torch.device], tuple[torch.nn.Module, Any]]
] = {
    "pyg-incore": _pyg_model,
    "aires": _aires_model,
    # PyG's product order on every layer: the same arithmetic as pyg-incore, so the ratio
    # isolates the out-of-core data movement from the gain of the order chosen by cost.
    "aires-pyg-order": functools.partial(_aires_model, order="transform_first"),
}


def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train variant ``name`` in this process; epoch times, peak memory, final loss.

    Returns:
        ``{"status": "ok", "epoch_ms": {...}, ...}``, or ``{"status": "oom", "error": ...}``
        when the device runs out of memory.
    """
    device = torch.device(args.device)
    graph = _graph(args)
    torch.manual_seed(args.seed)
    if device.type == "cuda" and name.startswith("aires") and args.process_cap is not None:
        cap = parse_size(args.process_cap, "--process-cap")
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(cap / total, 1.0), device)
    try:
        x = graph.x_torch().to(device)
        y = graph.y.to(device)
        train_idx = graph.train_idx.to(device)
        model, adj_t = VARIANTS[name](graph, args, device)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        if device.type == "cuda":
            reset_peak_memory_stats(device)

        def step() -> None:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x, adj_t)[train_idx], y[train_idx])
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())

        losses: list[torch.Tensor] = []
        timer = _Timer(device)
        warmup = [timer.time(step) for _ in range(args.warmup)]
        times = [timer.time(step) for _ in range(args.epochs)]
        result: dict[str, Any] = {
            "status": "ok",
            "first_epoch_s": warmup[0],
            "epoch_ms": {
                "mean": 1e3 * statistics.fmean(times),
                "median": 1e3 * statistics.median(times),
                "std": 1e3 * (statistics.stdev(times) if len(times) > 1 else 0.0),
                "min": 1e3 * min(times),
                "all": [1e3 * t for t in times],
            },
            "final_loss": float(losses[-1]),
            "peak_gpu_bytes": max_memory_allocated(device)
            if device.type == "cuda"
            else None,
        }
        if name.startswith("aires"):
            result.update(_aires_details(model, x, adj_t, args, graph))
        return result
    except torch.OutOfMemoryError as error:
        return {"status": "oom", "error": str(error).splitlines()[0]}


def _run_isolated(
    name: str, args: argparse.Namespace, argv: Sequence[str]
) -> dict[str, Any]:
    """``run_variant`` in a fresh interpreter (a crash or OOM there cannot end this run)."""
    with tempfile.TemporaryDirectory(prefix="aires-bench-") as scratch:
        out = Path(scratch) / "result.json"
        command = [
            sys.executable,
            "-m",
            "bench.train",
            *argv,
            "--variant",
            name,
            "--child-out",
            str(out),
        ]
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        if done.returncode == 0 and out.exists():
            return json.loads(out.read_text())
        tail = (done.stderr or done.stdout)[-2000:]
        status = "oom" if "out of memory" in tail.lower() else "failed"
        return {"status": status, "returncode": done.returncode, "stderr_tail": tail}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with the hidden ``--variant``, one variant as a child)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if (
        args.variant is not None
    ):  # a child: an exception's traceback reaches the parent's log
        result = run_variant(args.variant, args)
        args.child_out.write_text(json.dumps(_jsonable(result)))
        return 0

    device = torch.device(args.device)
    graph = _graph(args)  # generated (and cached) once, before the children load it
    print(
        f"bench.train: {graph.name} ({graph.num_nodes:,} nodes, {graph.num_edges:,} adjacency "
        f"entries, {graph.num_features} features) on {_device_name(device)} [{device}]",
        flush=True,
    )
    results = {}
    for name in args.variants:
        results[name] = (
            run_variant(name, args)
            if args.in_process
            else _run_isolated(name, args, argv)
        )
        summary = results[name].get("epoch_ms", {}).get("median")
        print(
            f"  {name:<11} {results[name]['status']:<7}"
            + (f" {summary:10.2f} ms/epoch (median)" if summary is not None else ""),
            flush=True,
        )
    record = {
        "benchmark": "bench.train",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "bench.train", *argv],
        "device": {"kind": device.type, "name": _device_name(device)},
        "versions": versions(),
        "graph": {
            "name": graph.name,
            "nodes": graph.num_nodes,
            "adjacency_entries": graph.num_edges,
            "features": graph.num_features,
            "classes": graph.num_classes,
            "adjacency_csr_bytes": _adjacency_bytes(graph),
            "feature_bytes": graph.num_nodes * graph.num_features * 4,
            "activation_bytes_per_layer": graph.num_nodes * args.hidden * 4,
        },
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("variant", "child_out")
        },
        "results": results,
    }
    base = results.get("pyg-incore", {})
    for name in ("aires", "aires-pyg-order"):
        ours = results.get(name, {})
        if base.get("status") == ours.get("status") == "ok":
            ratio = ours["epoch_ms"]["median"] / base["epoch_ms"]["median"]
            record[f"{name.replace('-', '_')}_over_incore"] = ratio
            print(f"  {name} / in-core epoch time: {ratio:.3f}x", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"train-{args.preset}-{device.type}-{stamp}.json"
    path.write_text(json.dumps(_jsonable(record), indent=2))
    print(f"  wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
