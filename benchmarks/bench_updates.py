"""Online updates through a Redis stream against the same updates written straight into the PS, in one run.

    python benchmarks/bench_updates.py            # 1M rows x 64 float32, 50 messages of 4,096 rows a round
    python benchmarks/bench_updates.py --quick    # 200k rows, 20 messages a round

The table sits in the DRAM tier (every row held, as a served model's is) over RocksDB. Rounds alternate:
- direct: `HierarchicalPS.update` of each message's keys and rows (RocksDB first, then the DRAM tier);
- stream: the same rows published on a redis-server on loopback (`RedisStreamPublisher`), then a consumer
  replays the stream from its first entry until it has applied the last one.
Figures: `direct_update_rows_per_s`, `publish_rows_per_s`, `stream_apply_rows_per_s` (medians of the rounds) and
`stream_vs_direct_update` (the stream's apply rate over the direct one: what decoding and the round trips cost);
`publish_to_applied_ms_p50` / `_p99`: a consumer following the stream live, single 256-row messages published
one at a time, from the publish call to the row being applied (how fresh a served row is).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_lookup import redis_server  # sibling scripts: their folder is on the path
from recserve.config import DramTierConfig, PSConfig, RocksTierConfig, TableConfig
from recserve.ps.server import HierarchicalPS
from recserve.ps.updates import RedisStreamPublisher, RedisStreamSource, UpdateConsumer
from recserve.synthetic import random_rows

DIM = 64
ROWS_PER_MESSAGE = 4096
ROUNDS = 3


def wait_applied(consumer: UpdateConsumer, entry_id: str, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while consumer.stats().position != entry_id:
        if time.monotonic() > deadline:
            raise SystemExit(f"the consumer did not reach {entry_id}: {consumer.stats()}")
        time.sleep(0.0002)


def stream_round(ps: HierarchicalPS, address: str, stream: str, messages: list[tuple[np.ndarray, np.ndarray]]
                 ) -> tuple[float, float]:
    """Seconds to publish every message, then seconds for a consumer to apply them all from the start."""
    publisher = RedisStreamPublisher(address, stream)
    started = time.perf_counter()
    last = ""
    for keys, rows in messages:
        last = publisher.publish("t", keys, rows, ROWS_PER_MESSAGE)[-1]
    published = time.perf_counter() - started
    publisher.close()
    started = time.perf_counter()
    consumer = UpdateConsumer(ps, RedisStreamSource(address, stream), max_messages=64, poll_timeout_s=0.05).start()
    try:
        wait_applied(consumer, last)
        applied = time.perf_counter() - started
        assert consumer.stats().skipped_messages == 0 and consumer.stats().write_errors == 0, consumer.stats()
    finally:
        consumer.close()
    return published, applied


def freshness_ms(ps: HierarchicalPS, address: str, num_rows: int, samples: int = 200) -> list[float]:
    """A consumer following the stream live; per 256-row message, publish call to applied, in ms."""
    rng = np.random.default_rng(1)
    publisher = RedisStreamPublisher(address, "live")
    consumer = UpdateConsumer(ps, RedisStreamSource(address, "live", start="$"), poll_timeout_s=0.5).start()
    latencies = []
    try:
        time.sleep(0.2)  # the consumer's first read is waiting
        for _ in range(samples):
            keys = rng.integers(0, num_rows, 256)
            rows = rng.random((256, DIM), dtype=np.float32)
            started = time.perf_counter()
            entry_id = publisher.publish("t", keys, rows)[-1]
            wait_applied(consumer, entry_id)
            latencies.append((time.perf_counter() - started) * 1e3)
    finally:
        consumer.close()
        publisher.close()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200k rows, 20 messages a round")
    args = parser.parse_args()
    num_rows = 200_000 if args.quick else 1_000_000
    num_messages = 20 if args.quick else 50
    rng = np.random.default_rng(0)
    figures: dict = {"rows": num_rows, "dim": DIM, "rows_per_message": ROWS_PER_MESSAGE, "messages": num_messages}
    with tempfile.TemporaryDirectory(prefix="bench-updates-") as scratch, redis_server() as port:
        address = f"127.0.0.1:{port}"
        config = PSConfig(tables=[TableConfig(name="t", dim=DIM, dram_capacity_rows=num_rows)],
                          dram=DramTierConfig(num_partitions=8),
                          rocksdb=RocksTierConfig(path=Path(scratch) / "store"))
        with HierarchicalPS.from_config(config) as ps:
            ps.import_table("t", np.arange(num_rows), random_rows(num_rows, DIM))
            ps.lookup_numpy("t", np.arange(num_rows))  # every row promoted: the DRAM tier holds the table
            direct, publish, apply = [], [], []
            for round_ in range(ROUNDS):
                messages = [(rng.integers(0, num_rows, ROWS_PER_MESSAGE),
                             rng.random((ROWS_PER_MESSAGE, DIM), dtype=np.float32)) for _ in range(num_messages)]
                started = time.perf_counter()
                for keys, rows in messages:
                    ps.update("t", keys, rows)
                direct.append(time.perf_counter() - started)
                published, applied = stream_round(ps, address, f"round{round_}", messages)
                publish.append(published)
                apply.append(applied)
                keys, rows = messages[-1]
                np.testing.assert_array_equal(ps.lookup_numpy("t", keys[-1:]), rows[-1:])  # the last write won
                print(f"round {round_}: direct {direct[-1]:.2f} s, publish {published:.2f} s, apply {applied:.2f} s",
                      flush=True)
            total = num_messages * ROWS_PER_MESSAGE
            figures["direct_update_rows_per_s"] = round(total / statistics.median(direct))
            figures["publish_rows_per_s"] = round(total / statistics.median(publish))
            figures["stream_apply_rows_per_s"] = round(total / statistics.median(apply))
            figures["stream_vs_direct_update"] = round(statistics.median(direct) / statistics.median(apply), 3)
            latencies = freshness_ms(ps, address, num_rows)
            figures["publish_to_applied_ms_p50"] = round(float(np.percentile(latencies, 50)), 2)
            figures["publish_to_applied_ms_p99"] = round(float(np.percentile(latencies, 99)), 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
