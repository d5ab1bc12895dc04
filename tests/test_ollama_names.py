"""How Ollama spells a model name in ``/api/ps``, and how the plugin matches its tag to it."""

from __future__ import annotations

import pytest
from swapper_ollama import same_model, shortest_name


@pytest.mark.parametrize(
    ("name", "shortest"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("qwen3:8b", "qwen3:8b"),
        ("registry.ollama.ai/library/qwen3:8b", "qwen3:8b"),
        ("library/qwen3", "qwen3:latest"),
        ("registry.ollama.ai/me/tuned:1", "me/tuned:1"),
        ("me/tuned", "me/tuned:latest"),
        ("example.com:5000/team/m:q4", "example.com:5000/team/m:q4"),
        ("example.com/library/m", "example.com/library/m:latest"),
        ("qwen3:8b@sha256:abc", "qwen3:8b"),
        ("  qwen3:8b ", "qwen3:8b"),
    ],
)
def test_names_are_shortened_as_ollama_lists_them(name: str, shortest: str) -> None:
    assert shortest_name(name) == shortest


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("llama3.2", "llama3.2:latest", True),
        ("registry.ollama.ai/library/qwen3:8b", "qwen3:8b", True),
        ("Qwen3:8B", "qwen3:8b", True),
        ("REGISTRY.OLLAMA.AI/Library/llama3.2", "llama3.2:latest", True),
        ("qwen3:8b", "qwen3:4b", False),
        ("me/qwen3:8b", "qwen3:8b", False),
        ("llama3.2:1b", "llama3.2", False),
    ],
)
def test_tags_match_case_insensitively_in_any_spelling(a: str, b: str, same: bool) -> None:
    assert same_model(a, b) is same
    assert same_model(b, a) is same
