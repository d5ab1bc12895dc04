"""Measured VRAM sizes kept across restarts, in a small JSON state file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from swapper.config import ModelEntry

__all__ = ["SizeBook", "default_state_file", "fingerprint"]

logger = logging.getLogger("swapper.placement")


def default_state_file() -> Path:
    """``$XDG_STATE_HOME/swapper/state.json``, else ``~/.local/state/swapper/state.json``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "swapper" / "state.json"


def fingerprint(entry: ModelEntry) -> str:
    """Changes whenever a model's entry does, so a size learned for another setup is not used."""
    return hashlib.sha256(msgspec.json.encode(entry)).hexdigest()[:16]


class SizeBook:
    """Measured VRAM sizes by model id, kept in a small JSON state file across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sizes: dict[str, dict[str, Any]] = {}
        try:
            data = json.loads(path.read_text())
            models = data.get("models", {}) if isinstance(data, dict) else {}
            self._sizes = {
                k: v
                for k, v in models.items()
                if isinstance(v, dict) and isinstance(v.get("vram_mb"), int | float)
            }
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:  # a damaged file only loses what was learned
            logger.warning("ignoring the state file %s: %s", path, exc)

    def get(self, model_id: str, entry: ModelEntry) -> float | None:
        """The learned size of ``model_id`` in MiB, if learned for this very entry."""
        known = self._sizes.get(model_id)
        if known is None or known.get("fingerprint") != fingerprint(entry):
            return None
        return float(known["vram_mb"])

    def record(self, model_id: str, entry: ModelEntry, vram_mb: float) -> bool:
        """Remember a measurement; True when it changed what is known (then :meth:`save`)."""
        old = self.get(model_id, entry)
        if old is not None and abs(old - vram_mb) <= max(16.0, 0.02 * old):
            return False
        self._sizes[model_id] = {
            "vram_mb": round(vram_mb, 1),
            "fingerprint": fingerprint(entry),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return True

    def save(self) -> None:
        """Write the file atomically (a crash mid-write leaves the old one)."""
        document = json.dumps({"version": 1, "models": self._sizes}, indent=2, sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
            with os.fdopen(fd, "w") as out:
                out.write(document)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("could not write the state file %s: %s", self.path, exc)
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)

    def snapshot(self) -> dict[str, float]:
        """Learned sizes by model id."""
        return {k: float(v["vram_mb"]) for k, v in self._sizes.items()}
