"""Every method trains the same model on the tiny workload; failures become results."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.methods import ABLATIONS, METHODS, MethodConfig, check_method
from bench.methods.aires import PYG_ORDER, VARIANTS, missing_options, product_widths
from bench.methods import aires_ddp, chunks
from bench.methods.chunks import csr_row_chunks, dense_row_chunks, on_device
from bench.methods.incore_tuned import incore_forward
from bench.methods.result import MethodResult, OverBudgetError, is_out_of_memory
from bench.methods.run import run_method
from bench.methods.uvm import check_fits, managed_bytes
from bench.methods.workload import load_workload

# Ablations whose scheduler option exists run; the others must say what is missing.
AVAILABLE = [v for v in ABLATIONS if v == PYG_ORDER or not missing_options(VARIANTS[v][1])]
MISSING = [v for v in ABLATIONS if v not in AVAILABLE]
CPU_METHODS = ("aires", "aires-ddp", *(f"aires-{v}" for v in AVAILABLE), "naive",
               "feature-cache", "incore", "incore-tuned", "save-on-cpu")


def _config(workload_dir: Path, method: str, **kw: object) -> MethodConfig:
    base = MethodConfig(
        method=method, workload=str(workload_dir), gpu_budget=None, epochs=2, warmup=1,
        hidden=16, tile_bytes=4096, device="cpu", store_dir=str(workload_dir / "stores"),
    )
    return replace(base, **kw)


#: Each order's layers on the tiny workload (12 features, 16 hidden, 4 classes): the cost model
#: aggregates the first layer first (its input needs no gradient and is narrower than 2 x 16).
ORDERS = {"auto": ["aggregate_first", "transform_first"],
          "pyg": ["transform_first", "transform_first"]}


@pytest.fixture(scope="module", params=sorted(ORDERS))
def order(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(workload_dir: Path, order: str) -> MethodResult:
    """PyG's GCNConv in the order under test."""
    return run_method(_config(workload_dir, "incore", order=order))


@pytest.mark.parametrize("method", CPU_METHODS)
def test_cpu_methods_train_the_same_model(
    workload_dir: Path, method: str, order: str, reference: MethodResult
) -> None:
    result = run_method(_config(workload_dir, method, order=order))
    assert result.status == "ok", result.error
    assert len(result.epoch_s) == 2 and all(t > 0 for t in result.epoch_s)
    # Same weights, same loss, same optimizer: the losses agree epoch by epoch.
    np.testing.assert_allclose(result.extra["loss"], reference.extra["loss"], rtol=1e-5)
    assert result.extra["loss"][1] < result.extra["loss"][0]
    # ... and every method ran the order asked for (the pyg-order ablation always PyG's).
    asked = "pyg" if method == f"aires-{PYG_ORDER}" else order
    assert (result.extra["order"], result.extra["orders"]) == (asked, ORDERS[asked])


def test_aires_ddp_reports_each_ranks_exchange_beside_the_model(workload_dir: Path) -> None:
    """Over the ranks, every aggregated column's rows are received by all ranks but their
    owner: ``(P - 1) N`` rows, so the balanced model's ``P`` times is the measured sum."""
    result = run_method(_config(workload_dir, "aires-ddp"))
    assert result.status == "ok", result.error
    ranks = result.extra["per_rank"]
    assert len(ranks) == result.extra["processes"] == 2
    assert all(r["measured"] == r["predicted"] for r in ranks)
    received = sum(r["measured"]["exchange"] for r in ranks)
    assert received > 0
    assert received == pytest.approx(2 * result.extra["exchange_model_bytes"], abs=1)
    # The exchange's ceiling: the measured broadcast rate, and the busiest rank's bytes at it.
    assert result.extra["broadcast_GBps"] > 0
    busiest = max(r["measured"]["exchange"] for r in ranks)
    assert result.extra["exchange_floor_s"] == pytest.approx(
        busiest / (result.extra["broadcast_GBps"] * 1e9))


def test_the_copy_floor_is_the_busiest_ranks_slower_direction() -> None:
    """Each rank's copies run both ways at once, so its floor is its slower direction at the
    rates the ranks measured together; the epoch waits for the busiest rank."""
    ranks = [MethodResult(status="ok", extra={"measured_bytes": {"h2d": h2d, "d2h": d2h}})
             for h2d, d2h in ((90e9, 40e9), (80e9, 60e9))]
    rates = [{"h2d": 50.0, "d2h": 50.0}, {"h2d": 40.0, "d2h": 20.0}]
    assert aires_ddp._copy_floor(ranks, rates) == pytest.approx(3.0)  # rank 1's 60 GB at 20
    assert aires_ddp._copy_floor(ranks[:1], rates[:1]) == pytest.approx(1.8)


def test_the_two_orders_are_different_arithmetic(workload_dir: Path) -> None:
    """Same model, other product order: the logits agree to float rounding, not bit for bit,
    so the order test above compares like with like."""
    workload = load_workload(workload_dir)
    logits = [
        incore_forward(workload, _config(workload_dir, "incore-tuned", order=o),
                       torch.device("cpu"))[0]().detach()
        for o in ORDERS
    ]
    torch.testing.assert_close(logits[0], logits[1])
    assert not torch.equal(logits[0], logits[1])


def test_an_unknown_order_is_named(workload_dir: Path) -> None:
    with pytest.raises(ValueError, match="order must be one of"):
        _config(workload_dir, "naive", order="transform_first")


@pytest.mark.parametrize(
    ("order", "passes", "x_copies"),
    # PyG's order: Â forward and backward in both layers, X for XW and XᵀG. The cost model's:
    # ÂX once (no gradient for X), then Â forward and backward in the second layer.
    [("pyg", 4, 2), ("auto", 3, 1)],
)
def test_naive_copies_adjacency_and_features_every_epoch(
    workload_dir: Path, order: str, passes: int, x_copies: int
) -> None:
    workload = load_workload(workload_dir)
    result = run_method(_config(workload_dir, "naive", order=order))
    # Each chunk copies its own row pointer (rows + 1 entries), indices and values (int32,
    # float32).
    adjacency = workload.nnz * 8 + (workload.num_nodes + result.extra["chunks"]) * 4
    assert result.bytes_h2d == passes * adjacency + x_copies * workload.x.nbytes
    assert result.extra["chunks"] > 2
    assert result.extra["memory"] == "pageable host, synchronous copies"


def test_feature_cache_without_budget_caches_half(workload_dir: Path) -> None:
    result = run_method(_config(workload_dir, "feature-cache"))
    assert result.extra["cached_rows"] == 120
    assert result.extra["cached_fraction"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("method", "passes"),
    # The tiny workload's first layer aggregates first by default: no backward pass through
    # the input features. PyG's order multiplies both layers forward and backward.
    [("aires", 3), (f"aires-{PYG_ORDER}", 4)],
)
def test_aires_reports_its_traffic_beside_the_model(
    workload_dir: Path, method: str, passes: int
) -> None:
    result = run_method(_config(workload_dir, method))
    assert result.extra["passes_per_epoch"] == passes
    assert result.extra["io_mode"] == "cpu"
    assert result.extra["measured_bytes"] == result.extra["predicted_bytes"]
    assert result.bytes_h2d is not None and result.bytes_disk is not None
    # Its plan reads no file (the graph fits the host budget), so it dropped no page cache:
    # ``disk_cold`` is reported by runs that read the disk only.
    assert "on NVMe: none and 0 B" in result.extra["plan"]
    assert "disk_cold" not in result.extra


@pytest.mark.parametrize("variant", MISSING)
def test_ablations_without_a_scheduler_option_say_what_is_missing(
    workload_dir: Path, variant: str
) -> None:
    result = run_method(_config(workload_dir, f"aires-{variant}"))
    assert result.status == "error"
    assert "Scheduler has no option" in result.error


def test_every_ablation_has_a_variant() -> None:
    assert set(VARIANTS) | {PYG_ORDER} == set(ABLATIONS)
    assert missing_options({"dual": False, "no_such_option": 1}) == ["no_such_option"]


def test_product_widths_follow_the_product_order() -> None:
    # Transform first: each layer multiplies Â by its output width, forward and backward.
    tf, af = "transform_first", "aggregate_first"
    assert product_widths([100, 256, 47], [tf, tf]) == [256, 256, 47, 47]
    # Aggregate first: the input width, once for the first layer (no gradient for the input
    # features), forward and backward after it.
    assert product_widths([16, 256, 47], [af, tf]) == [16, 47, 47]
    assert product_widths([16, 256, 47], [af, af]) == [16, 256, 256]


def test_cuda_device_gets_an_index(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.cuda.set_per_process_memory_fraction (and others) reject an index-less "cuda".
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    config = MethodConfig(method="naive", workload="w", gpu_budget=None, device="cuda")
    assert config.torch_device() == torch.device("cuda", 3)
    # Before CUDA is initialised the current device is 0, and asking would initialise it.
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert config.torch_device() == torch.device("cuda", 0)
    assert replace(config, device="cuda:1").torch_device() == torch.device("cuda", 1)
    assert replace(config, device="cpu").torch_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        replace(config, device="tpu")


def test_uvm_needs_a_gpu(workload_dir: Path) -> None:
    result = run_method(_config(workload_dir, "uvm"))
    assert result.status == "error"
    assert "needs a CUDA GPU" in result.error


def test_uvm_refuses_managed_memory_not_below_the_free_memory(workload_dir: Path) -> None:
    need = managed_bytes(load_workload(workload_dir))
    check_fits(need, need + 1)
    with pytest.raises(ValueError, match=f"{need} bytes of managed memory .* {need} free"):
        check_fits(need, need)


def test_unknown_method_is_named() -> None:
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        check_method("fast")
    assert check_method("aires-sync") == METHODS["aires"]
    assert {f"aires-{a}" for a in ABLATIONS}


def test_bad_budget_scope_is_named(workload_dir: Path) -> None:
    with pytest.raises(ValueError, match="budget_scope"):
        run_method(_config(workload_dir, "naive", budget_scope="everything"))


def test_out_of_memory_is_classified() -> None:
    assert is_out_of_memory(OverBudgetError("too big"))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUSPARSE_STATUS_INSUFFICIENT_RESOURCES"))
    assert not is_out_of_memory(RuntimeError("index out of range"))


def test_result_json_round_trip() -> None:
    result = MethodResult(status="ok", epoch_s=[0.5], peak_gpu_bytes=10, bytes_h2d=3,
                          bytes_disk=0, extra={"overlap_efficiency": 0.9})
    entry = result.to_json()
    assert list(entry)[:6] == ["status", "epoch_s", "peak_gpu_bytes", "bytes_h2d",
                               "bytes_disk", "error"]
    assert MethodResult.from_json(entry) == result


def test_row_chunks_cover_rows_within_budget() -> None:
    indptr = np.array([0, 3, 3, 50, 52, 60, 61])
    chunks = csr_row_chunks(indptr, chunk_bytes=100, entry_bytes=8)
    assert chunks[0][0] == 0 and chunks[-1][1] == 6
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    for r0, r1 in chunks:
        cost = (indptr[r1] - indptr[r0]) * 8 + (r1 - r0) * 8
        assert cost <= 100 or r1 - r0 == 1  # only a single oversized row may exceed
    assert dense_row_chunks(10, 4, 12) == [(0, 3), (3, 6), (6, 9), (9, 10)]


@pytest.mark.parametrize("shape", [(10, 3), (10,), (0, 3)])
def test_on_device_copies_a_memory_map_a_chunk_at_a_time(
    tmp_path: Path, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the in-core baselines move to the device: cast, whole, across chunk boundaries."""
    monkeypatch.setattr(chunks, "COPY_CHUNK_BYTES", 16)  # 1 to 4 rows a chunk
    data = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.int64, shape=shape)
    data[...] = np.arange(data.size).reshape(shape)
    out = on_device(data, np.int32, torch.device("cpu"))
    assert out.dtype == torch.int32 and tuple(out.shape) == shape
    assert torch.equal(out, torch.from_numpy(np.asarray(data, dtype=np.int32)))


# --------------------------------------------------------------------------- GPU


def _gpu(workload_dir: Path, method: str, **kw: object) -> MethodConfig:
    return _config(workload_dir, method, device="cuda", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "method",
    ("aires", *(f"aires-{v}" for v in AVAILABLE), "naive", "feature-cache", "incore",
     "incore-tuned", "save-on-cpu"),
)
def test_gpu_methods_train_the_same_model(
    workload_dir: Path, method: str, order: str, reference: MethodResult
) -> None:
    result = run_method(_gpu(workload_dir, method, gpu_budget=1 << 30, order=order))
    assert result.status == "ok", result.error
    assert result.peak_gpu_bytes and result.peak_gpu_bytes < 1 << 30
    np.testing.assert_allclose(result.extra["loss"], reference.extra["loss"], rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("scope", ("process", "data"))
def test_aires_fits_its_budget(workload_dir: Path, scope: str) -> None:
    result = run_method(_gpu(workload_dir, "aires", gpu_budget=256 << 20, budget_scope=scope))
    assert result.status == "ok", result.error
    assert result.peak_gpu_bytes < 256 << 20
    assert result.extra["io_mode"] in ("gds", "kvikio-compat", "posix")


@pytest.mark.gpu
def test_aires_disk_only_reads_from_disk(workload_dir: Path) -> None:
    # Ten 4 KiB tiles, a budget for the five slots and three resident tiles: the other seven
    # are read from disk on every product, none from pinned host memory.
    result = run_method(_gpu(workload_dir, "aires-disk-only", tile_bytes=4096,
                             gpu_budget=32 << 10, budget_scope="data"))
    assert result.status == "ok", result.error
    assert result.bytes_h2d == 0
    assert result.bytes_disk > 0


@pytest.mark.gpu
def test_incore_over_budget_reports_oom(workload_dir: Path, tmp_path: Path) -> None:
    result = run_method(_gpu(workload_dir, "incore", gpu_budget=4096, budget_scope="data"))
    assert result.status == "oom"
    # The process cap is checked only when the allocator reserves a new segment; in this
    # process, earlier tests' partly used segments can serve a tiny workload, so the capped run
    # goes in a fresh process, as aires-bench runs every method.
    result = _run_fresh(tmp_path, _gpu(workload_dir, "incore", gpu_budget=1 << 16))
    assert result.status == "oom", result.error


@pytest.mark.gpu
def test_feature_cache_fills_the_room_the_budget_leaves(workload_dir: Path) -> None:
    result = run_method(_gpu(workload_dir, "feature-cache", gpu_budget=1 << 30))
    assert result.status == "ok", result.error
    assert result.extra["cached_fraction"] == pytest.approx(1.0)
    assert result.extra["adjacency_cached"] is True
    assert result.bytes_h2d == 0


@pytest.mark.gpu
def test_uva_view_aliases_pinned_memory() -> None:
    from bench.methods.pinned import uva_view

    host = torch.arange(1000, dtype=torch.float32).reshape(100, 10).pin_memory()
    view = uva_view(host, torch.device("cuda"))
    assert view.is_cuda and view.data_ptr() == host.data_ptr()
    index = torch.tensor([5, 0, 99], device="cuda")
    torch.testing.assert_close(view.index_select(0, index).cpu(), host[[5, 0, 99]])
    host[0, 0] = -1.0  # a host write is seen by the next kernel: no copy was made
    assert float(view[0, 0]) == -1.0


def _run_fresh(tmp_path: Path, config: MethodConfig) -> MethodResult:
    """Run a method in a process of its own, as aires-bench does (a cap or an allocator cannot
    be undone in this process)."""
    path, out = tmp_path / "config.json", tmp_path / "result.json"
    config.dump(path)
    subprocess.run([sys.executable, "-m", "bench.methods.run", str(path), str(out)], check=True)
    return MethodResult.from_json(json.loads(out.read_text()))


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("budget", "policy"), [(1 << 30, "migrating"), (1 << 16, "host-preferred")]
)
def test_uvm_policy_follows_the_budget(
    workload_dir: Path, tmp_path: Path, order: str, reference: MethodResult, budget: int,
    policy: str,
) -> None:
    result = _run_fresh(tmp_path, _gpu(workload_dir, "uvm", gpu_budget=budget, order=order))
    assert result.status == "ok", result.error
    assert result.extra["policy"] == policy
    np.testing.assert_allclose(result.extra["loss"], reference.extra["loss"], rtol=1e-4)
    if policy == "migrating":
        assert result.peak_gpu_bytes <= budget
    else:
        # Host-preferred: the managed blocks stay in host memory, so the device gains less than
        # their bytes over training (the kernels and handles loaded by the first pass are
        # not counted: on the H200 those alone were 235 MB, over this workload's 67 MB).
        assert result.extra["managed_pass_bytes"] > budget
        assert result.peak_gpu_bytes < result.extra["managed_bytes"]
