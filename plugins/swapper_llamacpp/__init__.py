"""The llama.cpp backend: one ``llama-server`` process per resident model."""

from __future__ import annotations

import itertools
import os
import re
import shutil
from collections.abc import Callable

from swapper.backends.contract import (
    EVERY_GPU,
    Backend,
    BackendHandle,
    SubprocessBackend,
    arg_value,
    executable_problem,
    readable_file_problem,
)
from swapper.backends.hookspecs import hookimpl
from swapper.config import ModelEntry

__all__ = ["LlamaCppBackend", "LlamaCppModel", "register_backends"]


class LlamaCppModel(ModelEntry, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A model entry with ``backend: llamacpp``."""

    model_path: str
    ctx_size: int | None = None
    #: Default: $SWAPPER_LLAMA_SERVER, else ``llama-server`` on PATH.
    binary: str | None = None
    args: list[str] = []

    def __post_init__(self) -> None:
        if self.ctx_size is not None and not 0 <= self.ctx_size <= 2**31 - 1:
            raise ValueError("ctx_size: must be between 0 (the model's own) and 2147483647")


#: llama-server's HTTP worker threads unless the entry's args set --threads-http.
HTTP_THREADS = 32
#: What a model takes beyond its GGUF file before its size is measured: a share for the KV cache
#: and compute buffers, and the CUDA context.
SIZE_MARGIN = 0.1
CONTEXT_MB = 512.0
_SPLIT = re.compile(r"(.*)-\d{5}-of-(\d{5})\.gguf")


class LlamaCppBackend(SubprocessBackend[LlamaCppModel]):
    """Runs ``llama-server`` on a loopback port; ready when ``GET /health`` answers 200."""

    name = "llamacpp"
    entry_type = LlamaCppModel
    # Capabilities: every JSON endpoint llama-server answers (the README's endpoint table).
    endpoints = frozenset(
        {
            *("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"),
            *("/v1/messages", "/v1/messages/count_tokens", "/v1/rerank", "/infill"),
            *("/completion", "/tokenize", "/detokenize", "/apply-template"),
        }
    )

    @classmethod
    def declares(cls, entry: ModelEntry) -> dict[str, object]:
        """``context_length``: the entry's ``ctx_size`` when it sets one (0 is the model's own,
        unknown until loaded)."""
        assert isinstance(entry, LlamaCppModel)
        return {"context_length": entry.ctx_size} if entry.ctx_size else {}

    def binary(self) -> str:
        """The llama-server executable to run."""
        binary = self.entry.binary or os.environ.get("SWAPPER_LLAMA_SERVER") or "llama-server"
        return shutil.which(binary) or binary

    async def preflight(self) -> str | None:
        """The llama-server binary must be executable and the model file readable."""
        return executable_problem("llama-server binary", self.binary()) or readable_file_problem(
            "model file", self.entry.model_path
        )

    def gpu_count(self) -> int | None:
        """``--device``/``-dev`` or ``--main-gpu``/``-mg`` in the args name devices by CUDA's
        indexes, which only hold with every GPU visible: :data:`EVERY_GPU`. Else
        ``--tensor-split``/``-ts a,b,..`` spreads the model over one GPU per entry."""
        args = self.entry.args
        if arg_value(args, "--device", "-dev", "--main-gpu", "-mg") is not None:
            return EVERY_GPU
        split = arg_value(args, "--tensor-split", "-ts")
        if split is None:
            return None
        return max(1, len([part for part in split.replace("/", ",").split(",") if part.strip()]))

    def size_hint_mb(self) -> float | None:
        """The GGUF file's size plus a margin (a floor: the context's KV cache comes on top);
        None on the CPU (``gpu_enabled: false``) or when the file cannot be read."""
        if not self.settings.gpu_enabled:
            return None
        path = self.entry.model_path
        # A split GGUF (``name-00001-of-00003.gguf``) loads every part.
        split = _SPLIT.fullmatch(path)
        parts = (
            [f"{split[1]}-{n:05d}-of-{split[2]}.gguf" for n in range(1, int(split[2]) + 1)]
            if split
            else [path]
        )
        try:
            size = sum(os.path.getsize(part) for part in parts)
        except OSError:
            return None
        return size / 2**20 * (1 + SIZE_MARGIN) + CONTEXT_MB

    def accelerator_args(self) -> list[str]:
        """``-ngl 999`` offloads every layer to the GPU; ``-ngl 0`` keeps the model on the CPU.

        Metal needs no flag: llama.cpp builds with Metal use it whenever layers are offloaded.
        """
        return ["-ngl", "999" if self.settings.gpu_enabled else "0"]

    def command(self, port: int) -> list[str]:
        """``llama-server -m PATH --host 127.0.0.1 --port N [-c CTX] -ngl K --alias ID
        --threads-http T [args]``."""
        entry = self.entry
        argv = [self.binary(), "-m", entry.model_path, "--host", self.host, "--port", str(port)]
        if entry.ctx_size is not None:
            argv += ["-c", str(entry.ctx_size)]
        argv += self.accelerator_args()
        # The entry's own args come last, so they win over ours (llama-server takes the last).
        argv += ["--alias", self.model_id, "--threads-http", str(HTTP_THREADS), *entry.args]
        return argv

    def max_connections(self) -> int:
        """One connection per HTTP thread, less one kept free for health probes.

        llama-server parks a thread on each kept-alive connection; with more connections than
        threads, a new one waits for an idle one to time out (5 s).
        """
        threads = HTTP_THREADS
        args = self.entry.args
        for flag, value in itertools.pairwise(args):
            if flag in ("--threads-http", "-tht") and value.isdigit():
                threads = int(value)
        return max(1, threads - 1)

    async def ready(self, handle: BackendHandle) -> bool:
        """``/health`` is 503 while the model loads and 200 once it can serve."""
        return await self.http_status(f"{handle.base_url}/health") == 200


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Provide the ``llamacpp`` backend."""
    register(LlamaCppBackend)
