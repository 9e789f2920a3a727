"""A served model follows its update stream: the checkpoint, then the stream replayed, then what arrives live."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recserve.models.synthetic import QueryGenerator
from recserve.ps.updates import RedisStreamPublisher
from recserve.serve.metrics import Metrics
from recserve.serve.repository import ServedModel, load_model, write_model_folder
from tests.conftest import RedisServer, reference_model, wait_for

SERVING = {"scheduler": {"batch_size": 8, "num_workers": 1, "latency_target_ms": 60_000, "inline_max_items": 0},
           "dram": {"num_partitions": 2}}


def served_scores(served: ServedModel, query: object) -> np.ndarray:
    return served.executor.submit(query.dense.numpy(), query.sparse).result(60).scores  # type: ignore[attr-defined]


@pytest.mark.redis
def test_a_served_model_replays_its_stream_then_follows_it(tmp_path: Path, redis_server: RedisServer) -> None:
    folder = tmp_path / "rmc1"
    updates = {"type": "redis_streams", "address": redis_server.address, "poll_timeout_ms": 50}
    write_model_folder(folder, "rmc1", seed=3, serving={**SERVING, "update_source": updates})
    publisher = RedisStreamPublisher(redis_server.address, "recserve.rmc1")
    model, reference = reference_model(folder)
    rng = np.random.default_rng(0)
    dim = model.spec.tables[0].dim
    early_keys = np.arange(0, 1000, 2)
    early_rows = rng.normal(size=(early_keys.size, dim)).astype(np.float32)
    publisher.publish("t0", early_keys, early_rows)  # before the server starts, by the input's short name
    query = QueryGenerator(model.spec, seed=1).query(24)
    with reference, torch.inference_mode():
        pristine = model(query.dense, query.sparse).numpy()
        served = load_model(folder)
        try:
            assert served.updates is not None and served.updates.stats().applied_messages == 1  # ready: replayed
            reference.update("rmc1_t0", early_keys, early_rows)
            expected = model(query.dense, query.sparse).numpy()
            assert np.abs(expected - pristine).max() > 1e-3  # the update moves these scores
            np.testing.assert_allclose(served_scores(served, query), expected, rtol=1e-5, atol=1e-6)

            live_keys = np.arange(1000)
            live_rows = rng.normal(size=(live_keys.size, dim)).astype(np.float32)
            last = publisher.publish("rmc1_t1", live_keys, live_rows, rows_per_message=300)[-1]  # the full name
            wait_for(lambda: served.updates.stats().position == last, what="the live updates")  # type: ignore[union-attr]
            reference.update("rmc1_t1", live_keys, live_rows)
            np.testing.assert_allclose(served_scores(served, query), model(query.dense, query.sparse).numpy(),
                                       rtol=1e-5, atol=1e-6)
            metrics = Metrics(lambda: {"rmc1": served}).render().decode()
            assert 'recserve_updates_total{model="rmc1",outcome="applied_messages"} 5.0' in metrics
            assert 'recserve_updates_total{model="rmc1",outcome="applied_rows"} 1500.0' in metrics
        finally:
            served.close()
    publisher.close()


def test_a_dead_update_source_does_not_hold_the_model_back(tmp_path: Path) -> None:
    folder = tmp_path / "ncf"
    updates = {"type": "kafka", "address": "127.0.0.1:1", "poll_timeout_ms": 100}
    write_model_folder(folder, "ncf", seed=3, serving={**SERVING, "update_source": updates})
    served = load_model(folder)
    try:
        query = QueryGenerator(served.signature.spec, seed=1).query(4)
        assert served_scores(served, query).shape == (4, 1)
        wait_for(lambda: served.updates.stats().read_errors >= 1, what="a failed read")  # type: ignore[union-attr]
        metrics = Metrics(lambda: {"ncf": served}).render().decode()
        assert 'recserve_updates_total{model="ncf",outcome="read_errors"}' in metrics
    finally:
        served.close()


@pytest.mark.redis
def test_a_model_over_dram_redis_and_rocksdb_scores_exactly_before_and_after_updates(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """DRAM holds a tenth of each table; the serving process answers the workers' misses from Redis, then
    RocksDB, promoting into Redis; an update must reach every tier that holds the row, or a stale one shows."""
    folder = tmp_path / "rmc1"
    serving = {**SERVING, "rocksdb": {"enabled": True, "path": "rocksdb"}, "dram_fraction": 0.1,
               "redis": {"enabled": True, "address": redis_server.address, "num_partitions": 2},
               "update_source": {"type": "redis_streams", "address": redis_server.address, "poll_timeout_ms": 50}}
    write_model_folder(folder, "rmc1", seed=3, serving=serving)
    model, reference = reference_model(folder)
    query = QueryGenerator(model.spec, seed=1).query(24)
    with reference, torch.inference_mode():
        served = load_model(folder)
        try:
            np.testing.assert_allclose(served_scores(served, query), model(query.dense, query.sparse).numpy(),
                                       rtol=1e-5, atol=1e-6)
            redis_tier = next(t for t in served.ps.tiers if t.name == "redis")
            assert redis_tier.stats()["rmc1_t0"].rows > 100  # promoted from RocksDB on the way up

            keys = np.unique(query.sparse.keys["rmc1_t0"].numpy())
            rows = np.random.default_rng(2).normal(size=(keys.size, model.spec.tables[0].dim)).astype(np.float32)
            held = redis_tier.lookup("rmc1_t0", keys).found.sum()
            assert held == keys.size  # every key of the query is in Redis: a missed update would show
            publisher = RedisStreamPublisher(redis_server.address, "recserve.rmc1")
            last = publisher.publish("t0", keys, rows)[-1]
            publisher.close()
            wait_for(lambda: served.updates.stats().position == last, what="the update")  # type: ignore[union-attr]
            reference.update("rmc1_t0", keys, rows)
            np.testing.assert_allclose(served_scores(served, query), model(query.dense, query.sparse).numpy(),
                                       rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(redis_tier.lookup("rmc1_t0", keys).rows, rows)
        finally:
            served.close()
