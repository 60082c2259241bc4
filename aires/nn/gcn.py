"""``aires.nn.GCN``: a multi-layer GCN trained whole-model out of core under one GPU budget.

Kipf & Welling's model, ``H_{l+1} = relu(Â dropout(H_l) W_l + b_l)``, with every tensor that has
one row per node (features, aggregation outputs, gradients) kept by the tiers of
:mod:`aires.blocks` and every aggregation streamed by :mod:`aires.scheduler`, so the device
holds the weights, the slot rings and whatever the budget leaves for caching, and its memory
follows the budget, not the graph. The planner (:mod:`aires.nn.plan`) decides what lives where
and predicts the bytes an epoch moves; every epoch reports that prediction beside the bytes it
measured and the device memory it measured (:class:`EpochStats`).

Training is the usual PyTorch loop, with the loss computed by the model, since the logits of a
large graph do not fit on the device either::

    model = GCN(F, 256, C, num_layers=2, gpu_budget="2GiB", device="cuda")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(200):
        opt.zero_grad()
        loss = model.loss(x, adj, y, train_mask)   # forward out of core
        loss.backward()                            # backward out of core: fills .grad
        opt.step()
    logits = model(x, adj)                         # (N, C), in host memory
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from aires.checks import check_positive_int, parse_size
from aires.data._splitmix import stream_key
from aires.distributed import Exchange, RowRangeStore, rank_zero_first
from aires.gcn_conv import choose_order, tile_adjacency
from aires.nn import chain
from aires.nn.dropout import MASK_BYTES, csr_dropout_mask, dropout_mask
from aires.nn.engine import Engine, PanelMask
from aires.nn.plan import Bandwidths, Plan, plan_epoch
from aires.nn.program import ORDERS, Aggregate, Op, Program, Rows, build_program
from aires.scheduler import resolve_device, spmm_reserve
from aires.scheduler.placement import default_gpu_budget, default_host_budget
from aires.scheduler.stats import max_memory_allocated, reset_peak_memory_stats
from aires.tiling import TileStore
from aires.tiling.plan import DEFAULT_ALIGNMENT

__all__ = ["GCN", "EpochStats"]

#: Tiles per rank a distributed model asks of the store it tiles itself (without
#: ``tile_bytes``): the ranks' rows are cut on tile boundaries, so the nonzeros of two ranks
#: differ by at most about one tile, ``1 / TILES_PER_RANK`` of a rank's share.
TILES_PER_RANK = 8
#: Row blocks of ``X`` filled into its panels at once at set-up (threads; each holds a block
#: where ``X`` must be converted, and otherwise reads its rows from the page cache).
FILL_WORKERS = 8


#: ``torch.nn._reduction``'s code for ``reduction="sum"``, as ``aten.nll_loss_backward`` takes it.
SUM_REDUCTION = 2


class _Layer(nn.Module):
    """One layer's parameters, named as PyG's ``GCNConv`` names them (``lin.weight``,
    ``bias``), so a ``state_dict`` loads either way."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.empty(out_channels))
        nn.init.xavier_uniform_(self.lin.weight)
        nn.init.zeros_(self.bias)


@dataclass
class EpochStats:
    """What one :meth:`GCN.loss` (forward and backward) or :meth:`GCN.forward` did.

    Attributes:
        seconds: wall time of the forward and backward passes.
        predicted: the traffic model's bytes per path (``h2d``, ``d2h``, ``disk_read``,
            ``disk_write``).
        measured: the bytes the passes moved, counted at every copy.
        peak_allocated: the CUDA caching allocator's peak over the epoch (bytes; 0 on the CPU).
        peak_device_used: the device's used memory, sampled after every pass (bytes; includes
            the CUDA context and anything else in the process; 0 on the CPU).
        passes: aggregation passes run.
        io_mode: how the adjacency's NVMe tiles were read (``"gds"``, ``"kvikio-compat"``,
            ``"posix"``, or ``"cpu"``).
        nvme: how NVMe panels moved: ``"direct"`` (``O_DIRECT``, the disk's bytes; a
            transfer's unaligned ends excepted), ``"page cache"`` (the file system refused
            ``O_DIRECT``), or ``""`` (no NVMe panel).
        stages: ``(stage, seconds)`` for each pass, in order (device time between the ends of
            consecutive passes on the compute stream).
        plan: the plan's one-line summary.
        exchange_bandwidth: bytes per second of the exchange between ranks, measured at set-up
            (:meth:`~aires.distributed.Exchange.bandwidth`) and planned with; 0 for one process.
        predicted_seconds: the plan's time model, seconds of each pass of a training epoch (in
            ``stages``' order, at the planning bandwidths;
            :attr:`~aires.nn.plan.Plan.step_seconds`).
    """

    seconds: float = 0.0
    predicted: dict[str, int] = field(default_factory=dict)
    measured: dict[str, int] = field(default_factory=dict)
    peak_allocated: int = 0
    peak_device_used: int = 0
    passes: int = 0
    io_mode: str = ""
    nvme: str = ""
    stages: list[tuple[str, float]] = field(default_factory=list)
    plan: str = ""
    exchange_bandwidth: float = 0.0
    predicted_seconds: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class GCN(nn.Module):
    """A GCN whose every node-sized tensor streams between GPU, pinned host memory and NVMe.

    Args:
        in_channels: input features per node.
        hidden_channels: width of every hidden layer.
        out_channels: classes.
        num_layers: graph convolutions (>= 1).
        dropout: dropout probability on every layer's input (Kipf & Welling), in ``[0, 1)``.
        gpu_budget: device bytes (or ``"2GiB"``) the model may use in all, less what the process
            already holds on the device when the model plans; ``None``: the free device memory.
            A budget below the minimum working set is a ``ValueError`` naming the minimum.
        host_budget: pinned host bytes for tensors and tiles (``0``: everything not on the
            device lives on NVMe); ``None``: half the available RAM.
        device: where the products run (``None``: CUDA when available).
        order: ``"auto"`` (each layer's product order by cost, :func:`~aires.gcn_conv.
            choose_order`), ``"aggregate_first"`` or ``"transform_first"`` for every layer.
        tile_bytes: capacity of one adjacency tile when the model tiles the graph itself.
        store_dir: where the model keeps the adjacency tiles it builds (``None``: temporary).
        scratch_dir: where NVMe-tier tensors are written (``None``: a temporary directory).
        seed: seed of the dropout masks.
        panel_cols: force the column-panel width (``None``: the planner's choice).
        scheduler_options: further :class:`~aires.scheduler.Scheduler` arguments.
        distributed: split the rows over the ranks of ``torch.distributed``'s default process
            group (initialised by the caller, e.g. :func:`aires.distributed.launch` or
            ``torchrun``): each rank keeps its rows of every tensor and its tiles of ``Â``
            under its own budgets, completes each aggregation's input panel from the others,
            and sums the loss and the weight gradients with them (:mod:`aires.distributed`).
            Every rank passes the same whole inputs; the loss, the gradients and the logits
            are the whole graph's on every rank.

    Shapes:
        - input: ``x`` ``(N, F_in)`` dense (torch, numpy or a ``np.memmap``) or torch sparse
          CSR/COO; ``adj`` a symmetric :class:`~aires.tiling.TileStore` of the normalised
          ``Â``, or an ``edge_index`` ``(2, E)`` / ``adj_t`` normalised as PyG's ``gcn_norm``.
        - output: ``(N, out_channels)`` logits in host memory.

    The graph and features are taken once per pair of objects (transductive training): a call
    with the same ``x`` and ``adj`` reuses the placement and the features already in the tiers.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        num_layers: int = 2,
        dropout: float = 0.0,
        *,
        gpu_budget: int | str | None = None,
        host_budget: int | str | None = None,
        device: torch.device | str | None = None,
        order: str = "auto",
        tile_bytes: int | str | None = None,
        store_dir: str | Path | None = None,
        scratch_dir: str | Path | None = None,
        seed: int = 0,
        panel_cols: int | None = None,
        scheduler_options: dict[str, Any] | None = None,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int(num_layers, "num_layers")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if order != "auto" and order not in ORDERS:
            raise ValueError(f"order must be 'auto' or one of {ORDERS}, got {order!r}")
        dims = [in_channels] + [hidden_channels] * (num_layers - 1) + [out_channels]
        for name, value in zip(("in_channels", "hidden_channels", "out_channels"),
                               (in_channels, hidden_channels, out_channels), strict=True):
            check_positive_int(value, name)
        self.dims = dims
        self.dropout = float(dropout)
        self.order = order
        self.device = resolve_device(device)
        self.gpu_budget = None if gpu_budget is None else parse_size(gpu_budget, "gpu_budget")
        self.host_budget = (
            None if host_budget is None else parse_size(host_budget, "host_budget", allow_zero=True)
        )
        self.tile_bytes = None if tile_bytes is None else parse_size(tile_bytes, "tile_bytes")
        self.store_dir = store_dir
        self.scratch_dir = scratch_dir
        self.seed = int(seed)
        self.panel_cols = panel_cols
        self.scheduler_options = scheduler_options
        self.distributed = bool(distributed)
        self.convs = nn.ModuleList(_Layer(dims[i], dims[i + 1]) for i in range(num_layers))
        self.to(self.device)
        self.stats = EpochStats()
        self._state: _State | None = None
        self._labels: _StagedLabels | None = None
        self._step = 0

    # ----------------------------------------------------------------- public surface

    def loss(self, x: Any, adj: Any, y: Tensor, mask: Tensor) -> Tensor:
        """Mean cross-entropy over the rows ``mask`` selects, differentiable in the parameters.

        Runs the forward pass out of core; ``loss.backward()`` runs the backward pass out of
        core and accumulates every parameter's ``.grad``, as autograd would.

        Args:
            x, adj: see the class notes.
            y: ``(N,)`` integer labels.
            mask: ``(N,)`` bool mask or an index tensor of the training rows.

        The selected labels are checked and staged once for the same ``y`` and ``mask``
        tensors, and again whenever either changes in place through torch (which bumps its
        version); change them behind torch's back (through a NumPy view, say) and pass new
        tensors.
        """
        state = self._prepare(x, adj)
        staged = self._selected_labels(y, mask, state.all_rows)
        self._step += 1
        params = [t for pair in self._leaves() for t in pair]
        return _EpochLoss.apply(self, state, staged, *params)

    def _selected_labels(self, y: Tensor, mask: Tensor, rows: int) -> _StagedLabels:
        """:func:`_labels`, kept while ``y`` and ``mask`` are the same tensors at the same
        versions: on products (2.4M rows) a profile of one epoch on the H200 put some 100 ms
        of host time in building them, beside 63 ms of GPU work."""
        key = (getattr(y, "_version", None), getattr(mask, "_version", None), rows)
        staged = self._labels
        if staged is None or staged.y is not y or staged.mask is not mask or staged.key != key:
            selected, labels = _labels(y, mask, rows, self.dims[-1], self.device)
            staged = _StagedLabels(y, mask, key, selected, labels)
            self._labels = staged
        return staged

    def forward(self, x: Any, adj: Any, rows: Tensor | None = None) -> Tensor:
        """Logits ``(N, out_channels)`` in host memory, or those of ``rows`` only (a sorted 1-D
        index tensor without repeats), in their order: only those rows come off the device,
        which on a large graph is most of an evaluation pass's time (papers100M x0.3's 23 GB
        of logits against its 0.3 GB of labelled rows). Dropout applies in training mode.

        Raises:
            ValueError: ``rows`` is not a sorted 1-D integer tensor of distinct rows of ``x``.
        """
        state = self._prepare(x, adj)
        wanted = None if rows is None else _wanted_rows(rows, state.all_rows)
        with torch.no_grad():
            start = self._begin(state)
            state.epoch += 1  # overwrites what a pending loss's backward would read
            self._forward(state, training=self.training, step=self._step)
            last = state.program.stages[-1]
            engine, first = state.engine, state.first
            out = torch.empty((state.all_rows if wanted is None else len(wanted), last.out_cols),
                              dtype=state.dtype)
            on_device = None if wanted is None else wanted.to(engine.device)

            def block(r0: int, r1: int, inputs: list[Tensor]) -> list[Tensor]:
                logits = self._run_ops(last.ops, inputs[0], first + r0, self.training,
                                       self._step, self._leaves())
                if wanted is None:
                    out[first + r0 : first + r1].copy_(logits)
                else:
                    k0, k1 = _share(wanted, first + r0, first + r1)
                    out[k0:k1].copy_(logits[on_device[k0:k1] - (first + r0)])
                return []

            engine.rows_pass([last.source], [], block)
            if state.exchange is not None:
                ranges = None if wanted is None else [
                    _share(wanted, a, b) for a, b in state.exchange.ranges]
                engine.traffic.add("exchange", state.exchange.complete_host(out, ranges))
            self._end(state, start)
        return out

    def plan(self, x: Any, adj: Any) -> Plan:
        """The placement the model uses for these inputs (planning it if needed)."""
        return self._prepare(x, adj).plan

    @property
    def setup_seconds(self) -> dict[str, float]:
        """Seconds of each step of the last set-up (``plan``, ``arenas``, ``adjacency``,
        ``features``; see :class:`_State`), or ``{}`` before the first."""
        return {} if self._state is None else dict(self._state.setup)

    def close(self) -> None:
        """Release the device arena, pinned tensors, NVMe files and the adjacency's scheduler."""
        if self._state is not None:
            self._state.close()
            self._state = None

    def extra_repr(self) -> str:
        return (
            f"dims={self.dims}, dropout={self.dropout}, order={self.order!r}, "
            f"gpu_budget={self.gpu_budget}, host_budget={self.host_budget}"
        )

    # ----------------------------------------------------------------- set-up

    def _prepare(self, x: Any, adj: Any) -> _State:
        key = (id(x), id(adj))
        if self._state is not None and self._state.key == key:
            return self._state
        self.close()
        self._state = _State.build(self, x, adj, key)
        return self._state

    def orders(self, num_nodes: int, nnz: int, x_nnz: int | None) -> list[str]:
        """Each layer's product order (see ``order``)."""
        if self.order != "auto":
            orders = [self.order] * (len(self.dims) - 1)
        else:
            orders = [
                choose_order(
                    nnz=nnz,
                    num_nodes=num_nodes,
                    in_columns=self.dims[layer],
                    out_columns=self.dims[layer + 1],
                    x_nnz=x_nnz if layer == 0 else None,
                    x_requires_grad=layer > 0,
                )
                for layer in range(len(self.dims) - 1)
            ]
        # A sparse X aggregated first is one SpGEMM over all of X: dropout would make it dense,
        # and split over ranks each would need every rank's rows of X.
        why = ("dropout on sparse input features" if self.dropout > 0 else
               "distributed=True with sparse input features" if self.distributed else None)
        if x_nnz is not None and why and orders[0] == "aggregate_first":
            if self.order == "aggregate_first":
                raise NotImplementedError(
                    f"{why} needs order='transform_first' for the first layer"
                )
            orders[0] = "transform_first"
        return orders

    # ----------------------------------------------------------------- passes

    def _leaves(self) -> list[tuple[Tensor, Tensor]]:
        return [(layer.lin.weight, layer.bias) for layer in self.convs]

    def _run_ops(
        self,
        ops: tuple[Op, ...],
        h: Tensor,
        r0: int,
        training: bool,
        step: int,
        params: list[tuple[Tensor, Tensor]],
        tape: chain.Tape | None = None,
        output: bool = True,
    ) -> Tensor | None:
        """One ``Rows`` stage on a row block starting at row ``r0`` of the whole graph
        (:func:`aires.nn.chain.run`; ``tape`` records it for :func:`~aires.nn.chain.backprop`,
        and ``output=False`` wants the tape only)."""
        dropout = None
        if training and self.dropout > 0:

            def dropout(block: Tensor, site: int) -> tuple[Tensor, Tensor | None]:
                return self._dropout(block, r0, site, step)

        return chain.run(ops, h, params, dropout, tape, output=output)

    def _dropout(self, h: Tensor, r0: int, site: int, step: int) -> tuple[Tensor, Tensor | None]:
        """``h`` with dropout site ``site``'s mask applied, and the mask (``None`` for sparse
        rows)."""
        key = stream_key(self.seed, f"dropout:{step}:{site}")
        if h.layout == torch.strided:
            mask = dropout_mask(r0, h.shape[0], h.shape[1], self.dropout, key, h.device)
            mask = mask.to(h.dtype)
            return h * mask, mask
        # Sparse rows: the dense mask at the stored entries (zeros stay zero either way).
        crow, col = h.crow_indices(), h.col_indices()
        keep = csr_dropout_mask(r0, crow, col, h.shape[1], self.dropout, key, h.dtype)
        return torch.sparse_csr_tensor(crow, col, h.values() * keep, h.shape), None

    def _panel_dropout(self, state: _State, stage: Aggregate, step: int) -> PanelMask:
        """The dropout of ``stage``'s source applied to one of its panels on the device (every
        row of the graph), the same mask a row-local stage draws; in row chunks that take no
        more device memory than the plan's row blocks, which are idle in an aggregation."""
        key = stream_key(self.seed, f"dropout:{step}:{stage.dropout}")
        cols = stage.cols
        chunk = max(1, state.plan.rows_bytes // (MASK_BYTES * state.plan.panel_cols))

        def mask(panel: Tensor, c0: int, c1: int) -> None:
            for r0 in range(0, panel.shape[0], chunk):
                block = panel[r0 : r0 + chunk]
                block.mul_(dropout_mask(r0, block.shape[0], cols, self.dropout, key,
                                        panel.device, (c0, c1)).to(panel.dtype))

        return mask

    def _forward(
        self,
        state: _State,
        *,
        training: bool,
        step: int,
        leaves: list[tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        """Every stage but the last; in a training epoch (``leaves``, the parameters the
        backward pass differentiates), the stages the plan keeps record their graphs."""
        engine, first = state.engine, state.first
        params = self._leaves() if leaves is None else leaves
        for stage in state.program.stages[:-1]:
            if isinstance(stage, Aggregate):
                masked = stage.dropout is not None and training and self.dropout > 0
                engine.aggregate(stage.source, stage.target,
                                 self._panel_dropout(state, stage, step) if masked else None)
            elif leaves is not None and stage.target in state.plan.kept:
                self._kept_pass(state, stage, leaves, training, step)
            else:

                def block(r0: int, r1: int, inputs: list[Tensor], ops=stage.ops) -> list[Tensor]:
                    return [self._run_ops(ops, inputs[0], first + r0, training, step, params)]

                engine.rows_pass([stage.source], [stage.target], block)
            state.mark(f"{type(stage).__name__.lower()} {stage.source}->{stage.target}")

    def _kept_pass(
        self,
        state: _State,
        stage: Rows,
        leaves: list[tuple[Tensor, Tensor]],
        training: bool,
        step: int,
    ) -> None:
        """A ``Rows`` stage's forward pass that keeps each block's tape (what its derivative
        reads, on the device) in ``state.saved`` for :meth:`_backward`, which then
        back-propagates it instead of recomputing the block."""
        first = state.first
        saved = state.saved[stage.target] = {}

        def block(r0: int, r1: int, inputs: list[Tensor]) -> list[Tensor]:
            tape = saved[r0] = chain.Tape()
            return [self._run_ops(stage.ops, inputs[0], first + r0, training, step, leaves, tape)]

        state.engine.rows_pass([stage.source], [stage.target], block, stable=True)

    def _loss_and_backward_pass(
        self, state: _State, staged: _StagedLabels, leaves: list[tuple[Tensor, Tensor]]
    ) -> Tensor:
        """The loss stage, forward and backward in one pass: the loss, and ``d source``.

        Only the rows in the loss go through the stage: each block picks them out of its
        input (their positions and labels are staged in host memory, so finding a block's
        share waits for no device), and ``d source`` is zero on the others. The stage's ops
        are row-local and hold no dropout (each layer's dropout comes before its
        aggregation), so rows picked out of order give the same numbers."""
        last = state.program.stages[-1]
        needs = last.source in state.program.needs_grad
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        step, training, first, count = self._step, self.training, state.first, staged.count
        d_mean = torch.full((), 1.0 / count, dtype=state.dtype, device=self.device)

        def side(r0: int, r1: int) -> list[Tensor]:
            """The block's rows in the loss and their labels (copied in with its rows)."""
            a, b = _share(staged.rows, first + r0, first + r1)
            return [staged.rows[a:b], staged.labels[a:b]]

        def block(r0: int, r1: int, inputs: list[Tensor]) -> list[Tensor]:
            h, rows, target = inputs
            grad = torch.zeros_like(h) if needs else None
            if rows.numel():
                rows = rows - (first + r0)
                tape = chain.Tape()
                logits = self._run_ops(last.ops, h.index_select(0, rows), first + r0, training,
                                       step, leaves, tape)
                assert logits is not None
                # The summed cross-entropy and its derivative, by the kernels autograd runs for
                # ``F.cross_entropy`` (the block launched 19 ops before, and on products at
                # 2 GiB their host time, not the copies, set the pass's time).
                log_p = F.log_softmax(logits, dim=1)
                total.add_(F.nll_loss(log_p, target, reduction="sum"))
                d_log_p = torch.ops.aten.nll_loss_backward(  # (a sum has no total weight)
                    d_mean, log_p, target, None, SUM_REDUCTION, -100, d_mean)
                d_logits = torch.ops.aten._log_softmax_backward_data(d_log_p, log_p, 1,
                                                                      log_p.dtype)
                d_picked = chain.backprop(tape, d_logits, leaves, needs)
                if needs:
                    grad.index_copy_(0, rows, d_picked)
            return [grad] if needs else []

        targets = ["d" + last.source] if needs else []
        state.engine.rows_pass([last.source], targets, block, side=side)
        total.div_(count)
        if state.exchange is not None:
            state.exchange.sum_(total)
        state.mark(f"loss {last.source}")
        return total

    def _backward(self, state: _State, leaves: list[tuple[Tensor, Tensor]]) -> None:
        """Every stage but the last, in reverse."""
        program, engine, step, training = state.program, state.engine, self._step, self.training
        first = state.first
        for stage in reversed(program.stages[:-1]):
            if isinstance(stage, Aggregate):
                if stage.source not in program.needs_grad:
                    continue
                engine.aggregate("d" + stage.target, "d" + stage.source)
            elif stage.target in state.saved:
                needs = stage.source in program.needs_grad
                saved = state.saved.pop(stage.target)

                def block(r0: int, r1: int, inputs: list[Tensor], saved=saved,
                          needs=needs) -> list[Tensor]:
                    d_source = chain.backprop(saved.pop(r0), inputs[0], leaves, needs)
                    return [d_source] if needs else []

                targets = ["d" + stage.source] if needs else []
                engine.rows_pass(["d" + stage.target], targets, block)
            elif stage.target in program.needs_grad:
                needs = stage.source in program.needs_grad

                def block(r0: int, r1: int, inputs: list[Tensor], ops=stage.ops,
                          needs=needs) -> list[Tensor]:
                    tape = chain.Tape()
                    self._run_ops(ops, inputs[0], first + r0, training, step, leaves, tape,
                                  output=False)
                    d_source = chain.backprop(tape, inputs[1], leaves, needs)
                    return [d_source] if needs else []

                targets = ["d" + stage.source] if needs else []
                engine.rows_pass([stage.source, "d" + stage.target], targets, block)
            else:
                continue
            state.mark(f"{type(stage).__name__.lower()} backward d{stage.target}")

    def _begin(self, state: _State) -> float:
        state.engine.adjacency_calls()
        state.engine.traffic.reset()
        state.peak_used = 0
        state.marks = []
        state.saved = {}  # a pending loss's kept graphs: its backward can no longer run
        if state.cuda:
            torch.cuda.synchronize(self.device)
            reset_peak_memory_stats(self.device)
        state.mark("start")
        return time.perf_counter()

    def _end(self, state: _State, start: float) -> None:
        if state.cuda:
            torch.cuda.synchronize(self.device)
        state.mark("end")
        passes = state.engine.adjacency_calls()
        self.stats = EpochStats(
            seconds=time.perf_counter() - start,
            predicted=state.plan.predicted.as_dict(),
            measured=state.engine.traffic.as_dict(),
            peak_allocated=max_memory_allocated(self.device) if state.cuda else 0,
            peak_device_used=state.peak_used,
            passes=passes,
            io_mode=state.engine.scheduler.io_mode,
            nvme="" if not state.plan.disk_bytes else
            "direct" if state.engine.arenas.direct else "page cache",
            stages=state.stage_seconds(),
            plan=state.plan.summary(),
            exchange_bandwidth=state.exchange_rate,
            predicted_seconds=list(state.plan.step_seconds),
        )


class _EpochLoss(torch.autograd.Function):
    """The loss of a whole epoch as one autograd node over the parameters.

    Forward runs the forward stages and the loss stage (whose backward it also runs, since it
    has the loss's inputs in hand); backward runs the remaining stages in reverse and returns
    the parameter gradients accumulated block by block.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, model: GCN, state: _State, staged: _StagedLabels, *params: Tensor
    ) -> Tensor:
        ctx.model, ctx.state = model, state
        start = model._begin(state)
        state.epoch += 1
        ctx.epoch = state.epoch
        # The parameters' values, whose .grad the passes accumulate (aires.nn.chain).
        leaves = [(w.detach(), b.detach()) for w, b in model._leaves()]
        with torch.no_grad():
            model._forward(state, training=model.training, step=model._step, leaves=leaves)
            loss = model._loss_and_backward_pass(state, staged, leaves)
        ctx.leaves = leaves
        ctx.start = start
        return loss.to(params[0].dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        model, state, leaves = ctx.model, ctx.state, ctx.leaves
        if state.epoch != ctx.epoch or model._state is not state:
            raise RuntimeError(
                "this loss's saved tensors were overwritten by a later loss() or forward() of "
                "the model (they live in its tiers, not in the autograd graph): call backward() "
                "before the next loss() or forward()"
            )
        with torch.no_grad():
            model._backward(state, leaves)
            if state.exchange is not None:
                _sum_grads(state.exchange, [leaf for pair in leaves for leaf in pair])
        model._end(state, ctx.start)
        grads: list[Tensor | None] = []
        for w, b in leaves:
            for leaf in (w, b):
                grads.append(None if leaf.grad is None else leaf.grad * grad)
        return (None, None, None, *grads)


def _sum_grads(exchange: Exchange, leaves: list[Tensor]) -> None:
    """Every leaf's gradient summed over the ranks, in one collective (a rank's gradient is
    its rows' share; a leaf without one contributes zeros, so every rank sends the same)."""
    for leaf in leaves:
        if leaf.grad is None:
            leaf.grad = torch.zeros_like(leaf)
    flat = exchange.sum_(torch.cat([leaf.grad.reshape(-1) for leaf in leaves]))
    for leaf, part in zip(leaves, flat.split([leaf.numel() for leaf in leaves]), strict=True):
        leaf.grad.copy_(part.view_as(leaf))


class _StagedLabels(NamedTuple):
    """What :meth:`GCN._selected_labels` keeps: the tensors it was given (held, so that their
    identities stay theirs), their versions and the rows, and the selected rows (ascending)
    with their labels (:func:`_labels`)."""

    y: Tensor
    mask: Tensor
    key: tuple[int | None, int | None, int]
    rows: Tensor
    labels: Tensor

    @property
    def count(self) -> int:
        """Rows in the loss (at least one, the mean's divisor)."""
        return max(int(self.rows.numel()), 1)


@dataclass
class _State:
    """A model's placement for one pair of inputs: program, plan, engine, and peaks."""

    key: tuple[int, int]
    program: Program
    plan: Plan
    engine: Engine
    rows: int
    dtype: torch.dtype
    cuda: bool
    scratch: tempfile.TemporaryDirectory | None
    exchange: Exchange | None = None
    peak_used: int = 0
    marks: list[tuple[str, Any]] = field(default_factory=list)
    epoch: int = 0  # forward passes run; a loss's backward must follow its own
    #: The kept stages' tapes of the last training forward pass, by target, then by the first
    #: row of the block (see :meth:`GCN._kept_pass`).
    saved: dict[str, dict[int, chain.Tape]] = field(default_factory=dict)
    #: Seconds of each set-up step: opening Â's store and planning (``plan``), the arenas
    #: (``arenas``), the adjacency's scheduler (``adjacency``; it places Â's tiles at its first
    #: call), filling ``X``'s panels (``features``).
    setup: dict[str, float] = field(default_factory=dict)
    #: Bytes per second of the exchange, measured at set-up and planned with (0: one process).
    exchange_rate: float = 0.0

    @property
    def first(self) -> int:
        """This process's first row of the graph."""
        return 0 if self.exchange is None else self.exchange.start

    @property
    def all_rows(self) -> int:
        """The graph's rows (``rows`` are this process's)."""
        return self.rows if self.exchange is None else self.exchange.rows

    @classmethod
    def build(cls, model: GCN, x: Any, adj: Any, key: tuple[int, int]) -> _State:
        clock = time.perf_counter()
        sparse = isinstance(x, Tensor) and x.layout in (torch.sparse_csr, torch.sparse_coo)
        rows, cols = _shape(x)
        if cols != model.dims[0]:
            raise ValueError(f"x has {cols} features per node but in_channels is {model.dims[0]}")
        dtype = torch.float32 if not isinstance(x, Tensor) or x.dtype != torch.float64 else x.dtype
        store = _store(model, adj, rows, dtype)
        if not store.symmetric:
            raise NotImplementedError(
                "the whole-model engine needs a symmetric Â (an undirected graph): its backward "
                "pass reuses Â's tiles for Âᵀ; use AiresGCNConv layers for a directed graph"
            )
        x_nnz = int(x._nnz()) if sparse else None
        program = build_program(model.dims, model.orders(rows, int(store.nnz), x_nnz),
                                model.dropout)
        exchange = _exchange(model, store)
        bandwidths, rate = None, 0.0
        if exchange is not None:
            store = RowRangeStore(store, exchange.start, exchange.stop)
            # What a panel's exchange costs decides whether a rank holds x whole: over NVLink
            # receiving half of x beats reading all of it over PCIe, over PCIe it does not.
            rate = exchange.bandwidth()
            bandwidths = Bandwidths(exchange=rate)
        cuda = model.device.type == "cuda"
        gpu, host = _budgets(model)
        item = torch.empty((), dtype=dtype).element_size()
        params = sum(p.numel() * p.element_size() for p in model.parameters())

        def reserve(w: int) -> int:
            return spmm_reserve(store, w, dtype, device=model.device, out="host")

        def plan_for(panel_cols: int | None, whole_x: bool | None = None) -> Plan:
            return plan_epoch(
                _dense_part(program, sparse),
                rows=int(store.shape[0]),
                item=item,
                tile_nbytes=[int(t.nbytes) for t in store.tiles],
                adjacency_reserve=reserve,
                gpu_budget=gpu,
                host_budget=host,
                param_bytes=params,
                cuda=cuda,
                nnz=int(store.nnz),
                direct_disk=not cuda or store.io_mode != "posix",
                bandwidths=bandwidths,
                panel_cols=panel_cols,
                source_rows=None if exchange is None else rows,
                whole_x=whole_x,
            )

        plan = plan_for(model.panel_cols)
        if exchange is not None:
            # Every rank runs the same passes over the same panels: the narrowest width any
            # rank chose fits every rank (a narrower panel needs less of each budget), and
            # x is held whole by all ranks (its aggregation skips the exchange) or by none.
            agreed = exchange.minimum(plan.panel_cols)
            whole = bool(exchange.minimum(int("x" in plan.whole)))
            if agreed != plan.panel_cols or whole != ("x" in plan.whole):
                plan = plan_for(agreed, whole)
        setup = {"plan": time.perf_counter() - clock}
        scratch = None
        directory = model.scratch_dir
        if directory is None:
            scratch = tempfile.TemporaryDirectory(prefix="aires-nn-")
            directory = scratch.name
        engine = Engine(
            plan,
            store,
            model.device,
            dtype,
            Path(directory),
            reserve=reserve(plan.panel_cols),
            sparse_x=_sparse_rows(x, exchange) if sparse else None,
            scheduler_options=model.scheduler_options,
            exchange=exchange,
        )
        setup.update(engine.setup)
        filled = time.perf_counter()
        first = 0 if exchange is None or "x" in plan.whole else exchange.start
        if not sparse:
            _fill(engine.tensors["x"], x, plan.block_rows, dtype, first)
            engine.arenas.sync()
        setup["features"] = time.perf_counter() - filled
        return cls(key, program, plan, engine, plan.rows, dtype, cuda, scratch, exchange,
                   setup=setup, exchange_rate=rate)

    def mark(self, label: str) -> None:
        """The end of a pass: fold the device's used memory now into the peak, and time it."""
        if self.cuda:
            free, total = torch.cuda.mem_get_info(self.engine.device)
            self.peak_used = max(self.peak_used, total - free)
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((label, event))
        else:
            self.marks.append((label, time.perf_counter()))

    def stage_seconds(self) -> list[tuple[str, float]]:
        """Seconds between consecutive marks (waits for the device)."""
        out = []
        for (_, a), (label, b) in zip(self.marks, self.marks[1:]):
            out.append((label, a.elapsed_time(b) / 1e3 if self.cuda else b - a))
        return out

    def close(self) -> None:
        self.engine.close()
        if self.scratch is not None:
            self.scratch.cleanup()


# --------------------------------------------------------------------------- helpers


def _shape(x: Any) -> tuple[int, int]:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"x must be a 2-D (N, F) tensor or array, got {type(x).__name__} "
                         f"of shape {shape}")
    return int(shape[0]), int(shape[1])


def _share(rows: Tensor, r0: int, r1: int) -> tuple[int, int]:
    """The positions ``[a, b)`` of the ascending host tensor ``rows`` that hold rows of
    ``[r0, r1)``: a row block's share of a set of rows."""
    a, b = torch.searchsorted(rows, torch.tensor([r0, r1], dtype=rows.dtype)).tolist()
    return a, b


def _wanted_rows(rows: Tensor, n: int) -> Tensor:
    """``rows`` as a CPU int64 tensor, checked: 1-D, distinct, ascending, within ``[0, n)``."""
    if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.is_floating_point() or (
        rows.dtype == torch.bool
    ):
        raise ValueError(f"rows must be a 1-D integer tensor of row indices, got {rows!r}")
    wanted = rows.to("cpu", torch.int64)
    if len(wanted) > 1 and not bool((wanted[1:] > wanted[:-1]).all()):
        at = int(torch.nonzero(wanted[1:] <= wanted[:-1])[0])
        raise ValueError(f"rows must ascend without repeats; position {at + 1} holds "
                         f"{int(wanted[at + 1])} after {int(wanted[at])}")
    if len(wanted) and (int(wanted[0]) < 0 or int(wanted[-1]) >= n):
        bad = int(wanted[0]) if int(wanted[0]) < 0 else int(wanted[-1])
        raise ValueError(f"rows holds {bad}, outside the graph's {n} rows")
    return wanted


def _budgets(model: GCN) -> tuple[int, int]:
    """The device budget left for the model (less what the process holds now) and the pinned
    budget."""
    gpu = model.gpu_budget if model.gpu_budget is not None else default_gpu_budget(model.device)
    if model.device.type == "cuda":
        gpu -= torch.cuda.memory_allocated(model.device)
    host = model.host_budget if model.host_budget is not None else default_host_budget()
    return gpu, host


def _store(model: GCN, adj: Any, rows: int, dtype: torch.dtype) -> TileStore:
    if isinstance(adj, TileStore):
        if tuple(adj.shape) != (rows, rows):
            raise ValueError(f"adj has shape {tuple(adj.shape)} but x has {rows} rows")
        return adj

    def build(tile_bytes: int | None) -> TileStore:
        return tile_adjacency(
            adj, rows, dtype, tile_bytes=tile_bytes,
            store_dir=None if model.store_dir is None else Path(model.store_dir),
        )

    def build_for_ranks() -> TileStore:
        """A store of at least :data:`TILES_PER_RANK` tiles a rank, unless told the size: the
        ranks' rows are cut on tile boundaries, so a small graph in a few large tiles could
        not be split evenly (or at all)."""
        store = build(model.tile_bytes)
        ranks = dist.get_world_size()
        if model.tile_bytes is not None or len(store) >= TILES_PER_RANK * ranks:
            return store
        total = sum(int(t.nbytes) for t in store.tiles)
        return build(max(DEFAULT_ALIGNMENT, total // (TILES_PER_RANK * ranks)
                         // DEFAULT_ALIGNMENT * DEFAULT_ALIGNMENT))

    if not model.distributed:
        return build(model.tile_bytes)
    if model.store_dir is not None:
        # The ranks share the directory: rank 0 builds the store, the others reuse it.
        return rank_zero_first(build_for_ranks, model.device)
    return build_for_ranks()


def _exchange(model: GCN, store: TileStore) -> Exchange | None:
    """This rank's share of the rows (``None`` unless ``model.distributed``), with the
    parameters made rank 0's, as replicated weights must start."""
    if not model.distributed:
        return None
    exchange = Exchange.over(store, model.device)
    with torch.no_grad():
        for p in model.parameters():
            exchange.broadcast_(p.data)
    return exchange


def _sparse_rows(x: Tensor, exchange: Exchange | None) -> Tensor:
    """A sparse ``x``, or this rank's rows of it (as CSR) when distributed."""
    if exchange is None:
        return x
    x = x.coalesce().to_sparse_csr() if x.layout == torch.sparse_coo else x
    crow, a, b = x.crow_indices(), exchange.start, exchange.stop
    lo, hi = int(crow[a]), int(crow[b])
    return torch.sparse_csr_tensor(crow[a : b + 1] - lo, x.col_indices()[lo:hi],
                                   x.values()[lo:hi], (b - a, x.shape[1]))


def _dense_part(program: Program, sparse_x: bool) -> Program:
    """The program as the dense planner sees it: a sparse ``x`` and a sparse aggregation of it
    are host CSR tensors, outside the panels, and a stage reading one holds no dense
    activation as wide as its input."""
    if not sparse_x:
        return program
    sparse = {"x"} | {s.target for s in program.aggregates if s.source == "x"}
    widths = {k: v for k, v in program.widths.items() if k not in sparse}
    stages = tuple(
        dataclasses.replace(s, in_cols=s.out_cols)
        if isinstance(s, Rows) and s.source in sparse else s
        for s in program.stages
    )
    return Program(stages, widths, program.needs_grad)


def _fill(t: Any, x: Any, block_rows: int, dtype: torch.dtype, first: int = 0) -> None:
    """Copy ``x``'s rows from ``first`` (torch, numpy or memmap rows) into the panels of ``t``,
    a block at a time, :data:`FILL_WORKERS` blocks at once (the copies, reads and writes
    release the GIL; at papers100M x0.3 one thread took 39 s for 17 GB), so at most that many
    blocks are in host memory at a time."""

    if not isinstance(x, Tensor):
        with warnings.catch_warnings():  # a read-only memmap's view: it is only read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            x = torch.from_numpy(np.asarray(x))

    def one(r0: int) -> None:
        r1 = min(r0 + block_rows, t.rows)
        block = x[first + r0 : first + r1].detach().to("cpu").to(dtype)
        for p, (c0, c1) in enumerate(t.panels):
            t.write_host(p, r0, block[:, c0:c1])  # a strided copy: no contiguous piece first

    starts = range(0, t.rows, block_rows)
    with ThreadPoolExecutor(max(1, min(FILL_WORKERS, len(starts)))) as pool:
        for done in [pool.submit(one, r0) for r0 in starts]:
            done.result()  # the first failure raises here


def _labels(
    y: Tensor, mask: Tensor, rows: int, classes: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The rows ``mask`` selects, ascending, and their labels, in host memory (pinned for a
    GPU); a selected label outside ``[0, classes)`` is a ``ValueError`` here, not a device
    assertion in the loss."""
    if not isinstance(y, Tensor) or y.dim() != 1 or y.numel() != rows:
        raise ValueError(f"y must be a ({rows},) tensor of labels, got "
                         f"{getattr(y, 'shape', type(y).__name__)}")
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        if mask.numel() != rows:
            raise ValueError(f"mask must have {rows} entries, got {mask.numel()}")
        keep = mask.detach().cpu()
    else:
        keep = torch.zeros(rows, dtype=torch.bool)
        keep[mask.detach().cpu().long()] = True
    selected = keep.nonzero().flatten()
    labels = y.detach().cpu().long()[selected]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise ValueError(f"y holds label {bad} on a selected row; out_channels is {classes}")
    if device.type == "cuda":
        return selected.pin_memory(), labels.pin_memory()
    return selected, labels
