"""``aires.nn.GCN`` against in-core training with PyG's ``GCNConv``, on every tier mix.

The reference is PyG's own layers on the whole graph in memory (float64 on the CPU): the
out-of-core model must give the same losses epoch by epoch and the same weight gradients,
whatever its budgets put on the device, in pinned memory or on NVMe.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.nn import GCNConv

from aires.data._splitmix import stream_key
import aires.nn.gcn as gcn_module
from aires.nn import GCN, dropout_mask
from aires.nn.plan import epoch_steps
from aires.scheduler.stats import max_memory_allocated, reset_peak_memory_stats
from aires.tiling import TileStore

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Budgets that put panels on every tier (checked by ``test_tier_mix_uses_every_tier``): a
# device budget that holds some panels, pinned memory for a few more, NVMe for the rest.
# On a GPU the minimum working set holds cuSPARSE's workspace and a margin for the caching
# allocator, so the graph is larger there and the device budget is the minimum plus room for a
# few panels (the minimum read from the error a budget below it raises).
TIERED = {"gpu_budget": 260 << 10, "host_budget": 24 << 10, "tile_bytes": "8KiB", "panel_cols": 4}
TIERED_CUDA = {"host_budget": 4 << 20, "tile_bytes": "256KiB", "panel_cols": 4}
CUDA_ROOM = 6 << 20
CUDA_NODES = 50_000


def graph(n: int = 400, edges: int = 2400, seed: int = 0) -> torch.Tensor:
    """An undirected random graph (both directions of each edge, no self loops)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n, (edges,), generator=g)
    dst = torch.randint(0, n, (edges,), generator=g)
    ei = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
    ei = ei[:, ei[0] != ei[1]]
    return torch.unique(ei, dim=1)


def problem(n: int = 400, f: int = 12, c: int = 5, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, f, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    mask = torch.rand(n, generator=g) < 0.4
    return graph(n, edges=6 * n, seed=seed), x, y, mask


def device_problem(device: str, tiered: bool):
    """The CPU problem in float64, or on a GPU float32 (and a larger graph when tiered)."""
    if device == "cpu":
        return problem()
    return problem(n=CUDA_NODES if tiered else 400, dtype=torch.float32)


def minimum_gpu_bytes(x, ei, hidden: int = 16, num_layers: int = 3, **kwargs) -> int:
    """The model's minimum working set, as a budget below it reports."""
    model = GCN(x.shape[1], hidden, 5, num_layers=num_layers, device="cuda", gpu_budget=1 << 20,
                **kwargs)
    with pytest.raises(ValueError, match="minimum working set") as error:
        model.plan(x, ei)
    return int(re.search(r"minimum working set of (\d+) bytes", str(error.value))[1])


def reference_losses(model: GCN, x, ei, y, mask, epochs: int, dropout_keys=None):
    """Adam training of PyG ``GCNConv`` layers holding ``model``'s initial weights; returns the
    losses and the last epoch's weight gradients."""
    convs = [GCNConv(a, b).to(x.dtype) for a, b in zip(model.dims[:-1], model.dims[1:])]
    for conv, layer in zip(convs, model.convs):
        conv.lin.weight.data.copy_(layer.lin.weight.data.cpu())
        conv.bias.data.copy_(layer.bias.data.cpu())
    params = [p for conv in convs for p in conv.parameters()]
    opt = torch.optim.Adam(params, lr=0.01)
    losses = []
    for epoch in range(epochs):
        opt.zero_grad()
        h = x
        for i, conv in enumerate(convs):
            if dropout_keys is not None:
                key = dropout_keys(epoch + 1, i)
                h = h * dropout_mask(0, h.shape[0], h.shape[1], model.dropout, key, h.device).to(
                    h.dtype
                )
            h = conv(h, ei)
            if i < len(convs) - 1:
                h = F.relu(h)
        loss = F.cross_entropy(h[mask], y[mask])
        loss.backward()
        losses.append(loss.item())
        grads = [conv.lin.weight.grad.clone() for conv in convs]
        opt.step()
    return losses, grads


def train(model: GCN, x, adj, y, mask, epochs: int):
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(epochs):
        opt.zero_grad()
        loss = model.loss(x, adj, y, mask)
        loss.backward()
        losses.append(loss.item())
        grads = [layer.lin.weight.grad.detach().cpu().clone() for layer in model.convs]
        opt.step()
    return losses, grads


def assert_trains_as_pyg(model: GCN, x, ei, y, mask, device: str, seed: int) -> None:
    """Three epochs of ``model`` (dropout masks from ``seed``) give PyG's losses and weight
    gradients under the same masks."""
    ref, ref_grads = reference_losses(
        model, x, ei, y, mask, epochs=3,
        dropout_keys=lambda step, site: stream_key(seed, f"dropout:{step}:{site}"),
    )
    losses, grads = train(model, x.to(device), ei, y, mask, epochs=3)
    rtol = 1e-10 if x.dtype == torch.float64 else 1e-5
    assert losses == pytest.approx(ref, rel=rtol)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got.to(want.dtype), want, rtol=rtol * 10, atol=rtol * 1e-2)


def options(device: str, tiered: bool, x=None, ei=None) -> dict:
    if not tiered:
        return {}
    if device == "cpu":
        return dict(TIERED)
    # The budget is the process's: what it already holds on the device (cuBLAS workspaces,
    # earlier tests' caches) and x, which the test moves there, count against it.
    held = torch.cuda.memory_allocated() + x.numel() * x.element_size()
    return {**TIERED_CUDA,
            "gpu_budget": minimum_gpu_bytes(x, ei, **TIERED_CUDA) + held + CUDA_ROOM}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ["auto", "aggregate_first", "transform_first"])
@pytest.mark.parametrize("tiered", [False, True], ids=["fits", "tiered"])
def test_training_matches_pyg_in_core(device: str, order: str, tiered: bool) -> None:
    ei, x, y, mask = device_problem(device, tiered)
    dtype = x.dtype
    torch.manual_seed(0)
    model = GCN(12, 16, 5, num_layers=3, device=device, order=order,
                **options(device, tiered, x, ei))
    model.to(dtype)
    ref_losses, ref_grads = reference_losses(model, x, ei, y, mask, epochs=3)
    losses, grads = train(model, x.to(device), ei, y, mask, epochs=3)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    assert losses == pytest.approx(ref_losses, rel=rtol)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got.to(want.dtype), want, rtol=rtol * 10, atol=rtol * 1e-2)
    model.close()


@pytest.mark.parametrize("device", DEVICES)
def test_tier_mix_uses_every_tier(device: str) -> None:
    """Budgets short on both memories put panels on all three tiers. On a GPU the exact
    budgets that do depend on the device's workspace sizes and what the process already holds,
    so the device room above the minimum is taken from a few sizes (on the H200, 6 MiB had put
    everything beside ``Â`` on NVMe): one of them must mix every tier."""
    ei, x, _, _ = device_problem(device, True)
    rooms = [0] if device == "cpu" else [m << 20 for m in (2, 4, 6, 8, 12)]
    summaries = []
    for room in rooms:
        kwargs = options(device, True, x, ei)
        if device != "cpu":
            kwargs["gpu_budget"] += room - CUDA_ROOM
        model = GCN(12, 16, 5, num_layers=3, device=device, **kwargs)
        plan = model.plan(x, ei)
        model.close()
        if {t for tensor in plan.tensors.values() for t in tensor.tiers} == {"gpu", "host", "disk"}:
            return
        summaries.append(plan.summary())
    raise AssertionError("no budget mixed every tier:\n" + "\n".join(summaries))


@pytest.mark.parametrize("device", DEVICES)
def test_measured_bytes_equal_the_traffic_model(device: str) -> None:
    ei, x, y, mask = device_problem(device, True)
    dtype = x.dtype
    model = GCN(12, 16, 5, num_layers=3, device=device, **options(device, True, x, ei)).to(dtype)
    model.loss(x, ei, y, mask).backward()
    assert model.stats.measured == model.stats.predicted
    assert model.stats.measured["disk_read"] > 0 and model.stats.measured["disk_write"] > 0
    model.close()


def test_every_pass_of_an_epoch_has_its_predicted_time() -> None:
    """The time model's steps are the passes an epoch runs, in order, so each measured stage
    stands beside its prediction."""
    ei, x, y, mask = problem()
    model = GCN(12, 16, 5, num_layers=3, dropout=0.5, device="cpu", **TIERED).double()
    model.loss(x, ei, y, mask).backward()
    stages = [label for label, _ in model.stats.stages if label != "end"]
    steps = [kind for kind, _, _ in epoch_steps(model._state.program, model.plan(x, ei).kept)]
    assert len(model.stats.predicted_seconds) == len(steps) == len(stages)
    assert all(s > 0 for s in model.stats.predicted_seconds)
    for kind, label in zip(steps, stages, strict=True):
        assert label.split(" ")[0] == kind.split("_")[0]
        assert ("backward" in label) == kind.endswith("backward")
    model.close()


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_masks_survive_blocking_and_tiers(device: str) -> None:
    ei, x, y, mask = device_problem(device, True)
    dtype = x.dtype
    torch.manual_seed(3)
    model = GCN(12, 16, 5, num_layers=2, dropout=0.5, device=device, seed=7,
                **options(device, True, x, ei)).to(dtype)
    assert_trains_as_pyg(model, x, ei, y, mask, device, seed=7)
    model.close()


@pytest.mark.parametrize(("budgets", "tier"), [
    ({}, "gpu"), (dict(TIERED, host_budget=1 << 20), "host"), (TIERED, "disk"),
])
def test_the_inputs_dropout_is_drawn_on_its_panels_as_pyg_draws_it(
    monkeypatch: pytest.MonkeyPatch, budgets: dict, tier: str
) -> None:
    """No row-local pass copies x for its dropout: the first aggregation masks each panel of
    x as it loads it (from every tier, in chunks of a few rows here), with PyG's masks."""
    monkeypatch.setattr(gcn_module, "MASK_BYTES", 6000)  # chunks of 5 or 6 rows
    ei, x, y, mask = problem()
    torch.manual_seed(3)
    model = GCN(12, 16, 5, num_layers=3, dropout=0.5, device="cpu", seed=7,
                order="aggregate_first", **budgets).double()
    plan = model.plan(x, ei)
    assert set(plan.tensors["x"].tiers) == {tier} and "t0" not in plan.tensors
    assert 1 < plan.rows_bytes // (gcn_module.MASK_BYTES * plan.panel_cols) < len(x)
    assert_trains_as_pyg(model, x, ei, y, mask, "cpu", seed=7)
    model.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_kept_activations_train_as_pyg(device: str, dropout: float) -> None:
    """Where the budget has room the hidden stages keep their graphs for the backward pass
    instead of recomputing them: the losses and gradients are PyG's all the same."""
    ei, x, y, mask = device_problem(device, False)
    dtype = x.dtype
    torch.manual_seed(4)
    model = GCN(12, 16, 5, num_layers=3, dropout=dropout, device=device, seed=5).to(dtype)
    assert model.plan(x, ei).kept == {"t1", "t2"}
    assert_trains_as_pyg(model, x, ei, y, mask, device, seed=5)
    model.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ["aggregate_first", "transform_first"])
def test_sparse_features_match_dense(device: str, order: str) -> None:
    """Sparse X: SpGEMM aggregation (aggregate first) or sparse row blocks (transform first)."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    ei, x, y, mask = problem(dtype=dtype)
    x = x * (torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) < 0.2)
    torch.manual_seed(0)
    model = GCN(12, 16, 5, num_layers=2, device=device, order=order).to(dtype)
    ref, ref_grads = reference_losses(model, x, ei, y, mask, epochs=2)
    losses, grads = train(model, x.to_sparse_csr().to(device), ei, y, mask, epochs=2)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    assert losses == pytest.approx(ref, rel=rtol)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got.to(want.dtype), want, rtol=rtol * 10, atol=rtol * 1e-2)
    model.close()


def test_logits_match_pyg() -> None:
    ei, x, y, mask = problem()
    model = GCN(12, 16, 5, num_layers=2, device="cpu", **TIERED).double().eval()
    convs = [GCNConv(a, b).double() for a, b in zip(model.dims[:-1], model.dims[1:])]
    for conv, layer in zip(convs, model.convs):
        conv.load_state_dict(layer.state_dict())
    h = F.relu(convs[0](x, ei))
    want = convs[1](h, ei)
    assert torch.allclose(model(x, ei), want, rtol=1e-12, atol=1e-12)
    model.close()


def test_logits_of_chosen_rows_are_those_rows_of_all_the_logits() -> None:
    ei, x, y, mask = problem()
    model = GCN(12, 16, 5, num_layers=2, device="cpu", **TIERED).double().eval()
    every = model(x, ei)
    for rows in (torch.tensor([0, 3, 4, 90, len(x) - 1]), torch.arange(1, len(x), 7),
                 torch.tensor([], dtype=torch.int64), torch.tensor([5], dtype=torch.int32)):
        assert torch.equal(model(x, ei, rows=rows), every[rows.long()])
    model.close()


@pytest.mark.parametrize(("rows", "message"), [
    (torch.tensor([3, 1]), "ascend without repeats; position 1 holds 1 after 3"),
    (torch.tensor([2, 2]), "ascend without repeats; position 1 holds 2 after 2"),
    (torch.tensor([-1, 4]), "rows holds -1, outside the graph's"),
    (torch.tensor([4, 10_000]), "rows holds 10000, outside the graph's"),
    (torch.tensor([0.0, 1.0]), "1-D integer tensor"),
    (torch.tensor([[0, 1]]), "1-D integer tensor"),
])
def test_bad_rows_are_refused_by_name(rows: torch.Tensor, message: str) -> None:
    ei, x, y, mask = problem()
    model = GCN(12, 16, 5, device="cpu").double().eval()
    with pytest.raises(ValueError, match=message):
        model(x, ei, rows=rows)
    model.close()


def test_budget_below_the_minimum_names_it() -> None:
    ei, x, y, mask = problem()
    model = GCN(12, 16, 5, device="cpu", gpu_budget=4096, tile_bytes="8KiB")
    below = r"gpu_budget=4096 bytes .* minimum working set of \d+ bytes"
    with pytest.raises(ValueError, match=below):
        model.loss(x, ei, y, mask)


def test_a_tile_store_is_accepted_and_must_match(tmp_path: Path) -> None:
    ei, x, y, mask = problem()
    model = GCN(12, 16, 5, device="cpu", tile_bytes="8KiB").double()
    from aires.gcn_conv import tile_adjacency

    store = tile_adjacency(ei, 400, torch.float64, tile_bytes=8192, store_dir=tmp_path)
    a = model.loss(x, store, y, mask).item()
    b = model.loss(x, ei, y, mask).item()
    assert a == pytest.approx(b, rel=1e-12)
    with pytest.raises(ValueError, match="x has 300 rows"):
        model.loss(x[:300], store, y[:300], mask[:300])
    model.close()


def test_killed_run_leaves_the_store_reusable(tmp_path: Path) -> None:
    """A run killed mid-epoch leaves its tile store whole (or absent) and its scratch unread."""
    store_dir, scratch = tmp_path / "tiles", tmp_path / "scratch"
    scratch.mkdir()
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from tests.nn.test_gcn import problem
        from aires.nn import GCN
        ei, x, y, mask = problem()
        model = GCN(12, 16, 5, device="cpu", tile_bytes="8KiB",
                    gpu_budget={TIERED['gpu_budget']}, host_budget=0,
                    store_dir={str(store_dir)!r}, scratch_dir={str(scratch)!r}).double()
        print("ready", flush=True)
        while True:
            model.loss(x, ei, y, mask).backward()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ei, x, y, mask = problem()
    torch.manual_seed(0)
    model = GCN(12, 16, 5, device="cpu", tile_bytes="8KiB", store_dir=store_dir,
                scratch_dir=scratch, host_budget=0, gpu_budget=TIERED["gpu_budget"]).double()
    ref, _ = reference_losses(model, x, ei, y, mask, epochs=1)
    assert model.loss(x, ei, y, mask).item() == pytest.approx(ref[0], rel=1e-10)
    stores = [p for p in store_dir.iterdir() if not p.name.startswith(".")]
    assert all(TileStore.open(p) for p in stores)
    model.close()


@pytest.mark.gpu
@pytest.mark.parametrize("room", [CUDA_ROOM, 64 << 20])
def test_measured_peak_is_within_the_process_budget(room: int) -> None:
    """The allocator's peak over training, everything the process holds included, stays at or
    under the budget the model was given."""
    ei, x, y, mask = problem(n=CUDA_NODES, dtype=torch.float32)
    held = torch.cuda.memory_allocated()
    budget = minimum_gpu_bytes(x, ei, **TIERED_CUDA) + held + room
    model = GCN(12, 16, 5, num_layers=3, device="cuda", gpu_budget=budget, **TIERED_CUDA)
    reset_peak_memory_stats()
    train(model, x, ei, y, mask, epochs=2)
    assert max_memory_allocated() <= budget
    assert 0 < model.stats.peak_allocated <= budget
    model.close()


@pytest.mark.gpu
def test_measured_peak_is_within_the_budget_that_first_keeps_activations() -> None:
    """The smallest budget (in 16 MiB steps) at which the plan keeps the 256-wide hidden
    activations for the backward pass: the allocator's peak stays under it."""
    ei, x, y, mask = problem(n=CUDA_NODES, dtype=torch.float32)
    minimum = minimum_gpu_bytes(x, ei, hidden=256, num_layers=2, **TIERED_CUDA)
    # What the process holds counts too, measured after the probe (which loads kernels).
    budget = minimum + torch.cuda.memory_allocated()
    for _ in range(128):
        budget += 16 << 20
        model = GCN(12, 256, 5, device="cuda", gpu_budget=budget, **TIERED_CUDA)
        if model.plan(x, ei).kept:
            break
        model.close()
    else:
        raise AssertionError("no budget up to 2 GiB above the minimum kept the activations")
    reset_peak_memory_stats()
    train(model, x, ei, y, mask, epochs=2)
    assert max_memory_allocated() <= budget
    model.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda y, m: (y + 5, m), "y holds label 9 on a selected row; out_channels is 5"),
        (lambda y, m: (y[:-1], m), r"y must be a \(400,\) tensor"),
        (lambda y, m: (y, m[:-1]), "mask must have 400 entries, got 399"),
    ],
)
def test_bad_labels_are_refused_by_name(change, message) -> None:
    ei, x, y, mask = problem()
    y, mask = change(y, mask)
    model = GCN(12, 16, 5, device="cpu").double()
    with pytest.raises(ValueError, match=message):
        model.loss(x, ei, y, mask)
    model.close()


def test_setup_reports_the_time_of_each_step() -> None:
    ei, x, y, mask = problem()
    model = GCN(12, 16, 5, device="cpu", **TIERED).double()
    assert model.setup_seconds == {}
    start = time.perf_counter()
    model.loss(x, ei, y, mask)
    wall = time.perf_counter() - start
    steps = model.setup_seconds
    assert list(steps) == ["plan", "arenas", "adjacency", "features"]
    assert all(s >= 0 for s in steps.values()) and sum(steps.values()) <= wall
    model.close()


def test_labels_are_staged_once_and_again_after_an_in_place_change() -> None:
    """The same ``y`` and mask reuse the staged labels; changed in place, the labels (and the
    loss) follow, and a bad label written in place is refused as a new one would be."""
    ei, x, y, mask = problem()
    model = GCN(12, 16, 5, device="cpu").double().eval()
    first = model.loss(x, ei, y, mask).item()
    staged = model._labels.labels
    assert model.loss(x, ei, y, mask).item() == first and model._labels.labels is staged
    y[mask] = (y[mask] + 1) % 5
    changed = model.loss(x, ei, y, mask).item()
    assert model._labels.labels is not staged and changed != first
    fresh = GCN(12, 16, 5, device="cpu").double().eval()
    fresh.load_state_dict(model.state_dict())
    assert changed == fresh.loss(x, ei, y.clone(), mask.clone()).item()
    mask[~mask.clone()] = True  # every row selected now: the loss averages over all of them
    assert model.loss(x, ei, y, mask).item() == fresh.loss(x, ei, y.clone(), mask.clone()).item()
    y[0] = 9
    with pytest.raises(ValueError, match="y holds label 9 on a selected row"):
        model.loss(x, ei, y, mask)
    model.close()
    fresh.close()


def test_a_stale_loss_cannot_be_back_propagated() -> None:
    """The saved tensors live in the model's tiers: a second forward overwrites them, so the
    first loss's backward is refused instead of giving gradients of the wrong epoch."""
    ei, x, y, mask = problem()
    model = GCN(12, 16, 5, device="cpu").double()
    first = model.loss(x, ei, y, mask)
    model.loss(x, ei, y, mask).backward()
    with pytest.raises(RuntimeError, match="call backward\\(\\) before the next"):
        first.backward()
    model.close()
