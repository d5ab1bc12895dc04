"""Model names on the wire: a backend may know a model by another name than swapper's id.

Ollama knows ``qwen3:8b``, a vLLM started with ``--served-model-name`` knows that name. Requests
are rewritten to the backend's name and responses, streams included, back to swapper's id, so a
client only ever sees the name it asked for. Bodies that do not mention the name pass untouched.

The same single rewrite of a request body applies a model's shaping (``strip_params``,
``set_params``), so a request is decoded and encoded at most once, and never when there is
nothing to change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from swapper.errors import InvalidRequest

__all__ = ["ModelRename", "Shaping"]

_DECODE = msgspec.json.Decoder()
_ENCODE = msgspec.json.Encoder()
_DATA = b"data:"
_MODEL = b'"model"'


class Shaping(msgspec.Struct, frozen=True):
    """A model's request shaping: keys removed from every body, keys set where absent."""

    strip: tuple[str, ...] = ()
    set: dict[str, Any] = {}

    def apply(self, data: dict[str, Any]) -> None:
        """Shape a decoded request body in place."""
        for key in self.strip:
            data.pop(key, None)
        for key, value in self.set.items():
            data.setdefault(key, value)


class ModelRename:
    """Rewrites ``model`` in request and response bodies between two names, and shapes requests.

    ``theirs=None``: the backend knows the model by any name (requests keep the client's, and
    responses are not rewritten); only the shaping, if any, changes the request.
    """

    __slots__ = ("ours", "responses", "shaping", "theirs")

    def __init__(self, ours: str, theirs: str | None, shaping: Shaping | None = None) -> None:
        self.ours = ours
        self.theirs = theirs
        self.shaping = shaping
        #: Responses need rewriting only when the backend's name is not swapper's id.
        self.responses = theirs is not None and ours != theirs

    def request(self, body: bytes, requested: str) -> bytes:
        """The request body naming the backend's model, shaped; ``requested`` is what the client
        named (an id or an alias; the body is known to be a JSON object)."""
        rename = self.theirs is not None and requested != self.theirs
        if not rename and self.shaping is None:
            return body
        try:
            data = _DECODE.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # Valid JSON that msgspec cannot hold (a number like 1e999): say so, not a 500.
            raise InvalidRequest(f"The request body cannot be forwarded: {exc}") from None
        if rename:
            data["model"] = self.theirs
        if self.shaping is not None:
            self.shaping.apply(data)
        return _ENCODE.encode(data)

    def _rename(self, data: Any) -> bool:
        if not isinstance(data, dict):
            return False
        if isinstance(data.get("model"), str):
            if data["model"] == self.ours:
                return False
            data["model"] = self.ours
            return True
        # Anthropic's message_start names the model in "message", the Responses API's
        # events in "response".
        inner = data.get("message", data.get("response"))
        return isinstance(inner, dict) and "model" in inner and self._rename(inner)

    def response(self, body: bytes) -> bytes:
        """A JSON response body naming swapper's id."""
        if _MODEL not in body:
            return body
        try:
            data = _DECODE.decode(body)
        except msgspec.DecodeError:
            return body
        return _ENCODE.encode(data) if self._rename(data) else body

    def _event(self, event: bytes) -> bytes:
        if _MODEL not in event:
            return event
        lines = event.split(b"\n")
        for index, line in enumerate(lines):
            if not line.startswith(_DATA):
                continue
            payload = line[len(_DATA) :].strip()
            try:
                data = _DECODE.decode(payload)
            except msgspec.DecodeError:
                continue  # [DONE] or not JSON: left as it is
            if self._rename(data):
                lines[index] = b"data: " + _ENCODE.encode(data)
        return b"\n".join(lines)

    async def stream(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Server-sent events with each event's ``model`` renamed; events pass on as they end."""
        pending = b""
        async for chunk in chunks:
            pending += chunk
            if b"\n\n" not in pending and b"\r\n\r\n" not in pending:
                continue
            pending = pending.replace(b"\r\n", b"\n")
            complete, _, pending = pending.rpartition(b"\n\n")
            yield b"".join(self._event(event) + b"\n\n" for event in complete.split(b"\n\n"))
        if pending:
            yield self._event(pending)
