"""The eight DeepRecInfra reference models: tables and layer sizes, in a `full` and a `tiny` preset.

Sizes follow the DeepRecSys reference configs. `full` is the table of the paper; `tiny` keeps every structure
(table count, dims, keys per item, layers) with small tables, for tests and quick runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from recserve.errors import NotFoundError

Preset = Literal["tiny", "full"]


@dataclass(frozen=True, slots=True)
class TableSpec:
    name: str  # PS table name, prefixed by the model: "rmc1_t0"
    rows: int
    dim: int
    keys_per_item: int  # lookups of this table per item
    pooled: bool = True  # False: a sequence, one row per key in order (DIEN's behaviour history)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    kind: Literal["dlrm", "ncf", "wnd", "mtwnd", "din", "dien"]
    tables: tuple[TableSpec, ...]
    dense_features: int
    bottom_mlp: tuple[int, ...] = ()  # DLRM: hidden and output sizes after the dense input
    top_mlp: tuple[int, ...] = ()  # sizes after the joined features; the last is the output width
    num_tasks: int = 1
    extra: dict[str, int] = field(default_factory=dict)

    def table(self, name: str) -> TableSpec:
        for table in self.tables:
            if table.name == name:
                return table
        raise NotFoundError(f"model '{self.name}' has no table '{name}'")


def _tables(model: str, rows: list[int], dim: int, keys_per_item: int, names: list[str] | None = None) -> tuple:
    names = names or [f"t{i}" for i in range(len(rows))]
    return tuple(TableSpec(f"{model}_{n}", r, dim, keys_per_item) for n, r in zip(names, rows, strict=True))


def _rows(preset: Preset, full: int, tiny: int = 1000) -> int:
    return full if preset == "full" else tiny


def model_spec(name: str, preset: Preset = "tiny", num_tasks: int = 3) -> ModelSpec:
    """The spec of a reference model by name (rmc1, rmc2, rmc3, ncf, wnd, mtwnd, din, dien)."""
    builders = {
        "rmc1": lambda: ModelSpec("rmc1", "dlrm", _tables("rmc1", [_rows(preset, 4_000_000)] * 8, 32, 80), 128,
                                  bottom_mlp=(64, 32), top_mlp=(256, 64, 1)),
        "rmc2": lambda: ModelSpec("rmc2", "dlrm", _tables("rmc2", [_rows(preset, 500_000)] * 32, 64, 120), 256,
                                  bottom_mlp=(128, 64), top_mlp=(128, 64, 1)),
        "rmc3": lambda: ModelSpec("rmc3", "dlrm", _tables("rmc3", [_rows(preset, 2_000_000)] * 10, 32, 20), 2560,
                                  bottom_mlp=(1024, 256, 32), top_mlp=(512, 256, 1)),
        "ncf": lambda: ModelSpec(
            "ncf", "ncf",
            _tables("ncf", [_rows(preset, 140_000), _rows(preset, 140_000), _rows(preset, 28_000),
                            _rows(preset, 28_000)], 64, 1, ["user_gmf", "user_mlp", "item_gmf", "item_mlp"]),
            0, top_mlp=(256, 256, 128, 64),
        ),
        "wnd": lambda: ModelSpec("wnd", "wnd", _tables("wnd", [_rows(preset, 1_000_000)] * 27, 32, 1), 512,
                                 top_mlp=(1024, 512, 256, 1)),
        "mtwnd": lambda: ModelSpec(
            "mtwnd", "mtwnd",
            _tables("mtwnd", [_rows(preset, 500_000)] * 41 + [_rows(preset, 5_000_000)] * 2, 32, 1), 512,
            bottom_mlp=(1024, 512), top_mlp=(256, 128, 1), num_tasks=num_tasks,
        ),
        "din": lambda: ModelSpec(
            "din", "din",
            _tables("din", [_rows(preset, 1_000_000)], 32, 3, ["profile"])
            + _tables("din", [_rows(preset, 100_000, 100)] * 250, 32, 3, [f"behaviour{i}" for i in range(250)])
            + _tables("din", [_rows(preset, 10_000_000), _rows(preset, 10_000_000)], 32, 3, ["ad", "context"]),
            0, bottom_mlp=(36, 1), top_mlp=(200, 80, 2),
        ),
        "dien": lambda: ModelSpec(
            "dien", "dien",
            (
                *_tables("dien", [_rows(preset, 1_000_000)], 32, 1, ["profile"]),
                TableSpec("dien_behaviour", _rows(preset, 5_000_000), 32, 40, pooled=False),
                *_tables("dien", [_rows(preset, 5_000_000), _rows(preset, 500_000)], 32, 1, ["ad", "context"]),
            ),
            0, top_mlp=(200, 80, 2), extra={"sequence_length": 40},
        ),
    }
    if name not in builders:
        raise NotFoundError(f"unknown model '{name}' (known: {', '.join(builders)})")
    return builders[name]()


MODEL_NAMES = ("rmc1", "rmc2", "rmc3", "ncf", "wnd", "mtwnd", "din", "dien")
