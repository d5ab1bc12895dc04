"""Configuration: typed msgspec Structs decoded from YAML.

Unknown keys and wrong types fail with one line that names the file and the key path, e.g.
``config/x.yaml: $.models.qwen3-8b.ctx_size: expected int, got str``. Each model entry is
decoded with the schema of the backend it names, so a plugin's own keys are checked too.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from swapper.config_source import describe_validation_error, expand_env, read_yaml
from swapper.errors import ConfigError

__all__ = [
    "ActivitySettings",
    "Config",
    "ModelEntry",
    "ServerSettings",
    "SwapperSettings",
    "TimeoutSettings",
    "is_loopback",
    "load_config",
    "parse_config",
    "protected_mode_refusal",
]


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


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
    #: VRAM (MiB) models may use together; default: the GPUs' total less ``vram_reserve_mb``.
    #: Without a GPU and without this, placement counts models only.
    vram_budget_mb: float | None = None
    vram_reserve_mb: float = 512.0
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
        if self.vram_budget_mb is not None and not _positive(self.vram_budget_mb):
            raise ValueError("vram_budget_mb: must be a number > 0")
        if not (math.isfinite(self.vram_reserve_mb) and self.vram_reserve_mb >= 0):
            raise ValueError("vram_reserve_mb: must be a number >= 0")
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
    #: Seconds an idle keep-alive connection stays open.
    keepalive_timeout: float = 5.0
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


class ModelEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Keys every model entry has; each backend extends this with its own keys."""

    backend: str
    #: Other names clients may use for this model.
    aliases: list[str] = []
    #: Seconds idle (no request in flight) before unloading; None: swapper.default_ttl; 0: never.
    ttl: float | None = None
    #: Expected VRAM use in MiB, for placement until swapper has measured it.
    vram_mb: float | None = None
    #: Evicted last (multi-active). None: pinned when it is the default_model.
    pinned: bool | None = None
    #: Variables set in the backend process's environment, on top of swapper's own.
    env: dict[str, str] = {}
    #: Top-level keys removed from every request body sent to this model.
    strip_params: list[str] = []
    #: Top-level keys set in every request body that does not already have them.
    set_params: dict[str, Any] = {}
    #: True: left out of ``/v1/models``, but still served by its id and aliases.
    unlisted: bool = False


class _RawModelEntry(msgspec.Struct, frozen=True):
    backend: str


class _RawConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    swapper: SwapperSettings = SwapperSettings()
    server: ServerSettings = ServerSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    activity: ActivitySettings = ActivitySettings()
    models: dict[str, dict[str, Any]] = {}


class Config(msgspec.Struct, frozen=True):
    """A validated configuration."""

    path: str
    swapper: SwapperSettings
    server: ServerSettings
    timeouts: TimeoutSettings
    models: dict[str, ModelEntry]
    #: Every name a client may send (ids and aliases) -> its model id; the one index, built
    #: (and checked for clashes) by parse_config.
    names: dict[str, str]
    activity: ActivitySettings = ActivitySettings()

    def resolve(self, name: str) -> str | None:
        """The model id that ``name`` (an id or an alias) refers to, or None."""
        return self.names.get(name)


def _valid_name(name: str) -> bool:
    """Model ids and aliases: what a client can send as ``model`` and see in a URL path."""
    return bool(name) and name.isprintable() and not any(c.isspace() or c == "/" for c in name)


def parse_config(data: Any, source: str, backends: Mapping[str, type[ModelEntry]]) -> Config:
    """Validate an already-parsed YAML tree. ``backends`` maps backend names to their schemas."""
    if data is None:
        raise ConfigError(f"{source}: the file is empty")
    data = expand_env(data, "$", source)
    try:
        raw = msgspec.convert(data, _RawConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc, '$')}") from None

    models: dict[str, ModelEntry] = {}
    names: dict[str, str] = {}
    for model_id, entry in raw.models.items():
        where = f"$.models.{model_id}"
        if not _valid_name(model_id):
            raise ConfigError(
                f"{source}: {where}: a model id must be non-empty, printable, without spaces or '/'"
            )
        try:
            backend = msgspec.convert(entry, _RawModelEntry).backend
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{source}: {describe_validation_error(exc, where)}") from None
        schema = backends.get(backend)
        if schema is None:
            known = ", ".join(sorted(backends)) or "none installed"
            raise ConfigError(
                f"{source}: {where}.backend: unknown backend {backend!r} (available: {known})"
            )
        try:
            models[model_id] = msgspec.convert(entry, schema)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{source}: {describe_validation_error(exc, where)}") from None
        ttl = models[model_id].ttl  # checked here: a plugin's __post_init__ may not call ours
        if ttl is not None and not (math.isfinite(ttl) and ttl >= 0):
            raise ConfigError(f"{source}: {where}.ttl: must be a number >= 0 (0 = never)")
        vram = models[model_id].vram_mb
        if vram is not None and not (math.isfinite(vram) and vram >= 0):
            raise ConfigError(f"{source}: {where}.vram_mb: must be a number >= 0")
        for name, value in models[model_id].env.items():
            if not name or "=" in name or "\x00" in name:
                raise ConfigError(
                    f"{source}: {where}.env: {name!r} cannot name an environment variable "
                    "(it must be non-empty, without '=' or NUL)"
                )
            if "\x00" in value:
                raise ConfigError(f"{source}: {where}.env.{name}: a value cannot hold NUL")
        if "model" in models[model_id].strip_params or "model" in models[model_id].set_params:
            raise ConfigError(
                f"{source}: {where}: strip_params and set_params must not name 'model' "
                "(swapper routes by it; use aliases or the backend's upstream name)"
            )
        for index, alias in enumerate(models[model_id].aliases):
            if not _valid_name(alias):
                raise ConfigError(
                    f"{source}: {where}.aliases[{index}]: an alias must be "
                    "non-empty, printable, without spaces or '/', like a model id"
                )
        for name in (model_id, *models[model_id].aliases):
            owner = names.get(
                name, model_id if name == model_id or name not in raw.models else name
            )
            if owner != model_id:
                raise ConfigError(
                    f"{source}: {where}.aliases: {name!r} is already the name of model {owner!r}"
                )
            names[name] = model_id

    default = raw.swapper.default_model
    if default is not None and default not in names:
        raise ConfigError(
            f"{source}: $.swapper.default_model: {default!r} is not a configured model"
        )
    settings = raw.swapper
    if default is not None and names[default] != default:
        settings = msgspec.structs.replace(settings, default_model=names[default])
    return Config(
        path=source,
        swapper=settings,
        server=raw.server,
        timeouts=raw.timeouts,
        models=models,
        names=names,
        activity=raw.activity,
    )


def load_config(path: str | Path, backends: Mapping[str, type[ModelEntry]]) -> Config:
    """Read and validate a YAML config file; every problem is a one-line ConfigError."""
    return parse_config(read_yaml(path), str(path), backends)


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (bracketed or not); False for the rest."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False  # a name other than localhost, or "" / "0.0.0.0"-like wildcards: not loopback


def protected_mode_refusal(config: Config, host: str) -> str | None:
    """Why ``swapper serve`` must not listen on ``host`` with this config, or None if it may.

    Protected mode (after Redis's): an address other hosts can reach needs keys, unless the
    operator says in so many words that an open server is meant.
    """
    server = config.server
    if (
        server.api_keys
        or server.admin_api_keys
        or server.allow_unauthenticated
        or is_loopback(host)
    ):
        return None
    return (
        f"{config.path}: refusing to listen on {host!r} with no keys: set server.api_keys, "
        "or server.allow_unauthenticated: true to serve everyone on the network without keys"
    )
