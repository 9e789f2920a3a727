"""Online updates: rows that training publishes on a stream and every serving node applies (HPS's update source).

One message carries rows of one table, in one binary layout (little-endian):

    b"RSU1" | name length u16 | dim u32 | rows u32 | name (UTF-8) | keys int64[rows] | rows float32[rows, dim]

The transport is a Redis stream (`XADD` / `XREAD`; each message one entry whose field `u` holds those bytes) or a
Kafka topic (each message one record keyed by its table, so that a table's messages share a partition and keep
their order). Every node reads the whole stream itself (no shared consumer group: a group splits a stream among
its readers, and each node must see every update). A node's tables are its checkpoint plus every update the
stream still holds, applied in the stream's order: a node that starts, or restarts, imports its checkpoint and
replays the stream from its first entry. Training should therefore trim the stream (`XTRIM <stream> MINID <id>`,
or `publish --trim-before`; Kafka: the topic's retention) once a checkpoint that contains those updates is what
nodes start from.

Applying goes through `HierarchicalPS.update`: the persistent copy takes every row, faster tiers refresh the rows
they hold, and no lookup in flight can promote a row read before the write. A message that cannot be applied
(malformed bytes, an unknown table, a wrong width, a value the table's dtype cannot hold) is skipped, logged and
counted: it stays in the stream for whoever wants to look at it. A write that fails on our side (the store) is
retried, in order, until it lands. A dead Redis or Kafka is retried with a growing pause; serving carries on.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

from recserve.errors import ConfigError, InvalidInputError, NotFoundError, TierUnavailableError
from recserve.ps.redis import connect

if TYPE_CHECKING:
    import redis

    from recserve.config import UpdateSourceConfig
    from recserve.ps.server import HierarchicalPS

log = logging.getLogger(__name__)

MAGIC = b"RSU1"
_HEADER = struct.Struct("<4sHII")  # magic, name length, dim, rows
PAYLOAD_FIELD = b"u"
ROWS_PER_MESSAGE = 4096  # 1 MiB a message at dim 64: big enough to batch the store's writes
KAFKA_MAX_MESSAGE_BYTES = 900_000  # under Kafka's default limit of a record (1,000,000 bytes in librdkafka)
MAX_BACKOFF_S = 5.0


@dataclass(frozen=True)
class RowUpdate:
    table: str
    keys: np.ndarray  # int64 [n]
    rows: np.ndarray  # float32 [n, dim]


def encode_update(table: str, keys: np.ndarray, rows: np.ndarray) -> bytes:
    keys = np.ascontiguousarray(keys, dtype="<i8").reshape(-1)
    rows = np.ascontiguousarray(rows, dtype="<f4")
    if rows.ndim != 2 or rows.shape[0] != keys.size:
        raise InvalidInputError(f"table '{table}': rows must be [{keys.size}, dim], got shape {list(rows.shape)}")
    name = table.encode()
    return _HEADER.pack(MAGIC, len(name), rows.shape[1], keys.size) + name + keys.tobytes() + rows.tobytes()


def decode_update(payload: bytes) -> RowUpdate:
    """The message's rows; InvalidInputError naming what is wrong with the bytes."""
    if len(payload) < _HEADER.size:
        raise InvalidInputError(f"update message of {len(payload)} bytes is shorter than its {_HEADER.size}-byte "
                                "header")
    magic, name_length, dim, count = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise InvalidInputError(f"update message starts with {magic!r}, not {MAGIC!r}")
    expected = _HEADER.size + name_length + 8 * count + 4 * count * dim
    if len(payload) != expected:
        raise InvalidInputError(f"update message of {len(payload)} bytes; its header ({count} rows of dim {dim}, "
                                f"a {name_length}-byte table name) says {expected}")
    start = _HEADER.size
    try:
        table = payload[start:start + name_length].decode()
    except UnicodeDecodeError:
        raise InvalidInputError("update message: the table name is not UTF-8") from None
    start += name_length
    keys = np.frombuffer(payload, dtype="<i8", count=count, offset=start).astype(np.int64)
    rows = np.frombuffer(payload, dtype="<f4", count=count * dim, offset=start + 8 * count)
    return RowUpdate(table, keys, rows.astype(np.float32).reshape(count, dim))


def encode_chunks(table: str, keys: np.ndarray, rows: np.ndarray, rows_per_message: int = ROWS_PER_MESSAGE,
                  max_bytes: int | None = None) -> Iterator[bytes]:
    """A table's rows as messages of at most rows_per_message rows each (and max_bytes bytes, when given)."""
    if max_bytes is not None:
        row_size = 8 + 4 * (rows.shape[1] if rows.ndim == 2 else 1)
        rows_per_message = min(rows_per_message, max(1, (max_bytes - _HEADER.size - len(table.encode())) // row_size))
    for start in range(0, len(keys), rows_per_message):
        yield encode_update(table, keys[start:start + rows_per_message], rows[start:start + rows_per_message])


# --- transport: Redis Streams ---------------------------------------------------------------------------------


def redis_client(address: str) -> redis.Redis:
    """A client of the stream's server (see `ps.redis.connect`: a failed call fails at once)."""
    return connect(address, timeout_s=30.0, connect_timeout_s=2.0, field="update source address")  # type: ignore[return-value]


class UpdateSource(Protocol):
    """Where a consumer reads messages from, in order. Ids are the source's own: "<ms>-<seq>" in a Redis stream,
    "<partition>:<offset>" in Kafka."""

    def read(self, max_messages: int, timeout_s: float) -> list[tuple[str, bytes | None]]:
        """The next messages, (id, payload or None if it has none), waiting up to timeout_s for the first;
        TierUnavailableError when the source cannot be reached."""
        ...

    def done(self, message_id: str) -> None:
        """The consumer applied (or skipped) this message, and every one read before it."""
        ...

    def end(self) -> object:
        """A mark of the last message the source holds now (for `reached`)."""
        ...

    def reached(self, end: object) -> bool:
        """Every message up to that mark is done."""
        ...

    def close(self) -> None: ...


class RedisStreamSource:
    """Reads one Redis stream from `start` on, entry after entry (ids are "ms-seq" and grow)."""

    def __init__(self, address: str, stream: str, start: str = "0") -> None:
        self.stream = stream
        self._cursor = start  # the last entry read ("0": before the first; "$": only entries added from now)
        self._done = "0-0"
        self._address = address
        self._client = redis_client(address)

    def read(self, max_messages: int, timeout_s: float) -> list[tuple[str, bytes | None]]:
        import redis

        try:
            answer = self._client.xread({self.stream: self._cursor}, count=max_messages,
                                        block=max(1, int(timeout_s * 1e3)))
        except redis.RedisError as error:
            raise TierUnavailableError(f"redis {self._address}", f"reading stream '{self.stream}': {error}") from None
        entries = [(entry_id.decode(), fields.get(PAYLOAD_FIELD)) for _, items in answer for entry_id, fields in items]
        if entries:
            self._cursor = entries[-1][0]
        return entries

    def done(self, message_id: str) -> None:
        self._done = message_id

    def end(self) -> str | None:
        """The id of the stream's last entry now; None if the stream is empty or missing."""
        import redis

        try:
            last = self._client.xrevrange(self.stream, count=1)
        except redis.RedisError as error:
            raise TierUnavailableError(f"redis {self._address}", f"reading stream '{self.stream}': {error}") from None
        return last[0][0].decode() if last else None

    def reached(self, end: object) -> bool:
        return end is None or _id_order(self._done) >= _id_order(str(end))

    def close(self) -> None:
        self._client.close()


class RedisStreamPublisher:
    """What training uses: appends messages to a stream (see `recserve publish`)."""

    def __init__(self, address: str, stream: str) -> None:
        self.stream = stream
        self._address = address
        self._client = redis_client(address)

    def publish(self, table: str, keys: np.ndarray, rows: np.ndarray,
                rows_per_message: int = ROWS_PER_MESSAGE) -> list[str]:
        """Appends the rows as messages, all in one round trip; their ids, in order."""
        import redis

        pipe = self._client.pipeline(transaction=False)
        for payload in encode_chunks(table, keys, rows, rows_per_message):
            pipe.xadd(self.stream, {PAYLOAD_FIELD: payload})
        try:
            return [entry_id.decode() for entry_id in pipe.execute()]
        except redis.RedisError as error:
            raise TierUnavailableError(f"redis {self._address}", f"appending to '{self.stream}': {error}") from None

    def trim_before(self, entry_id: str) -> int:
        """Drops the entries older than entry_id (a checkpoint now holds them); how many went."""
        import redis

        try:
            return int(self._client.xtrim(self.stream, minid=entry_id, approximate=False))
        except redis.RedisError as error:
            raise TierUnavailableError(f"redis {self._address}", f"trimming '{self.stream}': {error}") from None

    def close(self) -> None:
        self._client.close()


# --- transport: Kafka ------------------------------------------------------------------------------------------


class KafkaSource:
    """Reads one Kafka topic, every partition, from its first retained record: in a consumer group of its own
    that never commits, so that every node reads everything and a start replays the topic (as with Redis)."""

    def __init__(self, brokers: str, topic: str) -> None:
        from confluent_kafka import Consumer

        self.topic = topic
        self._where = f"kafka {brokers}"
        self._errors: list[object] = []  # librdkafka's reports since the last read (served inside consume)
        self._done: dict[int, int] = {}
        self._consumer = Consumer({
            "bootstrap.servers": brokers, "group.id": f"recserve-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest", "enable.auto.commit": False, "enable.auto.offset.store": False,
            "error_cb": self._errors.append, "log_level": 0,  # errors surface through read(); no stderr lines
        })
        self._consumer.subscribe([topic])

    def read(self, max_messages: int, timeout_s: float) -> list[tuple[str, bytes | None]]:
        from confluent_kafka import KafkaException

        try:
            records = self._consumer.consume(max_messages, timeout_s)
        except KafkaException as error:
            raise TierUnavailableError(self._where, f"reading topic '{self.topic}': {error}") from None
        entries = []
        for record in records:
            if record.error() is not None:
                self._errors.append(record.error())
            else:
                entries.append((f"{record.partition()}:{record.offset()}", record.value()))
        errors, self._errors[:] = list(self._errors), []
        if errors and not entries:
            raise TierUnavailableError(self._where, f"reading topic '{self.topic}': {errors[-1]}")
        return entries

    def done(self, message_id: str) -> None:
        partition, _, offset = message_id.partition(":")
        self._done[int(partition)] = int(offset)

    def end(self) -> dict[int, int]:
        """The last offset of each partition that holds records now."""
        from confluent_kafka import KafkaException, TopicPartition

        try:
            topic = self._consumer.list_topics(self.topic, timeout=5).topics[self.topic]
            if topic.error is not None:
                raise TierUnavailableError(self._where, f"topic '{self.topic}': {topic.error}")
            ends = {}
            for partition in topic.partitions:
                low, high = self._consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=5)
                if high > low:
                    ends[partition] = high - 1
        except KafkaException as error:
            raise TierUnavailableError(self._where, f"reading topic '{self.topic}': {error}") from None
        return ends

    def reached(self, end: object) -> bool:
        return all(self._done.get(p, -1) >= offset for p, offset in dict(end).items())  # type: ignore[call-overload]

    def close(self) -> None:
        self._consumer.close()


class KafkaPublisher:
    """Appends messages to a topic, each keyed by its table (one partition a table: their order holds)."""

    def __init__(self, brokers: str, topic: str, timeout_s: float = 30.0) -> None:
        from confluent_kafka import Producer

        self.stream = topic
        self._where = f"kafka {brokers}"
        self._timeout_s = timeout_s
        self._producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True, "log_level": 0,
                                   "message.timeout.ms": int(timeout_s * 1e3)})

    def publish(self, table: str, keys: np.ndarray, rows: np.ndarray,
                rows_per_message: int = ROWS_PER_MESSAGE) -> list[str]:
        """Appends the rows as messages and waits until the broker has them all; their ids, in order."""
        delivered: list[str] = []
        failed: list[object] = []

        def report(error: object, record: object) -> None:
            if error is not None:
                failed.append(error)
            else:
                delivered.append(f"{record.partition()}:{record.offset()}")  # type: ignore[attr-defined]

        for payload in encode_chunks(table, keys, rows, rows_per_message, max_bytes=KAFKA_MAX_MESSAGE_BYTES):
            while True:
                try:
                    self._producer.produce(self.stream, value=payload, key=table.encode(), on_delivery=report)
                    break
                except BufferError:  # the local queue is full: let it drain
                    self._producer.poll(0.1)
        undelivered = self._producer.flush(self._timeout_s + 5)  # past message.timeout.ms: each record reports
        if failed or undelivered:
            problem = failed[0] if failed else f"{undelivered} messages not delivered in {self._timeout_s:g} s"
            raise TierUnavailableError(self._where, f"publishing to '{self.stream}': {problem}")
        return delivered

    def close(self) -> None:
        self._producer.flush(self._timeout_s)


def open_source(config: UpdateSourceConfig, default_stream: str) -> UpdateSource:
    if config.type == "redis_streams":
        return RedisStreamSource(config.address or "127.0.0.1:6379", config.stream or default_stream)
    if config.type == "kafka":
        return KafkaSource(config.address or "127.0.0.1:9092", config.stream or default_stream)
    raise ConfigError(f"update_source.type '{config.type}': nothing to read")


# --- the consumer -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateStats:
    applied_messages: int = 0
    applied_rows: int = 0
    skipped_messages: int = 0  # skipped: the message could not be applied (logged with its id and why)
    read_errors: int = 0  # reads that failed (the source unreachable); retried
    write_errors: int = 0  # writes that failed on our side; retried, in order
    position: str = ""  # id of the last message applied or skipped
    last_error: str = ""


class UpdateConsumer:
    """Applies a source's messages to a parameter server on a background thread, in order.

    `table_names` maps the names a message may use to the PS's tables (a served model also accepts its short
    names, as its inputs use them); by default the PS's own names.
    """

    def __init__(self, ps: HierarchicalPS, source: UpdateSource, *, table_names: Mapping[str, str] | None = None,
                 max_messages: int = 64, poll_timeout_s: float = 0.5, backoff_s: float = 0.05) -> None:
        self._ps = ps
        self._source = source
        self._tables = dict(table_names) if table_names is not None else {name: name for name in ps.tables}
        self._max_messages = max_messages
        self._poll_timeout_s = poll_timeout_s
        self._backoff_s = backoff_s
        self._stats = UpdateStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recserve-updates", daemon=True)

    @classmethod
    def configured(cls, ps: HierarchicalPS, source: UpdateSource, settings: UpdateSourceConfig,
                   table_names: Mapping[str, str] | None = None) -> UpdateConsumer:
        """A consumer with the read size, poll timeout and backoff of `settings`."""
        return cls(ps, source, table_names=table_names, max_messages=settings.max_batch_size,
                   poll_timeout_s=settings.poll_timeout_ms / 1e3, backoff_s=settings.failure_backoff_ms / 1e3)

    def start(self) -> UpdateConsumer:
        self._thread.start()
        return self

    def stats(self) -> UpdateStats:
        with self._lock:
            return self._stats

    def catch_up(self, timeout_s: float) -> bool:
        """Waits until every message the stream holds now is applied or skipped; False on timeout or when the
        source cannot say (unreachable: the consumer keeps trying in the background)."""
        try:
            end = self._source.end()
        except TierUnavailableError as error:
            log.warning("updates: cannot catch up at start: %s", error)
            return False
        deadline = time.monotonic() + timeout_s
        while not self._source.reached(end):
            if time.monotonic() > deadline or not self._thread.is_alive():
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._source.close()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                entries = self._source.read(self._max_messages, self._poll_timeout_s)
            except TierUnavailableError as error:
                failures += 1
                self._count(read_errors=1, last_error=str(error))
                if failures == 1:
                    log.warning("updates: %s; retrying", error)
                self._stop.wait(min(MAX_BACKOFF_S, self._backoff_s * 2 ** min(failures, 10)))
                continue
            if failures:
                log.warning("updates: reading again after %d failed attempts", failures)
                failures = 0
            for entry_id, payload in entries:
                if not self._apply(entry_id, payload):
                    return

    def _apply(self, entry_id: str, payload: bytes | None) -> bool:
        """Applies one message, retrying failed writes until they land; False if stopped first."""
        try:
            update = self._decode(payload)
        except (InvalidInputError, NotFoundError) as error:
            return self._reject(entry_id, error)
        failures = 0
        while not self._stop.is_set():
            try:
                self._ps.update(update.table, update.keys, update.rows)
            except (InvalidInputError, NotFoundError) as error:  # the message's fault: a row its table can't hold
                return self._reject(entry_id, error)
            except Exception as error:  # the store's fault: retry in order, never skip an update
                failures += 1
                self._count(write_errors=1, last_error=f"message {entry_id}: {error}")
                if failures == 1:
                    log.error("updates: applying message %s failed: %s; retrying", entry_id, error)
                self._stop.wait(min(MAX_BACKOFF_S, self._backoff_s * 2 ** min(failures, 10)))
                continue
            self._count(applied_messages=1, applied_rows=update.keys.size, position=entry_id)
            self._source.done(entry_id)
            return True
        return False

    def _decode(self, payload: bytes | None) -> RowUpdate:
        if payload is None:
            raise InvalidInputError(f"stream entry has no '{PAYLOAD_FIELD.decode()}' field")
        update = decode_update(payload)
        table = self._tables.get(update.table)
        if table is None:
            raise NotFoundError(f"table '{update.table}' is not served here (tables: {sorted(self._tables)[:8]})")
        return replace(update, table=table)

    def _reject(self, entry_id: str, error: Exception) -> bool:
        log.warning("updates: skipped message %s: %s", entry_id, error)
        self._count(skipped_messages=1, position=entry_id, last_error=f"message {entry_id}: {error}")
        self._source.done(entry_id)
        return True

    def _count(self, *, position: str | None = None, last_error: str | None = None, **added: int) -> None:
        with self._lock:
            s = self._stats
            self._stats = replace(
                s, **{k: getattr(s, k) + v for k, v in added.items()},
                position=position if position is not None else s.position,
                last_error=last_error if last_error is not None else s.last_error,
            )


def _id_order(entry_id: str) -> tuple[int, int]:
    """A Redis stream id as numbers, in the stream's order."""
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence or 0)

