"""The README's promises point at tests that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from swapper.backends.registry import load_backends
from swapper.config import load_config

ROOT = Path(__file__).resolve().parent.parent


Function = ast.FunctionDef | ast.AsyncFunctionDef

#: Calls that assert: they raise when what they check does not hold.
_CHECKING_CALLS = {"raises", "wait_until", "wait_status", "expect", "error_of", "call_and_validate"}


def _functions(path: Path) -> dict[str, Function]:
    """Every function defined in a test file (tests, helpers, nested ones), by name."""
    tree = ast.parse(path.read_text())
    return {node.name: node for node in ast.walk(tree) if isinstance(node, Function)}


def _asserts(name: str, functions: dict[str, Function], seen: set[str] | None = None) -> bool:
    """True when the function, or a function of its file that it calls, asserts something."""
    seen = set() if seen is None else seen
    seen.add(name)
    for node in ast.walk(functions[name]):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            called = getattr(node.func, "attr", None) or getattr(node.func, "id", None) or ""
            if called in _CHECKING_CALLS or called.startswith("assert_"):
                return True
            if called in functions and called not in seen and _asserts(called, functions, seen):
                return True
    return False


def test_every_guarantee_names_an_existing_test() -> None:
    section = (ROOT / "README.md").read_text().split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    references = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", section)
    assert len(references) >= 20
    for file, name in references:
        path = ROOT / file
        assert path.exists(), file
        if name:
            functions = _functions(path)
            assert name.startswith("test_") and name in functions, (
                f"{file}::{name} is named in the README but missing"
            )
            # What each test asserts was read against its promise by hand; this keeps a test
            # that asserts nothing at all from standing behind one.
            assert _asserts(name, functions), f"{file}::{name} asserts nothing"


def test_the_readmes_configuration_example_is_a_valid_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    section = (ROOT / "README.md").read_text().split("## Configuration", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "readme.yaml"
    path.write_text(example)
    monkeypatch.setenv("SWAPPER_API_KEY", "k")
    monkeypatch.setenv("SWAPPER_ADMIN_KEY", "a")
    config = load_config(path, load_backends().schemas())
    assert {entry.backend for entry in config.models.values()} == {"llamacpp", "ollama", "vllm"}
