"""The README's promises point at tests that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")}


def test_every_guarantee_names_an_existing_test() -> None:
    section = (ROOT / "README.md").read_text().split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    references = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", section)
    assert len(references) >= 20
    for file, name in references:
        path = ROOT / file
        assert path.exists(), file
        if name:
            assert name in _test_names(path), f"{file}::{name} is named in the README but missing"
