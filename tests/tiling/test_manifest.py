"""The JSON manifest: round trip, version and path checks, inconsistent tiles named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aires.tiling._manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, load_manifest
from aires.tiling.tile import TileInfo


def sample() -> Manifest:
    """Rows 0-2 in one tile, then row 3 split over two partial tiles."""
    return Manifest(
        shape=(4, 7),
        nnz=7,
        index_dtype=np.dtype("<i4"),
        value_dtype=np.dtype("<f4"),
        alignment=4096,
        tile_bytes=8192,
        symmetric=None,
        data_file="tiles.bin",
        data_bytes=12288,
        tiles=[
            TileInfo(0, 0, 3, 4, 0, 4096, 1, False),
            TileInfo(1, 3, 4, 2, 4096, 4096, 2**32 - 1, True),
            TileInfo(2, 3, 4, 1, 8192, 4096, 3, True),
        ],
        extra={"note": "x"},
    )


def write(store: Path, obj: dict | bytes) -> None:
    store.mkdir(exist_ok=True)
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    (store / MANIFEST_NAME).write_bytes(raw)


def test_round_trip(tmp_path: Path) -> None:
    manifest = sample()
    write(tmp_path, manifest.to_json())
    loaded = load_manifest(tmp_path)
    assert loaded == manifest
    assert json.loads((tmp_path / MANIFEST_NAME).read_bytes())["version"] == FORMAT_VERSION


def good() -> dict:
    return json.loads(sample().to_json())


def test_unknown_version_is_named(tmp_path: Path) -> None:
    write(tmp_path, {**good(), "version": 99})
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        load_manifest(tmp_path)


def test_missing_manifest_and_store(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="manifest missing"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    "name", ["../tiles.bin", "sub/tiles.bin", "..", ".", "", "/etc/passwd", "a\\b"]
)
def test_data_file_must_stay_inside_the_store(tmp_path: Path, name: str) -> None:
    write(tmp_path, {**good(), "data_file": name})
    with pytest.raises(ValueError, match="data_file must be a plain file name"):
        load_manifest(tmp_path)


def test_not_json_and_wrong_format(tmp_path: Path) -> None:
    write(tmp_path, b"{not json")
    with pytest.raises(ValueError, match="not a valid JSON manifest"):
        load_manifest(tmp_path)
    write(tmp_path, {"format": "something else"})
    with pytest.raises(ValueError, match="not an AIRES tile store manifest"):
        load_manifest(tmp_path)
    obj = good()
    del obj["nnz"]
    write(tmp_path, obj)
    with pytest.raises(ValueError, match="malformed manifest"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    ("tile", "change", "message"),
    [
        (1, {"offset": 4000}, "tile 1: offset or nbytes not a multiple of alignment"),
        (0, {"nbytes": 12288}, "tile 0: nbytes larger than tile_bytes"),
        (2, {"offset": 12288}, "tile 2: not right after the previous tile"),
        (1, {"row_start": 2}, "tile 1: partial tile holding more than one row"),
        (0, {"row_stop": 0}, "tile 0: row range empty or reversed"),
        (2, {"partial": False}, "tile 2: rows not continuing"),
        (1, {"checksum": 2**32}, "tile 1: negative nnz or checksum out of range"),
        (0, {"nnz": 5}, "tiles cover 4 rows and 8 nonzeros, but the matrix has 4 rows and 7"),
    ],
)
def test_inconsistent_tiles_are_named(
    tmp_path: Path, tile: int, change: dict, message: str
) -> None:
    obj = good()
    obj["tiles"][tile].update(change)
    write(tmp_path, obj)
    with pytest.raises(ValueError, match=message):
        load_manifest(tmp_path)
