"""The backend plugin contract, and what swapper needs to run backends: processes, registry, reaping.

A backend package imports what it needs from here::

    from swapper.backends import Backend, BackendError, BackendHandle, SubprocessBackend, hookimpl

``Backend`` is generic over the model-entry type: ``class MyBackend(SubprocessBackend[MyModel])``
with ``entry_type = MyModel`` types ``self.entry`` as ``MyModel``.
"""

from swapper.backends.contract import (
    Backend,
    BackendHandle,
    BackendSettings,
    EntryT,
    SubprocessBackend,
    Unloaded,
)
from swapper.backends.hookspecs import hookimpl
from swapper.errors import BackendError

__all__ = [
    "Backend",
    "BackendError",
    "BackendHandle",
    "BackendSettings",
    "EntryT",
    "SubprocessBackend",
    "Unloaded",
    "hookimpl",
]
