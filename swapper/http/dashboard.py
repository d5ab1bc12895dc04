"""The web dashboard at ``/ui``: one self-contained page, no build step, no outside fetches.

The plots are drawn by uPlot (npm ``uplot`` 1.6.32, MIT; ``swapper/ui/vendor/``), inlined into
the page where it says ``<!-- uPlot -->``: the page then loads nothing else, and its
Content-Security-Policy stays hash-only.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

from litestar import Response, get

__all__ = ["UI_HANDLERS", "content_security_policy"]

# Bare <script> and <style> tags only: one with attributes would not be hashed and would not run.
_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


def content_security_policy(page: bytes) -> str:
    """A CSP letting the page run its own inline script and style, by hash, and nothing else."""
    hashes: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for match in _INLINE.finditer(page):
        digest = base64.b64encode(hashlib.sha256(match.group(2)).digest()).decode()
        hashes[match.group(1)].append(f"'sha256-{digest}'")
    # Hashes instead of 'unsafe-inline': an injected <script> or <style> would not match them.
    return "; ".join(
        [
            "default-src 'none'",
            "script-src " + (" ".join(hashes[b"script"]) or "'none'"),
            "style-src " + (" ".join(hashes[b"style"]) or "'none'"),
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


_VENDOR_MARK = b"<!-- uPlot -->"
#: The activity table and plots, a script of their own to keep index.html readable.
_ACTIVITY_MARK = b"<!-- activity.js -->"


@functools.cache
def _page() -> tuple[bytes, dict[str, str]]:
    """The page (uPlot inlined) and its headers, read from the package once."""
    ui = resources.files("swapper").joinpath("ui")
    vendor = ui.joinpath("vendor")
    script = vendor.joinpath("uPlot.iife.min.js").read_bytes()
    style = vendor.joinpath("uPlot.min.css").read_bytes()
    activity = ui.joinpath("activity.js").read_bytes()
    page = (
        ui.joinpath("index.html")
        .read_bytes()
        .replace(
            _VENDOR_MARK, b"<style>" + style + b"</style>\n<script>" + script + b"</script>", 1
        )
        .replace(_ACTIVITY_MARK, b"<script>" + activity + b"</script>", 1)
    )
    headers = {
        "Content-Security-Policy": content_security_policy(page),
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return page, headers


@get(["/ui", "/ui/"], include_in_schema=False)
async def dashboard() -> Response[bytes]:
    """The operators' dashboard; open like /health, its data calls carry the operator's key."""
    page, headers = _page()
    # Litestar adds "; charset=utf-8" to text/* itself (naming it here would send it twice).
    return Response(page, media_type="text/html", headers=headers)


UI_HANDLERS = [dashboard]
