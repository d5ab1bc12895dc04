"""What the operators' commands show: the status table, progress while waiting, summaries.

Pure presentation of swapper's ``/status`` and model documents: rich on a terminal, plain
columns otherwise; nothing here speaks HTTP.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = [
    "COLUMNS",
    "GPU_COLUMNS",
    "Progress",
    "header",
    "notes",
    "plain_table",
    "rich_table",
    "status_columns",
    "status_rows",
    "summary",
    "write",
]

_STATUS_STYLES = {
    "LOADED": "bold green",
    "LOADING": "yellow",
    "UNLOADING": "yellow",
    "SLEEPING": "cyan",
    "FAILED": "bold red",
    "UNLOADED": "dim",
}
COLUMNS = ("MODEL", "STATUS", "BACKEND", "PID", "VRAM", "IDLE")
#: With per-GPU accounting: the GPUs each model holds memory on, after its VRAM.
GPU_COLUMNS = ("MODEL", "STATUS", "BACKEND", "PID", "VRAM", "GPU", "IDLE")
_RIGHT = ("PID", "VRAM", "IDLE")


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _duration(seconds: float) -> str:
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _idle(model: dict[str, Any], now: dt.datetime) -> str:
    """How long a loaded model has had no request; ``-`` while requests run or not loaded."""
    # Idle time tells which model holds the GPU for nothing: only a loaded model has one.
    if model.get("status") != "LOADED" or model.get("in_flight"):
        return "-"
    since = _parse_time(model.get("last_used"))
    loaded_at = _parse_time(model.get("loaded_at"))
    # A model loaded after its last use has been idle since it loaded, not longer.
    if loaded_at and (since is None or loaded_at > since):
        since = loaded_at
    return "-" if since is None else _duration((now - since).total_seconds())


def _vram(model: dict[str, Any]) -> str:
    value = model.get("vram_mb")
    return "-" if not isinstance(value, int | float) else f"{value:.0f} MiB"


def _gpu_budgets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """``vram.gpus``: each GPU's budget; empty from a swapper without per-GPU accounting."""
    vram = doc.get("vram")
    gpus = vram.get("gpus") if isinstance(vram, dict) else None
    return [g for g in gpus if isinstance(g, dict)] if isinstance(gpus, list) else []


def _on_gpus(model_id: str, budgets: list[dict[str, Any]]) -> str:
    """The GPUs a model holds memory on, as the GPU lines list them; ``-`` for none."""
    # Not the model's own ``gpus``: that also names where an unloaded model was last placed.
    held = [str(g.get("index")) for g in budgets if model_id in (g.get("models") or [])]
    return ",".join(held) or "-"


def status_columns(doc: dict[str, Any]) -> tuple[str, ...]:
    """The table's columns: with a GPU column where ``doc`` accounts per GPU."""
    return GPU_COLUMNS if _gpu_budgets(doc) else COLUMNS


def status_rows(doc: dict[str, Any], now: dt.datetime | None = None) -> list[list[str]]:
    """One row of :func:`status_columns` per model of a ``/status`` document."""
    now = now or dt.datetime.now(dt.UTC)
    budgets = _gpu_budgets(doc)
    rows = []
    for model_id, model in (doc.get("models") or {}).items():
        pid = model.get("pid")
        row = [
            str(model_id),
            str(model.get("status", "?")),
            str(model.get("backend") or "-"),
            "-" if pid is None else str(pid),
            _vram(model),
            _idle(model, now),
        ]
        if budgets:
            row.insert(5, _on_gpus(str(model_id), budgets))
        rows.append(row)
    return rows


def notes(doc: dict[str, Any]) -> list[str]:
    """Lines under the table: each failed model's error, then the GPUs."""
    notes = []
    for model_id, model in (doc.get("models") or {}).items():
        if model.get("status") == "FAILED" and model.get("last_error"):
            note = f"{model_id}: {str(model['last_error']).splitlines()[0]}"
            retry = _parse_time(model.get("retry_at"))
            if retry is not None:
                note += f" (next try at {retry.astimezone():%H:%M:%S})"
            notes.append(note)
    budgets = _gpu_budgets(doc)
    notes.extend(_budget_line(g) for g in budgets)
    gpu = doc.get("gpu")
    if isinstance(gpu, dict):
        if not budgets and (not gpu.get("available") or not gpu.get("gpus")):
            notes.append("gpu: none visible to swapper")
        placed = {g.get("index") for g in budgets}
        for g in gpu.get("gpus") or []:
            if g.get("index") in placed:
                continue  # its budget line above has NVML's figures too
            notes.append(
                f"gpu {g.get('index')} {g.get('name')}: {g.get('used_mb')} of "
                f"{g.get('total_mb')} MiB used, {g.get('free_mb')} MiB free"
            )
    return notes


def _mib(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, int | float) else "?"


def _budget_line(gpu: dict[str, Any]) -> str:
    """``gpu 0 NAME: committed X of budget Y MiB (NVML used U of T MiB) — models a, b``."""
    budget = gpu.get("budget_mb")
    line = f"gpu {gpu.get('index')} {gpu.get('name') or '?'}: committed {_mib(gpu.get('committed_mb'))}"
    line += f" of budget {_mib(budget)} MiB" if budget is not None else " MiB (budget unknown)"
    total, used = gpu.get("total_mb"), gpu.get("used_mb")
    if total is not None and used is not None:
        line += f" (NVML used {_mib(used)} of {_mib(total)} MiB)"
    models = [str(m) for m in gpu.get("models") or []]
    return f"{line} — {'models ' + ', '.join(models) if models else 'no models'}"


def header(doc: dict[str, Any]) -> str:
    resident = doc.get("resident") or []
    if isinstance(resident, list) and len(resident) > 1:
        return f"mode: {doc.get('mode', '?')}  resident: {', '.join(map(str, resident))}"
    return f"mode: {doc.get('mode', '?')}  active: {doc.get('active_model') or '-'}"


def plain_table(rows: list[list[str]], columns: tuple[str, ...] = COLUMNS) -> list[str]:
    widths = [max(len(row[i]) for row in [list(columns), *rows]) for i in range(len(columns))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [list(columns), *rows]
    ]


def rich_table(doc: dict[str, Any], rows: list[list[str]]) -> Table:
    table = Table(title=header(doc), title_justify="left")
    for column in status_columns(doc):
        table.add_column(column, justify="right" if column in _RIGHT else "left")
    for row in rows:
        # Text, not markup strings: a model id or error with "[...]" must print as it is.
        cells = [Text(cell) for cell in row]
        cells[1].stylize(_STATUS_STYLES.get(row[1], ""))
        table.add_row(*cells)
    return table


def write(console: Console, text: str) -> None:
    """Write text as it is: no markup, highlighting or wrapping."""
    console.file.write(text + "\n")
    console.file.flush()


class Progress:
    """A spinner with the model's phase on a terminal; elsewhere a line at most once a second."""

    def __init__(self, console: Console, verb: str, model: str) -> None:
        self._console, self._verb, self._model = console, verb, model
        self._next_line = 1.0  # loads that finish within a second print nothing
        self._status: Any = None

    def __enter__(self) -> Progress:
        if self._console.is_terminal:
            self._status = self._console.status(Text(f"{self._verb} {self._model}..."))
            self._status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)

    def update(self, phase: str, elapsed: float) -> None:
        """Show the current phase and the seconds waited so far."""
        text = f"{self._verb} {self._model}... {elapsed:.1f}s{f' ({phase})' if phase else ''}"
        if self._status is not None:
            self._status.update(Text(text))
        elif elapsed >= self._next_line:
            write(self._console, text)
            self._next_line = elapsed + 1.0


def summary(doc: dict[str, Any], model: str, elapsed: float) -> str:
    details = [f"pid {doc['pid']}"] if doc.get("pid") is not None else []
    if isinstance(doc.get("vram_mb"), int | float):
        details.append(_vram(doc))
    details.append(f"{elapsed:.1f}s")
    return f"{doc.get('model', model)} {doc.get('status', '?')} ({', '.join(details)})"
