"""``swapper top`` in a real terminal (tmux) against a real swapper on real llama-servers."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MESSAGES, SwapperProcess, seconds, tiny_model, wait_until

pytestmark = pytest.mark.integration

TMUX = "/usr/bin/tmux"
KEY = "top-admin-key"


class Terminal:
    """One tmux session on a server socket of its own, running one command."""

    def __init__(self, socket: Path, command: list[str], env: dict[str, str]) -> None:
        self.base = [TMUX, "-S", str(socket)]
        exports = " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())
        self.tmux(
            "new-session", "-d", "-x", "120", "-y", "40", "-s", "top",
            f"env {exports} {shlex.join(command)}",
        )  # fmt: skip
        # Keep the pane once the command ends, to read its exit status.
        self.tmux("set-option", "-t", "top", "remain-on-exit", "on")

    def tmux(self, *args: str) -> str:
        done = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=30, check=False
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def wait_for(self, *texts: str, timeout: float = 30) -> str:
        return self.wait_line(lambda screen: all(t in screen for t in texts), texts, timeout)

    def wait_line(self, shows: Callable[[str], bool], what: Any, timeout: float = 30) -> str:
        """The screen once ``shows(screen)``; on a timeout, the error shows the last screen."""
        last = [""]

        def seen() -> str | None:
            last[0] = self.screen()
            return last[0] if shows(last[0]) else None

        try:
            return str(wait_until(seen, seconds(timeout), f"the terminal to show {what}"))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; it shows:\n{last[0]}") from None

    def wait_exit(self, what: str) -> int:
        """The command's exit status once it ended; on a timeout, the error shows the screen."""
        try:
            return int(wait_until(self.exit_status, seconds(10), what)[0])
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the terminal shows:\n{self.screen()}") from None

    def exit_status(self) -> tuple[int] | None:
        """(status,) once the command ended (-N: killed by signal N), else None."""
        shown = self.tmux(
            "display-message", "-p", "-t", "top", "#{pane_dead}:#{pane_dead_status}:#{pane_dead_signal}:#{pane_pid}"
        )  # fmt: skip
        dead, status, killed, pid = shown.strip().split(":")
        if dead != "1":
            return None
        if status or killed:
            return (int(status) if status else -int(killed),)
        # tmux saw the terminal close but has not reaped the process yet: a zombie's exit
        # status is still in /proc/PID/stat (its last field, in waitpid's encoding).
        try:
            code = int(Path(f"/proc/{pid}/stat").read_text().rsplit(" ", 1)[1])
        except (OSError, ValueError, IndexError):
            return None
        return (code >> 8,) if code & 0x7F == 0 else (-(code & 0x7F),)

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30, check=False)


def row(screen: str, *cells: str) -> str | None:
    """The first table row holding ``cells`` (whole cells, in this order)."""
    for line in screen.splitlines():
        shown = iter(cell.strip() for cell in line.split("│")[1:-1])
        if all(cell in shown for cell in cells):  # (consumes: a subsequence, in order)
            return line
    return None


@pytest.fixture
def served(swapper_factory: Any, llama_server: str) -> Iterator[SwapperProcess]:
    """swapper with tiny-a and tiny-b behind an admin key."""
    workdir: Path = swapper_factory.workdir
    config = {
        "swapper": {"gpu_enabled": False, "model_swap_timeout": 30, "stop_timeout": 5},
        "server": {"host": "127.0.0.1", "port": 1, "admin_api_keys": [KEY]},
        "models": {
            "tiny-a": tiny_model(workdir, "a", ctx_size=512),
            "tiny-b": tiny_model(workdir, "b", ctx_size=512),
        },
    }
    process = SwapperProcess(config, workdir, llama_server)
    process.http.headers["Authorization"] = f"Bearer {KEY}"
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Any]:
    opened: list[Terminal] = []

    def open_top(*args: str) -> Terminal:
        command = [sys.executable, "-m", "swapper", "top", *args]
        env = {"TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"}
        opened.append(Terminal(tmp_path / f"tmux-{len(opened)}", command, env))
        return opened[-1]

    yield open_top
    for term in opened:
        term.close()


def test_top_shows_models_swaps_and_tokens_live_and_quits_on_q(
    served: SwapperProcess, terminal: Any
) -> None:
    swapper = served
    term = terminal("--url", swapper.url, "--key", KEY)
    screen = term.wait_for("swapper top", "tiny-a", "tiny-b", "UNLOADED", "no GPU seen")
    assert "Last swaps" in screen

    chat = swapper.http.post(
        "/v1/chat/completions",
        json={"model": "tiny-a", "messages": MESSAGES, "max_tokens": 4},
    )
    assert chat.status_code == 200
    # Seen live: tiny-a loaded, its swap, and its tokens/s as /activity reports it.
    speed = swapper.http.get("/activity").json()["models"]["tiny-a"]["tokens_per_s"]
    assert speed > 0

    term.wait_line(
        lambda screen: bool(row(screen, "tiny-a", "LOADED", f"{speed:.1f}")),
        f"tiny-a LOADED at {speed:.1f} tok/s",
    )
    term.wait_line(lambda screen: bool(row(screen, "–", "tiny-a", "request")), "the swap – → a")

    assert swapper.http.post("/models/tiny-b/load").status_code == 200
    term.wait_line(lambda screen: bool(row(screen, "tiny-a", "tiny-b", "manual")), "a → b")
    assert row(term.screen(), "tiny-b", "LOADED") and row(term.screen(), "tiny-a", "UNLOADED")

    term.tmux("send-keys", "-t", "top", "q")
    assert term.wait_exit("top to quit on q") == 0
    assert "Traceback" not in term.screen()


def test_top_quits_on_ctrl_c(served: SwapperProcess, terminal: Any) -> None:
    term = terminal("--url", served.url, "--key", KEY)
    term.wait_for("tiny-a")
    term.tmux("send-keys", "-t", "top", "C-c")
    assert term.wait_exit("top to quit on Ctrl-C") == 0
    assert "Traceback" not in term.screen()


def test_top_without_a_key_is_one_line(served: SwapperProcess) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "swapper", "top", "--url", served.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "swapper: Missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY' "
        "(pass --key or set $SWAPPER_API_KEY)"
    ]
