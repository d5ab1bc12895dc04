"""The web dashboard at ``/ui``: one self-contained page, no build step, no outside fetches."""

from __future__ import annotations

import functools
from importlib import resources

from litestar import Response, get

__all__ = ["UI_HANDLERS"]

# The page's inline script and style are its own; nothing else may run or load.
_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'")


@functools.cache
def _page() -> bytes:
    return resources.files("swapper").joinpath("ui/index.html").read_bytes()


@get(["/ui", "/ui/"], include_in_schema=False)
async def dashboard() -> Response[bytes]:
    """The operators' dashboard; its data calls carry the key the operator enters."""
    return Response(_page(), media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"})


UI_HANDLERS = [dashboard]
