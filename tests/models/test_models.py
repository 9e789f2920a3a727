"""All eight reference models: forward on `tiny` through the PS, golden scores, and clear input errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from recserve.config import DramTierConfig, PSConfig, RocksTierConfig
from recserve.errors import InvalidInputError, NotFoundError
from recserve.models import MODEL_NAMES, RecModel, build_model, model_spec, table_configs
from recserve.models.synthetic import QueryGenerator, table_rows, write_tables
from recserve.ps.server import HierarchicalPS
from recserve.sparse import SparseBatch

# Scores of 4 items from QueryGenerator(seed=7) with tables and weights of seed 7. Produced by this code when
# the models were written; a change here means the models compute something else.
GOLDEN = {
    "rmc1": [0.509275, 0.500051, 0.502212, 0.500226],
    "rmc2": [0.507925, 0.506132, 0.508058, 0.503951],
    "rmc3": [0.513603, 0.513749, 0.51359, 0.520623],
    "ncf": [0.503166, 0.503426, 0.503406, 0.503175],
    "wnd": [0.5525, 0.524774, 0.484474, 0.54253],
    "mtwnd": [0.554924, 0.620915, 0.58791, 0.560256, 0.556387, 0.561954, 0.596686, 0.540276, 0.548828,
              0.592834, 0.464218, 0.583365],
    "din": [0.510681, 0.513641, 0.513367, 0.512317],
    "dien": [0.447184, 0.445985, 0.447223, 0.445723],
}


@pytest.fixture(params=MODEL_NAMES)
def served(request: pytest.FixtureRequest) -> Iterator[tuple[RecModel, HierarchicalPS]]:
    """A tiny model over a DRAM-only PS holding its tables (seed 7)."""
    spec = model_spec(request.param, "tiny")
    config = PSConfig(tables=table_configs(spec), dram=DramTierConfig(num_partitions=2, shared_memory=False),
                      rocksdb=RocksTierConfig(enabled=False))
    with HierarchicalPS.from_config(config) as ps:
        write_tables(ps, spec, seed=7, progress=False)
        yield build_model(spec, ps, seed=7), ps


def test_golden_scores_through_the_ps(served: tuple[RecModel, HierarchicalPS]) -> None:
    model, _ = served
    query = QueryGenerator(model.spec, seed=7).query(4)
    with torch.no_grad():
        scores = model(query.dense, query.sparse)
    assert scores.shape == (4, model.spec.num_tasks)
    assert ((scores > 0) & (scores < 1)).all()
    torch.testing.assert_close(scores.flatten(), torch.tensor(GOLDEN[model.spec.name]), rtol=0, atol=2e-5)


def test_ps_backed_model_equals_its_local_twin(served: tuple[RecModel, HierarchicalPS]) -> None:
    model, _ = served
    local = build_model(model.spec, seed=7)
    with torch.no_grad():
        for name, rows in table_rows(model.spec, seed=7).items():
            local.embedding.tables[name].weight.copy_(torch.from_numpy(rows))
        query = QueryGenerator(model.spec, seed=3).query(33)
        torch.testing.assert_close(model(query.dense, query.sparse), local(query.dense, query.sparse))


def test_bad_inputs_name_model_table_and_field(served: tuple[RecModel, HierarchicalPS]) -> None:
    model, _ = served
    spec = model.spec
    query = QueryGenerator(spec, seed=1).query(3)
    width = spec.dense_features
    with pytest.raises(InvalidInputError, match=rf"model '{spec.name}': dense must be \[items, {width}\]"):
        model(torch.zeros(3, spec.dense_features + 1), query.sparse)
    with pytest.raises(InvalidInputError, match=rf"'{spec.name}': dense must be a float32 tensor, got torch.float64"):
        model(query.dense.double(), query.sparse)
    with pytest.raises(InvalidInputError, match="dense has 2 items, sparse input has 3"):
        model(query.dense[:2], query.sparse)
    dropped = spec.tables[-1].name
    partial = query.sparse.select([t for t in query.sparse.tables if t != dropped])
    with pytest.raises(InvalidInputError, match=f"model '{spec.name}': sparse input lacks table '{dropped}'"):
        model(query.dense, partial)
    empty = SparseBatch.empty(query.sparse.tables)
    assert model(torch.zeros(0, spec.dense_features), empty).shape == (0, spec.num_tasks)


def test_dien_sequence_must_have_its_length() -> None:
    spec = model_spec("dien", "tiny")
    model = build_model(spec)
    query = QueryGenerator(spec).query(2)
    features = {t: (query.sparse.keys[t], query.sparse.lengths(t)) for t in query.sparse.tables}
    keys, _ = features["dien_behaviour"]
    features["dien_behaviour"] = (keys[:-2], torch.tensor([40, 38]))
    with pytest.raises(InvalidInputError, match="'dien_behaviour' is a sequence of 40 keys per item"):
        model(query.dense, SparseBatch.from_lengths(features))


def test_unknown_model_and_missing_tables() -> None:
    with pytest.raises(NotFoundError, match="unknown model 'rmc9'"):
        model_spec("rmc9")
    spec = model_spec("ncf", "tiny")
    config = PSConfig(tables=table_configs(spec)[:2], dram=DramTierConfig(shared_memory=False),
                      rocksdb=RocksTierConfig(enabled=False))
    with HierarchicalPS.from_config(config) as ps, pytest.raises(NotFoundError, match="lacks tables"):
        build_model(spec, ps)
