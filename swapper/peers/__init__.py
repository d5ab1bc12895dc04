"""Other swappers this one forwards requests to (the ``peers:`` section)."""

from __future__ import annotations

from swapper.peers.directory import HOP_HEADER, Peer, PeerDirectory, PeerUnavailable

__all__ = ["HOP_HEADER", "Peer", "PeerDirectory", "PeerUnavailable"]
