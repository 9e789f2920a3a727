"""The Redis tier: rows in a Redis server or Redis Cluster that many nodes share (HPS's `redis_cluster` backend).

Layout, per table and partition p (a key's partition is a hash of it, the same on every node):

    {<prefix>.<table>.p<p>}      hash: 8-byte little-endian key -> the row's stored bytes (its dtype's, as RocksDB)
    {<prefix>.<table>.p<p>}.t    sorted set: key -> Redis server time of its last write (or read, with
                                 refresh_time_after_fetch): the order evict_lru takes victims in
    <prefix>.<table>.meta        "dim=<dim> dtype=<dtype>": a node configured otherwise is refused

The braces make both keys of a partition hash to one cluster slot, so that one Lua script writes a partition
atomically (rows, times and eviction together), while partitions spread over the cluster's nodes. Reads are
HMGETs, pipelined. Times come from the server's clock, so nodes with skewed clocks still agree on the order.

A dead or unreachable Redis: lookups report every key missing (the tiers below answer, exactly) and log it once;
promotions into it are dropped; writes (insert, update, evict) raise TierUnavailableError, because a write that
skipped this tier could leave a stale row in it for later reads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from recserve.config import RedisTierConfig, TableConfig
from recserve.errors import ConfigError, NotFoundError, TierUnavailableError
from recserve.ps.rows import from_bytes, row_bytes, to_storage
from recserve.ps.tiers import LookupResult, TierTableStats, check_rows

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

# ARGV: capacity of the partition (-1: none), rows to keep when evicting, policy, then key, row, key, row, ...
# Returns {written, evicted, rejected}.
_WRITE = """
local rows, times = KEYS[1], KEYS[2]
local capacity, keep, policy = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local count = (#ARGV - 3) / 2
if capacity < 0 or redis.call('HLEN', rows) + count <= capacity then
  -- room for all, even if every key is new: whole commands of up to 1,000 rows (Lua's unpack stops near 8,000)
  for first = 4, #ARGV, 2000 do
    local last = math.min(first + 1999, #ARGV)
    local scored = {}
    for i = first, last, 2 do
      scored[#scored + 1] = now
      scored[#scored + 1] = ARGV[i]
    end
    redis.call('HSET', rows, unpack(ARGV, first, last))
    redis.call('ZADD', times, unpack(scored))
  end
  return {count, 0, 0}
end
local written, evicted, rejected = 0, 0, 0
for i = 4, #ARGV, 2 do
  local key = ARGV[i]
  local fits = true
  if capacity >= 0 and redis.call('HEXISTS', rows, key) == 0 and redis.call('HLEN', rows) >= capacity then
    if policy == 'reject' then
      fits = false
      rejected = rejected + 1
    else
      local excess = redis.call('HLEN', rows) - keep
      local victims
      if policy == 'evict_random' then
        victims = redis.call('ZRANDMEMBER', times, excess)
      else
        victims = redis.call('ZRANGE', times, 0, excess - 1)
      end
      for _, victim in ipairs(victims) do
        evicted = evicted + redis.call('HDEL', rows, victim)
        redis.call('ZREM', times, victim)
      end
    end
  end
  if fits then
    redis.call('HSET', rows, key, ARGV[i + 1])
    redis.call('ZADD', times, now, key)
    written = written + 1
  end
end
return {written, evicted, rejected}
"""

# ARGV: key, row, key, row, ...: overwrite the keys the partition holds. Returns how many it held.
_UPDATE = """
local held = 0
for i = 1, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    held = held + 1
  end
end
return held
"""

# ARGV: keys. Drops them from the rows and the times. Returns how many were held.
_EVICT = """
local held = 0
for i = 1, #ARGV do
  held = held + redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
end
return held
"""

# ARGV: keys that were just read: their time becomes now (ZADD XX: a key evicted meanwhile stays out).
_TOUCH = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
for i = 1, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now, ARGV[i])
end
return #ARGV
"""


def partition_of(keys: np.ndarray, num_partitions: int) -> np.ndarray:
    """A key's partition: the top bits of a multiplicative hash, so that nearby keys spread."""
    mixed = keys.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(32)) % np.uint64(num_partitions)).astype(np.int64)


def _fields(keys: np.ndarray) -> list[bytes]:
    raw = keys.astype("<i8").tobytes()
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]


def connect(address: str, *, timeout_s: float, connect_timeout_s: float, cluster: bool = False,
            user_name: str = "default", password: str = "", field: str = "redis.address"
            ) -> redis.Redis | redis.cluster.RedisCluster:
    """A client of a server (`host:port`, or a redis:// / rediss:// / unix:// URL) or of a cluster (seed nodes
    `host:port`, comma-separated); `field` names the setting in errors. A failed call fails at once: redis-py
    would retry it 10 times with backoff (~5 s a call), hiding an outage from the tiers below (which answer
    instead), from the update consumer's own backoff and from a publisher's caller."""
    import redis
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.retry import Retry

    options = {"username": user_name if password else None, "password": password or None,
               "socket_timeout": timeout_s, "socket_connect_timeout": connect_timeout_s,
               "retry": Retry(NoBackoff(), 0)}
    if "://" in address and not cluster:
        return redis.Redis.from_url(address, **options)
    nodes = []
    for node in address.split(","):
        host, _, port = node.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"{field} '{address}': give host:port (or a redis:// URL), comma-separated host:port "
                              "seed nodes for a cluster")
        nodes.append((host, int(port)))
    if cluster:
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], **options)
    if len(nodes) > 1:
        raise ConfigError(f"{field} '{address}' names several nodes: set redis.cluster true")
    return redis.Redis(host=nodes[0][0], port=nodes[0][1], **options)


class RedisTier:
    """Tables in Redis hashes, partitioned; the Tier protocol. Thread-safe (redis-py pools connections)."""

    name = "redis"

    def __init__(self, config: RedisTierConfig, tables: list[TableConfig]) -> None:
        import redis

        self._config = config
        self._specs = {t.name: t for t in tables}
        self._redis_error = redis.RedisError
        self._client = connect(config.address, timeout_s=config.timeout_s, connect_timeout_s=config.timeout_s,
                               cluster=config.cluster, user_name=config.user_name, password=config.password)
        self._write, self._update, self._evict, self._touch = (
            self._client.register_script(source) for source in (_WRITE, _UPDATE, _EVICT, _TOUCH))
        self._lock = threading.Lock()
        self._evictions = dict.fromkeys(self._specs, 0)
        self._rejected = dict.fromkeys(self._specs, 0)
        self._writes = {name: [0, 0] for name in self._specs}  # started, finished: promotion tokens
        self._down = False  # an outage is logged once, when it starts
        try:
            for table in tables:
                self._check_meta(table)
        except BaseException:
            self._client.close()
            raise

    def _check_meta(self, table: TableConfig) -> None:
        """Claim the table's shape in Redis, or check this node agrees with the one that claimed it."""
        meta = f"dim={table.dim} dtype={table.dtype}"
        name = f"{self._config.key_prefix}.{table.name}.meta"
        try:
            self._client.set(name, meta, nx=True)
            stored = self._client.get(name)
        except self._redis_error as error:
            raise self._unavailable("opening", table.name, error) from None
        if stored is not None and stored.decode() != meta:
            raise ConfigError(f"table '{table.name}': Redis at {self._config.address} holds it as "
                              f"{stored.decode()}, the config says {meta}")

    def _names(self, table: str, partition: int) -> tuple[str, str]:
        rows = f"{{{self._config.key_prefix}.{table}.p{partition}}}"
        return rows, f"{rows}.t"

    def _spec(self, table: str) -> TableConfig:
        try:
            return self._specs[table]
        except KeyError:
            raise NotFoundError(f"redis: unknown table '{table}'") from None

    def _by_partition(self, keys: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(partition, positions of its keys in `keys`), for the partitions that have any."""
        parts = partition_of(keys, self._config.num_partitions)
        order = np.argsort(parts, kind="stable")
        bounds = np.searchsorted(parts[order], np.arange(self._config.num_partitions + 1))
        for p in range(self._config.num_partitions):
            if bounds[p + 1] > bounds[p]:
                yield p, order[bounds[p]:bounds[p + 1]]

    def _unavailable(self, action: str, table: str, error: Exception) -> TierUnavailableError:
        return TierUnavailableError(f"redis {self._config.address}", f"{action} table '{table}': {error}")

    # --- reads ---

    def lookup(self, table: str, keys: np.ndarray) -> LookupResult:
        spec = self._spec(table)
        size = row_bytes(spec.dtype, spec.dim)
        values: list[bytes | None] = [None] * keys.size
        try:
            pipe = self._client.pipeline(transaction=False)
            plan = []
            for p, positions in self._by_partition(keys):
                for start in range(0, positions.size, self._config.max_get_batch_size):
                    chunk = positions[start:start + self._config.max_get_batch_size]
                    pipe.hmget(self._names(table, p)[0], _fields(keys[chunk]))
                    plan.append(chunk)
            for chunk, answer in zip(plan, pipe.execute(), strict=True):
                for position, value in zip(chunk.tolist(), answer, strict=True):
                    values[position] = value
        except self._redis_error as error:
            self._note_outage(self._unavailable("reading", table, error))
            return LookupResult(np.zeros((keys.size, spec.dim), np.float32), np.zeros(keys.size, dtype=bool))
        self._note_recovery()
        found = np.fromiter((v is not None and len(v) == size for v in values), dtype=bool, count=keys.size)
        foreign = sum(1 for v in values if v is not None and len(v) != size)
        if foreign:  # not ours to trust: the tiers below answer, and the promotion overwrites it
            log.warning("redis: %d rows of table '%s' have the wrong size for dim %d %s; read from below",
                        foreign, table, spec.dim, spec.dtype)
        rows = np.zeros((keys.size, spec.dim), np.float32)
        if found.any():
            rows[found] = from_bytes(b"".join(v for v, f in zip(values, found, strict=True) if f),  # type: ignore[misc]
                                     spec.dtype, spec.dim)
            if self._config.refresh_time_after_fetch:
                self._refresh_times(table, keys[found])
        return LookupResult(rows, found)

    def _refresh_times(self, table: str, keys: np.ndarray) -> None:
        try:
            for p, positions in self._by_partition(keys):
                self._touch(keys=[self._names(table, p)[1]], args=_fields(keys[positions]))
        except self._redis_error as error:
            self._note_outage(self._unavailable("refreshing times of", table, error))

    def _note_outage(self, error: TierUnavailableError) -> None:
        if not self._down:
            log.warning("%s; lookups fall through to the tiers below until it answers again", error)
        self._down = True

    def _note_recovery(self) -> None:
        if self._down:
            log.warning("redis %s answers again", self._config.address)
        self._down = False

    # --- writes ---

    def insert(self, table: str, keys: np.ndarray, rows: np.ndarray, *, unless_updated_since: int | None = None
               ) -> None:
        """Upsert rows; a full partition evicts (or refuses) by the policy. A promotion (with a token) is
        dropped if a write began since the token, or if Redis is down."""
        spec = self._spec(table)
        check_rows(table, rows, keys.size, spec.dim)
        if unless_updated_since is not None and unless_updated_since != self.update_token(table):
            return
        stored = to_storage(rows, spec.dtype, table)
        capacity, keep = self._partition_capacity()
        evicted = rejected = 0
        try:
            for p, positions in self._by_partition(keys):
                names = list(self._names(table, p))
                for start in range(0, positions.size, self._config.max_set_batch_size):
                    chunk = positions[start:start + self._config.max_set_batch_size]
                    args = [capacity, keep, self._config.overflow_policy, *_pairs(keys[chunk], stored[chunk])]
                    _, gone, refused = self._write(keys=names, args=args)
                    evicted, rejected = evicted + gone, rejected + refused
        except self._redis_error as error:
            unavailable = self._unavailable("writing", table, error)
            if unless_updated_since is not None:
                self._note_outage(unavailable)
                return
            raise unavailable from None
        finally:
            with self._lock:
                self._evictions[table] += evicted
                self._rejected[table] += rejected

    def _partition_capacity(self) -> tuple[int, int]:
        """(rows a partition holds at most, rows it keeps when it evicts); -1: unbounded."""
        if self._config.capacity_rows is None:
            return -1, -1
        capacity = max(1, -(-self._config.capacity_rows // self._config.num_partitions))
        return capacity, min(capacity - 1, int(capacity * self._config.overflow_resolution_target))

    def update(self, table: str, keys: np.ndarray, rows: np.ndarray) -> int:
        spec = self._spec(table)
        check_rows(table, rows, keys.size, spec.dim)
        stored = to_storage(rows, spec.dtype, table)
        held = 0
        try:
            for p, positions in self._by_partition(keys):
                for start in range(0, positions.size, self._config.max_set_batch_size):
                    chunk = positions[start:start + self._config.max_set_batch_size]
                    held += self._update(keys=[self._names(table, p)[0]], args=_pairs(keys[chunk], stored[chunk]))
        except self._redis_error as error:
            raise self._unavailable("updating", table, error) from None
        return held

    def evict(self, table: str, keys: np.ndarray) -> int:
        self._spec(table)
        held = 0
        try:
            for p, positions in self._by_partition(keys):
                held += self._evict(keys=list(self._names(table, p)), args=_fields(keys[positions]))
        except self._redis_error as error:
            raise self._unavailable("evicting from", table, error) from None
        return held

    def clear(self, table: str) -> None:
        """Drops every row of the table (its import replaced it below)."""
        self._spec(table)
        try:
            pipe = self._client.pipeline(transaction=False)
            for p in range(self._config.num_partitions):
                pipe.delete(*self._names(table, p))
            pipe.execute()
        except self._redis_error as error:
            raise self._unavailable("clearing", table, error) from None

    def update_token(self, table: str) -> int | None:
        with self._lock:
            started, finished = self._writes[table]
            return started if started == finished else -1

    def begin_update(self, table: str) -> None:
        with self._lock:
            self._writes[table][0] += 1

    def end_update(self, table: str) -> None:
        with self._lock:
            self._writes[table][1] += 1

    # --- stats and lifetime ---

    def stats(self) -> dict[str, TierTableStats]:
        try:
            pipe = self._client.pipeline(transaction=False)
            for table in self._specs:
                for p in range(self._config.num_partitions):
                    pipe.hlen(self._names(table, p)[0])
            lengths = iter(pipe.execute())
        except self._redis_error as error:
            raise TierUnavailableError(f"redis {self._config.address}", f"reading stats: {error}") from None
        with self._lock:
            return {
                table: TierTableStats(rows=sum(next(lengths) for _ in range(self._config.num_partitions)),
                                      capacity_rows=self._config.capacity_rows,
                                      evictions=self._evictions[table], rejected=self._rejected[table])
                for table in self._specs
            }

    def close(self) -> None:
        self._client.close()


def _pairs(keys: np.ndarray, stored: np.ndarray) -> list[bytes]:
    """key, row, key, row, ... as the write scripts take them."""
    raw = stored.tobytes()
    size = len(raw) // max(1, keys.size)
    out: list[bytes] = []
    for i, field in enumerate(_fields(keys)):
        out.append(field)
        out.append(raw[i * size:(i + 1) * size])
    return out
