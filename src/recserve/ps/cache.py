"""Device embedding cache: the top tier, hot rows in torch tensors on any device (after HPS's GPU cache).

Why our own and why plain torch: HPS's cache is CUDA code; ours must run on cuda where there is a GPU and on
cpu everywhere else with nothing but `device=`. Every operation is a handful of whole-batch tensor ops (hash,
gather, compare, sort, scatter), which is what a GPU wants, and there is no per-key Python.

`EmbeddingCache` is set-associative: a key hashes to one set of `ways` slots. A batch insert behaves as if its
new keys went in one at a time, in batch order, each replacing the lowest-priority slot of its set (empty
slots first; then the least recently used, or for lfu the least frequently used, older first). That sequence
has a closed form, which is how one batch resolves any number of keys landing in one set without losing or
duplicating a slot: per set, the last new key plus the best `ways - 1` of the rest (the set's old rows and its
other new keys) survive. `StaticCache` holds a whole table (sorted keys, binary search, no eviction).
`ShardedCache` splits keys over several caches by a hash independent of the set index (or replicates).
`CacheTier` makes them a `Tier` of the hierarchical parameter server.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from recserve.config import CachePolicy, DeviceCacheConfig, DramTierConfig, TableConfig, capacity_rows
from recserve.errors import InvalidInputError, NotFoundError
from recserve.ps.tiers import LookupResult, TierTableStats, check_rows

log = logging.getLogger(__name__)

_M1 = -49064778989728563  # splitmix64's multipliers, as signed int64 (torch multiplies with wrap-around)
_M2 = -4265267296055464877
_LOW32 = 0xFFFFFFFF
_TOP = torch.iinfo(torch.int64).max
EMPTY = torch.iinfo(torch.int64).min  # the key of an empty slot; that one key is never cached (always a miss)


def mix(keys: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash of int64 keys (splitmix64's finaliser): set index from its low bits, shard from its high."""
    h = keys ^ (keys >> 33)
    h = h * _M1
    h = h ^ (h >> 33)
    h = h * _M2
    return h ^ (h >> 33)


def shard_of(keys: torch.Tensor, num_shards: int) -> torch.Tensor:
    return torch.remainder((mix(keys) >> 32) & _LOW32, num_shards)


@dataclass(frozen=True, slots=True)
class CacheStats:
    capacity_rows: int
    rows: int
    queries: int = 0
    keys: int = 0
    hits: int = 0
    inserts: int = 0  # rows newly placed
    evictions: int = 0
    rejected: int = 0  # new rows a full static cache could not take
    invalidations: int = 0

    def __add__(self, other: CacheStats) -> CacheStats:
        return CacheStats(*(a + b for a, b in zip(_astuple(self), _astuple(other), strict=True)))


def _astuple(stats: CacheStats) -> tuple[int, ...]:
    return tuple(getattr(stats, name) for name in CacheStats.__slots__)


class Cache(Protocol):
    """What every cache variant answers. Keys are 1-D int64 tensors; rows come back float32 on `device`."""

    device: torch.device

    def query(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def insert(self, keys: torch.Tensor, rows: torch.Tensor) -> None: ...
    def update(self, keys: torch.Tensor, rows: torch.Tensor) -> int: ...
    def invalidate(self, keys: torch.Tensor) -> int: ...
    def clear(self) -> None: ...
    def held_keys(self) -> torch.Tensor: ...
    def stats(self) -> CacheStats: ...


def _last_occurrences(keys: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct keys with the row of their last occurrence (as a dict would keep), in order of that occurrence.

    Returns (keys, rows, positions in the batch)."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    if unique.numel() == keys.numel():
        return keys, rows, torch.arange(keys.numel(), device=keys.device)
    last = torch.full((unique.numel(),), -1, dtype=torch.int64, device=keys.device)
    last.scatter_reduce_(0, inverse, torch.arange(keys.numel(), device=keys.device), reduce="amax")
    last = torch.sort(last).values
    return keys[last], rows[last], last


class EmbeddingCache:
    """A set-associative cache of embedding rows. Thread-safe (one lock: a query also writes recency)."""

    def __init__(
        self, num_rows: int, dim: int, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
        ways: int = 8, policy: CachePolicy = "lru",
    ) -> None:
        if num_rows <= 0 or dim <= 0 or ways <= 0:
            raise InvalidInputError(f"cache: num_rows, dim and ways must be positive, got {num_rows}, {dim}, {ways}")
        if policy not in ("lru", "lfu"):
            raise InvalidInputError(f"cache: unknown policy '{policy}' (lru or lfu)")
        self.device = torch.device(device)
        self.dim, self.ways, self.policy = dim, min(ways, num_rows), policy
        self.num_sets = -(-num_rows // self.ways)
        shape = (self.num_sets, self.ways)
        self._keys = torch.full(shape, EMPTY, dtype=torch.int64, device=self.device)
        self._way_numbers = torch.arange(1, self.ways + 1, dtype=torch.float32, device=self.device)
        self._last_used = torch.zeros(shape, dtype=torch.int64, device=self.device)  # clock at the last touch
        self._uses = torch.zeros(shape, dtype=torch.int64, device=self.device)  # lfu: touches since insertion
        self._rows = torch.zeros((self.num_sets * self.ways, dim), dtype=dtype, device=self.device)
        self._clock = 0  # advances by one per key of each batch: every touch has its own time
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("queries", "keys", "hits", "inserts", "evictions", "invalidations"), 0)

    @property
    def capacity_rows(self) -> int:
        return self.num_sets * self.ways

    def sets_of(self, keys: torch.Tensor) -> torch.Tensor:
        return torch.remainder(mix(keys) & _LOW32, self.num_sets)

    # --- reads ---

    def query(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of held keys (zeros elsewhere) and which keys were held; a hit counts as a use."""
        with self._lock:
            hit, slots = self._match(keys)
            num_hits = int(hit.sum())
            if num_hits == keys.numel():  # the hot path: one gather straight into the answer
                positions = torch.arange(keys.numel(), device=self.device)
                rows = torch.index_select(self._rows, 0, slots).float()
            else:
                positions = torch.nonzero(hit).squeeze(1)
                slots = torch.index_select(slots, 0, positions)
                rows = torch.zeros((keys.numel(), self.dim), dtype=torch.float32, device=self.device)
                rows.index_copy_(0, positions, torch.index_select(self._rows, 0, slots).float())
            self._touch(slots, self._clock + positions)
            self._clock += keys.numel()
            self._count(queries=1, keys=keys.numel(), hits=num_hits)
        return rows, hit

    def _match(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(held, flat slot) per key; the slot of a key not held is meaningless.

        Few, whole-batch ops, as they are the cost of a hit: index_select rather than advanced indexing (5x
        faster on cpu), and the matching way as a product with (1..ways), since a key sits in one slot at most."""
        sets = self.sets_of(keys)
        match = torch.index_select(self._keys, 0, sets) == keys.unsqueeze(1)
        way_plus_one = (match.to(torch.float32) @ self._way_numbers).to(torch.int64)
        way_plus_one.masked_fill_(keys == EMPTY, 0)
        return way_plus_one > 0, sets * self.ways + (way_plus_one - 1).clamp_(min=0)

    def _find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions in `keys` of the held keys, ascending; their flat slots)."""
        held, slots = self._match(keys)
        positions = torch.nonzero(held).squeeze(1)
        return positions, torch.index_select(slots, 0, positions)

    def _held_mask(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        held = torch.zeros(keys.numel(), dtype=torch.bool, device=self.device)
        held[positions] = True
        return held

    def _touch(self, slots: torch.Tensor, times: torch.Tensor) -> None:
        self._last_used.view(-1).scatter_reduce_(0, slots, times, reduce="amax")  # repeated keys: the last use
        if self.policy == "lfu":
            self._uses.view(-1).index_add_(0, slots, torch.ones_like(slots))

    # --- writes ---

    def insert(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Upsert rows. Held keys take the new row (a use); new keys replace the lowest-priority slots."""
        batch_size = keys.numel()
        keys, rows, positions = _last_occurrences(keys, rows)
        with self._lock:
            times = self._clock + positions
            found, slots = self._find(keys)
            if found.numel():
                self._rows[slots] = rows[found].to(self._rows.dtype)
                self._touch(slots, times[found])
            new = ~self._held_mask(keys, found) & (keys != EMPTY)
            if bool(new.any()):
                self._place(keys[new], rows[new], times[new])
            self._clock += batch_size

    def _place(self, keys: torch.Tensor, rows: torch.Tensor, times: torch.Tensor) -> None:
        sets = self.sets_of(keys)
        touched, new_per_set = torch.unique(sets, return_counts=True)
        ways, n_old = self.ways, touched.numel() * self.ways
        old_slots = (touched.unsqueeze(1) * ways + torch.arange(ways, device=self.device)).reshape(-1)
        # candidates for each touched set: its `ways` slots, then its new keys
        cand_set = torch.cat([touched.repeat_interleave(ways), sets])
        cand_valid = torch.cat([self._keys.view(-1)[old_slots] != EMPTY, torch.ones_like(sets, dtype=torch.bool)])
        cand_time = torch.cat([self._last_used.view(-1)[old_slots], times])
        cand_uses = torch.cat([self._uses.view(-1)[old_slots], torch.ones_like(sets)])
        # the last new key of each set always gets in (it is the last to replace anything): top priority
        order = torch.argsort(sets, stable=True)  # by set, then time (keys arrive in batch order)
        last_of_set = order[torch.cumsum(new_per_set, 0) - 1]
        cand_time[n_old + last_of_set] = _TOP
        cand_uses[n_old + last_of_set] = _TOP
        # rank candidates within their set, best first: valid, then uses (lfu), then recency; keep `ways`
        rank = torch.argsort(cand_time, descending=True, stable=True)
        if self.policy == "lfu":
            rank = rank[torch.argsort(cand_uses[rank], descending=True, stable=True)]
        rank = rank[torch.argsort(cand_valid[rank].to(torch.uint8), descending=True, stable=True)]
        rank = rank[torch.argsort(cand_set[rank], stable=True)]
        starts = torch.repeat_interleave(torch.cumsum(torch.full_like(touched, ways) + new_per_set, 0)
                                         - (ways + new_per_set), ways + new_per_set)
        kept = torch.zeros_like(cand_valid)
        kept[rank] = (torch.arange(rank.numel(), device=self.device) - starts) < ways
        # kept new keys move into the dropped old slots of their set: both lists are grouped by set, same counts
        freed = rank[(rank < n_old) & ~kept[rank]]
        entering = rank[(rank >= n_old) & kept[rank]] - n_old
        targets = old_slots[freed]
        self._counts["evictions"] += int((self._keys.view(-1)[targets] != EMPTY).sum())
        self._counts["inserts"] += targets.numel()
        self._keys.view(-1)[targets] = keys[entering]
        self._last_used.view(-1)[targets] = times[entering]
        self._uses.view(-1)[targets] = 1
        self._rows[targets] = rows[entering].to(self._rows.dtype)

    def update(self, keys: torch.Tensor, rows: torch.Tensor) -> int:
        """Overwrite the rows of held keys only (a refresh: not a use); returns how many were held."""
        keys, rows, _ = _last_occurrences(keys, rows)
        with self._lock:
            found, slots = self._find(keys)
            self._rows[slots] = rows[found].to(self._rows.dtype)
        return found.numel()

    def invalidate(self, keys: torch.Tensor) -> int:
        with self._lock:
            _, slots = self._find(keys)
            self._keys.view(-1)[slots] = EMPTY
            count = int(torch.unique(slots).numel())
            self._counts["invalidations"] += count
        return count

    def clear(self) -> None:
        with self._lock:
            self._keys.fill_(EMPTY)

    def held_keys(self) -> torch.Tensor:
        with self._lock:
            return self._keys[self._keys != EMPTY]

    def stats(self) -> CacheStats:
        with self._lock:
            rows = int((self._keys != EMPTY).sum())
            return CacheStats(capacity_rows=self.capacity_rows, rows=rows, **self._counts)

    def _count(self, **amounts: int) -> None:
        for name, amount in amounts.items():
            self._counts[name] += amount


class StaticCache:
    """A whole table on the device: keys sorted for binary search, no eviction (HPS's static table).

    New keys go in while there is room (a merge: meant for loading, not for a stream of new keys); once full,
    new keys are counted as rejected and left to the tiers below."""

    def __init__(
        self, num_rows: int, dim: int, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> None:
        if num_rows <= 0 or dim <= 0:
            raise InvalidInputError(f"static cache: num_rows and dim must be positive, got {num_rows}, {dim}")
        self.device = torch.device(device)
        self.capacity_rows, self.dim, self._dtype = num_rows, dim, dtype
        self._keys = torch.empty(0, dtype=torch.int64, device=self.device)
        self._valid = torch.empty(0, dtype=torch.bool, device=self.device)
        self._rows = torch.empty((0, dim), dtype=dtype, device=self.device)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("queries", "keys", "hits", "inserts", "rejected", "invalidations"), 0)

    def _locate(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index in the sorted keys, whether the key has a place there, valid or not: an invalidated key keeps
        its place)."""
        if self._keys.numel() == 0:
            return torch.zeros_like(keys), torch.zeros(keys.shape, dtype=torch.bool, device=self.device)
        index = torch.searchsorted(self._keys, keys).clamp_(max=self._keys.numel() - 1)
        return index, self._keys[index] == keys

    def _find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, whether the key is held)."""
        index, placed = self._locate(keys)
        return index, placed & self._valid[index] if self._keys.numel() else placed

    def query(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            index, hit = self._find(keys)
            rows = torch.index_select(self._rows, 0, index).float() if self._keys.numel() else torch.zeros(
                (keys.numel(), self.dim), device=self.device)
            num_hits = int(hit.sum())
            if num_hits < keys.numel():
                rows[~hit] = 0.0
            self._counts["queries"] += 1
            self._counts["keys"] += keys.numel()
            self._counts["hits"] += num_hits
        return rows, hit

    def insert(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        keys, rows, _ = _last_occurrences(keys, rows)
        with self._lock:
            index, present = self._locate(keys)
            self._rows[index[present]] = rows[present].to(self._dtype)
            self._valid[index[present]] = True
            new_keys, new_rows = keys[~present], rows[~present]
            room = self.capacity_rows - self._keys.numel()
            if new_keys.numel() > room:
                self._counts["rejected"] += new_keys.numel() - room
                new_keys, new_rows = new_keys[:room], new_rows[:room]
            if new_keys.numel():
                keys_all = torch.cat([self._keys, new_keys])
                order = torch.argsort(keys_all)
                self._keys = keys_all[order]
                self._rows = torch.cat([self._rows, new_rows.to(self._dtype)])[order]
                self._valid = torch.cat([self._valid, torch.ones_like(new_keys, dtype=torch.bool)])[order]
                self._counts["inserts"] += new_keys.numel()

    def update(self, keys: torch.Tensor, rows: torch.Tensor) -> int:
        keys, rows, _ = _last_occurrences(keys, rows)
        with self._lock:
            index, held = self._find(keys)
            self._rows[index[held]] = rows[held].to(self._dtype)
        return int(held.sum())

    def invalidate(self, keys: torch.Tensor) -> int:
        with self._lock:
            index, held = self._find(keys)
            self._valid[index[held]] = False
            count = int(torch.unique(index[held]).numel())
            self._counts["invalidations"] += count
        return count

    def clear(self) -> None:
        with self._lock:
            self._valid.zero_()

    def held_keys(self) -> torch.Tensor:
        with self._lock:
            return self._keys[self._valid]

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(capacity_rows=self.capacity_rows, rows=int(self._valid.sum()), **self._counts)


class ShardedCache:
    """Several caches (devices, or cpu shards) as one: keys split by hash, or every shard a full replica.

    HPS copies the whole cache to every GPU; splitting gives N devices N times the cached rows. With `replicate`,
    writes go to every replica and each query to the next replica in turn (as requests from several devices)."""

    def __init__(self, shards: list[Cache], *, replicate: bool = False) -> None:
        if not shards:
            raise InvalidInputError("a sharded cache needs at least one shard")
        self.shards, self.replicate = shards, replicate
        self.device = shards[0].device
        self._turn = itertools.count()

    def _split(self, keys: torch.Tensor) -> list[tuple[Cache, torch.Tensor]]:
        """(shard, positions of its keys) for every shard."""
        if len(self.shards) == 1:
            return [(self.shards[0], torch.arange(keys.numel(), device=keys.device))]
        owner = shard_of(keys, len(self.shards))
        return [(shard, torch.nonzero(owner == i).squeeze(1)) for i, shard in enumerate(self.shards)]

    def query(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.replicate or len(self.shards) == 1:
            shard = self.shards[next(self._turn) % len(self.shards)]
            rows, hit = shard.query(keys.to(shard.device))
            return rows.to(self.device), hit.to(self.device)
        rows = torch.empty((keys.numel(), self.shards[0].dim), dtype=torch.float32, device=self.device)
        hit = torch.empty(keys.numel(), dtype=torch.bool, device=self.device)
        for shard, positions in self._split(keys):
            if positions.numel():
                part_rows, part_hit = shard.query(keys[positions].to(shard.device))
                rows[positions], hit[positions] = part_rows.to(self.device), part_hit.to(self.device)
        return rows, hit

    def insert(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        for shard, positions in self._writes(keys):
            shard.insert(keys[positions].to(shard.device), rows[positions].to(shard.device))

    def update(self, keys: torch.Tensor, rows: torch.Tensor) -> int:
        counts = [shard.update(keys[p].to(shard.device), rows[p].to(shard.device)) for shard, p in self._writes(keys)]
        return max(counts) if self.replicate else sum(counts)

    def invalidate(self, keys: torch.Tensor) -> int:
        counts = [shard.invalidate(keys[p].to(shard.device)) for shard, p in self._writes(keys)]
        return max(counts) if self.replicate else sum(counts)

    def _writes(self, keys: torch.Tensor) -> list[tuple[Cache, torch.Tensor]]:
        if self.replicate:
            everything = torch.arange(keys.numel(), device=keys.device)
            return [(shard, everything) for shard in self.shards]
        return [(shard, p) for shard, p in self._split(keys) if p.numel()]

    def clear(self) -> None:
        for shard in self.shards:
            shard.clear()

    def held_keys(self) -> torch.Tensor:
        if self.replicate:
            return self.shards[0].held_keys().to(self.device)
        return torch.cat([shard.held_keys().to(self.device) for shard in self.shards])

    def stats(self) -> CacheStats:
        first, *others = [shard.stats() for shard in self.shards]
        total = sum(others, start=first)
        if self.replicate:  # every replica holds the same rows: count one copy
            total = dataclasses.replace(total, rows=first.rows, capacity_rows=first.capacity_rows)
        return total


def resolve_device(device: int | str) -> torch.device:
    """A device number is that CUDA device when CUDA exists, else the cpu (HPS files name GPUs by number)."""
    if isinstance(device, int):
        return torch.device(f"cuda:{device}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def cache_rows(table: TableConfig, config: DeviceCacheConfig, dram: DramTierConfig | None) -> int:
    """Rows of a table's cache: its fraction of the table's rows (known rows, else its DRAM capacity)."""
    fraction = config.fraction if table.cache_fraction is None else table.cache_fraction
    if fraction == 0.0:
        return 0
    rows = table.rows or (capacity_rows(table, dram) if dram is not None and dram.enabled else None)
    if rows is None:
        return config.default_rows
    return max(1, int(rows * fraction)) if config.mode == "dynamic" else rows


def build_cache(table: TableConfig, config: DeviceCacheConfig, num_rows: int) -> ShardedCache:
    """A table's cache over the configured devices: each shard gets its part (or all, replicated)."""
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[table.dtype]
    devices = [resolve_device(d) for d in config.devices]
    per_shard = num_rows if config.replicate else -(-num_rows // len(devices))
    shards: list[Cache] = [
        StaticCache(per_shard, table.dim, dtype=dtype, device=device) if config.mode == "static" else
        EmbeddingCache(per_shard, table.dim, dtype=dtype, device=device, ways=config.ways, policy=config.policy)
        for device in devices
    ]
    return ShardedCache(shards, replicate=config.replicate)


def _on(cache: ShardedCache, array: np.ndarray) -> torch.Tensor:
    """A tier's numpy array as a tensor on the cache's device (no copy on cpu)."""
    return torch.from_numpy(array).to(cache.device)


class CacheTier:
    """The device cache as the first tier of `HierarchicalPS`: one `ShardedCache` per cached table.

    Speaks numpy like every tier (zero-copy on cpu). Background inserts run on one thread, in order, and are
    dropped when `max_pending_inserts` batches already wait: a slow device then misses more, it never blocks."""

    name = "cache"

    def __init__(self, caches: dict[str, ShardedCache], config: DeviceCacheConfig,
                 thresholds: dict[str, float]) -> None:
        self.config = config
        self._caches = caches
        self._thresholds = thresholds
        self._writes = {name: [0, 0] for name in caches}  # writes started, finished (as DramTable's clock)
        self._write_locks = {name: threading.Lock() for name in caches}
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-insert")
        self._pending = threading.BoundedSemaphore(config.max_pending_inserts)
        self.dropped_inserts = 0

    @classmethod
    def create(cls, tables: list[TableConfig], config: DeviceCacheConfig, dram: DramTierConfig | None = None
               ) -> CacheTier:
        caches, thresholds = {}, {}
        for table in tables:
            rows = cache_rows(table, config, dram)
            if rows:
                caches[table.name] = build_cache(table, config, rows)
                thresholds[table.name] = (config.hit_rate_threshold if table.cache_hit_rate_threshold is None
                                          else table.cache_hit_rate_threshold)
        return cls(caches, config, thresholds)

    def caches(self, table: str) -> bool:
        return table in self._caches

    def cache(self, table: str) -> ShardedCache:
        try:
            return self._caches[table]
        except KeyError:
            raise NotFoundError(f"cache: table '{table}' is not cached") from None

    def hit_rate_threshold(self, table: str) -> float:
        return self._thresholds[table]

    def lookup(self, table: str, keys: np.ndarray) -> LookupResult:
        cache = self.cache(table)  # the PS asks the cache only for the tables it caches
        rows, hit = cache.query(_on(cache, keys))
        return LookupResult(rows=rows.cpu().numpy(), found=hit.cpu().numpy())

    def insert(self, table: str, keys: np.ndarray, rows: np.ndarray, *, unless_updated_since: int | None = None
               ) -> None:
        if table not in self._caches:
            return
        cache = self._caches[table]
        check_rows(table, rows, keys.size, cache.shards[0].dim)
        with self._write_locks[table]:
            started, finished = self._writes[table]
            if unless_updated_since is not None and (started != finished or started != unless_updated_since):
                return
            cache.insert(_on(cache, keys), _on(cache, rows))

    def insert_later(self, table: str, keys: np.ndarray, rows: np.ndarray, token: int | None) -> bool:
        """Insert off the caller's path (if no write begins meanwhile); False if dropped for a full queue."""
        return self.run_later(lambda: self.insert(table, keys, rows, unless_updated_since=token))

    def run_later(self, job: Callable[[], None]) -> bool:
        """Run a cache fill on the background thread; False (and counted) if too many already wait."""
        if not self._pending.acquire(blocking=False):
            self.dropped_inserts += 1
            return False

        def run() -> None:
            try:
                job()
            except Exception:  # a failed fill costs hits later, never the answer already given
                log.exception("cache: background fill failed")
            finally:
                self._pending.release()

        self._background.submit(run)
        return True

    def drain(self) -> None:
        """Wait for every background insert submitted so far."""
        self._background.submit(lambda: None).result()

    def update_token(self, table: str) -> int | None:
        if table not in self._caches:
            return None
        with self._write_locks[table]:
            started, finished = self._writes[table]
            return started if started == finished else -1

    def begin_update(self, table: str) -> None:
        if table in self._caches:
            with self._write_locks[table]:
                self._writes[table][0] += 1

    def end_update(self, table: str) -> None:
        if table in self._caches:
            with self._write_locks[table]:
                self._writes[table][1] += 1

    def update(self, table: str, keys: np.ndarray, rows: np.ndarray) -> int:
        if table not in self._caches:
            return 0
        cache = self._caches[table]
        check_rows(table, rows, keys.size, cache.shards[0].dim)
        return cache.update(_on(cache, keys), _on(cache, rows))

    def evict(self, table: str, keys: np.ndarray) -> int:
        if table not in self._caches:
            return 0
        cache = self._caches[table]
        return cache.invalidate(_on(cache, keys))

    def write(self, table: str, keys: np.ndarray, rows: np.ndarray) -> None:
        """A write through the PS: a static cache takes every row, a dynamic one refreshes the rows it holds
        (bulk writes would otherwise flush the hot rows that lookups brought in)."""
        if self.config.mode == "static":
            self.insert(table, keys, rows)
        else:
            self.update(table, keys, rows)

    def reload(self, table: str, keys: np.ndarray, rows: np.ndarray) -> None:
        """A table was replaced below: forget it, and a static cache loads the new contents."""
        if table not in self._caches:
            return
        self._caches[table].clear()
        if self.config.mode == "static":
            self.insert(table, keys, np.ascontiguousarray(rows, dtype=np.float32))

    def cache_stats(self) -> dict[str, CacheStats]:
        return {name: cache.stats() for name, cache in self._caches.items()}

    def stats(self) -> dict[str, TierTableStats]:
        return {
            name: TierTableStats(rows=s.rows, capacity_rows=s.capacity_rows, evictions=s.evictions,
                                 rejected=s.rejected)
            for name, s in self.cache_stats().items()
        }

    def close(self) -> None:
        self._background.shutdown(wait=True)
