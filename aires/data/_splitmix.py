"""Counter-based random numbers: the value at counter ``i`` is a pure function of (key, i).

Synthetic graphs draw every random number this way (SplitMix64's finaliser applied to
``key + i * golden``) instead of from a stateful generator, for three reasons: a chunk of edges
or feature rows can be produced without producing the ones before it, so chunked generation
equals one-shot generation by construction; the same integer operations run on the CPU and on a
CUDA GPU with identical results, so the device does not change the graph; and nothing larger
than one chunk is ever held.

All arithmetic is on ``torch.int64`` with wrap-around multiplication (the bits equal SplitMix64's
``uint64`` arithmetic); logical right shifts are arithmetic shifts followed by a mask.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["stream_key", "hash64", "uniform"]

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB
_INV_2_24 = 1.0 / (1 << 24)


def stream_key(seed: int, stream: str) -> int:
    """A signed 64-bit key for one named random stream of one seed.

    Streams (edges, permutation, features, ...) get independent keys so that changing, say, the
    feature density does not change the edges.
    """
    digest = hashlib.sha256(f"aires:{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def hash64(counter: torch.Tensor, key: int) -> torch.Tensor:
    """SplitMix64 output for each entry of ``counter`` (int64) under ``key``; int64, any bits."""
    x = counter * _GOLDEN + key
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def uniform(counter: torch.Tensor, key: int) -> torch.Tensor:
    """Uniform float32 in ``[0, 1)`` on a 2**-24 grid (exact in float32, so device-independent)."""
    bits = (hash64(counter, key) >> 40) & ((1 << 24) - 1)
    return bits.to(torch.float32) * _INV_2_24
