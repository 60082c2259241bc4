"""Full-graph training on AiresGCNConv layers: the recipe, the model, and Kipf & Welling's Cora
accuracy with every product out of core."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from aires.data import Graph, load_planetoid, synthetic
from aires.nn import GCN as WholeModelGCN
from aires.train import GCN, TrainResult, adjacency_t, process_age, row_normalize, train

TILE = 4096


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Graph:
    return synthetic(
        "tiny",
        cache_dir=tmp_path_factory.mktemp("graphs"),
        device="cpu",
        progress=False,
    )


def out_of_core(graph: Graph, hidden: int = 16, device: str = "cpu") -> dict[str, Any]:
    """4 KiB tiles, a host budget of 4 tiles, and a device budget of the model's minimum working
    set (read from the error a budget below it raises) plus one hidden-wide tensor, and on a
    GPU what the process already holds: most tensors and tiles then live off the device."""
    with pytest.raises(ValueError, match="below the minimum working set") as error:
        train(graph, epochs=1, hidden=hidden, device=device, progress=False, tile_bytes=TILE,
              gpu_budget=1, host_budget=4 * TILE)
    minimum = int(re.search(r"minimum working set of (\d+) bytes", str(error.value))[1])
    held = torch.cuda.memory_allocated() if device == "cuda" else 0
    return {"tile_bytes": TILE, "gpu_budget": minimum + held + graph.num_nodes * hidden * 4,
            "host_budget": 4 * TILE}


def test_cora_out_of_core_trains_like_kipf_welling(
    planetoid_dir: Path, builds: list[Any]
) -> None:
    """Kipf & Welling's recipe (the defaults) with every product streamed from the host and
    disk tiers of 4 KiB tiles: at least 80% test accuracy (published: 81.5%)."""
    graph = load_planetoid(planetoid_dir / "cora.npz")
    result = train(
        graph, device="cpu", progress=False, seed=0, **out_of_core(graph)
    )
    assert result.test_accuracy >= 0.80, result.test_accuracy
    assert len(builds) == 1  # both layers, all epochs: one tiled graph
    assert len(builds[0]) >= 20 and builds[0].symmetric is True


@pytest.mark.parametrize(("name", "published", "floor"), [("cora", 0.815, 0.80),
                                                          ("citeseer", 0.703, 0.69)])
def test_default_recipe_reaches_kipf_welling_accuracy(
    name: str, published: float, floor: float
) -> None:
    """``train(graph)`` with nothing but the graph is Kipf & Welling's recipe (row-normalised
    bag-of-words, 16 hidden, dropout 0.5, lr 0.01, weight decay 5e-4 on the first layer, 200
    epochs, the standard split): its test accuracy over seeds 0-2 averages within 1.5 points
    of the published one (Cora 0.817, CiteSeer 0.709 here on the CPU)."""
    graph = load_planetoid(name)
    accuracies = [
        train(graph, device="cpu", progress=False, seed=seed).test_accuracy for seed in range(3)
    ]
    assert float(np.mean(accuracies)) >= floor, (accuracies, published)


def test_features_are_row_normalised_when_none_is_negative(tiny: Graph) -> None:
    """The default normalises Cora's bag-of-words and leaves signed features alone."""
    cora = load_planetoid("cora")
    signed = tiny.x_torch()
    assert bool((signed.to_dense() < 0).any())  # the synthetic features are signed
    for graph, expected in ((cora, True), (tiny, False)):
        runs = [
            train(graph, epochs=2, device="cpu", progress=False, normalize_features=flag)
            for flag in (None, expected)
        ]
        assert [log.loss for log in runs[0].history] == [log.loss for log in runs[1].history]


def test_progress_in_a_log_is_a_few_lines_not_one_per_epoch(
    tiny: Graph, capsys: pytest.CaptureFixture[str]
) -> None:
    """Captured stderr is not a terminal: 30 epochs redraw the bar a few times, not 30."""
    train(tiny, epochs=30, hidden=8, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "30/30" in err  # the summary on close
    assert err.count("\r") < 10, err.count("\r")


@pytest.mark.gpu
def test_cora_on_gpu_out_of_core(planetoid_dir: Path) -> None:
    graph = load_planetoid(planetoid_dir / "cora.npz")
    budgets = out_of_core(graph, 16, "cuda")
    result = train(
        graph,
        normalize_features=True,
        device="cuda",
        progress=False,
        **budgets,
    )
    assert result.test_accuracy >= 0.80 and result.device.startswith("cuda")


def test_train_result_and_history(tiny: Graph) -> None:
    result = train(
        tiny,
        epochs=5,
        hidden=8,
        device="cpu",
        progress=False,
        **out_of_core(tiny, 8),
    )
    assert isinstance(result, TrainResult) and isinstance(result.model, WholeModelGCN)
    assert [log.epoch for log in result.history] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(log.loss) and log.seconds > 0 for log in result.history)
    assert result.history[-1].loss < result.history[0].loss
    assert 0.0 <= result.test_accuracy <= 1.0 and result.device == "cpu"
    assert not result.model.training
    # The set-up ran its steps before the first epoch, which began before this line.
    assert 0 < sum(result.model.setup_seconds.values()) <= result.setup_seconds
    assert result.setup_seconds < result.ready_seconds < process_age()


def test_process_age_counts_from_the_process_start() -> None:
    code = "import time; time.sleep(0.5); from aires.train import process_age; print(process_age())"
    start = time.perf_counter()
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout)
    assert 0.5 <= age <= time.perf_counter() - start + 0.05


def test_zero_host_budget_streams_every_tile_from_disk(tiny: Graph) -> None:
    """host_budget=0 (as matmul accepts it) gives the same training as pinned host tiles."""
    runs = [
        train(
            tiny,
            epochs=3,
            hidden=8,
            device="cpu",
            progress=False,
            **{**out_of_core(tiny, 8), "host_budget": host},
        )
        for host in (0, 4 * TILE)
    ]
    assert [log.loss for log in runs[0].history] == [log.loss for log in runs[1].history]


def test_training_is_reproducible(tiny: Graph) -> None:
    runs = [
        train(tiny, epochs=3, device="cpu", progress=False, seed=1) for _ in range(2)
    ]
    assert [log.loss for log in runs[0].history] == [
        log.loss for log in runs[1].history
    ]


def test_weight_decay_applies_to_the_first_layer_only(
    tiny: Graph, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups: list[list[dict[str, Any]]] = []
    original = torch.optim.Adam

    def recording(params: Any, **kwargs: Any) -> torch.optim.Adam:
        optimizer = original(params, **kwargs)
        groups.append(optimizer.param_groups)
        return optimizer

    monkeypatch.setattr(torch.optim, "Adam", recording)
    result = train(
        tiny, epochs=1, layers=3, weight_decay=0.1, device="cpu", progress=False
    )
    first, rest = groups[0]
    assert first["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    convs = result.model.convs
    assert {id(p) for p in first["params"]} == {id(p) for p in convs[0].parameters()}
    assert {id(p) for p in rest["params"]} == {
        id(p) for c in convs[1:] for p in c.parameters()
    }


@pytest.mark.parametrize("sparse", [False, True])
def test_model_shapes_and_layers(sparse: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(50, 10, generator=g) < 0.2).float()
    edge_index = torch.randint(0, 50, (2, 200), generator=g)
    model = GCN(10, 8, 3, layers=3, dropout=0.5)
    assert [(c.in_channels, c.out_channels) for c in model.convs] == [
        (10, 8),
        (8, 8),
        (8, 3),
    ]
    assert all(c.cached for c in model.convs)
    out = model(x.to_sparse_csr() if sparse else x, edge_index)
    assert out.shape == (50, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("sparse", [False, True])
def test_row_normalize(sparse: bool) -> None:
    x = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    out = row_normalize(x.to_sparse_csr() if sparse else x)
    expected = torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    assert torch.equal(out.to_dense() if sparse else out, expected)


def test_sparse_input_dropout_keeps_the_pattern_and_the_expectation() -> None:
    x = torch.ones(200, 300).to_sparse_csr()
    model = GCN(300, 4, 2, dropout=0.5)
    from aires.train import _dropout

    dropped = _dropout(x, 0.5, True)
    assert torch.equal(dropped.crow_indices(), x.crow_indices())
    values = dropped.values()
    assert set(values.unique().tolist()) <= {0.0, 2.0}
    assert abs(float(values.mean()) - 1.0) < 0.02
    assert _dropout(x, 0.5, False) is x and model.dropout == 0.5


def test_adjacency_t_of_a_directed_graph_is_the_transpose() -> None:
    adj = sp.csr_array(np.array([[0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=np.float32))
    graph = Graph(
        "directed",
        3,
        adj,
        torch.eye(3),
        torch.tensor([0, 1, 0]),
        torch.tensor([0]),
        torch.tensor([1]),
        torch.tensor([2]),
        2,
        symmetric=False,
    )
    assert torch.equal(adjacency_t(graph).to_dense(), torch.from_numpy(adj.toarray().T))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"hidden": 0}, "hidden"),
        ({"gpu_budget": "lots"}, "gpu_budget"),
        ({"host_budget": -1}, "host_budget"),
        ({"dropout": 1.0}, "dropout"),
        ({"layers": 0}, "layers"),
    ],
)
def test_arguments_are_checked(tiny: Graph, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train(tiny, device="cpu", progress=False, **kwargs)


def test_unlabelled_graph_is_rejected(tiny: Graph) -> None:
    bare = Graph(
        "bare",
        tiny.num_nodes,
        tiny.adj,
        None,
        None,
        tiny.train_idx,
        tiny.val_idx,
        tiny.test_idx,
        0,
    )
    with pytest.raises(ValueError, match="features and labels"):
        train(bare, progress=False)


def test_a_prepared_graph_trains_in_place_like_the_graph_it_came_from(tmp_path: Path) -> None:
    """``aires data prepare``'s output is trained on directly (its tiles are the adjacency, its
    feature file is read in place): the same losses as the in-memory graph, whose adjacency
    the model normalises itself."""
    from aires.data.prepare import Synthetic, open_prepared, prepare

    path = prepare(Synthetic("tiny", 1.0, 0), root=tmp_path, progress=False).path
    graph = synthetic("tiny", scale=1.0, cache_dir=tmp_path / "graphs", progress=False)
    kwargs = {"epochs": 3, "device": "cpu", "progress": False, "seed": 0, "dropout": 0.5}
    prepared = train(open_prepared(path), **kwargs)
    in_memory = train(graph, normalize_features=False, **kwargs)
    assert [log.loss for log in prepared.history] == pytest.approx(
        [log.loss for log in in_memory.history], rel=1e-5
    )
    # Scored from the split rows' logits alone, against all the logits of the in-memory run.
    for field in ("train_accuracy", "val_accuracy"):
        assert [getattr(log, field) for log in prepared.history] == pytest.approx(
            [getattr(log, field) for log in in_memory.history])
    assert prepared.test_accuracy == pytest.approx(in_memory.test_accuracy)
    with pytest.raises(ValueError, match="used as prepared"):
        train(open_prepared(path), normalize_features=True, **kwargs)


def test_a_prepared_graph_is_scored_from_its_split_rows_as_from_all_logits(
    tmp_path: Path,
) -> None:
    """A graph whose splits leave most rows out (as papers100M's do): the accuracies from the
    split rows' logits equal those ``evaluate`` takes from all of them."""
    from aires.data import save_graph
    from aires.data.prepare import open_prepared, prepare
    from tests.data.test_prepare import hub_graph

    graph = hub_graph(n=500, hub_degree=10)  # splits of 300 rows; labels -1 (none) to 3
    graph.y[graph.train_idx] = graph.y[graph.train_idx].clamp(min=0)  # trained on: labelled
    save_graph(graph, tmp_path / "graph")
    path = prepare(tmp_path / "graph", root=tmp_path / "prep", progress=False).path
    kwargs = {"epochs": 3, "device": "cpu", "progress": False, "seed": 0, "hidden": 8}
    prepared = train(open_prepared(path), **kwargs)
    in_memory = train(graph, normalize_features=False, **kwargs)
    for field in ("loss", "train_accuracy", "val_accuracy"):
        assert [getattr(log, field) for log in prepared.history] == pytest.approx(
            [getattr(log, field) for log in in_memory.history], rel=1e-5)
    assert prepared.test_accuracy == pytest.approx(in_memory.test_accuracy)


# --------------------------------------------------------------------------- several processes


def _losses(path: Path) -> list[float]:
    return [epoch["loss"] for epoch in json.loads(path.read_text())["history"]]


TRAIN_ARGS = ["--dataset", "cora", "--epochs", "3", "--device", "cpu", "--quiet"]


def test_nproc_2_trains_as_one_process_does(tmp_path: Path) -> None:
    """``aires train --nproc 2``: the rows split over two gloo processes, the same losses."""
    from aires.cli import main

    assert main(["train", *TRAIN_ARGS, "--json", str(tmp_path / "one.json")]) == 0
    assert main(["train", *TRAIN_ARGS, "--nproc", "2", "--json", str(tmp_path / "two.json")]) == 0
    assert json.loads((tmp_path / "two.json").read_text())["processes"] == 2
    assert _losses(tmp_path / "two.json") == pytest.approx(_losses(tmp_path / "one.json"),
                                                           rel=1e-5)


def test_torchrun_trains_as_one_process_does(tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m aires.train``: the processes torchrun starts join."""
    from aires.cli import main

    assert main(["train", *TRAIN_ARGS, "--json", str(tmp_path / "one.json")]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "aires.train", *TRAIN_ARGS,
               "--json", str(tmp_path / "two.json")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "x 2 processes" in done.stdout
    assert _losses(tmp_path / "two.json") == pytest.approx(_losses(tmp_path / "one.json"),
                                                           rel=1e-5)
