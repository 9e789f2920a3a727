"""Online updates: the message codec, and a consumer applying a real Redis stream to a real PS (DRAM + RocksDB)."""

from __future__ import annotations

import os
import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from recserve.config import UpdateSourceConfig
from recserve.errors import ConfigError, InvalidInputError, TierUnavailableError
from recserve.ps.server import HierarchicalPS
from recserve.ps.updates import (
    KAFKA_MAX_MESSAGE_BYTES,
    PAYLOAD_FIELD,
    KafkaPublisher,
    KafkaSource,
    RedisStreamPublisher,
    RedisStreamSource,
    UpdateConsumer,
    decode_update,
    encode_chunks,
    encode_update,
    open_source,
)
from tests.conftest import RedisServer, make_ps_config, make_table, rows_for, wait_for

DIM = 8


# --- the codec -----------------------------------------------------------------------------------------------

@given(
    table=st.text(min_size=1, max_size=40),
    keys=hnp.arrays(np.int64, st.integers(0, 30), elements=st.integers(-(2**63), 2**63 - 1)),
    dim=st.integers(1, 9),
    data=st.data(),
)
def test_a_message_decodes_to_what_was_encoded(table: str, keys: np.ndarray, dim: int, data: st.DataObject) -> None:
    rows = data.draw(hnp.arrays(np.float32, (keys.size, dim), elements=st.floats(width=32, allow_nan=False)))
    update = decode_update(encode_update(table, keys, rows))
    assert update.table == table
    np.testing.assert_array_equal(update.keys, keys)
    assert update.keys.dtype == np.int64 and update.rows.dtype == np.float32
    np.testing.assert_array_equal(update.rows, rows)


def test_every_cut_or_padded_message_is_refused_by_name() -> None:
    payload = encode_update("user", np.arange(3), np.ones((3, 4), np.float32))
    for cut in range(len(payload)):
        with pytest.raises(InvalidInputError, match="update message"):
            decode_update(payload[:cut])
    with pytest.raises(InvalidInputError, match=f"{len(payload) + 1} bytes; its header .3 rows of dim 4"):
        decode_update(payload + b"\0")


def test_a_wrong_magic_or_a_name_not_utf8_is_refused() -> None:
    payload = encode_update("user", np.arange(2), np.ones((2, 4), np.float32))
    with pytest.raises(InvalidInputError, match="starts with b'XSU1'"):
        decode_update(b"X" + payload[1:])
    header = struct.pack("<4sHII", b"RSU1", 2, 1, 0)
    with pytest.raises(InvalidInputError, match="not UTF-8"):
        decode_update(header + b"\xff\xfe")


@given(st.binary(max_size=200), st.booleans())
def test_random_bytes_are_refused_by_name_or_decode_to_a_message_that_encodes_back(payload: bytes,
                                                                                   magic: bool) -> None:
    payload = b"RSU1" + payload if magic else payload
    try:
        update = decode_update(payload)
    except InvalidInputError as error:
        assert "update message" in str(error)
        return
    assert encode_update(update.table, update.keys, update.rows) == payload


def test_rows_must_match_the_keys() -> None:
    with pytest.raises(InvalidInputError, match=r"rows must be \[3, dim\], got shape \[2, 4\]"):
        encode_update("user", np.arange(3), np.ones((2, 4), np.float32))


def test_big_updates_are_cut_into_messages_in_order() -> None:
    keys = np.arange(10)
    messages = [decode_update(m) for m in encode_chunks("t", keys, rows_for(keys, DIM), rows_per_message=4)]
    assert [m.keys.tolist() for m in messages] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    np.testing.assert_array_equal(np.concatenate([m.rows for m in messages]), rows_for(keys, DIM))


def test_sources_open_by_type_and_bad_addresses_are_named() -> None:
    source = open_source(UpdateSourceConfig(type="kafka", address="127.0.0.1:1"), "s")
    assert isinstance(source, KafkaSource) and source.topic == "s"
    source.close()
    with pytest.raises(ConfigError, match="'disabled': nothing to read"):
        open_source(UpdateSourceConfig(), "s")
    with pytest.raises(ConfigError, match="address 'nowhere': give host:port"):
        open_source(UpdateSourceConfig(type="redis_streams", address="nowhere"), "s")


def test_kafka_messages_stay_under_the_brokers_record_limit() -> None:
    keys = np.arange(10_000)
    messages = list(encode_chunks("t", keys, np.ones((10_000, 64), np.float32), max_bytes=KAFKA_MAX_MESSAGE_BYTES))
    assert all(len(m) <= KAFKA_MAX_MESSAGE_BYTES for m in messages) and len(messages) == 3  # 3,408 rows each
    assert np.concatenate([decode_update(m).keys for m in messages]).tolist() == keys.tolist()


# --- a consumer on a real stream -----------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> Iterator[HierarchicalPS]:
    """'t': 8-dim, DRAM tier of 16 rows over RocksDB (most updated rows live only below); 'h': float16."""
    tables = [make_table("t", DIM, dram_capacity_rows=16), make_table("h", 4, dtype="float16")]
    with HierarchicalPS.from_config(make_ps_config(tmp_path / "store", tables, partitions=2)) as ps:
        yield ps


def consume(ps: HierarchicalPS, server: RedisServer, stream: str = "updates", **options: object) -> UpdateConsumer:
    options = {"poll_timeout_s": 0.05, "backoff_s": 0.01, **options}
    return UpdateConsumer(ps, RedisStreamSource(server.address, stream), **options).start()  # type: ignore[arg-type]


def caught_up(consumer: UpdateConsumer, last_id: str) -> bool:
    return consumer.stats().position == last_id


@pytest.mark.redis
def test_a_random_stream_of_updates_leaves_every_tier_like_a_dict(store: HierarchicalPS,
                                                                   redis_server: RedisServer) -> None:
    rng = np.random.default_rng(7)
    publisher = RedisStreamPublisher(redis_server.address, "updates")
    reference: dict[int, np.ndarray] = {}
    consumer = consume(store, redis_server)
    try:
        last = ""
        for step in range(40):
            keys = rng.integers(0, 64, size=int(rng.integers(1, 12)))  # repeats within a message: the last wins
            rows = rows_for(keys, DIM, version=step) + rng.normal(size=(keys.size, DIM)).astype(np.float32)
            last = publisher.publish("t", keys, rows, rows_per_message=5)[-1]
            reference.update(zip(keys.tolist(), rows, strict=True))
            if step % 10 == 9:  # lookups between updates promote rows into the DRAM tier, which updates then refresh
                wait_for(lambda last=last: caught_up(consumer, last), what=f"message {last}")
                store.lookup("t", np.arange(64))
        wait_for(lambda: caught_up(consumer, last), what=f"message {last}")
        all_keys = np.arange(64)
        expected = np.stack([reference.get(k, np.zeros(DIM, np.float32)) for k in all_keys.tolist()])
        np.testing.assert_array_equal(store.lookup("t", all_keys).numpy(), expected)
        rocks = store.tiers[-1].lookup("t", np.array(sorted(reference)))
        np.testing.assert_array_equal(rocks.rows, np.stack([reference[k] for k in sorted(reference)]))
        assert consumer.stats().skipped_messages == 0 and consumer.stats().applied_rows == sum(
            decode_update(f[PAYLOAD_FIELD]).keys.size for _, f in redis.Redis(port=redis_server.port).xrange("updates"))
    finally:
        consumer.close()
        publisher.close()


@pytest.mark.redis
def test_messages_that_cannot_apply_are_skipped_and_counted_and_the_rest_apply(
        store: HierarchicalPS, redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port)
    good = encode_update("t", np.array([1, 2]), rows_for(np.array([1, 2]), DIM))
    bad = {
        "garbage": {PAYLOAD_FIELD: b"not an update"},
        "no payload field": {b"x": b"1"},
        "unknown table": {PAYLOAD_FIELD: encode_update("nope", np.array([1]), np.ones((1, DIM), np.float32))},
        "wrong width": {PAYLOAD_FIELD: encode_update("t", np.array([3]), np.ones((1, DIM + 1), np.float32))},
        # row 0 fits float16, row 1 does not: the message is refused whole, key 5 is not written either
        "overflow": {PAYLOAD_FIELD: encode_update("h", np.array([5, 6]), np.array([[1.0] * 4, [1e6] * 4], np.float32))},
    }
    for fields in bad.values():
        client.xadd("updates", fields)
    last = client.xadd("updates", {PAYLOAD_FIELD: good}).decode()
    consumer = consume(store, redis_server)
    try:
        wait_for(lambda: caught_up(consumer, last), what="the good message after the bad ones")
        stats = consumer.stats()
        assert (stats.applied_messages, stats.skipped_messages) == (1, len(bad))
        assert "1000000" in stats.last_error or "1e+06" in stats.last_error, stats.last_error
        np.testing.assert_array_equal(store.lookup("t", np.array([1, 2, 3])).numpy(),
                                      np.vstack([rows_for(np.array([1, 2]), DIM), np.zeros((1, DIM))]))
        np.testing.assert_array_equal(store.lookup("h", np.array([5, 6])).numpy(), np.zeros((2, 4)))
        assert store.stats().tables["h"].not_found == 2
    finally:
        consumer.close()
        client.close()


@pytest.mark.redis
def test_a_dead_redis_is_retried_and_updates_resume_when_it_is_back(store: HierarchicalPS,
                                                                     redis_server: RedisServer) -> None:
    publisher = RedisStreamPublisher(redis_server.address, "updates")
    consumer = consume(store, redis_server)
    try:
        first = publisher.publish("t", np.array([1]), rows_for(np.array([1]), DIM, version=1))[-1]
        wait_for(lambda: caught_up(consumer, first), what="the first message")
        redis_server.stop()
        wait_for(lambda: consumer.stats().read_errors >= 2, what="failed reads while Redis is down")
        assert "redis" in consumer.stats().last_error
        np.testing.assert_array_equal(store.lookup("t", np.array([1])).numpy(), rows_for(np.array([1]), DIM, 1))
        redis_server.start()  # empty again: its new entries' ids are later in time than the last one read
        second = publisher.publish("t", np.array([1, 9]), rows_for(np.array([1, 9]), DIM, version=2))[-1]
        wait_for(lambda: caught_up(consumer, second), what="a message published after Redis came back")
        np.testing.assert_array_equal(store.lookup("t", np.array([1, 9])).numpy(),
                                      rows_for(np.array([1, 9]), DIM, version=2))
    finally:
        consumer.close()
        publisher.close()


@pytest.mark.redis
def test_a_failing_store_write_is_retried_in_order_and_nothing_after_it_is_applied(
        tmp_path: Path, redis_server: RedisServer) -> None:
    config = make_ps_config(tmp_path / "store", [make_table("t", DIM)], partitions=2)
    with HierarchicalPS.from_config(config) as ps:
        ps.insert("t", np.array([1]), rows_for(np.array([1]), DIM))
    read_only = config.model_copy(update={"rocksdb": config.rocksdb.model_copy(update={"read_only": True})})
    publisher = RedisStreamPublisher(redis_server.address, "updates")
    publisher.publish("t", np.array([1]), rows_for(np.array([1]), DIM, version=1))
    publisher.publish("t", np.array([2]), rows_for(np.array([2]), DIM, version=1))
    with HierarchicalPS.from_config(read_only) as ps:
        consumer = consume(ps, redis_server)
        try:
            wait_for(lambda: consumer.stats().write_errors >= 3, what="retried writes")
            stats = consumer.stats()
            assert (stats.applied_messages, stats.skipped_messages, stats.position) == (0, 0, "")
            assert "read-only" in stats.last_error
            np.testing.assert_array_equal(ps.lookup("t", np.array([1, 2])).numpy(),
                                          np.vstack([rows_for(np.array([1]), DIM), np.zeros((1, DIM))]))
        finally:
            consumer.close()
    publisher.close()


@pytest.mark.redis
def test_a_restarted_node_replays_the_stream_onto_its_checkpoint(tmp_path: Path, redis_server: RedisServer) -> None:
    keys = np.arange(100)
    publisher = RedisStreamPublisher(redis_server.address, "updates")
    for version in (1, 2, 3):
        publisher.publish("t", keys[::version], rows_for(keys[::version], DIM, version), rows_per_message=7)
    expected = rows_for(keys, DIM, 1)
    expected[::2] = rows_for(keys[::2], DIM, 2)
    expected[::3] = rows_for(keys[::3], DIM, 3)
    for run in range(2):  # each start: the checkpoint imported afresh, then the whole stream on top
        config = make_ps_config(tmp_path / f"store{run}", [make_table("t", DIM, dram_capacity_rows=32)])
        with HierarchicalPS.from_config(config) as ps:
            ps.import_table("t", keys, rows_for(keys, DIM, version=0))
            consumer = consume(ps, redis_server, max_messages=4)
            try:
                assert consumer.catch_up(timeout_s=20)
                np.testing.assert_array_equal(ps.lookup("t", keys).numpy(), expected)
            finally:
                consumer.close()
    publisher.close()


@pytest.mark.redis
def test_trimming_drops_what_a_checkpoint_holds(redis_server: RedisServer) -> None:
    publisher = RedisStreamPublisher(redis_server.address, "updates")
    ids = [publisher.publish("t", np.array([k]), rows_for(np.array([k]), DIM))[0] for k in range(5)]
    assert publisher.trim_before(ids[3]) == 3
    source = RedisStreamSource(redis_server.address, "updates")
    assert [entry_id for entry_id, _ in source.read(10, 0.05)] == ids[3:]
    assert source.end() == ids[-1]
    source.close()
    publisher.close()


def test_catch_up_on_an_unreachable_source_says_so_at_once(store: HierarchicalPS) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    consumer = UpdateConsumer(store, RedisStreamSource(address, "updates"), poll_timeout_s=0.05).start()
    try:
        assert consumer.catch_up(timeout_s=30) is False
        wait_for(lambda: consumer.stats().read_errors >= 1, what="a failed read")
    finally:
        consumer.close()


# --- Kafka -------------------------------------------------------------------------------------------------------
# No Kafka broker can be installed on the machines this project is built on (no Debian or PyPI package of one):
# these two tests drive the real client library (librdkafka, in confluent-kafka) against a dead address; the one
# after them runs against a live broker only where RECSERVE_KAFKA_BROKERS names one.


def test_a_dead_kafka_is_retried_and_named(store: HierarchicalPS) -> None:
    consumer = UpdateConsumer(store, KafkaSource("127.0.0.1:1", "updates"), poll_timeout_s=0.2).start()
    try:
        assert consumer.catch_up(timeout_s=30) is False
        wait_for(lambda: consumer.stats().read_errors >= 2, what="failed reads from a dead broker")
        assert "kafka 127.0.0.1:1: reading topic 'updates'" in consumer.stats().last_error
    finally:
        consumer.close()


def test_publishing_to_a_dead_kafka_fails_by_name_once_its_timeout_passes() -> None:
    publisher = KafkaPublisher("127.0.0.1:1", "updates", timeout_s=1.0)
    with pytest.raises(TierUnavailableError, match="kafka 127.0.0.1:1: publishing to 'updates': .*timed out"):
        publisher.publish("t", np.arange(3), rows_for(np.arange(3), DIM))


@pytest.mark.skipif(not os.environ.get("RECSERVE_KAFKA_BROKERS"),
                    reason="needs a Kafka broker: set RECSERVE_KAFKA_BROKERS=host:port")
def test_a_kafka_topic_of_updates_leaves_the_ps_like_a_dict(store: HierarchicalPS) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    brokers = os.environ["RECSERVE_KAFKA_BROKERS"]
    topic = f"recserve-test-{uuid.uuid4().hex[:8]}"
    AdminClient({"bootstrap.servers": brokers}).create_topics([NewTopic(topic, num_partitions=3)])[topic].result()
    publisher = KafkaPublisher(brokers, topic)
    rng = np.random.default_rng(3)
    reference: dict[int, np.ndarray] = {}
    for step in range(20):
        keys = rng.integers(0, 64, size=int(rng.integers(1, 12)))
        rows = rows_for(keys, DIM, version=step)
        publisher.publish("t", keys, rows, rows_per_message=4)
        reference.update(zip(keys.tolist(), rows, strict=True))
    publisher.close()
    consumer = UpdateConsumer(store, KafkaSource(brokers, topic), poll_timeout_s=0.2).start()
    try:
        assert consumer.catch_up(timeout_s=60)
        keys = np.array(sorted(reference))
        np.testing.assert_array_equal(store.lookup("t", keys).numpy(), np.stack([reference[k] for k in keys]))
    finally:
        consumer.close()
