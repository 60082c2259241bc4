"""The versioned JSON manifest of a tile store, and its validation on load.

Layout of a store directory::

    <store>/manifest.json   this file's format (FORMAT_VERSION)
    <store>/tiles.bin       the tiles, back to back at multiples of ``alignment``

The manifest holds no timestamp, so building the same matrix with the same settings gives the
same manifest bytes (a transposed store records the CRC-32 of its source's manifest to notice
when the source was rebuilt).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aires.tiling._layout import INDEX_DTYPES, VALUE_DTYPES
from aires.tiling.tile import TileInfo

FORMAT = "aires-tile-store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DATA_NAME = "tiles.bin"
CHECKSUM = "crc32"

_TILE_FIELDS = ("row_start", "row_stop", "nnz", "offset", "nbytes", "checksum", "partial")


@dataclass(frozen=True)
class Manifest:
    """Everything a store directory says about itself; ``extra`` carries optional metadata."""

    shape: tuple[int, int]
    nnz: int
    index_dtype: np.dtype
    value_dtype: np.dtype
    alignment: int
    tile_bytes: int
    symmetric: bool | None
    data_file: str
    data_bytes: int
    tiles: list[TileInfo]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """The manifest as UTF-8 JSON, one line per tile so a person can read it."""
        head = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "shape": list(self.shape),
            "nnz": self.nnz,
            "index_dtype": self.index_dtype.str,
            "value_dtype": self.value_dtype.str,
            "alignment": self.alignment,
            "tile_bytes": self.tile_bytes,
            "symmetric": self.symmetric,
            "checksum": CHECKSUM,
            "data_file": self.data_file,
            "data_bytes": self.data_bytes,
            "extra": self.extra,
        }
        tiles = ",\n    ".join(
            json.dumps({name: getattr(t, name) for name in _TILE_FIELDS}) for t in self.tiles
        )
        text = json.dumps(head, indent=2)[:-2] + f',\n  "tiles": [\n    {tiles}\n  ]\n}}\n'
        return text.encode()


def load_manifest(store: Path) -> Manifest:
    """Read and check ``<store>/manifest.json`` (not yet against the data file).

    Raises:
        FileNotFoundError: ``store`` or its manifest is missing.
        ValueError: the manifest is not valid JSON, has an unknown format version, names a
            data file outside the store, or describes tiles that are not a valid store.
    """
    path = store / MANIFEST_NAME
    if not store.is_dir():
        raise FileNotFoundError(f"no tile store at {store}: not a directory")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: manifest missing, so {store} is not a (complete) tile store"
        )
    try:
        obj = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a valid JSON manifest ({error})") from error
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path}: not an AIRES tile store manifest (format {FORMAT!r} expected)")
    if obj.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: tile store format version {obj.get('version')!r} is not supported "
            f"(this aires reads version {FORMAT_VERSION}); rebuild the store"
        )
    try:
        return _parse(obj, path)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: malformed manifest ({type(error).__name__}: {error})") from error


def _parse(obj: dict[str, Any], path: Path) -> Manifest:
    if obj["checksum"] != CHECKSUM:
        raise ValueError(f"{path}: unknown checksum {obj['checksum']!r} ({CHECKSUM!r} expected)")
    data_file = obj["data_file"]
    if (
        not isinstance(data_file, str)
        or data_file in ("", ".", "..")
        or "/" in data_file
        or "\\" in data_file
        or (os.altsep is not None and os.altsep in data_file)
        or "\0" in data_file
    ):
        raise ValueError(
            f"{path}: data_file must be a plain file name inside the store, got {data_file!r}"
        )
    index_dtype, value_dtype = np.dtype(obj["index_dtype"]), np.dtype(obj["value_dtype"])
    if index_dtype not in INDEX_DTYPES or value_dtype not in VALUE_DTYPES:
        raise ValueError(f"{path}: unsupported dtypes {index_dtype} / {value_dtype}")
    shape = tuple(int(s) for s in obj["shape"])
    symmetric = obj["symmetric"]
    if len(shape) != 2 or min(shape) < 0 or symmetric not in (None, True, False):
        raise ValueError(f"{path}: bad shape {obj['shape']!r} or symmetric {symmetric!r}")
    alignment, tile_bytes = int(obj["alignment"]), int(obj["tile_bytes"])
    if alignment <= 0 or alignment & (alignment - 1) or tile_bytes < alignment:
        raise ValueError(f"{path}: bad alignment {alignment} or tile_bytes {tile_bytes}")
    columns = {name: [t[name] for t in obj["tiles"]] for name in _TILE_FIELDS}
    try:
        arrays = {name: np.asarray(columns[name], dtype=np.int64) for name in _TILE_FIELDS}
    except (ValueError, OverflowError) as error:
        raise ValueError(f"{path}: malformed tile entries ({error})") from error
    manifest = Manifest(
        shape=(shape[0], shape[1]),
        nnz=int(obj["nnz"]),
        index_dtype=index_dtype,
        value_dtype=value_dtype,
        alignment=alignment,
        tile_bytes=tile_bytes,
        symmetric=symmetric,
        data_file=data_file,
        data_bytes=int(obj["data_bytes"]),
        tiles=[
            TileInfo(
                i, *(int(columns[n][i]) for n in _TILE_FIELDS[:-1]), bool(columns["partial"][i])
            )
            for i in range(len(obj["tiles"]))
        ],
        extra=dict(obj.get("extra") or {}),
    )
    _check_tiles(manifest, arrays, path)
    return manifest


def _check_tiles(manifest: Manifest, t: dict[str, np.ndarray], path: Path) -> None:
    """Tiles must be aligned, fit, sit back to back, cover the rows in order and sum to nnz."""
    n = len(manifest.tiles)
    problems = {
        "offset or nbytes not a multiple of alignment": (t["offset"] % manifest.alignment != 0)
        | (t["nbytes"] % manifest.alignment != 0),
        "nbytes larger than tile_bytes": t["nbytes"] > manifest.tile_bytes,
        "not right after the previous tile": t["offset"]
        != np.concatenate(([0], (t["offset"] + t["nbytes"])[:-1])),
        "row range empty or reversed": t["row_stop"] <= t["row_start"],
        "partial tile holding more than one row": (t["partial"] != 0)
        & (t["row_stop"] != t["row_start"] + 1),
        "negative nnz or checksum out of range": (t["nnz"] < 0)
        | (t["checksum"] < 0)
        | (t["checksum"] >= 2**32),
    }
    # Consecutive tiles continue the row range, except pieces of one split row repeat it.
    follows = t["row_start"][1:] == t["row_stop"][:-1]
    same_hub = (
        (t["partial"][1:] != 0)
        & (t["partial"][:-1] != 0)
        & (t["row_start"][1:] == t["row_start"][:-1])
    )
    problems["rows not continuing the previous tile"] = np.concatenate(
        (t["row_start"][:1] != 0, ~(follows | same_hub))
    )
    for what, bad in problems.items():
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path}: tile {i}: {what}")
    rows_covered = int(t["row_stop"][-1]) if n else 0
    data_bytes = int(t["offset"][-1] + t["nbytes"][-1]) if n else 0
    if rows_covered != manifest.shape[0] or int(t["nnz"].sum()) != manifest.nnz:
        raise ValueError(
            f"{path}: tiles cover {rows_covered} rows and {int(t['nnz'].sum())} nonzeros, "
            f"but the matrix has {manifest.shape[0]} rows and {manifest.nnz} nonzeros"
        )
    if data_bytes != manifest.data_bytes:
        raise ValueError(
            f"{path}: tiles end at byte {data_bytes}, data_bytes says {manifest.data_bytes}"
        )
