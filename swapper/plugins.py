"""Finding backend plugins: one function builds the plugin manager and collects the backends."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pluggy

from swapper import hookspecs
from swapper.backend import Backend
from swapper.config import ModelEntry
from swapper.errors import PluginError

__all__ = ["BackendRegistry", "load_backends"]


@dataclass(frozen=True)
class BackendRegistry:
    """The backend kinds found, by name, and the plugin that provided each."""

    backends: dict[str, type[Backend]]
    sources: dict[str, str]

    def schemas(self) -> dict[str, type[ModelEntry]]:
        """Model-entry schemas by backend name, for config decoding."""
        return {name: cls.entry_type for name, cls in self.backends.items()}


def _check(cls: object, plugin: str) -> type[Backend]:
    if not (inspect.isclass(cls) and issubclass(cls, Backend)):
        raise PluginError(f"plugin {plugin!r}: register_backends registered {cls!r}, not a Backend subclass")
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
    manager.load_setuptools_entrypoints(hookspecs.ENTRY_POINT_GROUP)
    for plugin in extra_plugins:
        manager.register(plugin)

    backends: dict[str, type[Backend]] = {}
    sources: dict[str, str] = {}
    dist_names = {id(plugin): dist.project_name for plugin, dist in manager.list_plugin_distinfo()}
    for impl in manager.hook.register_backends.get_hookimpls():
        plugin_name = impl.plugin_name
        source = dist_names.get(id(impl.plugin), plugin_name)

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
    return BackendRegistry(backends=backends, sources=sources)
