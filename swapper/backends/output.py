"""What happens to a backend's output: read in chunks, kept within bounds, logged only at DEBUG.

A backend may print a few lines a request or megabytes a second. The reader takes the
pipe in chunks and keeps every line, up to ``RATE`` lines a second per backend (bursts of
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
import logging
import time
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "BURST",
    "MAX_LINE",
    "RATE",
    "SECRET_ENV_WORDS",
    "SECRET_FLAGS",
    "OutputReader",
    "secret_env_values",
    "secret_values",
]

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
        self._partial = bytearray()
        self._cut = 0  # bytes cut from the line being read
        self._dropped = 0  # lines not shown since the last kept line
        self._last_dropped: list[str] = []
        self._flood_lines = 0  # lines not shown since the last warning
        self._warned = -_WARN_EVERY

    async def run(self, stream: asyncio.StreamReader) -> None:
        """Read ``stream`` to its end."""
        while chunk := await stream.read(1 << 16):
            self.output_seen.set()
            self.feed(chunk)
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
