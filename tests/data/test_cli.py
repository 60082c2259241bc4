"""`aires data generate | convert | describe`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from aires.data import open_graph
from aires.data.cli import add_parser, main


def test_generate_with_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "tiny", tmp_path / "r" / "report.json"
    argv = [
        "generate",
        "--preset",
        "tiny",
        "--seed",
        "2",
        "--out",
        str(out),
        "--report",
        str(report),
        "--quiet",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out.absolute())
    data = json.loads(report.read_text())
    assert (data["nodes"], data["undirected_edges"], data["edges"]) == (1000, 8000, 16000)
    assert data["generated"] is True and data["seconds"] > 0
    assert set(data["generation"]["phase_seconds"]) == {"edges", "csr", "labels", "features"}
    assert data["bytes_on_disk"] > data["bytes"]["adjacency"] > 0
    assert main(argv) == 0  # the same graph again: reused, not regenerated
    assert json.loads(report.read_text())["generated"] is False


def test_generate_sparse_into_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "generate",
                "--preset",
                "tiny",
                "--features",
                "sparse",
                "--feature-density",
                "0.25",
                "--cache-dir",
                str(tmp_path),
                "--chunk-size",
                "2048",
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    graph = open_graph(capsys.readouterr().out.strip())
    assert graph.sparse_features and Path(graph.provenance["path"]).parent == tmp_path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "nope"], "valid presets: tiny, arxiv, products, papers100M"),
        (["--preset", "tiny", "--scale", "-1"], "scale must be a positive"),
        (["--preset", "tiny", "--feature-density", "0.1"], "--features sparse only"),
    ],
)
def test_generate_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["generate", *argv, "--cache-dir", str(tmp_path), "--quiet"]) == 1
    assert message in capsys.readouterr().err


def test_convert_edge_list_and_describe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "e.txt").write_text("0 1\n1 2\n2 0\n3 3\n")
    assert main(["convert", str(tmp_path / "e.txt"), "--out", str(tmp_path / "g"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["describe", str(tmp_path / "g"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["nodes"], info["edges"], info["undirected_edges"], info["self_loops"]) == (
        4,
        7,
        4,
        1,
    )
    assert info["degree"] == {"min": 1, "mean": 1.75, "max": 2, "p99": 2}


def test_convert_npz_and_describe_text(
    tmp_path: Path, planetoid_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["convert", str(planetoid_dir / "cora.npz"), "--out", str(tmp_path / "cora")]) == 0
    capsys.readouterr()
    assert main(["describe", str(tmp_path / "cora")]) == 0
    text = capsys.readouterr().out
    assert "2,708" in text and "10,556 stored (5,278 undirected)" in text and "p99" in text
    assert "1,433 sparse" in text


def test_describe_and_convert_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", str(tmp_path / "missing")]) == 1
    assert "cannot load" in capsys.readouterr().err
    assert (
        main(["convert", "ogbn-products", "--root", str(tmp_path), "--out", str(tmp_path / "o")])
        == 1
    )
    assert "AIRES never downloads" in capsys.readouterr().err


def test_add_parser_registers_data_command() -> None:
    parser = argparse.ArgumentParser(prog="aires")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "describe", "cora", "--json"])
    assert args.command == "data" and args.graph == "cora" and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "generate"])  # --preset is required


def test_convert_ogb_datasets(
    tmp_path: Path,
    ogb_saved: tuple[dict, Path],
    arxiv_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["convert", str(ogb_saved[1]), "--out", str(tmp_path / "toy"), "--quiet"]) == 0
    toy = open_graph(tmp_path / "toy")
    assert toy.provenance["ogb"]["name"] == "ogbn-toy" and toy.symmetric is True
    argv = ["convert", "ogbn-arxiv", "--root", str(arxiv_root), "--out", str(tmp_path / "arxiv")]
    assert main([*argv, "--directed", "--quiet"]) == 0
    assert open_graph(tmp_path / "arxiv").symmetric is None
    capsys.readouterr()
    assert main(["describe", "ogbn-arxiv", "--root", str(arxiv_root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nodes"] == 120
