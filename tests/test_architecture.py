"""Dependencies point one way: errors, allocator, config, stats, sparse <- ps <- models <- sched <- serve,
loadgen <- cli."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "recserve"
LAYERS = {  # a module may import its own layer and any lower one
    "errors": 0, "allocator": 0, "config": 1, "stats": 1, "synthetic": 1, "sparse": 1,
    "ps": 2, "models": 3, "sched": 4, "serve": 5, "loadgen": 5, "demo": 6, "cli": 7,
}


def layer_of(module: str) -> int:
    return LAYERS[module.split(".")[1]]


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        module = "recserve." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            is_ours = isinstance(node, ast.ImportFrom) and (node.module or "").startswith("recserve.")
            if is_ours and layer_of(node.module) > layer_of(module):
                wrong.append(f"{module} imports {node.module}")
    assert not wrong, wrong


def test_import_recserve_stays_light() -> None:
    heavy = "('torch', 'numba', 'rocksdict', 'redis')"
    code = f"import sys, recserve; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
