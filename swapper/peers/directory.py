"""Other swappers this one routes to: what each lists, whether it is up, and why not.

A :class:`PeerDirectory` is made in the app lifespan from the ``peers:`` section. One task per
peer reads the peer's ``GET /v1/models`` every ``refresh`` seconds while it is up, every few
seconds while it is down, and at once when a forwarded request found it gone. Those reads
carry the hop header, so a peer answers with its own models only: two swappers that list each
other never list (or route) each other's peers in a circle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from swapper.config import PeerSettings
from swapper.errors import ModelUnavailable, SwapperError
from swapper.upstream.client import UpstreamClient

__all__ = ["HOP_HEADER", "Peer", "PeerDirectory", "PeerUnavailable"]

logger = logging.getLogger("swapper")

#: Set on every request one swapper sends another; a request carrying it is never forwarded
#: to a peer again, and ``/v1/models`` answers it with the local models only.
HOP_HEADER = "x-swapper-hop"
#: Seconds between two checks of a peer that is down (at most its ``refresh``).
DOWN_RETRY = 5.0
#: Seconds between two checks of a peer at least, however often they are asked for.
MIN_RECHECK = 1.0

_DECODE = msgspec.json.Decoder()


class PeerUnavailable(ModelUnavailable):
    """503 + Retry-After: the peer that serves the model is down (or refuses this swapper)."""

    code = "peer_unavailable"


class Peer:
    """One peer: its settings, its last model list and whether it answered last time."""

    __slots__ = (
        "aliases",
        "client",
        "last_error",
        "listed",
        "name",
        "next_check",
        "settings",
        "tags",
        "up",
        "wake",
    )

    def __init__(self, name: str, settings: PeerSettings, read_timeout: float) -> None:
        self.name = name
        self.settings = settings
        #: Its own pool, so that its connect timeout is its own ``timeout``.
        self.client = UpstreamClient(connect_timeout=settings.timeout, read_timeout=read_timeout)
        #: None until the first answer (or failure); then whether the peer answered.
        self.up: bool | None = None
        self.last_error: str | None = None
        #: The peer's ``/v1/models`` entries (as it sent them) by id, from its last answer.
        self.listed: dict[str, dict[str, Any]] = {}
        #: Aliases the peer's entries name (``aliases``, as a swapper lists them) -> model id.
        self.aliases: dict[str, str] = {}
        #: The peer's Ollama ``/api/tags`` entries by model id (empty when it has none).
        self.tags: dict[str, dict[str, Any]] = {}
        #: Monotonic time of the next check.
        self.next_check = 0.0
        #: Set to check the peer now rather than at ``next_check``.
        self.wake = asyncio.Event()

    @property
    def base_url(self) -> str:
        """The peer's root URL, without a trailing slash."""
        return self.settings.url.rstrip("/")

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Headers every request to the peer carries: the hop mark and its key, if any."""
        hop = ((HOP_HEADER.encode(), b"1"),)
        key = self.settings.api_key
        if key is None:
            return hop
        return (*hop, (b"Authorization", b"Bearer " + key.encode("latin-1")))

    def routes(self, model: str) -> bool:
        """True when requests for ``model`` go to this peer.

        With a ``models`` filter, exactly those ids (known before the peer ever answers, so a
        peer down from the start still gets the 503 that names it); without, what it lists.
        An alias the peer lists for a routed model routes too: the peer resolves it.
        """
        wanted = self.settings.models
        if wanted is None:
            return model in self.listed or model in self.aliases
        return model in wanted or self.aliases.get(model) in wanted

    def entries(self) -> list[dict[str, Any]]:
        """Its ``/v1/models`` entries as this swapper lists them: ``owned_by`` the peer."""
        wanted = self.settings.models
        return [
            {**entry, "owned_by": self.name}
            for model_id, entry in self.listed.items()
            if wanted is None or model_id in wanted
        ]

    def tag_entries(self) -> list[dict[str, Any]]:
        """Its Ollama ``/api/tags`` entries for the models routed to it: the peer's own where it
        answered ``/api/tags``, else the least an Ollama client reads (name, model, size...)."""
        wanted = self.settings.models
        entries = []
        for model_id, entry in self.listed.items():
            if (wanted is not None and model_id not in wanted) or "alias_of" in entry:
                continue  # (a peer that lists aliases: Ollama's list has models only)
            tag = self.tags.get(model_id)
            if tag is None:
                name = model_id if ":" in model_id else f"{model_id}:latest"
                created = entry.get("created")
                when = created if isinstance(created, int | float) else 0
                tag = {
                    "name": name,
                    "model": name,
                    "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)),
                    "size": 0,
                    "digest": "",
                    "details": {},
                }
            entries.append(tag)
        return entries

    def scrub(self, text: str) -> str:
        """``text`` with the peer's key blotted out, wherever an error message may repeat it."""
        key = self.settings.api_key
        return text.replace(key, "<hidden>") if key else text

    def unavailable(self, reason: str | None = None) -> PeerUnavailable:
        """The 503 for a request this peer cannot take now, naming it and why."""
        why = reason or self.last_error or "it did not answer"
        wait = max(1, math.ceil(self.next_check - time.monotonic()))
        return PeerUnavailable(
            f"The peer {self.name!r} ({self.base_url}) is unavailable: {self.scrub(why)}",
            retry_after=wait,
        )

    def mark_down(self, reason: str) -> None:
        """Record that the peer failed; the watcher checks it again at once, then every few
        seconds."""
        reason = self.scrub(reason)
        if self.up is not False:
            logger.warning("peer %s is down: %s", self.name, reason)
        self.up = False
        self.last_error = reason
        self.next_check = time.monotonic() + min(self.settings.refresh, DOWN_RETRY)
        self.wake.set()

    async def _get(self, path: str) -> tuple[int, bytes]:
        """``GET path`` on the peer: its status and whole body, within twice its ``timeout``.

        Raises TimeoutError, or a SwapperError when the peer cannot be reached.
        """
        async with asyncio.timeout(self.settings.timeout * 2):
            response = await self.client.send(
                f"peer {self.name}", self.base_url, path, b"", method="GET", headers=self.headers()
            )
            return response.status, await response.read()

    async def check(self) -> None:
        """Read the peer's model list; mark it up with that list, or down with the reason."""
        try:
            status, body = await self._get("/v1/models")
        except TimeoutError:
            self.mark_down(f"no model list within {self.settings.timeout * 2:g}s")
            return
        except SwapperError as exc:
            self.mark_down(exc.message)
            return
        if status != 200:
            self.mark_down(f"GET /v1/models answered HTTP {status}")
            return
        try:
            data = _DECODE.decode(body)["data"]
            listed = {entry["id"]: entry for entry in data if isinstance(entry["id"], str)}
        except (msgspec.DecodeError, KeyError, TypeError):
            self.mark_down("GET /v1/models did not answer an OpenAI model list")
            return
        if self.up is not True:
            logger.info("peer %s is up with %d models", self.name, len(listed))
        self.up = True
        self.last_error = None
        self.listed = listed
        self.aliases = {
            alias: model_id
            for model_id, entry in listed.items()
            for alias in entry.get("aliases") or ()
            if isinstance(alias, str)
        }
        self.next_check = time.monotonic() + self.settings.refresh
        self.tags = await self._read_tags(listed)

    async def _read_tags(self, listed: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """The peer's ``/api/tags`` entries of the models it lists, by id; empty when it does
        not answer them (a peer without Ollama's API is still a peer)."""
        try:
            status, body = await self._get("/api/tags")
            if status != 200:
                return {}
            entries = _DECODE.decode(body)["models"]
        except (TimeoutError, SwapperError, msgspec.DecodeError, KeyError, TypeError):
            return {}
        tags: dict[str, dict[str, Any]] = {}
        for entry in entries if isinstance(entries, list) else ():
            name = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(name, str):
                for model_id in dict.fromkeys((name, name.removesuffix(":latest"))):
                    if model_id in listed:
                        tags[model_id] = entry
                        break
        return tags

    def status(self) -> dict[str, Any]:
        """Its ``/status`` entry: up or down, the last error and the models routed to it;
        never the key."""
        routed = self.settings.models if self.settings.models is not None else list(self.listed)
        return {
            "url": self.base_url,
            "up": self.up,
            "last_error": self.last_error,
            "models": sorted(routed),
        }


class PeerDirectory:
    """Every configured peer, kept up to date by one watcher task each."""

    __slots__ = ("_tasks", "peers")

    def __init__(self, peers: Mapping[str, PeerSettings], read_timeout: float) -> None:
        #: By name, in the config's order (the first that routes a model gets it).
        self.peers = {name: Peer(name, s, read_timeout) for name, s in peers.items()}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start watching every peer (a first check at once)."""
        self._tasks = [asyncio.create_task(self._watch(peer)) for peer in self.peers.values()]

    async def aclose(self) -> None:
        """Stop the watchers and close the peers' connections."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for peer in self.peers.values():
            await peer.client.aclose()

    async def _watch(self, peer: Peer) -> None:
        while True:
            peer.wake.clear()
            checked = time.monotonic()
            await peer.check()
            delay = max(0.0, peer.next_check - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(peer.wake.wait(), delay)
            # Woken early (a forwarded request failed, or the peer did not know a model it was
            # thought to have): check again now, but never more often than once a second, nor
            # faster than the down interval while it is down.
            soonest = peer.next_check if peer.up is False else checked + MIN_RECHECK
            await asyncio.sleep(max(0.0, soonest - time.monotonic()))

    def owner(self, model: str) -> Peer | None:
        """The peer that requests for ``model`` go to, or None."""
        for peer in self.peers.values():
            if peer.routes(model):
                return peer
        return None

    def entries(self) -> list[dict[str, Any]]:
        """The peers' ``/v1/models`` entries, less ids an earlier peer already lists (the
        catalog leaves out those a local model has)."""
        seen: set[str] = set()
        listed = []
        for peer in self.peers.values():
            for entry in peer.entries():
                if entry["id"] not in seen:
                    seen.add(entry["id"])
                    listed.append(entry)
        return listed

    def tag_entries(self, local: Mapping[str, str]) -> list[dict[str, Any]]:
        """The peers' Ollama ``/api/tags`` entries, less the models ``local`` names (a local
        model of the same id wins) and those an earlier peer already lists."""
        seen: set[str] = set()
        listed = []
        for peer in self.peers.values():
            for entry in peer.tag_entries():
                name = entry["name"]
                if name in seen or name in local or name.removesuffix(":latest") in local:
                    continue
                seen.add(name)
                listed.append(entry)
        return listed

    def status(self) -> dict[str, Any]:
        """The ``/status`` ``peers`` section."""
        return {name: peer.status() for name, peer in self.peers.items()}
