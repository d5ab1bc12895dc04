"""Finding backend plugins: one function builds the plugin manager and collects the backends."""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
from dataclasses import dataclass, field

import pluggy

from swapper.backends import hookspecs
from swapper.backends.contract import Backend
from swapper.config import ModelEntry
from swapper.errors import PluginError

__all__ = ["BackendRegistry", "load_backends"]

logger = logging.getLogger("swapper.plugins")


@dataclass(frozen=True)
class BackendRegistry:
    """The backend kinds found, by name, and the plugin that provided each."""

    backends: dict[str, type[Backend]]
    sources: dict[str, str]
    #: Entry points that could not be loaded, by name, with the error (the others still load).
    failures: dict[str, str] = field(default_factory=dict)

    def schemas(self) -> dict[str, type[ModelEntry]]:
        """Model-entry schemas by backend name, for config decoding."""
        return {name: cls.entry_type for name, cls in self.backends.items()}


def _check(cls: object, plugin: str) -> type[Backend]:
    if not (inspect.isclass(cls) and issubclass(cls, Backend)):
        raise PluginError(
            f"plugin {plugin!r}: register_backends registered {cls!r}, not a Backend subclass"
        )
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"plugin {plugin!r}: backend {cls.__qualname__} has no `name`")
    entry = getattr(cls, "entry_type", None)
    if not (inspect.isclass(entry) and issubclass(entry, ModelEntry)):
        raise PluginError(
            f"plugin {plugin!r}: backend {name!r} needs `entry_type`, a ModelEntry subclass"
        )
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise PluginError(f"plugin {plugin!r}: backend {name!r} does not implement {missing}")
    return cls


def load_backends(*extra_plugins: object) -> BackendRegistry:
    """Build the plugin manager: hookspecs, entry points, then any plugins passed in (tests)."""
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    failures: dict[str, str] = {}
    sources_by_plugin: dict[int, str] = {}
    for entry_point in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        dist = entry_point.dist
        where = f"{dist.name} {dist.version}" if dist is not None else entry_point.value
        try:
            plugin = entry_point.load()
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not stop the others
            failures[entry_point.name] = f"{where}: {type(exc).__name__}: {exc}"
            logger.error(
                "backend plugin %r (%s) failed to load: %s: %s",
                entry_point.name,
                where,
                type(exc).__name__,
                exc,
            )
            continue
        if manager.is_registered(plugin):
            continue
        manager.register(plugin, name=entry_point.name)
        sources_by_plugin[id(plugin)] = f"{where} ({entry_point.value})"
    for plugin in extra_plugins:
        manager.register(plugin)

    backends: dict[str, type[Backend]] = {}
    sources: dict[str, str] = {}
    # Each implementation is called on its own, not through ``manager.hook.register_backends``:
    # a hook call hands every plugin the same arguments, so one shared ``register`` could not
    # tell which plugin registered a class, and an error must name the plugin (and `swapper
    # plugins` its package). pluggy still validated each implementation's signature against
    # the hookspec when it was registered; the hook has no wrappers or results to lose.
    for impl in manager.hook.register_backends.get_hookimpls():
        plugin_name = impl.plugin_name
        source = sources_by_plugin.get(id(impl.plugin), plugin_name)

        def register(cls: type[Backend], _plugin: str = plugin_name, _source: str = source) -> None:
            backend = _check(cls, _plugin)
            if backend.name in backends and backends[backend.name] is not backend:
                raise PluginError(
                    f"plugin {_plugin!r}: backend {backend.name!r} is already registered "
                    f"by {sources[backend.name]!r}"
                )
            backends[backend.name] = backend
            sources[backend.name] = _source

        impl.function(register=register)
    return BackendRegistry(backends=backends, sources=sources, failures=failures)
