"""Where every tensor of an epoch lives, and the bytes an epoch moves: the traffic model.

The planner takes the :class:`~aires.nn.program.Program` of an epoch, the node count, the
adjacency's tile table and the two budgets, and decides:

- ``panel_cols`` ``w``: tensors are stored as column panels of ``w`` columns (row-major inside a
  panel, so any row block of a panel is one contiguous range). An aggregation ``Â · Z`` runs one
  pass over ``Â``'s tiles per panel of ``Z``, with that panel on the device; wider panels mean
  fewer passes over ``Â`` but a larger panel buffer.
- the tier of every panel: the device (in one arena, where tensors whose lifetimes do not
  overlap share bytes), pinned host memory, or NVMe;
- how many of ``Â``'s tiles stay on the device and in pinned memory (the scheduler's budgets);
- the rows of one block of each row-local pass: the widest pass's blocks take a share of the
  budget (or what the rest leaves), and narrower passes fit more rows in the same bytes;
- whether the row-local stages keep their activations on the device for the backward pass
  (what their derivatives read, as an in-core loop keeps them) or recompute them block by block:
  keeping saves a forward pass of every such stage but holds its widest activation for the
  whole graph, so it wins where the budget has that room to spare (the in-core regime).

**Traffic model** (bytes per epoch; ``|T|`` the bytes of tensor ``T``, ``k_T`` its reads plus
writes in the epoch, ``|Â|_h`` / ``|Â|_d`` the adjacency bytes held in pinned memory / on NVMe,
``p`` the aggregation passes of the epoch, ``sum over aggregations of ceil(cols / w)``)::

    H2D  = sum over host and NVMe panels of reads * |panel| + p * (|Â|_h + |Â|_d)
    D2H  = sum over host and NVMe panels of writes * |panel|
    disk read  = sum over NVMe panels of reads * |panel| + p * |Â|_d
    disk write = sum over NVMe panels of writes * |panel|
    exchange   = (source_rows - rows) * item * the columns of all passes (a rank's receipts)
                 but those over a tensor the rank holds whole

Device panels cost nothing. The planner fills the device, then pinned memory, greedily by bytes
saved per byte held (``k_T`` for a panel, ``p`` for the adjacency), trying every panel width
(but those whose passes' compute alone exceeds the best plan's time) and both fill orders
(tensors first, adjacency first), and keeps the plan with the least predicted time at the given
bandwidths (:func:`_step_seconds`: the steps in series, each as long as the longest of its
overlapping copies and compute, and an aggregation's passes each after its input panel's
load). Every run reports the bytes beside those it measured (:class:`~aires.blocks.Traffic`),
and each step's predicted seconds beside those it took.

A rank of a distributed epoch holds its own rows of every tensor, but may hold the input ``x``
(which every rank is given whole) for all rows: its aggregation then needs no exchange, at the
price of the other ranks' rows in this rank's tiers, and of reading them there. Both are
planned and ranked.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aires.blocks import Traffic
from aires.blocks.tensor import PAGE_ROWS
from aires.nn.program import Aggregate, Program, Rows
from aires.scheduler.placement import MIN_SLOTS, format_bytes, place
from aires.scheduler.transfer import PAGE

__all__ = ["Bandwidths", "TensorPlan", "Plan", "plan_epoch", "epoch_steps", "MARGIN"]

#: Device bytes kept out of every plan on a GPU: the CUDA caching allocator rounds blocks up
#: (to 2 MiB segments for large ones) and the row-local stages' temporaries vary a
#: little with the block, so a plan that used the budget to the byte would run out of memory.
MARGIN = 64 << 20
#: Share of the device budget, less the margin, a row-local stage's working set may take
#: (blocks of rows and their temporaries). Larger blocks mean fewer kernel launches per pass.
ROWS_SHARE = 0.2
#: Floats per row a row-local stage keeps on the device per unit of its widest layer, for the
#: recomputed activations, their gradients and what their derivatives read.
TEMPS_PER_WIDTH = 5
#: The same for a forward pass of a stage without dropout: a linear's output and the ReLU's
#: (its input and output blocks are in its buffers). Larger blocks mean fewer of them, and a
#: block's host time, not its bytes, set products' forward pass at 2 GiB (14 to 16 ms for
#: 9 ms of copies in 45 blocks).
FORWARD_TEMPS_PER_WIDTH = 2
#: Alignment of the tensors in the device arena (any dtype's, and whole cache lines).
ALIGN = 4096
#: The fixed cost of one aggregation pass per nonzero, in columns of SpMM work (reading the
#: nonzero, the tile calls). Measured in core on the H200 on products (126M nonzeros, every
#: tensor on the device at 16 GiB): a pass of 100 columns took 14.1 ms and one of 47 columns
#: 10.9 ms (``bench/results/model-products-ac10428-h200x2.json``, ``stages``), about
#: ``nnz * (w + 134)`` at 2.1e12 a second. Out of core a pass also waits for its input panel,
#: which the time model counts on its own (:func:`_step_seconds`).
PASS_COLUMNS = 134
#: Shares of the device room tried for the adjacency's resident tiles before tensors fill it.
ADJACENCY_SHARES = (0.0, 0.5, 1.0)
#: Candidates for the device arena tried with the arena packed anew when they do not fit
#: beside what is placed (see ``fill_tensors``).
MAX_REPACKS = 32
#: The fewest rows a row-local block may have (the minimum working set's share).
MIN_BLOCK_ROWS = 64
#: The host's cost of one row block of a backward or loss pass: its kernel launches and their
#: host work (an autograd graph a block until ``aires.nn.chain``, when these were measured),
#: which the device's compute waits for but the copies do not.
#: Measured on the H200 on products (``bench/results/model-products-ac10428-h200x2.json``,
#: ``stages``): the backward pass of the hidden stage took 29.4 ms in 44 blocks at 2 GiB and
#: 60.7 ms in 104 at 1 GiB, beside 16.8 ms of compute, about 0.3 and 0.4 ms a block. Plans
#: with blocks of a few rows lose to plans with narrower panels. The host sets it: the same
#: 2 GiB pass took 23.6 to 37.4 ms on the H200 machines lent on 2026-11-30
#: (``model-products-side-h200x2.json``, ``model-products-29037bd-h200x2.json``), and 18.7 to
#: 24.4 ms by hand with fewer kernels (``model-products-h200x2.json`` and its two repeats), where
#: the model's epoch at 2 GiB (119.8 ms) sits among the measured ones (115.5 to 125.3 ms).
BLOCK_SECONDS = 0.3e-3
#: The same for a forward pass, which launches its kernels only: its 45 blocks at 2 GiB and 104
#: at 1 GiB took no longer than their copies (18.3 and 19.3 ms for 17.8 ms of bytes).
FORWARD_BLOCK_SECONDS = 0.1e-3
#: Row-block buffers in flight (one being loaded, one computed and written back).
BUFFERS = 2
#: Activation floats per second a row-local stage's forward pass computes: measured on the H200
#: on products (2.45M rows, hidden 256), the hidden stage's forward pass took 6.9 ms
#: (``bench/results/profile-products-16GiB-h200x2.log``).
ROW_FLOATS_PER_SECOND = 90e9
#: A backward pass's compute in forward passes of its stage: from kept activations, and where it
#: recomputes them first. Measured there: 9.9 ms at 16 GiB (kept) and 17.6 ms at 8 GiB
#: (``model-products-ac10428-h200x2.json``, ``stages``).
KEPT_BACKWARD, RECOMPUTED_BACKWARD = 1.4, 2.4


@dataclass(frozen=True)
class Bandwidths:
    """Rates for ranking plans (priors: the H200's pinned copies, cold disk reads and in-core
    SpMM, DESIGN.md and :data:`PASS_COLUMNS`).

    ``spmm`` is in units of ``nnz * (w + PASS_COLUMNS)`` per second: a pass with ``w`` columns
    gathers ``w`` values per nonzero and pays a fixed cost per nonzero worth
    :data:`PASS_COLUMNS` columns. ``exchange``: a prior for NCCL
    between two GPUs over PCIe; a distributed model plans with the rate it measures
    (:meth:`Exchange.bandwidth <aires.distributed.Exchange.bandwidth>`).
    """

    h2d: float = 50e9
    d2h: float = 50e9
    disk_read: float = 1.5e9
    disk_write: float = 1.5e9
    spmm: float = 2.1e12
    exchange: float = 20e9


@dataclass(frozen=True)
class TensorPlan:
    """One tensor's panels and where each lives.

    Attributes:
        name: the program's name of the tensor (``x``, ``s0``, ``ds1``, ...).
        cols: columns.
        tiers: per panel, ``"gpu"``, ``"host"`` or ``"disk"``.
        offsets: per panel, its byte offset in its tier's arena.
        reads, writes: whole-tensor reads and writes per epoch.
        first, last: the steps of the epoch it lives between (``x``: all of them).
        rows: its rows (the plan's, or the whole graph's for a tensor in ``Plan.whole``).
    """

    name: str
    cols: int
    tiers: tuple[str, ...]
    offsets: tuple[int, ...]
    reads: int
    writes: int
    first: int
    last: int
    rows: int


@dataclass(frozen=True)
class Plan:
    """A placement of an epoch's tensors and the adjacency under the two budgets.

    Attributes:
        rows: nodes.
        item: bytes per element of the dense tensors.
        panel_cols: ``w``.
        block_rows: rows per block of the widest row-local pass.
        rows_bytes: device bytes of a row-local pass's blocks and temporaries.
        pass_rows: rows per block of each row-local pass of a training epoch, by the names it
            reads and writes (:meth:`rows_for`), each as many as ``rows_bytes`` holds.
        tensors: by name.
        arena_bytes: device bytes of the arena (device panels and the aggregation's input panel).
        host_arena_bytes: pinned bytes of the host panels' arena.
        disk_bytes: bytes of the NVMe panels' file.
        panel_offsets: arena offset of the input-panel buffer of each aggregation source not
            held on the device (the buffer lives during that aggregation only).
        adjacency_gpu: device budget handed to the adjacency's scheduler.
        adjacency_host: pinned budget handed to it: the bytes of its tiles in pinned memory.
        adjacency_resident, adjacency_disk: its bytes on the device and on NVMe.
        passes: aggregation passes per epoch (forward and backward).
        pass_columns: columns those passes compute, in all.
        predicted: the traffic model's bytes per epoch.
        gpu_bytes: what the plan holds on the device at most (arena, adjacency, row blocks,
            parameters, margin): at most the budget.
        breakdown: ``gpu_bytes`` by part.
        host_bytes: pinned bytes the plan holds.
        kept: targets of the row-local stages whose activations the forward pass keeps on the
            device for the backward pass (the others are recomputed block by block).
        recompute_floats: activation floats the backward pass recomputes per epoch.
        whole: tensors a rank of a distributed epoch holds for all the graph's rows (``x``
            where that is cheaper than exchanging its aggregation's panels; only an
            aggregation reads it then, see :func:`plan_epoch`).
        exchanged_columns: the columns of the aggregation passes whose input panels a rank
            of a distributed epoch completes from the others (all but those of ``whole``).
        seconds: the time model's epoch at the planning bandwidths, the sum of
            ``step_seconds``, one per step of :func:`epoch_steps` (see :func:`_step_seconds`).
    """

    rows: int
    item: int
    panel_cols: int
    block_rows: int
    rows_bytes: int
    pass_rows: dict[tuple[str, ...], int]
    tensors: dict[str, TensorPlan]
    arena_bytes: int
    host_arena_bytes: int
    disk_bytes: int
    panel_offsets: dict[str, int]
    adjacency_gpu: int
    adjacency_host: int
    adjacency_resident: int
    adjacency_disk: int
    passes: int
    pass_columns: int
    predicted: Traffic
    gpu_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0
    kept: frozenset[str] = frozenset()
    recompute_floats: int = 0
    whole: frozenset[str] = frozenset()
    exchanged_columns: int = 0
    seconds: float = 0.0
    step_seconds: tuple[float, ...] = ()

    def rows_for(self, names: list[str]) -> int:
        """Rows per block of the row-local pass over ``names`` (its sources, then its targets):
        a narrow pass, such as the loss, takes larger blocks than the widest in the same room."""
        return self.pass_rows.get(tuple(names), self.block_rows)

    def panels(self, cols: int) -> list[tuple[int, int]]:
        """Column ranges of the panels of a tensor with ``cols`` columns."""
        return [(c, min(c + self.panel_cols, cols)) for c in range(0, cols, self.panel_cols)]

    def summary(self) -> str:
        """One line per tier, for logs."""
        gpu = [n for n, t in self.tensors.items() if all(x == "gpu" for x in t.tiers)]
        disk = [n for n, t in self.tensors.items() if "disk" in t.tiers]
        kept = f" (activations of {sorted(self.kept)} kept)" if self.kept else ""
        return (
            f"panels of {self.panel_cols} columns, {self.passes} aggregation passes per epoch, "
            f"blocks of {self.block_rows} rows{kept}; on the device: {gpu or 'none'} and "
            f"{format_bytes(self.adjacency_resident)} of Â; on NVMe: {disk or 'none'} and "
            f"{format_bytes(self.adjacency_disk)} of Â; predicted per epoch: {self.predicted}"
        )


def epoch_steps(
    program: Program, kept: frozenset[str] = frozenset()
) -> list[tuple[str, list[tuple[str, str]], int]]:
    """The steps of a training epoch, each ``(kind, [(tensor, "r" | "w"), ...], width)``.

    Kinds: ``"rows"``, ``"aggregate"``, ``"loss"`` (the last ``Rows`` stage, forward and backward
    in one pass), ``"rows_backward"``, ``"aggregate_backward"``. Gradients are named ``d`` + the
    tensor. ``width``: a row-local step's widest activation (0 for an aggregation). The
    backward step of a stage whose target is in ``kept`` reads its saved activations, not its
    source.
    """
    steps: list[tuple[str, list[tuple[str, str]], int]] = []
    needs = program.needs_grad
    *body, last = program.stages
    for stage in body:
        if isinstance(stage, Rows):
            steps.append(("rows", [(stage.source, "r"), (stage.target, "w")], _width(stage)))
        else:
            steps.append(("aggregate", [(stage.source, "r"), (stage.target, "w")], 0))
    loss = [(last.source, "r")] + ([("d" + last.source, "w")] if last.source in needs else [])
    steps.append(("loss", loss, _width(last)))
    for stage in reversed(body):
        if isinstance(stage, Aggregate):
            if stage.source in needs:
                steps.append(("aggregate_backward",
                              [("d" + stage.target, "r"), ("d" + stage.source, "w")], 0))
        elif stage.target in needs:
            acc = [("d" + stage.target, "r")]
            if stage.target not in kept:
                acc.insert(0, (stage.source, "r"))
            if stage.source in needs:
                acc.append(("d" + stage.source, "w"))
            steps.append(("rows_backward", acc, _width(stage)))
    return steps


def keepable(program: Program) -> list[Rows]:
    """The row-local stages the backward pass runs again (all but the loss stage, whose
    forward and backward are one pass), of dense sources (a sparse ``x`` is outside the
    planner's tensors): those whose activations may be kept."""
    return [s for s in program.stages[:-1] if isinstance(s, Rows)
            and s.target in program.needs_grad and s.source in program.widths]


def _kept_floats(stage: Rows, widths: dict[str, int]) -> int:
    """Floats per row a kept stage holds for its backward pass: its tape (its widest
    activation, a ReLU's output or a linear's input; a dropout's mask and masked output), a
    copy of the stage's input (``Engine.rows_pass``'s ``stable`` blocks), and its output
    block while the block is written out."""
    dropouts = sum(op.kind == "dropout" for op in stage.ops)
    return _width(stage) * (1 + 2 * dropouts) + widths[stage.source] + stage.out_cols


def _width(stage: Rows) -> int:
    """A row-local stage's widest activation (each stage holds at most one layer's linear)."""
    return max(stage.in_cols, stage.out_cols)


def _whole_pages(block_rows: int) -> int:
    """``block_rows`` rounded down to a multiple of :data:`PAGE_ROWS` (when it has one): then a
    block of any panel starts at a 4 KiB-aligned byte, and NVMe panels move by direct I/O."""
    return block_rows // PAGE_ROWS * PAGE_ROWS or block_rows


def _row_floats(io_cols: int, width: int, temps: int = TEMPS_PER_WIDTH) -> int:
    """Device floats per row of a row-local pass: :data:`BUFFERS` blocks of its inputs and
    outputs (and their contiguous copies), and ``temps`` activations as wide as its widest
    (:func:`pass_temps`)."""
    return BUFFERS * 2 * io_cols + temps * width


def pass_temps(program: Program, kind: str, acc: list[tuple[str, str]]) -> int:
    """Activations per row (in widths) a row-local step of :func:`epoch_steps` holds besides
    its buffers: :data:`FORWARD_TEMPS_PER_WIDTH` for the forward pass of a stage without
    dropout, :data:`TEMPS_PER_WIDTH` otherwise (a backward pass, the loss, a dropout's mask
    and masked output)."""
    if kind == "rows":
        stage = next(s for s in program.stages if isinstance(s, Rows) and s.target == acc[1][0])
        if not any(op.kind == "dropout" for op in stage.ops):
            return FORWARD_TEMPS_PER_WIDTH
    return TEMPS_PER_WIDTH


@dataclass
class _Item:
    """A candidate for a tier: one panel of one tensor."""

    name: str
    panel: int
    nbytes: int
    saves: int  # accesses per epoch
    first: int
    last: int


def plan_epoch(
    program: Program,
    *,
    rows: int,
    item: int,
    tile_nbytes: list[int],
    adjacency_reserve: Callable[[int], int],
    gpu_budget: int,
    host_budget: int,
    param_bytes: int,
    cuda: bool,
    nnz: int = 0,
    direct_disk: bool | None = None,
    bandwidths: Bandwidths | None = None,
    panel_cols: int | None = None,
    source_rows: int | None = None,
    whole_x: bool | None = None,
) -> Plan:
    """The plan with the least predicted transfer time, or a ``ValueError`` naming the minimum.

    Args:
        program: the epoch's stages.
        rows: nodes ``N``.
        item: bytes per element of the dense tensors.
        tile_nbytes: the adjacency's tile sizes (its tile table).
        adjacency_reserve: device bytes the adjacency's scheduler keeps beside its slots for a
            call of ``w`` columns (output staging and kernel workspace), as a function of ``w``.
        gpu_budget, host_budget: the budgets, in bytes.
        param_bytes: bytes of the parameters (times four: values, gradients, Adam's moments).
        cuda: whether the device is a GPU (the CPU's "device" is host memory too).
        nnz: the adjacency's nonzeros (each aggregation pass costs compute in proportion).
        direct_disk: whether the scheduler's NVMe reads land on the device directly (KvikIO,
            or the CPU); else they need a pinned bounce buffer. ``None``: ``not cuda``.
        bandwidths: for ranking plans; priors when ``None``.
        panel_cols: force ``w`` (tests); ``None`` tries every width.
        source_rows: rows of an aggregation's input panel when they are more than ``rows``:
            a rank of a distributed epoch (:mod:`aires.distributed`) holds ``rows`` rows of
            every tensor but multiplies its tiles by whole panels of ``source_rows`` (all
            ``N``), received from the other ranks into the input-panel buffer, which every
            aggregation then needs; the bytes received are the ``exchange`` traffic.
        whole_x: whether such a rank holds ``x`` for all rows (``Plan.whole``): ``None``
            tries both where ``x`` is aggregated as it is; the ranks must then agree, and plan
            again with their common choice forced.
    """
    bandwidths = bandwidths or Bandwidths()
    direct_disk = not cuda if direct_disk is None else direct_disk
    widest = max(a.cols for a in program.aggregates)
    widths = sorted({math.ceil(widest / k) for k in range(1, widest + 1)}, reverse=True)
    if panel_cols is not None:
        widths = [min(panel_cols, widest)]
    problem = _Problem(program, rows, item, tile_nbytes, adjacency_reserve, gpu_budget,
                       host_budget, param_bytes, cuda, direct_disk,
                       rows if source_rows is None else source_rows, nnz, bandwidths)
    best: Plan | None = None
    minimum = None
    # Only a dense x that is aggregated as it is can be held whole (a sparse one is outside
    # the planner's tensors; one behind a row-local stage is exchanged as that stage's output).
    # build_program reads x by an aggregation or by a row-local stage, never both, so a whole
    # x is read for all rows, by its aggregation alone.
    can_hold = source_rows is not None and source_rows != rows and "x" in program.widths and any(
        a.source == "x" for a in program.aggregates) and not any(
        isinstance(s, Rows) and s.source == "x" for s in program.stages)
    holds = [frozenset(), frozenset({"x"})] if can_hold else [frozenset()]
    if whole_x is not None:
        holds = [frozenset({"x"}) if whole_x and can_hold else frozenset()]
    best_seconds = math.inf
    steps, all_widths = epoch_steps(program), _with_gradients(program.widths)
    for w in widths:
        # Every plan of this width pays its passes' compute: none can beat the best so far
        # when that alone takes longer (narrow panels; the planner's time goes to them).
        if _compute_seconds(nnz, *_passes(steps, all_widths, w), bandwidths) >= best_seconds:
            continue
        for share in ADJACENCY_SHARES:
            for keep, whole in itertools.product(
                (False, True) if keepable(program) else (False,), holds
            ):
                try:
                    plan = _plan(problem, w, share, keep, whole)
                except _TooSmall as small:
                    if not keep:  # keeping is optional: the minimum recomputes
                        minimum = small.need if minimum is None else min(minimum, small.need)
                    continue
                if plan.seconds < best_seconds:
                    best, best_seconds = plan, plan.seconds
    if best is None:
        raise ValueError(
            f"gpu_budget={gpu_budget} bytes ({format_bytes(gpu_budget)}) is below the minimum "
            f"working set of {minimum} bytes ({format_bytes(minimum)}) for this model and graph"
        )
    return best


def _compute_seconds(nnz: int, passes: int, pass_columns: int, bandwidths: Bandwidths) -> float:
    """The aggregation passes' compute: each gathers its columns per nonzero and pays
    :data:`PASS_COLUMNS` more."""
    return nnz * (pass_columns + PASS_COLUMNS * passes) / bandwidths.spmm


@dataclass(frozen=True)
class _Rates:
    """What the time model needs of a plan beside its tensors' tiers: the panel width, the
    rows (and those a rank receives per exchanged column), the row passes' blocks, the bytes
    of ``Â`` each pass streams from pinned memory and from NVMe, and the bandwidths."""

    w: int
    item: int
    rows: int
    received_rows: int
    whole: frozenset[str]
    pass_rows: dict[tuple[str, ...], int]
    block_rows: int
    adjacency_host: int
    adjacency_disk: int
    nnz: int
    bandwidths: Bandwidths


def _step_seconds(
    steps: list[tuple[str, list[tuple[str, str]], int]],
    tensors: dict[str, TensorPlan],
    r: _Rates,
) -> tuple[float, ...]:
    """The time model: seconds of each step of an epoch, in :func:`epoch_steps`' order.

    Within a step the copies to and from the device, the NVMe reads and writes, the exchange
    and the compute overlap, so a stream of them takes its longest; the steps themselves run
    one after another. A row-local step streams its row blocks: the longer of its copies and
    its compute with its blocks' host costs. An aggregation runs one pass per panel of its
    source; a panel off the device is loaded (and completed from the other ranks) before its
    pass, since any tile may read any of its rows, and the pass then streams ``Â``'s tiles that
    are off the device and writes its output panel while it computes. That wait is what keeps
    a plan whose tensors move fewer bytes from being the faster one: on products at 2 GiB the
    two 490 MB panels of ``x`` each waited for its load (42 ms of a 131 ms epoch).
    """
    bw = r.bandwidths
    adjacency = max((r.adjacency_host + r.adjacency_disk) / bw.h2d,
                    r.adjacency_disk / bw.disk_read)
    out = []
    for kind, acc, width in steps:
        if not kind.startswith("aggregate"):
            copies = [0.0, 0.0]  # seconds of the reads and of the writes
            for name, mode in acc:
                t = tensors.get(name)  # None: a sparse x's rows, outside the model's bytes
                for p, tier in enumerate(() if t is None else t.tiers):
                    if tier != "gpu":
                        copies[mode == "w"] += _panel_seconds(t, p, r, writes=mode == "w")
            # A backward step recomputes its forward pass unless its graph was kept (then it
            # does not read the stage's input) before it back-propagates.
            forwards = (1.0 if kind in ("rows", "loss") else KEPT_BACKWARD
                        if acc[0][0].startswith("d") else RECOMPUTED_BACKWARD)
            names = tuple(name for name, _ in acc)
            blocks = math.ceil(r.rows / r.pass_rows.get(names, r.block_rows))
            host = FORWARD_BLOCK_SECONDS if kind == "rows" else BLOCK_SECONDS
            out.append(max(*copies, r.rows * width * forwards / ROW_FLOATS_PER_SECOND
                           + blocks * host))
            continue
        source, target = acc[0][0], acc[1][0]
        src, dst = tensors.get(source), tensors.get(target)
        if src is None:  # a sparse source: one SpGEMM pass, its bytes outside the model
            out.append(_compute_seconds(r.nnz, 1, 0, bw))
            continue
        seconds = 0.0
        for p, tier in enumerate(src.tiers):
            cols = _panel_cols(src.cols, r.w, p)
            load = 0.0 if tier == "gpu" else _panel_seconds(src, p, r, writes=False)
            if source not in r.whole:
                load = max(load, r.received_rows * cols * r.item / bw.exchange)
            write = 0.0
            if dst is not None and dst.tiers[p] != "gpu":
                write = _panel_seconds(dst, p, r, writes=True)
            seconds += load + max(adjacency, write, _compute_seconds(r.nnz, 1, cols, bw))
        out.append(seconds)
    return tuple(out)


def _panel_seconds(t: TensorPlan, p: int, r: _Rates, *, writes: bool) -> float:
    """Seconds to copy panel ``p`` of ``t`` (not on the device) in or out: PCIe, and NVMe
    beside it for a panel there."""
    nbytes = t.rows * _panel_cols(t.cols, r.w, p) * r.item
    bw = r.bandwidths
    pcie = nbytes / (bw.d2h if writes else bw.h2d)
    if t.tiers[p] != "disk":
        return pcie
    return max(pcie, nbytes / (bw.disk_write if writes else bw.disk_read))


def _panel_cols(cols: int, w: int, p: int) -> int:
    """Columns of panel ``p`` of a tensor with ``cols`` columns in panels of ``w``."""
    return min(w, cols - p * w)


def _with_gradients(widths: dict[str, int]) -> dict[str, int]:
    """The columns of every tensor and of its gradient (``d`` + its name)."""
    return {**widths, **{"d" + n: c for n, c in widths.items()}}


def _passes(
    steps: list[tuple[str, list[tuple[str, str]], int]], widths: dict[str, int], w: int
) -> tuple[int, int]:
    """The aggregation passes of an epoch's ``steps`` with panels of ``w`` columns, and the
    columns they compute: a sparse source (outside ``widths``) is one SpGEMM pass."""
    passes = pass_columns = 0
    for kind, acc, _ in steps:
        if kind.startswith("aggregate"):
            source = acc[0][0]
            passes += math.ceil(widths[source] / w) if source in widths else 1
            pass_columns += widths.get(source, 0)
    return passes, pass_columns


class _TooSmall(Exception):
    def __init__(self, need: int) -> None:
        self.need = need


@dataclass(frozen=True)
class _Problem:
    """What every candidate plan is made for (:func:`plan_epoch`'s arguments)."""

    program: Program
    rows: int
    item: int
    tile_nbytes: list[int]
    adjacency_reserve: Callable[[int], int]
    gpu_budget: int
    host_budget: int
    param_bytes: int
    cuda: bool
    direct_disk: bool
    source_rows: int
    nnz: int
    bandwidths: Bandwidths


def _plan(
    problem: _Problem, w: int, adjacency_share: float, keep: bool, whole: frozenset[str]
) -> Plan:
    """The plan with panels of ``w`` columns, ``adjacency_share`` of the room first to ``Â``,
    every :func:`keepable` stage's activations kept (``keep``) or recomputed, and the tensors
    ``whole`` held for all the graph's rows (see ``Plan.whole``)."""
    (program, rows, item, tile_nbytes, adjacency_reserve, gpu_budget, host_budget,
     param_bytes, cuda, direct_disk, source_rows, nnz, bandwidths) = (
        getattr(problem, f.name) for f in dataclasses.fields(problem)
    )
    keeps = keepable(program)
    kept = frozenset(s.target for s in keeps) if keep else frozenset()
    steps = epoch_steps(program, kept)
    widths = _with_gradients(program.widths)
    reads: dict[str, int] = {}
    writes: dict[str, int] = {}
    span: dict[str, list[int]] = {}
    for k, (_, acc, _) in enumerate(steps):
        for name, mode in acc:
            (reads if mode == "r" else writes)[name] = (reads if mode == "r" else writes).get(
                name, 0
            ) + 1
            lo, hi = span.get(name, [k, k])
            span[name] = [min(lo, k), max(hi, k)]
    span["x"] = [0, len(steps) - 1]
    agg_steps = [k for k, (kind, _, _) in enumerate(steps) if kind.startswith("aggregate")]
    passes, pass_columns = _passes(steps, widths, w)
    exchanged_columns = sum(widths.get(acc[0][0], 0) for kind, acc, _ in steps
                            if kind.startswith("aggregate") and acc[0][0] not in whole)
    tensor_rows = {name: source_rows if name in whole else rows for name in widths}

    # Row-local working set: the passes' blocks share one room, sized for the widest pass
    # (``io``: the columns it moves in and out per row) at ``ROWS_SHARE`` of the budget or
    # what is left beside the minimum for everything else, whichever is less.
    row_passes = {tuple(name for name, _ in acc): (sum(widths.get(n, 0) for n, _ in acc), width,
                                                   pass_temps(program, kind, acc))
                  for kind, acc, width in steps if not kind.startswith("aggregate")}
    row_floats = max(_row_floats(*p) for p in row_passes.values())
    fixed_params = 4 * param_bytes
    slot = max(tile_nbytes, default=0)
    adjacency_min = (MIN_SLOTS + 1) * slot + adjacency_reserve(w)
    panel_bytes = rows * w * item
    input_bytes = source_rows * w * item  # the aggregation's input-panel buffer
    gathered = source_rows != rows
    least_rows = min(rows, MIN_BLOCK_ROWS)
    margin = MARGIN if cuda else 0
    kept_bytes = sum(rows * _kept_floats(s, widths) * item for s in keeps) if keep else 0
    others = fixed_params + adjacency_min + input_bytes + margin + kept_bytes
    if others + least_rows * row_floats * item > gpu_budget:
        raise _TooSmall(others + least_rows * row_floats * item)
    rows_room = min(int((gpu_budget - margin) * ROWS_SHARE), gpu_budget - others)
    block_rows = _whole_pages(max(least_rows, min(rows, rows_room // (row_floats * item))))
    rows_bytes = block_rows * row_floats * item
    room = gpu_budget - fixed_params - adjacency_min - rows_bytes - margin - kept_bytes
    pass_rows = {
        names: _whole_pages(max(least_rows, min(rows, rows_bytes // (_row_floats(*p) * item))))
        for names, p in row_passes.items()
    }
    for stage in keeps if keep else ():
        # A kept stage's backward blocks are its forward blocks: each has its tape.
        forward = (stage.source, stage.target)
        backward = next(names for names in row_passes
                        if names[0] == "d" + stage.target)
        pass_rows[forward] = pass_rows[backward] = min(pass_rows[forward], pass_rows[backward])

    items: list[_Item] = []
    for name, cols in widths.items():
        if name not in span:
            continue
        for p, c0 in enumerate(range(0, cols, w)):
            nbytes = tensor_rows[name] * (min(c0 + w, cols) - c0) * item
            items.append(
                _Item(name, p, nbytes, reads.get(name, 0) + writes.get(name, 0), *span[name])
            )
    # Most accesses first; among equals, the shortest-lived (transients share arena bytes).
    items.sort(key=lambda i: (-i.saves, i.last - i.first, -i.nbytes, i.name, i.panel))
    adjacency_total = sum(tile_nbytes)

    masked = {a.source for a in program.aggregates if a.dropout is not None}

    def needs_panel(on_gpu: set[tuple[str, int]]) -> list[tuple[int, str]]:
        """The aggregation steps (and their sources) whose source is not all on the device, or
        is masked by a dropout as it is loaded: each needs the input-panel buffer during its
        step alone."""
        out = []
        for k in agg_steps:
            src = steps[k][1][0][0]
            if (gathered and src not in whole) or (
                steps[k][0] == "aggregate" and src in masked) or any(
                (i.name, i.panel) not in on_gpu for i in items if i.name == src
            ):
                out.append((k, src))
        return out

    def arena_blocks(chosen: list[_Item]) -> list[tuple[int, int, int, tuple[str, Any]]]:
        on_gpu = {(i.name, i.panel) for i in chosen}
        blocks = [(i.nbytes, i.first, i.last, (i.name, i.panel)) for i in chosen]
        return blocks + [(input_bytes, k, k, ("<panel>", src)) for k, src in needs_panel(on_gpu)]

    def arena(chosen: list[_Item]) -> tuple[dict[tuple[str, Any], int], int]:
        return _first_fit(arena_blocks(chosen))

    chosen: list[_Item] = []

    def fill_tensors(limit: int) -> None:
        """Greedy, in ``items`` order. A candidate that fits beside what is placed (panels of
        the sources not yet all on the device included) joins at its lowest free offset; one
        that does not is tried once more with the arena packed anew, largest first and with
        only the panels still needed (at most :data:`MAX_REPACKS` times: each costs a pass
        over all placed blocks per block)."""
        placed = _Arena()
        for k, src in needs_panel(set()):
            placed.add(*placed.offset(input_bytes, k, k), k, k)
        repacks = 0
        for cand in items:
            offset, size = placed.offset(cand.nbytes, cand.first, cand.last)
            if max(placed.peak, offset + size) <= limit:
                placed.add(offset, size, cand.first, cand.last)
                chosen.append(cand)
            elif repacks < MAX_REPACKS:
                repacks += 1
                offsets, peak = arena(chosen + [cand])
                if peak <= limit:
                    chosen.append(cand)
                    placed = _Arena.of(arena_blocks(chosen), offsets)

    # The adjacency's share of the room is tried at several levels (the caller keeps the best
    # plan): its tiles save ``passes`` bytes each, a panel its accesses, but the panels' arena
    # bytes are shared between tensors that do not live at once.
    panel_room = arena([])[1]
    adjacency_resident_room = int(min(adjacency_total, max(room - panel_room, 0)) * adjacency_share)
    fill_tensors(room - adjacency_resident_room)
    offsets, arena_bytes = arena(chosen)
    adjacency_resident_room = max(room - arena_bytes, 0)
    on_gpu = {(i.name, i.panel) for i in chosen}
    adjacency_gpu = adjacency_min + adjacency_resident_room

    def placed(host: int) -> Any:
        """The scheduler's placement of ``Â`` with ``host`` pinned bytes for its tiles (plus
        the disk path's bounce buffer where reads are not direct)."""
        return place(
            tile_nbytes,
            gpu_budget=adjacency_gpu,
            host_budget=host + (0 if direct_disk else slot),
            slots=MIN_SLOTS,
            disk_workers=1,
            direct_disk=direct_disk,
            reserve_bytes=adjacency_reserve(w),
            dual=False,
            pinned_page=PAGE if cuda else 1,
        )

    resident = placed(0).resident_bytes

    # Pinned memory: what is not on the device, by accesses per byte (the adjacency's
    # non-resident tiles are worth ``passes`` each), in a host arena shared over lifetimes
    # like the device's; whatever is left goes to NVMe, in one file shared the same way.
    host_items = [i for i in items if (i.name, i.panel) not in on_gpu]
    adjacency_rest = adjacency_total - resident
    staging = panel_bytes if cuda else 0  # an NVMe-bound aggregation output is staged here
    host_room = host_budget - staging
    adjacency_host = 0

    # Items join the host arena one at a time, each at its lowest free offset: a greedy pass
    # that costs one placement per item, not a re-packing of the arena per candidate.
    host_arena_fit = _Arena()
    host_offsets: dict[tuple[str, Any], int] = {}
    queue: list[tuple[int, object]] = [(i.saves, i) for i in host_items]
    queue.append((passes, "adjacency"))
    queue.sort(key=lambda e: -e[0])
    for _, what in queue:
        if what == "adjacency":
            adjacency_host = min(adjacency_rest, max(host_room - host_arena_fit.peak, 0))
            continue
        offset, size = host_arena_fit.offset(what.nbytes, what.first, what.last)
        if max(host_arena_fit.peak, offset + size) + adjacency_host <= host_room:
            host_arena_fit.add(offset, size, what.first, what.last)
            host_offsets[(what.name, what.panel)] = offset
    host_arena = host_arena_fit.peak
    on_disk = [i for i in host_items if (i.name, i.panel) not in host_offsets]
    disk_offsets, disk_arena = _first_fit(
        [(i.nbytes, i.first, i.last, (i.name, i.panel)) for i in on_disk]
    )
    adjacency_disk = adjacency_rest - adjacency_host
    # The scheduler places whole tiles: round to what it will hold.
    if adjacency_rest:
        host_place = placed(adjacency_host)
        # With no tile left for the disk path the scheduler keeps no disk slot, and that room
        # holds resident tiles: take its counts, not the ones assumed above.
        # Tile bytes per tier (the placement's host bytes are rounded to whole pages).
        resident, adjacency_host, adjacency_disk = (
            sum(tile_nbytes[t] for t in tiles)
            for tiles in (host_place.resident, host_place.host, host_place.disk)
        )

    tensors: dict[str, TensorPlan] = {}
    traffic = Traffic()
    any_disk = False
    for name, cols in widths.items():
        if name not in span:
            continue
        tiers, offs = [], []
        for p, c0 in enumerate(range(0, cols, w)):
            key = (name, p)
            tier = "gpu" if key in on_gpu else "host" if key in host_offsets else "disk"
            any_disk |= tier == "disk"
            tiers.append(tier)
            offs.append({"gpu": offsets, "host": host_offsets, "disk": disk_offsets}[tier][key])
            nbytes = tensor_rows[name] * (min(c0 + w, cols) - c0) * item
            r, wr = reads.get(name, 0), writes.get(name, 0)
            if tier != "gpu":
                traffic.h2d += r * nbytes
                traffic.d2h += wr * nbytes
            if tier == "disk":
                traffic.disk_read += r * nbytes
                traffic.disk_write += wr * nbytes
        tensors[name] = TensorPlan(name, cols, tuple(tiers), tuple(offs), reads.get(name, 0),
                                   writes.get(name, 0), *span[name], tensor_rows[name])
    traffic.h2d += passes * (adjacency_host + adjacency_disk)
    traffic.disk_read += passes * adjacency_disk
    traffic.exchange = (source_rows - rows) * exchanged_columns * item
    step_seconds = _step_seconds(
        steps, tensors, _Rates(w, item, rows, source_rows - rows, whole, pass_rows, block_rows,
                               adjacency_host, adjacency_disk, nnz, bandwidths))
    pinned = host_arena + adjacency_host + (staging if any_disk else 0)
    breakdown = {
        "parameters": fixed_params,
        "adjacency": adjacency_gpu,  # the scheduler's cap: its slots, workspace and resident tiles
        "arena": arena_bytes,
        "row_blocks": rows_bytes,
        "kept": kept_bytes,
        "margin": margin,
    }
    return Plan(
        rows=rows,
        item=item,
        panel_cols=w,
        block_rows=block_rows,
        rows_bytes=rows_bytes,
        pass_rows=pass_rows,
        tensors=tensors,
        arena_bytes=arena_bytes,
        host_arena_bytes=host_arena,
        disk_bytes=disk_arena,
        panel_offsets={src: off for (kind, src), off in offsets.items() if kind == "<panel>"},
        adjacency_gpu=adjacency_gpu,
        adjacency_host=adjacency_host,
        adjacency_resident=resident,
        adjacency_disk=adjacency_disk,
        passes=passes,
        pass_columns=pass_columns,
        predicted=traffic,
        gpu_bytes=sum(breakdown.values()),
        breakdown=breakdown,
        host_bytes=pinned,
        kept=kept,
        recompute_floats=sum(rows * _width(s) for s in keeps if s.target not in kept),
        whole=whole,
        exchanged_columns=exchanged_columns,
        seconds=sum(step_seconds),
        step_seconds=step_seconds,
    )


class _Arena:
    """Blocks with lifetimes (first and last step) at byte offsets, none overlapping another
    alive at the same step; each new one at the lowest offset free for its lifetime."""

    def __init__(self) -> None:
        self.placed: list[tuple[int, int, int, int]] = []  # offset, bytes, first, last
        self.peak = 0

    def offset(self, nbytes: int, first: int, last: int) -> tuple[int, int]:
        """The lowest free offset for a block, and its size rounded to :data:`ALIGN`."""
        size = -(-nbytes // ALIGN) * ALIGN
        busy = sorted((o, o + b) for o, b, f, l in self.placed if not (l < first or f > last))
        offset = 0
        for lo, hi in busy:
            if offset + size <= lo:
                break
            offset = max(offset, hi)
        return offset, size

    def add(self, offset: int, size: int, first: int, last: int) -> None:
        self.placed.append((offset, size, first, last))
        self.peak = max(self.peak, offset + size)

    @classmethod
    def of(
        cls,
        blocks: list[tuple[int, int, int, tuple[str, Any]]],
        offsets: dict[tuple[str, Any], int],
    ) -> _Arena:
        """An arena holding ``blocks`` at ``offsets`` (as :func:`_first_fit` placed them)."""
        arena = cls()
        for nbytes, first, last, key in blocks:
            arena.add(offsets[key], -(-nbytes // ALIGN) * ALIGN, first, last)
        return arena


def _first_fit(
    blocks: list[tuple[int, int, int, tuple[str, Any]]],
) -> tuple[dict[tuple[str, Any], int], int]:
    """Offsets for ``(bytes, first step, last step, key)`` blocks in one :class:`_Arena`,
    largest first. Returns the offsets and the arena's size."""
    arena = _Arena()
    offsets: dict[tuple[str, Any], int] = {}
    for nbytes, first, last, key in sorted(blocks, key=lambda b: -b[0]):
        offset, size = arena.offset(nbytes, first, last)
        arena.add(offset, size, first, last)
        offsets[key] = offset
    return offsets, arena.peak
