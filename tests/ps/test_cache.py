"""Device embedding cache: each variant against a plain-Python reference, and as the first tier of the PS."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recserve.config import DeviceCacheConfig, PSConfig
from recserve.errors import InvalidInputError
from recserve.ps.cache import CacheTier, EmbeddingCache, ShardedCache, StaticCache
from recserve.ps.server import HierarchicalPS
from tests.conftest import make_ps_config, make_table, replay_against_dict, rows_for

DIM = 4


@dataclass
class Entry:
    row: np.ndarray
    uses: int
    last_used: int


class ReferenceCache:
    """The documented semantics, one key at a time: a new key replaces the lowest-priority entry of its set."""

    def __init__(self, cache: EmbeddingCache) -> None:
        self.cache, self.ways, self.policy = cache, cache.ways, cache.policy
        self.sets: dict[int, dict[int, Entry]] = {}
        self.clock = 0

    def _set(self, key: int) -> dict[int, Entry]:
        index = int(self.cache.sets_of(torch.tensor([key]))[0])
        return self.sets.setdefault(index, {})

    def _use(self, entry: Entry, time: int) -> None:
        entry.uses += 1
        entry.last_used = time

    def query(self, keys: list[int]) -> tuple[np.ndarray, np.ndarray]:
        rows, hit = np.zeros((len(keys), DIM), np.float32), np.zeros(len(keys), bool)
        for i, key in enumerate(keys):
            entry = self._set(key).get(key)
            if entry is not None:
                rows[i], hit[i] = entry.row, True
                self._use(entry, self.clock + i)
        self.clock += len(keys)
        return rows, hit

    def insert(self, keys: list[int], rows: np.ndarray) -> None:
        last = {key: i for i, key in enumerate(keys)}
        batch = sorted(last.items(), key=lambda item: item[1])
        held = {key for key, _ in batch if key in self._set(key)}
        for key, i in batch:  # held keys first: they take the new row, as a use
            if key in held:
                entry = self._set(key)[key]
                entry.row = rows[i]
                self._use(entry, self.clock + i)
        for key, i in batch:
            if key in held:
                continue
            members = self._set(key)
            if len(members) == self.ways:
                del members[min(members, key=self._priority(members))]
            members[key] = Entry(rows[i], 1, self.clock + i)
        self.clock += len(keys)

    def _priority(self, members: dict[int, Entry]) -> Callable[[int], object]:
        if self.policy == "lfu":
            return lambda key: (members[key].uses, members[key].last_used)
        return lambda key: members[key].last_used

    def update(self, keys: list[int], rows: np.ndarray) -> int:
        refreshed = set()
        for i, key in enumerate(keys):
            entry = self._set(key).get(key)
            if entry is not None:
                entry.row = rows[i]
                refreshed.add(key)
        return len(refreshed)

    def invalidate(self, keys: list[int]) -> int:
        return sum(self._set(key).pop(key, None) is not None for key in set(keys))

    def held(self) -> list[int]:
        return sorted(key for members in self.sets.values() for key in members)


def one_set_keys(cache: EmbeddingCache, count: int = 24) -> list[int]:
    """Keys that all hash to the set of key 0: the worst case for a batch insert."""
    candidates = torch.arange(200_000)
    same = candidates[cache.sets_of(candidates) == cache.sets_of(torch.tensor([0]))[0]]
    return same[:count].tolist()


cache_ops = st.lists(
    st.tuples(st.sampled_from(["insert", "insert", "query", "update", "invalidate"]),
              st.lists(st.integers(0, 23), min_size=0, max_size=20)),
    min_size=1, max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(policy=st.sampled_from(["lru", "lfu"]), num_rows=st.integers(1, 24), ways=st.integers(1, 6),
       one_set=st.booleans(), ops=cache_ops)
def test_embedding_cache_behaves_like_the_reference(policy: str, num_rows: int, ways: int, one_set: bool,
                                                      ops: list) -> None:
    cache = EmbeddingCache(num_rows, DIM, ways=ways, policy=policy)
    reference = ReferenceCache(cache)
    pool = one_set_keys(cache) if one_set else list(range(24))
    for step, (kind, picks) in enumerate(ops):
        keys = [pool[p] for p in picks]
        rows = rows_for(np.asarray(keys, dtype=np.int64), DIM, version=step)
        keys_t = torch.tensor(keys, dtype=torch.int64)
        if kind == "query":
            got_rows, got_hit = cache.query(keys_t)
            want_rows, want_hit = reference.query(keys)
            np.testing.assert_array_equal(got_hit.numpy(), want_hit)
            np.testing.assert_array_equal(got_rows.numpy(), want_rows)
        elif kind == "insert":
            cache.insert(keys_t, torch.from_numpy(rows))
            reference.insert(keys, rows)
        elif kind == "update":
            assert cache.update(keys_t, torch.from_numpy(rows)) == reference.update(keys, rows)
        else:
            assert cache.invalidate(keys_t) == reference.invalidate(keys)
        assert sorted(cache.held_keys().tolist()) == reference.held()
        assert cache.stats().rows == len(reference.held()) <= cache.capacity_rows


def test_a_batch_of_keys_all_in_one_set_fills_it_once_without_duplicates() -> None:
    cache = EmbeddingCache(64, DIM, ways=4)
    keys = one_set_keys(cache, 10)
    rows = rows_for(np.asarray(keys), DIM)
    cache.insert(torch.tensor(keys), torch.from_numpy(rows))
    assert sorted(cache.held_keys().tolist()) == sorted(keys[-4:])  # the last four, as one at a time
    got, hit = cache.query(torch.tensor(keys))
    assert hit.tolist() == [False] * 6 + [True] * 4
    np.testing.assert_array_equal(got.numpy()[6:], rows[6:])
    assert cache.stats().inserts == 4 and cache.stats().evictions == 0


def test_lfu_keeps_frequently_used_rows_that_lru_would_drop() -> None:
    caches = {policy: EmbeddingCache(2, DIM, ways=2, policy=policy) for policy in ("lru", "lfu")}
    hot, cold = one_set_keys(caches["lru"], 3)[:2], one_set_keys(caches["lru"], 3)[2]
    for cache in caches.values():
        cache.insert(torch.tensor(hot), torch.from_numpy(rows_for(np.asarray(hot), DIM)))
        for _ in range(5):
            cache.query(torch.tensor([hot[0]]))
        cache.query(torch.tensor([hot[1]]))  # most recent, used less
        cache.insert(torch.tensor([cold]), torch.from_numpy(rows_for(np.asarray([cold]), DIM)))
    assert sorted(caches["lru"].held_keys().tolist()) == sorted([hot[1], cold])
    assert sorted(caches["lfu"].held_keys().tolist()) == sorted([hot[0], cold])


def test_the_lowest_int64_key_marks_empty_slots_and_is_never_cached() -> None:
    cache = EmbeddingCache(16, DIM)
    lowest = torch.iinfo(torch.int64).min
    assert not cache.query(torch.tensor([lowest]))[1].any()  # an empty slot is no hit
    cache.insert(torch.tensor([lowest, 5]), torch.ones(2, DIM))
    assert cache.query(torch.tensor([lowest, 5]))[1].tolist() == [False, True]
    assert cache.held_keys().tolist() == [5]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_storage_returns_float32_rounded_rows(dtype: torch.dtype) -> None:
    cache = EmbeddingCache(16, DIM, dtype=dtype)
    rows = torch.randn(5, DIM)
    cache.insert(torch.arange(5), rows)
    got, hit = cache.query(torch.arange(5))
    assert hit.all() and got.dtype == torch.float32
    torch.testing.assert_close(got, rows.to(dtype).float(), rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(1, 20), ops=cache_ops)
def test_static_cache_behaves_like_a_bounded_dict(capacity: int, ops: list) -> None:
    cache = StaticCache(capacity, DIM)
    rows_of: dict[int, np.ndarray] = {}
    placed: list[int] = []  # keys that took a place; invalidation keeps the place
    for step, (kind, keys) in enumerate(ops):
        rows = rows_for(np.asarray(keys, dtype=np.int64), DIM, version=step)
        keys_t = torch.tensor(keys, dtype=torch.int64)
        if kind == "query":
            got, hit = cache.query(keys_t)
            assert hit.tolist() == [k in rows_of for k in keys]
            for i, key in enumerate(keys):
                np.testing.assert_array_equal(got[i].numpy(), rows_of.get(key, np.zeros(DIM, np.float32)))
        elif kind == "insert":
            cache.insert(keys_t, torch.from_numpy(rows))
            last = {key: i for i, key in enumerate(keys)}
            for key, i in sorted(last.items(), key=lambda item: item[1]):
                if key in placed or len(placed) < capacity:
                    placed += [] if key in placed else [key]
                    rows_of[key] = rows[i]
        elif kind == "update":
            assert cache.update(keys_t, torch.from_numpy(rows)) == len({k for k in keys if k in rows_of})
            rows_of.update((k, rows[i]) for i, k in enumerate(keys) if k in rows_of)
        else:
            assert cache.invalidate(keys_t) == len({k for k in keys if k in rows_of})
            for key in keys:
                rows_of.pop(key, None)
        assert sorted(cache.held_keys().tolist()) == sorted(rows_of)


@pytest.mark.parametrize("replicate", [False, True])
def test_sharded_cache_splits_keys_or_replicates(replicate: bool) -> None:
    shards = [EmbeddingCache(4096, DIM) for _ in range(4)]
    cache = ShardedCache(shards, replicate=replicate)
    keys = torch.arange(1000) * 7919
    rows = torch.from_numpy(rows_for(keys.numpy(), DIM))
    cache.insert(keys, rows)
    held = [set(s.held_keys().tolist()) for s in shards]
    if replicate:
        assert all(h == set(keys.tolist()) for h in held)
    else:
        assert sum(len(h) for h in held) == 1000 and set().union(*held) == set(keys.tolist())
        assert all(150 < len(h) < 350 for h in held)  # the hash spreads keys
    for _ in range(4):  # replicas answer in turn; each must be whole
        got, hit = cache.query(keys)
        assert hit.all()
        torch.testing.assert_close(got, rows, rtol=0, atol=0)
    assert cache.update(keys[:10], rows[:10] + 1) == 10
    assert cache.invalidate(keys[:10]) == 10
    assert cache.query(keys[:10])[1].sum() == 0
    assert cache.stats().rows == 990


def test_bad_cache_parameters_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="positive"):
        EmbeddingCache(0, DIM)
    with pytest.raises(InvalidInputError, match="unknown policy 'fifo'"):
        EmbeddingCache(8, DIM, policy="fifo")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="at least one shard"):
        ShardedCache([])


# --- as a tier of the parameter server ---------------------------------------------------------------------


def cached_ps(store: Path, *, threshold: float, compat: bool = False, mode: str = "dynamic",
              rows: int = 32, shards: int = 1) -> HierarchicalPS:
    base = make_ps_config(store, [make_table(dim=DIM, dram_capacity_rows=12, rows=rows)], partitions=2)
    cache = DeviceCacheConfig(enabled=True, fraction=0.25, ways=2, hit_rate_threshold=threshold,
                              hps_compat_default_on_miss=compat, mode=mode, devices=["cpu"] * shards)
    return HierarchicalPS.from_config(PSConfig(tables=base.tables, cache=cache, dram=base.dram, rocksdb=base.rocksdb))


ps_ops = st.lists(
    st.tuples(st.sampled_from(["insert", "update", "lookup", "lookup", "evict"]),
              st.lists(st.integers(0, 31), min_size=1, max_size=12)),
    min_size=1, max_size=25,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(threshold=st.sampled_from([0.0, 0.5, 1.0]), shards=st.sampled_from([1, 2]), ops=ps_ops)
def test_ps_with_a_cache_behaves_like_a_dict(tmp_path_factory: pytest.TempPathFactory, threshold: float,
                                             shards: int, ops: list) -> None:
    """Sync or background fills, cache evictions, updates: every answer is the last row written."""
    with cached_ps(tmp_path_factory.mktemp("store"), threshold=threshold, shards=shards) as ps:
        assert [tier.name for tier in ps.tiers] == ["cache", "dram", "rocksdb"]
        reference = replay_against_dict(ps, "t", ops, DIM)
        ps.tiers[0].drain()
        held = ps.tiers[0].cache("t").held_keys().numpy()
        got, hit = ps.tiers[0].cache("t").query(torch.from_numpy(held))
        assert hit.all()
        np.testing.assert_array_equal(got.numpy(), np.stack([reference[k] for k in held.tolist()])
                                      if held.size else np.empty((0, DIM), np.float32))


def test_lookups_fill_the_cache_and_then_hit_it(tmp_path: Path) -> None:
    keys = np.arange(32, dtype=np.int64)
    for threshold in (1.0, 0.0):  # below the threshold: filled before answering; at or over it: in the background
        with cached_ps(tmp_path / f"s{threshold}", threshold=threshold) as ps:
            ps.import_table("t", keys, rows_for(keys, DIM))
            first = ps.lookup("t", keys[:4]).numpy()
            ps.tiers[0].drain()
            second = ps.lookup("t", keys[:4]).numpy()
            np.testing.assert_array_equal(first, second)
            tiers = ps.stats().tables["t"].tiers
            assert (tiers["cache"].hits, tiers["cache"].misses) == (4, 4)
            assert tiers["cache"].held.capacity_rows == 8  # 25% of the table's 32 rows


def test_hps_compat_answers_cache_misses_with_the_default_row_then_fills(tmp_path: Path) -> None:
    keys = np.arange(8, dtype=np.int64)
    with cached_ps(tmp_path / "s", threshold=0.0, compat=True) as ps:
        ps.import_table("t", keys, rows_for(keys, DIM))
        np.testing.assert_array_equal(ps.lookup("t", keys[:2]).numpy(), np.zeros((2, DIM), np.float32))
        ps.tiers[0].drain()
        np.testing.assert_array_equal(ps.lookup("t", keys[:2]).numpy(), rows_for(keys[:2], DIM))
    with cached_ps(tmp_path / "exact", threshold=0.0) as ps:  # the default: exact, whatever the threshold
        ps.import_table("t", keys, rows_for(keys, DIM))
        np.testing.assert_array_equal(ps.lookup("t", keys[:2]).numpy(), rows_for(keys[:2], DIM))


def test_a_background_fill_never_lands_over_a_newer_update(tmp_path: Path) -> None:
    keys = np.arange(4, dtype=np.int64)
    with cached_ps(tmp_path / "s", threshold=0.0) as ps:
        cache = ps.tiers[0]
        ps.import_table("t", keys, rows_for(keys, DIM, version=1))
        gate = threading.Event()
        cache.run_later(lambda: gate.wait(timeout=60))  # hold the background thread
        np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), rows_for(keys, DIM, version=1))
        ps.update("t", keys, rows_for(keys, DIM, version=2))  # while the fill of version 1 waits
        gate.set()
        cache.drain()
        assert not cache.lookup("t", keys).found.any()  # the stale fill was dropped
        np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), rows_for(keys, DIM, version=2))
        cache.drain()
        np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), rows_for(keys, DIM, version=2))
        assert ps.stats().tables["t"].tiers["cache"].hits == 4


def test_a_full_background_queue_drops_fills_instead_of_blocking(tmp_path: Path) -> None:
    keys = np.arange(32, dtype=np.int64)
    with cached_ps(tmp_path / "s", threshold=0.0) as ps:
        cache = ps.tiers[0]
        ps.import_table("t", keys, rows_for(keys, DIM))
        gate = threading.Event()
        for _ in range(cache.config.max_pending_inserts):
            assert cache.run_later(lambda: gate.wait(timeout=60))
        np.testing.assert_array_equal(ps.lookup("t", keys[:3]).numpy(), rows_for(keys[:3], DIM))
        assert cache.dropped_inserts == 1
        gate.set()
        cache.drain()


def test_static_cache_tier_holds_the_whole_imported_table(tmp_path: Path) -> None:
    keys = np.arange(32, dtype=np.int64)
    with cached_ps(tmp_path / "s", threshold=1.0, mode="static") as ps:
        ps.import_table("t", keys, rows_for(keys, DIM))
        np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), rows_for(keys, DIM))
        tiers = ps.stats().tables["t"].tiers
        assert tiers["cache"].hits == 32 and tiers["dram"].hits + tiers["dram"].misses == 0
        ps.update("t", keys[:3], rows_for(keys[:3], DIM, version=5))
        np.testing.assert_array_equal(ps.lookup("t", keys[:3]).numpy(), rows_for(keys[:3], DIM, version=5))


def test_tables_with_a_zero_cache_fraction_skip_the_cache(tmp_path: Path) -> None:
    base = make_ps_config(tmp_path / "s", [make_table("a", dim=DIM, rows=100),
                                           make_table("b", dim=DIM, rows=100, cache_fraction=0.0)])
    config = PSConfig(tables=base.tables, cache=DeviceCacheConfig(enabled=True), dram=base.dram,
                      rocksdb=base.rocksdb)
    with HierarchicalPS.from_config(config) as ps:
        cache = ps.tiers[0]
        assert isinstance(cache, CacheTier) and cache.caches("a") and not cache.caches("b")
        ps.insert("b", [1], rows_for(np.array([1]), DIM))
        np.testing.assert_array_equal(ps.lookup("b", [1]).numpy(), rows_for(np.array([1]), DIM))
        assert ps.stats().tables["b"].tiers["cache"].hits + ps.stats().tables["b"].tiers["cache"].misses == 0


def test_readers_racing_updates_and_background_fills_never_see_a_stale_row_after_the_update(tmp_path: Path) -> None:
    keys = np.arange(32, dtype=np.int64)
    versions = 25
    with cached_ps(tmp_path / "s", threshold=0.0) as ps:  # every fill in the background
        ps.import_table("t", keys, rows_for(keys, DIM, version=0))
        done, errors = threading.Event(), []

        def read() -> None:
            rng = np.random.default_rng(threading.get_ident() % 1000)
            while not done.is_set():
                batch = rng.choice(keys, 8, replace=False)
                out = ps.lookup("t", batch).numpy()
                version = np.round((out[:, 0] - batch * 1000.0) / 10.0)
                if not np.isin(version, np.arange(versions + 1)).all():
                    errors.append(out)  # not a row that was ever written for this key

        readers = [threading.Thread(target=read) for _ in range(3)]
        for reader in readers:
            reader.start()
        for version in range(1, versions + 1):
            ps.update("t", keys, rows_for(keys, DIM, version=version))
            np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), rows_for(keys, DIM, version=version))
        done.set()
        for reader in readers:
            reader.join(timeout=60)
        ps.tiers[0].drain()
        assert not errors
        held = ps.tiers[0].cache("t").held_keys().numpy()
        assert held.size > 0
        np.testing.assert_array_equal(ps.tiers[0].lookup("t", held).rows, rows_for(held, DIM, version=versions))
