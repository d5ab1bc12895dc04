"""What happens to a backend's output: read in chunks, kept within bounds, logged only at DEBUG.

A backend may print a few lines a request or megabytes a second. llama-server writes each of
its nine or so lines a request on its own, and waking the event loop for each one cost swapper
about 0.2 ms of CPU a proxied request. So after a short read the pipe is left alone for
``GATHER`` seconds (its reader off the event loop) while the lines pile up in it, then read
again: under load one read takes many requests' lines, and an idle backend costs nothing.
Only once the backend is ready (``gather``): while it starts, each line is read at once, since
the readiness probe runs as soon as the backend prints. A
long read means the backend prints fast: the pipe is then read on at once, so that a backend
never waits on a full pipe (it is also made as large as the system allows, ``F_SETPIPE_SZ``).

The reader takes the pipe in chunks and keeps every line, up to ``RATE`` lines a second per backend (bursts of
``BURST`` lines, enough for a load), with lines cut at ``MAX_LINE`` bytes. Above the rate it
only counts lines (in C, without decoding them) and keeps the last few of each chunk for the
tail; the per-model log then shows ``... 12,345 lines not shown``, and swapper warns about the
flood at most once a minute. A kept line goes to

* the model's ring buffer (``GET /models/{id}/logs``, ``swapper logs``, the dashboard),
* the output tail that load-failure and crash errors quote ("the backend's last lines"),
* swapper's own log only at DEBUG (``SWAPPER_LOG_LEVEL=DEBUG``), as ``[model] line``.

Why DEBUG: relaying every line at INFO costs CPU on the hot path (llama-server prints several
lines per request) and copies whatever the backend echoes (prompts, in verbose modes) into
swapper's log, which is shipped and kept far more widely than the admin-only ring buffer.
What an operator needs at INFO still arrives there: a failed load or a crash is logged with the
backend's last lines. In every line, wherever it goes, the values of secret flags in the
backend's own command line (``--api-key`` and the like) are replaced by ``***``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import cast

__all__ = [
    "BURST",
    "GATHER",
    "MAX_LINE",
    "RATE",
    "SECRET_ENV_WORDS",
    "SECRET_FLAGS",
    "OutputReader",
    "secret_env_values",
    "secret_values",
]

#: Seconds the pipe is left to fill after each read (lines in that span come in one read).
GATHER = 0.02
#: A read shorter than this is a trickle (a few lines), after which the pipe is left to fill.
_TRICKLE = 16 << 10
#: Pipe size asked for: 50 MB/s of output fit between two reads (the system may allow less).
_PIPE_SIZE = 1 << 20
#: Lines a second each backend may print before lines are only counted.
RATE = 1000.0
#: Lines a backend may print at once above ``RATE`` (a load prints a few hundred).
BURST = 5000.0
#: Bytes of one line that are kept; the rest is cut.
MAX_LINE = 8192
#: Lines of each over-the-rate chunk kept for the tail, so errors still quote the last lines.
_KEEP = 5
_TAIL_LINES = 40
_WARN_EVERY = 60.0
#: Flags whose value is a secret: hidden in logged command lines and in the backend's output.
SECRET_FLAGS = ("--api-key", "--api-key-file", "--hf-token", "--token")


def secret_values(argv: Sequence[str]) -> list[str]:
    """The values of secret flags in ``argv`` (``--api-key K`` and ``--api-key=K``)."""
    values: list[str] = []
    for flag, value in zip(argv, [*argv[1:], ""], strict=True):
        name, eq, inline = flag.partition("=")
        if eq and name in SECRET_FLAGS:
            values.append(inline)
        elif flag in SECRET_FLAGS:
            values.append(value)
    # Short values would mask ordinary words; no real key is that short.
    return [value for value in values if len(value) >= 4]


#: Words in an environment variable's name that mark its value as a secret (HF_TOKEN, API_KEY).
SECRET_ENV_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def secret_env_values(env: Mapping[str, str]) -> list[str]:
    """The values of an entry's ``env`` whose names look secret, to mask in the output."""
    return [
        value
        for name, value in env.items()
        if len(value) >= 4 and any(word in name.upper() for word in SECRET_ENV_WORDS)
    ]


class _Budget:
    """A token bucket: ``rate`` lines a second, at most ``burst`` at once."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, wanted: int) -> int:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted


class OutputReader:
    """Reads one backend's stdout+stderr pipe until it closes; see the module docstring."""

    def __init__(
        self,
        name: str,
        logger: logging.Logger,
        on_line: Callable[[str], None] | None,
        secrets: Sequence[str] = (),
        rate: float = RATE,
        burst: float = BURST,
    ) -> None:
        self.name = name
        self._logger = logger
        self._on_line = on_line
        self._secrets = tuple(secrets)
        self._budget = _Budget(rate, burst)
        #: The last lines, for error messages (bounded: ``_TAIL_LINES`` lines of ``MAX_LINE``).
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        #: Set whenever the child prints; readiness polls use it to probe at once.
        self.output_seen = asyncio.Event()
        #: Let lines gather between reads (once the backend is ready; see the module docstring).
        self.gather = False
        #: Reads of the pipe so far (each one an event-loop wakeup).
        self.reads = 0
        self._partial = bytearray()
        self._cut = 0  # bytes cut from the line being read
        self._dropped = 0  # lines not shown since the last kept line
        self._last_dropped: list[str] = []
        self._flood_lines = 0  # lines not shown since the last warning
        self._warned = -_WARN_EVERY

    async def read_pipe(self, fd: int) -> None:
        """Read the pipe ``fd`` (which it then owns) to its end; once ``gather`` is set, a short
        read is followed by ``GATHER`` seconds off the event loop."""
        with contextlib.suppress(OSError, AttributeError):  # Linux only; a smaller pipe is fine
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        loop = asyncio.get_running_loop()
        ended = loop.create_future()
        pipe = os.fdopen(fd, "rb", buffering=0)
        await loop.connect_read_pipe(lambda: _GatheringPipe(self, ended), pipe)
        await ended

    def finish(self) -> None:
        """The output ended: keep a last line without its newline, and mark any gap."""
        if self._partial or self._cut:
            self._lines([self._take_partial()])
        self._flush(at_end=True)
        self.output_seen.set()

    def feed(self, chunk: bytes) -> None:
        """Take one chunk of output."""
        if self._partial or self._cut:
            newline = chunk.find(b"\n")
            if newline < 0:
                self._grow(chunk)
                return
            self._grow(chunk[:newline])
            line = self._take_partial()
            if self._budget.take(1):
                self._lines([line])
            else:
                self._drop(1, line)
            chunk = chunk[newline + 1 :]
        last = chunk.rfind(b"\n")
        if last < 0:
            self._grow(chunk)
            return
        body = chunk[:last]
        self._grow(chunk[last + 1 :])
        count = body.count(b"\n") + 1
        granted = self._budget.take(count)
        if granted == count:
            self._lines(body.split(b"\n"))
            return
        parts = body.split(b"\n", granted) if granted else [body]
        self._lines(parts[:granted])
        self._drop(count - granted, parts[-1])

    def _grow(self, data: bytes) -> None:
        room = MAX_LINE - len(self._partial)
        self._partial += data[:room]
        self._cut += max(0, len(data) - room)

    def _take_partial(self) -> bytes:
        line = bytes(self._partial)
        if self._cut:
            line += f"... ({self._cut:,} bytes cut)".encode()
        self._partial.clear()
        self._cut = 0
        return line

    def _text(self, raw: bytes) -> str:
        if len(raw) > MAX_LINE:
            raw = raw[:MAX_LINE] + f"... ({len(raw) - MAX_LINE:,} bytes cut)".encode()
        text = raw.decode("utf-8", "replace").rstrip()
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def _lines(self, raws: list[bytes]) -> None:
        if self._dropped:
            self._flush(at_end=False)
        debug = self._logger.isEnabledFor(logging.DEBUG)
        for raw in raws:
            line = self._text(raw)
            if not line:
                continue
            self._keep(line)
            if debug:
                self._logger.debug("[%s] %s", self.name, line)

    def _keep(self, line: str) -> None:
        self.tail.append(line)
        if self._on_line is not None:
            self._on_line(line)

    def _drop(self, count: int, rest: bytes) -> None:
        """Over the rate: count the lines, keep only the last few of them for the tail."""
        self._dropped += count
        self._flood_lines += count
        last = [text for raw in rest.rsplit(b"\n", _KEEP)[-_KEEP:] if (text := self._text(raw))]
        self._last_dropped = last
        self.tail.append(f"... {count:,} lines not shown")
        self.tail.extend(last)
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY:
            self._logger.warning(
                "[%s] prints more than %d lines a second: %s lines not kept "
                "since the last warning (it repeats at most once a minute)",
                self.name,
                int(self._budget.rate),
                f"{self._flood_lines:,}",
            )
            self._warned = now
            self._flood_lines = 0

    def _flush(self, at_end: bool) -> None:
        """Mark the gap in the ring buffer once lines are kept again, or when the output ends."""
        if not self._dropped:
            return
        # At the end, how it ended matters: the last lines of the flood are shown after the gap.
        shown = self._last_dropped if at_end else []
        self._last_dropped = []
        hidden, self._dropped = self._dropped - len(shown), 0
        for line in [f"... {hidden:,} lines not shown", *shown]:
            if self._on_line is not None:
                self._on_line(line)
            self._logger.debug("[%s] %s", self.name, line)


class _GatheringPipe(asyncio.Protocol):
    """Hands what the pipe holds to an :class:`OutputReader`; after a short read, stops reading
    for ``GATHER`` seconds (pausing takes the pipe off the event loop's watch list)."""

    def __init__(self, reader: OutputReader, ended: asyncio.Future[None]) -> None:
        self._reader = reader
        self._ended = ended
        self._transport: asyncio.ReadTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's pipe transports have the methods, not the asyncio base classes.
        self._transport = cast(asyncio.ReadTransport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.reads += 1
        self._reader.output_seen.set()
        self._reader.feed(data)
        transport = self._transport
        if len(data) >= _TRICKLE or not self._reader.gather:
            return  # it prints fast (or is starting): read on
        if transport is not None and not transport.is_closing() and transport.is_reading():
            transport.pause_reading()
            asyncio.get_running_loop().call_later(GATHER, self._resume)

    def _resume(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._reader.finish()
        if not self._ended.done():
            self._ended.set_result(None)
