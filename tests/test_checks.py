"""Input checks: sizes, positive ints and CSR arrays, each error naming the argument and value."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from aires.checks import check_csr, check_positive_int, parse_size


@pytest.mark.parametrize(
    ("value", "nbytes"),
    [
        (4096, 4096),
        (np.int64(7), 7),
        (2.0e9, 2_000_000_000),
        ("8GiB", 8 * 1024**3),
        ("512 MiB", 512 * 1024**2),
        (" 2gb ", 2 * 1000**3),
        ("1.5KiB", 1536),
        ("1e3", 1000),
        ("+3kB", 3000),
    ],
)
def test_sizes_parse(value: object, nbytes: int) -> None:
    assert parse_size(value) == nbytes


@given(st.integers(1, 2**50), st.sampled_from(["", "B", "KiB", "MiB", "GiB", "kB", "MB", "GB"]))
def test_integer_sizes_round_trip(count: int, unit: str) -> None:
    scale = {"": 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}.get(unit)
    scale = scale or {"kB": 1000, "MB": 1000**2, "GB": 1000**3}[unit]
    assert parse_size(f"{count}{unit}") == count * scale


@pytest.mark.parametrize(
    ("value", "allow_zero", "error", "message"),
    [
        ("8 GiBs", False, ValueError, r"budget: cannot parse '8 GiBs' as a size"),
        ("abc", False, ValueError, r"budget: cannot parse 'abc'"),
        ("", False, ValueError, r"budget: cannot parse ''"),
        ("-1MB", False, ValueError, r"budget must be positive, got '-1MB'"),
        ("-1MB", True, ValueError, r"budget must be non-negative, got '-1MB'"),
        (-5, True, ValueError, r"budget must be non-negative, got -5"),
        (0, False, ValueError, r"budget must be positive, got 0"),
        ("0B", False, ValueError, r"budget must be positive, got '0B'"),
        (1.5, False, ValueError, r"budget must be a whole number of bytes, got 1.5"),
        (float("nan"), False, ValueError, r"budget must be a whole number of bytes, got nan"),
        (float("inf"), False, ValueError, r"budget must be a whole number of bytes, got inf"),
        (True, False, TypeError, r"budget must be a byte count or a size string, got True"),
        (None, False, TypeError, r"budget must be a byte count or a size string, got NoneType"),
    ],
)
def test_bad_sizes_name_argument_and_value(
    value: object, allow_zero: bool, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        parse_size(value, "budget", allow_zero=allow_zero)


def test_zero_allowed_only_when_asked() -> None:
    assert parse_size(0, "host_budget", allow_zero=True) == 0
    assert parse_size("0GiB", "host_budget", allow_zero=True) == 0


def test_positive_int() -> None:
    assert check_positive_int(np.int32(3), "n") == 3
    for value, error, message in (
        (0, ValueError, "n must be positive, got 0"),
        (-2, ValueError, "n must be positive, got -2"),
        (2.0, TypeError, "n must be an int, got 2.0"),
        (True, TypeError, "n must be an int, got True"),
        ("3", TypeError, "n must be an int, got '3'"),
    ):
        with pytest.raises(error, match=message):
            check_positive_int(value, "n")


def _parts(a: sp.csr_array) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    return a.indptr.copy(), a.indices.copy(), a.data.copy(), a.shape


def test_valid_csr_passes_also_in_small_chunks() -> None:
    a = sp.random_array((50, 40), density=0.2, format="csr", rng=0)
    check_csr(*_parts(a), "A")
    check_csr(*_parts(a), "A", chunk=7)
    check_csr(np.zeros(1, np.int64), np.zeros(0, np.int64), None, (0, 5), "A")


def _break(kind: str) -> tuple:
    indptr, indices, data, shape = _parts(
        sp.csr_array(np.array([[1.0, 0, 2], [0, 0, 3], [4, 5, 0]]))
    )
    if kind == "indptr decreasing":
        indptr[1], indptr[2] = 2, 1
    elif kind == "indptr short":
        indptr = indptr[:-1]
    elif kind == "indptr start":
        indptr = indptr + 1
    elif kind == "index high":
        indices[3] = 3
    elif kind == "index negative":
        indices[4] = -1
    elif kind == "nan":
        data[2] = np.nan
    elif kind == "inf":
        data[0] = -np.inf
    elif kind == "float indices":
        indices = indices.astype(np.float64)
    elif kind == "string data":
        data = data.astype(str)
    elif kind == "data length":
        data = data[:-1]
    elif kind == "shape":
        shape = (3, -3)
    return indptr, indices, data, shape


@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [
        ("indptr decreasing", ValueError, r"A: indptr decreases at row 1 \(2 -> 1\)"),
        ("indptr short", ValueError, r"A: indptr has length 3, expected rows \+ 1 = 4"),
        ("indptr start", ValueError, r"A: indptr\[0\] must be 0, got 1"),
        ("index high", ValueError, r"A: column index 3 at position 3 is out of range \[0, 3\)"),
        ("index negative", ValueError, r"A: column index -1 at position 4 is out of range"),
        ("nan", ValueError, r"A: value nan at position 2 is not finite"),
        ("inf", ValueError, r"A: value -inf at position 0 is not finite"),
        ("float indices", TypeError, r"A: indices must have an integer dtype, got float64"),
        ("string data", TypeError, r"A: data must be real numbers, got dtype <U"),
        ("data length", ValueError, r"A: data has shape \(4,\), expected \(5,\) like indices"),
        ("shape", ValueError, r"A: shape must be two non-negative ints, got \(3, -3\)"),
    ],
)
def test_malformed_csr_named(kind: str, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        check_csr(*_break(kind), "A", chunk=2)
