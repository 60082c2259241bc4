"""Dropping a method's files from the page cache before an epoch, and saying whether it took."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import pytest

from bench.methods import cold
from bench.methods.cold import drop_page_cache


def _no_global_drop(monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = builtins.open

    def refusing(path: object, *args: object, **kwargs: object) -> object:
        if str(path) == "/proc/sys/vm/drop_caches":
            raise PermissionError("not root")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(cold, "open", refusing, raising=False)


def test_every_file_below_a_directory_is_advised_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    files = [tmp_path / "a.bin", tmp_path / "sub" / "b.bin"]
    for f in files:
        f.write_bytes(b"x" * 8192)
    advised: list[int] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, *a: advised.append(a[-1]))
    _no_global_drop(monkeypatch)
    assert drop_page_cache([tmp_path]) is True
    assert advised == [os.POSIX_FADV_DONTNEED] * 2


def test_a_drop_that_did_not_take_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.bin").write_bytes(b"x")

    def failing(*args: object) -> None:
        raise OSError("not supported")

    monkeypatch.setattr(os, "posix_fadvise", failing)
    _no_global_drop(monkeypatch)
    assert drop_page_cache([tmp_path / "a.bin"]) is False


def test_without_system_only_the_files_are_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``system=False`` never touches the whole cache (the libraries' code lives there)."""
    (tmp_path / "a.bin").write_bytes(b"x" * 8192)
    opened: list[str] = []
    real_open = builtins.open
    monkeypatch.setattr(cold, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(
        p, *a, **k), raising=False)
    monkeypatch.setattr(os, "sync", lambda: opened.append("sync"))
    assert drop_page_cache([tmp_path], system=False) is True
    assert opened == []
