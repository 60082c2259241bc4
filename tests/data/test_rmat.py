"""RMAT sampling: the graph is the first M distinct pairs of the candidate stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aires.data._rmat import RmatSampler

CPU = torch.device("cpu")


@pytest.mark.parametrize("n", [2, 3, 5, 1000, 1024, 1025, 4097])
def test_permute_is_a_bijection_of_range(n: int) -> None:
    sampler = RmatSampler(n, seed=3, device=CPU)
    out = sampler.permute(torch.arange(n))
    assert sorted(out.tolist()) == list(range(n))


def test_permute_depends_on_seed() -> None:
    ids = torch.arange(1000)
    a = RmatSampler(1000, seed=0, device=CPU).permute(ids)
    b = RmatSampler(1000, seed=1, device=CPU).permute(ids)
    assert not torch.equal(a, b)


def test_candidates_do_not_depend_on_batch_boundaries() -> None:
    sampler = RmatSampler(777, seed=5, device=CPU)
    keys, seqs = sampler.candidates(0, 3000)
    parts = [sampler.candidates(a, b) for a, b in ((0, 1), (1, 1234), (1234, 3000))]
    assert torch.equal(keys, torch.cat([p[0] for p in parts]))
    assert torch.equal(seqs, torch.cat([p[1] for p in parts]))


def test_candidates_are_canonical_pairs_in_range() -> None:
    n = 1000
    keys, seqs = RmatSampler(n, seed=0, device=CPU).candidates(0, 20_000)
    lo, hi = keys // n, keys % n
    assert bool((lo < hi).all()) and bool((hi < n).all())
    assert bool((torch.diff(seqs) > 0).all())


def _first_distinct(sampler: RmatSampler, m: int) -> set[int]:
    """The definition, computed naively: walk the stream, keep the first m distinct keys."""
    keys, _ = sampler.candidates(0, 400 * m)
    seen: dict[int, None] = {}
    for key in keys.tolist():
        seen.setdefault(key, None)
        if len(seen) == m:
            return set(seen)
    raise AssertionError("stream too short for the reference")


@pytest.mark.parametrize(
    ("n", "m", "chunk"), [(300, 2000, 1024), (300, 4000, 1 << 20), (5000, 3000, 1024)]
)
def test_select_equals_first_distinct_pairs_of_stream(
    tmp_path: Path, n: int, m: int, chunk: int
) -> None:
    sampler = RmatSampler(n, seed=11, device=CPU)
    got = torch.cat(list(sampler.select(m, workdir=tmp_path / "w", chunk_size=chunk))).tolist()
    assert len(got) == m
    assert set(got) == _first_distinct(RmatSampler(n, seed=11, device=CPU), m)


def test_select_tops_up_until_exact(tmp_path: Path) -> None:
    # 4000 of 44850 pairs on an RMAT-skewed 300-node grid: duplicates force extra rounds.
    sampler = RmatSampler(300, seed=0, device=CPU)
    got = torch.cat(list(sampler.select(4000, workdir=tmp_path, chunk_size=1024)))
    assert sampler.stats["rounds"] >= 2
    assert len(np.unique(got.numpy())) == 4000


def test_select_gives_up_when_unreachable(tmp_path: Path) -> None:
    sampler = RmatSampler(16, seed=0, device=CPU)
    with pytest.raises(RuntimeError, match="distinct edges"):
        list(sampler.select(119, workdir=tmp_path, chunk_size=1024))
