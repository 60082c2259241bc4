"""aires.matmul against scipy: inputs of every kind, gradients, caching and validation."""

from __future__ import annotations

import importlib

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from aires.matmul import clear_cache, matmul

# The package exports the function under the module's name, so fetch the module itself.
matmul_module = importlib.import_module("aires.matmul")
from aires.scheduler import RunStats
from aires.tiling import TileStore, build_store

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Small enough that tiles stream on the CPU; CUDA keeps 16 MiB for cuSPARSE's buffer on top
# (there the tiles fit beside it: tests/scheduler streams them on the GPU).
BUDGET = {"cpu": "64KiB", "cuda": "17MiB"}


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


def matrix(shape: tuple[int, int] = (80, 60), seed: int = 0) -> sp.csr_array:
    m = sp.random_array(shape, density=0.1, random_state=np.random.default_rng(seed))
    return sp.csr_array(m)


def symmetric(n: int = 70) -> sp.csr_array:
    m = matrix((n, n))
    return sp.csr_array(m + m.T)


def dense(n: int, f: int = 4, device: str = "cpu", grad: bool = False) -> torch.Tensor:
    x = torch.tensor(np.random.default_rng(3).standard_normal((n, f)), device=device)
    return x.requires_grad_(grad)


def store_of(m: sp.csr_array, path: Path, **kw: object) -> TileStore:
    return build_store(
        m, path, tile_bytes=1024, alignment=256, value_dtype=np.float64, progress=False, **kw
    )


@pytest.mark.parametrize("device", DEVICES)
def test_forward_for_every_kind_of_a(tmp_path: Path, device: str) -> None:
    m = matrix()
    x = dense(60, device=device)
    expected = m @ x.cpu().numpy()
    kinds = [
        m,
        torch.tensor(m.toarray()).to_sparse_csr(),
        torch.tensor(m.toarray()).to_sparse_coo(),
        (m.indptr, m.indices, m.data, m.shape),
        store_of(m, tmp_path / "a"),
    ]
    for a in kinds:
        y = matmul(a, x, gpu_budget=BUDGET[device], host_budget="8KiB")
        assert y.device == x.device
        np.testing.assert_allclose(y.cpu().numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_of_a_non_square_matrix_uses_the_transpose(tmp_path: Path, device: str) -> None:
    m = matrix()
    store = store_of(m, tmp_path / "a")
    x = dense(60, device=device, grad=True)
    y = matmul(store, x, gpu_budget=BUDGET[device], host_budget="4KiB")
    dy = torch.tensor(np.random.default_rng(4).standard_normal(y.shape), device=device)
    y.backward(dy)
    np.testing.assert_allclose(x.grad.cpu().numpy(), m.T @ dy.cpu().numpy(), rtol=1e-12, atol=1e-12)
    assert (tmp_path / "a.T").is_dir()  # built once beside the original


def test_symmetric_store_serves_both_passes(tmp_path: Path) -> None:
    m = symmetric()
    store = store_of(m, tmp_path / "s", symmetric=True)
    x = dense(70, grad=True)
    y = matmul(store, x, gpu_budget="64KiB")
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), m.T @ np.ones((70, 4)), rtol=1e-12)
    assert not (tmp_path / "s.T").exists()
    assert len(matmul_module._schedulers) == 1


def test_gradcheck_in_float64() -> None:
    m = matrix((30, 20))
    x = dense(20, f=3, grad=True)
    assert torch.autograd.gradcheck(lambda t: matmul(m, t, gpu_budget="32KiB"), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_with_tiles_streamed_by_the_disk_threads(tmp_path: Path, device: str) -> None:
    # Grad mode is per thread: the disk workers computed with it on and addmm(out=) refused
    # an X that requires grad (seen from AiresGCNConv's training tests).
    m = matrix()
    store = store_of(m, tmp_path / "a")
    slot = max(t.nbytes for t in store.tiles)
    x = dense(60, device=device, grad=True)
    budget = 5 * slot + 80 * 4 * 8 + (16 << 20 if device == "cuda" else 0)
    y, stats = matmul(store, x, gpu_budget=budget, host_budget=0, return_stats=True)
    assert stats.tiles_disk == len(store) and stats.tiles_resident == 0
    assert y.requires_grad
    y.sum().backward()
    np.testing.assert_allclose(x.grad.cpu().numpy(), m.T @ np.ones((80, 4)), rtol=1e-12)


def test_second_order_gradients_in_float64() -> None:
    m = matrix((30, 20))
    x = dense(20, f=3, grad=True)
    assert torch.autograd.gradgradcheck(lambda t: matmul(m, t, gpu_budget="32KiB") ** 2, (x,))


@pytest.mark.parametrize(
    "options", [{"prealloc": False}, {"overlap": False}, {"prealloc": False, "overlap": False}]
)
def test_scheduler_options_reach_the_scheduler(tmp_path: Path, options: dict[str, bool]) -> None:
    m = symmetric()
    store = store_of(m, tmp_path / "s", symmetric=True)
    x = dense(70, grad=True)
    kw = {"gpu_budget": "12KiB", "host_budget": "2KiB"}
    y, stats = matmul(store, x, scheduler_options=options, return_stats=True, **kw)
    assert stats.tiles_resident and stats.tiles_h2d and stats.tiles_disk
    np.testing.assert_allclose(y.detach().numpy(), m @ x.detach().numpy(), rtol=1e-12)
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), m.T @ np.ones((70, 4)), rtol=1e-12)
    [scheduler] = matmul_module._schedulers.values()
    assert all(getattr(scheduler, f"_{k}") == v for k, v in options.items())
    matmul(store, x, **kw)  # default options: a second scheduler
    assert len(matmul_module._schedulers) == 2


def test_scheduler_options_are_validated() -> None:
    m = matrix()
    with pytest.raises(TypeError, match=r"unknown names \['ring'\]"):
        matmul(m, dense(60), scheduler_options={"ring": False})
    with pytest.raises(TypeError, match="scheduler_options must be a dict"):
        matmul(m, dense(60), scheduler_options=[("prealloc", False)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="overlap must be a bool"):
        matmul(m, dense(60), scheduler_options={"overlap": "no"})


def test_out_host_returns_host_memory_and_differentiates() -> None:
    m = matrix()
    x = dense(60, grad=True)
    y, stats = matmul(m, x, out="host", gpu_budget="64KiB", return_stats=True)
    assert isinstance(stats, RunStats) and stats.bytes_d2h > 0
    np.testing.assert_allclose(y.detach().numpy(), m @ x.detach().numpy(), rtol=1e-12)
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), m.T @ np.ones((80, 4)), rtol=1e-12)


def test_float32_input_uses_a_float32_store() -> None:
    m = matrix()
    x = dense(60).float()
    y = matmul(m, x)
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), m @ x.double().numpy(), rtol=1e-5, atol=1e-5)


def test_sparse_x_runs_spgemm_forward_only() -> None:
    m = matrix()
    xs = sp.random_array((60, 9), density=0.3, random_state=np.random.default_rng(5))
    x = torch.tensor(xs.toarray()).to_sparse_csr()
    y = matmul(m, x)
    assert y.layout == torch.sparse_csr
    np.testing.assert_allclose(y.to_dense().numpy(), m @ xs.toarray(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        matmul(m, x.to_sparse_coo()).to_dense().numpy(), m @ xs.toarray(), rtol=1e-12, atol=1e-12
    )
    with pytest.raises(NotImplementedError, match="sparse X"):
        matmul(m, torch.tensor(xs.toarray()).to_sparse_coo().requires_grad_(True))


def test_a_matrix_is_tiled_once_while_it_lives(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real = matmul_module.build_store

    def counting(*args: object, **kw: object) -> TileStore:
        calls.append(args[0])
        return real(*args, **kw)

    monkeypatch.setattr(matmul_module, "build_store", counting)
    m = matrix()
    x = dense(60)
    for _ in range(3):
        matmul(m, x)
    assert len(calls) == 1
    matmul(m, x.float())  # float32 values are a second store
    assert len(calls) == 2
    [(_, store)] = [e for k, e in matmul_module._stores.items() if k[1] == "float64"]
    tmp = Path(store.path).parent
    del m, calls[:]
    import gc

    gc.collect()
    assert not tmp.exists()  # the temporary store goes with the matrix


def test_validation_messages(tmp_path: Path) -> None:
    m = matrix()
    with pytest.raises(ValueError, match=r"A has shape \(80, 60\) and X has shape \(61, 4\)"):
        matmul(m, dense(61))
    with pytest.raises(TypeError, match="floating dtype"):
        matmul(m, torch.ones(60, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        matmul(m, np.ones((60, 2)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2-D"):
        matmul(m, torch.ones(60, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be None or 'host'"):
        matmul(m, dense(60), out="cuda")
    elsewhere = "X is on cpu but device=cuda" if torch.cuda.is_available() else "no CUDA device"
    with pytest.raises(ValueError, match=elsewhere):
        matmul(m, dense(60), device="cuda:0")
    with pytest.raises(ValueError, match=r"X must have at least one column, got shape \(60, 0\)"):
        matmul(m, torch.ones(60, 0))
    with pytest.raises(ValueError, match="below the minimum working set"):
        matmul(m, dense(60), gpu_budget=100)
    with pytest.raises(ValueError, match="gpu_budget"):
        matmul(m, dense(60), gpu_budget="plenty")
    with pytest.raises(TypeError, match="TileStore or a matrix"):
        matmul(3, dense(60))  # type: ignore[arg-type]


def test_schedulers_are_cached_per_budget_and_bounded() -> None:
    m = matrix()
    x = dense(60)
    for budget in ("64KiB", "64KiB", "65KiB", "66KiB", "67KiB", "68KiB"):
        matmul(m, x, gpu_budget=budget)
    assert len(matmul_module._schedulers) == matmul_module.MAX_SCHEDULERS
