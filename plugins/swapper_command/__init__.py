"""The ``command`` backend: any server started from a command line, as llama-swap runs them.

The entry's ``command`` is run in its own process group (:class:`SubprocessBackend`) with
``${PORT}`` (a free loopback port swapper picked) and ``${MODEL_ID}`` (swapper's id) substituted
in every argument. The server is ready once ``GET <ready>`` answers 200. It is stopped with
``stop_command`` when one is given (for servers that outlive their launcher, such as a Docker
container), else with SIGTERM, a grace period and SIGKILL; either way swapper then waits for
the process to exit, and SIGKILLs its group if it has not within ``stop_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from swapper.backends.contract import (
    Backend,
    BackendHandle,
    SubprocessBackend,
    executable_problem,
)
from swapper.backends.hookspecs import hookimpl
from swapper.config import ModelEntry

__all__ = ["DEFAULT_ENDPOINTS", "CommandBackend", "CommandModel", "register_backends"]

logger = logging.getLogger("swapper.backend.command")

#: What a server started from a command line is assumed to serve unless ``endpoints`` says.
DEFAULT_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
_PLACEHOLDERS = ("${PORT}", "${MODEL_ID}")


class CommandModel(ModelEntry, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A model entry with ``backend: command``."""

    #: The argv that serves the model; ``${PORT}`` and ``${MODEL_ID}`` are substituted.
    command: list[str]
    #: A GET path that answers 200 once the server is ready.
    ready: str = "/health"
    #: The request paths the server answers; None: chat, completions and embeddings.
    endpoints: list[str] | None = None
    #: An argv that stops the server (substituted like ``command``); None: SIGTERM → SIGKILL.
    stop_command: list[str] | None = None
    #: The name the server knows the model by; requests carry it, responses get swapper's id.
    upstream_model: str | None = None

    def __post_init__(self) -> None:
        if not self.command or not self.command[0].strip():
            raise ValueError("command: must be a non-empty list, the program first")
        if not any("${PORT}" in arg for arg in self.command):
            raise ValueError(
                "command: must contain ${PORT}, the loopback port swapper gives the server"
            )
        if not self.ready.startswith("/"):
            raise ValueError("ready: must be a path starting with /, e.g. /health")
        if self.endpoints is not None:
            if not self.endpoints:
                raise ValueError("endpoints: must list at least one path")
            bad = [path for path in self.endpoints if not path.startswith("/")]
            if bad:
                raise ValueError(f"endpoints: {bad[0]!r} must be a path starting with /")
        if self.stop_command is not None and (
            not self.stop_command or not self.stop_command[0].strip()
        ):
            raise ValueError("stop_command: must be a non-empty list, the program first")
        if self.upstream_model is not None and not self.upstream_model.strip():
            raise ValueError("upstream_model: must not be empty")


def substitute(argv: list[str], port: int, model_id: str) -> list[str]:
    """``argv`` with ``${PORT}`` and ``${MODEL_ID}`` replaced in every argument."""
    values = {"${PORT}": str(port), "${MODEL_ID}": model_id}
    out = []
    for arg in argv:
        for name in _PLACEHOLDERS:
            arg = arg.replace(name, values[name])
        out.append(arg)
    return out


class CommandBackend(SubprocessBackend[CommandModel]):
    """Runs the entry's ``command``; ready when ``GET ready`` answers 200."""

    name = "command"
    entry_type = CommandModel

    endpoints = DEFAULT_ENDPOINTS

    @classmethod
    def serves(cls, entry: ModelEntry) -> frozenset[str]:
        """The entry's ``endpoints``, else chat, completions and embeddings."""
        listed = entry.endpoints if isinstance(entry, CommandModel) else None
        return frozenset(listed) if listed else cls.endpoints

    def upstream_model(self) -> str | None:
        """``upstream_model`` when the server knows the model by another name."""
        return self.entry.upstream_model

    async def preflight(self) -> str | None:
        """The program (the command's first word) must be executable."""
        return executable_problem("command", self.entry.command[0])

    def command(self, port: int) -> list[str]:
        """The entry's ``command``, substituted."""
        return substitute(self.entry.command, port, self.model_id)

    async def ready(self, handle: BackendHandle) -> bool:
        """``GET ready`` answers 200."""
        return await self.http_status(f"{handle.base_url}{self.entry.ready}") == 200

    async def stop(self, handle: BackendHandle) -> None:
        """``stop_command`` if given (then wait for the server to exit), else SIGTERM → SIGKILL."""
        stop_command = self.entry.stop_command
        process = handle.process
        if stop_command is None or process is None or process.returncode is not None:
            await super().stop(handle)
            return
        argv = substitute(stop_command, handle.port or 0, self.model_id)
        grace = self.settings.stop_timeout
        try:
            stopper = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
        except OSError as exc:
            logger.warning("%s: stop_command could not run: %s", self.model_id, exc)
        else:
            try:
                _, stderr = await asyncio.wait_for(stopper.communicate(), grace)
            except TimeoutError:
                stopper.kill()
                await stopper.wait()
                logger.warning("%s: stop_command did not finish in %ss", self.model_id, grace)
            else:
                if stopper.returncode:
                    logger.warning(
                        "%s: stop_command exited with %s: %s",
                        self.model_id,
                        stopper.returncode,
                        stderr.decode(errors="replace").strip()[-300:],
                    )
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), grace)
        except TimeoutError:
            logger.warning(
                "%s: still running %ss after stop_command; killing it", self.model_id, grace
            )
        # Reaps it; SIGKILLs what is left of its group (at once if it has already exited).
        await process.stop(0)


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Provide the ``command`` backend."""
    register(CommandBackend)
