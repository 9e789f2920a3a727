"""Import readers: each good format round-trips; each malformed file is refused naming file and problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recserve.errors import MalformedFileError, NotFoundError
from recserve.ps import formats
from tests.conftest import make_table, rows_for

DIM = 8


def hugectr_folder(tmp_path: Path, n: int = 10) -> Path:
    keys = np.arange(n, dtype=np.int64) * 3
    formats.write_hugectr(tmp_path / "t.model", keys, rows_for(keys, DIM))
    return tmp_path / "t.model"


def test_hugectr_folder_round_trips(tmp_path: Path) -> None:
    source = formats.read_hugectr(hugectr_folder(tmp_path), DIM)
    formats.validate(source, make_table(dim=DIM))
    np.testing.assert_array_equal(source.keys, np.arange(10) * 3)
    np.testing.assert_array_equal(source.rows, rows_for(np.arange(10) * 3, DIM))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: f.joinpath("key").write_bytes(f.joinpath("key").read_bytes()[:-3]), "key: 77 bytes is not a whole"),
        (lambda f: f.joinpath("emb_vector").write_bytes(f.joinpath("emb_vector").read_bytes()[:-2]),
         "not a whole number of float32"),
        (lambda f: f.joinpath("emb_vector").write_bytes(f.joinpath("emb_vector").read_bytes()[:-32]),
         "holds 72 float32 values, expected 10 keys x dim 8 = 80"),
        (lambda f: f.joinpath("emb_vector").unlink(), "emb_vector: no such file"),
    ],
)
def test_malformed_hugectr_folders_are_refused(tmp_path: Path, damage: object, message: str) -> None:
    folder = hugectr_folder(tmp_path)
    damage(folder)
    with pytest.raises((MalformedFileError, NotFoundError), match=message):
        formats.read_hugectr(folder, DIM)


def test_hugectr_dim_mismatch_says_which_dim_the_file_has(tmp_path: Path) -> None:
    with pytest.raises(MalformedFileError, match="rows of dim 8, but the table has dim 4"):
        formats.read_hugectr(hugectr_folder(tmp_path), 4)


def test_duplicate_keys_are_refused_naming_one(tmp_path: Path) -> None:
    keys = np.array([1, 2, 2, 3], dtype=np.int64)
    formats.write_hugectr(tmp_path / "d", keys, rows_for(keys, DIM))
    with pytest.raises(MalformedFileError, match="1 duplicate keys, e.g. key 2"):
        formats.validate(formats.read_hugectr(tmp_path / "d", DIM), make_table(dim=DIM))


def test_npy_pairs_load_and_bad_ones_are_refused(tmp_path: Path) -> None:
    keys = np.arange(5, dtype=np.int64)
    np.save(tmp_path / "k.npy", keys)
    np.save(tmp_path / "v.npy", rows_for(keys, DIM))
    source = formats.read_npy(tmp_path / "k.npy", tmp_path / "v.npy")
    formats.validate(source, make_table(dim=DIM))
    np.save(tmp_path / "fk.npy", keys.astype(np.float64))
    with pytest.raises(MalformedFileError, match="fk.npy.*keys must be integers .* got dtype float64"):
        formats.validate(formats.read_npy(tmp_path / "fk.npy", tmp_path / "v.npy"), make_table(dim=DIM))
    np.save(tmp_path / "short.npy", rows_for(keys[:4], DIM))
    with pytest.raises(MalformedFileError, match=r"rows must be \[5, dim\] .* got shape \(4, 8\)"):
        formats.read_npy(tmp_path / "k.npy", tmp_path / "short.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(MalformedFileError, match="obj.npy: not a readable .npy array"):
        formats.read_npy(tmp_path / "obj.npy", tmp_path / "v.npy")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(MalformedFileError, match="junk.npy"):
        formats.read_npy(tmp_path / "junk.npy", tmp_path / "v.npy")
    with pytest.raises(MalformedFileError, match="table 't' has dim 16"):
        formats.validate(source, make_table(dim=16))


def test_torch_state_dicts_by_name_and_with_a_key_map(tmp_path: Path) -> None:
    weight = torch.from_numpy(rows_for(np.arange(6), DIM))
    torch.save({"emb.0.weight": weight, "emb.1.weight": weight * 2, "mlp.bias": torch.zeros(3)}, tmp_path / "m.pt")
    with pytest.raises(MalformedFileError, match="holds 2 2-D tensors .*name one with --tensor"):
        formats.read_torch(tmp_path / "m.pt")
    with pytest.raises(NotFoundError, match="no 2-D tensor 'emb.9.weight'"):
        formats.read_torch(tmp_path / "m.pt", "emb.9.weight")
    source = formats.read_torch(tmp_path / "m.pt", "emb.1.weight")
    np.testing.assert_array_equal(source.keys, np.arange(6))
    np.testing.assert_array_equal(source.rows, weight.numpy() * 2)
    np.save(tmp_path / "map.npy", np.arange(6, dtype=np.int64) + 100)
    mapped = formats.read_torch(tmp_path / "m.pt", "emb.0.weight", tmp_path / "map.npy")
    np.testing.assert_array_equal(mapped.keys, np.arange(6) + 100)
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(MalformedFileError, match="bad.pt: not a readable torch file"):
        formats.read_torch(tmp_path / "bad.pt")
