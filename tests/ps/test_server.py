"""HierarchicalPS: exact lookups across the DRAM and RocksDB tiers, promotion, writes, stats, bad input."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recserve.errors import InvalidInputError, NotFoundError
from recserve.ps.server import HierarchicalPS
from tests.conftest import cast_through, make_ps_config, make_table, replay_against_dict, rows_for

DIM = 8


def test_lookup_is_exact_through_a_small_dram_tier(ps: HierarchicalPS) -> None:
    keys = np.arange(200, dtype=np.int64)
    ps.import_table("t", keys, rows_for(keys, DIM))
    rng = np.random.default_rng(0)
    for _ in range(20):
        batch = rng.integers(0, 200, 64)
        np.testing.assert_array_equal(ps.lookup("t", batch).numpy(), rows_for(batch, DIM))
    stats = ps.stats().tables["t"]
    dram, rocks = stats.tiers["dram"], stats.tiers["rocksdb"]
    assert rocks.hits == dram.misses  # every DRAM miss was found below
    assert dram.held.rows <= dram.held.capacity_rows
    assert dram.held.evictions > 0


def test_rows_found_below_are_promoted_and_then_hit_in_dram(ps: HierarchicalPS) -> None:
    keys = np.arange(10, dtype=np.int64)
    ps.import_table("t", keys, rows_for(keys, DIM))
    ps.lookup("t", keys[:4])
    ps.lookup("t", keys[:4])
    tiers = ps.stats().tables["t"].tiers
    assert (tiers["dram"].hits, tiers["dram"].misses) == (4, 4)
    assert tiers["rocksdb"].hits == 4
    assert sorted(ps.tiers[0].table("t").held_keys().tolist()) == [0, 1, 2, 3]


def test_keys_found_nowhere_get_the_default_row_and_are_counted(tmp_path: Path) -> None:
    table = make_table(dram_capacity_rows=16, default_value=[float(i) for i in range(DIM)])
    with HierarchicalPS.from_config(make_ps_config(tmp_path / "s", [table])) as ps:
        ps.insert("t", [1], rows_for(np.array([1]), DIM))
        out = ps.lookup("t", [1, 5, 5, 6]).numpy()
        np.testing.assert_array_equal(out[0], rows_for(np.array([1]), DIM)[0])
        np.testing.assert_array_equal(out[1:], np.tile(np.arange(DIM, dtype=np.float32), (3, 1)))
        assert ps.stats().tables["t"].not_found == 2  # unique keys


def test_duplicate_keys_return_one_row_each_in_order(ps: HierarchicalPS) -> None:
    keys = np.array([3, 1, 3, 3, 2, 1], dtype=np.int64)
    ps.insert("t", np.array([1, 2, 3]), rows_for(np.array([1, 2, 3]), DIM))
    np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), rows_for(keys, DIM))
    assert ps.stats().tables["t"].unique_keys == 3


def test_insert_writes_both_tiers_and_update_refreshes_only_held_rows(ps: HierarchicalPS) -> None:
    keys = np.arange(6, dtype=np.int64)
    ps.insert("t", keys, rows_for(keys, DIM, version=1))
    dram, rocks = ps.tiers
    assert dram.lookup("t", keys).found.all() and rocks.lookup("t", keys).found.all()
    dram.evict("t", keys[3:])
    ps.update("t", keys, rows_for(keys, DIM, version=2))
    assert dram.lookup("t", keys).found.tolist() == [True] * 3 + [False] * 3  # no new rows from updates
    np.testing.assert_array_equal(rocks.lookup("t", keys).rows, rows_for(keys, DIM, version=2))
    np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), rows_for(keys, DIM, version=2))


def test_repeated_keys_in_one_write_keep_the_last_row(ps: HierarchicalPS) -> None:
    keys = np.array([7, 7, 8], dtype=np.int64)
    rows = np.stack([rows_for(np.array([7]), DIM, 1)[0], rows_for(np.array([7]), DIM, 2)[0],
                     rows_for(np.array([8]), DIM, 1)[0]])
    ps.insert("t", keys, rows)
    np.testing.assert_array_equal(ps.lookup("t", [7]).numpy()[0], rows[1])
    np.testing.assert_array_equal(ps.tiers[1].lookup("t", np.array([7])).rows[0], rows[1])


def test_import_replaces_the_table_and_drops_stale_dram_rows(ps: HierarchicalPS) -> None:
    keys = np.arange(10, dtype=np.int64)
    ps.import_table("t", keys, rows_for(keys, DIM, version=1))
    ps.lookup("t", keys)  # now in DRAM
    ps.import_table("t", keys[:5], rows_for(keys[:5], DIM, version=2))
    np.testing.assert_array_equal(ps.lookup("t", keys[:5]).numpy(), rows_for(keys[:5], DIM, version=2))
    assert (ps.lookup("t", keys[5:]).numpy() == 0).all()  # gone with the old import


def test_empty_batch_returns_an_empty_tensor(ps: HierarchicalPS) -> None:
    out = ps.lookup("t", np.array([], dtype=np.int64))
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (0, DIM) and out.dtype == torch.float32
    assert tuple(ps.lookup("t", []).shape) == (0, DIM)


def test_bad_input_is_refused_and_leaves_the_store_as_it_was(ps: HierarchicalPS) -> None:
    keys = np.arange(4, dtype=np.int64)
    ps.insert("t", keys, rows_for(keys, DIM))
    with pytest.raises(NotFoundError, match=r"unknown table 'nope' \(known: t\)"):
        ps.lookup("nope", keys)
    with pytest.raises(InvalidInputError, match="got dtype float32"):
        ps.lookup("t", keys.astype(np.float32))
    with pytest.raises(InvalidInputError, match=r"got shape \(2, 2\)"):
        ps.lookup("t", keys.reshape(2, 2))
    with pytest.raises(InvalidInputError, match=r"shape \(4, 8\) for 4 keys, got \(4, 9\)"):
        ps.insert("t", keys, np.zeros((4, DIM + 1), np.float32))
    with pytest.raises(InvalidInputError, match="floating point"):
        ps.update("t", keys, np.zeros((4, DIM), np.int64))
    np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), rows_for(keys, DIM))


def test_works_with_only_the_persistent_tier(tmp_path: Path) -> None:
    config = make_ps_config(tmp_path / "s", [make_table()], dram=False)
    with HierarchicalPS.from_config(config) as ps:
        ps.update("t", [1, 2], rows_for(np.array([1, 2]), DIM))  # the last tier takes every update
        np.testing.assert_array_equal(ps.lookup("t", [2, 1]).numpy(), rows_for(np.array([2, 1]), DIM))
        assert [t.name for t in ps.tiers] == ["rocksdb"]


write_ops = st.tuples(
    st.sampled_from(["insert", "update", "lookup", "evict"]),
    st.lists(st.integers(0, 30), min_size=1, max_size=12),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(write_ops, min_size=1, max_size=25))
def test_ps_behaves_like_a_dict(tmp_path_factory: pytest.TempPathFactory, ops: list) -> None:
    """Whatever the DRAM tier evicts, the PS answers like a dict of the last rows written."""
    store = tmp_path_factory.mktemp("store")
    config = make_ps_config(store, [make_table(dram_capacity_rows=6)], partitions=2, target=0.5)
    with HierarchicalPS.from_config(config) as ps:
        replay_against_dict(ps, "t", ops, DIM)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_tables_store_2_bytes_in_both_tiers_and_return_float32(tmp_path: Path, dtype: str) -> None:
    config = make_ps_config(tmp_path / "s", [make_table(dtype=dtype, dram_capacity_rows=8)], partitions=2)
    keys = np.arange(40, dtype=np.int64)
    rows = np.random.default_rng(0).normal(size=(40, DIM)).astype(np.float32)
    expected = cast_through(rows, dtype)
    with HierarchicalPS.from_config(config) as ps:
        ps.import_table("t", keys, rows)
        for _ in range(2):  # first from RocksDB, then partly from DRAM after promotion
            out = ps.lookup("t", keys[:10])
            assert out.dtype == torch.float32
            np.testing.assert_array_equal(out.numpy(), expected[:10])
        assert ps.stats().tables["t"].tiers["dram"].hits > 0


def test_a_write_beyond_float16_is_refused_before_either_tier_changes(tmp_path: Path) -> None:
    config = make_ps_config(tmp_path / "s", [make_table(dtype="float16", dram_capacity_rows=8)], partitions=2)
    keys = np.arange(4, dtype=np.int64)
    with HierarchicalPS.from_config(config) as ps:
        ps.insert("t", keys, rows_for(keys, DIM))
        too_big = rows_for(keys, DIM, version=1)
        too_big[2, 0] = -7e4
        for write in (ps.insert, ps.update):
            with pytest.raises(InvalidInputError, match="table 't': row 2, column 0 holds -70000, beyond the range"):
                write("t", keys, too_big)
            for tier in ps.tiers:  # RocksDB (written first) and the DRAM tier both hold the old rows
                np.testing.assert_array_equal(tier.lookup("t", keys).rows, cast_through(rows_for(keys, DIM), "float16"))


def test_a_promotion_never_lands_over_a_newer_update(ps: HierarchicalPS) -> None:
    keys = np.arange(4, dtype=np.int64)
    ps.import_table("t", keys, rows_for(keys, DIM, version=1))
    dram = ps.tiers[0]
    token = dram.update_token("t")  # a lookup starts and reads version 1 from RocksDB ...
    ps.update("t", keys, rows_for(keys, DIM, version=2))  # ... an update lands meanwhile ...
    dram.insert("t", keys, rows_for(keys, DIM, version=1), unless_updated_since=token)  # ... then it promotes
    assert not dram.lookup("t", keys).found.any()  # the stale promotion was dropped
    np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), rows_for(keys, DIM, version=2))


def test_an_update_during_a_lookup_is_not_undone_by_its_promotion(tmp_path: Path) -> None:
    """The lookup reads RocksDB, an update lands, then the lookup promotes: the promotion must be dropped."""
    import threading

    from recserve.config import DramTierConfig, RocksTierConfig
    from recserve.ps.dram import DramTier
    from recserve.ps.rocks import RocksTier

    read_done, update_done = threading.Event(), threading.Event()

    class PausingRocksTier(RocksTier):  # the real tier, paused between its read and the caller's promotion
        pause = False

        def lookup(self, table: str, keys: np.ndarray):
            result = super().lookup(table, keys)
            if self.pause:
                read_done.set()
                update_done.wait(timeout=60)
            return result

    table = make_table(dram_capacity_rows=16)
    rocks = PausingRocksTier(RocksTierConfig(path=tmp_path / "s"), [table])
    dram = DramTier.create([table], DramTierConfig(num_partitions=2))
    keys = np.arange(4, dtype=np.int64)
    with HierarchicalPS([table], [dram, rocks]) as ps:
        ps.import_table("t", keys, rows_for(keys, DIM, version=1))
        rocks.pause = True
        seen = {}
        reader = threading.Thread(target=lambda: seen.setdefault("rows", ps.lookup("t", keys).numpy()))
        reader.start()
        assert read_done.wait(timeout=60)
        rocks.pause = False
        ps.update("t", keys, rows_for(keys, DIM, version=2))
        update_done.set()
        reader.join(timeout=60)
        np.testing.assert_array_equal(seen["rows"], rows_for(keys, DIM, version=1))  # read before the update
        assert not dram.lookup("t", keys).found.any()  # its promotion was dropped
        np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), rows_for(keys, DIM, version=2))


# --- pooled lookups ---------------------------------------------------------------------------------------


def pool_reference(reference: dict[int, np.ndarray], keys: list[int], offsets: np.ndarray, mode: str,
                   default: np.ndarray) -> np.ndarray:
    """Each bag's rows from a plain dict, pooled in plain Python."""
    bags = []
    for start, stop in itertools.pairwise(offsets):
        rows = [reference.get(k, default) for k in keys[start:stop]]
        total = np.sum(rows, axis=0, dtype=np.float64) if rows else np.zeros(default.size)
        bags.append(total / max(len(rows), 1) if mode == "mean" else total)
    return np.array(bags, dtype=np.float32).reshape(len(bags), default.size)


pooled_ops = st.tuples(
    st.sampled_from(["insert", "update", "evict", "pool"]),
    st.lists(st.integers(0, 30), min_size=0, max_size=24),
    st.lists(st.integers(0, 24), max_size=6),  # where bags end (sorted); empty and repeated cuts allowed
    st.sampled_from(["sum", "mean"]),
)


@pytest.mark.parametrize("capacity", [6, 1000], ids=["small-dram-deduplicates", "big-dram-fuses"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(pooled_ops, min_size=1, max_size=20))
def test_pooled_lookups_equal_pooling_a_dicts_rows(tmp_path_factory: pytest.TempPathFactory, capacity: int,
                                                   ops: list) -> None:
    """Through a DRAM tier that evicts (its hits pooled, its misses read from RocksDB and promoted), every bag
    pools the last rows written, with the default row for keys never written."""
    store = tmp_path_factory.mktemp("store")
    default = np.arange(DIM, dtype=np.float32) / 10
    config = make_ps_config(store, [make_table(dram_capacity_rows=capacity, default_value=default.tolist())],
                            partitions=2, target=0.5)
    reference: dict[int, np.ndarray] = {}
    with HierarchicalPS.from_config(config) as ps:
        for step, (kind, keys, cuts, mode) in enumerate(ops):
            keys_arr = np.asarray(keys, dtype=np.int64)
            if kind in ("insert", "update") and keys:
                rows = rows_for(keys_arr, DIM, version=step)
                getattr(ps, kind)("t", keys_arr, rows)
                reference.update(zip(keys, rows, strict=True))
            elif kind == "evict":
                ps.tiers[0].evict("t", np.unique(keys_arr))
            offsets = np.array([0, *sorted(min(c, len(keys)) for c in cuts), len(keys)], dtype=np.int64)
            pooled = ps.lookup_pooled("t", keys_arr, offsets, mode)
            expected = pool_reference(reference, keys, offsets, mode, default)
            np.testing.assert_allclose(pooled, expected, rtol=1e-6)


# Eight tables pooled in one call (ONE_CALL_MIN_TABLES and up): six float32 tables with room for their keys
# (the DRAM tier's one compiled call), one too small for a batch (deduplicated on its own), one float16 and one
# bfloat16.
MANY_TABLES = [make_table(f"m{i}", dram_capacity_rows=1000) for i in range(6)] + [
    make_table("small", dram_capacity_rows=6), make_table("half", dtype="float16", dram_capacity_rows=1000),
    make_table("brain", dtype="bfloat16", dram_capacity_rows=1000)]
DTYPES = {t.name: t.dtype for t in MANY_TABLES}
many_ops = st.tuples(
    st.sampled_from(["insert", "update", "evict", "pool"]),
    st.sampled_from([t.name for t in MANY_TABLES]),  # the table written or evicted
    st.lists(st.lists(st.integers(0, 30), max_size=12), min_size=len(MANY_TABLES), max_size=len(MANY_TABLES)),
    st.integers(1, 4),  # bags per table, cut evenly
    st.sampled_from(["sum", "mean"]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(many_ops, min_size=1, max_size=12))
def test_pooling_many_tables_in_one_call_equals_pooling_a_dicts_rows(tmp_path_factory: pytest.TempPathFactory,
                                                                     ops: list) -> None:
    """lookup_pooled_tables over eight tables (one call to the DRAM tier for most): every bag of every table
    pools the last rows written to that table, misses read from RocksDB, keys never written get zeros."""
    from recserve.ps.server import ONE_CALL_MIN_TABLES

    assert len(MANY_TABLES) >= ONE_CALL_MIN_TABLES
    store = tmp_path_factory.mktemp("store")
    names = [t.name for t in MANY_TABLES]
    reference: dict[str, dict[int, np.ndarray]] = {name: {} for name in names}
    zeros = np.zeros(DIM, dtype=np.float32)
    with HierarchicalPS.from_config(make_ps_config(store, MANY_TABLES, partitions=2, target=0.5)) as ps:
        for step, (kind, table, keys, num_bags, mode) in enumerate(ops):
            written = np.asarray(keys[0], dtype=np.int64)
            if kind in ("insert", "update") and written.size:
                rows = rows_for(written, DIM, version=step)
                rows = cast_through(rows, DTYPES[table])  # what a 16-bit table gives back
                getattr(ps, kind)(table, written, rows)
                reference[table].update(zip(keys[0], rows, strict=True))
            elif kind == "evict":
                ps.tiers[0].evict(table, np.unique(written))
            asked = [np.asarray(k, dtype=np.int64) for k in keys]
            offsets = [np.linspace(0, k.size, num_bags + 1).astype(np.int64) for k in asked]
            before = {name: ps.stats().tables[name] for name in names}
            pooled = ps.lookup_pooled_tables(names, asked, offsets, mode)
            for name, k, o, got in zip(names, keys, offsets, pooled, strict=True):
                expected = pool_reference(reference[name], k, o, mode, zeros)
                np.testing.assert_allclose(got, expected, rtol=1e-6 if DTYPES[name] == "float32" else 1e-3)
                after = ps.stats().tables[name]
                assert (after.lookups - before[name].lookups, after.keys - before[name].keys) == (1, len(k))


def test_pooling_many_tables_refuses_bad_input_naming_the_table(ps: HierarchicalPS) -> None:
    keys = np.arange(4, dtype=np.int64)
    with pytest.raises(InvalidInputError, match="2 tables, 1 key arrays and 2 offset arrays"):
        ps.lookup_pooled_tables(["t", "t"], [keys], [[0, 4], [0, 4]])
    with pytest.raises(NotFoundError, match="unknown table 'nope'"):
        ps.lookup_pooled_tables(["t", "nope"], [keys, keys], [[0, 4], [0, 4]])
    with pytest.raises(InvalidInputError, match=r"table 't': offsets must run from 0 to the 4 keys"):
        ps.lookup_pooled_tables(["t", "t"], [keys, keys], [[0, 4], [0, 3]])
    with pytest.raises(InvalidInputError, match="pooling mode"):
        ps.lookup_pooled_tables(["t"], [keys], [[0, 4]], "max")


@pytest.mark.parametrize(("dram", "capacity", "num_asked"), [
    (True, 40_000, 8_000),  # the fused kernel, parallel: a batch small next to the table
    (True, 40_000, 1_000),  # the fused kernel on the caller's thread
    (True, 2_000, 20_000),  # deduplicated first: the batch repeats most keys of the table
    (False, 0, 20_000),  # no DRAM tier: RocksDB reads, pooled
], ids=["fused-parallel", "fused-serial", "deduplicated", "rocksdb-only"])
def test_pooled_lookups_match_embedding_bag_over_the_rows(tmp_path: Path, dram: bool, capacity: int,
                                                         num_asked: int) -> None:
    keys = np.arange(3000, dtype=np.int64)
    config = make_ps_config(tmp_path / "s", [make_table(dram_capacity_rows=capacity or None)], dram=dram)
    rng = np.random.default_rng(0)
    asked = rng.integers(0, 3100, num_asked)  # 100 keys nowhere: the default row, zeros
    rows = torch.from_numpy(rows_for(asked, DIM) * (asked < 3000)[:, None])
    lengths = rng.integers(0, num_asked // 500, 500)  # half the keys, some bags empty ...
    lengths[-1] += asked.size - lengths.sum()  # ... and the other half in one long bag at the end
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    with HierarchicalPS.from_config(config) as ps:
        ps.import_table("t", keys, rows_for(keys, DIM))
        ps.lookup("t", keys[::3])  # a third promoted into the DRAM tier, the rest only in RocksDB
        for _ in range(2):  # then all of them, promoted by the first round
            for mode in ("sum", "mean"):
                expected = torch.nn.functional.embedding_bag(
                    torch.arange(asked.size), rows, torch.from_numpy(offsets), mode=mode, include_last_offset=True
                )
                np.testing.assert_allclose(ps.lookup_pooled("t", asked, offsets, mode), expected.numpy(),
                                           rtol=1e-5)
        if capacity > keys.size:  # the table fits: the second round found every key it holds in DRAM
            assert ps.stats().tables["t"].tiers["dram"].hits >= int((asked < 3000).sum())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_tables_pool_their_float32_rows(tmp_path: Path, dtype: str) -> None:
    config = make_ps_config(tmp_path / "s", [make_table(dtype=dtype, dram_capacity_rows=8)], partitions=2)
    keys = np.arange(40, dtype=np.int64)
    rows = np.random.default_rng(0).normal(size=(40, DIM)).astype(np.float32)
    with HierarchicalPS.from_config(config) as ps:
        ps.import_table("t", keys, rows)
        asked, offsets = np.array([1, 2, 2, 30, 5]), np.array([0, 3, 3, 5])
        for _ in range(2):
            expected = ps.lookup("t", asked).numpy()
            pooled = ps.lookup_pooled("t", asked, offsets)
            np.testing.assert_allclose(pooled, [expected[:3].sum(0), np.zeros(DIM), expected[3:].sum(0)],
                                       rtol=1e-6)


@pytest.mark.parametrize(("capacity", "dram_hits", "unique_keys"), [
    (1000, 3, 4),  # fused: the DRAM tier reads key 1 twice and counts both
    (4, 2, 3),  # a batch large next to the table: deduplicated before the DRAM tier reads it
])
def test_pooled_lookups_count_what_each_tier_read(tmp_path: Path, capacity: int, dram_hits: int,
                                                  unique_keys: int) -> None:
    config = make_ps_config(tmp_path / "s", [make_table(dram_capacity_rows=capacity)], partitions=2)
    with HierarchicalPS.from_config(config) as ps:
        ps.import_table("t", np.arange(10, dtype=np.int64), rows_for(np.arange(10), DIM))
        ps.lookup("t", [1, 2])  # promoted into the DRAM tier
        before = ps.stats().tables["t"]
        ps.lookup_pooled("t", [1, 1, 2, 7, 7, 7], [0, 3, 6])  # 7 only in RocksDB
        after = ps.stats().tables["t"]
    assert after.tiers["dram"].hits - before.tiers["dram"].hits == dram_hits
    assert after.tiers["dram"].misses - before.tiers["dram"].misses == 1  # misses: distinct keys, always
    assert after.tiers["rocksdb"].hits - before.tiers["rocksdb"].hits == 1
    assert (after.keys - before.keys, after.unique_keys - before.unique_keys) == (6, unique_keys)


def test_bad_bags_are_refused_with_what_is_wrong(ps: HierarchicalPS) -> None:
    keys = np.arange(4, dtype=np.int64)
    ps.insert("t", keys, rows_for(keys, DIM))
    with pytest.raises(InvalidInputError, match=r"from 0 to the 4 keys, got 1\.\.4"):
        ps.lookup_pooled("t", keys, [1, 4])
    with pytest.raises(InvalidInputError, match=r"from 0 to the 4 keys, got 0\.\.5"):
        ps.lookup_pooled("t", keys, [0, 5])
    with pytest.raises(InvalidInputError, match="must not decrease"):
        ps.lookup_pooled("t", keys, [0, 3, 2, 4])
    with pytest.raises(InvalidInputError, match="offsets must be a non-empty 1-D integer array, got float64"):
        ps.lookup_pooled("t", keys, [0.0, 4.0])
    with pytest.raises(InvalidInputError, match="non-empty"):
        ps.lookup_pooled("t", keys, [])
    with pytest.raises(InvalidInputError, match="pooling mode must be 'sum' or 'mean', got 'max'"):
        ps.lookup_pooled("t", keys, [0, 4], "max")
    with pytest.raises(NotFoundError, match="unknown table 'nope'"):
        ps.lookup_pooled("nope", keys, [0, 4])
    assert ps.lookup_pooled("t", [], [0]).shape == (0, DIM)  # no bags
    np.testing.assert_array_equal(ps.lookup_pooled("t", [], [0, 0]), np.zeros((1, DIM)))  # one empty bag
    np.testing.assert_array_equal(ps.lookup_pooled("t", keys, [0, 4]), rows_for(keys, DIM).sum(0, keepdims=True))
