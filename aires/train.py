"""Full-graph GCN training: Kipf & Welling's recipe on the whole-model out-of-core GCN.

The model and recipe of Kipf & Welling (2017): ``layers`` graph convolutions with ReLU and
dropout between them (and on the input features), cross-entropy on the training nodes, Adam with
weight decay on the first layer only. :func:`train` runs it on :class:`aires.nn.GCN`, whose
features, activations and gradients stream under ``gpu_budget`` as its adjacency does.
:class:`GCN` here is the same model built from drop-in :class:`~aires.gcn_conv.AiresGCNConv`
layers, where only the adjacency is out of core (what a PyG user gets by swapping the class).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aires.checks import check_positive_int, parse_size
from aires.data import Graph, evaluate
from aires.data.prepare import Prepared
from aires.gcn_conv import AiresGCNConv
from aires.nn import GCN as WholeModelGCN
from aires.progress import progress_bar

__all__ = ["GCN", "EpochLog", "TrainResult", "adjacency_t", "row_normalize", "train"]


class GCN(nn.Module):
    """``layers`` :class:`AiresGCNConv` layers, ReLU and dropout between them.

    ``logits = conv_L(... dropout(relu(conv_1(dropout(x), A))) ..., A)``. Dropout also applies to
    the input features, as in Kipf & Welling; a sparse ``x`` gets dropout on its stored values.

    Args:
        in_channels: input features per node.
        hidden: width of every hidden layer.
        out_channels: classes.
        layers: number of graph convolutions (>= 1).
        dropout: dropout probability (input and hidden).
        gpu_budget, host_budget, tile_bytes, store_dir: passed to every layer (see
            :class:`AiresGCNConv`).

    Shapes:
        - input: ``x`` ``(N, F_in)`` dense or sparse CSR; ``adj_t`` ``(N, N)`` as accepted by
          :class:`AiresGCNConv`.
        - output: ``(N, out_channels)`` logits.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        layers: int = 2,
        dropout: float = 0.5,
        *,
        gpu_budget: int | str | None = None,
        host_budget: int | str | None = None,
        tile_bytes: int | str | None = None,
        store_dir: str | None = None,
        order: str = "auto",
    ) -> None:
        super().__init__()
        check_positive_int(layers, "layers")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        widths = [in_channels] + [hidden] * (layers - 1) + [out_channels]
        self.convs = nn.ModuleList(
            AiresGCNConv(
                widths[i],
                widths[i + 1],
                cached=True,
                gpu_budget=gpu_budget,
                host_budget=host_budget,
                tile_bytes=tile_bytes,
                store_dir=store_dir,
                order=order,
            )
            for i in range(layers)
        )
        self.dropout = dropout

    def reset_parameters(self) -> None:
        """Re-initialise every layer (glorot weights, zero biases)."""
        for conv in self.convs:
            conv.reset_parameters()

    def forward(self, x: Tensor, adj_t: object) -> Tensor:
        """Logits for every node. See the class docstring for shapes."""
        h = _dropout(x, self.dropout, self.training)
        for i, conv in enumerate(self.convs):
            h = conv(h, adj_t)
            if i < len(self.convs) - 1:
                h = F.dropout(h.relu(), self.dropout, self.training)
        return h


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout that also works on a sparse CSR ``x`` (drops stored values, keeps the pattern)."""
    if x.layout == torch.strided:
        return F.dropout(x, p, training)
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.values().shape, device=x.device) >= p
    values = x.values() * keep / (1.0 - p)
    return torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), values, x.shape)


def row_normalize(x: Tensor) -> Tensor:
    """Each row divided by its sum (sums below 1 left as they are), dense or sparse CSR.

    Kipf & Welling's (and PyG's ``NormalizeFeatures``) preprocessing of bag-of-words features;
    meant for non-negative features.
    """
    if x.layout == torch.strided:
        return x / x.sum(dim=-1, keepdim=True).clamp(min=1.0)
    crow = x.crow_indices()
    sums = torch.zeros(x.size(0), dtype=x.dtype, device=x.device)
    rows = torch.repeat_interleave(
        torch.arange(x.size(0), device=x.device), crow.diff()
    )
    sums.index_add_(0, rows, x.values())
    values = x.values() / sums.clamp(min=1.0)[rows]
    return torch.sparse_csr_tensor(crow, x.col_indices(), values, x.shape)


@dataclass(frozen=True)
class EpochLog:
    """One training epoch: its loss, accuracies after the step, and its step time."""

    epoch: int
    loss: float
    train_accuracy: float
    val_accuracy: float
    seconds: float


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained :class:`aires.nn.GCN` (evaluation mode).
        history: one :class:`EpochLog` per epoch.
        test_accuracy: accuracy of the final model on the test split (by
            :func:`aires.data.evaluate`: OGB's ``Evaluator`` for OGB graphs).
        val_accuracy: the same on the validation split.
        epoch_seconds: median time of a training step (forward, backward, optimiser) over the
            epochs after the first (the first one reads what is not yet in the page cache).
        setup_seconds: wall time of the model's set-up before the first epoch (tiling a graph
            that is not prepared, planning, the arenas, ``X`` in its tiers;
            ``model.setup_seconds`` itemises it), run beside the optimiser's construction.
        ready_seconds: the process's age when the first epoch's computation began, after
            start-up, reading the graph and the model's set-up; ``None`` where the process's
            start time is unknown (not Linux).
        device: the device the model ran on.
    """

    model: WholeModelGCN
    history: list[EpochLog] = field(repr=False)
    test_accuracy: float
    val_accuracy: float
    epoch_seconds: float
    setup_seconds: float
    ready_seconds: float | None
    device: str


def adjacency_t(graph: Graph) -> Tensor:
    """The graph's ``adj_t`` (rows are targets) as a CPU torch sparse CSR tensor.

    ``graph.adj[i, j]`` is the edge ``i -> j`` (``Graph.edge_index`` is row-major, PyG's
    ``edge_index[0]`` being the source), so ``adj_t`` is its transpose, the same matrix for a
    symmetric graph. It stays on the host: the layers tile it and stream the tiles.
    """
    adj = graph.adj if graph.symmetric else sp.csr_array(graph.adj.T)
    data = np.asarray(adj.data, dtype=np.float32)
    return torch.sparse_csr_tensor(
        torch.from_numpy(np.array(adj.indptr, dtype=np.int64)),
        torch.from_numpy(np.array(adj.indices, dtype=np.int64)),
        torch.from_numpy(np.array(data)),
        size=adj.shape,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    graph: Graph | Prepared,
    *,
    layers: int = 2,
    hidden: int = 16,
    epochs: int = 200,
    lr: float = 0.01,
    weight_decay: float = 5e-4,
    dropout: float = 0.5,
    gpu_budget: int | str | None = None,
    host_budget: int | str | None = None,
    tile_bytes: int | str | None = None,
    store_dir: str | None = None,
    normalize_features: bool | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    distributed: bool = False,
) -> TrainResult:
    """Train a :class:`GCN` on the whole graph and report test accuracy.

    Kipf & Welling's recipe: Adam, cross-entropy on ``graph.train_idx``, ``weight_decay`` on the
    first layer's parameters only, dropout on the input and hidden features. Each epoch runs one
    training step and one evaluation pass; the progress bar shows loss, train and validation
    accuracy and the step time.

    Args:
        graph: a labelled :class:`~aires.data.Graph` with features, or a prepared graph
            (:func:`aires.data.prepare.open_prepared`), trained on where it lies: its tile store
            is the adjacency and its feature file is read in place (its features are not
            normalised).
        layers: graph convolutions (2 in the paper).
        hidden: hidden width.
        epochs: training epochs.
        lr: Adam learning rate.
        weight_decay: L2 penalty on the first layer.
        dropout: dropout probability.
        gpu_budget: device bytes each tiled product may allocate (``"2GiB"``: its output,
            slots and resident tiles); None: :func:`aires.matmul.matmul`'s default (the free
            device memory less a margin).
        host_budget: pinned host bytes for tiles (0: every tile beyond the GPU budget is read
            from NVMe); None: the default (half the RAM).
        tile_bytes: tile capacity; None: the tiler's default.
        store_dir: where tile stores are kept (reused across runs); None: temporary.
        normalize_features: row-normalise the features first (:func:`row_normalize`), as
            Kipf & Welling do for bag-of-words features. None: when every feature is
            non-negative (counts or indicators such as Planetoid's bag-of-words, where the
            recipe applies), not for signed features (OGB's embeddings).
        device: where the model runs; None: CUDA if available, else CPU.
        seed: seed of the initialisation and dropout.
        progress: show a tqdm bar.
        distributed: this process is one rank of ``torch.distributed``'s default group (already
            initialised): the graph's rows are split over the ranks (``aires.nn.GCN``'s
            ``distributed``); every rank gets the same history and accuracies.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: a graph without nodes, features, labels or training nodes, or bad
            hyper-parameters.
    """
    epochs = check_positive_int(epochs, "epochs")
    hidden = check_positive_int(hidden, "hidden")
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if not (
            isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
        ):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    for name, budget in (("gpu_budget", gpu_budget), ("tile_bytes", tile_bytes)):
        if budget is not None:
            parse_size(budget, name)
    if host_budget is not None:
        parse_size(host_budget, "host_budget", allow_zero=True)
    device = torch.device(
        device
        if device is not None
        else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    torch.manual_seed(seed)
    inputs = (
        _prepared_inputs(graph, normalize_features)
        if isinstance(graph, Prepared)
        else _graph_inputs(graph, normalize_features)
    )
    x, adj_t, y, train_idx, score = inputs.x, inputs.adj, inputs.y, inputs.train_idx, inputs.score
    model = WholeModelGCN(
        inputs.num_features,
        hidden,
        inputs.num_classes,
        num_layers=layers,
        dropout=dropout,
        gpu_budget=gpu_budget,
        host_budget=host_budget,
        device=device,
        tile_bytes=tile_bytes,
        store_dir=store_dir,
        seed=seed,
        distributed=distributed,
    )
    first, rest = model.convs[0], model.convs[1:]
    # The model's set-up (planning, its arenas, X in its tiers, the adjacency's tiles) runs
    # beside the optimiser's construction, which imports torch._dynamo (a second or two): the
    # set-up's page faults, page locking and reads release the GIL.
    with ThreadPoolExecutor(1, thread_name_prefix="aires-setup") as pool:
        setup = pool.submit(_set_up, model, x, adj_t)
        optimizer = torch.optim.Adam(
            [
                {"params": first.parameters(), "weight_decay": weight_decay},
                {"params": rest.parameters(), "weight_decay": 0.0},
            ],
            lr=lr,
        )
        setup_seconds = setup.result()

    history: list[EpochLog] = []
    bar = progress_bar(
        range(1, epochs + 1),
        desc=f"train {inputs.name}",
        disable=not progress,
        unit="epoch",
    )
    ready = None
    for epoch in bar:
        _sync(device)
        if epoch == 1:
            ready = process_age()
        start = time.perf_counter()
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(x, adj_t, y, train_idx)
        loss.backward()
        optimizer.step()
        _sync(device)
        seconds = time.perf_counter() - start
        logits = _predict(model, x, adj_t, inputs.rows)
        log = EpochLog(
            epoch,
            loss.item(),
            score(logits, "train"),
            score(logits, "val"),
            seconds,
        )
        history.append(log)
        bar.set_postfix(
            loss=f"{log.loss:.4f}",
            train=f"{log.train_accuracy:.3f}",
            val=f"{log.val_accuracy:.3f}",
            step=f"{seconds * 1e3:.1f}ms",
            refresh=False,  # the bar redraws on its own interval (aires.progress)
        )
    logits = _predict(model, x, adj_t, inputs.rows)
    steady = [log.seconds for log in history[1:]] or [history[0].seconds]
    return TrainResult(
        model=model,
        history=history,
        test_accuracy=score(logits, "test"),
        val_accuracy=score(logits, "val"),
        epoch_seconds=statistics.median(steady),
        setup_seconds=setup_seconds,
        ready_seconds=ready,
        device=str(device),
    )


def _set_up(model: WholeModelGCN, x: Any, adj_t: Any) -> float:
    """Set ``model`` up for ``(x, adj_t)`` (on its device, in a thread of its own); the
    seconds it took."""
    start = time.perf_counter()
    with torch.cuda.device(model.device) if model.device.type == "cuda" else nullcontext():
        model.plan(x, adj_t)
    return time.perf_counter() - start


def process_age() -> float | None:
    """Seconds since this process started (from Linux's ``/proc``), or ``None`` elsewhere."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return None
    # Field 22 is the start time in clock ticks after boot; fields 3 on follow the ")" that
    # closes the command's name (which may itself hold spaces).
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class _Inputs:
    """What training reads from a graph or a prepared graph."""

    name: str
    x: Any
    adj: Any
    y: Tensor
    train_idx: Tensor
    num_features: int
    num_classes: int
    score: Callable[[Tensor, str], float]
    #: The rows whose logits ``score`` reads (ascending), or ``None``: all of them.
    rows: Tensor | None = None


def _graph_inputs(graph: Graph, normalize_features: bool | None) -> _Inputs:
    """An in-memory graph: its features (row-normalised by the recipe's rule) and ``adj_t``."""
    _check_trainable(graph)
    x = graph.x_torch()
    if normalize_features is None:
        normalize_features = _non_negative(x)
    x = row_normalize(x) if normalize_features else x
    return _Inputs(graph.name, x, adjacency_t(graph), graph.y, graph.train_idx,
                   graph.num_features, graph.num_classes,
                   lambda logits, split: evaluate(graph, logits, split))


def _prepared_inputs(prepared: Prepared, normalize_features: bool | None) -> _Inputs:
    """A prepared graph (``aires data prepare``): its tile store of ``Â`` and its feature file,
    read where they are, with no second copy. Its features are used as prepared: reading all
    of them to decide on, or to apply, a normalisation would cost a pass over the file."""
    if normalize_features:
        raise ValueError(
            f"normalize_features=True: a prepared graph's features ({prepared.path}) are used as "
            "prepared; normalise them before preparing"
        )
    if prepared.features is None or prepared.num_features == 0:
        raise ValueError(f"prepared graph {prepared.path} has no features to train on")
    labels = torch.from_numpy(np.array(prepared.labels, dtype=np.int64))
    splits = {name: torch.from_numpy(np.array(idx, dtype=np.int64)) for name, idx in (
        ("train", prepared.train_idx), ("val", prepared.val_idx), ("test", prepared.test_idx))}
    if splits["train"].numel() == 0:
        raise ValueError(f"prepared graph {prepared.path} has no training rows")
    splits["valid"] = splits["val"]
    # Only the split rows' logits are predicted (papers100M x0.3: 1.4% of its 23 GB of them).
    rows = torch.unique(torch.cat([splits["train"], splits["val"], splits["test"]]))

    def score(logits: Tensor, split: str) -> float:
        """Accuracy on ``split`` from the logits of ``rows``."""
        idx = splits[split]
        truth = labels[idx]
        keep = truth >= 0
        if not bool(keep.any()):
            return float("nan")
        picked = logits[torch.searchsorted(rows, idx)]
        return float((picked[keep].argmax(dim=1) == truth[keep]).double().mean())

    return _Inputs(prepared.name, prepared.features, prepared.adjacency, labels, splits["train"],
                   prepared.num_features, prepared.num_classes, score, rows)


def _non_negative(x: Tensor) -> bool:
    """Whether every stored feature is >= 0 (sparse: its stored values)."""
    values = x if x.layout == torch.strided else x.values()
    return bool((values >= 0).all())


def _check_trainable(graph: Graph) -> None:
    """Refuse, naming the graph, what would crash deep in a layer or train on nothing.

    Without nodes the layers have nothing to tile; without features ``in_channels`` would be 0;
    an empty ``train_idx`` gives a loss of nan and accuracies of nan, silently.
    """
    if graph.num_nodes == 0:
        raise ValueError(f"graph {graph.name!r} has no nodes")
    if graph.x is None or graph.y is None:
        raise ValueError(
            f"graph {graph.name!r} needs features and labels to be trained on"
        )
    if graph.num_features == 0:
        raise ValueError(f"graph {graph.name!r} has 0 features")
    if graph.train_idx.numel() == 0:
        raise ValueError(f"train_idx of graph {graph.name!r} is empty")


@torch.no_grad()
def _predict(model: WholeModelGCN, x: Tensor, adj_t: Tensor, rows: Tensor | None) -> Tensor:
    model.eval()
    return model(x, adj_t, rows=rows)


if __name__ == "__main__":  # ``python -m aires.train`` / ``torchrun -m aires.train``: aires train
    from aires.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
