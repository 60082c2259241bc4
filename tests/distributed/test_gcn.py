"""``aires.nn.GCN(distributed=True)`` on 2 ``gloo`` processes against the 1-process run.

One launch trains every configuration (a launch costs seconds of process start-up); each test
then checks one property of what the ranks returned: the losses and weight gradients epoch by
epoch, the logits, the tiers the budgets forced, and the bytes exchanged against the traffic
model. The 1-process runs are themselves checked against PyG's in-core ``GCNConv`` in
``tests/nn/test_gcn.py``; the first configuration is checked against PyG here too.
"""

from __future__ import annotations

import pytest
import torch

from aires.distributed import launch
from aires.nn import GCN
from tests.nn.test_gcn import graph, problem, reference_losses, train

EPOCHS = 3
RANKS = 2
#: name -> (GCN keyword arguments, dtype, dense graph?). The budgets force tiers on each rank:
#: ``adjacency``: Â's tiles on the device, in pinned memory and on NVMe (a graph dense enough
#: that Â outgrows the device budget); ``panels``: the tensors' panels on all three tiers, with
#: dropout (masks by global row); ``whole-x``: each rank holds ``x`` for all rows, in pinned
#: memory, and aggregates it without an exchange; ``float32``: what a GPU runs, at its
#: tolerance.
CONFIGS = {
    "adjacency": ({"num_layers": 3, "gpu_budget": 176 << 10, "host_budget": 24 << 10,
                   "tile_bytes": "4KiB", "panel_cols": 4}, torch.float64, True),
    "panels": ({"num_layers": 3, "gpu_budget": 260 << 10, "host_budget": 24 << 10,
                "tile_bytes": "4KiB", "panel_cols": 4, "dropout": 0.5, "seed": 3},
               torch.float64, False),
    "whole-x": ({"num_layers": 2, "gpu_budget": 160 << 10, "host_budget": 256 << 10,
                 "tile_bytes": "4KiB", "panel_cols": 4}, torch.float64, False),
    "float32": ({"num_layers": 2, "tile_bytes": "4KiB"}, torch.float32, False),
}
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
#: Rows whose logits alone are asked for: on both ranks' sides of the split, and not all.
PICKED = torch.tensor([0, 1, 17, 150, 199, 200, 201, 333, 399])


def inputs(name: str):
    options, dtype, dense = CONFIGS[name]
    ei, x, y, mask = problem(dtype=dtype)
    if dense:
        ei = graph(400, edges=6000, seed=0)
    return options, ei, x, y, mask


def initial_state(name: str) -> dict[str, torch.Tensor]:
    options, dtype, _ = CONFIGS[name]
    torch.manual_seed(0)
    return GCN(12, 16, 5, device="cpu", **options).to(dtype).state_dict()


def run(name: str, state: dict[str, torch.Tensor], distributed: bool, device: str = "cpu") -> dict:
    """Train configuration ``name`` from ``state``: losses, last gradients, logits, plan."""
    options, ei, x, y, mask = inputs(name)
    model = GCN(12, 16, 5, device=device, distributed=distributed, **options)
    model.to(CONFIGS[name][1]).load_state_dict(state)
    losses, grads = train(model, x, ei, y, mask, EPOCHS)
    stats = model.stats
    plan = model.plan(x, ei)
    out = {
        "losses": losses,
        "grads": grads,
        "measured": stats.measured,
        "predicted": stats.predicted,
        "panel_tiers": {t for tensor in plan.tensors.values() for t in tensor.tiers},
        "adjacency": (plan.adjacency_resident, plan.adjacency_host, plan.adjacency_disk),
        "rows": plan.rows,
        "pass_columns": plan.pass_columns,
        "whole": plan.whole,
        "x_tiers": plan.tensors["x"].tiers,
        "logits": model.eval()(x, ei),
        "picked": model(x, ei, rows=PICKED),
    }
    model.close()
    return out


def rank_runs(states: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict]:
    return {name: run(name, state, distributed=True) for name, state in states.items()}


def gpu_rank_run(name: str, state: dict[str, torch.Tensor]) -> dict:
    """Configuration ``name`` on this rank's GPU (``launch`` made it current)."""
    return run(name, state, distributed=True, device=f"cuda:{torch.cuda.current_device()}")


@pytest.fixture(scope="module")
def runs() -> tuple[dict[str, dict], list[dict[str, dict]]]:
    """The 1-process runs and each rank's, from the same initial weights."""
    states = {name: initial_state(name) for name in CONFIGS}
    single = {name: run(name, state, distributed=False) for name, state in states.items()}
    return single, launch(rank_runs, RANKS, (states,))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_losses_and_gradients_equal_the_one_process_run(runs, name: str) -> None:
    single, ranks = runs
    rtol = RTOL[CONFIGS[name][1]]
    for rank in ranks:
        assert rank[name]["losses"] == pytest.approx(single[name]["losses"], rel=rtol)
        for got, want in zip(rank[name]["grads"], single[name]["grads"], strict=True):
            assert torch.allclose(got, want, rtol=rtol * 10, atol=rtol * 1e-2)


def test_losses_equal_pyg_in_core(runs) -> None:
    _, ranks = runs
    options, ei, x, y, mask = inputs("adjacency")
    state = initial_state("adjacency")
    model = GCN(12, 16, 5, device="cpu", **options).double()
    model.load_state_dict(state)
    want, want_grads = reference_losses(model, x, ei, y, mask, EPOCHS)
    assert ranks[1]["adjacency"]["losses"] == pytest.approx(want, rel=1e-10)
    for got, ref in zip(ranks[1]["adjacency"]["grads"], want_grads, strict=True):
        assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_are_the_whole_graphs_on_every_rank(runs, name: str) -> None:
    single, ranks = runs
    rtol = RTOL[CONFIGS[name][1]]
    for rank in ranks:
        assert torch.allclose(rank[name]["logits"], single[name]["logits"], rtol=rtol * 10,
                              atol=rtol * 1e-2)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_of_chosen_rows_are_gathered_from_their_ranks(runs, name: str) -> None:
    single, ranks = runs
    rtol = RTOL[CONFIGS[name][1]]
    for rank in ranks:
        assert torch.allclose(rank[name]["picked"], single[name]["logits"][PICKED],
                              rtol=rtol * 10, atol=rtol * 1e-2)


def test_budgets_force_every_tier_on_every_rank(runs) -> None:
    _, ranks = runs
    for rank in ranks:
        assert all(b > 0 for b in rank["adjacency"]["adjacency"]), rank["adjacency"]["adjacency"]
        assert rank["panels"]["panel_tiers"] == {"gpu", "host", "disk"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exchanged_bytes_equal_the_model(runs, name: str) -> None:
    """Each rank receives the other ranks' rows of every aggregated panel but those of ``x``
    when it holds ``x`` whole: measured equals the plan's prediction, and over the ranks
    ``(P - 1) N`` rows of every such column (``x`` has 12)."""
    _, ranks = runs
    item = CONFIGS[name][1].itemsize
    n = sum(rank[name]["rows"] for rank in ranks)
    assert n == 400
    for rank in ranks:
        assert rank[name]["measured"] == rank[name]["predicted"]
        columns = rank[name]["pass_columns"] - (12 if "x" in rank[name]["whole"] else 0)
        assert rank[name]["measured"]["exchange"] == (n - rank[name]["rows"]) * columns * item
    total = sum(rank[name]["measured"]["exchange"] for rank in ranks)
    assert total == (RANKS - 1) * n * columns * item


def test_every_rank_holds_x_whole_where_it_is_aggregated_as_it_is(runs) -> None:
    """With room, the ranks hold ``x`` for all rows and aggregate it without an exchange,
    all of them alike; behind dropout its aggregation is of a row-local stage's output, which
    each rank has for its own rows only."""
    _, ranks = runs
    for rank in ranks:
        assert rank["float32"]["whole"] == rank["whole-x"]["whole"] == {"x"}
        assert set(rank["whole-x"]["x_tiers"]) == {"host"}
        assert rank["panels"]["whole"] == frozenset()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_ranks_equal_the_one_gpu_run() -> None:
    """Two GPUs over NCCL: the losses, gradients and logits of the 1-GPU run, in float32."""
    state = initial_state("float32")
    single = run("float32", state, distributed=False, device="cuda:0")
    ranks = launch(gpu_rank_run, RANKS, ("float32", state), device="cuda")
    rtol = RTOL[torch.float32]
    for rank in ranks:
        assert rank["losses"] == pytest.approx(single["losses"], rel=rtol)
        for got, want in zip(rank["grads"], single["grads"], strict=True):
            assert torch.allclose(got, want, rtol=rtol * 10, atol=rtol * 1e-2)
        assert torch.allclose(rank["logits"], single["logits"], rtol=rtol * 10, atol=rtol * 1e-2)
        assert rank["measured"] == rank["predicted"]
