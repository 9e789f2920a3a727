"""The RocksDB tier: persistence, atomic imports, and what happens when the store can't be used."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from recserve.config import RocksTierConfig
from recserve.errors import ConfigError, InvalidInputError, NotFoundError, TierUnavailableError
from recserve.ps import rocks
from recserve.ps.rocks import RocksTier, encode_keys
from tests.conftest import cast_through, make_table, rows_for

DIM = 8


def open_tier(store: Path, dim: int = DIM, **fields: object) -> RocksTier:
    return RocksTier(RocksTierConfig(path=store, block_cache_bytes=8 << 20, **fields), [make_table(dim=dim)])


def test_key_encoding_sorts_like_the_numbers() -> None:
    keys = np.array([-(2**63), -5, -1, 0, 1, 7, 2**63 - 1], dtype=np.int64)
    assert encode_keys(keys) == sorted(encode_keys(keys))


def test_rows_persist_across_reopen(tmp_path: Path) -> None:
    keys = np.array([-3, 0, 5, 2**40], dtype=np.int64)
    tier = open_tier(tmp_path)
    tier.insert("t", keys, rows_for(keys, DIM))
    tier.close()
    tier = open_tier(tmp_path)
    result = tier.lookup("t", np.array([5, 6, -3], dtype=np.int64))
    assert result.found.tolist() == [True, False, True]
    np.testing.assert_array_equal(result.rows[[0, 2]], rows_for(np.array([5, -3]), DIM))
    assert tier.evict("t", np.array([5, 6], dtype=np.int64)) == 1
    assert not tier.lookup("t", np.array([5], dtype=np.int64)).found[0]
    tier.close()


def test_import_swaps_column_families_and_leaves_no_orphans(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    for version in (1, 2):  # unsorted keys: the import sorts them for the SST files
        keys = np.random.default_rng(version).permutation(1000 * version).astype(np.int64)
        tier.import_table("t", keys, rows_for(keys, DIM, version))
    result = tier.lookup("t", np.arange(2000, dtype=np.int64))
    assert result.found.all()
    np.testing.assert_array_equal(result.rows, rows_for(np.arange(2000), DIM, 2))
    tier.close()
    import rocksdict

    assert [cf for cf in rocksdict.Rdict.list_cf(str(tmp_path)) if cf.startswith("t.")] == ["t.t.2"]
    assert not list(tmp_path.glob("import-*"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_rows_round_trip_through_import_insert_lookup_and_export(tmp_path: Path, dtype: str) -> None:
    config = RocksTierConfig(path=tmp_path, block_cache_bytes=8 << 20)
    tier = RocksTier(config, [make_table(dim=DIM, dtype=dtype)])
    rows = np.random.default_rng(1).normal(size=(6, DIM)).astype(np.float32)
    tier.import_table("t", np.arange(4, dtype=np.int64), rows[:4])
    tier.insert("t", np.array([9, 2], dtype=np.int64), rows[4:])
    expected = cast_through(rows[[0, 1, 5, 3, 4]], dtype)  # key 2 rewritten by the insert
    result = tier.lookup("t", np.array([0, 1, 2, 3, 9, 7], dtype=np.int64))
    assert result.found.tolist() == [True] * 5 + [False]
    np.testing.assert_array_equal(result.rows[:5], expected)
    keys, exported = tier.export_table("t")
    assert keys.tolist() == [0, 1, 2, 3, 9] and exported.dtype == np.float32 and exported.flags.writeable
    np.testing.assert_array_equal(exported, expected)
    tier.close()
    with pytest.raises(ConfigError, match=f"holds dim 8 {dtype}, the config says dim 8 float32"):
        open_tier(tmp_path)


def test_an_import_with_a_value_beyond_float16_is_refused_and_leaves_the_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rocks, "SST_ROWS", 2)  # files of 2 rows each, taken in key order
    config = RocksTierConfig(path=tmp_path, block_cache_bytes=8 << 20)
    tier = RocksTier(config, [make_table(dim=DIM, dtype="float16")])
    keys = np.arange(5, dtype=np.int64)
    tier.import_table("t", keys, rows_for(keys, DIM))
    rows = rows_for(keys, DIM, version=1)
    rows[3, 2] = 1e6
    # passed in reverse: the value sits in row 1 of what was passed, the first row of the second file's block
    with pytest.raises(InvalidInputError, match=r"table 't': row 1, column 2 holds 1e\+06, beyond the range"):
        tier.import_table("t", keys[::-1].copy(), rows[::-1].copy())
    np.testing.assert_array_equal(tier.lookup("t", keys).rows, cast_through(rows_for(keys, DIM), "float16"))
    tier.close()
    import rocksdict

    assert [cf for cf in rocksdict.Rdict.list_cf(str(tmp_path)) if cf.startswith("t.")] == ["t.t.1"]


def test_reopening_with_another_dim_is_a_config_error(tmp_path: Path) -> None:
    open_tier(tmp_path).close()
    with pytest.raises(ConfigError, match="holds dim 8 float32, the config says dim 16"):
        open_tier(tmp_path, dim=16)


def test_a_store_locked_by_another_process_names_the_problem(tmp_path: Path) -> None:
    open_tier(tmp_path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from recserve.config import RocksTierConfig
            from recserve.ps.rocks import RocksTier
            from tests.conftest import make_table
            tier = RocksTier(RocksTierConfig(path={str(tmp_path)!r}), [make_table()])
            print("ready", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2],
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(TierUnavailableError, match="locked by another process") as caught:
            open_tier(tmp_path)
        assert caught.value.tier == "rocksdb"
        reader = open_tier(tmp_path, read_only=True)  # read-only opens share the store
        assert not reader.lookup("t", np.array([1], dtype=np.int64)).found[0]
        with pytest.raises(TierUnavailableError, match="read-only"):
            reader.insert("t", np.array([1], dtype=np.int64), rows_for(np.array([1]), DIM))
        reader.close()
    finally:
        holder.communicate("", timeout=60)


def test_read_only_store_without_the_table_says_so(tmp_path: Path) -> None:
    RocksTier(RocksTierConfig(path=tmp_path), [make_table(name="other")]).close()
    with pytest.raises(NotFoundError, match="table 't' is not in the read-only store"):
        open_tier(tmp_path, read_only=True)


def test_a_full_disk_during_import_leaves_the_previous_table(tmp_path: Path) -> None:
    keys = np.arange(100, dtype=np.int64)
    tier = open_tier(tmp_path, dim=64)
    tier.import_table("t", keys, rows_for(keys, 64, version=1))
    tier.close()
    # A real write failure, not a mock: the child may not grow any file past 2 MiB (EFBIG, like ENOSPC).
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import resource, signal
            import numpy as np
            from recserve.config import RocksTierConfig
            from recserve.errors import TierUnavailableError
            from recserve.ps.rocks import RocksTier
            from tests.conftest import make_table
            tier = RocksTier(RocksTierConfig(path={str(tmp_path)!r}), [make_table(dim=64)])
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))
            keys = np.arange(50_000, dtype=np.int64)
            try:
                rows = np.random.default_rng(0).random((keys.size, 64), dtype=np.float32)  # incompressible
                tier.import_table("t", keys, rows)
                print("imported")
            except TierUnavailableError as error:
                print("refused:", error)
        """)],
        capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=300,
    )
    assert "refused: rocksdb: import of table 't' failed; the previous contents are untouched" in child.stdout, (
        child.stdout + child.stderr
    )
    tier = open_tier(tmp_path, dim=64)
    result = tier.lookup("t", np.arange(200, dtype=np.int64))
    assert result.found.tolist() == [True] * 100 + [False] * 100
    np.testing.assert_array_equal(result.rows[:100], rows_for(keys, 64, version=1))
    tier.close()


def test_multiget_batches_cover_every_key_in_the_order_asked(tmp_path: Path) -> None:
    tier = RocksTier(RocksTierConfig(path=tmp_path, max_get_batch_size=7), [make_table()])
    keys = np.arange(-100, 100, 2, dtype=np.int64)
    tier.insert("t", keys, rows_for(keys, DIM))
    asked = np.random.default_rng(0).permutation(np.arange(-100, 100, dtype=np.int64))  # the tier reads sorted
    result = tier.lookup("t", asked)
    assert result.found.tolist() == [k % 2 == 0 for k in asked]
    np.testing.assert_array_equal(result.rows[result.found], rows_for(asked[result.found], DIM))
    np.testing.assert_array_equal(result.rows[~result.found], 0)
    tier.close()
