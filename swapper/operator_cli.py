"""The operators' commands against a running swapper: ``status``, ``load``, ``unload``, ``logs``.

They speak swapper's HTTP API (``/status``, ``/models/{id}/load|unload|logs``) through
:mod:`swapper.operator_client` and render with :mod:`swapper.operator_format` (rich on a
terminal, plain text otherwise). Every failure is one ``swapper: ...`` line on stderr and exit
status 1 (2 for a bad command line), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import httpx
from rich.console import Console
from rich.text import Text

from swapper.operator_client import (
    WAIT_TIMEOUT,
    Client,
    CommandError,
    model_path,
    sse_data,
)
from swapper.operator_format import (
    Progress,
    header,
    notes,
    plain_table,
    rich_table,
    status_columns,
    status_rows,
    summary,
    write,
)
from swapper.top import add_top_command

__all__ = [
    "DEFAULT_URL",
    "CommandError",
    "add_commands",
    "load_model",
    "show_logs",
    "show_status",
    "status_rows",
    "unload_model",
]

DEFAULT_URL = "http://127.0.0.1:8890"
_POLL = 0.2


def show_status(
    url: str, key: str | None, *, as_json: bool = False, console: Console | None = None
) -> None:
    """Print every model's status: a rich table on a terminal, plain columns otherwise."""
    console = console or Console()
    client = Client(url, key, "pass --key or set $SWAPPER_API_KEY")
    try:
        doc = client.get("/status")
    finally:
        client.close()
    if not isinstance(doc, dict):
        raise CommandError(f"{url}/status did not answer a status document; is this swapper?")
    if as_json:
        write(console, json.dumps(doc, indent=2))
        return
    rows = status_rows(doc)
    if console.is_terminal:
        console.print(rich_table(doc, rows))
        for note in notes(doc):
            console.print(Text(note, style="red" if not note.startswith("gpu") else "dim"))
        return
    write(console, "\n".join([header(doc), *plain_table(rows, status_columns(doc)), *notes(doc)]))


# -- load / unload ---------------------------------------------------------------------------------


def _phase(doc: Any, model: str) -> str:
    """What the wait is at: the model's status, or the model it waits for."""
    if not isinstance(doc, dict):
        return ""
    models = doc.get("models") or {}
    active = doc.get("active_model")
    if active and active != model and active in models:
        return f"waiting for {active} ({models[active].get('status', '?')})"
    return str(models.get(model, {}).get("status", ""))


def _wait_for(
    url: str, key: str | None, model: str, action: str, progress: Console
) -> tuple[dict[str, Any], float]:
    """POST load/unload and show progress from ``/status`` while swapper answers."""
    hint = "pass --key or set $SWAPPER_ADMIN_KEY"
    client, poller = Client(url, key, hint), Client(url, key, hint)
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["doc"] = client.post(model_path(model, action), timeout=WAIT_TIMEOUT)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread as is
            outcome["error"] = exc

    # The request runs in a daemon thread so the main thread can poll, and so Ctrl-C ends the
    # command at once instead of waiting for swapper's answer.
    thread = threading.Thread(target=call, name=f"swapper-{action}", daemon=True)
    started = time.monotonic()
    verb = {"load": "loading", "unload": "unloading"}[action]
    try:
        thread.start()
        with Progress(progress, verb, model) as shown:
            while True:
                thread.join(_POLL)
                if not thread.is_alive():
                    break
                try:
                    status = poller.get("/status", timeout=httpx.Timeout(2.0))
                except CommandError:
                    status = None  # the POST reports what went wrong
                shown.update(_phase(status, model), time.monotonic() - started)
    finally:
        poller.close()
    client.close()
    if "error" in outcome:
        raise outcome["error"]
    doc = outcome.get("doc")
    if not isinstance(doc, dict):
        raise CommandError(f"{url}{model_path(model, action)} did not answer a model status")
    return doc, time.monotonic() - started


def load_model(
    url: str,
    key: str | None,
    model: str,
    *,
    console: Console | None = None,
    progress: Console | None = None,
) -> dict[str, Any]:
    """Make ``model`` resident, showing progress while swapper loads it; return its status."""
    doc, elapsed = _wait_for(url, key, model, "load", progress or Console(stderr=True))
    write(console or Console(), summary(doc, model, elapsed))
    return doc


def unload_model(
    url: str,
    key: str | None,
    model: str,
    *,
    console: Console | None = None,
    progress: Console | None = None,
) -> dict[str, Any]:
    """Unload ``model`` once its in-flight requests finish; return its status."""
    doc, elapsed = _wait_for(url, key, model, "unload", progress or Console(stderr=True))
    write(console or Console(), summary(doc, model, elapsed))
    return doc


# -- logs ------------------------------------------------------------------------------------------


def show_logs(
    url: str,
    key: str | None,
    model: str,
    *,
    follow: bool = False,
    lines: int = 200,
    out: TextIO | None = None,
) -> None:
    """Print the tail of a model's backend output; with ``follow``, then new lines until Ctrl-C."""
    out = out or sys.stdout
    client = Client(url, key, "pass --key or set $SWAPPER_API_KEY")
    try:
        if not follow:
            doc = client.get(model_path(model, "logs"), params={"lines": lines})
            for line in doc.get("lines", []) if isinstance(doc, dict) else []:
                out.write(f"{line}\n")
            out.flush()
            return
        try:
            events = client.stream_lines(
                model_path(model, "logs"), params={"lines": lines, "follow": 1}
            )
            for data in sse_data(events):
                try:
                    line = json.loads(data)["line"]
                except (ValueError, KeyError, TypeError):
                    continue  # not a log line: nothing to print
                out.write(f"{line}\n")
                out.flush()  # a follower wants each line as it comes
        except KeyboardInterrupt:
            return  # Ctrl-C is how a follow ends
        # swapper never ends a follow by itself: it is shutting down, or something cut the link.
        raise CommandError(f"{client.url} closed the stream")
    finally:
        client.close()


# -- command line ----------------------------------------------------------------------------------


def _env(*names: str) -> str | None:
    for name in names:
        if value := os.environ.get(name):
            return value
    return None


def _run(action: Callable[[], object]) -> int:
    """Run a command: errors become one line on stderr and an exit status."""
    try:
        action()
    except CommandError as exc:
        first, *rest = exc.message.splitlines() or [""]
        # A failed load carries the backend's last output lines: indented under the error.
        print(f"swapper: {first}", *[f"  {line}" for line in rest], sep="\n", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        # The reader went away (`swapper logs m | head`): stop quietly, and keep Python from
        # complaining when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


def _url(args: argparse.Namespace) -> str:
    return str(args.url or _env("SWAPPER_URL") or DEFAULT_URL)


def _status(args: argparse.Namespace) -> int:
    key = args.key or _env("SWAPPER_API_KEY", "SWAPPER_ADMIN_KEY")
    return _run(lambda: show_status(_url(args), key, as_json=args.json))


def _load(args: argparse.Namespace) -> int:
    key = args.key or _env("SWAPPER_ADMIN_KEY", "SWAPPER_API_KEY")
    return _run(lambda: load_model(_url(args), key, args.model))


def _unload(args: argparse.Namespace) -> int:
    key = args.key or _env("SWAPPER_ADMIN_KEY", "SWAPPER_API_KEY")
    return _run(lambda: unload_model(_url(args), key, args.model))


def _logs(args: argparse.Namespace) -> int:
    key = args.key or _env("SWAPPER_API_KEY", "SWAPPER_ADMIN_KEY")
    return _run(
        lambda: show_logs(_url(args), key, args.model, follow=args.follow, lines=args.lines)
    )


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value!r}")
    return number


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``status``, ``load``, ``unload`` and ``logs`` on the ``swapper`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", help=f"swapper's address (default: $SWAPPER_URL, else {DEFAULT_URL})"
    )
    common.add_argument(
        "--key",
        help="API key, sent as 'Authorization: Bearer KEY' "
        "(default: $SWAPPER_API_KEY; load/unload prefer "
        "$SWAPPER_ADMIN_KEY)",
    )

    status = commands.add_parser(
        "status", parents=[common], help="show every model's status on a running swapper"
    )
    status.add_argument("--json", action="store_true", help="print /status as JSON")
    status.set_defaults(run=_status)

    load = commands.add_parser("load", parents=[common], help="load a model and wait for it")
    load.add_argument("model", help="model id or alias")
    load.set_defaults(run=_load)

    unload = commands.add_parser("unload", parents=[common], help="unload a model and wait")
    unload.add_argument("model", help="model id or alias")
    unload.set_defaults(run=_unload)

    logs = commands.add_parser("logs", parents=[common], help="print a model's backend output")
    logs.add_argument("model", help="model id or alias")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument(
        "-n",
        "--lines",
        type=_count,
        default=200,
        help="how many of the last lines to print first (default: %(default)s)",
    )
    logs.set_defaults(run=_logs)

    add_top_command(commands, common, DEFAULT_URL)  # `swapper top` lives in swapper.top
