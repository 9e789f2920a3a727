"""Model folders and the input convention: what a request must hold, and the errors that name what it lacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recserve.errors import ConfigError, InvalidInputError, NotFoundError
from recserve.models.specs import model_spec
from recserve.models.synthetic import QueryGenerator
from recserve.serve.repository import ModelSignature, load_model, model_folders, read_serving_config
from tests.conftest import v2_inputs

SPEC = model_spec("rmc1")
SIGNATURE = ModelSignature(SPEC, max_items=100)


def good_inputs(items: int = 3) -> dict[str, np.ndarray]:
    query = QueryGenerator(SPEC, seed=1).query(items)
    return v2_inputs(SPEC, query.dense.numpy(), query.sparse)


def test_the_signature_lists_keys_lengths_dense_and_scores() -> None:
    names = [t.name for t in SIGNATURE.inputs]
    assert names[:4] == ["t0_keys", "t0_lengths", "t1_keys", "t1_lengths"] and names[-1] == "dense"
    assert len(names) == 2 * 8 + 1
    assert SIGNATURE.inputs[-1].shape == (-1, 128) and SIGNATURE.outputs[0].shape == (-1, 1)
    assert all(t.name != "dense" for t in ModelSignature(model_spec("ncf"), 10).inputs)  # no dense features


def test_good_inputs_decode_to_the_query() -> None:
    inputs = good_inputs()
    inputs["t0_lengths"] = inputs["t0_lengths"].astype(np.int32)  # INT32 lengths are fine too
    read_only = np.frombuffer(inputs["t1_keys"].tobytes(), dtype=np.int64)  # as binary data arrives
    inputs["t1_keys"] = read_only
    dense, sparse = SIGNATURE.decode(inputs)
    assert sparse.num_items == 3 and dense is not None and dense.shape == (3, 128)
    np.testing.assert_array_equal(sparse.keys["rmc1_t1"].numpy(), read_only)
    assert sparse.keys["rmc1_t1"].numpy().flags.writeable  # decoded into memory we own


@pytest.mark.parametrize(("change", "message"), [
    (lambda i: i.pop("t3_keys"), r"missing inputs \['t3_keys'\]"),
    (lambda i: i.update(extra=np.zeros(3, np.int64)), r"unexpected inputs \['extra'\]"),
    (lambda i: i.update(t0_keys=i["t0_keys"].astype(np.float32)), "input 't0_keys': datatype must be INT64, got FP32"),
    (lambda i: i.update(dense=i["dense"].astype(np.float64)), "input 'dense': datatype must be FP32, got FP64"),
    (lambda i: i.update(t0_lengths=i["t0_lengths"].astype(np.float32)), "must be INT64 or INT32, got FP32"),
    (lambda i: i.update(dense=i["dense"][:, :100]), r"input 'dense': shape must be \['N', 128\], got \[3, 100\]"),
    (lambda i: i.update(t2_keys=i["t2_keys"].reshape(3, 80)), r"input 't2_keys': shape must be \['N'\]"),
    (lambda i: i.update(t0_lengths=i["t0_lengths"] + 1), "lengths must sum to the number of keys"),
    (lambda i: i.update(t0_lengths=np.array([-1, 81, 80])), "lengths must be >= 0, got -1"),
    (lambda i: i.update(t5_lengths=np.array([120, 120])), "has 2 items, other tables have 3"),
    (lambda i: i.update(dense=i["dense"][:2]), "input 'dense' has 2 items, the lengths inputs have 3"),
])
def test_bad_inputs_are_named(change: object, message: str) -> None:
    inputs = good_inputs()
    change(inputs)  # type: ignore[operator]
    with pytest.raises(InvalidInputError, match=message):
        SIGNATURE.decode(inputs)


def test_empty_and_oversized_queries_are_refused() -> None:
    empty = {name: a[:0] for name, a in good_inputs().items()}
    with pytest.raises(InvalidInputError, match="empty query"):
        SIGNATURE.decode(empty)
    with pytest.raises(InvalidInputError, match="has 101 items, model 'rmc1' takes at most 100"):
        SIGNATURE.decode(good_inputs(101))


def test_serving_config_errors_name_the_file_and_key(tmp_path: Path) -> None:
    (tmp_path / "serve.yaml").write_text("scheduler:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"serve.yaml: .*batch_sise"):
        read_serving_config(tmp_path)
    (tmp_path / "serve.yaml").write_text("scheduler: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_serving_config(tmp_path)
    (tmp_path / "serve.yaml").write_text("scheduler:\n  num_workers: 0\n")
    with pytest.raises(ConfigError, match="num_workers"):
        read_serving_config(tmp_path)


def test_unservable_settings_are_refused_before_loading(tmp_path: Path) -> None:
    from recserve.serve.repository import write_model_folder

    folder = tmp_path / "ncf"
    write_model_folder(folder, "ncf", serving={"dram_fraction": 0.5})
    with pytest.raises(ConfigError, match="without the rocksdb tier the DRAM tier must hold every row"):
        load_model(folder)
    (folder / "serve.yaml").write_text("dram:\n  shared_memory: false\n")
    with pytest.raises(ConfigError, match="shared_memory must be true"):
        load_model(folder)


def test_a_repository_needs_model_folders(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="is not a folder"):
        model_folders(tmp_path / "missing")
    (tmp_path / "notes").mkdir()
    with pytest.raises(NotFoundError, match="has no model folders"):
        model_folders(tmp_path)
