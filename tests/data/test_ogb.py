"""OGB through the real ogb package, offline: DatasetSaver -> ogb's raw readers -> Evaluator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aires.data import evaluate, load_graph, load_ogb, open_graph

from .conftest import TOY_NODES as N
from .conftest import toy_graph

pytest.importorskip("ogb", reason="the OGB tests need the ogb package (pip install aires[ogb])")


@pytest.fixture(autouse=True)
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt by ogb to download fails the test."""
    import ogb.nodeproppred.dataset as dataset_module

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("ogb tried to download")

    monkeypatch.setattr(dataset_module, "decide_download", refuse)
    monkeypatch.setattr(dataset_module, "download_url", refuse)


def test_saver_dataset_loads_through_meta_dict(ogb_saved: tuple[dict, Path]) -> None:
    meta, _ = ogb_saved
    edges, x, y = toy_graph(0)
    graph = load_ogb("ogbn-toy", meta_dict=meta)
    assert graph.num_nodes == N and graph.symmetric is True
    want = np.unique(np.concatenate([edges, edges[::-1]], axis=1), axis=1)
    assert graph.num_edges == want.shape[1]
    assert (graph.adj != graph.adj.T).nnz == 0
    assert np.array_equal(graph.x_torch().numpy(), x) and np.array_equal(graph.y.numpy(), y)
    assert len(graph.train_idx) == 60 and len(graph.val_idx) == 30 and len(graph.test_idx) == 30
    assert graph.provenance["ogb"] == {
        "name": "ogbn-toy",
        "num_tasks": 1,
        "eval_metric": "acc",
        "custom": True,
    }


def test_saver_dataset_loads_from_submission_directory(ogb_saved: tuple[dict, Path]) -> None:
    meta, submission = ogb_saved
    a = load_ogb("ogbn-toy", meta_dict=meta)
    for b in (load_ogb(submission), load_graph(submission)):
        assert b.name == "ogbn-toy"
        assert np.array_equal(a.adj.indices, b.adj.indices) and torch.equal(a.y, b.y)


def _train_dense_gcn(graph: object, epochs: int = 100) -> torch.Tensor:
    """One GCN layer, dense: softmax(Â X W), Â = D^-1/2 (A + I) D^-1/2; returns logits."""
    a = torch.from_numpy(graph.adj.toarray()).double() + torch.eye(
        graph.num_nodes, dtype=torch.float64
    )
    d = a.sum(1).rsqrt()
    ax = (d[:, None] * a * d[None, :]).float() @ graph.x_torch()
    torch.manual_seed(0)
    layer = torch.nn.Linear(ax.shape[1], graph.num_classes)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(
            layer(ax[graph.train_idx]), graph.y[graph.train_idx]
        ).backward()
        opt.step()
    return layer(ax).detach()


def test_train_and_score_with_ogb_evaluator(
    ogb_saved: tuple[dict, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ogb.nodeproppred import Evaluator

    calls: list[str] = []
    original = Evaluator.eval

    def spy(self: Evaluator, input_dict: dict) -> dict:
        calls.append(self.name)
        return original(self, input_dict)

    monkeypatch.setattr(Evaluator, "eval", spy)
    graph = load_ogb("ogbn-toy", meta_dict=ogb_saved[0])
    logits = _train_dense_gcn(graph)
    test = graph.test_idx
    manual = float((logits.argmax(1)[test] == graph.y[test]).double().mean())
    assert evaluate(graph, logits, "test") == pytest.approx(manual)
    assert evaluate(graph, logits.argmax(1), "valid") == evaluate(graph, logits, "val")
    assert calls == ["ogbn-toy"] * 3
    assert manual > 0.7  # features carry the class; three classes


def test_standard_name_from_root(arxiv_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ogb.nodeproppred import Evaluator

    names: list[str] = []
    monkeypatch.setattr(Evaluator, "eval", lambda self, d: names.append(self.name) or {"acc": 0.5})
    edges, _, y = toy_graph(2)
    graph = load_ogb("ogbn-arxiv", arxiv_root)
    assert graph.num_nodes == N and torch.equal(graph.y, torch.from_numpy(y))
    assert graph.provenance["ogb"]["custom"] is False
    assert evaluate(graph, torch.zeros(N, dtype=torch.long)) == 0.5 and names == ["ogbn-arxiv"]
    # ogb's pickle cache is neither written nor read
    assert not (arxiv_root / "ogbn_arxiv" / "processed").exists()
    again = load_ogb(arxiv_root / "ogbn_arxiv")
    assert np.array_equal(again.adj.indices, graph.adj.indices)
    directed = load_ogb("ogbn-arxiv", arxiv_root, undirected=False)
    assert directed.num_edges == np.unique(edges, axis=1).shape[1] and directed.symmetric is None


def test_root_from_environment_and_out(
    arxiv_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AIRES_OGB_ROOT", str(arxiv_root))
    graph = load_ogb("ogbn-arxiv", out=tmp_path / "disk")
    assert not graph.adj.indices.flags.writeable  # memmap-backed on-disk graph
    assert open_graph(tmp_path / "disk").provenance["ogb"]["name"] == "ogbn-arxiv"
    assert graph.num_edges == load_graph("ogbn-arxiv").num_edges


def test_missing_files_say_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_ogb("ogbn-products", tmp_path)
    message = str(info.value)
    for needle in (
        "AIRES never downloads",
        "ogbn_products/RELEASE_v1.txt",
        "ogbn_products/raw/edge.csv.gz",
        "split/sales_ranking/train.csv.gz",
        "NodePropPredDataset('ogbn-products'",
        "products.zip",
        str(tmp_path / "ogbn_products"),
    ):
        assert needle in message
    with pytest.raises(FileNotFoundError, match="raw/data.npz"):
        load_ogb("ogbn-papers100M", tmp_path)


def test_missing_release_note_is_an_error_not_a_prompt(arxiv_root: Path) -> None:
    (arxiv_root / "ogbn_arxiv" / "RELEASE_v1.txt").unlink()
    with pytest.raises(FileNotFoundError, match="RELEASE_v1.txt"):
        load_ogb("ogbn-arxiv", arxiv_root)


def test_bad_names_and_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="supported: ogbn-arxiv, ogbn-products, ogbn-papers100M"):
        load_ogb("ogbn-nope", tmp_path)
    monkeypatch.delenv("AIRES_OGB_ROOT", raising=False)
    with pytest.raises(ValueError, match="root"):
        load_ogb("ogbn-arxiv")
    with pytest.raises(NotImplementedError, match="heterogeneous"):
        load_ogb("ogbn-mag", tmp_path)
    with pytest.raises(NotImplementedError, match="112 tasks"):
        load_ogb("ogbn-proteins", tmp_path)


class _Payload:
    """Unpickling this creates ``path``: the marker of code run by a pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def test_pickle_cache_is_never_unpickled(arxiv_root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    processed = arxiv_root / "ogbn_arxiv" / "processed"
    processed.mkdir()
    torch.save({"graph": _Payload(marker), "labels": _Payload(marker)}, processed / "data_processed")
    graph = load_ogb("ogbn-arxiv", arxiv_root)
    assert not marker.exists()
    assert graph.num_nodes == N and torch.equal(graph.y, torch.from_numpy(toy_graph(2)[2]))


def test_crafted_split_dict_is_refused_not_run(arxiv_root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"train": _Payload(marker)}, arxiv_root / "ogbn_arxiv/split/time/split_dict.pt")
    with pytest.raises(ValueError, match=r"split_dict.pt: not loaded: .*never unpickles"):
        load_ogb("ogbn-arxiv", arxiv_root)
    assert not marker.exists()


def test_numpy_split_dict_loads_with_weights_only(arxiv_root: Path) -> None:
    split = {"train": np.arange(50), "valid": np.arange(50, 80), "test": np.arange(80, N)}
    torch.save(split, arxiv_root / "ogbn_arxiv/split/time/split_dict.pt")
    graph = load_ogb("ogbn-arxiv", arxiv_root)
    assert len(graph.train_idx) == 50 and len(graph.val_idx) == 30


def test_crafted_meta_dict_is_refused_not_run(
    ogb_saved: tuple[dict, Path], tmp_path: Path
) -> None:
    marker = tmp_path / "code-ran"
    (tmp_path / "sub").mkdir()
    torch.save({"download_name": _Payload(marker)}, tmp_path / "sub" / "meta_dict.pt")
    with pytest.raises(ValueError, match=r"meta_dict.pt: not loaded"):
        load_ogb(tmp_path / "sub")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../toy", "/etc", ".."])
def test_meta_dict_cannot_point_outside(
    ogb_saved: tuple[dict, Path], tmp_path: Path, name: str
) -> None:
    _, submission = ogb_saved
    saved = torch.load(submission / "meta_dict.pt", weights_only=True)
    (tmp_path / "sub").mkdir()
    torch.save({**saved, "download_name": name}, tmp_path / "sub" / "meta_dict.pt")
    with pytest.raises(ValueError, match=rf"download_name must be a plain name, got '{name}'"):
        load_ogb(tmp_path / "sub")


def test_split_name_cannot_point_outside(ogb_saved: tuple[dict, Path]) -> None:
    meta, _ = ogb_saved
    with pytest.raises(ValueError, match=r"split must be a plain name, got '\.\./x'"):
        load_ogb("ogbn-toy", meta_dict={**meta, "split": "../x"})
