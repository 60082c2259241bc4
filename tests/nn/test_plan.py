"""The planner at products' shape (2,449,029 nodes, 126M nonzeros, 32 MiB tiles), where a GPU's
budgets of 1 to 16 GiB squeeze the row blocks, the panels and the adjacency against each
other: no plan runs out of its budget, and none buys width with blocks of a few rows."""

from __future__ import annotations

import pytest

from aires.nn import GCN, Bandwidths, build_program, plan_epoch
from aires.nn.plan import (
    PASS_COLUMNS,
    _row_floats,
    _with_gradients,
    epoch_steps,
    pass_temps,
)

ROWS, NNZ, TILE = 2_449_029, 126_167_309, 32 << 20


def _plan(budget: int, host: int = 64 << 30, dropout: float = 0.5, ranks: int = 1,
          bandwidths: Bandwidths | None = None, panel_cols: int | None = None):
    """Products' plan at ``budget`` (with ``ranks``: one rank's, its share of the rows)."""
    model = GCN(100, 256, 47, device="cpu")
    program = build_program(model.dims, model.orders(ROWS, NNZ, None), dropout)
    tiles = [TILE] * ((NNZ + ROWS) * 8 // TILE // ranks)
    plan = plan_epoch(
        program, rows=ROWS // ranks, item=4, tile_nbytes=tiles,
        adjacency_reserve=lambda w: (2 * 200_000 + 100) * w * 4 + (16 << 20),
        gpu_budget=budget, host_budget=host,
        param_bytes=sum(p.numel() * 4 for p in model.parameters()), cuda=True,
        nnz=NNZ // ranks, direct_disk=True, source_rows=ROWS if ranks > 1 else None,
        bandwidths=bandwidths, panel_cols=panel_cols,
    )
    return program, plan


@pytest.mark.parametrize("dropout", [0.5, 0.0])
@pytest.mark.parametrize("gib", [16, 4, 2, 1])
def test_plans_fit_their_budget_with_blocks_of_thousands_of_rows(gib: int, dropout: float) -> None:
    program, plan = _plan(gib << 30, dropout=dropout)
    assert plan.gpu_bytes <= gib << 30
    # A block of 64 rows makes 38,000 blocks a pass (what the 1 GiB run once did).
    assert plan.block_rows >= 10_000, plan.block_rows
    widths = _with_gradients(program.widths)
    for kind, acc, width in epoch_steps(program, plan.kept):
        if kind.startswith("aggregate"):
            continue
        names = tuple(name for name, _ in acc)
        rows = plan.rows_for(list(names))
        io = sum(widths[n] for n in names)
        temps = pass_temps(program, kind, acc)
        assert rows * _row_floats(io, width, temps) * 4 <= plan.rows_bytes, (names, rows)
        assert rows >= plan.block_rows  # the widest pass sizes the room; others fit more
        if kind == "rows" and not dropout:  # a forward pass without dropout: larger blocks
            assert temps < pass_temps(program, "rows_backward", acc)
            # (unless the stage is kept: its backward pass reads its forward blocks' tapes)
            assert rows > plan.block_rows or acc[1][0] in plan.kept


@pytest.mark.parametrize("gib", [16, 2, 1])
def test_widths_skipped_for_their_compute_alone_never_held_the_best_plan(gib: int) -> None:
    program, best = _plan(gib << 30)
    widest = max(a.cols for a in program.aggregates)
    every = []
    for w in sorted({-(-widest // k) for k in range(1, widest + 1)}):
        try:
            every.append(_plan(gib << 30, panel_cols=w)[1])
        except ValueError:  # below this width's minimum working set
            continue
    seconds = [plan.seconds for plan in every]
    assert best.seconds == min(seconds)
    assert best.panel_cols == every[seconds.index(min(seconds))].panel_cols


def test_the_narrow_loss_pass_takes_larger_blocks() -> None:
    program, plan = _plan(2 << 30)
    loss = next(acc for kind, acc, _ in epoch_steps(program) if kind == "loss")
    assert plan.rows_for([name for name, _ in loss]) > 2 * plan.block_rows


def test_a_pass_not_in_the_epoch_takes_the_widest_blocks() -> None:
    _, plan = _plan(2 << 30)
    assert plan.rows_for(["s1"]) == plan.block_rows  # prediction's loss pass: no gradient


def test_smaller_budgets_move_more_bytes() -> None:
    moved = [_plan(gib << 30)[1].predicted.h2d for gib in (16, 4, 2, 1)]
    assert moved == sorted(moved) and moved[0] == 0 < moved[-1]


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_the_hidden_activations_are_kept_where_the_budget_has_room(dropout: float) -> None:
    """At 16 GiB products fits with its 256-wide hidden activation kept for the backward pass
    (no recomputation, as an in-core loop); at 2 GiB that room holds tensors instead."""
    program, plan = _plan(16 << 30, dropout=dropout)
    assert plan.kept == {"t1"} and plan.recompute_floats == 0
    assert plan.gpu_bytes <= 16 << 30 and plan.breakdown["kept"] >= ROWS * 256 * 4
    assert plan.predicted.h2d == 0
    # The backward step reads the kept graph, not the stage's input, in the forward's blocks.
    backward = next(acc for kind, acc, _ in epoch_steps(program, plan.kept)
                    if kind == "rows_backward")
    assert [name for name, _ in backward] == ["dt1"]
    assert plan.rows_for(["s0", "t1"]) == plan.rows_for(["dt1"])
    _, tight = _plan(2 << 30, dropout=dropout)
    assert tight.kept == frozenset() and tight.recompute_floats == ROWS * 256


@pytest.mark.parametrize("gib", [16, 2])
def test_a_rank_of_two_holds_x_whole_and_exchanges_only_the_hidden_panels(gib: int) -> None:
    """Without dropout products aggregates ``x`` as it is: a rank of two holds all its rows
    (on the device, or in pinned memory at 2 GiB) rather than receive the other half, so it
    receives only the other half of the two 47-column aggregations (forward and backward)."""
    _, plan = _plan(gib << 30, dropout=0.0, ranks=2)
    assert plan.whole == {"x"} and plan.tensors["x"].rows == ROWS
    assert plan.exchanged_columns == plan.pass_columns - 100 == 2 * 47
    assert plan.predicted.exchange == (ROWS - ROWS // 2) * 2 * 47 * 4
    assert plan.gpu_bytes <= gib << 30


def test_over_nvlink_a_rank_receives_x_rather_than_read_all_of_it_over_pcie() -> None:
    """At the exchange rate measured between two H200s (338 GB/s over NVLink, seven times a
    PCIe copy), a rank of two at 2 GiB, where x lives in pinned memory, reads its own half of
    x and receives the other; where x fits on the device (16 GiB) it still holds x whole,
    which costs no transfer at all."""
    nvlink = Bandwidths(exchange=338e9)
    _, pcie = _plan(2 << 30, dropout=0.0, ranks=2)
    _, plan = _plan(2 << 30, dropout=0.0, ranks=2, bandwidths=nvlink)
    assert plan.whole == frozenset() and plan.tensors["x"].rows == ROWS // 2
    assert plan.exchanged_columns == plan.pass_columns
    assert plan.predicted.h2d < pcie.predicted.h2d
    assert plan.predicted.exchange > pcie.predicted.exchange
    _, roomy = _plan(16 << 30, dropout=0.0, ranks=2, bandwidths=nvlink)
    assert roomy.whole == {"x"} and roomy.predicted.h2d == 0


def test_the_epoch_is_its_steps_in_series() -> None:
    """One predicted time per step of the epoch, summed; a row-local step takes at least its
    copies (each direction at the planning bandwidth), whatever its compute."""
    program, plan = _plan(2 << 30, dropout=0.0)
    steps = epoch_steps(program, plan.kept)
    assert len(plan.step_seconds) == len(steps)
    assert plan.seconds == pytest.approx(sum(plan.step_seconds))
    bw = Bandwidths()

    def off_device_bytes(name: str) -> int:
        t = plan.tensors[name]
        return sum(t.rows * (c1 - c0) * 4 for (c0, c1), tier in
                   zip(plan.panels(t.cols), t.tiers, strict=True) if tier != "gpu")

    for (kind, acc, _), seconds in zip(steps, plan.step_seconds, strict=True):
        if kind.startswith("aggregate"):
            continue
        for mode, rate in (("r", bw.h2d), ("w", bw.d2h)):
            assert seconds >= sum(off_device_bytes(n) for n, m in acc if m == mode) / rate


def test_an_aggregation_waits_for_its_panels_off_the_device() -> None:
    """Where ``x``, ``Â`` and the output are on the device (16 GiB) the first aggregation is its
    compute alone; with ``x`` pinned (2 GiB) each pass first waits for its panel's copy."""
    bw = Bandwidths()
    _, roomy = _plan(16 << 30, dropout=0.0)
    assert roomy.tensors["x"].tiers == ("gpu",) and roomy.adjacency_host == 0
    assert roomy.step_seconds[0] == pytest.approx(NNZ * (100 + PASS_COLUMNS) / bw.spmm)
    _, tight = _plan(2 << 30, dropout=0.0, panel_cols=50)
    assert tight.tensors["x"].tiers == ("host", "host")
    compute = NNZ * (2 * 50 + 2 * PASS_COLUMNS) / bw.spmm
    assert tight.step_seconds[0] >= ROWS * 100 * 4 / bw.h2d + compute


def test_narrow_panels_are_predicted_slower_as_they_ran() -> None:
    """On the H200 at 2 GiB, 8 passes of 25 columns took 216 ms an epoch and 4 passes of 50
    columns 172 ms (``bench/results/model-products-h200-after-merges.log`` and
    ``model-products-h200.json``): the model ranks them the same way."""
    _, narrow = _plan(2 << 30, dropout=0.0, panel_cols=25)
    _, wide = _plan(2 << 30, dropout=0.0, panel_cols=50)
    assert narrow.seconds > wide.seconds
