"""An example third-party backend: llama-server, configured with keys of its own."""

from __future__ import annotations

import os
from collections.abc import Callable

from swapper.backends import Backend, BackendHandle, SubprocessBackend, hookimpl
from swapper.config import ModelEntry


class ExampleModel(ModelEntry, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A model entry with ``backend: example``."""

    gguf: str
    context: int = 512


class ExampleBackend(SubprocessBackend[ExampleModel]):
    """Runs ``$SWAPPER_LLAMA_SERVER`` on the entry's ``gguf`` file."""

    name = "example"
    entry_type = ExampleModel

    def command(self, port: int) -> list[str]:
        """llama-server on the loopback port swapper picked, CPU only."""
        binary = os.environ.get("SWAPPER_LLAMA_SERVER", "llama-server")
        return [
            binary,
            "-m",
            self.entry.gguf,
            "--host",
            self.host,
            "--port",
            str(port),
            "-c",
            str(self.entry.context),
            "-ngl",
            "0",
            "--alias",
            self.model_id,
        ]

    async def ready(self, handle: BackendHandle) -> bool:
        """Ready when /health answers 200."""
        return await self.http_status(f"{handle.base_url}/health") == 200


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Provide the ``example`` backend."""
    register(ExampleBackend)
