"""The DRAM tier against a plain-Python reference model, across processes, and under concurrent writes."""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recserve.config import DramTierConfig, TableConfig, capacity_rows
from recserve.errors import InvalidInputError, NotFoundError
from recserve.ps import _hashmap as hm
from recserve.ps.dram import HUGE_PAGES_MIN_BYTES, DramTableHandle, DramTier
from tests.conftest import cast_through, rows_for

DIM = 4


@dataclass
class Entry:
    row: np.ndarray
    time: int
    count: int


@dataclass
class ReferenceTable:
    """What the DRAM tier must hold: a dict, plus the LRU clock and LFU counts that choose victims."""

    policy: str
    num_partitions: int
    capacity: int  # per partition
    keep: int
    entries: dict[int, Entry] = field(default_factory=dict)
    clock: int = 0
    evictions: int = 0

    def partition(self, key: int) -> int:
        return int(hm.partitions_of(np.array([key], dtype=np.int64), self.num_partitions)[0])

    def size(self, p: int) -> int:
        return sum(1 for k in self.entries if self.partition(k) == p)

    def tick(self, n: int) -> int:
        now, self.clock = self.clock, self.clock + n
        return now

    def lookup(self, keys: list[int]) -> dict[int, np.ndarray]:
        now = self.tick(len(keys))
        out = {}
        for i, key in enumerate(keys):
            if key in self.entries:
                entry = self.entries[key]
                entry.time = now + i
                entry.count += self.policy == "evict_lfu"
                out[key] = entry.row
        return out

    def insert(self, keys: list[int], rows: np.ndarray) -> None:
        now = self.tick(len(keys))
        for i, key in enumerate(keys):
            if key in self.entries:
                entry = self.entries[key]
                entry.row, entry.time, entry.count = rows[i], now + i, entry.count + 1
                continue
            p = self.partition(key)
            if self.size(p) >= self.capacity:
                if self.policy == "reject":
                    continue
                self._evict_from(p)
            self.entries[key] = Entry(rows[i], now + i, 1)

    def _evict_from(self, p: int) -> None:
        held = [k for k in self.entries if self.partition(k) == p]
        if self.policy == "evict_lfu":
            held.sort(key=lambda k: (self.entries[k].count, self.entries[k].time))
        else:
            held.sort(key=lambda k: self.entries[k].time)
        victims = held[: len(held) - self.keep]
        for key in victims:
            del self.entries[key]
        self.evictions += len(victims)

    def update(self, keys: list[int], rows: np.ndarray) -> int:
        self.tick(len(keys))
        held = 0
        for i, key in enumerate(keys):
            if key in self.entries:
                self.entries[key].row = rows[i]
                held += 1
        return held

    def evict(self, keys: list[int]) -> int:
        removed = [k for k in dict.fromkeys(keys) if k in self.entries]
        for key in removed:
            del self.entries[key]
        return len(removed)


def make_tier(tmp_shm: Path, policy: str, partitions: int, capacity: int, target: float,
              dtype: str = "float32") -> DramTier:
    table = TableConfig(name="t", dim=DIM, dtype=dtype, dram_capacity_rows=capacity, overflow_policy=policy)
    return DramTier.create([table], DramTierConfig(num_partitions=partitions, overflow_resolution_target=target,
                                                   shm_dir=tmp_shm))


@pytest.fixture
def shm_dir(tmp_path: Path) -> Path:
    """A private folder for the tier's files (tmpfs-backed /dev/shm is the default outside tests)."""
    path = Path("/dev/shm") / f"recserve-test-{tmp_path.name}"
    _remove(path)  # left by a run that crashed: the test's name repeats from run to run
    path.mkdir()
    yield path
    _remove(path)


def _remove(folder: Path) -> None:
    if folder.exists():
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()


keys_strategy = st.lists(st.integers(min_value=-3, max_value=40), min_size=0, max_size=24)
op_strategy = st.tuples(st.sampled_from(["lookup", "insert", "insert", "update", "evict"]), keys_strategy)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    policy=st.sampled_from(["evict_lru", "evict_lfu", "reject"]),
    partitions=st.integers(1, 3),
    capacity=st.integers(1, 12),
    target=st.sampled_from([0.3, 0.8, 1.0]),
    ops=st.lists(op_strategy, min_size=1, max_size=30),
)
def test_matches_reference_model(shm_dir: Path, policy: str, partitions: int, capacity: int, target: float,
                                 ops: list) -> None:
    tier = make_tier(shm_dir, policy, partitions, capacity, target)
    try:
        handle = tier.table("t").handle
        ref = ReferenceTable(policy, handle.num_partitions, handle.capacity, handle.keep)
        for step, (kind, keys) in enumerate(ops):
            keys_arr = np.asarray(keys, dtype=np.int64)
            rows = rows_for(keys_arr, DIM, version=step)
            if kind == "lookup":
                keys_arr = np.unique(keys_arr)  # the PS dedupes before the tier; order is then by key
                expected = ref.lookup(keys_arr.tolist())
                result = tier.lookup("t", keys_arr)
                assert result.found.tolist() == [k in expected for k in keys_arr.tolist()]
                for key, row in zip(keys_arr[result.found].tolist(), result.rows[result.found], strict=True):
                    np.testing.assert_array_equal(row, expected[key])
            elif kind == "insert":
                ref.insert(keys, rows)
                tier.insert("t", keys_arr, rows)
            elif kind == "update":
                assert tier.update("t", keys_arr, rows) == ref.update(keys, rows)
            else:
                assert tier.evict("t", keys_arr) == ref.evict(keys)
            assert sorted(tier.table("t").held_keys().tolist()) == sorted(ref.entries)
            stats = tier.stats()["t"]
            assert stats.rows == len(ref.entries)
            assert stats.evictions == ref.evictions
    finally:
        tier.close()


@pytest.mark.parametrize("policy", ["evict_lru", "evict_lfu"])
@pytest.mark.parametrize("read", ["lookup", "lookup_pooled"])
def test_reading_rows_counts_as_use_for_eviction(shm_dir: Path, policy: str, read: str) -> None:
    """LRU: the oldest row, once read, outlives the rows inserted after it. LFU: a row read twice outlives rows
    read once since (more recent, less used)."""
    tier = make_tier(shm_dir, policy, 1, 8, 0.5)

    def read_rows(keys: np.ndarray) -> None:
        if read == "lookup":
            tier.lookup("t", keys)
        else:
            tier.lookup_pooled("t", keys, np.array([0, keys.size], dtype=np.int64))

    try:
        capacity = tier.table("t").handle.capacity
        keys = np.arange(capacity, dtype=np.int64)
        tier.insert("t", keys, rows_for(keys, DIM))
        read_rows(keys[:1])
        if policy == "evict_lfu":
            read_rows(keys[:1])
            read_rows(keys[1:])
        tier.insert("t", np.array([1000]), rows_for(np.array([1000]), DIM))  # full: evicts down to half
        held = set(tier.table("t").held_keys().tolist())
        assert 0 in held and 1000 in held and len(held) <= capacity // 2 + 1
        if policy == "evict_lru":
            assert held.isdisjoint(range(1, capacity // 2))  # the older rows never read went
    finally:
        tier.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op_strategy, min_size=1, max_size=30), capacity=st.integers(1, 10))
def test_random_eviction_keeps_latest_rows_within_capacity(shm_dir: Path, ops: list, capacity: int) -> None:
    """Victims are random, so check the invariants: never over capacity, every hit is the latest row."""
    tier = make_tier(shm_dir, "evict_random", 2, capacity, 0.8)
    try:
        latest: dict[int, np.ndarray] = {}
        for step, (kind, keys) in enumerate(ops):
            keys_arr = np.asarray(keys, dtype=np.int64)
            rows = rows_for(keys_arr, DIM, version=step)
            if kind in ("insert", "update"):
                held_before = set(tier.table("t").held_keys().tolist())
                getattr(tier, kind)("t", keys_arr, rows)
                for i, key in enumerate(keys):
                    if kind == "insert" or key in held_before:
                        latest[key] = rows[i]
            elif kind == "evict":
                tier.evict("t", keys_arr)
                for key in keys:
                    latest.pop(key, None)
            asked = np.unique(keys_arr)
            result = tier.lookup("t", asked)
            for key, row in zip(asked[result.found].tolist(), result.rows[result.found], strict=True):
                np.testing.assert_array_equal(row, latest[key])
            held = tier.table("t").held_keys().tolist()
            assert len(held) <= tier.stats()["t"].capacity_rows
            assert set(held) <= set(latest)
    finally:
        tier.close()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_rows_are_stored_in_2_bytes_and_returned_float32(shm_dir: Path, dtype: str) -> None:
    tier = make_tier(shm_dir, "evict_lru", 2, 32, 0.8, dtype=dtype)
    try:
        keys = np.arange(10, dtype=np.int64)
        rows = np.random.default_rng(0).normal(size=(10, DIM)).astype(np.float32)
        tier.insert("t", keys, rows)
        result = tier.lookup("t", keys)
        assert result.rows.dtype == np.float32 and result.found.all()
        np.testing.assert_array_equal(result.rows, cast_through(rows, dtype))
        assert not np.array_equal(result.rows, rows)  # rounded: the rows are not kept as float32 somewhere
        assert tier.table("t").handle.words == hm.RECORD_HEADER_WORDS + 1  # 4 values of 2 bytes fill one word
    finally:
        tier.close()


def test_capacity_in_bytes_bounds_the_shared_memory(shm_dir: Path) -> None:
    budget = 1 << 20
    table = TableConfig(name="t", dim=64, dram_capacity_bytes=budget)
    config = DramTierConfig(num_partitions=4, shm_dir=shm_dir)
    tier = DramTier.create([table], config)
    try:
        handle = tier.table("t").handle
        assert handle.capacity * handle.num_partitions >= capacity_rows(table, config)
        assert handle.nbytes <= 1.3 * budget
    finally:
        tier.close()


def test_bad_writes_are_refused_and_change_nothing(shm_dir: Path) -> None:
    tier = make_tier(shm_dir, "evict_lru", 2, 8, 0.8)
    try:
        keys = np.arange(3, dtype=np.int64)
        tier.insert("t", keys, rows_for(keys, DIM))
        with pytest.raises(InvalidInputError, match=r"shape \(3, 4\)"):
            tier.insert("t", keys, np.zeros((3, DIM + 1), np.float32))
        with pytest.raises(InvalidInputError, match="floating point"):
            tier.insert("t", keys, np.zeros((3, DIM), np.int32))
        with pytest.raises(NotFoundError, match="unknown table 'nope'"):
            tier.lookup("nope", keys)
        np.testing.assert_array_equal(tier.lookup("t", keys).rows, rows_for(keys, DIM))
    finally:
        tier.close()


def test_close_removes_the_shared_memory_file(shm_dir: Path) -> None:
    tier = make_tier(shm_dir, "evict_lru", 2, 8, 0.8)
    path = Path(tier.table("t").handle.path)
    assert path.exists()
    tier.close()
    assert not path.exists()


def test_close_twice_while_a_view_of_the_map_lives(shm_dir: Path) -> None:
    tier = make_tier(shm_dir, "evict_lru", 2, 8, 0.8)
    view = tier.table("t").rec[:4]  # keeps the map's buffer exported: the map itself cannot close yet
    tier.close()
    tier.close()  # nothing left to close: no error
    del view


# --- several processes, one copy ---------------------------------------------------------------------------


def _read_in_child(handles: list[DramTableHandle], keys: np.ndarray, queue: mp.Queue) -> None:
    tier = DramTier.attach(handles)
    result = tier.lookup("t", keys)
    tier.insert("t", np.array([999], dtype=np.int64), rows_for(np.array([999]), DIM, version=7))
    queue.put((result.rows, result.found))
    tier.close()


def test_another_process_reads_and_writes_the_same_copy(shm_dir: Path) -> None:
    tier = make_tier(shm_dir, "evict_lru", 2, 64, 0.8)
    try:
        keys = np.arange(20, dtype=np.int64)
        tier.insert("t", keys, rows_for(keys, DIM))
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_read_in_child, args=(tier.handles(), keys, queue))
        child.start()
        rows, found = queue.get(timeout=120)
        child.join(timeout=60)
        assert child.exitcode == 0
        assert found.all()
        np.testing.assert_array_equal(rows, rows_for(keys, DIM))
        seen = tier.lookup("t", np.array([999], dtype=np.int64))  # the child's write, seen here
        np.testing.assert_array_equal(seen.rows[0], rows_for(np.array([999]), DIM, version=7)[0])
        assert Path(tier.table("t").handle.path).exists()  # the child's close did not remove it
    finally:
        tier.close()


# --- torn reads ------------------------------------------------------------------------------------------

HAMMER_DIM = 1024  # long rows: a copy takes long enough for a writer to land in the middle of it
HAMMER_KEYS = 100


def _hammer_row(key: int, version: int) -> np.ndarray:
    return np.full(HAMMER_DIM, key * 100_000 + version, dtype=np.float32)  # exact in float32


def _hammer_reader(handles: list[DramTableHandle], seconds: float, seed: int, queue: mp.Queue) -> None:
    tier = DramTier.attach(handles)
    tier.lookup("t", np.arange(4, dtype=np.int64))  # compile or load the kernels before the clock starts
    tier.lookup_pooled("t", np.arange(4, dtype=np.int64), np.arange(5, dtype=np.int64))
    rng = np.random.default_rng(seed)
    observed: set[tuple[int, int]] = set()
    torn = hits = reads = 0
    pooled = False
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        keys = np.unique(rng.integers(0, HAMMER_KEYS, 32)).astype(np.int64)
        pooled = not pooled  # every other read pools, one key per bag: each bag's sum is its one row
        if pooled:
            keys = keys[: tier.table("t").max_fused_keys]  # few enough for the kernel that adds as it reads
            bags = tier.lookup_pooled("t", keys, np.arange(keys.size + 1, dtype=np.int64))
            rows, found = bags.pooled, np.ones(keys.size, dtype=bool)
            found[bags.missing] = False
            # a missing key's bag holds nothing: the PS adds that row from a slower tier
            torn += int(np.count_nonzero(rows[~found].any(axis=1)))
        else:
            result = tier.lookup("t", keys)
            rows, found = result.rows, result.found
        reads += keys.size
        for key, row in zip(keys[found].tolist(), rows[found], strict=True):
            hits += 1
            if not (row == row[0]).all() or int(row[0]) // 100_000 != key:
                torn += 1
            observed.add((key, int(row[0]) % 100_000))
    tier.close()
    queue.put((torn, hits, reads, observed))


def test_readers_never_see_a_torn_row_while_a_writer_inserts_updates_and_evicts(shm_dir: Path) -> None:
    # A small capacity keeps the writer evicting, so records are constantly retired and reused.
    table = TableConfig(name="t", dim=HAMMER_DIM, dram_capacity_rows=40)
    tier = DramTier.create([table], DramTierConfig(num_partitions=2, shm_dir=shm_dir))
    try:
        written: set[tuple[int, int]] = set()

        def write(keys: np.ndarray, version: int, action: int) -> None:
            rows = np.stack([_hammer_row(int(k), version) for k in keys])
            if action == 0:
                tier.insert("t", keys, rows)
            elif action == 1:
                tier.update("t", keys, rows)
            else:
                tier.evict("t", keys[:2])
            if action != 2:
                written.update((int(k), version) for k in keys)

        write(np.arange(40, dtype=np.int64), 0, 0)  # a full table before the readers start
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        readers = [ctx.Process(target=_hammer_reader, args=(tier.handles(), 3.0, seed, queue)) for seed in (1, 2)]
        for reader in readers:
            reader.start()
        rng = np.random.default_rng(0)
        version = 0
        deadline = time.monotonic() + 120
        while queue.qsize() < len(readers) and time.monotonic() < deadline:
            version = version % 99_999 + 1
            write(np.unique(rng.integers(0, HAMMER_KEYS, 8)).astype(np.int64), version, version % 3)
        results = [queue.get(timeout=120) for _ in readers]
        for reader in readers:
            reader.join(timeout=60)
        for torn, hits, reads, observed in results:
            assert torn == 0
            assert hits > 1000, f"too few hits to mean anything: {hits} of {reads}"
            assert observed <= written, f"rows never written: {sorted(observed - written)[:5]}"
        assert tier.stats()["t"].evictions > 0
    finally:
        tier.close()


def test_private_memory_tables_work_and_refuse_to_be_attached(shm_dir: Path) -> None:
    table = TableConfig(name="t", dim=DIM, dram_capacity_rows=8)
    tier = DramTier.create([table], DramTierConfig(num_partitions=2, shared_memory=False, shm_dir=shm_dir))
    try:
        keys = np.arange(5, dtype=np.int64)
        tier.insert("t", keys, rows_for(keys, DIM))
        np.testing.assert_array_equal(tier.lookup("t", keys).rows, rows_for(keys, DIM))
        assert not list(shm_dir.iterdir())  # nothing shared was created
        with pytest.raises(NotFoundError, match="private memory"):
            DramTier.attach(tier.handles())
    finally:
        tier.close()


def test_files_of_killed_owners_are_removed_and_live_ones_kept(shm_dir: Path) -> None:
    stale = shm_dir / "recserve-999999999-deadbeef-t"  # above the kernel's pid limit: never running
    stale.write_bytes(b"x")
    live = make_tier(shm_dir, "evict_lru", 1, 4, 0.8)
    try:
        assert not stale.exists()
        other = make_tier(shm_dir, "evict_lru", 1, 4, 0.8)  # a second owner in a live process
        assert Path(live.table("t").handle.path).exists()
        other.close()
    finally:
        live.close()


def test_large_batches_run_the_parallel_kernel_and_agree_with_small_ones(shm_dir: Path) -> None:
    n = 3 * hm.PARALLEL_MIN_KEYS
    tier = make_tier(shm_dir, "evict_lru", 4, n, 0.8)
    try:
        keys = np.random.default_rng(0).permutation(2 * n).astype(np.int64)[:n]
        tier.insert("t", keys, rows_for(keys, DIM))
        asked = np.concatenate([keys, keys.max() + 1 + np.arange(100)])  # 100 misses at the end
        big = tier.lookup("t", asked)
        assert big.found.tolist() == [True] * n + [False] * 100
        np.testing.assert_array_equal(big.rows[:n], rows_for(keys, DIM))
        small = tier.lookup("t", asked[:50])
        np.testing.assert_array_equal(small.rows, big.rows[:50])
    finally:
        tier.close()


def _guarded_copy(array: np.ndarray) -> tuple[mmap.mmap, np.ndarray]:
    """A copy of array that ends exactly where an unreadable page begins: reading past its end faults."""
    page = mmap.PAGESIZE
    readable = -(-array.nbytes // page) * page
    region = mmap.mmap(-1, readable + page)
    libc = ctypes.CDLL(None, use_errno=True)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert libc.mprotect(ctypes.c_void_p(address + readable), page, 0) == 0  # PROT_NONE
    copy = np.frombuffer(region, dtype=array.dtype, count=array.size, offset=readable - array.nbytes)
    copy[:] = array
    return region, copy


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pooled_lookups_read_no_further_than_the_last_row(shm_dir: Path, dtype: str) -> None:
    """Reading a full table's last record stops at the record's end: the records are copied in front of an
    unreadable page, and the pooled kernel reads every row (a copy of the record's whole width from the
    values' offset once read 32 bytes past it)."""
    tier = make_tier(shm_dir, "evict_lru", 1, 16, 0.8, dtype=dtype)
    table = tier.table("t")
    try:
        h = table.handle
        keys = np.arange(h.capacity, dtype=np.int64)
        tier.insert("t", keys, rows_for(keys, DIM))
        region, rec = _guarded_copy(table.rec)
        values = rec.view(table.values.dtype).reshape(table.values.shape)
        pooled = np.zeros((keys.size, DIM), dtype=np.float32)
        found = np.zeros(keys.size, dtype=np.bool_)
        offsets = np.arange(keys.size + 1, dtype=np.int64)
        hm.pooled_lookup_kernel_serial(table.clock, table.part, table.slots, rec, values, keys, offsets, pooled,
                                       found, h.num_slots, h.words, table._offset, False)
        assert found.all()
        np.testing.assert_array_equal(pooled, cast_through(rows_for(keys, DIM), dtype))
        del rec, values
        region.close()
    finally:
        tier.close()


def test_a_freed_record_fails_every_reader_whatever_key_it_held(shm_dir: Path) -> None:
    """A reader can reach a just-freed record through an index entry moved under it; it must not take it."""
    tier = make_tier(shm_dir, "evict_lru", 1, 8, 0.8)
    try:
        table = tier.table("t")
        h = table.handle
        tier.insert("t", np.array([5], dtype=np.int64), rows_for(np.array([5]), DIM))
        record = hm.locate(table.part, table.slots, h.num_slots, 5)
        out = np.empty(DIM, dtype=np.float32)
        assert hm.copy_record(table.rec, table.values, record, h.words, table._offset, 5, out)
        tier.evict("t", np.array([5], dtype=np.int64))
        for key in (5, 4, 5 ^ 1):  # the key it held, and the one an xor-tombstone would have made it
            assert not hm.copy_record(table.rec, table.values, record, h.words, table._offset, key, out)
    finally:
        tier.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_bag_whose_add_fails_its_check_is_summed_again(shm_dir: Path, dtype: str) -> None:
    """A pooled lookup adds each row into its bag before the seqlock's last check; an add that fails it may have
    put (part of) a row into the bag, which must then hold exactly the rows of its found keys."""
    tier = make_tier(shm_dir, "evict_lru", 1, 64, 0.8, dtype=dtype)
    try:
        table = tier.table("t")
        h = table.handle
        assert table.max_fused_keys >= 4  # the fused kernel runs: bfloat16 rows are widened in it
        stored = np.array([3, 5, 7], dtype=np.int64)
        rows = cast_through(rows_for(stored, DIM), dtype)
        tier.insert("t", stored, rows)
        # key 5's index entry leads to key 7's record, as a reader can find it while a writer moves entries
        entry = hm.find_slot(table.slots, 0, h.num_slots, 5)
        table.slots[2 * entry + 1] = hm.locate(table.part, table.slots, h.num_slots, 7)
        result = tier.lookup_pooled("t", np.array([3, 5, 7, 5], dtype=np.int64), np.array([0, 2, 3, 4]))
        np.testing.assert_array_equal(result.missing, [1, 3])
        np.testing.assert_array_equal(result.pooled, np.stack([rows[0], rows[2], np.zeros(DIM, np.float32)]))
    finally:
        tier.close()


def test_many_tables_pool_in_one_call_per_row_type(shm_dir: Path) -> None:
    """float32 and bfloat16 tables each pool their small batches in one compiled call (a call's typed lists hold
    one array type); a float16 table, which the fused kernel cannot add, deduplicates on its own."""
    dtypes = {"a": "float32", "b": "bfloat16", "c": "float32", "d": "bfloat16", "e": "float16"}
    configs = [TableConfig(name=n, dim=DIM, dtype=d, dram_capacity_rows=64) for n, d in dtypes.items()]
    tier = DramTier.create(configs, DramTierConfig(num_partitions=2, shm_dir=shm_dir))
    try:
        stored = np.arange(20, dtype=np.int64)
        for name in dtypes:
            tier.insert(name, stored, rows_for(stored, DIM, version=ord(name)))
        names = list(dtypes)
        keys = [np.array([1, 7, 7, 30, 2], dtype=np.int64) + i for i in range(len(names))]
        offsets = [np.array([0, 2, 5], dtype=np.int64)] * len(names)
        results = tier.lookup_pooled_tables(names, keys, offsets)
        assert set(tier._groups) == {("a", "c"), ("b", "d")}
        for name, k, o, got in zip(names, keys, offsets, results, strict=True):
            alone = tier.lookup_pooled(name, k, o)
            np.testing.assert_array_equal(got.pooled, alone.pooled)
            np.testing.assert_array_equal(got.missing, alone.missing)
            expected = cast_through(rows_for(k, DIM, version=ord(name)), dtypes[name])
            expected[~np.isin(k, stored)] = 0
            np.testing.assert_allclose(got.pooled, [expected[:2].sum(0), expected[2:].sum(0)], rtol=1e-6)
    finally:
        tier.close()


def _pmd_mapped_bytes(array: np.ndarray) -> int:
    """Bytes of the mapping holding `array` that this process maps with 2 MiB page-table entries."""
    address = array.__array_interface__["data"][0]
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            inside = start <= address < end
        elif inside and fields[0] == "ShmemPmdMapped:":
            return int(fields[1]) * 1024
    raise AssertionError("no mapping holds the array")


def _kernel_collapses_shmem() -> bool:
    """MADV_COLLAPSE (Linux 6.1) builds huge pages in a tmpfs file unless shmem_enabled is `deny`."""
    release = tuple(int(x) for x in Path("/proc/sys/kernel/osrelease").read_text().split(".")[:2])
    shmem = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    return release >= (6, 1) and shmem.exists() and "[deny]" not in shmem.read_text()


def _huge_pages_in_child(handles: list[DramTableHandle], keys: np.ndarray, queue: mp.Queue) -> None:
    tier = DramTier.attach(handles)
    result = tier.lookup("t", keys)
    queue.put((result.rows, result.found, _pmd_mapped_bytes(tier.table("t").values)))
    tier.close()


def test_large_shared_tables_sit_on_huge_pages_in_every_process_that_maps_them(shm_dir: Path) -> None:
    config = DramTierConfig(shm_dir=shm_dir, num_partitions=2)
    tier = DramTier.create([TableConfig(name="t", dim=64, dram_capacity_rows=80_000)], config)
    try:
        table = tier.table("t")
        assert table.handle.nbytes >= HUGE_PAGES_MIN_BYTES
        assert table.huge_pages is _kernel_collapses_shmem()
        assert Path(table.handle.path).stat().st_size % (2 << 20) == 0  # whole huge pages
        keys = np.arange(70_000, dtype=np.int64)
        tier.insert("t", keys, rows_for(keys, 64))
        mapped_here = _pmd_mapped_bytes(table.values)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_huge_pages_in_child, args=(tier.handles(), keys, queue))
        child.start()
        rows, found, mapped_there = queue.get(timeout=120)
        child.join(timeout=60)
        assert found.all()
        np.testing.assert_array_equal(rows, rows_for(keys, 64))
        if table.huge_pages:  # all but the part of the last huge page past the arrays
            assert mapped_here >= table.handle.nbytes - (2 << 20)
            assert mapped_there >= table.handle.nbytes - (2 << 20)
        else:
            assert mapped_here == mapped_there == 0
    finally:
        tier.close()


@pytest.mark.parametrize(("capacity", "huge_pages"), [(20_000, True), (80_000, False)])
def test_small_tables_and_tables_told_not_to_take_memory_as_rows_arrive(shm_dir: Path, capacity: int,
                                                                         huge_pages: bool) -> None:
    config = DramTierConfig(shm_dir=shm_dir, num_partitions=2, huge_pages=huge_pages)
    tier = DramTier.create([TableConfig(name="t", dim=64, dram_capacity_rows=capacity)], config)
    try:
        table = tier.table("t")
        path = Path(table.handle.path)
        assert not table.huge_pages
        assert (table.handle.nbytes < HUGE_PAGES_MIN_BYTES) is huge_pages
        assert path.stat().st_size == table.handle.nbytes
        assert path.stat().st_blocks * 512 < table.handle.nbytes // 2  # the records are not yet written
        tier.insert("t", np.arange(100, dtype=np.int64), rows_for(np.arange(100), 64))
        assert _pmd_mapped_bytes(table.values) == 0
    finally:
        tier.close()
