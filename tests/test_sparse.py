"""SparseBatch: construction, validation with clear errors, and split/join that keeps item order."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recserve.errors import InvalidInputError
from recserve.sparse import SparseBatch


def make_sparse_batch(lengths: dict[str, list[int]], start: int = 0) -> SparseBatch:
    """Keys count up from `start` across tables, so every key is distinct and its place is known."""
    features, next_key = {}, start
    for table, table_lengths in lengths.items():
        keys = torch.arange(next_key, next_key + sum(table_lengths), dtype=torch.int64)
        next_key += keys.numel()
        features[table] = (keys, torch.tensor(table_lengths, dtype=torch.int64))
    return SparseBatch.from_lengths(features)


def test_docstring_example() -> None:
    batch = SparseBatch.from_lengths({"user": ([17, 17], [1, 1]), "hist": ([5, 9, 5], [2, 1])})
    assert batch.tables == ("user", "hist") and batch.num_items == 2
    assert batch.offsets["hist"].tolist() == [0, 2, 3]
    assert batch.lengths("hist").tolist() == [2, 1]
    second = batch.slice(1, 2)
    assert second.keys["hist"].tolist() == [5] and second.offsets["hist"].tolist() == [0, 1]


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ({"t": ([1, 2], [0, 3])}, "offsets end at 3 but there are 2 keys"),
        ({"t": ([1, 2], [3, -1])}, "lengths must be >= 0, got -1"),
        ({"t": ([1.0, 2.0], [1, 1])}, "table 't': keys must be int64, got float64"),
        ({"t": ([1, 2], [1.5, 0.5])}, "lengths must be int64"),
        ({"t": ([1], [1]), "u": ([1, 2], [1, 1])}, "table 'u': has 2 items, other tables have 1"),
        ({"t": ([[1, 2]], [2])}, r"keys must be 1-D, got shape \(1, 2\)"),
        ({}, "at least one table"),
        ({"t": (torch.tensor([1.0]), [1])}, "keys must be int64, got float32"),
        ({"t": (np.array([2**63], dtype=np.uint64), [1])}, "beyond the int64 range"),
    ],
)
def test_bad_batches_name_the_table_and_problem(features: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        SparseBatch.from_lengths(features)


def test_bad_offsets() -> None:
    with pytest.raises(InvalidInputError, match="offsets must start at 0, got 1"):
        SparseBatch.from_offsets({"t": ([1, 2], [1, 2])})
    with pytest.raises(InvalidInputError, match="offsets must not decrease"):
        SparseBatch.from_offsets({"t": ([1, 2], [0, 2, 1, 2])})


def test_select_to_and_empty() -> None:
    batch = make_sparse_batch({"a": [1, 2], "b": [0, 1]})
    assert batch.select(["b"]).tables == ("b",)
    with pytest.raises(InvalidInputError, match=r"lacks tables \['c'\]"):
        batch.select(["c"])
    assert batch.to("cpu").keys["a"].tolist() == batch.keys["a"].tolist()
    empty = SparseBatch.empty(["a"])
    assert empty.num_items == 0 and empty.split(4) == []
    with pytest.raises(InvalidInputError, match="items_per_batch must be > 0"):
        batch.split(0)


@given(
    lengths=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3)), min_size=1, max_size=40),
    per_batch=st.integers(1, 50),
)
def test_split_then_join_restores_every_key_in_item_order(lengths: list, per_batch: int) -> None:
    batch = make_sparse_batch({"a": [a for a, _ in lengths], "b": [b for _, b in lengths]})
    parts = batch.split(per_batch)
    assert [p.num_items for p in parts] == [min(per_batch, batch.num_items - s)
                                           for s in range(0, batch.num_items, per_batch)]
    for table in batch.tables:
        assert torch.cat([p.keys[table] for p in parts]).tolist() == batch.keys[table].tolist()
        assert torch.cat([p.lengths(table) for p in parts]).tolist() == batch.lengths(table).tolist()
        assert all(int(p.offsets[table][0]) == 0 for p in parts)


def test_read_only_request_buffers_are_shared_when_big_and_copied_when_small() -> None:
    """A request's arrays arrive in read-only bytes: a big one is shared (no copy, no warning), a small one copied."""
    big = np.frombuffer(np.arange(20_000, dtype=np.int64).tobytes(), dtype=np.int64)
    small = np.frombuffer(np.arange(10, dtype=np.int64).tobytes(), dtype=np.int64)
    lengths_big = np.frombuffer(np.full(250, 80, dtype=np.int64).tobytes(), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = SparseBatch.from_lengths({"big": (big, lengths_big)})
        small_batch = SparseBatch.from_lengths({"small": (small, np.ones(10, dtype=np.int64))})
    assert batch.keys["big"].data_ptr() == big.ctypes.data
    assert small_batch.keys["small"].data_ptr() != small.ctypes.data
    assert batch.keys["big"].tolist() == list(range(20_000))
    assert batch.offsets["big"][-1].item() == 20_000
    assert small_batch.keys["small"].tolist() == list(range(10))


def test_sharing_read_only_keys_warns_not_even_the_first_time_in_a_process() -> None:
    """torch warns once per process about tensors over read-only memory; the batch spends that warning silently."""
    code = """if True:
        import warnings
        import numpy as np
        from recserve.sparse import SparseBatch
        keys = np.frombuffer(np.arange(20_000, dtype=np.int64).tobytes(), dtype=np.int64)
        warnings.simplefilter("error")
        batch = SparseBatch.from_lengths({"t": (keys, np.full(250, 80))})
        assert batch.keys["t"].data_ptr() == keys.ctypes.data
    """
    subprocess.run([sys.executable, "-c", code], check=True)
