"""Fuzzing ``check-config`` with hypothesis: any file ends in exit 0 or 2 and one clear line."""

from __future__ import annotations

import contextlib
import io
import math
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from swapper.cli import main

ROOT = Path(__file__).resolve().parent.parent

SET_VAR = "SWAPPER_FUZZ_SET_VAR"
UNSET_VAR = "UNSET_VAR_XYZ"

# derandomize + no database: CI sees the same examples on every run and writes nothing to disk.
FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

OK_LINE = re.compile(r"ok \((\d+) models\)\n")


@pytest.fixture(autouse=True)
def _env() -> Iterator[None]:
    """One variable that ``${env:...}`` can find and one that it must not."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SET_VAR, "from-env")
        patch.delenv(UNSET_VAR, raising=False)
        yield


def check_config(path: Path) -> tuple[int, str, str]:
    """``swapper check-config PATH`` in-process: (exit code, stdout, stderr)."""
    # StringIO rather than capsys: capsys's stream is strict UTF-8 and would fail on text the
    # real, backslashreplace stderr prints fine; the subprocess tests cover the real streams.
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check-config", str(path)])
    return code, out.getvalue(), err.getvalue()


def assert_one_clear_line(path: Path, code: int, out: str, err: str) -> int:
    """The property: 0 with one ``ok`` line, or 2 with one line that starts with the path."""
    # A traceback of a deep recursion runs to megabytes; its end says what went wrong.
    shown = f"exit {code}\nstdout: {out[-2000:]!r}\nstderr (end): {err[-2000:]!r}"
    assert code in (0, 2), shown
    assert "Traceback" not in out + err, shown
    if code == 0:
        assert err == "", shown
        assert out.startswith(f"{path}: ") and len(out.splitlines()) == 1, shown
        assert OK_LINE.fullmatch(out[len(f"{path}: ") :]), shown
    else:
        assert out == "", shown
        # splitlines: \r, \x85, \u2028 and the like break a line on a terminal or in a log too.
        assert err.startswith(f"{path}: ") and err.endswith("\n"), shown
        assert len(err.splitlines()) == 1, f"not one line: {shown}"
        assert err[len(f"{path}: ") :].strip(), f"no reason given: {shown}"
    return code


def written(path: Path, content: str | bytes) -> Path:
    # Bytes go out untouched: invalid UTF-8 must reach swapper as it is.
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# --- (a) random YAML trees -------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**70),  # past int64, where msgspec stops
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "llamacpp",
            "single-active",
            "multi-active",
            "${env:" + UNSET_VAR + "}",
            "${env:" + SET_VAR + "}",
            "2024-01-01",
            "yes",
            "~",
            "",
        ]
    ),
)
# YAML allows any scalar as a key; swapper's schema only understands strings.
keys = st.one_of(
    st.text(max_size=12),
    st.integers(),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.sampled_from(
        [
            "swapper",
            "server",
            "timeouts",
            "models",
            "backend",
            "model_path",
            "aliases",
            "ctx_size",
            "args",
            "binary",
            "port",
            "default_model",
        ]
    ),
    # Line breaks and other characters that could split or garble a one-line message.
    st.sampled_from(
        [
            "a\nb",
            "\n",
            "x\r",
            "tab\there",
            "nel\x85",
            "ls\u2028",
            "`tick`",
            "a: b",
            "- x",
            "$.x",
            "\x1b[31mred",
        ]
    ),
)
trees = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=25,
)
# Top-level sections get random bodies, so validation reaches past the first type check.
section_names = st.sampled_from(["swapper", "server", "timeouts", "models"])
section_trees = st.dictionaries(section_names | keys, trees, max_size=5)


@st.composite
def self_referencing_trees(draw: st.DrawFn) -> dict[Any, Any]:
    """A section that contains itself; safe_dump writes it as an anchor and an alias to it."""
    node: dict[Any, Any] | list[Any]
    if draw(st.booleans()):
        node = draw(st.dictionaries(keys, trees, max_size=3))
        node[draw(keys)] = node
    else:
        node = draw(st.lists(trees, max_size=3))
        node.insert(draw(st.integers(0, len(node))), node)
    document = draw(section_trees)
    document[draw(section_names | keys)] = node
    return document


@st.composite
def shared_trees(draw: st.DrawFn) -> dict[Any, Any]:
    """One subtree in several places, which safe_dump writes as an anchor and its aliases."""
    shared = draw(trees)
    return {draw(section_names | keys): shared for _ in range(draw(st.integers(1, 4)))} | {
        "models": {draw(st.text(min_size=1, max_size=5)): shared}
    }


def dump(tree: Any) -> str:
    # sort_keys=False: keys of mixed types do not compare.
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


# --- (b) near-valid configs ------------------------------------------------------------------


def valid_config() -> dict[str, Any]:
    return {
        "swapper": {
            "mode": "single-active",
            "max_concurrent_models": 1,
            "model_swap_timeout": 300,
            "gpu_enabled": True,
            "default_model": "qwen3",
            "max_overtake": 8,
            "retry_backoff": 5.0,
        },
        "server": {
            "host": "127.0.0.1",
            "port": 8890,
            "api_keys": ["k1"],
            "admin_api_keys": ["${env:" + SET_VAR + "}"],
            "cors_origins": [],
            "max_request_bytes": 1024,
        },
        "timeouts": {"connect": 5.0, "read": 600.0, "health": 2.0},
        "models": {
            "qwen3-8b": {
                "backend": "llamacpp",
                "model_path": "/models/qwen3.gguf",
                "ctx_size": 8192,
                "binary": "llama-server",
                "args": ["--jinja"],
                "aliases": ["qwen3"],
            },
            "tiny": {"backend": "llamacpp", "model_path": "/models/tiny.gguf"},
        },
    }


Step = tuple[Any, ...]


def paths(node: Any, prefix: Step = ()) -> Iterator[Step]:
    """Every key path in a tree of dicts and lists, the root included."""
    yield prefix
    if isinstance(node, dict):
        for key, item in node.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from paths(item, (*prefix, index))


def at(node: Any, path: Step) -> Any:
    for step in path:
        node = node[step]
    return node


weird_ids = st.sampled_from(
    [
        "",
        " ",
        "a/b",
        "/",
        "x" * 300,
        "ünï-cødé",
        "a.b",
        "$",
        "[0]",
        "a: b",
        "#c",
        "${env:" + UNSET_VAR + "}",
        "a\nb",
        "\t",
        "qwen3",
    ]
)
wrong_values = st.one_of(
    scalars,
    st.sampled_from(
        [
            0,
            -1,
            2**31,
            2**63,
            2**64,
            math.inf,
            -math.inf,
            math.nan,
            True,
            [],
            {},
            [None],
            {"x": 1},
            "${env:" + UNSET_VAR + "}",
            "${env:",
            "${env:1BAD}",
            "$${env:" + SET_VAR + "}",
        ]
    ),
    trees,
)


def section(config: Any, name: str) -> dict[Any, Any] | None:
    """``config[name]`` when earlier mutations left it a non-empty dict, else None."""
    body = config.get(name) if isinstance(config, dict) else None
    return body if isinstance(body, dict) and body else None


@st.composite
def near_valid_configs(draw: st.DrawFn) -> Any:
    """A valid config with zero to four mutations, so a check fails late or not at all."""
    config: Any = valid_config()
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        everything = list(paths(config))
        kind = draw(
            st.sampled_from(["drop", "add", "replace", "rename_model", "alias", "default", "env"])
        )
        models = section(config, "models")
        if kind == "drop" and len(everything) > 1:
            path = draw(st.sampled_from(everything[1:]))
            del at(config, path[:-1])[path[-1]]
        elif kind == "add":
            dicts = [p for p in everything if isinstance(at(config, p), dict)]
            if dicts:
                at(config, draw(st.sampled_from(dicts)))[draw(keys)] = draw(wrong_values)
        elif kind == "replace":
            path = draw(st.sampled_from(everything))
            if path:
                at(config, path[:-1])[path[-1]] = draw(wrong_values)
            else:
                config = draw(wrong_values)
        elif kind == "rename_model" and models:
            old = draw(st.sampled_from(sorted(models, key=repr)))
            models[draw(weird_ids | keys)] = models.pop(old)
        elif kind == "alias" and models:
            entry = models[draw(st.sampled_from(sorted(models, key=repr)))]
            # Aliases that collide with another model's id or alias, or with the model's own id.
            names = [k for k in models if isinstance(k, str)] + ["qwen3"]
            if isinstance(entry, dict):
                entry["aliases"] = draw(st.lists(st.sampled_from(names) | weird_ids, max_size=3))
        elif kind == "default" and (swapper := section(config, "swapper")) is not None:
            swapper["default_model"] = draw(
                st.sampled_from(["qwen3", "qwen3-8b", "tiny", "nowhere", ""]) | weird_ids | scalars
            )
        elif kind == "env":
            strings = [p for p in everything if p and isinstance(at(config, p), str)]
            if strings:
                path = draw(st.sampled_from(strings))
                at(config, path[:-1])[path[-1]] = draw(
                    st.sampled_from(
                        [
                            "${env:" + UNSET_VAR + "}",
                            "pre-${env:" + SET_VAR + "}-post",
                            "${env:" + SET_VAR + "}${env:" + UNSET_VAR + "}",
                            "${env:}",
                            "${ENV:X}",
                        ]
                    )
                )
    return config


# --- (c) text and bytes that are not (quite) YAML ---------------------------------------------

FRAGMENTS = [
    "---\n",
    "...\n",
    "--- !!map\n",
    "%YAML 1.1\n",
    "%TAG ! tag:x,2000:\n",
    "models:\n",
    "swapper:\n",
    "  qwen: ",
    "  - ",
    "? ",
    ": ",
    "&a ",
    "*a",
    "*nowhere",
    "<<: *a\n",
    "!!binary ",
    "!!python/object/apply:os.system ['true']\n",
    "!!set ",
    "!custom ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "\t",
    "\t- x\n",
    "'",
    '"',
    '"\\ud800"',
    '"\\x"',
    "|\n",
    ">-\n",
    "#",
    "\n",
    "  ",
    "\ufeff",
    "\x00",
    "\x85",
    "\u2028",
    "@",
    "`",
    "%",
    "1e999",
    "0x1F",
    "0o17",
    ".nan",
    "-.inf",
    "2001-12-14t21:59:43.10-05:00",
    "~",
    "null",
    "yes",
    "backend: llamacpp\n",
    "model_path: ${env:" + UNSET_VAR + "}\n",
]
GOOD_TEXT = dump(valid_config())

# Nesting beyond Python's recursion limit, up to and past libyaml's own limit of 1000; plain
# integers() favour small values, so the band in between is also sampled on purpose.
nesting = st.integers(1, 1100) | st.sampled_from([400, 600, 999, 1000, 1001])
nested_texts = st.builds(
    lambda depth, under: under + "[" * depth + "]" * depth + "\n",
    nesting,
    st.sampled_from(["", "server: ", "models: "]),
) | st.builds(
    lambda depth, under: under + "{a: " * depth + "1" + "}" * depth + "\n",
    nesting,
    st.sampled_from(["", "models: ", "swapper: "]),
)

raw_texts = st.one_of(
    nested_texts,
    st.text(max_size=200),
    st.text(alphabet="[]{}:,-?&*!|>'\"%@`#\t\n ab1", max_size=80),
    st.lists(st.sampled_from(FRAGMENTS), max_size=25).map("".join),
    # A good config with junk spliced in somewhere.
    st.tuples(st.integers(0, len(GOOD_TEXT)), st.lists(st.sampled_from(FRAGMENTS), max_size=4)).map(
        lambda cut: GOOD_TEXT[: cut[0]] + "".join(cut[1]) + GOOD_TEXT[cut[0] :]
    ),
)
raw_bytes = st.one_of(
    st.binary(max_size=200),
    # Valid YAML around bytes that are not UTF-8 (lone continuation bytes, overlongs, UTF-16).
    st.tuples(
        st.integers(0, len(GOOD_TEXT)),
        st.sampled_from(
            [
                b"\xff",
                b"\xfe\xff",
                b"\x80",
                b"\xc0\xaf",
                b"\xed\xa0\x80",
                b"\xf5\x80\x80\x80",
                b"\x00",
            ]
        ),
    ).map(lambda cut: GOOD_TEXT.encode()[: cut[0]] + cut[1] + GOOD_TEXT.encode()[cut[0] :]),
    st.text(max_size=60).map(lambda text: text.encode("utf-16")),
)


# --- the properties --------------------------------------------------------------------------


def fuzz(
    tmp_path: Path, strategy: st.SearchStrategy[Any], render: Callable[[Any], str | bytes]
) -> set[int]:
    """Run the property over ``strategy``; return the exit codes seen."""
    seen: set[int] = set()
    target = tmp_path / "fuzz.yaml"

    # Inner @given: one test-scoped tmp_path for all examples, each example overwrites the file.
    @FUZZ
    @given(strategy)
    def check(value: Any) -> None:
        content = render(value)
        # The file itself is the reproducer; a recursive tree's repr would say nothing useful.
        note(f"file content: {content[:3000]!r}")
        seen.add(assert_one_clear_line(target, *check_config(written(target, content))))

    check()
    return seen


def test_the_unmutated_base_config_is_valid(tmp_path: Path) -> None:
    # Otherwise every near-valid example would fail for the same dull reason.
    code, out, _ = check_config(written(tmp_path / "base.yaml", GOOD_TEXT))
    assert code == 0
    assert out.endswith("ok (2 models)\n")


def test_random_yaml_trees(tmp_path: Path) -> None:
    seen = fuzz(tmp_path, trees | section_trees | self_referencing_trees() | shared_trees(), dump)
    assert 2 in seen


def test_near_valid_configs(tmp_path: Path) -> None:
    seen = fuzz(tmp_path, near_valid_configs(), dump)
    # Zero or harmless mutations keep the config valid, so the ok line is exercised too.
    assert seen == {0, 2}


def test_text_that_is_not_yaml(tmp_path: Path) -> None:
    seen = fuzz(tmp_path, raw_texts, lambda text: text)
    assert 2 in seen


def test_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    seen = fuzz(tmp_path, raw_bytes, lambda data: data)
    assert 2 in seen


# Inputs found by hand or by the fuzzers above; fixed here so they run on every commit, in-process
# and through the real command.
NASTY: dict[str, str | bytes] = {
    "recursive-alias": "models: &a {m: *a}\n",
    # Deeper than Python's stack allows for a recursive walk, yet within libyaml's limit of 1000.
    "deep-nesting": "server: " + "[" * 600 + "]" * 600 + "\n",
    "newline-in-key": 'server: {"a\\nb": 1}\n',
    "newline-in-model-id": 'models: {"a\\nb": {backend: llamacpp}}\n',
    "not-utf8": GOOD_TEXT.encode() + b"\xff\xfe",
    "tabs-brackets-documents": "models:\n\t[qwen: {\n---\n--- x\n",
    "unset-env": "server: {host: '${env:" + UNSET_VAR + "}'}\n",
    "int-model-id": "models: {1: {backend: llamacpp, model_path: x}}\n",
}


@pytest.mark.parametrize("name", sorted(NASTY))
def test_nasty_inputs_in_process(tmp_path: Path, name: str) -> None:
    path = written(tmp_path / f"{name}.yaml", NASTY[name])
    assert assert_one_clear_line(path, *check_config(path)) == 2


@pytest.mark.parametrize(
    "name",
    ["recursive-alias", "deep-nesting", "newline-in-key", "not-utf8", "tabs-brackets-documents"],
)
def test_nasty_inputs_through_the_real_command(tmp_path: Path, name: str) -> None:
    path = written(tmp_path / f"{name}.yaml", NASTY[name])
    done = subprocess.run(
        [sys.executable, "-m", "swapper", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert assert_one_clear_line(path, done.returncode, done.stdout, done.stderr) == 2


def test_a_valid_config_through_the_real_command(tmp_path: Path) -> None:
    path = written(tmp_path / "good.yaml", GOOD_TEXT)
    done = subprocess.run(
        [sys.executable, "-m", "swapper", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert assert_one_clear_line(path, done.returncode, done.stdout, done.stderr) == 0
    assert done.stdout == f"{path}: ok (2 models)\n"
