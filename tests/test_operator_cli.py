"""The operators' commands (status, load, unload, logs) against a real running swapper."""

from __future__ import annotations

import datetime as dt
import io
import os
import queue
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest
from rich.console import Console

from swapper import operator_cli, operator_client, operator_format
from swapper.cli import main
from tests.conftest import free_port, tiny_model, wait_until

ADMIN_KEY, PLAIN_KEY = "admin-secret", "plain-secret"


def swapper_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m swapper ARGS`` with stdout and stderr captured (so not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "swapper", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(env),
        check=False,
    )


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # Nothing from the caller's shell may pick the address, the key or rich's terminal mode.
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "SWAPPER_URL",
            "SWAPPER_API_KEY",
            "SWAPPER_ADMIN_KEY",
            "FORCE_COLOR",
            "TTY_COMPATIBLE",
        )
    }
    return {**env, **(extra or {})}


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("swapper: "), result.stderr
    return lines[0]


# -- rendering, on documents ----------------------------------------------------------------------

NOW = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def model(status: str, **fields: Any) -> dict[str, Any]:
    return {
        "status": status,
        "backend": "llamacpp",
        "pid": None,
        "port": None,
        "loaded_at": None,
        "last_error": None,
        "in_flight": 0,
        "queued": 0,
        "failures": 0,
        "retry_at": None,
        **fields,
    }


def test_rows_show_pid_vram_and_idle_time_and_tolerate_a_swapper_without_them() -> None:
    doc = {
        "mode": "single-active",
        "active_model": "a",
        "models": {
            "a": model(
                "LOADED",
                pid=41,
                loaded_at="2025-01-01T11:00:00.000+00:00",
                last_used="2025-01-01T11:58:55.000+00:00",
                vram_mb=812.4,
            ),
            "a2": model(
                "LOADED",
                pid=40,
                loaded_at="2024-12-30T09:00:00.000+00:00",
                last_used="2024-12-30T09:30:00.000+00:00",
                vram_mb=24000,
            ),
            "b": model(
                "LOADED",
                pid=42,
                loaded_at="2025-01-01T11:59:30.000+00:00",
                last_used="2025-01-01T10:00:00.000+00:00",
                vram_mb=None,
            ),
            "c": model("LOADED", pid=43, in_flight=2, last_used="2025-01-01T11:00:00.000+00:00"),
            "d": model("UNLOADED", last_used="2025-01-01T09:30:00.000+00:00"),
            "e": model("FAILED"),  # an older swapper: no vram_mb, no last_used
        },
    }
    assert operator_cli.status_rows(doc, NOW) == [
        ["a", "LOADED", "llamacpp", "41", "812 MiB", "1m05s"],
        ["a2", "LOADED", "llamacpp", "40", "24000 MiB", "2d02h"],
        ["b", "LOADED", "llamacpp", "42", "-", "30s"],  # idle since its load, not its last use
        ["c", "LOADED", "llamacpp", "43", "-", "-"],  # requests in flight: not idle
        ["d", "UNLOADED", "llamacpp", "-", "-", "-"],  # idle means holding the GPU idle
        ["e", "FAILED", "llamacpp", "-", "-", "-"],
    ]


def test_notes_name_failed_models_and_the_gpus() -> None:
    doc = {
        "models": {
            "x": model(
                "FAILED",
                last_error="load failed: boom\nlast line",
                retry_at="2025-01-01T12:00:30.000+00:00",
            ),
            "y": model("UNLOADED"),
        },
        "gpu": {
            "available": True,
            "gpus": [
                {
                    "index": 0,
                    "name": "NVIDIA H100",
                    "total_mb": 81559,
                    "used_mb": 1024,
                    "free_mb": 80535,
                }
            ],
        },
    }
    retry = dt.datetime(2025, 1, 1, 12, 0, 30, tzinfo=dt.UTC).astimezone()
    assert operator_format.notes(doc) == [
        f"x: load failed: boom (next try at {retry:%H:%M:%S})",
        "gpu 0 NVIDIA H100: 1024 of 81559 MiB used, 80535 MiB free",
    ]
    assert operator_format.notes({"models": {}, "gpu": {"available": False, "gpus": []}}) == [
        "gpu: none visible to swapper"
    ]
    assert operator_format.notes({"models": {}}) == []  # a swapper that reports no GPUs


def test_plain_progress_prints_at_most_once_a_second() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False)
    with operator_format.Progress(console, "loading", "m") as progress:
        for tenth in range(1, 26):
            progress.update("LOADING", tenth / 10)
    assert out.getvalue().splitlines() == [
        "loading m... 1.0s (LOADING)",
        "loading m... 2.0s (LOADING)",
    ]


def test_server_sent_events_yield_data_and_skip_pings() -> None:
    lines = [
        ": ping",
        "",
        'data: {"line": "one"}',
        "",
        "event: x",
        'data: {"line": "two"}',
        "",
        ": ping",
        "",
    ]
    assert list(operator_client.sse_data(iter(lines))) == ['{"line": "one"}', '{"line": "two"}']


# -- command line, without a swapper --------------------------------------------------------------


def test_unreachable_swapper_is_one_line_and_exit_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for command in (
        ["status"],
        ["load", "tiny-a"],
        ["unload", "tiny-a"],
        ["logs", "tiny-a"],
        ["logs", "tiny-a", "-f"],
    ):
        line = one_error_line(swapper_cli(*command, "--url", url))
        assert line == f"swapper: cannot reach {url}: connection refused"


def test_url_comes_from_the_environment() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = one_error_line(swapper_cli("status", env={"SWAPPER_URL": url}))
    assert url in line


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    result = swapper_cli("status", "--url", "not-a-url")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "swapper: invalid URL 'not-a-url': expected http://HOST:PORT"
    ]
    with pytest.raises(SystemExit) as info:
        main(["load"])  # no model
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["logs", "m", "-n", "-3"])
    assert info.value.code == 2
    # A leading option still means `serve`, so `swapper --config X` is unchanged.
    assert main(["--config", "/nonexistent/swapper.yaml"]) == 2
    assert "/nonexistent/swapper.yaml" in capsys.readouterr().err


# -- against a real swapper -----------------------------------------------------------------------


@pytest.mark.integration
def test_status_lists_every_model_in_plain_text(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    assert swapper.http.post("/models/tiny-a/load").status_code == 200
    pid = swapper.model("tiny-a")["pid"]
    result = swapper_cli("status", "--url", swapper.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "mode: single-active  active: tiny-a"
    assert lines[1].split() == ["MODEL", "STATUS", "BACKEND", "PID", "VRAM", "IDLE"]
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert rows["tiny-a"][:4] == ["tiny-a", "LOADED", "llamacpp", str(pid)]
    assert rows["tiny-b"] == ["tiny-b", "UNLOADED", "llamacpp", "-", "-", "-"]
    assert rows["tiny-c"][:2] == ["tiny-c", "UNLOADED"]
    assert not any(char in result.stdout for char in "┃━│\x1b")  # plain: no boxes, no colour


@pytest.mark.integration
def test_status_is_a_rich_table_on_a_terminal(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    out = io.StringIO()
    operator_cli.show_status(
        swapper.url, None, console=Console(file=out, force_terminal=True, width=120)
    )
    text = out.getvalue()
    assert "\x1b[" in text and "┃" in text  # colour and a box
    header = next(line for line in text.splitlines() if "MODEL" in line)
    for column in ("MODEL", "STATUS", "BACKEND", "PID", "VRAM", "IDLE"):
        assert column in header
    for model_id in ("tiny-a", "tiny-b", "tiny-c"):
        assert model_id in text


@pytest.mark.integration
def test_status_json_is_the_status_document(
    swapper_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    swapper = swapper_factory()
    assert main(["status", "--url", swapper.url, "--json"]) == 0
    import json

    assert set(json.loads(capsys.readouterr().out)["models"]) == {"tiny-a", "tiny-b", "tiny-c"}


@pytest.mark.integration
def test_load_and_unload(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    loaded = swapper_cli("load", "tiny-b", "--url", swapper.url)
    assert loaded.returncode == 0, loaded.stderr
    status = swapper.model("tiny-b")
    assert status["status"] == "LOADED"
    assert loaded.stdout.startswith(f"tiny-b LOADED (pid {status['pid']}, ")
    assert "Traceback" not in loaded.stderr

    by_alias = swapper_cli("load", "c", "--url", swapper.url)  # swaps b out for c
    assert by_alias.returncode == 0, by_alias.stderr
    assert by_alias.stdout.startswith("tiny-c LOADED")
    assert swapper.model("tiny-b")["status"] == "UNLOADED"

    unloaded = swapper_cli("unload", "tiny-c", "--url", swapper.url)
    assert unloaded.returncode == 0, unloaded.stderr
    assert unloaded.stdout.startswith("tiny-c UNLOADED")
    assert swapper.model("tiny-c")["status"] == "UNLOADED"
    assert swapper.backends() == []


@pytest.mark.integration
def test_load_in_process_shows_a_spinner_on_a_terminal(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    out, err = io.StringIO(), io.StringIO()
    doc = operator_cli.load_model(
        swapper.url,
        None,
        "tiny-a",
        console=Console(file=out, force_terminal=False),
        progress=Console(file=err, force_terminal=True),
    )
    assert doc["status"] == "LOADED" and swapper.model("tiny-a")["status"] == "LOADED"
    assert out.getvalue().startswith("tiny-a LOADED")


@pytest.mark.integration
def test_unknown_model_is_the_404_message(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    for command in (["load", "nope"], ["unload", "nope"], ["logs", "nope"]):
        line = one_error_line(swapper_cli(*command, "--url", swapper.url))
        assert line == "swapper: The model 'nope' does not exist"


@pytest.mark.integration
def test_failed_load_shows_the_error_then_the_backends_last_lines(swapper_factory: Any) -> None:
    broken = swapper_factory.workdir / "not-a-model.gguf"
    broken.write_bytes(b"not a GGUF model")  # passes the preflight; llama-server refuses it
    swapper = swapper_factory(models={"broken": {"backend": "llamacpp", "model_path": str(broken)}})
    result = swapper_cli("load", "broken", "--url", swapper.url)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    first, *rest = result.stderr.splitlines()
    assert first.startswith("swapper: Model 'broken' failed to load: backend process exited")
    assert rest and all(line.startswith("  ") for line in rest)
    status = swapper_cli("status", "--url", swapper.url)
    assert "broken: load failed: backend process exited" in status.stdout


@pytest.mark.integration
def test_keys_plain_and_admin(swapper_factory: Any) -> None:
    swapper = swapper_factory(
        models={"tiny-a": tiny_model(swapper_factory.workdir, "a", ctx_size=512)},
        server={"api_keys": [PLAIN_KEY], "admin_api_keys": [ADMIN_KEY]},
    )
    url = ["--url", swapper.url]
    line = one_error_line(swapper_cli("status", *url))
    assert line.startswith("swapper: Missing API key") and "SWAPPER_API_KEY" in line
    assert "Invalid API key" in one_error_line(swapper_cli("status", *url, "--key", "wrong"))
    assert swapper_cli("status", *url, env={"SWAPPER_API_KEY": PLAIN_KEY}).returncode == 0

    line = one_error_line(swapper_cli("load", "tiny-a", *url, "--key", PLAIN_KEY))
    assert line.startswith("swapper: This endpoint needs a key from server.admin_api_keys")
    assert PLAIN_KEY not in line

    # load prefers $SWAPPER_ADMIN_KEY over $SWAPPER_API_KEY
    both = {"SWAPPER_API_KEY": PLAIN_KEY, "SWAPPER_ADMIN_KEY": ADMIN_KEY}
    loaded = swapper_cli("load", "tiny-a", *url, env=both)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith("tiny-a LOADED")
    assert swapper_cli("unload", "tiny-a", *url, "--key", ADMIN_KEY).returncode == 0


@pytest.mark.integration
def test_logs_print_the_backends_output(swapper_factory: Any) -> None:
    swapper = swapper_factory()
    assert swapper.http.post("/models/tiny-a/load").status_code == 200
    result = swapper_cli("logs", "tiny-a", "--url", swapper.url)
    assert result.returncode == 0, result.stderr
    port = swapper.model("tiny-a")["port"]
    assert f"listening on http://127.0.0.1:{port}" in result.stdout  # llama-server's own line
    few = swapper_cli("logs", "a", "-n", "3", "--url", swapper.url)
    assert few.returncode == 0 and len(few.stdout.splitlines()) == 3
    assert few.stdout.splitlines() == result.stdout.splitlines()[-3:]


@pytest.mark.integration
def test_logs_follow_prints_the_tail_and_new_lines_then_stops_on_ctrl_c(
    swapper_factory: Any,
) -> None:
    swapper = swapper_factory()
    assert swapper.http.post("/models/tiny-a/load").status_code == 200
    proc = subprocess.Popen(
        [sys.executable, "-m", "swapper", "logs", "tiny-a", "-f", "-n", "5", "--url", swapper.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    def arrived(count: int) -> bool:
        while not lines.empty():
            seen.append(lines.get())
        return len(seen) >= count

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: arrived(5), 30, "the tail of tiny-a's log")
        # A new line while following: a request makes llama-server log.
        swapper.http.post(
            "/v1/completions", json={"model": "tiny-a", "prompt": "x", "max_tokens": 2}
        )
        wait_until(lambda: arrived(6), 30, "a new line of tiny-a's log")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code in (0, 130)
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()


def test_the_header_lists_every_resident_model_in_multi_active_mode() -> None:
    doc = {
        "mode": "multi-active",
        "active_model": "b",
        "resident": ["a", "b"],
        "models": {
            "a": model("LOADED", pid=41),
            "b": model("LOADED", pid=42),
            "c": model("SLEEPING", pid=43),
        },
    }
    assert operator_format.header(doc) == "mode: multi-active  resident: a, b"
    assert operator_cli.status_rows(doc, NOW)[2][:4] == ["c", "SLEEPING", "llamacpp", "43"]
