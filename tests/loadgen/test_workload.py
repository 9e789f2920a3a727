"""Arrival processes and size distributions: the statistics they promise, and the errors of bad parameters."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from recserve.config import ArrivalProcess, SizeDistribution
from recserve.errors import InvalidInputError, MalformedFileError
from recserve.loadgen.workload import QueryPool, arrival_times, as_v2_arrays, query_sizes
from recserve.models.specs import model_spec


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_poisson_arrivals_have_the_rate_and_exponential_gaps() -> None:
    times = arrival_times(ArrivalProcess(kind="poisson", qps=200.0), 100.0, rng())
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0) and times[-1] < 100.0
    assert times.size == pytest.approx(20_000, rel=0.03)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / 200, rel=0.03)
    assert gaps.std() == pytest.approx(gaps.mean(), rel=0.05)  # exponential: std == mean
    assert np.array_equal(times, arrival_times(ArrivalProcess(kind="poisson", qps=200.0), 100.0, rng()))


def test_constant_and_trace_arrivals(tmp_path: Path) -> None:
    times = arrival_times(ArrivalProcess(kind="constant", qps=4.0), 1.0, rng())
    assert times.tolist() == [0.0, 0.25, 0.5, 0.75]
    trace = tmp_path / "trace.txt"
    trace.write_text("# send times\n0.0\n0.5\n\n1.5 # late\n9\n")
    assert arrival_times(ArrivalProcess(kind="trace", path=trace), 2.0, rng()).tolist() == [0.0, 0.5, 1.5]


@pytest.mark.parametrize(("text", "message"), [
    ("0.1\nsoon\n", r"trace.txt:2: not a number: 'soon'"),
    ("0.5\n0.1\n", "ascending"),
    ("-1\n", ">= 0"),
])
def test_garbage_traces_are_refused_by_line(tmp_path: Path, text: str, message: str) -> None:
    trace = tmp_path / "trace.txt"
    trace.write_text(text)
    with pytest.raises(MalformedFileError, match=message):
        arrival_times(ArrivalProcess(kind="trace", path=trace), 10.0, rng())
    with pytest.raises(MalformedFileError, match="cannot read"):
        arrival_times(ArrivalProcess(kind="trace", path=tmp_path / "missing"), 10.0, rng())


def test_size_distributions_follow_their_parameters() -> None:
    lognormal = query_sizes(SizeDistribution(kind="lognormal", mu=5.1, sigma=0.2, max_items=10_000), 50_000, rng())
    assert np.log(lognormal).mean() == pytest.approx(5.1, abs=0.01)
    normal = query_sizes(SizeDistribution(kind="normal", mean=165, std=16, max_items=10_000), 50_000, rng())
    assert normal.mean() == pytest.approx(165, rel=0.01) and normal.std() == pytest.approx(16, rel=0.05)
    fixed = query_sizes(SizeDistribution(kind="fixed", items=7), 5, rng())
    assert fixed.tolist() == [7] * 5
    clipped = query_sizes(SizeDistribution(kind="normal", mean=5, std=50, max_items=20), 10_000, rng())
    assert clipped.min() == 1 and clipped.max() == 20


def test_the_production_mix_is_heavy_tailed() -> None:
    sizes = query_sizes(SizeDistribution(kind="production", max_items=100_000), 100_000, rng())
    assert 100 < np.median(sizes) < 300
    assert np.percentile(sizes, 99) > 5 * np.median(sizes)  # a tail lognormal(5.1, 0.2) does not have
    # >= 500 items: the Pareto 5%, a third of lognormal(6, 0.5)'s 25%, a sliver of lognormal(5, 0.5)'s 70%
    assert (sizes >= 500).mean() == pytest.approx(0.05 + 0.25 * 0.334 + 0.70 * 0.0076, abs=0.01)


def test_sizes_from_a_file_cycle_and_bad_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "sizes.txt"
    path.write_text("3\n5000\n1\n")
    sizes = query_sizes(SizeDistribution(kind="file", path=path, max_items=100), 7, rng())
    assert sizes.tolist() == [3, 100, 1, 3, 100, 1, 3]
    path.write_text("3\n0\n")
    with pytest.raises(MalformedFileError, match="sizes must be >= 1"):
        query_sizes(SizeDistribution(kind="file", path=path), 3, rng())
    path.write_text("three\n")
    with pytest.raises(MalformedFileError, match="sizes.txt:1: not a number"):
        query_sizes(SizeDistribution(kind="file", path=path), 3, rng())


@pytest.mark.parametrize("fields", [
    {"kind": "normal", "std": -1.0}, {"kind": "lognormal", "sigma": 50.0}, {"kind": "file"},
    {"kind": "fixed", "items": 0}, {"max_items": 0}, {"kind": "weibull"},
])
def test_impossible_size_parameters_are_refused(fields: dict) -> None:
    with pytest.raises(ValidationError):
        SizeDistribution(**fields)


@pytest.mark.parametrize("fields", [{"qps": 0.0}, {"qps": -5.0}, {"kind": "trace"}])
def test_impossible_arrival_parameters_are_refused(fields: dict) -> None:
    with pytest.raises(ValidationError):
        ArrivalProcess(**fields)


def test_query_pool_cuts_queries_of_any_size_with_zipf_keys() -> None:
    spec = model_spec("rmc1", "tiny")
    pool = QueryPool(spec, max_items=64, seed=1, bases=2)
    query = pool.query(10, rng())
    assert query.sparse.num_items == 10 and query.dense is not None and query.dense.shape == (10, 128)
    arrays = as_v2_arrays(spec, query)
    assert arrays["t0_keys"].size == 800 and arrays["t0_lengths"].tolist() == [80] * 10
    keys = np.concatenate([pool.query(64, rng(s)).sparse.keys["rmc1_t0"].numpy() for s in range(4)])
    counts = np.sort(np.bincount(keys))[::-1]
    assert counts[0] > 20 * max(1, np.median(counts[counts > 0]))  # popular keys dominate: not uniform ids
    with pytest.raises(ValueError, match="outside"):
        pool.query(65, rng())


def test_a_streaming_pool_draws_far_more_distinct_keys_than_its_bases_hold() -> None:
    tiny = model_spec("rmc1", "tiny")
    rows = 400_000  # a few bases see a sliver of such tables
    spec = dataclasses.replace(tiny, tables=tuple(dataclasses.replace(t, rows=rows) for t in tiny.tables[:2]))
    bases_only = QueryPool(spec, max_items=64, seed=1, bases=2)
    streaming = QueryPool(spec, max_items=64, seed=1, bases=2, stream_keys=200_000)

    def distinct(pool: QueryPool) -> int:
        return np.unique(np.concatenate([pool.query(64, rng(s)).sparse.keys["rmc1_t0"].numpy()
                                         for s in range(100)])).size

    assert distinct(streaming) > 3 * distinct(bases_only)
    query = streaming.query(10, rng())
    keys = query.sparse.keys["rmc1_t0"].numpy()
    assert query.sparse.lengths("rmc1_t0").tolist() == [80] * 10 and keys.size == 800
    assert keys.min() >= 0 and keys.max() < rows
    assert not np.array_equal(keys, query.sparse.keys["rmc1_t1"].numpy())  # one stream, read at its own offsets
    again = streaming.query(10, rng())  # the run's generator replays; the stream moves on
    assert again.sparse.lengths("rmc1_t0").tolist() == [80] * 10
    assert not np.array_equal(again.sparse.keys["rmc1_t0"].numpy(), keys)
    assert np.array_equal(bases_only.query(10, rng()).sparse.keys["rmc1_t0"].numpy(),
                          bases_only.query(10, rng()).sparse.keys["rmc1_t0"].numpy())
    counts = np.sort(np.bincount(keys))[::-1]
    assert counts[0] > 5 * max(1, np.median(counts[counts > 0]))  # still Zipf: popular keys repeat
    with pytest.raises(InvalidInputError, match="stream_keys"):
        QueryPool(spec, max_items=64, stream_keys=100)
