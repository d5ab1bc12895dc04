"""swapper: an OpenAI-compatible proxy that swaps local LLM backends on one GPU."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
