"""Ollama's own API (``/api/*``) in front of every backend; see :mod:`.routes`."""
