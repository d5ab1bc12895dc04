"""The service-wide sections of a config file (``swapper``, ``server``, ``timeouts``,
``activity``, ``peers``) as typed msgspec Structs, each checking its own values.

swapper.config decodes a whole file into these and the per-backend model entries; what is here
knows nothing of models or backends.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

__all__ = [
    "DEFAULT_RESERVE_MB",
    "ActivitySettings",
    "PeerSettings",
    "ServerSettings",
    "SwapperSettings",
    "TimeoutSettings",
    "valid_name",
]


def valid_name(name: str) -> bool:
    """Model ids and aliases: what a client can send as ``model`` and see in a URL path."""
    return bool(name) and name.isprintable() and not any(c.isspace() or c == "/" for c in name)


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


#: MiB kept free on a GPU unless ``vram_reserve_mb`` says otherwise.
DEFAULT_RESERVE_MB = 512.0


def _check_per_gpu(name: str, value: float | dict[int, float], valid: str) -> None:
    """A number, or a map by GPU index, each value passing ``valid`` ("> 0" or ">= 0")."""
    items = value.items() if isinstance(value, dict) else [(None, value)]
    for index, number in items:
        where = name if index is None else f"{name}.{index}"
        if index is not None and index < 0:
            raise ValueError(f"{where}: a GPU index must be >= 0")
        ok = math.isfinite(number) and (number > 0 if valid == "> 0" else number >= 0)
        if not ok:
            raise ValueError(f"{where}: must be a number {valid}")


class SwapperSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The ``swapper:`` section: how models share the GPU."""

    mode: Literal["single-active", "multi-active"] = "single-active"
    max_concurrent_models: int = 1
    #: Seconds a load may take before the model is FAILED and its process killed.
    model_swap_timeout: float = 300.0
    #: False: backends start with no GPU offload.
    gpu_enabled: bool = True
    metal_acceleration: bool = False
    #: Loaded at startup, with no request needed.
    default_model: str | None = None
    #: Anti-thrash fairness bound: how many later requests for the resident model may overtake
    #: a request waiting for another model before the resident one drains and the swap happens.
    max_overtake: int = 8
    #: Seconds between SIGTERM and SIGKILL when a backend is stopped.
    stop_timeout: float = 10.0
    #: Seconds in-flight requests get to finish when swapper itself is told to stop.
    shutdown_timeout: float = 30.0
    #: Requests that may wait for a model (all models together); beyond it, 429 + Retry-After.
    max_queue: int = 512
    #: Consecutive failed starts after which a model backs off instead of retrying at once.
    max_start_failures: int = 3
    #: First back-off in seconds; it doubles with each further failure, up to the maximum.
    retry_backoff: float = 5.0
    retry_backoff_max: float = 300.0
    #: While a streaming request waits for its model: SSE comment lines (invisible to chat
    #: clients, but they reset read timeouts), progress in ``delta.reasoning_content`` (Open
    #: WebUI's "thinking" block), or nothing.
    loading_feedback: Literal["comments", "reasoning", "none"] = "comments"
    loading_feedback_interval: float = 3.0
    #: Seconds a resident model may sit idle before it is unloaded (a model's ``ttl`` wins);
    #: 0 means never.
    default_ttl: float = 0.0
    #: VRAM (MiB) models may use together on each GPU, or a map by NVML index
    #: (``{0: 18000, 1: 22000}``; a GPU it leaves out gets its total less its reserve); never
    #: more than a GPU's total (swapper warns at startup when it caps one);
    #: default: each GPU's total less ``vram_reserve_mb``. With no GPU known, a number is one
    #: budget for every model; without a GPU and without this, placement counts models only.
    vram_budget_mb: float | dict[int, float] | None = None
    #: MiB kept free on each GPU, or a map by NVML index (unlisted GPUs keep 512).
    vram_reserve_mb: float | dict[int, float] = DEFAULT_RESERVE_MB
    #: Seconds to wait, before a load, for NVML to show an unloaded model's memory free again.
    vram_release_timeout: float = 10.0
    #: Seconds a model chosen for eviction gets to finish its requests; then they are cut off
    #: with an error and it is unloaded.
    drain_timeout: float = 120.0
    #: Where measured VRAM sizes are kept across restarts; default
    #: ``$XDG_STATE_HOME/swapper/state.json`` (``~/.local/state/...``).
    state_file: str | None = None

    def __post_init__(self) -> None:
        if self.max_concurrent_models < 1:
            raise ValueError("max_concurrent_models: must be >= 1")
        if self.mode == "single-active" and self.max_concurrent_models != 1:
            raise ValueError(
                "max_concurrent_models: single-active mode needs exactly 1 "
                "(use mode: multi-active for more)"
            )
        if self.vram_budget_mb is not None:
            _check_per_gpu("vram_budget_mb", self.vram_budget_mb, "> 0")
        _check_per_gpu("vram_reserve_mb", self.vram_reserve_mb, ">= 0")
        for name in (
            "model_swap_timeout",
            "stop_timeout",
            "shutdown_timeout",
            "retry_backoff",
            "retry_backoff_max",
            "loading_feedback_interval",
            "vram_release_timeout",
            "drain_timeout",
        ):
            if not _positive(getattr(self, name)):
                raise ValueError(f"{name}: must be a number > 0")
        if self.max_overtake < 0:
            raise ValueError("max_overtake: must be >= 0")
        if self.max_queue < 0:
            raise ValueError("max_queue: must be >= 0")
        if self.max_start_failures < 1:
            raise ValueError("max_start_failures: must be >= 1")
        if not (math.isfinite(self.default_ttl) and self.default_ttl >= 0):
            raise ValueError("default_ttl: must be a number >= 0 (0 = never)")

    def reserve_for(self, index: int) -> float:
        """MiB kept free on GPU ``index``."""
        reserve = self.vram_reserve_mb
        if isinstance(reserve, dict):
            return reserve.get(index, DEFAULT_RESERVE_MB)
        return reserve

    def budget_for(self, index: int, total_mb: float | None) -> float | None:
        """What models may use on GPU ``index`` of ``total_mb``; None: unknown. A budget is
        never more than the GPU's total (a scalar once meant "all GPUs together")."""
        budget = self.vram_budget_mb
        chosen = budget.get(index) if isinstance(budget, dict) else budget
        if chosen is not None:
            return chosen if total_mb is None else min(chosen, total_mb)
        if total_mb is None:
            return None
        return max(0.0, total_mb - self.reserve_for(index))


class ServerSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The ``server:`` section: where swapper listens and who may use it."""

    host: str = "127.0.0.1"
    port: int = 8890
    #: Keys accepted as ``Authorization: Bearer K`` or ``x-api-key: K``; empty = no auth.
    api_keys: list[str] = []
    #: Keys for load, unload and reload; a plain API key cannot use those endpoints.
    admin_api_keys: list[str] = []
    #: Origins allowed by CORS; empty = CORS off.
    cors_origins: list[str] = []
    #: Request bodies larger than this get a 413.
    max_request_bytes: int = 64 * 1024 * 1024
    #: ``json``: one JSON object per log line, with the request id.
    log_format: Literal["text", "json"] = "text"
    #: False: ``/metrics`` is open (for a scraper on the host); True: it needs an API key.
    metrics_require_key: bool = False
    #: True: serve without ``api_keys`` on a non-loopback address (protected mode off).
    allow_unauthenticated: bool = False
    #: ``Host`` header values accepted besides loopback names and the bound address.
    allowed_hosts: list[str] = []
    #: Seconds a client has to send a whole request head.
    header_timeout: float = 10.0
    #: Seconds an idle keep-alive connection stays open. Longer than the clients' own pool
    #: expiry (docs/backends.md, "Clients"), so that swapper never closes a connection just as
    #: a client sends its next request on it (the client would see the connection drop).
    keepalive_timeout: float = 30.0
    #: Largest request head (request line and headers) in bytes.
    max_header_bytes: int = 64 * 1024
    #: Open client connections at most; beyond it new ones are refused.
    max_connections: int = 4096
    #: One log line per request (method, path, status, model, duration, bytes, request id).
    access_log: bool = True
    #: True: ``/v1/models`` lists every alias as an entry of its own too.
    list_aliases: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError("port: must be between 1 and 65535")
        if self.max_request_bytes < 1:
            raise ValueError("max_request_bytes: must be >= 1")
        for name in ("header_timeout", "keepalive_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a number > 0")
        for name in ("max_header_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        for name in ("api_keys", "admin_api_keys"):
            if any(not key for key in getattr(self, name)):
                raise ValueError(f"{name}: a key must not be empty")

    def __repr__(self) -> str:
        # Never print the keys, wherever a config ends up being logged.
        return (
            f"ServerSettings(host={self.host!r}, port={self.port}, "
            f"api_keys=<{len(self.api_keys)} hidden>, "
            f"admin_api_keys=<{len(self.admin_api_keys)} hidden>, "
            f"cors_origins={self.cors_origins!r}, max_request_bytes={self.max_request_bytes})"
        )


class ActivitySettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The ``activity:`` section: how much history ``/activity`` and the dashboard keep."""

    #: Recent requests kept.
    requests: int = 1000
    #: Recent swaps, loads and errors kept (each).
    events: int = 500
    #: Seconds each sample covers.
    sample_seconds: float = 60.0
    #: Samples kept: 1440 one-minute samples are 24 hours.
    samples: int = 1440

    def __post_init__(self) -> None:
        for name in ("requests", "events", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if not (_positive(self.sample_seconds) and self.sample_seconds <= 86400):
            raise ValueError("sample_seconds: must be a number > 0 and <= 86400")


class TimeoutSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The ``timeouts:`` section: how long swapper waits on a backend, in seconds."""

    #: Opening a connection to a backend.
    connect: float = 5.0
    #: Silence from a backend mid-request; then the request fails and the backend is checked.
    read: float = 600.0
    #: One health probe; a backend that misses it after a read timeout is killed as frozen.
    health: float = 2.0

    def __post_init__(self) -> None:
        for name in ("connect", "read", "health"):
            if not _positive(getattr(self, name)):
                raise ValueError(f"{name}: must be a number > 0")


class PeerSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One entry of ``peers:``: another swapper whose models this one forwards requests to."""

    #: The peer's root URL (``http://node2.lan:8890``, without ``/v1``).
    url: str
    #: Sent to the peer as ``Authorization: Bearer``; never shown in ``/status``, logs or errors.
    api_key: str | None = None
    #: The model ids routed to this peer; None: every model the peer lists.
    models: list[str] | None = None
    #: Seconds to wait for a connection to the peer.
    timeout: float = 5.0
    #: Seconds between two reads of the peer's model list while it is up.
    refresh: float = 30.0

    def __post_init__(self) -> None:
        scheme, _, rest = self.url.partition("://")
        if scheme not in ("http", "https") or not rest.strip("/") or rest.startswith("/"):
            raise ValueError("url: must be an http:// or https:// URL with a host")
        if "?" in rest or "#" in rest or "@" in rest:
            raise ValueError("url: must be the peer's root, without query, fragment or user")
        if self.api_key == "":
            raise ValueError("api_key: must not be empty (leave it out for a peer without keys)")
        for name in ("timeout", "refresh"):
            if not _positive(getattr(self, name)):
                raise ValueError(f"{name}: must be a number > 0")
        if self.models is not None and any(not valid_name(m) for m in self.models):
            raise ValueError(
                "models: a model id must be non-empty, printable, without spaces or '/'"
            )

    def __repr__(self) -> str:
        # Never print the key, wherever a config ends up being logged.
        key = "<hidden>" if self.api_key else None
        return (
            f"PeerSettings(url={self.url!r}, api_key={key}, models={self.models!r}, "
            f"timeout={self.timeout}, refresh={self.refresh})"
        )
