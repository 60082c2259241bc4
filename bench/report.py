"""The benchmark's outputs: the JSON document (schema and check), the banner, the table, the plot.

The JSON document has exactly these keys::

    {"device", "date", "git_commit", "command",
     "dataset": {"name", "nodes", "edges", "features"},
     "gpu_budget_bytes", "mode",
     "ceilings": {"h2d_GBps", "disk_read_GBps", "incore_spmm_ms"},
     "order", "disk_cold",
     "methods": {NAME: {"status": "ok|oom|error", "epoch_s": [...], "peak_gpu_bytes",
                        "bytes_h2d", "bytes_disk", "error", ...}}}

Only a method's entry may carry more keys (``overlap_efficiency``, ``ablation``, ``loss``, ...).
``bytes_h2d`` and ``bytes_disk`` are bytes per epoch (mean over the timed epochs); ``epoch_s``
holds every timed epoch; ``dataset.edges`` counts the stored entries of the input adjacency
(both directions of an undirected edge, no self loops); ``mode`` is how the disk path ran
(``gds``, ``kvikio-compat``, ``posix``); ``order`` is every method's product order (``auto``:
AIRES's cost model, ``pyg``: ``Â (H W)``); ``disk_cold`` whether the page cache was dropped
before the disk ceiling and before every timed epoch of a method that reads files (results
written before these two keys existed lack them and still validate).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.methods.config import ORDERS
from bench.methods.result import STATUSES

__all__ = [
    "CEILING_KEYS",
    "DATASET_KEYS",
    "LATER_KEYS",
    "LEGEND",
    "METHOD_KEYS",
    "SWEEP_KEYS",
    "TOP_KEYS",
    "format_bytes",
    "format_table",
    "main",
    "plot",
    "plot_result",
    "plot_sweep",
    "speedups",
    "validate",
]

TOP_KEYS = frozenset(
    {"device", "date", "git_commit", "command", "dataset", "gpu_budget_bytes", "mode",
     "ceilings", "methods"}
)
#: Keys added after results were committed, or by hand to a committed result (why its
#: ``git_commit`` was corrected): checked when present.
LATER_KEYS = frozenset({"order", "disk_cold", "git_commit_note"})
#: A budget sweep (``--budgets``) adds these.
SWEEP_KEYS = frozenset({"budget_scope", "sweep"})
DATASET_KEYS = frozenset({"name", "nodes", "edges", "features"})
CEILING_KEYS = frozenset({"h2d_GBps", "disk_read_GBps", "incore_spmm_ms"})
METHOD_KEYS = frozenset(
    {"status", "epoch_s", "peak_gpu_bytes", "bytes_h2d", "bytes_disk", "error"}
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ValueError(f"benchmark JSON: {where}: {message}")


def _check_keys(value: Any, keys: frozenset[str], where: str, *, extra: bool = False) -> None:
    _check(isinstance(value, dict), where, f"must be an object, got {type(value).__name__}")
    missing, unknown = keys - value.keys(), value.keys() - keys
    _check(not missing, where, f"missing keys {sorted(missing)}")
    _check(extra or not unknown, where, f"unexpected keys {sorted(unknown)}")


def validate(doc: Any) -> None:
    """Check ``doc`` against the benchmark JSON schema.

    Raises:
        ValueError: naming the first key that does not conform.
    """
    sweep = isinstance(doc, dict) and "sweep" in doc
    later = LATER_KEYS & doc.keys() if isinstance(doc, dict) else frozenset()
    _check_keys(doc, TOP_KEYS | later | (SWEEP_KEYS if sweep else frozenset()), "top level")
    _check(doc.get("order", "auto") in ORDERS, "order",
           f"must be one of {ORDERS}, got {doc.get('order')!r}")
    _check(isinstance(doc.get("disk_cold", False), bool), "disk_cold",
           f"must be a bool, got {doc.get('disk_cold')!r}")
    if sweep:
        for name, runs in doc["sweep"].items():
            for k, run in enumerate(runs):
                where = f"sweep.{name}[{k}]"
                _check(_is_int(run.get("budget_bytes")) and run["budget_bytes"] > 0, where,
                       f"budget_bytes must be a positive int, got {run.get('budget_bytes')!r}")
                _check(run.get("status") in STATUSES, where,
                       f"status must be one of {STATUSES}, got {run.get('status')!r}")
    for key in ("device", "date", "command", "mode"):
        _check(isinstance(doc[key], str), key, f"must be a string, got {doc[key]!r}")
    _check(doc["git_commit"] is None or isinstance(doc["git_commit"], str), "git_commit",
           f"must be a string or null, got {doc['git_commit']!r}")
    _check(isinstance(doc.get("git_commit_note", ""), str), "git_commit_note",
           f"must be a string, got {doc.get('git_commit_note')!r}")
    budget = doc["gpu_budget_bytes"]
    _check(budget is None or (_is_int(budget) and budget > 0), "gpu_budget_bytes",
           f"must be a positive int or null, got {budget!r}")
    _check_keys(doc["dataset"], DATASET_KEYS, "dataset")
    dataset = doc["dataset"]
    _check(isinstance(dataset["name"], str), "dataset.name", "must be a string")
    for key in ("nodes", "edges", "features"):
        _check(_is_int(dataset[key]) and dataset[key] >= 0, f"dataset.{key}",
               f"must be a non-negative int, got {dataset[key]!r}")
    _check_keys(doc["ceilings"], CEILING_KEYS, "ceilings")
    for key, value in doc["ceilings"].items():
        _check(value is None or (_is_number(value) and value > 0), f"ceilings.{key}",
               f"must be a positive number or null, got {value!r}")
    methods = doc["methods"]
    _check(isinstance(methods, dict) and methods, "methods", "must be a non-empty object")
    for name, entry in methods.items():
        where = f"methods.{name}"
        _check_keys(entry, METHOD_KEYS, where, extra=True)
        status = entry["status"]
        _check(status in STATUSES, f"{where}.status", f"must be one of {STATUSES}, got {status!r}")
        times = entry["epoch_s"]
        _check(isinstance(times, list) and all(_is_number(t) and t >= 0 for t in times),
               f"{where}.epoch_s", "must be a list of non-negative numbers")
        _check(status != "ok" or bool(times), f"{where}.epoch_s", "is empty for status ok")
        for key in ("peak_gpu_bytes", "bytes_h2d", "bytes_disk"):
            value = entry[key]
            _check(value is None or (_is_int(value) and value >= 0), f"{where}.{key}",
                   f"must be a non-negative int or null, got {value!r}")
        error = entry["error"]
        _check(error is None or isinstance(error, str), f"{where}.error",
               "must be a string or null")
        _check(status == "ok" or bool(error), f"{where}.error", f"must say why for status {status}")


def _median(entry: dict[str, Any]) -> float | None:
    return float(np.median(entry["epoch_s"])) if entry["status"] == "ok" else None


def speedups(doc: dict[str, Any], reference: str = "aires") -> dict[str, float | None]:
    """Speed-up of ``reference`` over each method: ``median epoch(method) / median(reference)``.

    ``None`` where either did not finish.
    """
    methods = doc["methods"]
    base = _median(methods[reference]) if reference in methods else None
    return {
        name: (m / base if base and (m := _median(entry)) is not None else None)
        for name, entry in methods.items()
    }


def format_bytes(value: int | None) -> str:
    """``12.3 GiB``-style size (``-`` for None)."""
    if value is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} B"


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


#: The line above the table that says what its columns mean.
LEGEND = (
    "epoch: one training step's wall time over the timed epochs (median, min, max); budget: "
    "device bytes the method may hold; peak GPU: CUDA peak; H2D, disk: bytes per epoch copied "
    "to the device, read from files; AIRES speed-up: the method's median over aires's"
)


def format_table(doc: dict[str, Any]) -> str:
    """The results table under its :data:`LEGEND`: epoch time median/min/max, budget, peak,
    bytes per path, AIRES speed-up. A method run at its own budget (``budget_bytes``, the demo's
    budget case) shows that budget, the others the run's."""
    header = ["method", "status", "epoch median", "min", "max", "budget", "peak GPU",
              "H2D/epoch", "disk/epoch", "AIRES speed-up", "notes"]
    rows = [header]
    ratio = speedups(doc)
    for name, entry in doc["methods"].items():
        ok = entry["status"] == "ok"
        times = entry["epoch_s"]
        notes = []
        if entry.get("overlap_efficiency") is not None:
            notes.append(f"overlap {entry['overlap_efficiency']:.2f}")
        if entry.get("cached_fraction") is not None:
            notes.append(f"cached {entry['cached_fraction']:.0%} of rows")
        if entry.get("adjacency_cached") is not None:
            notes.append("Â cached" if entry["adjacency_cached"] else "Â streamed")
        if entry.get("policy") is not None:
            notes.append(f"managed: {entry['policy']}")
        if entry.get("disk_cold") is False:
            notes.append("disk: page cache not dropped")
        if not ok:
            notes.append(str(entry["error"]).splitlines()[0][:90])
        rows.append([
            name,
            entry["status"],
            _seconds(float(np.median(times))) if ok else "-",
            _seconds(min(times)) if ok else "-",
            _seconds(max(times)) if ok else "-",
            format_bytes(entry.get("budget_bytes", doc["gpu_budget_bytes"])),
            format_bytes(entry["peak_gpu_bytes"]),
            format_bytes(entry["bytes_h2d"]),
            format_bytes(entry["bytes_disk"]),
            f"{ratio[name]:.2f}x" if ratio.get(name) is not None and name != "aires" else "-",
            "; ".join(notes),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([LEGEND, *lines])


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display).

    Raises:
        ImportError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the plot needs matplotlib (pip install aires[bench])") from error

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(doc: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of the median epoch time per method (min-max whiskers; OOM/error marked).

    Returns:
        The PNG written.

    Raises:
        ImportError: matplotlib is not installed.
    """
    plt = _pyplot()

    names = list(doc["methods"])
    medians = [_median(doc["methods"][n]) for n in names]
    finished = [max(e["epoch_s"]) for e in doc["methods"].values() if e["status"] == "ok"]
    top = max(finished) if finished else 1.0
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.2), dpi=120)
    for i, (name, median) in enumerate(zip(names, medians)):
        entry = doc["methods"][name]
        if median is None:
            ax.bar(i, top * 0.15, color="white", edgecolor="grey", hatch="//")
            ax.text(i, top * 0.17, entry["status"].upper(), ha="center", va="bottom", fontsize=9)
            continue
        times = entry["epoch_s"]
        color = "tab:green" if name == "aires" else (
            "tab:olive" if name.startswith("aires-") else "tab:blue")
        ax.bar(i, median, color=color,
               yerr=[[median - min(times)], [max(times) - median]], capsize=4)
        ax.text(i, max(times) + top * 0.01, _seconds(median), ha="center", va="bottom",
                fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("epoch time (s), median; whiskers min-max")
    dataset = doc["dataset"]
    ax.set_title(
        f"{dataset['name']}: {dataset['nodes']:,} nodes, {dataset['edges']:,} edges; "
        f"GPU budget {format_bytes(doc['gpu_budget_bytes']) if doc['gpu_budget_bytes'] else 'none'}"
        f"\n{doc['device']}",
        fontsize=9,
    )
    ax.set_ylim(0, top * 1.25)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def sweep_lines(doc: dict[str, Any]) -> list[tuple[str, list[tuple[float, float]], list[float]]]:
    """Per method of a sweep: its legend label, ``(budget GiB, median epoch s)`` where it ran,
    and the budgets (GiB) where it ran out of memory (or was refused for memory). A method with
    budgets that neither ran nor ran out of memory (timed out, or not reached under
    ``--time-limit``) says so in its label: those are not measured, not failed."""
    lines = []
    for name, runs in doc["sweep"].items():
        ok = [(r["budget_bytes"] / 2**30, float(np.median(r["epoch_s"]))) for r in runs
              if r["status"] == "ok" and r["epoch_s"]]
        oom = [r["budget_bytes"] / 2**30 for r in runs if r["status"] == "oom"]
        unmeasured = len(runs) - len(ok) - len(oom)
        label = name if not unmeasured else f"{name} ({unmeasured} not measured)"
        lines.append((label, ok, oom))
    return lines


def plot_sweep(doc: dict[str, Any], path: str | Path) -> Path:
    """Epoch time against budget, one line per method, ending where the method stops running
    (budgets where it ran out of memory marked ``x`` on the axis; see :func:`sweep_lines`): at
    a GPU's memory, what runs and how fast.

    Raises:
        ImportError: matplotlib is not installed.
    """
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=120)
    for label, ok, oom in sweep_lines(doc):
        line = ax.plot([b for b, _ in ok], [t for _, t in ok], marker="o", label=label)
        if oom:  # on the x axis itself: x in data, y in axes units
            ax.plot(oom, [0.0] * len(oom), "x", color=line[0].get_color(), clip_on=False,
                    transform=ax.get_xaxis_transform())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # methods differ by orders of magnitude (uvm seconds, in-core ms)
    ax.set_xlabel("GPU budget (GiB, whole process)" if doc.get("budget_scope") == "process"
                  else "budget (GiB)")
    ax.set_ylabel("epoch time (s), median")
    dataset = doc["dataset"]
    ax.set_title(f"{dataset['name']}: {dataset['nodes']:,} nodes; x: out of memory at that "
                 "budget", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_result(doc: dict[str, Any], path: str | Path) -> Path:
    """The result's picture: a sweep's lines (:func:`plot_sweep`), else the bars
    (:func:`plot`)."""
    return (plot_sweep if "sweep" in doc else plot)(doc, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report RESULT.json [--plot OUT.png]``: check, tabulate and plot a result.

    Renders a benchmark JSON anywhere, e.g. on a workstation for results measured on a GPU
    machine without matplotlib.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.report",
                                     description="Check a benchmark JSON, print its table and "
                                     "optionally plot it.")
    parser.add_argument("result", help="benchmark JSON written by aires-bench --out")
    parser.add_argument("--plot", help="write the PNG here (a sweep's lines, or bars)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        doc = json.loads(Path(args.result).read_text())
        validate(doc)
    except (OSError, ValueError) as error:
        print(f"bench.report: {args.result}: {error}", file=sys.stderr)
        return 2
    print(format_table(doc))
    if args.plot:
        print(f"wrote {plot_result(doc, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
