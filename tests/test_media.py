"""Audio and image endpoints through a real swapper, to ``command`` backends running the fake
media server (``tests/fake_servers/openai_media``) as real subprocesses, with the openai SDK.

The fake answers a transcription with the byte count and SHA-256 of the file it received, so a
test proves the upload arrived unchanged; its speech and images are derived from the request,
so the bytes can be compared. Its ``--model`` is the name it knows: any other is a 404, so a
200 proves the ``upstream_model`` rename reached it (multipart included).
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from swapper.errors import BackendUnreachable, InvalidRequest
from swapper.http.upload import StreamedUpload, read_upload
from tests.conftest import FAKES, SwapperProcess, sdk, wait_until

pytestmark = pytest.mark.integration

FAKE = str(FAKES / "openai_media")
MB = 1024 * 1024


AUDIO_IN = ["/v1/audio/transcriptions", "/v1/audio/translations"]


def media(
    upstream: str | None = None, *args: str, endpoints: list[str] = AUDIO_IN
) -> dict[str, Any]:
    """A ``command`` entry running the fake, knowing the model as ``upstream`` (else its id) and
    serving ``endpoints``."""
    name = upstream or "${MODEL_ID}"
    command = [sys.executable, FAKE, "--port", "${PORT}", "--model", name, *args]
    entry: dict[str, Any] = {"backend": "command", "command": command, "endpoints": endpoints}
    if upstream is not None:
        entry["upstream_model"] = upstream
    return entry


@pytest.fixture
def swapper(swapper_factory: Callable[..., SwapperProcess]) -> SwapperProcess:
    models = {
        "whisper": {**media("base.en"), "aliases": ["stt"]},
        "tts": media("kokoro", endpoints=["/v1/audio/speech"]),
        "painter": media("sd-turbo", endpoints=["/v1/images/generations", "/v1/images/edits"]),
    }
    return swapper_factory(
        swapper={"mode": "multi-active", "max_concurrent_models": 3}, models=models
    )


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def test_a_20_mb_transcription_is_relayed_unchanged_and_not_held(
    swapper: SwapperProcess,
) -> None:
    client = sdk(swapper, timeout=120)
    # Warm up: the model loaded and every code path of an upload run once.
    warm = client.audio.transcriptions.create(model="whisper", file=("w.wav", b"RIFF" * 1000))
    assert (
        warm.text == f"model=base.en bytes=4000 sha256={hashlib.sha256(b'RIFF' * 1000).hexdigest()}"
    )
    audio = os.urandom(20 * MB)
    before = memory_kib(swapper.proc.pid)
    answer = client.audio.transcriptions.create(model="stt", file=("speech.wav", audio))
    after = memory_kib(swapper.proc.pid)
    # The fake saw the rewritten model name and the very bytes sent.
    assert (
        answer.text
        == f"model=base.en bytes={len(audio)} sha256={hashlib.sha256(audio).hexdigest()}"
    )
    peak_growth_mb = (after["VmHWM"] - before["VmHWM"]) / 1024
    print(
        f"swapper RSS {before['VmRSS'] / 1024:.1f} -> {after['VmRSS'] / 1024:.1f} MiB, "
        f"peak {before['VmHWM'] / 1024:.1f} -> {after['VmHWM'] / 1024:.1f} MiB "
        f"(+{peak_growth_mb:.1f} MiB) for a 20 MiB upload"
    )
    # Held once would be +20 MiB, twice +40: relayed as it arrives, the peak barely moves.
    assert peak_growth_mb < 10, f"swapper's peak RSS grew {peak_growth_mb:.1f} MiB"


def test_translations_route_by_the_model_field_also_after_other_fields(
    swapper: SwapperProcess,
) -> None:
    # Fields before the model part, and the model given by its alias.
    files = [("language", (None, "de")), ("model", (None, "stt")), ("file", ("a.wav", b"abc"))]
    response = swapper.http.post("/v1/audio/translations", files=files)
    assert response.status_code == 200, response.text
    digest = hashlib.sha256(b"abc").hexdigest()
    assert response.json() == {"text": f"model=base.en bytes=3 sha256={digest}"}


def test_bad_uploads_get_clear_openai_errors(swapper: SwapperProcess) -> None:
    client = sdk(swapper)
    with pytest.raises(openai.NotFoundError) as missing:
        client.audio.transcriptions.create(model="nope", file=("a.wav", b"x"))
    assert "nope" in missing.value.message
    no_model = swapper.http.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"x")})
    assert no_model.status_code == 400
    assert no_model.json()["error"]["param"] == "model"
    as_json = swapper.http.post("/v1/audio/transcriptions", json={"model": "whisper"})
    assert as_json.status_code == 415
    assert "multipart/form-data" in as_json.json()["error"]["message"]
    # The model after a file bigger than swapper holds while looking for it.
    late = [("file", ("a.wav", b"x" * (2 * MB))), ("model", (None, "whisper"))]
    too_late = swapper.http.post("/v1/audio/transcriptions", files=late)
    assert too_late.status_code == 400
    assert "must come before the file" in too_late.json()["error"]["message"]


def test_an_endpoint_the_model_does_not_serve_is_a_404_that_loads_nothing(
    swapper: SwapperProcess,
) -> None:
    client = sdk(swapper)
    with pytest.raises(openai.NotFoundError) as wrong:
        client.audio.transcriptions.create(model="tts", file=("a.wav", b"x"))
    assert "tts" in wrong.value.message and "/v1/audio/transcriptions" in wrong.value.message
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="whisper", prompt="a cat")
    # Ollama's API too: a chat to a transcription-only model, refused in Ollama's shape.
    chat = swapper.http.post(
        "/api/chat", json={"model": "whisper", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat.status_code == 404 and "/v1/chat/completions" in chat.json()["error"]
    models = swapper.http.get("/status").json()["models"]
    assert models["tts"]["status"] == models["whisper"]["status"] == "UNLOADED"


def test_speech_streams_binary_audio_back(swapper: SwapperProcess) -> None:
    client = sdk(swapper)
    with client.audio.speech.with_streaming_response.create(
        model="tts", voice="alloy", input="hello there"
    ) as response:
        assert response.headers["content-type"] == "audio/mpeg"
        audio = b"".join(response.iter_bytes())
    block = hashlib.sha256(b"kokoro|hello there").digest()
    assert len(audio) == 262144
    assert audio == (block * (262144 // 32))
    # Relayed as it arrives (chunked), not read whole first (which would set a Content-Length).
    assert "content-length" not in response.headers
    assert response.headers["transfer-encoding"] == "chunked"


def test_images_generate_and_edit(swapper: SwapperProcess) -> None:
    client = sdk(swapper)
    generated = client.images.generate(model="painter", prompt="a red fox")
    assert generated.data is not None
    expected = hashlib.sha256(b"sd-turbo|a red fox").digest()
    assert base64.b64decode(generated.data[0].b64_json or "") == expected
    image = os.urandom(300_000)
    edited = client.images.edit(model="painter", image=("in.png", image), prompt="make it blue")
    assert edited.data is not None
    assert (
        base64.b64decode(edited.data[0].b64_json or "")
        == hashlib.sha256(image + b"make it blue").digest()
    )


def test_a_backend_error_comes_back_in_openai_shape(
    swapper_factory: Callable[..., SwapperProcess],
) -> None:
    # The fake knows only "other": the request names "whisper" (no upstream_model), so the
    # backend answers 404, relayed as OpenAI's error.
    entry = {
        "backend": "command",
        "command": [sys.executable, FAKE, "--port", "${PORT}", "--model", "other"],
        "endpoints": AUDIO_IN,
    }
    swapper = swapper_factory(models={"whisper": entry})
    response = swapper.http.post(
        "/v1/audio/transcriptions", files=[("model", (None, "whisper")), ("file", ("a", b"1"))]
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert "whisper" in response.json()["error"]["message"]


def test_a_client_that_leaves_mid_upload_frees_the_model(swapper: SwapperProcess) -> None:
    client = sdk(swapper)
    client.audio.transcriptions.create(model="whisper", file=("w.wav", b"warm"))
    head = (
        b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    )
    with socket.create_connection(("127.0.0.1", swapper.port)) as sock:
        sock.sendall(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=xyz\r\n"
            + f"Content-Length: {10 * MB}\r\n\r\n".encode()
            + head
            + b"\0" * MB
        )
        # The request reached the backend: it is in flight there.
        wait_until(lambda: swapper.model("whisper")["in_flight"] == 1, 30, "the upload in flight")
    wait_until(lambda: swapper.model("whisper")["in_flight"] == 0, 30, "the lease given back")
    answer = client.audio.transcriptions.create(model="whisper", file=("b.wav", b"after"))
    assert answer.text.startswith("model=base.en bytes=5 ")
    assert "POST /v1/audio/transcriptions 499 model=whisper" in swapper.output()
    assert "Traceback" not in swapper.output()
    assert "unhandled error" not in swapper.output()


def test_an_upload_over_max_request_bytes_is_a_413(
    swapper_factory: Callable[..., SwapperProcess],
) -> None:
    swapper = swapper_factory(server={"max_request_bytes": MB}, models={"whisper": media()})
    with pytest.raises(openai.APIStatusError) as declared:
        sdk(swapper).audio.transcriptions.create(model="whisper", file=("a.wav", b"x" * 2 * MB))
    assert declared.value.status_code == 413
    # Sent chunked, with no length to refuse up front: cut off once past the limit.
    body = multipart_body([("model", b"whisper"), ("file", b"x" * 2 * MB)])

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    streamed = swapper.http.post(
        "/v1/audio/transcriptions",
        content=chunks(),
        headers={"Content-Type": "multipart/form-data; boundary=b0und4ry"},
    )
    assert streamed.status_code == 413
    assert streamed.json()["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in swapper.output()


def test_a_chunked_upload_is_relayed_chunked(swapper: SwapperProcess) -> None:
    # No Content-Length from the client: none to forward, so the backend gets it chunked.
    audio = os.urandom(3 * MB)
    body = multipart_body([("model", b"whisper"), ("file", audio)])

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    response = swapper.http.post(
        "/v1/audio/transcriptions",
        content=chunks(),
        headers={"Content-Type": "multipart/form-data; boundary=b0und4ry"},
    )
    assert response.status_code == 200, response.text
    digest = hashlib.sha256(audio).hexdigest()
    assert response.json() == {"text": f"model=base.en bytes={len(audio)} sha256={digest}"}


# -- the multipart reader, in-process: chunk edges, renames, a second send -------------------------


def multipart_body(parts: list[tuple[str, bytes]], boundary: str = "b0und4ry") -> bytes:
    out = b""
    for name, value in parts:
        filename = '; filename="f.wav"' if name == "file" else ""
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n'.encode()
        )
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


async def pieces(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def sent(upload: StreamedUpload) -> bytes:
    return b"".join([chunk async for chunk in upload.chunks()])


@pytest.mark.parametrize("size", [1, 7, 64, 1 << 20])
@pytest.mark.anyio
async def test_the_model_part_is_found_across_any_chunk_edges(size: int) -> None:
    audio = os.urandom(5000)
    body = multipart_body([("language", b"en"), ("model", b"stt"), ("file", audio)])
    content_type = 'multipart/form-data; boundary="b0und4ry"'
    upload = await read_upload(pieces(body, size), content_type, len(body))
    assert upload.model == "stt"
    renamed = upload.naming("base.en")
    expected = multipart_body([("language", b"en"), ("model", b"base.en"), ("file", audio)])
    assert renamed.length == len(expected)
    assert await sent(renamed) == expected
    # Its bytes went out once; neither it nor the original can be sent again.
    for again in (renamed, upload):
        with pytest.raises(BackendUnreachable):
            await sent(again)


@pytest.mark.anyio
async def test_an_upload_without_a_model_part_is_refused() -> None:
    body = multipart_body([("file", b"abc")])
    with pytest.raises(InvalidRequest) as raised:
        await read_upload(pieces(body, 3), "multipart/form-data; boundary=b0und4ry", None)
    assert raised.value.param == "model"
    with pytest.raises(InvalidRequest, match="no boundary"):
        await read_upload(pieces(body, 3), "multipart/form-data", None)
