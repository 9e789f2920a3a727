"""The Redis tier against real redis-servers (one, and a three-node Redis Cluster): exact against a dict, its
capacity policies, a node configured otherwise, and a Redis that dies under the PS."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from recserve.config import RedisTierConfig, RowDtype
from recserve.errors import ConfigError, TierUnavailableError
from recserve.ps.redis import RedisTier, partition_of
from recserve.ps.server import HierarchicalPS
from tests.conftest import RedisServer, cast_through, make_ps_config, make_table, replay_against_dict, rows_for

DIM = 8
pytestmark = pytest.mark.redis


def redis_ps(store: Path, server_address: str, *, dtype: RowDtype = "float32", cluster: bool = False,
             **redis_options: object) -> HierarchicalPS:
    """A PS of the Redis tier over RocksDB (no DRAM tier): what the Redis tier misses, RocksDB answers."""
    config = make_ps_config(store, [make_table("t", DIM, dtype=dtype)], dram=False)
    redis_config = RedisTierConfig(enabled=True, address=server_address, cluster=cluster, num_partitions=4,
                                   **redis_options)  # type: ignore[arg-type]
    return HierarchicalPS.from_config(config.model_copy(update={"redis": redis_config}))


def tier_alone(address: str, **options: object) -> RedisTier:
    return RedisTier(RedisTierConfig(enabled=True, address=address, **options),  # type: ignore[arg-type]
                     [make_table("t", DIM)])


def flush(server: RedisServer) -> None:
    client = redis.Redis(port=server.port)
    client.flushall()
    client.close()


operations = st.lists(
    st.tuples(st.sampled_from(["insert", "update", "evict", "lookup"]),
              st.lists(st.integers(-50, 50), min_size=1, max_size=12)),
    max_size=25,
)


@settings(max_examples=40)
@given(ops=operations)
def test_the_ps_over_redis_answers_like_a_dict(shared_redis: RedisServer, ops: list) -> None:
    flush(shared_redis)
    with tempfile.TemporaryDirectory() as store, redis_ps(Path(store), shared_redis.address) as ps:
        replay_against_dict(ps, "t", ops, DIM)


@settings(max_examples=25)
@given(ops=operations, capacity=st.integers(1, 12), policy=st.sampled_from(["evict_lru", "evict_random", "reject"]))
def test_a_bounded_redis_tier_holds_at_most_its_capacity_and_only_true_rows(
        shared_redis: RedisServer, ops: list, capacity: int, policy: str) -> None:
    flush(shared_redis)
    with tempfile.TemporaryDirectory() as store, redis_ps(Path(store), shared_redis.address, capacity_rows=capacity,
                                                           overflow_policy=policy) as ps:
        reference = replay_against_dict(ps, "t", ops, DIM)  # exact through RocksDB, whatever Redis evicted
        tier = ps.tiers[0]
        held_keys = np.array(sorted(reference), dtype=np.int64)
        held = tier.lookup("t", held_keys)
        per_partition = -(-capacity // 4)
        parts = partition_of(held_keys[held.found], 4)
        assert all(np.count_nonzero(parts == p) <= per_partition for p in range(4))
        for key, row, found in zip(held_keys.tolist(), held.rows, held.found, strict=True):
            if found:
                np.testing.assert_array_equal(row, reference[key])
        assert tier.stats()["t"].rows == int(held.found.sum())


def test_evict_lru_takes_the_oldest_rows_and_a_refreshed_read_counts(redis_server: RedisServer) -> None:
    for refresh, survivors in ((False, [3, 4, 5]), (True, [1, 4, 5])):
        flush(redis_server)
        tier = tier_alone(redis_server.address, num_partitions=1, capacity_rows=4, overflow_resolution_target=0.5,
                          refresh_time_after_fetch=refresh)
        for key in (1, 2, 3, 4):
            tier.insert("t", np.array([key]), rows_for(np.array([key]), DIM))
        tier.lookup("t", np.array([1]))  # a use, only if reads refresh the time
        tier.insert("t", np.array([5]), rows_for(np.array([5]), DIM))  # full: the 2 oldest go, then 5 comes in
        found = tier.lookup("t", np.arange(1, 6)).found
        assert (np.flatnonzero(found) + 1).tolist() == survivors, (refresh, found)
        assert tier.stats()["t"] == tier.stats()["t"].__class__(rows=3, capacity_rows=4, evictions=2, rejected=0)
        tier.close()


def test_reject_refuses_new_keys_when_full_and_still_overwrites_held_ones(redis_server: RedisServer) -> None:
    tier = tier_alone(redis_server.address, num_partitions=1, capacity_rows=2, overflow_policy="reject")
    tier.insert("t", np.array([1, 2, 3]), rows_for(np.array([1, 2, 3]), DIM))
    tier.insert("t", np.array([2]), rows_for(np.array([2]), DIM, version=5))
    result = tier.lookup("t", np.array([1, 2, 3]))
    assert result.found.tolist() == [True, True, False]
    np.testing.assert_array_equal(result.rows[1], rows_for(np.array([2]), DIM, version=5)[0])
    assert (tier.stats()["t"].rejected, tier.stats()["t"].evictions) == (1, 0)
    tier.close()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_rows_round_trip_as_their_dtype_casts_them(tmp_path: Path, redis_server: RedisServer,
                                                          dtype: RowDtype) -> None:
    keys = np.arange(20)
    rows = np.random.default_rng(0).normal(size=(20, DIM)).astype(np.float32)
    with redis_ps(tmp_path, redis_server.address, dtype=dtype) as ps:
        ps.insert("t", keys, rows)
        np.testing.assert_array_equal(ps.tiers[0].lookup("t", keys).rows, cast_through(rows, dtype))


def test_a_node_configured_with_another_shape_is_refused(redis_server: RedisServer) -> None:
    tier_alone(redis_server.address).close()  # claims t as dim 8 float32
    with pytest.raises(ConfigError, match=r"table 't': Redis at .* holds it as dim=8 dtype=float32, the config says "
                                          r"dim=4 dtype=float32"):
        RedisTier(RedisTierConfig(enabled=True, address=redis_server.address), [make_table("t", 4)])


def test_a_promotion_is_dropped_if_a_write_began_since_its_token(redis_server: RedisServer) -> None:
    tier = tier_alone(redis_server.address)
    token = tier.update_token("t")
    tier.begin_update("t")
    assert tier.update_token("t") == -1  # no promotion may land while a write is in flight
    tier.insert("t", np.array([1]), rows_for(np.array([1]), DIM), unless_updated_since=token)
    tier.end_update("t")
    tier.insert("t", np.array([2]), rows_for(np.array([2]), DIM), unless_updated_since=token)
    assert not tier.lookup("t", np.array([1, 2])).found.any()
    tier.insert("t", np.array([2]), rows_for(np.array([2]), DIM), unless_updated_since=tier.update_token("t"))
    assert tier.lookup("t", np.array([2])).found.all()
    tier.close()


def test_a_dead_redis_leaves_lookups_exact_and_refuses_writes_by_name(tmp_path: Path,
                                                                      redis_server: RedisServer) -> None:
    keys = np.arange(10)
    with redis_ps(tmp_path, redis_server.address) as ps:
        ps.insert("t", keys, rows_for(keys, DIM))
        redis_server.stop()
        started = time.monotonic()
        np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), rows_for(keys, DIM))  # from RocksDB
        assert time.monotonic() - started < 2  # no retries with backoff
        with pytest.raises(TierUnavailableError, match=rf"redis {redis_server.address}: updating table 't'"):
            ps.update("t", keys[:2], rows_for(keys[:2], DIM, version=1))
        np.testing.assert_array_equal(ps.lookup("t", keys[:2]).numpy(), rows_for(keys[:2], DIM, version=1))
        redis_server.start()  # empty again: lookups promote into it once more
        ps.lookup("t", keys)
        assert ps.tiers[0].lookup("t", keys).found.all()
        np.testing.assert_array_equal(ps.lookup("t", keys[:2]).numpy(), rows_for(keys[:2], DIM, version=1))


def test_addresses_are_checked() -> None:
    with pytest.raises(ConfigError, match="give host:port"):
        tier_alone("nowhere")
    with pytest.raises(ConfigError, match="set redis.cluster true"):
        tier_alone("127.0.0.1:1,127.0.0.1:2")


# --- a real Redis Cluster --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    """Three redis-server nodes joined into a cluster by redis-cli, no replicas."""
    nodes = [RedisServer(tmp_path_factory.mktemp(f"node{i}")) for i in range(3)]
    try:
        for node in nodes:
            with socket.socket() as probe:  # the bus port: port + 10000 by default, which may not exist
                probe.bind(("127.0.0.1", 0))
                bus_port = probe.getsockname()[1]
            node.start("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{node.port}.conf",
                       "--cluster-port", str(bus_port))
        subprocess.run(["redis-cli", "--cluster", "create", *(n.address for n in nodes), "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while not all(redis.Redis(port=n.port).execute_command("CLUSTER INFO")["cluster_state"] == "ok"
                      for n in nodes):
            assert time.monotonic() < deadline, "the cluster never became ok"
            time.sleep(0.1)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@settings(max_examples=15)
@given(ops=operations)
def test_the_ps_over_a_redis_cluster_answers_like_a_dict(redis_cluster: list[RedisServer], ops: list) -> None:
    with tempfile.TemporaryDirectory() as store, redis_ps(Path(store), redis_cluster[0].address, cluster=True,
                                                           key_prefix=f"p{time.monotonic_ns()}") as ps:
        replay_against_dict(ps, "t", ops, DIM)


def test_a_tables_partitions_spread_over_the_cluster(tmp_path: Path, redis_cluster: list[RedisServer]) -> None:
    keys = np.arange(2000)
    with redis_ps(tmp_path, ",".join(n.address for n in redis_cluster), cluster=True, key_prefix="spread") as ps:
        ps.insert("t", keys, rows_for(keys, DIM))
        np.testing.assert_array_equal(ps.tiers[0].lookup("t", keys).rows, rows_for(keys, DIM))
        assert ps.tiers[0].stats()["t"].rows == 2000
    holders = [n for n in redis_cluster if redis.Redis(port=n.port).keys("{spread.t.p*")]
    assert len(holders) >= 2
