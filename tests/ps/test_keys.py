from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recserve.errors import InvalidInputError
from recserve.ps.keys import as_keys, unique_inverse


@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=300))
def test_unique_inverse_matches_first_appearance_order(values: list[int]) -> None:
    keys = np.asarray(values, dtype=np.int64)
    unique, inverse = unique_inverse(keys)
    assert unique.tolist() == list(dict.fromkeys(values))
    np.testing.assert_array_equal(unique[inverse], keys)


@pytest.mark.parametrize(
    "keys", [np.arange(3, dtype=np.int32), torch.arange(3), [0, 1, 2], np.arange(3, dtype=np.uint8)]
)
def test_integer_keys_convert_to_int64(keys: object) -> None:
    out = as_keys(keys, "t")
    assert out.dtype == np.int64 and out.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (np.array([1.0, 2.0]), "must be integers .* got dtype float64"),
        (np.array([True]), "must be integers .* got dtype bool"),
        (np.zeros((2, 3), dtype=np.int64), r"must be 1-D, got shape \(2, 3\)"),
        (np.array([2**64 - 1], dtype=np.uint64), "does not fit in int64"),
        ("1,2,3", "must be an array of int64, got str"),
    ],
)
def test_bad_keys_are_refused_naming_the_table(keys: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=f"table 't': keys {message}|table 't': key .*{message}"):
        as_keys(keys, "t")
