"""Counter-based random numbers: bit-exact SplitMix64, on int64 tensors."""

from __future__ import annotations

import torch

from aires.data._splitmix import hash64, stream_key, uniform

_M64 = (1 << 64) - 1


def _splitmix64_reference(counter: int, key: int) -> int:
    """SplitMix64 on Python ints (unbounded, masked to 64 bits): the independent reference."""
    z = (counter * 0x9E3779B97F4A7C15 + key) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def test_hash64_matches_uint64_reference() -> None:
    key = stream_key(7, "test")
    counters = [0, 1, 2, 12345, 2**31 - 1, 2**40 + 3, 2**62]
    got = hash64(torch.tensor(counters, dtype=torch.int64), key)
    for counter, value in zip(counters, got.tolist()):
        assert value & _M64 == _splitmix64_reference(counter, key & _M64)


def test_uniform_range_and_mean() -> None:
    u = uniform(torch.arange(100_000), stream_key(0, "u"))
    assert u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01


def test_stream_keys_differ_by_seed_and_stream() -> None:
    keys = {stream_key(s, name) for s in (0, 1) for name in ("a", "b")}
    assert len(keys) == 4
    assert stream_key(3, "a") == stream_key(3, "a")
