"""The Ollama backend: a model tag on an Ollama server, loaded and unloaded through its API.

swapper talks to an Ollama that already runs (``base_url``), or, with ``serve: true``, starts
``ollama serve`` on a free loopback port of its own and owns that process. Loading is Ollama's
preload (``/api/generate`` with ``keep_alive: -1``, so Ollama's own scheduler never expires it),
ready once ``/api/ps`` lists the model; unloading is the same call with ``keep_alive: 0``,
done once ``/api/ps`` no longer lists it. Requests go to Ollama's OpenAI-compatible ``/v1``
endpoints with ``model`` rewritten to the tag.

Ollama's ``/v1`` endpoints reset a model's keep-alive to the server default (5 minutes) on every
request, after which Ollama unloads it behind swapper's back. So the watcher re-pins the model
(keep_alive -1) whenever ``/api/ps`` shows it expiring, and reports it gone if Ollama dropped it
anyway (its scheduler evicts idle runners, pinned or not, to fit another model past
``OLLAMA_MAX_LOADED_MODELS``); a server swapper runs itself gets ``OLLAMA_KEEP_ALIVE=-1`` from
the start. ``/api/ps`` lists names normalised (:func:`shortest_name`), matched case-insensitively.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from typing import Any

import httpx

from swapper.backends.contract import (
    Backend,
    BackendHandle,
    BackendSettings,
    Unloaded,
    child_environment,
)
from swapper.backends.hookspecs import hookimpl
from swapper.backends.output import secret_env_values
from swapper.backends.process import ManagedProcess, free_port, port_in_use
from swapper.config import ModelEntry
from swapper.errors import BackendError

__all__ = ["OllamaBackend", "OllamaModel", "register_backends", "same_model", "shortest_name"]

logger = logging.getLogger("swapper.backend.ollama")

_MB = 1024 * 1024
_POLL = 0.05
#: Seconds between the watcher's looks at ``/api/ps``.
_WATCH = 2.0


class OllamaModel(ModelEntry, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A model entry with ``backend: ollama``."""

    #: The Ollama tag, e.g. ``qwen3:8b``.
    model: str
    base_url: str = "http://127.0.0.1:11434"
    #: True: swapper runs ``ollama serve`` itself on a free loopback port (``base_url`` unused).
    serve: bool = False
    binary: str = "ollama"

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ValueError("model: must name an Ollama tag, e.g. qwen3:8b")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url: must start with http:// or https://")
        if self.env and not self.serve:
            raise ValueError("env: needs serve: true (otherwise swapper starts no process)")
        if self.gpus != "auto" and not self.serve:
            raise ValueError(
                "gpus: needs serve: true (an Ollama that swapper does not start places its "
                "models itself; swapper puts this model on no GPU)"
            )


def _pinned(expires_at: object) -> bool:
    """keep_alive -1 shows as an expiry centuries away; anything nearer will unload it."""
    if not isinstance(expires_at, str) or not expires_at[:4].isdigit():
        return False
    return int(expires_at[:4]) > time.gmtime().tm_year + 50


#: Where a bare model name lives, as Ollama's ``ParseName`` fills it in.
_DEFAULT_HOST = "registry.ollama.ai"
_DEFAULT_NAMESPACE = "library"


def shortest_name(name: str) -> str:
    """A tag as ``/api/ps`` lists it: Ollama's ``ParseName(name).DisplayShortest()``.

    ``llama3.2`` is ``llama3.2:latest``; ``registry.ollama.ai/library/qwen3:8b`` is ``qwen3:8b``;
    ``registry.ollama.ai/me/m:1`` is ``me/m:1``; another host keeps the full name. A digest
    (``@sha256:...``) is dropped. Compare results with :func:`same_model` (case-insensitive).
    """
    name = name.strip().split("@", 1)[0]
    *path, last = name.split("/")
    model, _, tag = last.partition(":")
    namespace = path[-1] if path else _DEFAULT_NAMESPACE
    host = "/".join(path[:-1]) or _DEFAULT_HOST
    short = f"{model}:{tag or 'latest'}"
    if host.casefold() != _DEFAULT_HOST:
        return f"{host}/{namespace}/{short}"
    if namespace.casefold() != _DEFAULT_NAMESPACE:
        return f"{namespace}/{short}"
    return short


def same_model(a: str, b: str) -> bool:
    """Whether two spellings name one Ollama model (Ollama compares names case-insensitively)."""
    return shortest_name(a).casefold() == shortest_name(b).casefold()


class OllamaBackend(Backend[OllamaModel]):
    """One Ollama tag; loaded with keep_alive -1, unloaded with keep_alive 0.

    Not a :class:`~swapper.backends.SubprocessBackend`: with ``serve: false`` there is no process
    at all. With ``serve: true`` the handle holds the ``ollama serve`` process it started.
    """

    name = "ollama"
    entry_type = OllamaModel
    #: Where an ``ollama serve`` of our own listens.
    host = "127.0.0.1"
    # Capabilities: Ollama's /v1 endpoints (the README's endpoint table).
    endpoints = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})

    def __init__(self, model_id: str, entry: OllamaModel, settings: BackendSettings) -> None:
        super().__init__(model_id, entry, settings)
        self._preload: asyncio.Task[None] | None = None

    @property
    def tag(self) -> str:
        """The model's Ollama tag."""
        return self.entry.model

    def upstream_model(self) -> str:
        """Ollama knows the model by its tag."""
        return self.tag

    @classmethod
    def uses_local_gpu(cls, entry: ModelEntry) -> bool:
        """Only an ``ollama serve`` of swapper's own runs on the GPUs swapper places models on;
        an Ollama that runs already manages its GPUs itself."""
        assert isinstance(entry, OllamaModel)
        return entry.serve

    def command(self) -> list[str]:
        """``ollama serve`` (its address comes from ``OLLAMA_HOST``)."""
        return [shutil.which(self.entry.binary) or self.entry.binary, "serve"]

    async def start(self) -> BackendHandle:
        """Start ``ollama serve`` when asked to; the preload begins once the server answers."""
        self._preload = None
        if not self.entry.serve:
            return BackendHandle(base_url=self.entry.base_url.rstrip("/"))
        port = free_port(self.host)
        argv = self.command()
        # The entry's env, then what swapper needs: its port, and no expiry of its own.
        ours = {"OLLAMA_HOST": f"{self.host}:{port}", "OLLAMA_KEEP_ALIVE": "-1"}
        # Its GPUs on top (they leave out CUDA_VISIBLE_DEVICES when the entry's env pins it).
        gpu_env = self.gpu_environment()
        env = child_environment(None, {**self.entry.env, **gpu_env, **ours})
        chosen = gpu_env.get("CUDA_VISIBLE_DEVICES")
        logger.info(
            "Starting %s: %s (OLLAMA_HOST=%s)%s",
            self.model_id,
            " ".join(argv),
            ours["OLLAMA_HOST"],
            f" on GPU(s) {chosen}" if chosen is not None else "",
        )
        process = await ManagedProcess.spawn(
            argv,
            name=self.model_id,
            env=env,
            on_line=self.log_sink,
            secrets=secret_env_values(self.entry.env),
        )
        return BackendHandle(
            base_url=f"http://{self.host}:{port}", pid=process.pid, port=port, process=process
        )

    async def _generate(self, handle: BackendHandle, keep_alive: int) -> None:
        """Ollama's preload (keep_alive -1) or unload (0); an error names Ollama's reason."""
        try:
            response = await self.http().post(
                f"{handle.base_url}/api/generate",
                json={"model": self.tag, "keep_alive": keep_alive, "stream": False},
            )
        except httpx.HTTPError as exc:
            raise BackendError(f"Ollama at {handle.base_url} did not answer: {exc}") from None
        if response.status_code != 200:
            try:
                reason = response.json().get("error") or response.text
            except ValueError:
                reason = response.text
            raise BackendError(
                f"Ollama refused {self.tag!r} (HTTP {response.status_code}): {reason}"
            )

    async def _listed(self, handle: BackendHandle) -> dict[str, Any] | None:
        """The model's ``/api/ps`` entry, or None when it is not loaded."""
        try:
            response = await self.http().get(f"{handle.base_url}/api/ps", timeout=5.0)
            models = response.json().get("models") or []
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return next(
            (
                m
                for m in models
                if isinstance(m, dict)
                and any(
                    isinstance(m.get(key), str) and same_model(m[key], self.tag)
                    for key in ("name", "model")
                )
            ),
            None,
        )

    async def ready(self, handle: BackendHandle) -> bool:
        """Preload once the server answers; ready when the preload is done and ps lists it."""
        if self._preload is None:
            if await self.http_status(f"{handle.base_url}/api/version") != 200:
                return False
            self._preload = asyncio.ensure_future(self._generate(handle, -1))
        if not self._preload.done():
            await asyncio.wait({self._preload}, timeout=0.5)
            return False
        self._preload.result()  # a refused preload fails the load with Ollama's reason
        return await self._listed(handle) is not None

    async def stop(self, handle: BackendHandle) -> None:
        """Unload (keep_alive 0), wait until ps no longer lists it; then stop our server."""
        if self._preload is not None and not self._preload.done():
            self._preload.cancel()
        deadline = time.monotonic() + self.settings.stop_timeout
        try:
            await asyncio.wait_for(self._generate(handle, 0), self.settings.stop_timeout)
            while await self._listed(handle) is not None and time.monotonic() < deadline:
                await asyncio.sleep(_POLL)
        except (BackendError, TimeoutError) as exc:
            if handle.process is None:
                logger.warning("%s: unloading from Ollama failed: %s", self.model_id, exc)
        if handle.process is not None:
            await handle.process.stop(self.settings.stop_timeout)

    async def kill(self, handle: BackendHandle) -> None:
        """Kill our server at once; an external one is asked to unload, briefly."""
        if handle.process is not None:
            await handle.process.stop(0)
            return
        try:
            await asyncio.wait_for(self._generate(handle, 0), 2.0)
        except (BackendError, TimeoutError) as exc:
            logger.warning("%s: unloading a silent Ollama failed: %s", self.model_id, exc)

    async def alive(self, handle: BackendHandle) -> bool:
        """Our server: while its process runs. An external one: while it answers."""
        if handle.process is not None:
            return handle.process.returncode is None
        return await self.http_status(f"{handle.base_url}/api/version") is not None

    async def wait_exit(self, handle: BackendHandle) -> str:
        """Our server's exit, a server that stops answering, or Ollama dropping the model;
        meanwhile keep the model pinned (keep_alive -1) against Ollama's own expiry."""
        process = handle.process
        while True:
            if process is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(process.wait()), _WATCH)
                    return await process.exit_reason()
            elif not await self.alive(handle):
                return f"Ollama at {handle.base_url} does not answer"
            else:
                await asyncio.sleep(_WATCH)
            if await self.http_status(f"{handle.base_url}/api/version") != 200:
                continue  # not answering just now: the process check (or alive) decides
            listed = await self._listed(handle)
            if listed is None:
                # Ollama's scheduler evicts idle runners, whatever their keep_alive, to fit a
                # model loaded past OLLAMA_MAX_LOADED_MODELS (or another client unloaded it).
                return Unloaded(
                    f"Ollama no longer lists {self.tag!r}: it unloaded the model itself (to fit "
                    "another model past OLLAMA_MAX_LOADED_MODELS, or at another client's request)"
                )
            if not _pinned(listed.get("expires_at")):
                with contextlib.suppress(BackendError):
                    await self._generate(handle, -1)

    def port_taken(self, handle: BackendHandle) -> bool:
        """Our server: whether something else took its port after it exited during the load."""
        if handle.process is None or handle.port is None:
            return False
        return port_in_use(self.host, handle.port)

    async def measure_vram_mb(self, handle: BackendHandle) -> float | None:
        """Ollama's own figure: ``size_vram`` in ``/api/ps`` (0 on a CPU: unknown)."""
        listed = await self._listed(handle)
        size = listed.get("size_vram") if listed else None
        return size / _MB if isinstance(size, int | float) and size > 0 else None

    async def aclose(self) -> None:
        """Drop a preload still running, then the HTTP clients."""
        if self._preload is not None and not self._preload.done():
            self._preload.cancel()
        await super().aclose()


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Provide the ``ollama`` backend."""
    register(OllamaBackend)
