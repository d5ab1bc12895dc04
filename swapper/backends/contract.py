"""The backend contract: what a plugin's backend object must do.

A plugin registers a :class:`Backend` subclass (see :mod:`swapper.backends.hookspecs`). The class names
its backend kind and the schema of its model entries (``class MyBackend(Backend[MyModel])`` with
``entry_type = MyModel``, so ``self.entry`` is a ``MyModel`` to the type checker too); one
instance serves one configured model,
and the coordinator drives it through ``start`` → ``ready``... → ``stop``, asking ``alive`` /
``wait_exit`` to notice a crash. Backends that run a command line extend
:class:`SubprocessBackend`, which owns the process and leaves them only ``command`` and ``ready``.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Generic

import httpcore
import httpx

# typing.TypeVar takes a default only from Python 3.13 on (PEP 696).
from typing_extensions import TypeVar

from swapper.backends.argv import arg_value, redact_argv
from swapper.backends.output import secret_env_values
from swapper.backends.process import ManagedProcess, free_port, port_in_use
from swapper.config import ModelEntry

__all__ = [
    "EVERY_GPU",
    "Backend",
    "BackendHandle",
    "BackendSettings",
    "EntryT",
    "SubprocessBackend",
    "arg_value",
    "child_environment",
    "executable_problem",
    "readable_file_problem",
    "redact_argv",
]

logger = logging.getLogger("swapper.backend")

#: A backend's model-entry type. Covariant: a backend only reads its entry (a frozen Struct), so
#: a ``Backend[LlamaCppModel]`` is a ``Backend[ModelEntry]``; that default lets the registry and the
#: coordinator hold any backend as a plain ``Backend``.
EntryT = TypeVar("EntryT", bound=ModelEntry, default=ModelEntry, covariant=True)


#: :meth:`Backend.gpu_count` for args that pick devices themselves in a way swapper cannot map
#: onto its GPUs (llama.cpp's ``--device``, ``--main-gpu``): the model gets every GPU.
EVERY_GPU = 0


@dataclass(frozen=True)
class BackendSettings:
    """Service-wide settings a backend maps onto its own command line."""

    gpu_enabled: bool = True
    metal_acceleration: bool = False
    stop_timeout: float = 10.0


@dataclass
class BackendHandle:
    """A started backend: where to send requests and which process serves them."""

    base_url: str
    pid: int | None = None
    port: int | None = None
    process: ManagedProcess | None = field(default=None, repr=False)
    #: Connections the backend serves at once; swapper opens no more (None: no stated limit).
    max_connections: int | None = None


class Backend(abc.ABC, Generic[EntryT]):
    """One model served by one backend kind. Subclass it and register the class in a plugin."""

    #: The ``backend:`` value configs use to select this kind.
    name: ClassVar[str]
    #: The schema of this kind's model entries (extends :class:`ModelEntry`); config decoding
    #: gives ``__init__`` an instance of it. (Not a ClassVar: a ClassVar cannot name EntryT.)
    entry_type: type[EntryT]

    # -- capabilities (issue 11) -------------------------------------------------------------
    #: The API endpoints this kind serves, by canonical path (the README's endpoint table);
    #: a request for any other endpoint to one of its models is a 404, and nothing loads.
    endpoints: ClassVar[frozenset[str]] = frozenset(
        {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
    )

    @classmethod
    def serves(cls, entry: ModelEntry) -> frozenset[str]:
        """The endpoints the model of ``entry`` serves; default :attr:`endpoints` (a kind whose
        entries choose theirs overrides this)."""
        return cls.endpoints

    @classmethod
    def declares(cls, entry: ModelEntry) -> dict[str, object]:
        """What ``/v1/models`` shows of the model besides its id (e.g. ``context_length``)."""
        return {}

    # -- lifecycle ----------------------------------------------------------------------------

    def __init__(self, model_id: str, entry: EntryT, settings: BackendSettings) -> None:
        self.model_id = model_id
        self.entry = entry
        self.settings = settings
        #: Where the backend's output lines go besides the log (the coordinator's per-model log).
        self.log_sink: Callable[[str], None] | None = None
        #: The GPUs (NVML indexes) placement put the model on, set before each start; None: no
        #: GPU is known, and CUDA_VISIBLE_DEVICES is left as swapper's own.
        self.gpus: list[int] | None = None
        self._probe_pool: httpcore.AsyncConnectionPool | None = None
        self._client: httpx.AsyncClient | None = None

    def http(self) -> httpx.AsyncClient:
        """A client for the backend's control calls (load, unload, sleep): not the hot path."""
        if self._client is None:
            # trust_env off: a proxy set for the outside world must not catch loopback calls.
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(10.0, read=None), trust_env=False
            )
        return self._client

    async def http_status(self, url: str, timeout: float = 1.0) -> int | None:
        """GET ``url`` and return the HTTP status, or None when nothing answers (for ``ready``)."""
        if self._probe_pool is None:
            # Probes are tiny and frequent during a load; a pool of their own keeps them off
            # the request path and reuses one connection.
            self._probe_pool = httpcore.AsyncConnectionPool(max_connections=2, keepalive_expiry=5)
        limits = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        try:
            response = await self._probe_pool.request("GET", url, extensions={"timeout": limits})
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError):
            return None
        return response.status

    async def aclose(self) -> None:
        """Release what the backend object holds (not the model: that is ``stop``)."""
        if self._probe_pool is not None:
            await self._probe_pool.aclose()
            self._probe_pool = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def preflight(self) -> str | None:
        """What would make a start fail for sure, checked before anything is evicted for it.

        Return a one-line problem naming what was tried (a missing model file, a binary that is
        not executable), or None when nothing local can be checked or all is well.
        """
        return None

    def gpu_environment(self) -> dict[str, str]:
        """The GPU variables the child gets on top of the entry's ``env`` (these win): nothing
        when no GPU is known; where the entry's ``env`` sets ``CUDA_VISIBLE_DEVICES`` (the
        operator's pin) only ``CUDA_DEVICE_ORDER``, its own or ``PCI_BUS_ID``; else
        ``CUDA_VISIBLE_DEVICES`` for the GPUs placement chose, in NVML's (PCI bus) order."""
        if self.gpus is None:
            return {}
        # CUDA counts the fastest GPU first by default; NVML's indexes (placement's, and those
        # a pin is read as) follow the PCI bus.
        own = self.entry.env
        if "CUDA_VISIBLE_DEVICES" in own:
            return {"CUDA_DEVICE_ORDER": own.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID")}
        devices = ",".join(str(i) for i in self.gpus) if self.gpus else "-1"
        return {"CUDA_VISIBLE_DEVICES": devices, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}

    # -- GPUs (issue 13) ------------------------------------------------------------------------

    @classmethod
    def uses_local_gpu(cls, entry: ModelEntry) -> bool:
        """False when the model runs on no GPU of this node (a remote server): placement puts
        it on none, and its entry may not name ``gpus``. Default True."""
        return True

    def gpu_count(self) -> int | None:
        """How many GPUs the entry's own args make the backend use (vLLM's parallel sizes,
        llama.cpp's ``--tensor-split``): ``gpus: auto`` then picks that many, and a shorter
        ``gpus`` list is refused. :data:`EVERY_GPU`: the args pick devices in a way swapper
        cannot map, so the model gets every GPU. None (default): the args say nothing."""
        return None

    def size_hint_mb(self) -> float | None:
        """A floor for the whole model's VRAM from its files (a GGUF's size on disk plus a
        margin), used when nothing was measured or configured; None: unknown (default)."""
        return None

    #: False when the backend reserves a share of each GPU whatever its size (vLLM): splitting
    #: it over more GPUs would not lower what it takes on each, so ``auto`` never does.
    splits: ClassVar[bool] = True

    def accelerator_args(self) -> list[str]:
        """Command-line arguments for ``gpu_enabled`` / ``metal_acceleration``; none by default."""
        return []

    def upstream_model(self) -> str | None:
        """The name the backend itself knows the model by, when it is not swapper's id.

        Requests are then rewritten to name it, and responses rewritten back to swapper's id.
        """
        return None

    def upstream_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Headers every forwarded request carries to the backend, as sent on the wire (a
        remote server's ``Authorization``); none by default. Never logged or shown."""
        return ()

    def estimate_vram_mb(self, total_mb: float | None) -> float | None:
        """VRAM the model will take on one GPU, in MiB, before anything was measured; None:
        unknown.

        ``total_mb`` is that GPU's total memory (None without a GPU); a model on several GPUs
        is charged this on each (the largest figure where their totals differ).
        """
        return None

    async def measure_vram_mb(self, handle: BackendHandle) -> float | None:
        """VRAM the resident model holds, when the backend can tell (None: swapper asks NVML
        for the memory of the backend's process tree)."""
        return None

    #: True when the backend can sleep: free most of its VRAM while the process lives on.
    can_sleep: ClassVar[bool] = False
    #: VRAM in MiB a sleeping backend still holds (its CUDA context), until measured.
    sleep_residual_mb: ClassVar[float] = 0.0

    async def sleep(self, handle: BackendHandle) -> None:
        """Release the model's VRAM but keep the process (only when ``can_sleep``)."""
        raise NotImplementedError(f"backend {self.name!r} cannot sleep")

    async def wake(self, handle: BackendHandle) -> None:
        """Bring a sleeping model back; readiness is then probed with :meth:`ready`."""
        raise NotImplementedError(f"backend {self.name!r} cannot sleep")

    @abc.abstractmethod
    async def start(self) -> BackendHandle:
        """Start serving the model; return as soon as it is starting (readiness is polled)."""

    @abc.abstractmethod
    async def ready(self, handle: BackendHandle) -> bool:
        """One quick readiness probe: True once the model can answer requests."""

    @abc.abstractmethod
    async def stop(self, handle: BackendHandle) -> None:
        """Stop serving; return only when the model's resources are released."""

    @abc.abstractmethod
    async def alive(self, handle: BackendHandle) -> bool:
        """False once the backend has died."""

    async def kill(self, handle: BackendHandle) -> None:
        """Stop a backend that no longer answers, without a grace period. Default: :meth:`stop`."""
        await self.stop(handle)

    def port_taken(self, handle: BackendHandle) -> bool:
        """After an exit during load: did another process take the backend's port? Default no."""
        return False

    async def wait_exit(self, handle: BackendHandle) -> str:
        """Return (with a reason) when the backend dies. The default polls :meth:`alive`."""
        while await self.alive(handle):
            await asyncio.sleep(1.0)
        return "backend stopped answering"


class Unloaded(str):
    """A :meth:`Backend.wait_exit` reason meaning the backend's own server unloaded the model
    (Ollama's scheduler evicting it to fit another): swapper marks it UNLOADED, not FAILED."""


def executable_problem(what: str, binary: str) -> str | None:
    """Why ``binary`` (a path, or a name looked up on PATH) cannot be run; None when it can."""
    if os.sep not in binary:
        return (
            None
            if shutil.which(binary)
            else (f"{what} {binary!r} not found on PATH ({os.environ.get('PATH', '')})")
        )
    if not os.path.isfile(binary):
        return f"{what} {binary!r} does not exist"
    if not os.access(binary, os.X_OK):
        return f"{what} {binary!r} is not executable"
    return None


def readable_file_problem(what: str, path: str) -> str | None:
    """Why ``path`` cannot be read as a file; None when it can."""
    if not os.path.exists(path):
        return f"{what} {path!r} does not exist"
    if not os.path.isfile(path):
        return f"{what} {path!r} is not a file"
    if not os.access(path, os.R_OK):
        return f"{what} {path!r} is not readable"
    return None


def child_environment(
    base: Mapping[str, str] | None, extra: Mapping[str, str]
) -> Mapping[str, str] | None:
    """A child's environment: ``base`` (None: swapper's own) with ``extra`` (an entry's ``env``)
    set on top; None when that is swapper's own, unchanged."""
    if not extra:
        return base
    return {**(os.environ if base is None else base), **extra}


class SubprocessBackend(Backend[EntryT]):
    """A backend that runs one command line listening on a loopback port swapper picks."""

    host: ClassVar[str] = "127.0.0.1"

    @abc.abstractmethod
    def command(self, port: int) -> list[str]:
        """The argv that serves the model on ``127.0.0.1:port``."""

    def environment(self) -> Mapping[str, str] | None:
        """The child's environment before the entry's ``env``; None inherits swapper's."""
        return None

    async def start(self) -> BackendHandle:
        """Pick a free loopback port and start the command, with the entry's ``env`` on top."""
        port = free_port(self.host)
        argv = self.command(port)
        gpu_env = self.gpu_environment()
        env = child_environment(self.environment(), {**self.entry.env, **gpu_env})
        chosen = gpu_env.get("CUDA_VISIBLE_DEVICES")
        logger.info(
            "Starting %s: %s%s%s",
            self.model_id,
            " ".join(redact_argv(argv)),
            f" on GPU(s) {chosen}" if chosen is not None else "",
            f" (env: {', '.join(sorted(self.entry.env))})" if self.entry.env else "",
        )
        process = await ManagedProcess.spawn(
            argv,
            name=self.model_id,
            env=env,
            on_line=self.log_sink,
            secrets=secret_env_values(self.entry.env),
        )
        return BackendHandle(
            base_url=f"http://{self.host}:{port}",
            pid=process.pid,
            port=port,
            process=process,
            max_connections=self.max_connections(),
        )

    def max_connections(self) -> int | None:
        """How many connections the started command serves at once (None: no stated limit)."""
        return None

    async def stop(self, handle: BackendHandle) -> None:
        """SIGTERM the process group, wait ``stop_timeout``, SIGKILL; return once reaped."""
        if handle.process is not None:
            await handle.process.stop(self.settings.stop_timeout)

    async def kill(self, handle: BackendHandle) -> None:
        """SIGKILL the process group at once (a frozen process may never handle SIGTERM)."""
        if handle.process is not None:
            await handle.process.stop(0)

    def port_taken(self, handle: BackendHandle) -> bool:
        """True when something else now listens on the port the backend was given."""
        return handle.port is not None and port_in_use(self.host, handle.port)

    async def alive(self, handle: BackendHandle) -> bool:
        """True while the process runs."""
        return handle.process is not None and handle.process.returncode is None

    async def wait_exit(self, handle: BackendHandle) -> str:
        """Return when the process exits, with its status and last output lines."""
        assert handle.process is not None
        return await handle.process.exit_reason()
