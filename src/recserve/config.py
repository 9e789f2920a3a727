"""Typed configuration: tables, tiers, models. Loads our YAML/JSON and HugeCTR HPS JSON deployment files.

Every model forbids unknown keys: a misspelt key is an error that names it (HPS silently ignores them, and a
typo such as `overflow_polcy` then quietly runs with the default). Components take their own sub-config; only
the composition root (cli) sees the whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from recserve.errors import ConfigError

OverflowPolicy = Literal["evict_lru", "evict_lfu", "evict_random", "reject"]
RowDtype = Literal["float32", "float16", "bfloat16"]
ROW_ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}  # bytes a stored value takes
TableName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class TableConfig(StrictModel):
    """One embedding table: rows of `dim` values addressed by int64 keys."""

    name: TableName = Field(description="Table name, unique in the parameter server.")
    dim: int = Field(gt=0, le=65_536, description="Values per row.")
    dtype: RowDtype = Field("float32", description="Storage type of rows; lookups always return float32.")
    default_value: float | list[float] = Field(
        0.0, description="Row returned for a key found in no tier: one value for every column, or a full row."
    )
    dram_capacity_rows: int | None = Field(
        None, gt=0, description="Rows the DRAM tier holds for this table (split over partitions, with a little "
        "headroom for uneven hashing, so a table sized to its row count holds every row)."
    )
    dram_capacity_bytes: int | None = Field(
        None, gt=0, description="Alternative to dram_capacity_rows: a memory budget, rows and index included."
    )
    overflow_policy: OverflowPolicy = Field(
        "evict_lru", description="What the DRAM tier does when this table is full and a new key arrives."
    )
    rows: int | None = Field(
        None, gt=0, description="Rows the table holds (or will): sizes its device cache from a fraction."
    )
    cache_fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="Device cache size as a fraction of `rows` (HPS's gpucacheper); None: "
        "the cache's default fraction, 0: this table is not cached.",
    )
    cache_hit_rate_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="Overrides the cache's hit_rate_threshold for this table."
    )

    @model_validator(mode="after")
    def _check(self) -> TableConfig:
        if self.dram_capacity_rows is not None and self.dram_capacity_bytes is not None:
            raise ValueError(f"table '{self.name}': set dram_capacity_rows or dram_capacity_bytes, not both")
        if isinstance(self.default_value, list) and len(self.default_value) != self.dim:
            raise ValueError(
                f"table '{self.name}': default_value has {len(self.default_value)} values, dim is {self.dim}"
            )
        return self

    @property
    def itemsize(self) -> int:
        return ROW_ITEMSIZE[self.dtype]

    def default_row(self) -> np.ndarray:
        """The float32 row [dim] returned for keys found nowhere."""
        if isinstance(self.default_value, list):
            return np.asarray(self.default_value, dtype=np.float32)
        return np.full(self.dim, self.default_value, dtype=np.float32)


class DramTierConfig(StrictModel):
    """The volatile in-memory tier: a partitioned hash map in shared memory."""

    enabled: bool = Field(True, description="Use the DRAM tier at all.")
    num_partitions: int = Field(8, ge=1, le=4096, description="Hash partitions per table (parallel writes).")
    default_capacity_rows: int = Field(
        1_000_000, gt=0, description="Capacity of tables that set neither dram_capacity_rows nor _bytes."
    )
    overflow_resolution_target: float = Field(
        0.8, gt=0.0, le=1.0,
        description="When a full partition must take a new key, evict down to this fraction of its capacity "
        "(batch eviction amortises the cost of finding victims; HPS's default is 0.8).",
    )
    shared_memory: bool = Field(
        True, description="Keep tables in shared memory so worker processes read one copy. Off: memory private "
        "to one process (threads share it).",
    )
    shm_dir: Path = Field(Path("/dev/shm"), description="Folder of the shared-memory files.")
    huge_pages: bool = Field(
        True, description="Back shared tables of 16 MiB and more with 2 MiB pages where the kernel allows (Linux "
        "6.1+): random lookups into large tables run up to 1.7x faster. Commits each such table's whole capacity "
        "when it is created (about 2 s a GiB); off: memory grows with the rows held.",
    )


CachePolicy = Literal["lru", "lfu"]


class DeviceCacheConfig(StrictModel):
    """The top tier: a set-associative cache of hot rows in torch tensors, on cuda or cpu (HPS's GPU cache).

    Off by default: on cpu the DRAM tier answers a hit faster than this cache does (benchmarks/bench_cache.py
    measures both; see the README's benchmarks), so a cpu cache only pays where the tiers below are slow.
    """

    enabled: bool = Field(False, description="Put the cache in front of the DRAM tier.")
    mode: Literal["dynamic", "static"] = Field(
        "dynamic", description="dynamic: hot rows, evicted by `policy`; static: the whole table, never evicted."
    )
    fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="Cache rows as a fraction of each table's rows (HPS's gpucacheper)."
    )
    default_rows: int = Field(
        65_536, gt=0, description="Cache rows of a table whose row count is unknown (no `rows`, no DRAM capacity)."
    )
    ways: int = Field(8, ge=1, le=1024, description="Slots per set (associativity).")
    policy: CachePolicy = Field("lru", description="Which slot of a full set a new row replaces.")
    devices: list[int | str] = Field(
        default_factory=lambda: ["cpu"], min_length=1,
        description="One cache shard per entry: a torch device ('cpu', 'cuda:1'), or a device number, which is "
        "that CUDA device when CUDA exists and a cpu shard otherwise (so HPS files run anywhere).",
    )
    replicate: bool = Field(
        False, description="Every shard holds the whole cache (HPS's way) instead of a split of keys by hash."
    )
    hit_rate_threshold: float = Field(
        0.9, ge=0.0, le=1.0, description="A batch with at least this hit rate inserts its misses in the "
        "background; below it, before answering.",
    )
    hps_compat_default_on_miss: bool = Field(
        False, description="HPS's inexact mode: a batch at or over the threshold answers its misses with the "
        "table's default row and fetches them in the background. Off: misses are always fetched first.",
    )
    max_pending_inserts: int = Field(
        64, gt=0, description="Background insert batches waiting, at most; more are dropped (it is a cache)."
    )


class RedisTierConfig(StrictModel):
    """A Redis (or Redis Cluster) tier below the DRAM tier, shared by every node that points at it (HPS's
    `redis_cluster` volatile database). Each table is split into hash partitions, each a Redis hash of rows and
    a sorted set of when each row was written (or last read, with refresh_time_after_fetch)."""

    enabled: bool = Field(False, description="Use a Redis tier at all.")
    address: str = Field("127.0.0.1:6379", description="host:port; for a cluster, one or more seed nodes, "
                         "comma-separated.")
    cluster: bool = Field(False, description="Talk to a Redis Cluster (partitions spread over its nodes).")
    user_name: str = "default"
    password: str = ""
    key_prefix: str = Field("recserve", pattern=r"^[A-Za-z0-9_.\-]+$", description="Names every Redis key.")
    num_partitions: int = Field(8, ge=1, le=4096, description="Hash partitions per table.")
    capacity_rows: int | None = Field(None, gt=0, description="Rows per table at most; None: unbounded.")
    overflow_policy: Literal["evict_lru", "evict_random", "reject"] = Field(
        "evict_lru", description="When a partition is full: evict its oldest (or random) rows down to "
        "overflow_resolution_target of its share of capacity_rows, or refuse new keys.")
    overflow_resolution_target: float = Field(0.8, gt=0.0, le=1.0)
    refresh_time_after_fetch: bool = Field(
        False, description="A read counts as a use for evict_lru (a write per read; HPS's option, off as there).")
    max_get_batch_size: int = Field(10_000, gt=0, description="Keys per HMGET.")
    max_set_batch_size: int = Field(10_000, gt=0, description="Rows per write script call.")
    timeout_s: float = Field(5.0, gt=0, description="Socket timeout of one call.")


class RocksTierConfig(StrictModel):
    """The persistent tier: RocksDB, one column family per table, the full copy of every table."""

    enabled: bool = Field(True, description="Use the RocksDB tier at all.")
    path: Path = Field(Path("recserve-store"), description="RocksDB directory.")
    read_only: bool = Field(False, description="Open read-only (several processes may then share it).")
    block_cache_bytes: int = Field(256 << 20, ge=0, description="RocksDB block cache size.")
    mmap_reads: bool = Field(True, description="Read table files through memory maps (faster point reads; a "
                             "file truncated under a running process then faults instead of erroring).")
    max_get_batch_size: int = Field(10_000, gt=0, description="Keys per RocksDB multi-get call.")


class UpdateSourceConfig(StrictModel):
    """Where online updates come from: a Redis stream or a Kafka topic (ps/updates.py applies them)."""

    type: Literal["disabled", "kafka", "redis_streams"] = "disabled"
    address: str | None = Field(None, description="Redis host:port or redis:// URL (default 127.0.0.1:6379); "
                                "Kafka brokers (default 127.0.0.1:9092).")
    stream: str | None = Field(None, description="The Redis stream or Kafka topic; when serving, default "
                               "'recserve.<model>'.")
    poll_timeout_ms: int = Field(500, gt=0, description="How long one read waits for new messages.")
    max_batch_size: int = Field(64, gt=0, description="Messages per read, at most.")
    failure_backoff_ms: int = Field(50, ge=0, description="First pause after a failed read or write; it doubles "
                                    "while failures go on, up to 5 s.")
    catch_up_timeout_s: float = Field(60.0, ge=0, description="When serving: how long a model's start waits for "
                                      "the updates the stream holds to be applied before it reports ready.")


class PSConfig(StrictModel):
    """The hierarchical parameter server: its tables and tiers."""

    tables: list[TableConfig] = Field(default_factory=list)
    cache: DeviceCacheConfig = Field(default_factory=DeviceCacheConfig)
    dram: DramTierConfig = Field(default_factory=DramTierConfig)
    redis: RedisTierConfig = Field(default_factory=RedisTierConfig)
    rocksdb: RocksTierConfig = Field(default_factory=RocksTierConfig)

    @model_validator(mode="after")
    def _unique_tables(self) -> PSConfig:
        seen: set[str] = set()
        for table in self.tables:
            if table.name in seen:
                raise ValueError(f"table '{table.name}' is declared twice")
            seen.add(table.name)
        return self

    def table(self, name: str) -> TableConfig:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(name)


class ModelConfig(StrictModel):
    """A served model as far as the parameter server is concerned: which tables it reads."""

    name: TableName
    tables: list[str] = Field(default_factory=list, description="Names of the PS tables the model reads.")
    max_batch_size: int = Field(64, gt=0, description="Items per query the model accepts at most.")
    max_keys_per_table: list[int] | None = Field(None, description="Keys per item per table at most.")
    num_dense_features: int = Field(0, ge=0)
    dense_file: Path | None = None
    sparse_files: list[Path] = Field(default_factory=list, description="Import sources, one per table.")


class RecserveConfig(StrictModel):
    """The whole configuration: parameter server, models, update source."""

    ps: PSConfig = Field(default_factory=PSConfig)
    models: list[ModelConfig] = Field(default_factory=list)
    update_source: UpdateSourceConfig = Field(default_factory=UpdateSourceConfig)

    @model_validator(mode="after")
    def _models_name_known_tables(self) -> RecserveConfig:
        known = {t.name for t in self.ps.tables}
        for model in self.models:
            for table in model.tables:
                if table not in known:
                    raise ValueError(f"model '{model.name}' reads table '{table}', which ps.tables lacks")
        return self


class SchedulerConfig(StrictModel):
    """DeepRecSched's knobs for one served model. Live-settable: the tuner moves them without a restart."""

    batch_size: int = Field(64, gt=0, description="B: items per sub-batch; a query of N items runs as ceil(N/B).")
    num_workers: int = Field(1, gt=0, description="W: worker processes running sub-batches concurrently.")
    threads_per_worker: int = Field(1, gt=0, description="k: intra-op threads of each worker (W x k <= cores).")
    accelerator_threshold: int | None = Field(
        None, gt=0, description="T: queries of >= T items run whole on the accelerator (needs CUDA; else ignored)."
    )
    max_queue: int = Field(64, gt=0, description="Queries waiting per model, at most; more are refused (503).")
    latency_target_ms: float = Field(
        100.0, gt=0, description="A query's deadline after its arrival; one that cannot make it is refused at once."
    )
    idle_spin_us: int = Field(
        0, ge=0, le=1_000_000, description="How long an idle worker polls for its next sub-batch, and a waiting "
        "thread for a worker's answer, before sleeping (yielding its core meanwhile): a core woken from sleep runs "
        "the next sub-batch several times slower, so small queries gain where cores are to spare (2000: 1-item "
        "p50 -20%); with every core busy the polling cost capacity at the p95 target. 0: sleep at once. Set when "
        "workers start, not live.",
    )
    inline_max_items: int = Field(
        64, ge=0, description="A query of at most this many items that arrives while a worker is idle and no "
        "other query of the model is in flight runs in the serving process, on the request's thread (gRPC) or a "
        "thread of the event loop's (HTTP), holding the idle worker: no trip to a worker whose core slept (1-item "
        "gRPC p50 1.70 vs 2.31 ms here). Larger ones hold the serving process's GIL too long (sched/inline.py). "
        "0: every query runs on the workers. Set when the model loads.",
    )


class OnlineTuningConfig(StrictModel):
    """Re-tuning while serving: the live traffic's load and tail are watched window by window; a drift starts
    a hill climb on the live traffic (sched/online.py)."""

    enabled: bool = Field(False, description="Watch and re-tune this model while serving.")
    window_s: float = Field(5.0, gt=0.0, description="Seconds of traffic per observation (and per setting tried).")
    drift: float = Field(0.25, gt=0.0, description="Relative change of load that starts a re-tune.")
    margin: float = Field(0.1, ge=0.0, lt=1.0, description="Relative drop of the tail that counts as better.")
    min_queries: int = Field(30, gt=0, description="Fewer queries in a window: no conclusion drawn from it.")
    percentile: Literal[50.0, 95.0, 99.0] = Field(95.0, description="The tail the tuner watches.")


class ServingConfig(StrictModel):
    """How one model of a serving repository is served: `<repo>/<model>/serve.yaml`, next to its checkpoint."""

    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    online_tuning: OnlineTuningConfig = Field(default_factory=OnlineTuningConfig)
    dram: DramTierConfig = Field(default_factory=DramTierConfig)
    redis: RedisTierConfig = Field(
        default_factory=RedisTierConfig, description="A Redis tier below the DRAM tier: the serving process "
        "answers its workers' DRAM misses from it, then from RocksDB.",
    )
    rocksdb: RocksTierConfig = Field(
        default_factory=lambda: RocksTierConfig(enabled=False),
        description="Off by default: the checkpoint's tables then live in the DRAM tier only. A relative path "
        "is taken from the model folder.",
    )
    dram_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="DRAM tier capacity per table, as a fraction of the table's rows."
    )
    table_dtype: RowDtype = Field(
        "float32", description="How the parameter server stores every table's rows: float16 or bfloat16 halve "
        "its memory, the checkpoint's float32 rows rounded on import (and the scores with them).",
    )
    max_items: int = Field(65_536, gt=0, description="Items per query, at most (bigger queries: 400).")
    update_source: UpdateSourceConfig = Field(
        default_factory=UpdateSourceConfig, description="Online updates of the model's tables: the checkpoint's "
        "rows, then every update the stream holds, in order.",
    )


class SizeDistribution(StrictModel):
    """Items per query. DeepRecSys used lognormal(mu 5.1, sigma 0.2) and normal(165, 16)."""

    kind: Literal["fixed", "normal", "lognormal", "production", "file"] = "lognormal"
    items: int = Field(256, gt=0, description="fixed: every query's size.")
    mean: float = Field(165.0, gt=0, description="normal: mean items.")
    std: float = Field(16.0, ge=0, description="normal: standard deviation.")
    mu: float = Field(5.1, description="lognormal: mean of log(items).")
    sigma: float = Field(0.2, ge=0, le=5, description="lognormal: standard deviation of log(items).")
    path: Path | None = Field(None, description="file: one size per line, drawn in order, cycled.")
    max_items: int = Field(1024, gt=0, description="Sizes are clipped to [1, max_items].")

    @model_validator(mode="after")
    def _file_has_path(self) -> SizeDistribution:
        if self.kind == "file" and self.path is None:
            raise ValueError("size distribution 'file' needs a path")
        return self


class ArrivalProcess(StrictModel):
    """When queries are sent: open loop, at scheduled times that a slow server cannot delay."""

    kind: Literal["poisson", "constant", "trace"] = "poisson"
    qps: float = Field(100.0, gt=0, le=1e6, description="poisson, constant: offered queries per second.")
    path: Path | None = Field(None, description="trace: one send time in seconds per line, ascending.")

    @model_validator(mode="after")
    def _trace_has_path(self) -> ArrivalProcess:
        if self.kind == "trace" and self.path is None:
            raise ValueError("arrival process 'trace' needs a path")
        return self


class LoadConfig(StrictModel):
    """One load-generator run against one model."""

    model: str = "rmc1"
    duration_s: float = Field(10.0, gt=0, description="Scheduled sending time (the run waits for stragglers).")
    arrivals: ArrivalProcess = Field(default_factory=ArrivalProcess)
    sizes: SizeDistribution = Field(default_factory=SizeDistribution)
    zipf_alpha: float = Field(1.05, gt=0, description="Key popularity per table (0 < alpha; ~1 is web-like).")
    seed: int = 0
    max_in_flight: int = Field(4096, gt=0, description="Queries outstanding at most; beyond, sends are counted "
                               "as client-side drops (the load generator cannot keep up), never delayed.")


# --- HugeCTR HPS JSON ---------------------------------------------------------------------------------------
# Field names and defaults are HPS's own; only the strictness is ours.


class HpsVolatileDb(StrictModel):
    type: Literal["disabled", "hash_map", "parallel_hash_map", "multi_process_hash_map", "redis_cluster"] = (
        "parallel_hash_map"
    )
    address: str = "127.0.0.1:7000"
    user_name: str = "default"
    password: str = ""
    algorithm: str = "phm"
    num_partitions: int = Field(8, ge=1)
    allocation_rate: int = Field(256 << 20, gt=0)
    shared_memory_size: int = Field(16 << 30, gt=0)
    shared_memory_name: str = "hctr_mp_hash_map_database"
    shared_memory_auto_remove: bool = True
    max_batch_size: int = Field(65_536, gt=0)
    max_get_batch_size: int = Field(10_000, gt=0)
    max_set_batch_size: int = Field(10_000, gt=0)
    enable_tls: bool = False
    tls_ca_certificate: str = "cacertbundle.crt"
    tls_client_certificate: str = "client_cert.pem"
    tls_client_key: str = "client_key.pem"
    tls_server_name_identification: str = "redis.localhost"
    refresh_time_after_fetch: bool = False
    overflow_margin: int = Field(2**64 - 1, gt=0)
    overflow_policy: Literal["evict_random", "evict_oldest", "evict_least_used"] = "evict_oldest"
    overflow_resolution_target: float = Field(0.8, gt=0.0, le=1.0)
    initialize_after_startup: bool = True
    initial_cache_rate: float = Field(1.0, ge=0.0, le=1.0)
    cache_missed_embeddings: bool = False
    update_filters: list[str] = Field(default_factory=lambda: ["^hps_.+$"])


class HpsPersistentDb(StrictModel):
    type: Literal["disabled", "rocks_db"] = "disabled"
    path: Path = Path("/tmp/rocksdb")
    num_threads: int = Field(16, ge=1)
    read_only: bool = False
    max_batch_size: int = Field(10_000, gt=0)
    max_get_batch_size: int = Field(10_000, gt=0)
    max_set_batch_size: int = Field(10_000, gt=0)
    update_filters: list[str] = Field(default_factory=lambda: ["^hps_.+$"])


class HpsUpdateSource(StrictModel):
    type: Literal["null", "kafka_message_queue"] = "null"
    brokers: str = "127.0.0.1:9092"
    metadata_refresh_interval_ms: int = Field(30_000, gt=0)
    receive_buffer_size: int = Field(256 * 1024, gt=0)
    poll_timeout_ms: int = Field(500, gt=0)
    max_batch_size: int = Field(8 * 1024, gt=0)
    failure_backoff_ms: int = Field(50, ge=0)
    max_commit_interval: int = Field(32, gt=0)


class HpsModel(StrictModel):
    model: TableName
    sparse_files: list[Path] = Field(min_length=1)
    dense_file: Path | None = None
    network_file: Path | None = None
    num_of_worker_buffer_in_pool: int = Field(1, ge=1)
    num_of_refresher_buffer_in_pool: int = Field(1, ge=0)
    cache_refresh_percentage_per_iteration: float = Field(0.0, ge=0.0, le=1.0)
    deployed_device_list: list[int] = Field(min_length=1)
    max_batch_size: int = Field(64, gt=0)
    default_value_for_each_table: list[float] = Field(min_length=1)
    maxnum_des_feature_per_sample: int = Field(26, ge=0)
    maxnum_catfeature_query_per_table_per_sample: list[int] = Field(min_length=1)
    embedding_vecsize_per_table: list[int] = Field(min_length=1)
    embedding_table_names: list[TableName] | None = None
    gpucache: bool = True
    gpucacheper: float = Field(0.2, ge=0.0, le=1.0)
    hit_rate_threshold: float = Field(0.9, ge=0.0, le=1.0)
    refresh_delay: float = Field(0.0, ge=0.0)
    refresh_interval: float = Field(0.0, ge=0.0)
    label_dim: int = Field(1, ge=1)
    slot_num: int = Field(1, ge=1)
    use_static_table: bool = False
    use_context_stream: bool = True
    fuse_embedding_table: bool = False
    i64_input_key: bool = True
    use_mixed_precision: bool = False

    @model_validator(mode="after")
    def _lengths_agree(self) -> HpsModel:
        n = len(self.sparse_files)
        per_table = {
            "embedding_vecsize_per_table": len(self.embedding_vecsize_per_table),
            "maxnum_catfeature_query_per_table_per_sample": len(self.maxnum_catfeature_query_per_table_per_sample),
            "embedding_table_names": len(self.table_names()),
        }
        if len(self.default_value_for_each_table) != 1:  # one value is broadcast, as HPS does
            per_table["default_value_for_each_table"] = len(self.default_value_for_each_table)
        for key, length in per_table.items():
            if length != n:
                raise ValueError(f"model '{self.model}': {key} has {length} entries, sparse_files has {n}")
        return self

    def table_names(self) -> list[str]:
        return self.embedding_table_names or [f"sparse_embedding{i}" for i in range(len(self.sparse_files))]


class HpsConfig(StrictModel):
    supportlonglong: bool = True
    volatile_db: HpsVolatileDb = Field(default_factory=HpsVolatileDb)
    persistent_db: HpsPersistentDb = Field(default_factory=HpsPersistentDb)
    update_source: HpsUpdateSource = Field(default_factory=HpsUpdateSource)
    models: list[HpsModel] = Field(min_length=1)


_HPS_POLICY: dict[str, OverflowPolicy] = {
    "evict_oldest": "evict_lru",
    "evict_least_used": "evict_lfu",
    "evict_random": "evict_random",
}


def from_hps(hps: HpsConfig) -> RecserveConfig:
    """Translate an HPS deployment into our config. Table names are shared across models, as in one PS.

    HPS sets the GPU cache per model; here it is per table (`cache_fraction`, 0 where `gpucache` is false), and
    the cache's shards are the union of the models' `deployed_device_list`.
    """
    vdb, pdb = hps.volatile_db, hps.persistent_db
    unbounded = vdb.overflow_margin >= 2**63
    capacity = None if unbounded else vdb.overflow_margin * vdb.num_partitions
    tables: dict[str, TableConfig] = {}
    models = []
    for m in hps.models:
        names = m.table_names()
        defaults = m.default_value_for_each_table * (len(names) if len(m.default_value_for_each_table) == 1 else 1)
        for name, dim, default, source in zip(names, m.embedding_vecsize_per_table, defaults, m.sparse_files,
                                              strict=True):
            table = TableConfig(
                name=name, dim=dim, default_value=default, dram_capacity_rows=capacity,
                overflow_policy=_HPS_POLICY[vdb.overflow_policy], rows=_hps_rows(source),
                cache_fraction=m.gpucacheper if m.gpucache else 0.0, cache_hit_rate_threshold=m.hit_rate_threshold,
            )
            if name in tables and tables[name] != table:
                raise ConfigError(f"model '{m.model}': table '{name}' is declared again with other settings")
            tables[name] = table
        models.append(
            ModelConfig(
                name=m.model, tables=names, max_batch_size=m.max_batch_size,
                max_keys_per_table=m.maxnum_catfeature_query_per_table_per_sample,
                num_dense_features=m.maxnum_des_feature_per_sample, dense_file=m.dense_file,
                sparse_files=m.sparse_files,
            )
        )
    devices: list[int | str] = sorted({d for m in hps.models for d in m.deployed_device_list})
    update = hps.update_source
    return RecserveConfig(
        ps=PSConfig(
            tables=list(tables.values()),
            cache=DeviceCacheConfig(
                enabled=any(m.gpucache for m in hps.models),
                mode="static" if any(m.use_static_table for m in hps.models) else "dynamic", devices=devices,
                replicate=False,
            ),
            dram=DramTierConfig(
                enabled=vdb.type not in ("disabled", "redis_cluster"), num_partitions=vdb.num_partitions,
                overflow_resolution_target=vdb.overflow_resolution_target,
            ),
            redis=_hps_redis(vdb, capacity),
            rocksdb=RocksTierConfig(
                enabled=pdb.type == "rocks_db", path=pdb.path, read_only=pdb.read_only,
                max_get_batch_size=pdb.max_get_batch_size,
            ),
        ),
        models=models,
        update_source=UpdateSourceConfig(
            type="kafka" if update.type == "kafka_message_queue" else "disabled", address=update.brokers,
            poll_timeout_ms=update.poll_timeout_ms, max_batch_size=update.max_batch_size,
            failure_backoff_ms=update.failure_backoff_ms,
        ),
    )


def _hps_redis(vdb: HpsVolatileDb, capacity: int | None) -> RedisTierConfig:
    """volatile_db of type redis_cluster as our Redis tier (anything else: the tier off)."""
    if vdb.type != "redis_cluster":
        return RedisTierConfig()
    if vdb.enable_tls:
        raise ConfigError("volatile_db.enable_tls: TLS to Redis is not available in this version")
    if vdb.overflow_policy == "evict_least_used":
        raise ConfigError("volatile_db.overflow_policy 'evict_least_used' is not available for redis_cluster: "
                          "use evict_oldest or evict_random")
    return RedisTierConfig(
        enabled=True, address=vdb.address, cluster=True, user_name=vdb.user_name, password=vdb.password,
        num_partitions=vdb.num_partitions, capacity_rows=capacity,
        overflow_policy="evict_random" if vdb.overflow_policy == "evict_random" else "evict_lru",
        overflow_resolution_target=vdb.overflow_resolution_target,
        refresh_time_after_fetch=vdb.refresh_time_after_fetch, max_get_batch_size=vdb.max_get_batch_size,
        max_set_batch_size=vdb.max_set_batch_size,
    )


def _hps_rows(sparse_folder: Path) -> int | None:
    """Rows of an HPS sparse model folder: its `key` file holds one int64 per row. None when not readable yet."""
    try:
        return (sparse_folder / "key").stat().st_size // 8 or None
    except OSError:
        return None


# --- loading ------------------------------------------------------------------------------------------------

_HPS_TOP_KEYS = {"supportlonglong", "volatile_db", "persistent_db"}


def is_hps_document(data: Any) -> bool:
    """HPS files have `models[]` entries keyed `model`, or HPS's top-level database keys; ours have `ps`."""
    if not isinstance(data, dict) or "ps" in data:
        return False
    if _HPS_TOP_KEYS & data.keys():
        return True
    models = data.get("models")
    return isinstance(models, list) and any(isinstance(m, dict) and "model" in m for m in models)


def describe_errors(error: ValidationError) -> str:
    """One line per problem, naming the key path and the offending value."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key")
        else:
            lines.append(f"{where}: {item['msg']} (got {item['input']!r})"[:500])
    return "; ".join(lines)


def parse_config(data: Any, source: str = "config") -> RecserveConfig:
    """Validate a parsed document (ours or HPS's) into a RecserveConfig, or raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        if is_hps_document(data):
            return from_hps(HpsConfig.model_validate(data))
        return RecserveConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{source}: {describe_errors(error)}") from None
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None


def load_config(path: str | Path) -> RecserveConfig:
    """Load our YAML/JSON config or an HPS JSON deployment file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from None
    return parse_config(data, str(path))


def capacity_rows(table: TableConfig, dram: DramTierConfig) -> int:
    """Rows the DRAM tier reserves for a table, from rows or a byte budget (rows + row metadata + index)."""
    if table.dram_capacity_rows is not None:
        return table.dram_capacity_rows
    if table.dram_capacity_bytes is not None:
        # per row: values, 4 int64 of metadata (key, version, access time, count), 2 index slots of 16 bytes
        per_row = table.dim * table.itemsize + 4 * 8 + 2 * 16
        return max(1, table.dram_capacity_bytes // per_row)
    return dram.default_capacity_rows
