"""The hooks a swapper plugin implements.

Hooks only register objects; the work lives on the registered backend classes, whose lifecycle
is async (pluggy itself is synchronous).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from swapper.backends.contract import Backend

__all__ = ["ENTRY_POINT_GROUP", "PROJECT_NAME", "hookimpl", "hookspec", "register_backends"]

PROJECT_NAME = "swapper"
#: The entry-point group built-in and third-party backend plugins register under.
ENTRY_POINT_GROUP = "swapper.backends"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Register backend classes: call ``register(cls)`` once for each backend kind provided."""
