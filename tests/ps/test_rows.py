"""Row storage types: 16-bit rows survive the round trip through their stored bits exactly as a cast would."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from recserve.errors import InvalidInputError
from recserve.ps.rows import STORAGE_DTYPE, from_bytes, row_bytes, to_float32, to_storage
from tests.conftest import cast_through

float32_rows = arrays(np.float32, st.tuples(st.integers(0, 5), st.integers(1, 9)),
                      elements=st.floats(width=32, allow_nan=True, allow_infinity=True))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the reference's own float16 cast
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@given(rows=float32_rows)
def test_the_round_trip_equals_a_cast_there_and_back_or_refuses_an_overflow(dtype: str, rows: np.ndarray) -> None:
    expected = cast_through(rows, dtype)
    overflowed = np.isinf(expected) & np.isfinite(rows)
    if overflowed.any():
        with pytest.raises(InvalidInputError, match=f"table 't': row .* beyond the range of {dtype}"):
            to_storage(rows, dtype, "t")
        return
    stored = to_storage(rows, dtype, "t")
    assert stored.dtype == STORAGE_DTYPE[dtype] and stored.shape == rows.shape and stored.flags.c_contiguous
    back = to_float32(stored, dtype)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, expected)  # NaN where NaN, signed zeros, infinities sent as such


@pytest.mark.parametrize(("dtype", "value"), [
    ("float16", 7e4), ("float16", -1e5), ("bfloat16", 3.4e38), ("bfloat16", 1e39), ("float32", -1e39)])
def test_a_value_beyond_the_dtype_is_named_with_its_row(dtype: str, value: float) -> None:
    rows = np.zeros((4, 3), dtype=np.float64)  # float64 rows, as a user's arrays often are
    rows[2, 1] = value
    rows[3, 0] = np.inf  # an infinity sent is stored as one
    message = re.escape(f"table 'u': row 12, column 1 holds {value:g}, beyond the range of {dtype} (largest ")
    with pytest.raises(InvalidInputError, match=message + r".*\); 1 value\(s\) in all"):
        to_storage(rows, dtype, "u", row_numbers=np.array([0, 5, 12, 20]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rows_read_back_from_raw_bytes(dtype: str) -> None:
    rows = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    raw = to_storage(rows, dtype, "t").tobytes()
    assert len(raw) == 3 * row_bytes(dtype, 5) == 3 * 5 * 2
    np.testing.assert_array_equal(from_bytes(raw, dtype, 5), cast_through(rows, dtype))


def test_bfloat16_rounds_to_nearest_even_and_keeps_float32_range() -> None:
    # 1 + 2^-8 lies halfway between bfloat16's 1 and 1 + 2^-7: to even, 1; 1 + 3 * 2^-8 goes up to 1 + 2^-6.
    rows = np.array([[1 + 2**-8, 1 + 3 * 2**-8, 3e38, -1e-38]], dtype=np.float32)
    back = to_float32(to_storage(rows, "bfloat16", "t"), "bfloat16")
    assert back[0, 0] == 1.0 and back[0, 1] == 1 + 2**-6
    assert np.isfinite(back).all() and back[0, 3] < 0  # float16 would overflow 3e38 and flush -1e-38 to -0
    np.testing.assert_allclose(back, rows, rtol=2**-8)


def test_read_only_rows_convert_without_a_warning() -> None:
    rows = np.ones((2, 4), dtype=np.float32)  # as rows memory-mapped from an import file arrive
    rows.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it is handed memory it may not write
        stored = to_storage(rows, "bfloat16", "t")
    np.testing.assert_array_equal(to_float32(stored, "bfloat16"), rows)
