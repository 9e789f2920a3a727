"""The `recserve` command end to end: import (each format, HPS JSON), lookup, stats, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recserve.cli import main
from recserve.ps import formats
from tests.conftest import rows_for


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
