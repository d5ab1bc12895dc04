"""The ``openai`` backend: an OpenAI-compatible server that already runs elsewhere; no process.

It takes a slot like any model, so ``max_concurrent_models`` and placement hold for it too.
Loading it means checking that it answers: ``GET {url}/v1/models`` with the key must be 200
(a 401 or 403 fails the load at once, saying the key was refused); unloading frees the slot
and leaves the server alone. ``api_key`` is sent upstream as ``Authorization: Bearer`` on every
request and never appears in /status, logs or errors. While resident, the server is asked
every few seconds whether it still answers; one that stops answering is reported as crashed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from swapper.backends.contract import Backend, BackendHandle
from swapper.backends.hookspecs import hookimpl
from swapper.config import ModelEntry

__all__ = ["OpenaiBackend", "OpenaiModel", "register_backends"]

#: Seconds between the checks that a resident remote server still answers.
_WATCH = 5.0
#: What an OpenAI-compatible server may serve; which of them it really does is its business.
OPENAI_ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/audio/speech",
    "/v1/images/generations",
    "/v1/images/edits",
)


class OpenaiModel(ModelEntry, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A model entry with ``backend: openai``."""

    #: The server's root, e.g. ``http://10.0.0.5:8000`` (requests go to ``{url}/v1/...``).
    url: str
    #: Sent as ``Authorization: Bearer``; use ``${env:NAME}`` to keep it out of the file.
    api_key: str | None = None
    #: The name the server knows the model by; requests carry it, responses get swapper's id.
    upstream_model: str | None = None

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("url: must start with http:// or https://")
        if self.url.rstrip("/").endswith("/v1"):
            raise ValueError("url: give the server's root, without /v1 (swapper adds the paths)")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key: must not be empty (leave it out for a server without keys)")
        if self.upstream_model is not None and not self.upstream_model.strip():
            raise ValueError("upstream_model: must not be empty")
        if self.gpus != "auto":
            raise ValueError("gpus: a remote server (backend: openai) uses no GPU of this node")

    def __repr__(self) -> str:
        # Never print the key, wherever an entry ends up being logged.
        key = "<hidden>" if self.api_key else None
        return (
            f"OpenaiModel(url={self.url!r}, api_key={key}, upstream_model={self.upstream_model!r})"
        )


class OpenaiBackend(Backend[OpenaiModel]):
    """A remote OpenAI-compatible server: loading checks it answers, unloading frees the slot."""

    name = "openai"
    entry_type = OpenaiModel
    endpoints = frozenset(OPENAI_ENDPOINTS)

    @classmethod
    def uses_local_gpu(cls, entry: ModelEntry) -> bool:
        """A remote server: no GPU of this node is charged for it."""
        return False

    @property
    def url(self) -> str:
        """The server's root, without a trailing slash."""
        return self.entry.url.rstrip("/")

    def upstream_model(self) -> str | None:
        """``upstream_model`` when the server knows the model by another name."""
        return self.entry.upstream_model

    def upstream_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """``Authorization: Bearer <api_key>`` when a key is configured."""
        key = self.entry.api_key
        return ((b"Authorization", f"Bearer {key}".encode("latin-1")),) if key else ()

    async def start(self) -> BackendHandle:
        """Nothing to start: requests go to ``url``."""
        return BackendHandle(base_url=self.url)

    async def _models_status(self, timeout: float) -> int | None:
        try:
            response = await self.http().get(
                f"{self.url}/v1/models", headers=list(self.upstream_headers()), timeout=timeout
            )
        except httpx.HTTPError:
            return None
        return response.status_code

    async def ready(self, handle: BackendHandle) -> bool:
        """``GET /v1/models`` is 200; a refused key fails the load at once."""
        status = await self._models_status(timeout=5.0)
        if status in (401, 403):
            refused = "refused the api_key" if self.entry.api_key else "needs an api_key"
            raise RuntimeError(f"the server at {self.url} {refused} (HTTP {status})")
        if status == 404:
            raise RuntimeError(
                f"the server at {self.url} has no /v1/models: is it OpenAI-compatible?"
            )
        return status == 200

    async def measure_vram_mb(self, handle: BackendHandle) -> float | None:
        """None of this machine's GPU memory is the model's own: placement charges it its
        configured ``vram_mb`` (if any), never what others happened to allocate meanwhile."""
        return 0.0

    async def stop(self, handle: BackendHandle) -> None:
        """Nothing runs here: the slot is simply given back."""

    async def alive(self, handle: BackendHandle) -> bool:
        """True while the server answers at all."""
        return await self._models_status(timeout=5.0) is not None

    async def wait_exit(self, handle: BackendHandle) -> str:
        """Return when the server stops answering."""
        while await self.alive(handle):
            await asyncio.sleep(_WATCH)
        return f"the server at {self.url} stopped answering"


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Provide the ``openai`` backend."""
    register(OpenaiBackend)
