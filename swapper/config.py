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
from swapper.settings import (
    ActivitySettings,
    PeerSettings,
    ServerSettings,
    SwapperSettings,
    TimeoutSettings,
    valid_name,
)

__all__ = [
    "ActivitySettings",
    "Config",
    "ModelEntry",
    "PeerSettings",
    "ServerSettings",
    "SwapperSettings",
    "TimeoutSettings",
    "is_loopback",
    "load_config",
    "parse_config",
    "protected_mode_refusal",
]


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
    #: Most requests in flight to this model at once; more wait in the queue. None: no limit.
    concurrency_limit: int | None = None
    #: Variables set in the backend process's environment, on top of swapper's own.
    env: dict[str, str] = {}
    #: Top-level keys removed from every request body sent to this model.
    strip_params: list[str] = []
    #: Top-level keys set in every request body that does not already have them.
    set_params: dict[str, Any] = {}
    #: True: left out of ``/v1/models``, but still served by its id and aliases.
    unlisted: bool = False
    #: The GPUs (NVML indexes) it loads on: ``auto`` (one GPU that fits, the one with the most
    #: free budget; split evenly over the fewest GPUs only when no single one can hold it), or
    #: a list used exactly (``[0, 1]``: split over both). An ``env: {CUDA_VISIBLE_DEVICES}``
    #: of the entry's own wins over this and pins it to the GPUs it names. Under ``auto``, args
    #: that say how many GPUs the model uses (vLLM's parallel sizes, llama.cpp's
    #: ``--tensor-split``) get that many; llama.cpp's ``--device``/``--main-gpu`` get every GPU.
    gpus: Literal["auto"] | list[int] = "auto"


class _RawModelEntry(msgspec.Struct, frozen=True):
    backend: str


class _RawConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    swapper: SwapperSettings = SwapperSettings()
    server: ServerSettings = ServerSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    activity: ActivitySettings = ActivitySettings()
    models: dict[str, dict[str, Any]] = {}
    #: Decoded entry by entry in parse_config, so that errors name the peer.
    peers: dict[str, dict[str, Any]] = {}


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
    #: Other swappers, by the name their models are listed under (``owned_by``).
    peers: dict[str, PeerSettings] = {}
    activity: ActivitySettings = ActivitySettings()

    def resolve(self, name: str) -> str | None:
        """The model id that ``name`` (an id or an alias) refers to, or None."""
        return self.names.get(name)


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
        if not valid_name(model_id):
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
        limit = models[model_id].concurrency_limit
        if limit is not None and limit < 1:
            raise ConfigError(f"{source}: {where}.concurrency_limit: must be an integer >= 1")
        for name, value in models[model_id].env.items():
            if not name or "=" in name or "\x00" in name:
                raise ConfigError(
                    f"{source}: {where}.env: {name!r} cannot name an environment variable "
                    "(it must be non-empty, without '=' or NUL)"
                )
            if "\x00" in value:
                raise ConfigError(f"{source}: {where}.env.{name}: a value cannot hold NUL")
        gpus = models[model_id].gpus
        if isinstance(gpus, list):
            if not gpus:
                raise ConfigError(
                    f"{source}: {where}.gpus: must list at least one GPU index, or be 'auto'"
                )
            for index, gpu in enumerate(gpus):
                if gpu < 0:
                    raise ConfigError(
                        f"{source}: {where}.gpus[{index}]: a GPU index must be >= 0, got {gpu}"
                    )
                if gpu in gpus[:index]:
                    raise ConfigError(f"{source}: {where}.gpus[{index}]: GPU {gpu} is listed twice")
        if "model" in models[model_id].strip_params or "model" in models[model_id].set_params:
            raise ConfigError(
                f"{source}: {where}: strip_params and set_params must not name 'model' "
                "(swapper routes by it; use aliases or the backend's upstream name)"
            )
        for index, alias in enumerate(models[model_id].aliases):
            if not valid_name(alias):
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
    peers: dict[str, PeerSettings] = {}
    for peer, peer_entry in raw.peers.items():
        where = f"$.peers.{peer}"
        if not valid_name(peer):
            raise ConfigError(
                f"{source}: {where}: a peer name must be non-empty, printable, "
                "without spaces or '/'"
            )
        try:
            peers[peer] = msgspec.convert(peer_entry, PeerSettings)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{source}: {describe_validation_error(exc, where)}") from None
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
        peers=peers,
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
