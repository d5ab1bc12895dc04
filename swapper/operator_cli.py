"""The operators' commands against a running swapper: ``status``, ``load``, ``unload``, ``logs``.

They speak swapper's HTTP API (``/status``, ``/models/{id}/load|unload|logs``) with httpx and
render with rich on a terminal, plain text otherwise. Every failure is one ``swapper: ...`` line
on stderr and exit status 1 (2 for a bad command line), never a traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.table import Table
from rich.text import Text

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
EXIT_ERROR = 1
EXIT_USAGE = 2

_CONNECT_TIMEOUT = 5.0
_TIMEOUT = httpx.Timeout(30.0, connect=_CONNECT_TIMEOUT)
# A load or unload waits server-side (model_swap_timeout, draining in-flight requests), so the
# answer may take minutes; swapper bounds it, and Ctrl-C is the operator's way out.
_WAIT_TIMEOUT = httpx.Timeout(None, connect=_CONNECT_TIMEOUT)
# swapper pings a silent event stream every 15 s: a minute without a byte is a dead link.
_FOLLOW_TIMEOUT = httpx.Timeout(60.0, connect=_CONNECT_TIMEOUT)
_POLL = 0.2
_STATUS_STYLES = {
    "LOADED": "bold green",
    "LOADING": "yellow",
    "UNLOADING": "yellow",
    "SLEEPING": "cyan",
    "FAILED": "bold red",
    "UNLOADED": "dim",
}
COLUMNS = ("MODEL", "STATUS", "BACKEND", "PID", "VRAM", "IDLE")


class CommandError(Exception):
    """A failure for the operator: a message for stderr and the exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# -- HTTP ------------------------------------------------------------------------------------------


class Client:
    """swapper's HTTP API; transport and HTTP errors become :class:`CommandError`."""

    def __init__(self, url: str, key: str | None, key_hint: str) -> None:
        self.url = _check_url(url)
        if key is not None and not key.isascii():
            raise CommandError("the API key must be ASCII", EXIT_USAGE)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._key_hint = key_hint
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=_TIMEOUT)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def get(
        self, path: str, *, params: dict[str, Any] | None = None, timeout: httpx.Timeout = _TIMEOUT
    ) -> Any:
        """GET ``path`` and return its JSON."""
        return self._json(self._send("GET", path, params, timeout), path)

    def post(self, path: str, *, timeout: httpx.Timeout = _TIMEOUT) -> Any:
        """POST to ``path`` (no body) and return its JSON."""
        return self._json(self._send("POST", path, None, timeout), path)

    def stream_lines(
        self,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        timeout: httpx.Timeout = _FOLLOW_TIMEOUT,
    ) -> Iterator[str]:
        """GET ``path`` as a stream and yield its lines as they arrive."""
        streaming = False
        try:
            with self._http.stream("GET", path, params=params, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                streaming = True
                yield from response.iter_lines()
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            if streaming:  # swapper went away mid-stream (a stop, a restart): no protocol talk
                raise CommandError(f"{self.url} closed the stream") from None
            raise self._transport_error(exc) from None
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None

    def _send(
        self, method: str, path: str, params: dict[str, Any] | None, timeout: httpx.Timeout
    ) -> httpx.Response:
        try:
            response = self._http.request(method, path, params=params, timeout=timeout)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        self._check(response)
        return response

    def _json(self, response: httpx.Response, path: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise CommandError(f"{self.url}{path} did not answer JSON; is this swapper?") from None

    def _check(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        message = _error_message(response)
        if response.status_code in (401, 403):
            message += f" ({self._key_hint})"
        raise CommandError(message)

    def _transport_error(self, exc: httpx.HTTPError) -> CommandError:
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
            return CommandError(f"invalid URL {self.url!r}: {exc}", EXIT_USAGE)
        if isinstance(exc, httpx.ConnectTimeout):
            return CommandError(f"cannot reach {self.url}: no answer within {_CONNECT_TIMEOUT:g}s")
        if isinstance(exc, httpx.ConnectError):
            return CommandError(f"cannot reach {self.url}: {_reason(exc)}")
        if isinstance(exc, httpx.TimeoutException):
            return CommandError(f"{self.url} stopped answering (timed out)")
        return CommandError(f"connection to {self.url} failed: {_reason(exc)}")


def _check_url(url: str) -> str:
    url = url.rstrip("/")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise CommandError(f"invalid URL {url!r}: {exc}", EXIT_USAGE) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise CommandError(f"invalid URL {url!r}: expected http://HOST:PORT", EXIT_USAGE)
    return url


def _reason(exc: BaseException) -> str:
    """The innermost OS error's words ("connection refused"), else the exception's own."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[:1].lower() + cause.strerror[1:]
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


def _error_message(response: httpx.Response) -> str:
    """The message of an OpenAI error body, else the HTTP status line."""
    try:
        error = response.json()["error"]
        message = error["message"] if isinstance(error, dict) else error
        if isinstance(message, str) and message.strip():
            return message.strip()
    except (ValueError, KeyError, TypeError):
        pass
    return f"HTTP {response.status_code} {response.reason_phrase}".rstrip()


def _model_path(model: str, action: str) -> str:
    return f"/models/{quote(model, safe='')}/{action}"


# -- status ----------------------------------------------------------------------------------------


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _duration(seconds: float) -> str:
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _idle(model: dict[str, Any], now: dt.datetime) -> str:
    """How long a loaded model has had no request; ``-`` while requests run or not loaded."""
    # Idle time tells which model holds the GPU for nothing: only a loaded model has one.
    if model.get("status") != "LOADED" or model.get("in_flight"):
        return "-"
    since = _parse_time(model.get("last_used"))
    loaded_at = _parse_time(model.get("loaded_at"))
    # A model loaded after its last use has been idle since it loaded, not longer.
    if loaded_at and (since is None or loaded_at > since):
        since = loaded_at
    return "-" if since is None else _duration((now - since).total_seconds())


def _vram(model: dict[str, Any]) -> str:
    value = model.get("vram_mb")
    return "-" if not isinstance(value, int | float) else f"{value:.0f} MiB"


def status_rows(doc: dict[str, Any], now: dt.datetime | None = None) -> list[list[str]]:
    """One row of :data:`COLUMNS` per model of a ``/status`` document."""
    now = now or dt.datetime.now(dt.UTC)
    rows = []
    for model_id, model in (doc.get("models") or {}).items():
        pid = model.get("pid")
        rows.append(
            [
                str(model_id),
                str(model.get("status", "?")),
                str(model.get("backend") or "-"),
                "-" if pid is None else str(pid),
                _vram(model),
                _idle(model, now),
            ]
        )
    return rows


def _notes(doc: dict[str, Any]) -> list[str]:
    """Lines under the table: each failed model's error, then the GPUs."""
    notes = []
    for model_id, model in (doc.get("models") or {}).items():
        if model.get("status") == "FAILED" and model.get("last_error"):
            note = f"{model_id}: {str(model['last_error']).splitlines()[0]}"
            retry = _parse_time(model.get("retry_at"))
            if retry is not None:
                note += f" (next try at {retry.astimezone():%H:%M:%S})"
            notes.append(note)
    gpu = doc.get("gpu")
    if isinstance(gpu, dict):
        if not gpu.get("available") or not gpu.get("gpus"):
            notes.append("gpu: none visible to swapper")
        for g in gpu.get("gpus") or []:
            notes.append(
                f"gpu {g.get('index')} {g.get('name')}: {g.get('used_mb')} of "
                f"{g.get('total_mb')} MiB used, {g.get('free_mb')} MiB free"
            )
    return notes


def _header(doc: dict[str, Any]) -> str:
    resident = doc.get("resident") or []
    if isinstance(resident, list) and len(resident) > 1:
        return f"mode: {doc.get('mode', '?')}  resident: {', '.join(map(str, resident))}"
    return f"mode: {doc.get('mode', '?')}  active: {doc.get('active_model') or '-'}"


def _plain_table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [list(COLUMNS), *rows]) for i in range(len(COLUMNS))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [list(COLUMNS), *rows]
    ]


def _rich_table(doc: dict[str, Any], rows: list[list[str]]) -> Table:
    table = Table(title=_header(doc), title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in ("PID", "VRAM", "IDLE") else "left")
    for row in rows:
        # Text, not markup strings: a model id or error with "[...]" must print as it is.
        cells = [Text(cell) for cell in row]
        cells[1].stylize(_STATUS_STYLES.get(row[1], ""))
        table.add_row(*cells)
    return table


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
        _write(console, json.dumps(doc, indent=2))
        return
    rows = status_rows(doc)
    if console.is_terminal:
        console.print(_rich_table(doc, rows))
        for note in _notes(doc):
            console.print(Text(note, style="red" if not note.startswith("gpu") else "dim"))
        return
    _write(console, "\n".join([_header(doc), *_plain_table(rows), *_notes(doc)]))


def _write(console: Console, text: str) -> None:
    """Write text as it is: no markup, highlighting or wrapping."""
    console.file.write(text + "\n")
    console.file.flush()


# -- load / unload ---------------------------------------------------------------------------------


class _Progress:
    """A spinner with the model's phase on a terminal; elsewhere a line at most once a second."""

    def __init__(self, console: Console, verb: str, model: str) -> None:
        self._console, self._verb, self._model = console, verb, model
        self._next_line = 1.0  # loads that finish within a second print nothing
        self._status: Any = None

    def __enter__(self) -> _Progress:
        if self._console.is_terminal:
            self._status = self._console.status(Text(f"{self._verb} {self._model}..."))
            self._status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)

    def update(self, phase: str, elapsed: float) -> None:
        """Show the current phase and the seconds waited so far."""
        text = f"{self._verb} {self._model}... {elapsed:.1f}s{f' ({phase})' if phase else ''}"
        if self._status is not None:
            self._status.update(Text(text))
        elif elapsed >= self._next_line:
            _write(self._console, text)
            self._next_line = elapsed + 1.0


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
            outcome["doc"] = client.post(_model_path(model, action), timeout=_WAIT_TIMEOUT)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread as is
            outcome["error"] = exc

    # The request runs in a daemon thread so the main thread can poll, and so Ctrl-C ends the
    # command at once instead of waiting for swapper's answer.
    thread = threading.Thread(target=call, name=f"swapper-{action}", daemon=True)
    started = time.monotonic()
    verb = {"load": "loading", "unload": "unloading"}[action]
    try:
        thread.start()
        with _Progress(progress, verb, model) as shown:
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
        raise CommandError(f"{url}{_model_path(model, action)} did not answer a model status")
    return doc, time.monotonic() - started


def _summary(doc: dict[str, Any], model: str, elapsed: float) -> str:
    details = [f"pid {doc['pid']}"] if doc.get("pid") is not None else []
    if isinstance(doc.get("vram_mb"), int | float):
        details.append(_vram(doc))
    details.append(f"{elapsed:.1f}s")
    return f"{doc.get('model', model)} {doc.get('status', '?')} ({', '.join(details)})"


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
    _write(console or Console(), _summary(doc, model, elapsed))
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
    _write(console or Console(), _summary(doc, model, elapsed))
    return doc


# -- logs ------------------------------------------------------------------------------------------


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The ``data`` of each server-sent event; comments (pings) and other fields are skipped."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


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
            doc = client.get(_model_path(model, "logs"), params={"lines": lines})
            for line in doc.get("lines", []) if isinstance(doc, dict) else []:
                out.write(f"{line}\n")
            out.flush()
            return
        try:
            events = client.stream_lines(
                _model_path(model, "logs"), params={"lines": lines, "follow": 1}
            )
            for data in _sse_data(events):
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
