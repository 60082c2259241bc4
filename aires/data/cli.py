"""``aires data``: generate, convert and describe graphs.

::

    aires data generate --preset products --scale 1 --seed 0 --out DIR --report r.json
    aires data convert edges.txt --out DIR   # or an .npz, an OGB dataset dir, ogbn-NAME --root R
    aires data describe DIR_OR_NAME [--json]
    aires data prepare --preset papers100M --scale 0.3 --root DIR --json r.json  # Â tiles + X

Standalone: ``python -m aires.data.cli generate ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from aires.data.edgelist import convert_edge_list
from aires.data.generator import PRESETS, synthetic
from aires.data.graph import Graph
from aires.data.loader import load_graph
from aires.data.ogb import load_ogb
from aires.data.planetoid import load_planetoid
from aires.data.prepare import FEATURE_DTYPES, Synthetic, prepare
from aires.data.storage import MANIFEST, save_graph

__all__ = ["add_parser", "main"]

_DEFAULT_SPARSE_DENSITY = 0.01
_DESCRIPTION = """generate, convert and describe graphs

examples:
  aires data generate --preset products --scale 1 --seed 0 --out DIR --report r.json
  aires data convert edges.txt --out DIR   # or an .npz, an OGB dataset dir, ogbn-NAME --root R
  aires data describe DIR_OR_NAME [--json]
  aires data prepare --preset papers100M --scale 0.3 --root DIR [--tile-bytes 64MiB]
      [--feature-dtype float32|fp16|bf16] [--json OUT.json]
  aires data prepare --source GRAPH_DIR|OGB_DATASET_DIR|EDGES.txt --root DIR"""
_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    NotImplementedError,
    OSError,
    RuntimeError,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``data`` (with ``generate``, ``convert``, ``describe``) on an ``aires`` parser.

    Each command sets ``func``: call ``args.func(args)``, which returns the exit status.
    """
    parser = subparsers.add_parser(
        "data",
        help="generate, convert and describe graphs",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_commands(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``aires data`` with ``argv`` (without the leading ``data``); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="aires data",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_commands(parser)
    args = parser.parse_args(argv)
    return args.func(args)


def _add_commands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    gen = commands.add_parser("generate", help="generate a synthetic RMAT graph")
    gen.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    gen.add_argument(
        "--scale", type=float, default=1.0, help="multiplies nodes and edges (default 1)"
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--features", choices=("dense", "sparse"), default="dense")
    gen.add_argument(
        "--feature-density",
        type=float,
        default=None,
        help=f"share of stored feature entries (sparse only; default {_DEFAULT_SPARSE_DENSITY})",
    )
    gen.add_argument("--out", type=Path, default=None, help="graph directory (default: the cache)")
    gen.add_argument(
        "--cache-dir", type=Path, default=None, help="default $AIRES_CACHE or ~/.cache/aires/graphs"
    )
    gen.add_argument("--overwrite", action="store_true", help="generate again even if it exists")
    gen.add_argument("--chunk-size", type=int, default=None, help="entries in memory at once")
    gen.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    gen.add_argument("--report", type=Path, default=None, help="write time and bytes as JSON here")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    gen.set_defaults(func=_generate)

    conv = commands.add_parser(
        "convert", help="convert an edge list, a Planetoid .npz or an OGB dataset"
    )
    conv.add_argument(
        "input", help="edge list file, .npz, OGB dataset dir, DatasetSaver dir or ogbn-NAME"
    )
    conv.add_argument("--out", type=Path, required=True, help="graph directory to write")
    conv.add_argument("--format", choices=("auto", "edgelist", "npz", "ogb"), default="auto")
    conv.add_argument("--root", type=Path, default=None, help="OGB root for ogbn-NAME")
    conv.add_argument(
        "--num-nodes", type=int, default=None, help="edge list: N (default max id + 1)"
    )
    conv.add_argument(
        "--directed", action="store_true", help="keep edges one-way (default: symmetrise)"
    )
    conv.add_argument("--name", default=None, help="edge list: the graph's name")
    conv.add_argument("--overwrite", action="store_true")
    conv.add_argument("--quiet", action="store_true", help="no progress bars")
    conv.set_defaults(func=_convert)

    desc = commands.add_parser("describe", help="print nodes, edges, degree statistics and bytes")
    desc.add_argument(
        "graph", help="graph directory, .npz, OGB dataset dir, cora, ogbn-NAME or a preset"
    )
    desc.add_argument("--root", type=Path, default=None, help="Planetoid or OGB root for names")
    desc.add_argument("--json", action="store_true", help="print JSON")
    desc.set_defaults(func=_describe)

    prep = commands.add_parser(
        "prepare",
        help="write the normalised tile store of Â and the aligned features once (reused after)",
    )
    what = prep.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", help=f"a synthetic preset: {', '.join(PRESETS)}")
    what.add_argument(
        "--source", type=Path, help="graph directory, OGB dataset directory or edge list file"
    )
    prep.add_argument("--scale", type=float, default=1.0, help="preset scale (default 1)")
    prep.add_argument("--seed", type=int, default=0, help="preset seed (default 0)")
    prep.add_argument("--root", type=Path, required=True, help="where prepared graphs live")
    prep.add_argument("--tile-bytes", default="64MiB", help="tile slot capacity (default 64MiB)")
    prep.add_argument(
        "--feature-dtype", choices=tuple(FEATURE_DTYPES), default="float32",
        help="dtype of the feature file (default float32)",
    )
    prep.add_argument("--threads", type=int, default=None, help="tile workers (default: cores)")
    prep.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="where the generator runs")
    prep.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    prep.set_defaults(func=_prepare)


def _fail(message: str) -> int:
    print(f"aires data: error: {message}", file=sys.stderr)
    return 1


def _generate(args: argparse.Namespace) -> int:
    if args.features == "dense" and args.feature_density is not None:
        return _fail("--feature-density applies to --features sparse only")
    density = (
        None if args.features == "dense" else (args.feature_density or _DEFAULT_SPARSE_DENSITY)
    )
    device = None if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA GPU is visible")
    start, wall = time.time(), time.perf_counter()
    try:
        graph = synthetic(
            args.preset,
            scale=args.scale,
            seed=args.seed,
            feature_density=density,
            cache_dir=args.cache_dir,
            out=args.out,
            overwrite=args.overwrite,
            chunk_size=args.chunk_size,
            device=device,
            progress=not args.quiet,
        )
    except _ERRORS as err:
        return _fail(str(err))
    seconds = time.perf_counter() - wall
    path = Path(graph.provenance["path"])
    generated = (path / MANIFEST).stat().st_mtime >= start
    info = graph.describe()
    print(path)
    print(_summary(info), file=sys.stderr)
    if args.report is not None:
        report = _report(graph, info, path, generated, seconds, args, density)
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _report(
    graph: Graph,
    info: dict[str, Any],
    path: Path,
    generated: bool,
    seconds: float,
    args: argparse.Namespace,
    density: float | None,
) -> dict[str, Any]:
    """What a timing run records: sizes, seconds per phase, bytes in memory and on disk."""
    on_disk = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return {
        "command": "aires data generate",
        "preset": args.preset,
        "scale": args.scale,
        "seed": args.seed,
        "features": args.features,
        "feature_density": density,
        "path": str(path),
        "generated": generated,
        "seconds": round(seconds, 3),
        "generation": graph.provenance.get("generation"),
        "nodes": info["nodes"],
        "undirected_edges": info["undirected_edges"],
        "edges": info["edges"],
        "num_features": graph.num_features,
        "num_classes": graph.num_classes,
        "degree": info["degree"],
        "bytes": info["bytes"],
        "bytes_on_disk": on_disk,
        "disk_free_bytes": shutil.disk_usage(path).free,
        "host": platform.node(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _convert(args: argparse.Namespace) -> int:
    source = args.input
    kind = args.format
    if kind == "auto":
        path = Path(source).expanduser()
        if source.endswith(".npz"):
            kind = "npz"
        elif source.startswith("ogbn-") or path.is_dir():
            kind = "ogb"
        else:
            kind = "edgelist"
    progress = not args.quiet
    try:
        if kind == "edgelist":
            graph = convert_edge_list(
                source,
                args.out,
                num_nodes=args.num_nodes,
                undirected=not args.directed,
                name=args.name,
                overwrite=args.overwrite,
                progress=progress,
            )
        elif kind == "npz":
            save_graph(load_planetoid(source), args.out, overwrite=args.overwrite)
            graph = load_graph(args.out)
        else:
            graph = load_ogb(
                source,
                args.root,
                undirected=not args.directed,
                out=args.out,
                overwrite=args.overwrite,
                progress=progress,
            )
    except _ERRORS as err:
        return _fail(str(err))
    print(graph.provenance["path"])
    print(_summary(graph.describe()), file=sys.stderr)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA GPU is visible")
    if args.source is not None and (args.scale != 1.0 or args.seed != 0):
        return _fail("--scale and --seed apply to --preset only")
    source = Synthetic(args.preset, args.scale, args.seed) if args.preset else args.source
    try:
        prepared = prepare(
            source,
            root=args.root,
            tile_bytes=args.tile_bytes,
            feature_dtype=args.feature_dtype,
            threads=args.threads,
            device=None if args.device == "auto" else args.device,
            progress=not args.quiet,
        )
    except _ERRORS as err:
        return _fail(str(err))
    report = {
        "command": "aires data prepare",
        "source": str(source),
        "path": str(prepared.path),
        **prepared.report,
        "disk_free_bytes": shutil.disk_usage(prepared.path).free,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    print(prepared.path)
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in prepared.timings.items())
    print(
        f"{'reused' if prepared.reused else 'prepared'} {prepared.num_nodes:,} nodes, "
        f"{prepared.adjacency.nnz:,} entries of Â in {len(prepared.adjacency)} tiles; {steps}; "
        f"peak RSS {prepared.peak_rss_bytes / 2**30:.2f} GiB",
        file=sys.stderr,
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _describe(args: argparse.Namespace) -> int:
    try:
        graph = load_graph(args.graph, args.root)
    except _ERRORS as err:
        return _fail(str(err))
    info = graph.describe()
    print(json.dumps(info, indent=1) if args.json else _summary(info))
    return 0


def _summary(info: dict[str, Any]) -> str:
    deg = info["degree"]
    feats = info["features"]
    size = info["bytes"]
    undirected = (
        "" if info["undirected_edges"] is None else f" ({info['undirected_edges']:,} undirected)"
    )
    density = "" if feats["density"] is None else f", density {feats['density']:.4g}"
    split = info["split"]
    lines = [
        ("name", info["name"]),
        ("nodes", f"{info['nodes']:,}"),
        ("edges", f"{info['edges']:,} stored{undirected}, {info['self_loops']:,} self loops"),
        (
            "degree",
            f"min {deg['min']:,}  mean {deg['mean']:.2f}  max {deg['max']:,}  p99 {deg['p99']:,}",
        ),
        ("features", f"{feats['dim']:,} {feats['kind']}{density}"),
        ("classes", f"{info['classes']}"),
        ("split", f"train {split['train']:,}  val {split['val']:,}  test {split['test']:,}"),
        ("bytes", "  ".join(f"{k} {_human(v)}" for k, v in size.items())),
    ]
    return "\n".join(f"{key:<10}{value}" for key, value in lines)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n:.3g} TB"


if __name__ == "__main__":
    sys.exit(main())
