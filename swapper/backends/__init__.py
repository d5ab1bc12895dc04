"""The backend plugin contract, and what swapper needs to run backends: processes, registry, reaping.

A backend package imports what it needs from here::

    from swapper.backends import Backend, BackendHandle, SubprocessBackend, hookimpl
"""

from swapper.backends.contract import (
    Backend,
    BackendHandle,
    BackendSettings,
    SubprocessBackend,
    Unloaded,
)
from swapper.backends.hookspecs import hookimpl

__all__ = [
    "Backend",
    "BackendHandle",
    "BackendSettings",
    "SubprocessBackend",
    "Unloaded",
    "hookimpl",
]
