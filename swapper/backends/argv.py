"""Reading a backend's command line: the value a flag takes, and the argv as logs show it."""

from __future__ import annotations

from swapper.backends.output import SECRET_FLAGS as _SECRET_FLAGS

__all__ = ["arg_value", "redact_argv"]


def arg_value(args: list[str], *flags: str) -> str | None:
    """The value the last of ``flags`` takes in ``args`` (``--flag V`` or ``--flag=V``; a long
    flag with ``_`` for ``-`` too), or None when none is there."""
    wanted = {f.replace("_", "-") if f.startswith("--") else f for f in flags}
    found: str | None = None
    for position, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag.startswith("--"):
            flag = flag.replace("_", "-")
        if flag not in wanted:
            continue
        if eq:
            found = value
        elif position + 1 < len(args):
            found = args[position + 1]
    return found


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with secret values hidden, for logs."""
    shown: list[str] = []
    hide_next = False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        if hide_next:
            shown.append("***")
        elif eq and flag in _SECRET_FLAGS:
            shown.append(f"{flag}=***")
        else:
            shown.append(arg)
        hide_next = arg in _SECRET_FLAGS
    return shown
