"""Typed config: our YAML/JSON, HPS JSON as-is, and errors that name the bad key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recserve.config import load_config, parse_config
from recserve.errors import ConfigError

HPS_EXAMPLE = {
    "supportlonglong": True,
    "volatile_db": {
        "type": "hash_map", "user_name": "default", "num_partitions": 8, "max_get_batch_size": 100000,
        "max_set_batch_size": 100000, "overflow_policy": "evict_least_used", "overflow_margin": 1000,
        "overflow_resolution_target": 0.8, "initial_cache_rate": 1.0,
    },
    "persistent_db": {"type": "rocks_db", "path": "/tmp/hps_rocks", "num_threads": 4, "read_only": False},
    "update_source": {"type": "kafka_message_queue", "brokers": "127.0.0.1:9092"},
    "models": [{
        "model": "wdl",
        "sparse_files": ["/models/wdl0_sparse.model", "/models/wdl1_sparse.model"],
        "dense_file": "/models/wdl_dense.model",
        "num_of_worker_buffer_in_pool": 3,
        "embedding_table_names": ["wide", "deep"],
        "embedding_vecsize_per_table": [1, 16],
        "maxnum_catfeature_query_per_table_per_sample": [2, 26],
        "default_value_for_each_table": [0.0, 0.5],
        "deployed_device_list": [0],
        "max_batch_size": 1024,
        "hit_rate_threshold": 0.9,
        "gpucacheper": 0.5,
        "gpucache": True,
    }],
}


def test_hps_json_loads_as_is(tmp_path: Path) -> None:
    path = tmp_path / "hps.json"
    path.write_text(json.dumps(HPS_EXAMPLE))
    config = load_config(path)
    wide, deep = config.ps.tables
    assert (wide.name, wide.dim, deep.name, deep.dim, deep.default_value) == ("wide", 1, "deep", 16, 0.5)
    assert deep.overflow_policy == "evict_lfu" and deep.dram_capacity_rows == 8000
    assert config.ps.rocksdb.path == Path("/tmp/hps_rocks") and config.ps.rocksdb.enabled
    model = config.models[0]
    assert (model.name, model.tables, deep.cache_fraction, model.max_batch_size) == (
        "wdl", ["wide", "deep"], 0.5, 1024)
    assert config.update_source.type == "kafka"
    cache = config.ps.cache
    assert (cache.enabled, cache.devices, cache.mode) == (True, [0], "dynamic")
    assert (deep.cache_fraction, deep.cache_hit_rate_threshold) == (0.5, 0.9)


def test_an_hps_redis_cluster_becomes_the_redis_tier() -> None:
    data = json.loads(json.dumps(HPS_EXAMPLE))
    data["volatile_db"].update(type="redis_cluster", address="10.0.0.1:7000,10.0.0.2:7000", password="pw",
                               overflow_policy="evict_random", refresh_time_after_fetch=True)
    ps = parse_config(data, "hps.json").ps
    redis = ps.redis
    assert not ps.dram.enabled and redis.enabled and redis.cluster
    assert (redis.address, redis.password, redis.overflow_policy, redis.refresh_time_after_fetch) == (
        "10.0.0.1:7000,10.0.0.2:7000", "pw", "evict_random", True)
    assert redis.num_partitions == data["volatile_db"]["num_partitions"]
    assert redis.capacity_rows == data["volatile_db"]["overflow_margin"] * data["volatile_db"]["num_partitions"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["volatile_db"].update(overflow_polcy="evict_random"), "volatile_db.overflow_polcy: unknown key"),
        (lambda d: d["models"][0].update(gpu_cache_per=0.1), "models.0.gpu_cache_per: unknown key"),
        (lambda d: d["models"][0].update(embedding_vecsize_per_table=[1]),
         "embedding_vecsize_per_table has 1 entries, sparse_files has 2"),
        (lambda d: d["models"][0].update(gpucacheper=1.5), "models.0.gpucacheper: .*less than or equal to 1"),
        (lambda d: d["volatile_db"].update(type="redis_cluster", enable_tls=True), "TLS to Redis is not available"),
        (lambda d: d["volatile_db"].update(type="redis_cluster", overflow_policy="evict_least_used"),
         "'evict_least_used' is not available for redis_cluster"),
    ],
)
def test_hps_mistakes_name_the_key(edit: object, message: str) -> None:
    data = json.loads(json.dumps(HPS_EXAMPLE))
    edit(data)
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "hps.json")


def test_our_yaml_loads_and_misspelt_keys_are_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("ps:\n  tables:\n    - {name: user, dim: 16, dtype: float16, dram_capacity_rows: 100}\n"
                    "  rocksdb: {path: store}\n")
    table = load_config(path).ps.tables[0]
    assert (table.name, table.dim, table.dtype, table.dram_capacity_rows) == ("user", 16, "float16", 100)
    path.write_text("ps:\n  tables:\n    - {name: user, dmi: 16}\n")
    with pytest.raises(ConfigError, match=r"ps.tables.0.dmi: unknown key"):
        load_config(path)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"name": "t", "dim": -3}, "ps.tables.0.dim: Input should be greater than 0 .got -3"),
        ({"name": "t", "dim": 4, "default_value": [1, 2]}, "default_value has 2 values, dim is 4"),
        ({"name": "t", "dim": 4, "dram_capacity_rows": 5, "dram_capacity_bytes": 5}, "not both"),
        ({"name": "t", "dim": 4, "overflow_policy": "evict_fifo"}, "overflow_policy"),
        ({"name": "bad name!", "dim": 4}, "ps.tables.0.name"),
        ({"name": "t", "dim": 4, "dtype": "float64"}, "ps.tables.0.dtype: Input should be 'float32', 'float16' or "
                                                       "'bfloat16'"),
    ],
)
def test_bad_table_values_are_named(table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"ps": {"tables": [table]}})


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="reads table 'nope', which ps.tables lacks"):
        parse_config({"models": [{"name": "m", "tables": ["nope"]}]})
