"""What the configured models offer clients: ``/v1/models`` entries, endpoints, shaping.

Built once from the config (at startup and on each reload) and kept on ``app.state`` as a
:class:`Catalog`, so the request path only looks things up: which endpoints a model's backend
serves (a request for another is a 404 before anything loads), how its request bodies are
shaped, and its ``/v1/models`` entry, to which only the live ``status`` is added per call.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from swapper.backends.registry import BackendRegistry
from swapper.config import Config
from swapper.errors import ModelNotFound, SwapperError
from swapper.http.rename import Shaping
from swapper.scheduling.snapshot import ModelLoad

__all__ = ["Catalog", "EndpointNotServed"]

_ENCODE = msgspec.json.Encoder()


class EndpointNotServed(SwapperError):
    """The model exists, but its backend does not serve the endpoint asked for."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "endpoint_not_supported"


class Catalog:
    """The configured models as clients see them; immutable, rebuilt on reload."""

    __slots__ = ("_entries", "_listed", "endpoints", "names", "shaping")

    def __init__(self, config: Config, registry: BackendRegistry) -> None:
        created = int(time.time())
        #: Every name (id or alias) -> its model id.
        self.names = config.names
        #: Model id -> the endpoints its backend serves.
        self.endpoints: dict[str, frozenset[str]] = {}
        #: Model id -> its shaping; models with none are absent (the hot path checks that).
        self.shaping: dict[str, Shaping] = {}
        #: Name (id or alias) -> its entry without ``status``.
        self._entries: dict[str, dict[str, Any]] = {}
        #: The names ``/v1/models`` lists, in order, with the model each belongs to.
        self._listed: list[tuple[str, str]] = []
        for model_id, entry in config.models.items():
            kind = registry.backends[entry.backend]
            self.endpoints[model_id] = kind.serves(entry)
            if entry.strip_params or entry.set_params:
                self.shaping[model_id] = Shaping(tuple(entry.strip_params), dict(entry.set_params))
            document = {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": "swapper",
                "backend": entry.backend,
                "aliases": list(entry.aliases),
                **kind.declares(entry),
            }
            self._entries[model_id] = document
            for alias in entry.aliases:
                self._entries[alias] = {**document, "id": alias, "alias_of": model_id}
            if entry.unlisted:
                continue
            self._listed.append((model_id, model_id))
            if config.server.list_aliases:
                self._listed.extend((alias, model_id) for alias in entry.aliases)

    def check_serves(self, model_id: str, endpoint: str) -> None:
        """Raise :class:`EndpointNotServed` unless ``model_id``'s backend serves ``endpoint``."""
        served = self.endpoints.get(model_id)
        if served is not None and endpoint not in served:
            raise EndpointNotServed(
                f"The model {model_id!r} does not serve {endpoint}: its backend serves "
                f"{', '.join(sorted(served))}"
            )

    def list_document(self, loads: dict[str, ModelLoad]) -> bytes:
        """The ``/v1/models`` body: every listed model with its live status."""
        data = [
            _with_status(self._entries[name], loads.get(model_id))
            for name, model_id in self._listed
        ]
        return _ENCODE.encode({"object": "list", "data": data})

    def model_document(self, name: str, loads: dict[str, ModelLoad]) -> bytes:
        """The ``/v1/models/{name}`` body (an id or an alias; unlisted ones too)."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(f"The model {name!r} does not exist")
        return _ENCODE.encode(_with_status(entry, loads.get(self.names[name])))


def _with_status(entry: dict[str, Any], load: ModelLoad | None) -> dict[str, Any]:
    return {**entry, "status": load.status.value if load is not None else "UNLOADED"}
