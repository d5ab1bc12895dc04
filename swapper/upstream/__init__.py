"""The client swapper forwards requests to backends with."""
