"""Multipart uploads relayed as they arrive: only the head of the body is held in memory.

An audio transcription or an image edit is a ``multipart/form-data`` body that may be tens of
megabytes. swapper needs only its ``model`` field to route it, so it reads the body until the
``model`` part is complete (OpenAI's SDK, like any client built on httpx, sends form fields
before files), holds that head, and sends the backend the head followed by the rest of the
stream, chunk by chunk. A backend that knows the model by another name gets the head with the
``model`` part's value rewritten, and a ``Content-Length`` changed to match.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from swapper.errors import BackendUnreachable, InvalidRequest, UnsupportedMediaType
from swapper.http.rename import ModelRename

__all__ = ["HEAD_LIMIT", "StreamedUpload", "outgoing_body", "read_upload"]

#: The most of a body held while looking for its ``model`` part.
HEAD_LIMIT = 1024 * 1024

_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_NAME = re.compile(rb'(?:^|;)\s*name="([^"]*)"', re.IGNORECASE)
_DISPOSITION = b"content-disposition:"


class _Rest:
    """The part of the body not yet received; shared by an upload and its renamed copies, so
    that none of them is ever sent after another began (the bytes sent are gone)."""

    __slots__ = ("chunks", "taken")

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks
        self.taken = False


class StreamedUpload:
    """A multipart body being received: its head, held, then the rest as it arrives.

    It can be sent once: the rest of the stream is not kept.
    """

    __slots__ = ("_head", "_rest", "_span", "content_type", "length", "model")

    def __init__(
        self,
        content_type: str,
        head: bytes,
        span: tuple[int, int],
        rest: AsyncIterator[bytes] | _Rest,
        length: int | None,
    ) -> None:
        #: The client's Content-Type, boundary included.
        self.content_type = content_type
        #: The body's length as the client declared it (None: sent chunked).
        self.length = length
        self._head = head
        self._span = span
        self._rest = rest if isinstance(rest, _Rest) else _Rest(rest)
        #: The ``model`` field's value.
        self.model = head[span[0] : span[1]].decode("utf-8", "replace")

    def naming(self, model: str) -> StreamedUpload:
        """This upload with the ``model`` part's value replaced (before it is sent)."""
        start, end = self._span
        value = model.encode()
        head = self._head[:start] + value + self._head[end:]
        length = None if self.length is None else self.length + len(value) - (end - start)
        return StreamedUpload(
            self.content_type, head, (start, start + len(value)), self._rest, length
        )

    async def chunks(self) -> AsyncIterator[bytes]:
        """The head, then the rest of the body as the client sends it."""
        rest = self._rest
        if rest.taken:
            # The backend dropped the connection mid-upload: what was sent is gone.
            raise BackendUnreachable("the upload was cut off and cannot be sent again")
        rest.taken = True
        yield self._head
        async for chunk in rest.chunks:
            if chunk:
                yield chunk


def _boundary(content_type: str) -> bytes:
    media = content_type.partition(";")[0].strip().lower()
    if media != "multipart/form-data":
        raise UnsupportedMediaType(
            f"Content-Type must be multipart/form-data, not {media or 'missing'!r}",
            code="unsupported_media_type",
        )
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise InvalidRequest("The multipart Content-Type has no boundary")
    return (found[1] or found[2]).encode("latin-1")


def _part_name(headers: bytes) -> bytes | None:
    for line in headers.split(b"\r\n"):
        if line[: len(_DISPOSITION)].lower() == _DISPOSITION:
            found = _NAME.search(line[len(_DISPOSITION) :])
            return found[1] if found else None
    return None


def _find_model(buffer: bytes, delimiter: bytes) -> tuple[int, int] | None:
    """Where the ``model`` part's value lies in ``buffer``; None: more of the body is needed."""
    position = buffer.find(delimiter)
    while position >= 0:
        after = position + len(delimiter)
        if len(buffer) < after + 2:
            return None
        if buffer[after : after + 2] == b"--":  # the closing delimiter
            raise InvalidRequest("You must provide a model parameter", param="model")
        head_end = buffer.find(b"\r\n\r\n", after)
        if head_end < 0:
            return None
        start = head_end + 4
        end = buffer.find(b"\r\n" + delimiter, start)
        if end < 0:
            return None
        if _part_name(buffer[after + 2 : head_end]) == b"model":
            return start, end
        position = end + 2
    return None


async def read_upload(
    stream: AsyncIterator[bytes], content_type: str, length: int | None
) -> StreamedUpload:
    """Read ``stream`` until its ``model`` part is complete; the rest stays unread."""
    delimiter = b"--" + _boundary(content_type)
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        span = _find_model(buffer, delimiter)
        if span is not None:
            upload = StreamedUpload(content_type, buffer, span, stream, length)
            if not upload.model:
                raise InvalidRequest("`model` must not be empty", param="model")
            return upload
        if len(buffer) > HEAD_LIMIT:
            raise InvalidRequest(
                f"The `model` field must come before the file parts, within the first "
                f"{HEAD_LIMIT // 1024} KiB of the multipart body",
                param="model",
            )
    if delimiter not in buffer:
        raise InvalidRequest("The request body is not multipart/form-data with its boundary")
    raise InvalidRequest("You must provide a model parameter", param="model")


def outgoing_body(
    body: bytes | StreamedUpload, rename: ModelRename | None, requested: str
) -> tuple[bytes | AsyncIterator[bytes], bytes | None, int | None]:
    """What to send the backend for a request body: the bytes or chunks naming the backend's
    model (and shaped), the Content-Type of an upload (None for a JSON body: the forwarded
    headers or JSON decide) and the length (None: unknown, sent chunked)."""
    if isinstance(body, bytes):
        sent = body if rename is None else rename.request(body, requested)
        return sent, None, len(sent)
    if rename is not None and rename.theirs is not None and body.model != rename.theirs:
        body = body.naming(rename.theirs)
    return body.chunks(), body.content_type.encode("latin-1"), body.length
