"""The `recserve` command end to end: import (each format, HPS JSON), lookup, stats, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recserve.cli import main
from recserve.ps import formats
from tests.conftest import RedisServer, rows_for


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(
        "ps:\n  tables:\n    - {name: items, dim: 4, dram_capacity_rows: 64}\n"
        f"  rocksdb: {{path: {tmp_path / 'store'}}}\n  dram: {{shm_dir: /dev/shm}}\n"
    )
    return path


def test_import_npy_then_lookup_and_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    keys = np.arange(5, dtype=np.int64) + 10
    np.save(tmp_path / "k.npy", keys)
    np.save(tmp_path / "v.npy", rows_for(keys, 4))
    assert main(["import", "--config", str(config), "--table", "items", str(tmp_path / "k.npy"),
                 str(tmp_path / "v.npy")]) == 0
    assert "items: imported 5 rows of dim 4" in capsys.readouterr().out
    assert main(["lookup", "--config", str(config), "--table", "items", "12", "99"]) == 0
    captured = capsys.readouterr()
    printed = dict(line.split(": ", 1) for line in captured.out.strip().splitlines())
    np.testing.assert_allclose(np.fromstring(printed["12"].strip("[]"), sep=" "), rows_for(np.array([12]), 4)[0])
    assert np.fromstring(printed["99"].strip("[]"), sep=" ").tolist() == [0.0] * 4
    assert "(1 keys found in no tier: default row shown)" in captured.err
    assert main(["stats", "--config", str(config)]) == 0
    assert "items" in (out := capsys.readouterr().out) and "5" in out.split("items")[1]


def test_import_torch_and_hugectr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    torch.save({"weight": torch.from_numpy(rows_for(np.arange(3), 4))}, tmp_path / "w.pt")
    assert main(["import", "--config", str(config), "--table", "items", str(tmp_path / "w.pt")]) == 0
    formats.write_hugectr(tmp_path / "items.model", np.array([7, 8]), rows_for(np.array([7, 8]), 4))
    assert main(["import", "--config", str(config), "--table", "items", str(tmp_path / "items.model")]) == 0
    assert "imported 2 rows" in capsys.readouterr().out


def test_import_every_table_of_an_hps_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, dim in (("wide", 1), ("deep", 4)):
        keys = np.arange(20, dtype=np.int64)
        formats.write_hugectr(tmp_path / f"{name}.model", keys, rows_for(keys, dim))
    hps = {
        "supportlonglong": True,
        "volatile_db": {"type": "parallel_hash_map", "num_partitions": 2},
        "persistent_db": {"type": "rocks_db", "path": str(tmp_path / "store")},
        "models": [{
            "model": "wdl", "sparse_files": [str(tmp_path / "wide.model"), str(tmp_path / "deep.model")],
            "embedding_table_names": ["wide", "deep"], "embedding_vecsize_per_table": [1, 4],
            "maxnum_catfeature_query_per_table_per_sample": [2, 26], "default_value_for_each_table": [0.0],
            "deployed_device_list": [0],
        }],
    }
    (tmp_path / "hps.json").write_text(json.dumps(hps))
    assert main(["import", "--config", str(tmp_path / "hps.json")]) == 0
    out = capsys.readouterr().out
    assert "wide: imported 20 rows of dim 1" in out and "deep: imported 20 rows of dim 4" in out


def test_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    formats.write_hugectr(tmp_path / "bad.model", np.arange(3), rows_for(np.arange(3), 5))
    assert main(["import", "--config", str(config), "--table", "items", str(tmp_path / "bad.model")]) == 2
    assert "rows of dim 5, but the table has dim 4" in capsys.readouterr().err
    assert main(["import", "--config", str(config), "--table", "nope", str(tmp_path / "bad.model")]) == 2
    assert "table 'nope' is not in" in capsys.readouterr().err
    assert main(["lookup", "--config", str(config), "--table", "items", "1"]) == 2
    assert "no store at" in capsys.readouterr().err
    formats.write_hugectr(tmp_path / "ok.model", np.arange(3), rows_for(np.arange(3), 4))
    assert main(["import", "--config", str(config), "--table", "items", str(tmp_path / "ok.model")]) == 0
    assert main(["lookup", "--config", str(config), "--table", "nope", "1"]) == 2
    assert "unknown table 'nope'" in capsys.readouterr().err
    assert main(["bench", "--repo", str(tmp_path), "--shared-memory"]) == 2
    assert "--shared-memory is for a running server" in capsys.readouterr().err


def test_repo_writes_servable_model_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recserve.models.checkpoint import checkpoint_spec
    from recserve.serve.repository import read_serving_config

    assert main(["repo", str(tmp_path / "repo"), "--models", "ncf,rmc2", "--seed", "3"]) == 0
    assert "ncf (tiny)" in capsys.readouterr().out
    for name in ("ncf", "rmc2"):
        folder = tmp_path / "repo" / name
        assert checkpoint_spec(folder).name == name
        assert (folder / "dense.pt").exists() and len(list((folder / "sparse").iterdir())) > 0
        assert read_serving_config(folder).scheduler.batch_size == 64  # the defaults, written out
    assert main(["repo", str(tmp_path / "other"), "--models", "rmc9"]) == 2
    assert "unknown models ['rmc9']" in capsys.readouterr().err


def test_serve_names_a_missing_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--repo", str(tmp_path / "none"), "--http-port", "0", "--grpc-port", "0"]) == 2
    assert f"model repository {tmp_path / 'none'} is not a folder" in capsys.readouterr().err


@pytest.mark.redis
def test_publish_puts_a_tables_rows_on_a_stream_then_trims_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              redis_server: RedisServer) -> None:
    import redis

    from recserve.ps.updates import PAYLOAD_FIELD, decode_update

    keys = np.arange(10, dtype=np.int64) * 3
    np.save(tmp_path / "k.npy", keys)
    np.save(tmp_path / "v.npy", rows_for(keys, 4))
    common = ["publish", "--address", redis_server.address, "--stream", "recserve.m"]
    assert main([*common, "--table", "t0", "--rows-per-message", "4", str(tmp_path / "k.npy"),
                 str(tmp_path / "v.npy")]) == 0
    assert "recserve.m: 10 rows of table t0 in 3 messages" in capsys.readouterr().out
    entries = redis.Redis(port=redis_server.port).xrange("recserve.m")
    messages = [decode_update(fields[PAYLOAD_FIELD]) for _, fields in entries]
    assert {m.table for m in messages} == {"t0"}
    np.testing.assert_array_equal(np.concatenate([m.keys for m in messages]), keys)
    np.testing.assert_array_equal(np.concatenate([m.rows for m in messages]), rows_for(keys, 4))
    assert main([*common, "--trim-before", entries[2][0].decode()]) == 0
    assert "dropped 2 entries" in capsys.readouterr().out

    formats.write_hugectr(tmp_path / "t.model", keys, rows_for(keys, 4))
    assert main([*common, "--table", "t0", str(tmp_path / "t.model")]) == 2
    assert "give --dim" in capsys.readouterr().err
    assert main([*common, "--table", "t0", "--dim", "5", str(tmp_path / "k.npy"), str(tmp_path / "v.npy")]) == 2
    assert "table 't0' has dim 5" in capsys.readouterr().err


def test_publish_to_a_dead_redis_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "k.npy", np.arange(2))
    np.save(tmp_path / "v.npy", rows_for(np.arange(2), 4))
    assert main(["publish", "--address", "127.0.0.1:1", "--stream", "s", "--table", "t", str(tmp_path / "k.npy"),
                 str(tmp_path / "v.npy")]) == 2
    assert "redis 127.0.0.1:1: appending to 's'" in capsys.readouterr().err


@pytest.mark.redis
def test_follow_applies_a_stream_to_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              redis_server: RedisServer) -> None:
    from recserve.ps.updates import RedisStreamPublisher

    config = write_config(tmp_path)
    config.write_text(config.read_text() + f"update_source: {{type: redis_streams, address: '{redis_server.address}'"
                      ", stream: items.updates}\n")
    publisher = RedisStreamPublisher(redis_server.address, "items.updates")
    publisher.publish("items", np.array([4, 5]), rows_for(np.array([4, 5]), 4, version=1))
    publisher.publish("items", np.array([5]), rows_for(np.array([5]), 4, version=2))
    publisher.close()
    assert main(["follow", "--config", str(config), "--until-caught-up"]) == 0
    assert "applied 2 messages (3 rows), skipped 0" in capsys.readouterr().out
    assert main(["lookup", "--config", str(config), "--table", "items", "4", "5"]) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    np.testing.assert_allclose(np.fromstring(printed["5"].strip("[]"), sep=" "), rows_for(np.array([5]), 4, 2)[0])
    np.testing.assert_allclose(np.fromstring(printed["4"].strip("[]"), sep=" "), rows_for(np.array([4]), 4, 1)[0])


def test_follow_needs_a_live_update_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert main(["follow", "--config", str(config), "--until-caught-up"]) == 2
    assert "update_source.type is 'disabled'" in capsys.readouterr().err
    config.write_text(config.read_text() + "update_source: {type: redis_streams, address: '127.0.0.1:1'}\n")
    assert main(["follow", "--config", str(config), "--until-caught-up", "--report-s", "0.1"]) == 2
    assert "update source: redis 127.0.0.1:1: reading stream 'recserve.updates'" in capsys.readouterr().err


def test_trim_before_is_refused_for_kafka(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "k.npy", np.arange(2))
    np.save(tmp_path / "v.npy", rows_for(np.arange(2), 4))
    args = ["publish", "--via", "kafka", "--address", "127.0.0.1:1", "--stream", "s"]
    assert main([*args, "--trim-before", "0-1"]) == 2
    assert "--trim-before is for Redis streams" in capsys.readouterr().err
