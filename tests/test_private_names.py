"""No module of swapper or its built-in plugins reaches into another module's private names
(``other._name``): objects talk through public methods (issue 9: one runtime per model)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "swapper").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")])


def _defined(tree: ast.AST) -> set[str]:
    """Names a module defines itself: functions, classes, attributes it assigns."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def foreign_private_uses(sources: list[Path], root: Path = ROOT) -> list[str]:
    """``obj._name`` (obj not self or cls) where ``_name`` is defined by another of
    ``sources`` and not by the module itself. Private names of the standard library and other
    packages (``ctypes._CFuncPtr``) are not ours to police here."""
    trees = {path: ast.parse(path.read_text(), str(path)) for path in sources}
    defined = {path: _defined(tree) for path, tree in trees.items()}
    ours = set().union(*defined.values())
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            name = node.attr
            if not name.startswith("_") or name.startswith("__"):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if name in ours and name not in defined[path]:
                found.append(f"{path.relative_to(root)}:{node.lineno}: .{name}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    assert foreign_private_uses(SOURCES) == []


def test_the_check_finds_a_private_use(tmp_path: Path) -> None:
    owner = tmp_path / "owner.py"
    owner.write_text("class Thing:\n    def _secret(self) -> None: ...\n")
    user = tmp_path / "user.py"
    user.write_text("def poke(thing):\n    thing._secret()\n    thing.public()\n")
    assert foreign_private_uses([owner, user], tmp_path) == ["user.py:2: ._secret"]
