"""The ``aires`` command: train, tile and data, run in-process through ``main(argv)``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from aires.cli import build_parser, main


@pytest.fixture
def graphs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Synthetic graphs are generated into this test's directory."""
    monkeypatch.setenv("AIRES_CACHE", str(tmp_path / "graphs"))
    return tmp_path


def test_train_tiny_synthetic(graphs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = graphs / "result.json"
    code = main(
        [
            "train",
            "--dataset",
            "tiny",
            "--epochs",
            "3",
            "--hidden",
            "8",
            "--device",
            "cpu",
            "--tile-bytes",
            "16KiB",
            "--gpu-budget",
            "1MiB",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "ms per epoch" in printed
    record = json.loads(out.read_text())
    assert len(record["history"]) == 3 and 0 <= record["test_accuracy"] <= 1
    assert record["args"]["tile_bytes"] == 16 * 1024
    # The set-up's steps, part of the time to the first epoch.
    assert set(record["setup_steps_s"]) == {"plan", "arenas", "adjacency", "features"}
    assert 0 < sum(record["setup_steps_s"].values()) < record["ready_seconds"]


def test_train_synthetic_prefix_and_scale(
    graphs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "train",
            "--dataset",
            "synthetic:tiny",
            "--scale",
            "0.5",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0 and "tiny-x0.5" in capsys.readouterr().out


def test_train_cora(capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped Cora, with no --root and nothing outside the package."""
    code = main(
        [
            "train",
            "--dataset",
            "cora",
            "--epochs",
            "2",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0 and capsys.readouterr().out.startswith("cora: test accuracy")


def test_tile_generated_graph(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "tile",
            "--nodes",
            "2000",
            "--degree",
            "8",
            "--tile-bytes",
            "8KiB",
            "--out",
            str(tmp_path / "store"),
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shape"] == [2000, 2000] and summary["tiles"] > 1
    assert summary["tile_bytes"] == 8192 and summary["per_tile"]["bytes"]["max"] <= 8192
    assert (tmp_path / "store").is_dir()


def test_tile_given_matrix_normalised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    upper = sp.random(
        300, 300, density=0.02, random_state=rng, format="csr", dtype=np.float32
    )
    adjacency = (upper + upper.T).tocsr()
    adjacency.setdiag(0)
    adjacency.eliminate_zeros()
    path = tmp_path / "a.npz"
    sp.save_npz(path, adjacency)
    assert (
        main(["tile", "--matrix", str(path), "--normalize", "--tile-bytes", "4KiB"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["shape"] == [300, 300] and summary["tiles"] > 1
    assert summary["nnz"] == adjacency.nnz + 300  # a self loop on every node


def test_data_subcommand_is_wired(
    graphs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "data",
            "generate",
            "--preset",
            "tiny",
            "--out",
            str(graphs / "g"),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0
    assert main(["data", "describe", str(graphs / "g")]) == 0
    assert "tiny" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--dataset", "tiny", "--gpu-budget", "lots"], "--gpu-budget"),
        (["train", "--dataset", "tiny", "--epochs", "0"], "--epochs"),
        (["train"], "--dataset"),
        (["tile", "--tile-bytes", "-1"], "--tile-bytes"),
        ([], "command"),
    ],
)
def test_bad_arguments_exit_with_usage(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_parser_lists_the_subcommands() -> None:
    help_text = build_parser().format_help()
    assert all(command in help_text for command in ("train", "tile", "data"))
