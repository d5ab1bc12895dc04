"""Config errors name the file and the key path in one line; good configs load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from swapper.backends.registry import load_backends
from swapper.config import load_config
from swapper.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = load_backends().schemas()

GOOD = """\
swapper:
  mode: single-active
  max_concurrent_models: 1
  model_swap_timeout: 300
  gpu_enabled: true
  metal_acceleration: false
  default_model: qwen3
server:
  host: 127.0.0.1
  port: 8890
models:
  qwen3-8b:
    backend: llamacpp
    model_path: /models/Qwen3-8B-Q4_K_M.gguf
    ctx_size: 8192
    binary: llama-server
    args: ["--jinja"]
    aliases: [qwen3]
"""


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped GPU config reads its keys from the environment."""
    monkeypatch.setenv("SWAPPER_API_KEY", "test-api-key")
    monkeypatch.setenv("SWAPPER_ADMIN_KEY", "test-admin-key")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return path


def test_the_documented_keys_load(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), SCHEMAS)
    entry = config.models["qwen3-8b"]
    assert entry.ctx_size == 8192  # type: ignore[attr-defined]
    assert entry.args == ["--jinja"]  # type: ignore[attr-defined]
    assert config.swapper.default_model == "qwen3-8b"  # an alias resolves to the id
    assert config.resolve("qwen3") == "qwen3-8b"
    assert config.resolve("nope") is None
    assert config.server.port == 8890


@pytest.mark.parametrize(
    "path", ["config/swapper_config.yaml", "config/demo.yaml", "config/multi-active.example.yaml"]
)
def test_shipped_configs_are_valid(path: str) -> None:
    config = load_config(ROOT / path, SCHEMAS)
    assert config.swapper.default_model in config.models


def test_seed_models_are_in_the_gpu_config() -> None:
    config = load_config(ROOT / "config/swapper_config.yaml", SCHEMAS)
    assert config.swapper.default_model == "qwen3-8b"
    assert "qwen2.5-3b-instruct" in config.models


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("ctx_size: 8192", 'ctx_size: "big"', "$.models.qwen3-8b.ctx_size: expected int, got str"),
        (
            "ctx_size: 8192",
            "ctx_size: 8192\n    colour: red",
            "$.models.qwen3-8b.colour: unknown key",
        ),
        ("  port: 8890", "  port: 8890\n  tls: true", "$.server.tls: unknown key"),
        ("  port: 8890", "  port: 99999", "$.server.port: must be between 1 and 65535"),
        (
            "max_concurrent_models: 1",
            "max_concurrent_models: 0",
            "$.swapper.max_concurrent_models: must be >= 1",
        ),
        (
            "gpu_enabled: true",
            "gpu_enabled: true\n  vram_budget_mb: -5",
            "$.swapper.vram_budget_mb: must be a number > 0",
        ),
        (
            "ctx_size: 8192",
            "ctx_size: 8192\n    vram_mb: -1",
            "$.models.qwen3-8b.vram_mb: must be a number >= 0",
        ),
        (
            "ctx_size: 8192",
            "ctx_size: 8192\n    pinned: often",
            "$.models.qwen3-8b.pinned: expected bool",
        ),
        ("mode: single-active", "mode: round-robin", "$.swapper.mode: invalid enum value"),
        ("max_concurrent_models: 1", "max_concurrent_models: 2", "$.swapper.max_concurrent_models"),
        (
            "model_swap_timeout: 300",
            "model_swap_timeout: 0",
            "$.swapper.model_swap_timeout: must be a number > 0",
        ),
        (
            "gpu_enabled: true",
            "gpu_enabled: maybe",
            "$.swapper.gpu_enabled: expected bool, got str",
        ),
        ("default_model: qwen3", "default_model: llama", "$.swapper.default_model: 'llama' is not"),
        (
            "    model_path: /models/Qwen3-8B-Q4_K_M.gguf\n",
            "",
            "$.models.qwen3-8b.model_path: required key is missing",
        ),
        (
            "backend: llamacpp",
            "backend: tensorrt",
            "$.models.qwen3-8b.backend: unknown backend 'tensorrt'",
        ),
        (
            "aliases: [qwen3]",
            "aliases: qwen3",
            "$.models.qwen3-8b.aliases: expected array, got str",
        ),
        ('args: ["--jinja"]', "args: [1]", "$.models.qwen3-8b.args[0]: expected str, got int"),
        (
            "model_swap_timeout: 300",
            "model_swap_timeout: .nan",
            "model_swap_timeout: must be a number",
        ),
        ("ctx_size: 8192", "ctx_size: 99999999999", "$.models.qwen3-8b.ctx_size: must be between"),
        (
            "models:\n",
            'models:\n  "a b": {backend: llamacpp, model_path: x}\n',
            "$.models.a b: a model id must be non-empty, printable, without spaces",
        ),
        (
            "models:\n",
            "models:\n  qwen3: {backend: llamacpp, model_path: x}\n",
            "$.models.qwen3-8b.aliases: 'qwen3' is already the name of model 'qwen3'",
        ),
        # Aliases are names clients send, like model ids: the same rules.
        (
            "aliases: [qwen3]",
            'aliases: [qwen3, ""]',
            "$.models.qwen3-8b.aliases[1]: an alias must be non-empty, printable, without spaces",
        ),
        ("aliases: [qwen3]", 'aliases: ["qwen 3"]', "$.models.qwen3-8b.aliases[0]: an alias must"),
        (
            "aliases: [qwen3]",
            'aliases: ["org/qwen3"]',
            "$.models.qwen3-8b.aliases[0]: an alias must",
        ),
        (
            "aliases: [qwen3]",
            'aliases: ["qwen3\\x00"]',
            "$.models.qwen3-8b.aliases[0]: an alias must",
        ),
        # env: names and values a process environment can hold; YAML numbers must be quoted.
        ("aliases: [qwen3]", 'env: {"A=B": "1"}', "$.models.qwen3-8b.env: 'A=B' cannot name"),
        ("aliases: [qwen3]", 'env: {"": "1"}', "$.models.qwen3-8b.env: '' cannot name an"),
        (
            "aliases: [qwen3]",
            "env: {CUDA_VISIBLE_DEVICES: 0}",
            "$.models.qwen3-8b.env[...]: expected str, got int",
        ),
        ("aliases: [qwen3]", 'env: {A: "x\\x00"}', "$.models.qwen3-8b.env.A: a value cannot"),
        ("aliases: [qwen3]", "env: [A]", "$.models.qwen3-8b.env: expected a mapping, got array"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path, SCHEMAS)
    message = info.value.message
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty"),
        ("swapper: [\n", "invalid YAML: line 2"),
        ("- a\n- b\n", "$: expected a mapping, got array"),
        ("swapper: {}\nextra: 1\n", "$.extra: unknown key"),
    ],
)
def test_malformed_files(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), SCHEMAS)
    assert expected in info.value.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml", SCHEMAS)


def test_check_config_command_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path, GOOD)
    ok = subprocess.run(
        [sys.executable, "-m", "swapper", "check-config", str(good)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("ctx_size: 8192", 'ctx_size: "big"'))
    failed = subprocess.run(
        [sys.executable, "-m", "swapper", "check-config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 2
    assert failed.stderr.strip() == f"{bad}: $.models.qwen3-8b.ctx_size: expected int, got str"
    assert "Traceback" not in failed.stderr


def test_ttl_must_be_a_non_negative_number(tmp_path: Path) -> None:
    path = write(
        tmp_path, GOOD.replace("    aliases: [qwen3]", "    aliases: [qwen3]\n    ttl: -5")
    )
    with pytest.raises(ConfigError, match=r"\$\.models\.qwen3-8b\.ttl: must be a number >= 0"):
        load_config(path, SCHEMAS)
    path = write(
        tmp_path,
        GOOD.replace("  default_model: qwen3", "  default_model: qwen3\n  default_ttl: 600"),
    )
    assert load_config(path, SCHEMAS).swapper.default_ttl == 600


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            "{backend: vllm, model: m, gpu_memory_utilization: 1.5}",
            "$.models.x.gpu_memory_utilization: must be > 0 and <= 1",
        ),
        ("{backend: vllm, model: m, sleep_level: 3}", "$.models.x.sleep_level: invalid enum value"),
        ("{backend: vllm}", "$.models.x.model: required key is missing"),
        (
            "{backend: ollama, model: 'qwen3:8b', base_url: 'localhost:11434'}",
            "$.models.x.base_url: must start with http:// or https://",
        ),
        ("{backend: ollama, model: ' '}", "$.models.x.model: must name an Ollama tag"),
        (
            "{backend: ollama, model: 'qwen3:8b', keep_alive: -1}",
            "$.models.x.keep_alive: unknown key",
        ),
    ],
)
def test_ollama_and_vllm_entries_are_checked(tmp_path: Path, entry: str, expected: str) -> None:
    path = write(tmp_path, f"models:\n  x: {entry}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, SCHEMAS)
    assert info.value.message.startswith(f"{path}: ")
    assert expected in info.value.message and "\n" not in info.value.message
