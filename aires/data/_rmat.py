"""RMAT (Kronecker) edge sampling with an exact number of distinct undirected edges, out of core.

The graph is defined as a stream, independent of how it is computed: candidate ``s`` (for
``s = 0, 1, 2, ...``) is an RMAT edge drawn from counter-based random numbers (see
:mod:`aires.data._splitmix`); candidates with an endpoint ``>= N`` (the RMAT grid is the next
power of two) or a self loop are dropped; the endpoints are relabelled by a seeded permutation of
``[0, N)`` (so hubs are spread over the id range, as in Graph500) and ordered ``lo < hi``. The
graph is **the first ``M`` distinct pairs of that stream**. Generating more candidates than
needed, in chunks of any size, on the CPU or the GPU, gives the same graph.

Out of core: candidates go as ``(key = lo * N + hi, s)`` records to bucket files on disk (bucket =
``key mod B``); each bucket is deduplicated alone (a stable sort keeps the first occurrence), more
candidates are appended ("top-up rounds") until ``M`` distinct pairs exist, and a histogram of
first occurrences finds the cut-off ``T`` that keeps exactly ``M``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from aires.data._external_sort import BucketFiles
from aires.data._splitmix import hash64, stream_key
from aires.progress import progress_bar

__all__ = ["GRAPH500", "RmatSampler"]

#: Graph500's Kronecker initiator probabilities (a, b, c, d).
GRAPH500 = (0.57, 0.19, 0.19, 0.05)

# Candidates drawn per kernel sweep: bounds the temporaries (about 100 bytes per candidate).
_BATCH = {"cpu": 1 << 22, "cuda": 1 << 24}
_PILOT = 1 << 16
_MAX_OVERSAMPLE = 200  # give up when the stream needs this many candidates per wanted edge
_HIST_BINS = 1 << 20


class RmatSampler:
    """Draws the RMAT candidate stream for ``num_nodes`` nodes and selects exact edge sets.

    Args:
        num_nodes: ``N`` (``2 <= N < 2**31``).
        seed: the random seed.
        device: where random numbers are drawn and buckets sorted.
        probabilities: ``(a, b, c, d)``, quantised to multiples of 2**-16.
    """

    def __init__(
        self,
        num_nodes: int,
        seed: int,
        *,
        device: torch.device,
        probabilities: tuple[float, float, float, float] = GRAPH500,
    ) -> None:
        self.num_nodes = num_nodes
        self.device = device
        self.bits = max(1, (num_nodes - 1).bit_length())
        self.groups = math.ceil(self.bits / 4)
        a, b, c, _ = probabilities
        self._thresholds = (round(a * 65536), round((a + b) * 65536), round((a + b + c) * 65536))
        self._edge_key = stream_key(seed, "rmat-edges")
        mask = (1 << self.bits) - 1
        self._perm_rounds = [
            (
                stream_key(seed, f"rmat-perm-mul-{i}") & 0x7FFFFFFF | 1,
                stream_key(seed, f"rmat-perm-add-{i}") & mask,
            )
            for i in range(3)
        ]
        self._shifts = torch.tensor([0, 16, 32, 48], device=device)
        self._levels = torch.arange(4 * self.groups, device=device).reshape(self.groups, 4)
        #: Filled by :meth:`select`: candidates drawn, rounds, acceptance rate.
        self.stats: dict[str, Any] = {}

    def permute(self, ids: torch.Tensor) -> torch.Tensor:
        """Relabel ids in ``[0, N)`` by a seeded permutation of ``[0, N)``.

        A bijection of ``[0, 2**bits)`` (odd multiply, xor-shift, add; three rounds) restricted
        to ``[0, N)`` by cycle walking: apply again while the result is ``>= N``.
        """
        out = self._mix(ids)
        todo = torch.nonzero(out >= self.num_nodes).squeeze(1)
        while todo.numel():
            out[todo] = self._mix(out[todo])
            todo = todo[out[todo] >= self.num_nodes]
        return out

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        mask = (1 << self.bits) - 1
        shift = (self.bits + 1) // 2
        for mul, add in self._perm_rounds:
            x = (x * mul) & mask
            x = x ^ (x >> shift)
            x = (x + add) & mask
        return x

    def candidates(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Accepted candidates among stream positions ``[start, stop)``.

        Returns:
            ``(keys, seqs)``: int64 ``lo * N + hi`` (``lo < hi``, permuted ids) and the stream
            position of each, in stream order.
        """
        seq = torch.arange(start, stop, device=self.device)
        u = torch.zeros_like(seq)
        v = torch.zeros_like(seq)
        ta, tab, tabc = self._thresholds
        for g in range(self.groups):
            levels = self._levels[g]
            keep = levels < self.bits
            r = (hash64(seq * self.groups + g, self._edge_key)[:, None] >> self._shifts) & 0xFFFF
            # Quadrant by r: a [0, ta), b [ta, tab), c [tab, tabc), d [tabc, 2**16).
            # Row bit = quadrant in {c, d}; column bit = quadrant in {b, d} = A ^ B ^ C.
            above_a, above_b, above_c = r >= ta, r >= tab, r >= tabc
            row_bits = (above_b & keep).to(torch.int64) << levels
            col_bits = ((above_a ^ above_b ^ above_c) & keep).to(torch.int64) << levels
            u += row_bits.sum(1)
            v += col_bits.sum(1)
        n = self.num_nodes
        ok = (u < n) & (v < n) & (u != v)
        u, v, seq = self.permute(u[ok]), self.permute(v[ok]), seq[ok]
        return torch.minimum(u, v) * n + torch.maximum(u, v), seq

    def select(
        self,
        num_edges: int,
        *,
        workdir: Path,
        chunk_size: int,
        progress: bool = False,
    ) -> Iterator[torch.Tensor]:
        """The first ``num_edges`` distinct pairs of the stream, bucket by bucket.

        Args:
            num_edges: ``M``.
            workdir: directory for the bucket files (deleted as they are consumed).
            chunk_size: about how many candidates one bucket holds (the memory bound).
            progress: show progress bars.

        Yields:
            int64 keys ``lo * N + hi`` on ``device``, in no particular order; ``M`` in all.

        Raises:
            RuntimeError: the stream does not reach ``M`` distinct pairs in a reasonable number of
                candidates (``M`` close to the number of pairs RMAT can reach).
        """
        batch = min(chunk_size, _BATCH.get(self.device.type, 1 << 22))
        accepted = self.candidates(0, _PILOT)[0].numel() / _PILOT
        if accepted == 0:
            raise RuntimeError(f"RMAT on {self.num_nodes} nodes accepted no candidate edge")
        target = math.ceil(num_edges / accepted * 1.15) + 1024
        buckets = BucketFiles(workdir, max(1, math.ceil(target / chunk_size)), 2, prefix="pairs")
        generated = distinct = rounds = 0
        bar = progress_bar(
            total=num_edges, desc="sample edges", unit="edge", disable=not progress, leave=False
        )
        while True:
            rounds += 1
            for start in range(generated, target, batch):
                keys, seqs = self.candidates(start, min(target, start + batch))
                buckets.append(keys % buckets.count, torch.stack([keys, seqs], 1))
            drawn, generated = target - generated, target
            before, distinct = distinct, sum(self._dedupe(buckets, b) for b in range(buckets.count))
            bar.update(min(distinct, num_edges) - bar.n)
            if distinct >= num_edges:
                break
            rate = (distinct - before) / drawn
            if rate == 0 or generated > _MAX_OVERSAMPLE * num_edges:
                raise RuntimeError(
                    f"RMAT on {self.num_nodes} nodes found only {distinct} distinct edges of "
                    f"{num_edges} wanted after {generated} candidates; ask for fewer edges"
                )
            target = generated + math.ceil((num_edges - distinct) / rate * 1.25) + 1024
        bar.close()
        self.stats = {"candidates": generated, "rounds": rounds, "acceptance": accepted}
        cutoff = self._cutoff(buckets, num_edges, generated) if distinct > num_edges else generated
        for b in range(buckets.count):
            records = torch.from_numpy(buckets.read(b)).to(self.device)
            buckets.remove(b)
            yield records[records[:, 1] <= cutoff, 0]

    def _dedupe(self, buckets: BucketFiles, b: int) -> int:
        """Keep the first occurrence of each key in bucket ``b``; returns how many remain."""
        records = torch.from_numpy(buckets.read(b)).to(self.device)
        records = records[torch.sort(records[:, 0], stable=True).indices]
        first = torch.ones(len(records), dtype=torch.bool, device=self.device)
        first[1:] = records[1:, 0] != records[:-1, 0]
        records = records[first]
        buckets.replace(b, records.cpu().numpy())
        return len(records)

    def _cutoff(self, buckets: BucketFiles, num_edges: int, generated: int) -> int:
        """Stream position ``T`` such that exactly ``num_edges`` first occurrences are ``<= T``."""
        bins = min(generated, _HIST_BINS)
        width = -(-generated // bins)
        hist = torch.zeros(bins, dtype=torch.int64, device=self.device)
        for b in range(buckets.count):
            seqs = torch.from_numpy(buckets.read(b)[:, 1]).to(self.device)
            hist += torch.bincount(seqs // width, minlength=bins)
        cum = torch.cumsum(hist, 0).cpu()
        cut_bin = int(torch.searchsorted(cum, num_edges))
        need = num_edges - (int(cum[cut_bin - 1]) if cut_bin else 0)
        lo, hi = cut_bin * width, (cut_bin + 1) * width
        inside = []
        for b in range(buckets.count):
            seqs = torch.from_numpy(buckets.read(b)[:, 1])
            inside.append(seqs[(seqs >= lo) & (seqs < hi)])
        return int(torch.sort(torch.cat(inside)).values[need - 1])
