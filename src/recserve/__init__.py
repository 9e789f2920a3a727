"""recserve: serve huge DLRM-style recommendation models from a hierarchical parameter server.

`import recserve` stays light: torch, numba, rocksdict and redis load when the parts that need them are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from recserve.config import RecserveConfig, TableConfig, load_config
    from recserve.ps.server import HierarchicalPS

_LAZY = {
    "RecserveConfig": "recserve.config",
    "TableConfig": "recserve.config",
    "load_config": "recserve.config",
    "HierarchicalPS": "recserve.ps.server",
}

__all__ = ["HierarchicalPS", "RecserveConfig", "TableConfig", "__version__", "load_config"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'recserve' has no attribute {name!r}")
