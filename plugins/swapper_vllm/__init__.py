"""The vLLM backend: one ``vllm serve`` process per resident model, optionally put to sleep.

vLLM keeps its port closed while it loads (connection refused is normal) and answers
``GET /health`` with 200 once ready. It reserves ``gpu_memory_utilization`` of the GPU's total
memory up front and refuses to start when that much is not free, so swapper's placement counts
that share as its size until it has measured the real one. With ``sleep_mode``, an unload is
``POST /sleep?level=N`` (weights and KV cache off the GPU, the process and its CUDA context stay)
and a load is ``POST /wake_up``: far faster than a cold start. Level 2 discards the weights
instead of keeping them in host memory, so its wake is vLLM's documented three steps: wake the
weights' memory, ``reload_weights`` from disk through ``/collective_rpc``, wake the KV cache. A
plain ``/wake_up`` there would serve a model with uninitialised weights.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from typing import Literal

import httpx

from swapper.backends.contract import (
    Backend,
    BackendHandle,
    SubprocessBackend,
    arg_value,
    executable_problem,
)
from swapper.backends.hookspecs import hookimpl
from swapper.config import ModelEntry
from swapper.errors import BackendError

__all__ = ["VllmBackend", "VllmModel", "register_backends"]

#: vLLM's own default share of GPU memory.
DEFAULT_UTILIZATION = 0.9


#: vLLM's parallel sizes, whose product is the number of GPUs (its "world size") it uses.
_PARALLEL = (
    ("--tensor-parallel-size", "-tp"),
    ("--pipeline-parallel-size", "-pp"),
    ("--data-parallel-size", "-dp"),
)


def _sets_parallelism(args: list[str]) -> bool:
    """The entry's own args choose how vLLM spreads over GPUs (a parallel size, or a
    ``--config`` file that may): swapper then adds no ``--tensor-parallel-size``."""
    flags = [f for pair in _PARALLEL for f in pair]
    return arg_value(args, *flags, "--config") is not None


def declared_gpus(args: list[str]) -> int | None:
    """The GPUs the args make vLLM use: the product of its parallel sizes; None when they set
    none (or one is not a number: vLLM refuses those itself)."""
    world, found = 1, False
    for flags in _PARALLEL:
        value = arg_value(args, *flags)
        if value is None:
            continue
        if not value.strip().isdigit() or int(value) < 1:
            return None
        world, found = world * int(value), True
    return world if found else None


class VllmModel(ModelEntry, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A model entry with ``backend: vllm``."""

    #: A Hugging Face id or a local path.
    model: str
    #: The name vLLM serves the model under; default: swapper's id.
    served_model_name: str | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    binary: str = "vllm"
    args: list[str] = []
    #: Unload by sleeping (``POST /sleep``) and load by waking, while the process lives.
    sleep_mode: bool = False
    #: 1: weights to CPU RAM (fast wake); 2: weights dropped too (reloaded from disk on wake).
    sleep_level: Literal[1, 2] = 1

    def __post_init__(self) -> None:
        if self.sleep_level != 1 and not self.sleep_mode:
            raise ValueError("sleep_level: needs sleep_mode: true")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization: must be > 0 and <= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len: must be >= 1")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("served_model_name: must not be empty")


class VllmBackend(SubprocessBackend[VllmModel]):
    """Runs ``vllm serve MODEL --host 127.0.0.1 --port N --served-model-name NAME``."""

    name = "vllm"
    entry_type = VllmModel
    # Capabilities: the OpenAI and Anthropic endpoints vLLM serves (the README's endpoint table).
    endpoints = frozenset(
        {
            *("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"),
            *("/v1/rerank", "/v1/audio/transcriptions", "/v1/messages"),
        }
    )

    @classmethod
    def declares(cls, entry: ModelEntry) -> dict[str, object]:
        """``context_length``: the entry's ``max_model_len`` when it sets one."""
        assert isinstance(entry, VllmModel)
        return {"context_length": entry.max_model_len} if entry.max_model_len else {}

    #: What a sleeping vLLM still holds: its CUDA context (about 1 GB), until measured.
    sleep_residual_mb = 1024.0

    @property
    def spec(self) -> VllmModel:
        """The model entry (kept as a name the code reads well with)."""
        return self.entry

    @property
    def can_sleep(self) -> bool:  # type: ignore[override]
        """True with ``sleep_mode``."""
        return self.spec.sleep_mode

    def served_name(self) -> str:
        """The name vLLM serves (and checks in every request's ``model``)."""
        return self.spec.served_model_name or self.model_id

    def upstream_model(self) -> str:
        """vLLM refuses requests naming anything but its served name."""
        return self.served_name()

    async def preflight(self) -> str | None:
        """The ``vllm`` binary must be executable; the model may be a Hugging Face id."""
        return executable_problem("vllm binary", shutil.which(self.spec.binary) or self.spec.binary)

    def command(self, port: int) -> list[str]:
        """The ``vllm serve`` command line; the entry's own ``args`` come last."""
        spec = self.spec
        argv = [
            shutil.which(spec.binary) or spec.binary,
            "serve",
            spec.model,
            "--host",
            self.host,
            "--port",
            str(port),
            "--served-model-name",
            self.served_name(),
        ]
        if spec.gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
        if spec.max_model_len is not None:
            argv += ["--max-model-len", str(spec.max_model_len)]
        if spec.sleep_mode:
            argv.append("--enable-sleep-mode")
        if self.gpus and len(self.gpus) > 1 and not _sets_parallelism(spec.args):
            # Split over several GPUs: one tensor-parallel rank on each (vLLM's default is 1).
            argv += ["--tensor-parallel-size", str(len(self.gpus))]
        return argv + list(spec.args)

    def environment(self) -> Mapping[str, str] | None:
        """Sleep endpoints exist only in vLLM's dev mode."""
        if not self.spec.sleep_mode:
            return None
        return {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}

    #: It reserves its share of every GPU it runs on: a split never lowers that.
    splits = False

    def gpu_count(self) -> int | None:
        """Tensor x pipeline x data parallel sizes from the entry's args, when they set any."""
        return declared_gpus(self.spec.args)

    def estimate_vram_mb(self, total_mb: float | None) -> float | None:
        """vLLM reserves its utilization share of the GPU's total, whatever the model's size."""
        if total_mb is None:
            return None
        return (self.spec.gpu_memory_utilization or DEFAULT_UTILIZATION) * total_mb

    async def ready(self, handle: BackendHandle) -> bool:
        """The port is closed while loading; ``/health`` is 200 once the engine serves."""
        return await self.http_status(f"{handle.base_url}/health") == 200

    async def _post(self, handle: BackendHandle, path: str, body: object = None) -> None:
        try:
            response = await self.http().post(f"{handle.base_url}{path}", json=body)
        except httpx.HTTPError as exc:
            raise BackendError(f"vLLM did not answer {path}: {exc}") from None
        if response.status_code != 200:
            raise BackendError(
                f"vLLM answered {path} with HTTP {response.status_code}: {response.text[:200]}"
            )

    async def sleep(self, handle: BackendHandle) -> None:
        """``POST /sleep?level=N``: the process stays, most of its VRAM is freed."""
        await self._post(handle, f"/sleep?level={self.spec.sleep_level}")

    async def wake(self, handle: BackendHandle) -> None:
        """``POST /wake_up`` (level 2: weights, ``reload_weights``, KV cache); readiness is then
        ``/health`` as after a start."""
        if self.spec.sleep_level == 1:
            await self._post(handle, "/wake_up")
            return
        await self._post(handle, "/wake_up?tags=weights")
        await self._post(handle, "/collective_rpc", {"method": "reload_weights"})
        await self._post(handle, "/wake_up?tags=kv_cache")


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Provide the ``vllm`` backend."""
    register(VllmBackend)
