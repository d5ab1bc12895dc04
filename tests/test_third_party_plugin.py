"""A third-party backend package, installed with an entry point, serves through swapper."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from typing import Any

import pytest

from swapper.backends.registry import load_backends
from swapper.cli import main
from tests.conftest import MESSAGES, sdk


def test_swapper_plugins_lists_backends_and_their_packages() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "swapper", "plugins"], capture_output=True, text=True, check=False
    )
    assert listed.returncode == 0, listed.stderr
    rows = dict(line.split("\t") for line in listed.stdout.splitlines())
    assert rows["llamacpp"].startswith("swapper ")
    assert rows["example"] == "swapper-example-backend 0.1.0 (swapper_example_backend)"


@pytest.mark.integration
def test_a_config_can_name_the_plugins_backend(swapper_factory: Any) -> None:
    gguf = str(swapper_factory.workdir / "tiny-b.gguf")
    swapper = swapper_factory(models={"plug": {"backend": "example", "gguf": gguf}})
    reply = sdk(swapper).chat.completions.create(model="plug", max_tokens=3, messages=MESSAGES)
    assert reply.choices[0].message.role == "assistant"
    status = swapper.model("plug")
    assert status["status"] == "LOADED" and status["backend"] == "example"


def test_a_plugin_that_fails_to_import_is_reported_and_the_others_load(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = importlib.metadata.entry_points
    broken = importlib.metadata.EntryPoint(
        name="broken", value="swapper_no_such_module_xyz", group="swapper.backends"
    )

    def with_a_broken_one(**kwargs: Any) -> Any:
        return [broken, *real(**kwargs)]

    monkeypatch.setattr(importlib.metadata, "entry_points", with_a_broken_one)
    registry = load_backends()
    assert {"llamacpp", "example"} <= set(registry.backends)
    assert "broken" in registry.failures
    assert "ModuleNotFoundError" in registry.failures["broken"]
    assert "backend plugin 'broken'" in caplog.text and "failed to load" in caplog.text
    assert main(["plugins"]) == 1  # the command says so too, after listing what did load
    out, err = capsys.readouterr()
    assert "example\tswapper-example-backend" in out
    assert err.startswith("broken\tFAILED: ")
