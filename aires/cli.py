"""The ``aires`` command: ``aires train``, ``aires tile`` and ``aires data``.

``aires train --dataset cora`` trains Kipf & Welling's GCN with every aggregation out of core
and prints per-epoch progress and the final test accuracy; ``aires tile`` tiles a matrix (a
``.npz`` file, a dataset's adjacency, or a generated random graph) and prints the store's
summary; ``aires data`` generates, converts and describes datasets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from aires.checks import check_positive_int, parse_size
from aires.distributed.launch import DEFAULT_TIMEOUT

__all__ = ["build_parser", "main"]


# What a command raises for bad input or a bad path: reported in one line, not a traceback.
_ERRORS = (ValueError, TypeError, OSError, NotImplementedError)


def _size(name: str, *, allow_zero: bool = False) -> Any:
    """argparse ``type`` for a byte size ("512MiB"), reporting the option's name on error."""

    def parse(text: str) -> int:
        try:
            return parse_size(text, name, allow_zero=allow_zero)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _positive(name: str) -> Any:
    def parse(text: str) -> int:
        try:
            return check_positive_int(int(text), name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(
                f"{name} must be a positive int, got {text!r}"
            ) from error

    return parse


def _add_train(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a GCN with out-of-core aggregation",
        description="Full-graph GCN training (Kipf & Welling) on aires.nn.GCN, the whole "
        "model out of core under --gpu-budget.",
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="cora, citeseer, an OGB name (ogbn-arxiv, ogbn-products; with --root), a synthetic "
        "preset (synthetic:products, tiny), a saved graph directory, or a prepared graph "
        "directory (aires data prepare: trained on its tiles and feature file in place)",
    )
    parser.add_argument(
        "--root", default=None, help="dataset root directory (Planetoid, OGB)"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=None,
        help="synthetic presets: size relative to the preset (default 1)",
    )
    parser.add_argument("--layers", type=_positive("--layers"), default=2)
    parser.add_argument("--hidden", type=_positive("--hidden"), default=16)
    parser.add_argument("--epochs", type=_positive("--epochs"), default=200)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=5e-4,
        help="L2 penalty on the first layer (default 5e-4)",
    )
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument(
        "--normalize-features",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="row-normalise the features first (Kipf & Welling, for bag-of-words); default: "
        "when no feature is negative (Cora, CiteSeer), not for signed features (OGB)",
    )
    parser.add_argument(
        "--gpu-budget",
        type=_size("--gpu-budget"),
        default=None,
        help="device bytes the whole model may use, e.g. 2GiB (default: the free memory less a "
        "margin); below its minimum working set, an error states the minimum",
    )
    parser.add_argument(
        "--host-budget",
        type=_size("--host-budget", allow_zero=True),
        default=None,
        help="pinned host bytes for tiles and tensors, e.g. 8GiB (0: what is not on the device "
        "lives on NVMe)",
    )
    parser.add_argument(
        "--tile-bytes",
        type=_size("--tile-bytes"),
        default=None,
        help="tile capacity, e.g. 64MiB (default: the tiler's)",
    )
    parser.add_argument(
        "--store-dir",
        default=None,
        help="keep tile stores here and reuse them across runs",
    )
    parser.add_argument(
        "--device", default=None, help="cuda, cuda:1, cpu (default: cuda if any)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json",
        dest="json_out",
        default=None,
        help="also write the result (history included) to this JSON file",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--nproc",
        type=_positive("--nproc"),
        default=1,
        help="processes to split the graph's rows over (torch.distributed: gloo on the CPU, "
        "nccl on GPUs, one GPU each, each with the budgets above); under torchrun, leave it "
        "at 1: torchrun starts the processes",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds a collective waits for the other processes before failing "
        f"(default {DEFAULT_TIMEOUT:g})",
    )
    parser.set_defaults(func=_run_train)


def _load(dataset: str, root: str | None, scale: float | None, seed: int) -> Any:
    """A graph by name: ``synthetic:PRESET`` (or a bare preset name) goes to the generator."""
    from aires.data import PRESETS, load_graph

    name = dataset.removeprefix("synthetic:")
    if name.lower() in (preset.lower() for preset in PRESETS):
        return load_graph(name, scale=1.0 if scale is None else scale, seed=seed)
    if dataset.startswith("synthetic:"):
        raise ValueError(
            f"--dataset: unknown synthetic preset {name!r}; presets: {', '.join(PRESETS)}"
        )
    if scale is not None:
        raise ValueError(
            f"--scale applies to synthetic presets only, not to {dataset!r}"
        )
    return load_graph(dataset, root=root)


def _run_train(args: argparse.Namespace) -> int:
    from aires.distributed import launch, world_size_from_env

    if args.nproc > 1 and world_size_from_env() > 1:
        raise ValueError("--nproc: torchrun started the processes already; leave --nproc at 1")
    if args.nproc > 1:
        summary = launch(_train_rank, args.nproc, (args,), device=_device_type(args.device),
                         timeout=args.timeout)[0]
    else:
        summary = _train_rank(args)
    if summary is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    print(
        f"{summary['dataset']}: test accuracy {summary['test_accuracy']:.4f} "
        f"(val {summary['val_accuracy']:.4f}, final loss {summary['history'][-1]['loss']:.4f}); "
        f"{summary['epoch_seconds'] * 1e3:.2f} ms per epoch on {summary['device']}"
        f"{_processes(summary['processes'])} after {summary['setup_seconds']:.2f} s of set-up"
        + ("" if summary["ready_seconds"] is None else
           f" (the first epoch began {summary['ready_seconds']:.2f} s after the process started)")
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    return 0


def _device_type(device: str | None) -> str:
    """``cuda`` or ``cpu``: what ``--device`` asks for (CUDA when any and not given)."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _processes(n: int) -> str:
    return "" if n == 1 else f" x {n} processes"


def _train_rank(args: argparse.Namespace) -> dict[str, Any] | None:
    """``aires train`` in this process: alone, or as one rank of ``--nproc`` or ``torchrun``
    (joined here); the summary on rank 0, ``None`` on the others."""
    import torch.distributed as dist

    from aires.data.prepare import MANIFEST_NAME, open_prepared
    from aires.distributed import init_from_env, world_size_from_env
    from aires.train import train

    device = args.device
    if world_size_from_env() > 1:
        device = init_from_env(_device_type(args.device), args.timeout)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if (Path(args.dataset) / MANIFEST_NAME).is_file():
        graph = open_prepared(args.dataset)
    else:
        graph = _load(args.dataset, args.root, args.scale, args.seed)
    result = train(
        graph,
        layers=args.layers,
        hidden=args.hidden,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        dropout=args.dropout,
        gpu_budget=args.gpu_budget,
        host_budget=args.host_budget,
        tile_bytes=args.tile_bytes,
        store_dir=args.store_dir,
        normalize_features=args.normalize_features,
        device=device,
        seed=args.seed,
        progress=not args.quiet and rank == 0,
        distributed=dist.is_initialized(),
    )
    steps = result.model.setup_seconds  # the rest of ready_seconds is start-up and reading
    result.model.close()
    if rank != 0:
        return None
    return {
        "dataset": graph.name,
        "test_accuracy": result.test_accuracy,
        "val_accuracy": result.val_accuracy,
        "epoch_seconds": result.epoch_seconds,
        "setup_seconds": result.setup_seconds,
        "ready_seconds": result.ready_seconds,
        "setup_steps_s": steps,
        "device": result.device,
        "processes": dist.get_world_size() if dist.is_initialized() else 1,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "history": [dataclasses.asdict(log) for log in result.history],
    }


def _add_tile(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tile",
        help="tile a matrix and print the store summary",
        description="Tile a sparse matrix into an aligned row-block store and summarise it. "
        "The matrix is a scipy .npz (--matrix), a dataset's adjacency (--dataset), "
        "or, by default, a generated random symmetric graph (--nodes, --degree).",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--matrix", type=Path, help="scipy.sparse.save_npz file")
    source.add_argument("--dataset", help="a dataset name as for 'aires train'")
    parser.add_argument("--root", default=None, help="dataset root directory")
    parser.add_argument(
        "--nodes",
        type=_positive("--nodes"),
        default=10_000,
        help="generated graph: nodes (default 10000)",
    )
    parser.add_argument(
        "--degree",
        type=_positive("--degree"),
        default=16,
        help="generated graph: mean degree (default 16)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--normalize",
        action="store_true",
        help="tile the GCN-normalised adjacency D^-1/2 (A+I) D^-1/2",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="store directory (default: a temporary one, removed afterwards)",
    )
    parser.add_argument("--tile-bytes", type=_size("--tile-bytes"), default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(func=_run_tile)


def _tile_input(args: argparse.Namespace) -> sp.csr_array:
    if args.matrix is not None:
        return sp.csr_array(sp.load_npz(args.matrix))
    if args.dataset is not None:
        return _load(args.dataset, args.root, None, args.seed).adj
    rng = np.random.default_rng(args.seed)
    pairs = args.nodes * args.degree // 2
    rows, cols = rng.integers(0, args.nodes, pairs), rng.integers(0, args.nodes, pairs)
    keep = rows != cols
    upper = sp.coo_array(
        (np.ones(int(keep.sum()), np.float32), (rows[keep], cols[keep])),
        shape=(args.nodes, args.nodes),
    )
    matrix = (upper + upper.T).tocsr()
    matrix.data[:] = 1.0
    return matrix


def _normalized(matrix: sp.csr_array) -> sp.csr_array:
    """``D^-1/2 (A + I) D^-1/2`` of an adjacency given as ``adj_t`` (as the layer tiles it)."""
    import torch

    from aires.gcn_conv import gcn_norm

    coo = matrix.tocoo()
    adj = torch.sparse_coo_tensor(
        np.vstack([coo.row, coo.col]),
        torch.as_tensor(coo.data, dtype=torch.float32),
        coo.shape,
    ).coalesce()
    norm, _ = gcn_norm(adj)
    indices = norm.indices().numpy()
    return sp.csr_array(
        (norm.values().numpy(), (indices[0], indices[1])), shape=matrix.shape
    )


def _run_tile(args: argparse.Namespace) -> int:
    from aires.tiling import build_store

    matrix = _tile_input(args)
    if args.normalize:
        matrix = _normalized(matrix)
    options: dict[str, Any] = (
        {} if args.tile_bytes is None else {"tile_bytes": args.tile_bytes}
    )
    with tempfile.TemporaryDirectory(prefix="aires-tile-") as scratch:
        path = args.out if args.out is not None else Path(scratch) / "store"
        store = build_store(matrix, path, overwrite=args.overwrite, **options)
        print(json.dumps(_summary(store), indent=2))
    return 0


def _summary(store: Any) -> dict[str, Any]:
    """What a store holds and how it is laid out."""
    tiles = store.tiles
    nnz = np.array([t.nnz for t in tiles], dtype=np.int64)
    nbytes = np.array([t.nbytes for t in tiles], dtype=np.int64)
    rows = np.array([t.row_stop - t.row_start for t in tiles], dtype=np.int64)
    return {
        "path": str(store.path),
        "shape": list(store.shape),
        "nnz": int(store.nnz),
        "tiles": len(store),
        "tile_bytes": int(store.tile_bytes),
        "alignment": int(store.alignment),
        "index_dtype": str(store.index_dtype),
        "value_dtype": str(store.value_dtype),
        "symmetric": store.symmetric,
        "io_mode": store.io_mode,
        "bytes_on_disk": int(nbytes.sum()),
        "split_hub_tiles": int(sum(t.partial for t in tiles)),
        "per_tile": {
            "nnz": _spread(nnz),
            "rows": _spread(rows),
            "bytes": _spread(nbytes),
        },
    }


def _spread(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {
        "min": int(values.min()),
        "mean": float(values.mean()),
        "max": int(values.max()),
    }


def build_parser() -> argparse.ArgumentParser:
    """The ``aires`` argument parser with its ``train``, ``tile`` and ``data`` subcommands."""
    from aires.data.cli import add_parser as add_data_parser

    parser = argparse.ArgumentParser(
        prog="aires", description="Out-of-core GCN training (AIRES)."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_train(subparsers)
    _add_tile(subparsers)
    add_data_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``aires`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Bad arguments exit with status 2 (argparse's usage error). So do errors the command raises
    for bad input or an unusable path (a missing dataset, an occupied ``--out``, a budget below
    the minimum working set): one line ``aires <command>: error: <message>`` on stderr.
    """
    from aires.distributed import RankFailedError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _ERRORS as error:
        print(f"aires {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RankFailedError as error:  # the rank's own error and traceback, then ours
        print(f"aires {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
