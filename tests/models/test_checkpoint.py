"""Checkpoints: a trained (local) model saves, a PS-backed one loads it and scores the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recserve.cli import main
from recserve.config import DramTierConfig, PSConfig, RocksTierConfig
from recserve.errors import MalformedFileError
from recserve.models import build_model, model_spec, table_configs
from recserve.models.checkpoint import load_checkpoint, save_checkpoint
from recserve.models.synthetic import QueryGenerator
from recserve.ps.server import HierarchicalPS


def ps_config(spec: object, store: Path) -> PSConfig:
    return PSConfig(tables=table_configs(spec, 0.2), dram=DramTierConfig(num_partitions=2, shared_memory=False),
                    rocksdb=RocksTierConfig(path=store, block_cache_bytes=1 << 20))


def trained(name: str) -> torch.nn.Module:
    model = build_model(model_spec(name, "tiny"), seed=11)
    with torch.no_grad():  # stand-in for training: move every weight off its initial value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


@pytest.mark.parametrize("name", ["rmc1", "dien"])
def test_a_trained_model_round_trips_into_serving(tmp_path: Path, name: str) -> None:
    model = trained(name)
    save_checkpoint(model, tmp_path / "ckpt", preset="tiny")
    query = QueryGenerator(model.spec, seed=5).query(9)
    with HierarchicalPS.from_config(ps_config(model.spec, tmp_path / "store")) as ps:
        served = load_checkpoint(tmp_path / "ckpt", ps)
        with torch.no_grad():
            torch.testing.assert_close(served(query.dense, query.sparse), model(query.dense, query.sparse))
        save_checkpoint(served, tmp_path / "again", preset="tiny", ps=ps)  # export from the PS
    first = (tmp_path / "ckpt" / "sparse" / f"{name}_profile" if name == "dien" else
             tmp_path / "ckpt" / "sparse" / "rmc1_t0")
    again = tmp_path / "again" / "sparse" / first.name
    assert (first / "emb_vector").read_bytes() == (again / "emb_vector").read_bytes()


def test_broken_checkpoints_are_refused(tmp_path: Path) -> None:
    model = trained("ncf")
    save_checkpoint(model, tmp_path / "ckpt", preset="tiny")
    torch.save({"nope": torch.zeros(1)}, tmp_path / "ckpt" / "dense.pt")
    with HierarchicalPS.from_config(ps_config(model.spec, tmp_path / "store")) as ps:
        with pytest.raises(MalformedFileError, match="dense.pt: does not fit model 'ncf'"):
            load_checkpoint(tmp_path / "ckpt", ps)
        (tmp_path / "ckpt" / "model.json").write_text("{}")
        with pytest.raises(MalformedFileError, match="not a recserve checkpoint"):
            load_checkpoint(tmp_path / "ckpt", ps)


def test_cli_splits_a_trained_state_dict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = trained("ncf")
    torch.save(model.state_dict(), tmp_path / "trained.pt")
    tables = "".join(f"    - {{name: {t.name}, dim: {t.dim}}}\n" for t in model.spec.tables)
    (tmp_path / "c.yaml").write_text(f"ps:\n  tables:\n{tables}  rocksdb: {{path: {tmp_path / 'store'}}}\n"
                                     "  dram: {shared_memory: false}\n")
    assert main(["import", "--config", str(tmp_path / "c.yaml"), "--state-dict", str(tmp_path / "trained.pt"),
                 "--dense-out", str(tmp_path / "dense.pt")]) == 0
    out = capsys.readouterr().out
    assert "ncf_user_gmf: imported 1000 rows of dim 64" in out
    dense = torch.load(tmp_path / "dense.pt", weights_only=True)
    assert not any(k.startswith("embedding.") for k in dense) and "predict.weight" in dense
    config = ps_config(model.spec, tmp_path / "store")
    with HierarchicalPS.from_config(config) as ps:
        served = build_model(model.spec, ps)
        served.load_state_dict(dense)
        query = QueryGenerator(model.spec, seed=2).query(5)
        with torch.no_grad():
            torch.testing.assert_close(served(query.dense, query.sparse), model(query.dense, query.sparse))
    other = f"ps:\n  tables:\n    - {{name: other, dim: 4}}\n  rocksdb: {{path: {tmp_path}/s2}}\n"
    (tmp_path / "c2.yaml").write_text(other)
    assert main(["import", "--config", str(tmp_path / "c2.yaml"), "--state-dict", str(tmp_path / "trained.pt"),
                 "--dense-out", str(tmp_path / "d2.pt")]) == 2
    assert "are not in" in capsys.readouterr().err
