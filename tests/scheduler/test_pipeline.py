"""The scheduler against scipy: every tier and mix of tiers, both products, both outputs."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from aires.scheduler import RunStats, Scheduler, spmm_reserve
from aires.tiling import TileCorruptError, TileStore

from .stores import bounces, flip_byte, hub_matrix, reserve_of, spgemm_budgets, tier_budgets

F = 6
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# (resident, host) tile counts; the rest of the tiles stay on disk. "all" = every tile.
TIERS = {
    "resident": ("all", 0),
    "host": (0, "all"),
    "disk": (0, 0),
    "host+disk": (0, 5),
    "all-three": (4, 5),
    "resident+disk": (4, 0),
}


def dense_x(
    n: int, f: int = F, dtype: torch.dtype = torch.float64, device: str = "cpu"
) -> torch.Tensor:
    rng = np.random.default_rng(1)
    return torch.tensor(rng.standard_normal((n, f)), dtype=dtype, device=device)


def sparse_x(n: int, f: int = F, density: float = 0.3, device: str = "cpu") -> torch.Tensor:
    m = sp.random_array((n, f), density=density, random_state=np.random.default_rng(2))
    return torch.tensor(m.toarray()).to_sparse_csr().to(device)


def tier_counts(store: TileStore, tier: str) -> tuple[int, int]:
    """``(resident, host)`` tile counts of ``tier`` for ``store``."""
    n = len(store)
    resident, host = TIERS[tier]
    resident = n if resident == "all" else resident
    return resident, n - resident if host == "all" else host


def scheduler_for(
    store: TileStore,
    tier: str,
    *,
    out: str | None = None,
    device: str = "cpu",
    spgemm_x: torch.Tensor | None = None,
    **options: bool,
) -> Scheduler:
    resident, host = tier_counts(store, tier)
    if spgemm_x is not None:
        gpu, host_bytes = spgemm_budgets(store, spgemm_x, resident=resident, host=host, out=out)
    else:
        reserve = reserve_of(store, F, out, device)
        gpu, host_bytes = tier_budgets(
            store,
            resident=resident,
            host=host,
            reserve=reserve,
            bounce=bounces(store, device),
            device=device,
        )
    return Scheduler(
        store, gpu_budget=gpu, host_budget=host_bytes, device=device, dual=False, **options
    )


@pytest.fixture
def store(make_store: Callable[..., TileStore]) -> TileStore:
    s = make_store()
    assert any(t.partial for t in s.tiles), "the fixture must split a hub row over tiles"
    assert len(s) > 20
    return s


def test_fixture_has_empty_rows() -> None:
    a = hub_matrix()
    assert (np.diff(a.indptr)[200:220] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out", [None, "host"])
@pytest.mark.parametrize("tier", list(TIERS))
def test_spmm_matches_scipy_on_every_tier(
    store: TileStore, tier: str, out: str | None, device: str
) -> None:
    a = hub_matrix()
    sched = scheduler_for(store, tier, out=out, device=device)
    x = dense_x(a.shape[1], device=device)
    y = sched.spmm(x, out=out)
    assert y.device.type == ("cpu" if out == "host" else device)
    np.testing.assert_allclose(y.cpu().numpy(), a @ x.cpu().numpy(), rtol=1e-12, atol=1e-12)
    stats = sched.stats
    resident, host = tier_counts(store, tier)
    assert (stats.tiles_resident, stats.tiles_h2d) == (resident, host)
    assert stats.tiles_disk == len(store) - resident - host
    assert stats.bytes_moved == sum(t.nbytes for t in store.tiles)
    if out == "host":
        assert stats.bytes_d2h == y.numel() * y.element_size()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out", [None, "host"])
@pytest.mark.parametrize("tier", ["resident", "host", "disk", "all-three"])
def test_spgemm_matches_scipy_on_every_tier(
    store: TileStore, tier: str, out: str | None, device: str
) -> None:
    a = hub_matrix()
    x = sparse_x(a.shape[1], device=device)
    sched = scheduler_for(store, tier, out=out, device=device, spgemm_x=x)
    y = sched.spgemm(x, out=out)
    assert y.layout == torch.sparse_csr
    assert y.device.type == ("cpu" if out == "host" else device)
    expected = a @ x.cpu().to_dense().numpy()
    np.testing.assert_allclose(y.cpu().to_dense().numpy(), expected, rtol=1e-12, atol=1e-12)
    stats = sched.stats
    resident, host = tier_counts(store, tier)
    assert (stats.op, stats.tiles_resident, stats.tiles_h2d) == ("spgemm", resident, host)
    assert stats.bytes_moved == sum(t.nbytes for t in store.tiles)


@pytest.mark.parametrize("out", [None, "host"])
def test_spgemm_splits_tiles_under_a_small_workspace(
    make_store: Callable[..., TileStore], out: str | None
) -> None:
    a = hub_matrix()
    store = make_store(a)
    x = sparse_x(a.shape[1], f=40, density=0.9)
    probe = Scheduler(store, gpu_budget="1MiB", host_budget=0, device="cpu")
    # The same workspace either way: a result kept on the device adds only its own room.
    room = probe.spgemm_reserve(x) - probe.spgemm_reserve(x, out="host")
    budget = 400 * 1024 + (0 if out == "host" else room)
    sched = Scheduler(store, gpu_budget=budget, host_budget="1MiB", device="cpu")
    y = sched.spgemm(x, out=out)
    np.testing.assert_allclose(y.to_dense().numpy(), a @ x.to_dense().numpy(), rtol=1e-12)
    assert sched.stats.extra["pieces"] > len(store)
    assert sched.stats.peak_gpu_bytes <= budget


@pytest.mark.parametrize("device", DEVICES)
def test_spgemm_result_room_is_checked_before_any_work(
    store: TileStore, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = hub_matrix()
    x = sparse_x(a.shape[1], device=device)
    gpu, host = spgemm_budgets(store, x, resident=0, host=len(store), out="host")
    sched = Scheduler(store, gpu_budget=gpu, host_budget=host, device=device, dual=False)
    reads: list[int] = []
    original = store.read_bytes
    monkeypatch.setattr(
        store, "read_bytes", lambda i, out, **kw: reads.append(i) or original(i, out, **kw)
    )
    with pytest.raises(ValueError, match=r"the result's room .*out='host'"):
        sched.spgemm(x)
    assert reads == []
    y = sched.spgemm(x, out="host")
    expected = a @ x.cpu().to_dense().numpy()
    np.testing.assert_allclose(y.to_dense().numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out", [None, "host"])
@pytest.mark.parametrize("tier", ["resident", "host", "all-three"])
def test_spgemm_peak_stays_within_the_budget(
    store: TileStore, tier: str, out: str | None, device: str
) -> None:
    x = sparse_x(store.shape[1], device=device)
    sched = scheduler_for(store, tier, out=out, device=device, spgemm_x=x)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    y = sched.spgemm(x, out=out)
    assert sched.stats.peak_gpu_bytes <= sched.gpu_budget
    if device == "cuda":
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - base <= sched.gpu_budget
    del y


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_index_dtypes(make_store: Callable[..., TileStore], index_dtype: type) -> None:
    a = hub_matrix()
    store = make_store(a, index_dtype=index_dtype)
    assert store.index_dtype == np.dtype(index_dtype)
    sched = scheduler_for(store, "all-three")
    x = dense_x(a.shape[1])
    np.testing.assert_allclose(sched.spmm(x).numpy(), a @ x.numpy(), rtol=1e-12, atol=1e-12)
    xs = sparse_x(a.shape[1])
    sched = scheduler_for(store, "all-three", spgemm_x=xs)
    np.testing.assert_allclose(
        sched.spgemm(xs).to_dense().numpy(), a @ xs.to_dense().numpy(), rtol=1e-12, atol=1e-12
    )


def test_float32_store_and_input(make_store: Callable[..., TileStore]) -> None:
    a = hub_matrix()
    store = make_store(a, value_dtype=np.float32)
    sched = Scheduler(store, gpu_budget="64KiB", host_budget="16KiB", device="cpu")
    x = dense_x(a.shape[1], dtype=torch.float32)
    y = sched.spmm(x)
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), a @ x.double().numpy(), rtol=1e-4, atol=1e-4)


def test_float64_input_on_a_float32_store_casts_tiles(make_store: Callable[..., TileStore]) -> None:
    a = hub_matrix()
    store = make_store(a, value_dtype=np.float32)
    sched = Scheduler(store, gpu_budget="1MiB", host_budget="1MiB", device="cpu")
    x = dense_x(a.shape[1])
    y = sched.spmm(x)
    assert y.dtype == torch.float64
    a32 = a.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(y.numpy(), a32 @ x.numpy(), rtol=1e-12, atol=1e-12)


def test_non_square(make_store: Callable[..., TileStore]) -> None:
    a = hub_matrix(shape=(150, 700), empty=(100, 120))
    store = make_store(a)
    sched = Scheduler(store, gpu_budget="40KiB", host_budget="8KiB", device="cpu")
    x = dense_x(700, f=3)
    np.testing.assert_allclose(sched.spmm(x).numpy(), a @ x.numpy(), rtol=1e-12, atol=1e-12)


ABLATIONS = {
    "fresh": {"prealloc": False},
    "serial": {"overlap": False},
    "fresh-serial": {"prealloc": False, "overlap": False},
    "unchecked": {"checks": False},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ablation", list(ABLATIONS))
@pytest.mark.parametrize("tier", ["resident", "host+disk", "all-three"])
def test_ablations_match_scipy(store: TileStore, tier: str, ablation: str, device: str) -> None:
    a = hub_matrix()
    options = ABLATIONS[ablation]
    resident, host = tier_counts(store, tier)
    x = dense_x(a.shape[1], device=device)
    for out in (None, "host"):
        sched = scheduler_for(store, tier, out=out, device=device, **options)
        y = sched.spmm(x, out=out)
        np.testing.assert_allclose(y.cpu().numpy(), a @ x.cpu().numpy(), rtol=1e-12, atol=1e-12)
        stats = sched.stats
        assert (stats.tiles_resident, stats.tiles_h2d) == (resident, host)
        assert stats.tiles_disk == len(store) - resident - host
        assert stats.peak_gpu_bytes <= sched.gpu_budget
    xs = sparse_x(a.shape[1], device=device)
    sched = scheduler_for(store, tier, device=device, spgemm_x=xs, **options)
    expected = a @ xs.cpu().to_dense().numpy()
    got = sched.spgemm(xs).cpu().to_dense().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_serial_runs_every_tile_on_the_calling_thread(
    store: TileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    sched = scheduler_for(store, "all-three", overlap=False)
    x = dense_x(store.shape[1])
    sched.spmm(x)  # materialise (reads the resident and pinned tiles)
    threads: list[str] = []
    original = store.read_bytes
    monkeypatch.setattr(
        store,
        "read_bytes",
        lambda i, out, **kw: threads.append(threading.current_thread().name)
        or original(i, out, **kw),
    )
    np.testing.assert_allclose(sched.spmm(x).numpy(), hub_matrix() @ x.numpy(), rtol=1e-12)
    assert len(threads) == len(sched.placement.disk) > 0
    assert set(threads) == {threading.current_thread().name}


def test_fresh_slots_are_allocated_per_tile_and_never_cached(
    store: TileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sched = scheduler_for(store, "all-three", prealloc=False)
    x = dense_x(store.shape[1])
    sched.spmm(x)
    fresh = [0]
    original = sched._fresh_slot

    def counting() -> torch.Tensor:
        fresh[0] += 1
        return original()

    monkeypatch.setattr(sched, "_fresh_slot", counting)
    np.testing.assert_allclose(sched.spmm(x).numpy(), hub_matrix() @ x.numpy(), rtol=1e-12)
    p = sched.placement
    assert fresh[0] == len(p.host) + len(p.disk)
    assert sched._views == {}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tier", ["host", "host+disk", "all-three"])
def test_first_and_last_host_tiles_run_in_row_parts(
    store: TileStore, tier: str, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aires.scheduler.pipeline import HEAD_PARTS, TAIL_PARTS, TAIL_TILES
    from aires.scheduler.transfer import HostPath

    a = hub_matrix()
    sched = scheduler_for(store, tier, device=device)
    split: list[int] = []
    original = HostPath.load_parts

    def counting(
        self: HostPath, slot: torch.Tensor, src: torch.Tensor, parts: list[Any], *args: Any
    ) -> list[Any]:
        split.append(len(parts))
        return original(self, slot, src, parts, *args)

    monkeypatch.setattr(HostPath, "load_parts", counting)
    x = dense_x(a.shape[1], device=device)
    sched.spmm(x)  # the first call sizes the output reserve, which may re-place the tiles
    host = sched.placement.host
    assert len(host) > TAIL_TILES + 1  # a head, a middle tile copied whole, and a tail
    wanted = [
        (t, HEAD_PARTS if i == 0 else TAIL_PARTS)
        for i, t in enumerate(host)
        if i == 0 or i >= len(host) - TAIL_TILES
    ]
    expected = [
        n for t, n in wanted if t not in sched._group_of and store.tiles[t].n_rows >= n
    ]
    assert expected  # hub pieces and short tiles are copied whole; some tile splits
    if tier == "host":
        assert expected == [HEAD_PARTS] + [TAIL_PARTS] * TAIL_TILES
    # The first call after the memory is (re)allocated copies the head in parts; later calls
    # find the first tiles prefetched and split only the tail.
    sched.close()
    tail = [n for (t, n) in wanted[1:] if t not in sched._group_of and store.tiles[t].n_rows >= n]
    for want in (expected, tail, tail):
        split.clear()
        y = sched.spmm(x)
        np.testing.assert_allclose(y.cpu().numpy(), a @ x.cpu().numpy(), rtol=1e-12, atol=1e-12)
        assert split == want
        stats = sched.stats
        assert stats.tiles_h2d == len(host)
        assert stats.bytes_moved == sum(t.nbytes for t in store.tiles)
    split.clear()
    sched.spmm(x, out="host")  # write-back products are computed a tile at a time
    assert split == []


def test_option_types_are_checked(store: TileStore) -> None:
    for name in ("dual", "prealloc", "overlap", "checks"):
        with pytest.raises(TypeError, match=f"{name} must be a bool, got 1"):
            Scheduler(store, gpu_budget="1MiB", device="cpu", **{name: 1})


def test_dual_way_sends_pinned_tiles_over_disk_when_it_is_sooner(store: TileStore) -> None:
    a = hub_matrix()
    x = dense_x(a.shape[1])
    gpu, host = tier_budgets(store, resident=0, host=len(store), reserve=reserve_of(store, F))
    sched = Scheduler(
        store,
        gpu_budget=gpu + 2 * max(t.nbytes for t in store.tiles),
        host_budget=host,
        device="cpu",
        dual=True,
    )
    sched.spmm(x)  # materialise
    sched.dispatcher.rates["host"] = 1.0  # a host path this slow loses every tile it can
    y = sched.spmm(x)
    stats = sched.stats
    np.testing.assert_allclose(y.numpy(), a @ x.numpy(), rtol=1e-12, atol=1e-12)
    assert stats.tiles_stolen > 0 and stats.tiles_disk == stats.tiles_stolen
    assert stats.tiles_h2d + stats.tiles_disk == len(store)
    sched.dispatcher.rates["host"] = 1e30  # and this fast one keeps them all
    sched.spmm(x)
    assert sched.stats.tiles_stolen == 0 and sched.stats.tiles_h2d == len(store)


def test_an_idle_dual_path_starts_no_disk_worker_and_rates_persist(
    store: TileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the disk path cannot win the host queue's last tile, no worker runs (an open but
    idle dual path costs nothing); measured rates survive new memory."""
    a = hub_matrix()
    x = dense_x(a.shape[1])
    reserve = reserve_of(store, F)
    gpu, host = tier_budgets(store, resident=0, host=len(store), reserve=reserve)
    slot = max(t.nbytes for t in store.tiles)
    sched = Scheduler(
        store, gpu_budget=gpu + 2 * slot, host_budget=host, device="cpu", reserve_bytes=reserve
    )
    assert sched.placement.n_disk > 0 and not sched.placement.disk
    sched.dispatcher.smoothing = 1.0
    sched.dispatcher.update("disk", 1, 1.0)  # measured: 1 byte/s, slower than any host copy
    workers = []
    monkeypatch.setattr(sched, "_disk_worker", lambda *args: workers.append(args))
    y = sched.spmm(x)
    np.testing.assert_allclose(y.numpy(), a @ x.numpy(), rtol=1e-12, atol=1e-12)
    assert workers == [] and sched.stats.tiles_h2d == len(store)
    disk_rate = sched.dispatcher.rates["disk"]
    sched.close()
    sched.spmm(x)  # memory made again, the host rate primed again: the disk's is kept
    assert sched.dispatcher.rates["disk"] == disk_rate and workers == []


def test_both_paths_carry_tiles_when_both_hold_some(store: TileStore) -> None:
    sched = scheduler_for(store, "host+disk")
    sched.spmm(dense_x(store.shape[1]))
    stats = sched.stats
    assert stats.tiles_h2d > 0 and stats.tiles_disk > 0
    assert stats.bw_h2d > 0 and stats.bw_disk > 0


def test_stats_are_consistent(store: TileStore) -> None:
    sched = scheduler_for(store, "all-three")
    assert sched.stats is None
    sched.spmm(dense_x(store.shape[1]))
    stats = sched.stats
    assert isinstance(stats, RunStats)
    assert stats.io_mode == "cpu" and stats.op == "spmm" and stats.n_tiles == len(store)
    assert stats.bytes_resident + stats.bytes_h2d + stats.bytes_disk == stats.bytes_moved
    assert stats.bytes_moved == sum(t.nbytes for t in store.tiles)
    assert stats.t_total_s > 0 and stats.t_compute_s > 0 and stats.t_resident_s > 0
    assert stats.overlap_efficiency > 0
    assert stats.peak_gpu_bytes <= sched.gpu_budget
    d = stats.to_dict()
    assert d["bytes_moved"] == stats.bytes_moved and d["io_mode"] == "cpu"


def test_repeated_calls_keep_the_placement(store: TileStore) -> None:
    sched = scheduler_for(store, "all-three")
    x = dense_x(store.shape[1])
    first = sched.spmm(x)
    placement = sched.placement
    for _ in range(2):
        # Pieces of a hub row arrive in the order the paths deliver them: the last bit of
        # those sums may differ from call to call.
        torch.testing.assert_close(sched.spmm(x), first, rtol=1e-14, atol=1e-14)
        assert sched.placement is placement


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prealloc", [True, False])
def test_a_call_prefetches_the_next_calls_first_host_tiles(
    store: TileStore, prealloc: bool, device: str
) -> None:
    a = hub_matrix()
    sched = scheduler_for(store, "all-three", device=device, prealloc=prealloc)
    x = dense_x(a.shape[1], device=device)
    want = a @ x.cpu().numpy()
    sched.spmm(x)
    assert sched.stats.tiles_prefetched == 0  # nothing was queued before the first call
    host = sched.placement.host
    k = min(sched.placement.n_slots - 1, len(host)) if prealloc else 0
    assert len(host) > k
    for out in (None, None, "host"):
        y = sched.spmm(x, out=out)
        np.testing.assert_allclose(y.cpu().numpy(), want, rtol=1e-12, atol=1e-12)
        stats = sched.stats
        assert stats.tiles_prefetched == k
        assert stats.bytes_prefetched == sum(store.tiles[t].nbytes for t in host[:k])
        assert stats.tiles_h2d == len(host)
        assert stats.bytes_moved == sum(t.nbytes for t in store.tiles)
    # Freed memory drops the prefetched tiles; the next call copies every tile itself.
    sched.close()
    np.testing.assert_allclose(sched.spmm(x).cpu().numpy(), want, rtol=1e-12, atol=1e-12)
    assert sched.stats.tiles_prefetched == 0


@pytest.mark.parametrize("device", DEVICES)
def test_resident_tiles_are_spread_between_host_tiles(
    store: TileStore, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each host tile's compute frees its ring slot without waiting behind every resident
    tile: the resident ones come in even shares after each host tile, plus one share first
    while the first copy is in flight when nothing was prefetched."""
    a = hub_matrix()
    resident = 7
    reserve = reserve_of(store, F, "host", device)
    gpu, host_bytes = tier_budgets(store, resident=resident, host=len(store) - resident,
                                   reserve=reserve, device=device)
    sched = Scheduler(store, gpu_budget=gpu, host_budget=host_bytes, device=device, dual=False)
    phases: list[str] = []
    original = Scheduler._compute

    def spy(self: Scheduler, tile: int, buf: torch.Tensor, ready: Any, *args: Any) -> Any:
        phases.append(args[2])
        return original(self, tile, buf, ready, *args)

    monkeypatch.setattr(Scheduler, "_compute", spy)
    x = dense_x(a.shape[1], device=device)
    for prefetched in (False, True):
        phases.clear()
        y = sched.spmm(x, out="host")  # whole tiles: no row parts
        np.testing.assert_allclose(y.numpy(), a @ x.cpu().numpy(), rtol=1e-12, atol=1e-12)
        assert sched.stats.tiles_prefetched == (sched.placement.n_slots - 1 if prefetched else 0)
        hosts = len(store) - resident
        assert (len(sched.placement.resident), phases.count("stream")) == (resident, hosts)
        shares = hosts + (0 if prefetched else 1)
        done = [phases[: i].count("resident") for i, p in enumerate(phases) if p == "stream"]
        first = 0 if prefetched else 1
        assert done == [round((k + first) * resident / shares) for k in range(hosts)]


@pytest.mark.parametrize("device", DEVICES)
def test_spgemm_takes_prefetched_tiles_too(store: TileStore, device: str) -> None:
    a = hub_matrix()
    x = sparse_x(a.shape[1], device=device)
    sched = scheduler_for(store, "host", device=device, spgemm_x=x)
    expected = a @ x.cpu().to_dense().numpy()
    for prefetched in (0, sched.placement.n_slots - 1):
        y = sched.spgemm(x)
        np.testing.assert_allclose(y.cpu().to_dense().numpy(), expected, rtol=1e-12, atol=1e-12)
        assert sched.stats.tiles_prefetched == prefetched


def test_prefetched_tiles_of_another_placement_are_not_used(store: TileStore) -> None:
    a = hub_matrix()
    gpu, host = tier_budgets(store, resident=4, host=5, reserve=reserve_of(store, 12))
    sched = Scheduler(store, gpu_budget=gpu, host_budget=host, device="cpu", dual=False)
    hosts = []
    for f in (2, 2, 12, 12):  # the wider output moves phase-1 tiles to the host tier
        x = dense_x(a.shape[1], f=f)
        before = sched.placement.host
        np.testing.assert_allclose(sched.spmm(x).numpy(), a @ x.numpy(), rtol=1e-12, atol=1e-12)
        hosts.append(sched.placement.host)
        moved = sched.placement.host != before
        assert sched.stats.tiles_prefetched == (0 if moved else sched.placement.n_slots - 1)
    assert hosts[1] != hosts[2]


def test_a_wider_output_re_places_tiles(store: TileStore) -> None:
    a = hub_matrix()
    gpu, host = tier_budgets(store, resident=len(store), host=0, reserve=reserve_of(store, 2))
    sched = Scheduler(store, gpu_budget=gpu + 4096, host_budget="1MiB", device="cpu", dual=False)
    sched.spmm(dense_x(a.shape[1], f=2))
    assert len(sched.placement.resident) == len(store)
    x = dense_x(a.shape[1], f=12)
    np.testing.assert_allclose(sched.spmm(x).numpy(), a @ x.numpy(), rtol=1e-12, atol=1e-12)
    assert len(sched.placement.resident) < len(store)
    assert sched.stats.peak_gpu_bytes <= sched.gpu_budget


def test_a_wider_output_that_fits_does_not_reload_tiles(
    store: TileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sched = Scheduler(store, gpu_budget="1MiB", host_budget=0, device="cpu")
    sched.spmm(dense_x(store.shape[1], f=2))
    reads: list[int] = []
    original = store.read_bytes
    monkeypatch.setattr(
        store, "read_bytes", lambda i, out, **kw: reads.append(i) or original(i, out, **kw)
    )
    x = dense_x(store.shape[1], f=5)
    np.testing.assert_allclose(sched.spmm(x).numpy(), hub_matrix() @ x.numpy(), rtol=1e-12)
    assert reads == [] and len(sched.placement.resident) == len(store)


def test_min_gpu_bytes_and_too_small_a_budget(store: TileStore) -> None:
    slot = max(t.nbytes for t in store.tiles)
    sched = Scheduler(store, gpu_budget="1MiB", host_budget="1MiB", device="cpu")
    assert sched.min_gpu_bytes >= 3 * slot
    with pytest.raises(ValueError, match=r"minimum working set of \d+ bytes \(.*KiB\)"):
        Scheduler(store, gpu_budget=3 * slot - 1, host_budget="1MiB", device="cpu")
    tight = Scheduler(store, gpu_budget=6 * slot, host_budget=0, device="cpu")
    with pytest.raises(ValueError, match="an SpMM output does not fit.*minimum working set"):
        tight.spmm(dense_x(store.shape[1], f=64))


def test_input_validation(store: TileStore) -> None:
    sched = Scheduler(store, gpu_budget="1MiB", host_budget="1MiB", device="cpu")
    with pytest.raises(ValueError, match=r"A has shape \(300, 500\) and X has shape \(499, 6\)"):
        sched.spmm(dense_x(499))
    with pytest.raises(TypeError, match="floating dtype"):
        sched.spmm(torch.ones(500, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="out must be None or 'host'"):
        sched.spmm(dense_x(500), out="gpu")
    with pytest.raises(TypeError, match="dense"):
        sched.spmm(sparse_x(500))
    with pytest.raises(TypeError, match="sparse CSR or COO"):
        sched.spgemm(dense_x(500))
    with pytest.raises(ValueError, match="2-D"):
        sched.spmm(torch.ones(500, dtype=torch.float64))
    with pytest.raises(TypeError, match="TileStore"):
        Scheduler(object(), device="cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gpu_budget"):
        Scheduler(store, gpu_budget="lots", device="cpu")


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_cuda_device_without_cuda(store: TileStore) -> None:
    with pytest.raises(ValueError, match="no CUDA device"):
        Scheduler(store, device="cuda")


def test_spgemm_accepts_coo(store: TileStore) -> None:
    a = hub_matrix()
    x = sparse_x(a.shape[1]).to_sparse_coo()
    sched = Scheduler(store, gpu_budget="1MiB", host_budget="1MiB", device="cpu")
    np.testing.assert_allclose(
        sched.spgemm(x).to_dense().numpy(), a @ x.to_dense().numpy(), rtol=1e-12, atol=1e-12
    )


def test_a_failing_disk_read_surfaces(store: TileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    sched = scheduler_for(store, "disk")
    x = dense_x(store.shape[1])
    sched.spmm(x)
    original = store.read_bytes

    def broken(i: int, out: object, **kw: object) -> int:
        if i == len(store) - 1:
            raise OSError("disk on fire")
        return original(i, out, **kw)

    monkeypatch.setattr(store, "read_bytes", broken)
    with pytest.raises(OSError, match="disk on fire"):
        sched.spmm(x)
    monkeypatch.undo()
    np.testing.assert_allclose(sched.spmm(x).numpy(), hub_matrix() @ x.numpy(), rtol=1e-12)


def test_empty_matrix(make_store: Callable[..., TileStore]) -> None:
    store = make_store(sp.csr_array((7, 5)))
    sched = Scheduler(store, gpu_budget="1MiB", host_budget="1MiB", device="cpu")
    y = sched.spmm(dense_x(5, f=2))
    assert y.shape == (7, 2) and not y.any()
    assert sched.spgemm(sparse_x(5, f=2)).to_dense().abs().sum() == 0


def test_close_frees_and_stays_usable(store: TileStore) -> None:
    with scheduler_for(store, "all-three") as sched:
        x = dense_x(store.shape[1])
        first = sched.spmm(x)
        sched.close()
        torch.testing.assert_close(sched.spmm(x), first, rtol=1e-14, atol=1e-14)
    assert "Scheduler(" in repr(sched)


# ---------------------------------------------------------------- GPU only


class _PosixView:
    """A store seen as if KvikIO were absent, to drive the pinned bounce-buffer disk path."""

    def __init__(self, store: TileStore) -> None:
        self._store = store
        self.io_mode = "posix"

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


@pytest.mark.gpu
@pytest.mark.parametrize("tier", ["disk", "all-three"])
def test_gpu_posix_bounce_path(store: TileStore, tier: str) -> None:
    a = hub_matrix()
    n = len(store)
    resident, host = TIERS[tier]
    reserve = reserve_of(store, F, None, "cuda")
    gpu, host_bytes = tier_budgets(
        store, resident=resident, host=host, reserve=reserve, bounce=True, device="cuda"
    )
    sched = Scheduler(
        _PosixView(store), gpu_budget=gpu, host_budget=host_bytes, device="cuda", dual=False
    )
    x = dense_x(a.shape[1], device="cuda")
    y = sched.spmm(x)
    np.testing.assert_allclose(y.cpu().numpy(), a @ x.cpu().numpy(), rtol=1e-12, atol=1e-12)
    assert sched.stats.io_mode == "posix"
    assert sched.stats.tiles_disk == n - resident - host


def random_store(make_store: Callable[..., TileStore]) -> tuple[sp.csr_array, TileStore]:
    a = sp.csr_array(sp.random_array((20000, 20000), density=5e-4, rng=np.random.default_rng(0)))
    # 13 tiles: every tier mix below leaves more disk tiles than disk slots, so none of them
    # would rather be resident in the room the disk slots take.
    store = make_store(a, tile_bytes="128KiB", alignment=4096, value_dtype=np.float32)
    return a, store


def gpu_budgets(store: TileStore, resident: int, out: str | None = None) -> tuple[int, int]:
    """``resident`` tiles on the GPU, half of the rest pinned, the other half on disk.

    From the scheduler's own reserve and the store's real tile sizes, with bounce buffers only
    when disk reads need them (POSIX): with KvikIO they land in device slots, and a host budget
    that counted two bounce buffers it does not need pinned every remaining tile (no disk tile,
    so the disk path was never used).
    """
    streamed = len(store) - resident
    reserve = spmm_reserve(store, 64, torch.float32, device="cuda", out=out)
    return tier_budgets(
        store,
        resident=resident,
        host=streamed // 2,
        reserve=reserve,
        bounce=bounces(store, "cuda"),
        device="cuda",
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "options", [{}, {"prealloc": False}, {"overlap": False}], ids=["ring", "fresh", "serial"]
)
@pytest.mark.parametrize("out", [None, "host"])
@pytest.mark.parametrize("resident_tiles", [0, 3])
def test_gpu_budget_is_never_exceeded(
    make_store: Callable[..., TileStore],
    out: str | None,
    resident_tiles: int,
    options: dict[str, bool],
) -> None:
    a, store = random_store(make_store)
    x = torch.randn(20000, 64, device="cuda")
    budget, host = gpu_budgets(store, resident_tiles, out)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sched = Scheduler(store, gpu_budget=budget, host_budget=host, device="cuda", **options)
    for _ in range(2):
        y = sched.spmm(x, out=out)
        torch.cuda.synchronize()
        np.testing.assert_allclose(y.cpu().numpy(), a @ x.cpu().numpy(), rtol=1e-4, atol=1e-4)
        del y
    # The output reserve is known from the first call on, so the tiers are checked after it.
    assert len(sched.placement.resident) == resident_tiles
    assert sched.placement.host and sched.placement.disk
    stats = sched.stats
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= budget, (peak, budget)
    assert stats.peak_gpu_bytes <= budget
    assert stats.tiles_h2d > 0 and stats.tiles_disk > 0
    assert stats.tiles_resident == resident_tiles
    sched.close()


@pytest.mark.gpu
def test_gpu_pinned_tiles_take_the_host_path_and_no_disk_slot(
    make_store: Callable[..., TileStore],
) -> None:
    """On a GPU the paths share the PCIe link: with every streamed tile pinned, ``dual=True``
    reserves no disk slot and steals nothing, however fast the disk has measured."""
    a, store = random_store(make_store)
    slot = max(t.nbytes for t in store.tiles)
    budget, _ = gpu_budgets(store, resident=0)
    host_all = sum(t.nbytes for t in store.tiles)
    sched = Scheduler(store, gpu_budget=budget + 4 * slot, host_budget=host_all, device="cuda",
                      dual=True)
    sched.dispatcher.update("disk", 1 << 40, 1e-3)  # a disk far faster than the link
    x = torch.randn(20000, 64, device="cuda")
    y = sched.spmm(x)
    np.testing.assert_allclose(y.cpu().numpy(), a @ x.cpu().numpy(), rtol=1e-4, atol=1e-4)
    resident = len(sched.placement.resident)
    assert sched.placement.n_disk == 0 and resident < len(store)
    assert sched.stats.tiles_stolen == 0 and sched.stats.tiles_h2d == len(store) - resident
    sched.close()


@pytest.mark.gpu
def test_gpu_steady_state_allocates_nothing(make_store: Callable[..., TileStore]) -> None:
    _, store = random_store(make_store)
    x = torch.randn(20000, 64, device="cuda")
    budget, host = gpu_budgets(store, resident=2)
    sched = Scheduler(store, gpu_budget=budget, host_budget=host, device="cuda")
    segments = []
    for _ in range(3):
        y = sched.spmm(x)
        torch.cuda.synchronize()
        del y
        segments.append(torch.cuda.memory_stats()["segment.all.allocated"])
    assert segments[1] == segments[2], segments


# --------------------------------------------------------------------------- checked tiles

# tier -> (the tile to corrupt: the first of that tier, the path named in the error)
CORRUPT = {
    "resident": (0, r"placement in device memory \(phase 1, \w+"),
    "host": (0, r"placement in host memory \(phase 2, POSIX read\)"),
    "disk": (0, r"the disk path \("),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tier", list(CORRUPT))
def test_a_tile_corrupted_before_placement_is_an_error_naming_it_and_its_path(
    store: TileStore, tier: str, device: str
) -> None:
    """A byte flipped after the store was opened: the product raises, naming the tile, the
    file and the path the tile came by, before computing with it."""
    sched = scheduler_for(store, tier, device=device)
    tile, via = CORRUPT[tier]
    flip_byte(store, tile)
    name = re.escape(str(store.data_path))
    with pytest.raises(TileCorruptError, match=rf"tile {tile} of {name} .* \(read by {via}") as e:
        sched.spmm(dense_x(store.shape[1], device=device))
    assert e.value.tile == tile and e.value.path == store.data_path


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tier", ["disk", "host+disk"])
def test_a_disk_tile_corrupted_after_placement_is_caught_on_its_next_read(
    store: TileStore, tier: str, device: str
) -> None:
    """Disk tiles are read again on every product: a byte flipped between two products (bit
    rot, a rewrite) is caught on the second one, on the CPU and the GPU paths alike."""
    sched = scheduler_for(store, tier, device=device)
    x = dense_x(store.shape[1], device=device)
    expected = hub_matrix() @ x.cpu().numpy()
    np.testing.assert_allclose(sched.spmm(x).cpu().numpy(), expected, rtol=1e-12, atol=1e-12)
    disk = sched.placement.disk
    flip_byte(store, disk[-1], where=0.1)
    with pytest.raises(TileCorruptError, match=rf"tile {disk[-1]} of .*read by the disk path"):
        sched.spmm(x)
    flip_byte(store, disk[-1], where=0.1)  # repaired: the same product again
    np.testing.assert_allclose(sched.spmm(x).cpu().numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_the_unchecked_ablation_checks_nothing(store: TileStore, device: str) -> None:
    """``checks=False`` (what ``bench.spmm``'s ``-unchecked`` variants time against the checked
    ones) reads a corrupted tile without a word: the checks above are what catch it."""
    flip_byte(store, 0)
    for tier in CORRUPT:
        scheduler_for(store, tier, device=device, checks=False).spmm(
            dense_x(store.shape[1], device=device))


@pytest.mark.gpu
def test_kvikio_reads_into_gpu_memory_are_checked_on_the_device(store: TileStore) -> None:
    """KvikIO writes disk tiles straight into GPU slots: later reads are checked there by word
    sum against the CRC-checked first read, and the error names KvikIO."""
    if store.io_mode == "posix":
        pytest.skip("KvikIO is not installed: GPU reads go through pinned bounce buffers")
    sched = scheduler_for(store, "disk", device="cuda")
    x = dense_x(store.shape[1], device="cuda")
    sched.spmm(x)
    tile = sched.placement.disk[1]
    flip_byte(store, tile, where=0.3)
    with pytest.raises(TileCorruptError, match=rf"tile {tile} of .*word sum.*KvikIO"):
        sched.spmm(x)


# --------------------------------------------------------------------------- measured peaks


@pytest.mark.gpu
@pytest.mark.parametrize(
    "switch",
    [{}, {"prealloc": False}, {"overlap": False}, {"dual": True}],
    ids=["ring", "fresh", "serial", "dual"],
)
@pytest.mark.parametrize("out", [None, "host"])
@pytest.mark.parametrize("tier", list(TIERS))
def test_measured_peaks_stay_within_the_budgets(
    store: TileStore, tier: str, out: str | None, switch: dict[str, bool]
) -> None:
    """The allocator's measured device peak and the pinned host bytes of a call stay within
    the budgets for every tier mix and ablation switch; RunStats reports the same figures."""
    resident, host = tier_counts(store, tier)
    reserve = reserve_of(store, F, out, "cuda")
    gpu, host_bytes = tier_budgets(
        store,
        resident=resident,
        host=host,
        reserve=reserve,
        bounce=bounces(store, "cuda"),
        device="cuda",
    )
    x = dense_x(store.shape[1], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    pinned_by_torch = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    sched = Scheduler(
        store, gpu_budget=gpu, host_budget=host_bytes, device="cuda", **{"dual": False, **switch}
    )
    for _ in range(2):
        y = sched.spmm(x, out=out)
        np.testing.assert_allclose(
            y.cpu().numpy(), hub_matrix() @ x.cpu().numpy(), rtol=1e-12, atol=1e-12
        )
        del y
    torch.cuda.synchronize()
    stats = sched.stats
    # The allocator's own figure: its peak was reset when the last call began.
    assert torch.cuda.max_memory_allocated() - base <= gpu
    assert 0 < stats.peak_gpu_bytes <= gpu
    assert stats.pinned_host_bytes == sched.placement.pinned_bytes <= host_bytes
    if out is None:
        # Nothing was pinned through PyTorch's caching host allocator, which rounds blocks up
        # to powers of two (the pinned output of out="host" is the caller's and comes from it).
        assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == pinned_by_torch
    sched.close()


@pytest.mark.gpu
def test_the_process_peak_survives_the_resets_of_calls(store: TileStore) -> None:
    """Each call resets the allocator's peak statistic; the process-wide peak is kept."""
    from aires.scheduler.stats import max_memory_allocated, reset_peak_memory_stats

    reset_peak_memory_stats()
    big = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    del big
    sched = scheduler_for(store, "all-three", device="cuda")
    sched.spmm(dense_x(store.shape[1], device="cuda"))
    assert torch.cuda.max_memory_allocated() < 256 << 20
    assert max_memory_allocated() >= 256 << 20
    reset_peak_memory_stats()
    assert max_memory_allocated() < 256 << 20
