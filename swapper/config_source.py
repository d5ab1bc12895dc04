"""Reading a config file's YAML tree: ``${env:NAME}`` expansion within bounds, and msgspec's
validation messages turned into ``file: $.key.path: problem`` lines. swapper.config decodes the
tree into typed Structs; this module knows nothing of their fields."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import msgspec
import yaml

from swapper.errors import ConfigError

__all__ = ["describe_validation_error", "expand_env", "read_yaml"]

_MSGSPEC_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<path>\$[^`]*)`)?$", re.DOTALL)


def describe_validation_error(error: msgspec.ValidationError, prefix: str) -> str:
    """Turn msgspec's message into ``$.key.path: what is wrong``."""
    match = _MSGSPEC_PATH.match(str(error))
    assert match is not None  # the pattern matches any string
    message, path = match["msg"], match["path"] or "$"
    path = prefix + path[1:]
    non_string_key = re.match(r"Expected `str`, got `(\w+)` - at `key` in `(\$[^`]*)`", str(error))
    if non_string_key:
        return f"{prefix}{non_string_key[2][1:]}: keys must be strings, got {non_string_key[1]}"
    unknown = re.match(r"Object contains unknown field `(.*)`", message, re.DOTALL)
    if unknown:
        return f"{path}.{unknown[1]}: unknown key"
    missing = re.match(r"Object missing required field `(.*)`", message, re.DOTALL)
    if missing:
        return f"{path}.{missing[1]}: required key is missing"
    # Cross-field checks in __post_init__ say "key: problem"; move the key into the path.
    keyed = re.match(r"(?P<key>[a-z_]+): (?P<problem>.*)", message, re.DOTALL)
    if keyed:
        return f"{path}.{keyed['key']}: {keyed['problem']}"
    message = message.replace("`", "").replace(" | null", "")
    message = message.replace("Expected object", "expected a mapping")
    return f"{path}: {message[:1].lower()}{message[1:]}"


_ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
#: A config is small; these bounds turn self-referencing or exploding YAML aliases into errors.
_MAX_DEPTH = 64
_MAX_NODES = 100_000


def expand_env(
    node: Any, path: str, source: str, budget: list[int] | None = None, depth: int = 0
) -> Any:
    """Replace ``${env:NAME}`` in every string with the variable's value (secrets stay out of files)."""
    budget = [_MAX_NODES] if budget is None else budget
    budget[0] -= 1
    if depth > _MAX_DEPTH:
        raise ConfigError(
            f"{source}: {path}: nested deeper than {_MAX_DEPTH} levels "
            "(a YAML alias that refers to itself?)"
        )
    if budget[0] < 0:
        raise ConfigError(f"{source}: more than {_MAX_NODES} values (YAML aliases expanding?)")
    if isinstance(node, str):

        def value(match: re.Match[str]) -> str:
            name = match[1]
            found = os.environ.get(name)
            # Empty counts as missing: an empty key must never quietly become "no key".
            if not found:
                state = "not set" if found is None else "empty"
                raise ConfigError(f"{source}: {path}: environment variable {name} is {state}")
            return found

        return _ENV_REF.sub(value, node)
    if isinstance(node, dict):
        return {
            key: expand_env(item, f"{path}.{key}", source, budget, depth + 1)
            for key, item in node.items()
        }
    if isinstance(node, list):
        return [
            expand_env(item, f"{path}[{i}]", source, budget, depth + 1)
            for i, item in enumerate(node)
        ]
    return node


def read_yaml(path: str | Path) -> Any:
    """The YAML tree of a config file; a one-line ConfigError if it cannot be read or parsed."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{source}: invalid YAML: {where}{problem}") from None
