"""``swapper top``: a live terminal view of a running swapper, refreshed every second.

Models with their status, in-flight requests, queue and tokens/s; the last swaps; GPU memory.
It reads ``/status`` and ``/activity`` through :mod:`swapper.operator_client` and draws with
rich's ``Live``. ``q`` or Ctrl-C quits. A failure to reach swapper at the start is one
``swapper: ...`` line and exit status 1; once running, a failed refresh is shown in the view
and tried again a second later.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from swapper.operator_client import Client, CommandError

__all__ = ["add_top_command", "render", "run_top"]

REFRESH = 1.0
SWAPS_SHOWN = 8
_STYLE = {"LOADED": "green", "LOADING": "yellow", "UNLOADING": "yellow", "FAILED": "red"}


def _cell(value: Any, fmt: str = "{}") -> str:
    return "–" if value is None else fmt.format(value)


def _clock(iso: str | None) -> str:
    if not iso:
        return "–"
    try:
        when = dt.datetime.fromisoformat(iso)
    except ValueError:
        return "?"
    return when.astimezone().strftime("%H:%M:%S")


def render(
    status: dict[str, Any], activity: dict[str, Any], url: str, problem: str = ""
) -> RenderableType:
    """The whole view, from a ``/status`` and an ``/activity`` document."""
    resident = ", ".join(status.get("resident") or []) or "none"
    title = Text.assemble(
        ("swapper top", "bold"),
        f"  {url}  ·  {status.get('mode', '?')}  ·  resident: {resident}  ·  ",
        (time.strftime("%H:%M:%S"), "dim"),
        ("   q quits", "dim"),
    )
    summary = activity.get("models") or {}
    models = Table(title="Models", title_justify="left", expand=True)
    for column in ("model", "status", "in flight", "queued", "tok/s", "loads today", "last used"):
        models.add_column(column, justify="left" if column in ("model", "status") else "right")
    for model_id, model in (status.get("models") or {}).items():
        totals = summary.get(model_id) or {}
        state = str(model.get("status", "?"))
        models.add_row(
            model_id,
            Text(state, style=_STYLE.get(state, "dim")),
            _cell(model.get("in_flight")),
            _cell(model.get("queued")),
            _cell(totals.get("tokens_per_s"), "{:.1f}"),
            _cell(totals.get("loads_today")),
            _clock(model.get("last_used")),
        )
    swaps = Table(title="Last swaps", title_justify="left", expand=True)
    for column in ("time", "from", "to", "reason", "seconds"):
        swaps.add_column(column, justify="right" if column == "seconds" else "left")
    for swap in reversed((activity.get("swaps") or [])[-SWAPS_SHOWN:]):
        swaps.add_row(
            _clock(swap.get("time")),
            swap.get("from") or "–",
            str(swap.get("to")),
            str(swap.get("reason")),
            _cell(swap.get("seconds"), "{:.2f}"),
        )
    parts: list[RenderableType] = [title, models, swaps, Text("GPU memory", style="italic")]
    gpu = status.get("gpu") or {}
    if not gpu.get("gpus"):
        parts.append(Text("  no GPU seen (NVML unavailable)", style="dim"))
    for card in gpu.get("gpus") or []:
        used, total = card.get("used_mb", 0), max(1, card.get("total_mb", 0))
        filled = round(30 * used / total)
        parts.append(
            Text.assemble(
                f"  GPU {card.get('index')} {card.get('name')}  ",
                ("█" * filled, "blue"),
                ("░" * (30 - filled), "dim"),
                f"  {used} / {total} MiB",
            )
        )
    if problem:
        parts.append(Text(problem, style="red"))
    return Group(*parts)


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str]]:
    """A function waiting up to N seconds for a key press (``""`` if none); on a terminal, the
    terminal is put in cbreak mode (keys arrive unbuffered, unechoed) and restored after."""
    stdin = sys.stdin
    if not stdin.isatty() or os.name != "posix":

        def sleep(seconds: float) -> str:
            time.sleep(seconds)  # no keys to read: Ctrl-C is the way out
            return ""

        yield sleep
        return
    import termios
    import tty

    fd = stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def wait(seconds: float) -> str:
        ready, _, _ = select.select([fd], [], [], seconds)
        return os.read(fd, 32).decode(errors="replace") if ready else ""

    try:
        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _read(client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    status = client.get("/status")
    activity = client.get("/activity", params={"limit": SWAPS_SHOWN})
    if not isinstance(status, dict) or not isinstance(activity, dict):
        raise CommandError(f"{client.url} did not answer swapper's documents; is this swapper?")
    return status, activity


@contextlib.contextmanager
def _interrupts() -> Iterator[threading.Event]:
    """An event set by Ctrl-C (SIGINT) instead of a KeyboardInterrupt: raised at a random
    point (inside an HTTP read, or while rich leaves the alternate screen) it could end top
    with a traceback or by the signal; as a flag, the loop sees it within a second."""
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.set())
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def run_top(url: str, key: str | None, *, console: Console | None = None) -> None:
    """Show the live view until ``q`` or Ctrl-C."""
    from rich.live import Live

    console = console or Console()
    client = Client(url, key, "pass --key or set $SWAPPER_API_KEY")
    try:
        status, activity = _read(client)  # a wrong URL or key: one line, before any drawing
        with (
            _interrupts() as interrupted,
            _keys() as wait,
            Live(console=console, screen=True, auto_refresh=False) as live,
        ):
            problem = ""
            while not interrupted.is_set():
                live.update(render(status, activity, client.url, problem), refresh=True)
                deadline = time.monotonic() + REFRESH
                while (left := deadline - time.monotonic()) > 0 and not interrupted.is_set():
                    if "q" in wait(min(left, 0.25)).lower():
                        return
                if interrupted.is_set():
                    return
                try:
                    status, activity = _read(client)
                    problem = ""
                except CommandError as exc:
                    problem = f"{time.strftime('%H:%M:%S')} {exc.message}; retrying"
    except KeyboardInterrupt:  # Ctrl-C before the view was up
        return
    finally:
        client.close()


def add_top_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    default_url: str,
) -> None:
    """Register ``swapper top`` (``--url``, ``--key`` as the other operators' commands)."""

    def run(args: argparse.Namespace) -> int:
        url = args.url or os.environ.get("SWAPPER_URL") or default_url
        key = args.key or os.environ.get("SWAPPER_API_KEY") or os.environ.get("SWAPPER_ADMIN_KEY")
        try:
            run_top(url, key)
        except CommandError as exc:
            print(f"swapper: {exc.message}", file=sys.stderr)
            return exc.code
        return 0

    top = commands.add_parser(
        "top", parents=[common], help="watch a running swapper live (q or Ctrl-C quits)"
    )
    top.set_defaults(run=run)
