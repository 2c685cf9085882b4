"""Numbers as people read them in messages: sizes and durations."""

from __future__ import annotations

from datetime import timedelta


def human_bytes(size: float) -> str:
    """``7864320`` → ``"7.5 MB"`` (binary multiples, short names)."""
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1024
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def size(n: int | None) -> str:
    """A byte count in a message (``"4.0 KB"``), ``"?"`` when it is not known."""
    return "?" if n is None else human_bytes(n)


def ago(delta: timedelta) -> str:
    """How long ago, coarsely: ``"just now"``, ``"12 min ago"``, ``"5 h 3 min ago"``, ``"3 days ago"``."""
    minutes = int(delta.total_seconds() // 60)
    if minutes < 1:
        return "just now"
    if minutes < 60:
        return f"{minutes} min ago"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} h {minutes % 60} min ago"
    return f"{hours // 24} days ago"


def human_age(seconds: float) -> str:
    """How long something has waited: ``"45 s"``, ``"12 min"``, ``"5 h 3 min"``, ``"3 d 4 h"``."""
    minutes = int(seconds // 60)
    if minutes < 1:
        return f"{int(seconds)} s"
    if minutes < 120:
        return f"{minutes} min"
    hours = minutes // 60
    return f"{hours} h {minutes % 60} min" if hours < 48 else f"{hours // 24} d {hours % 24} h"


def human_duration(ms: float) -> str:
    """``2300`` → ``"2.3 s"``, ``45.2`` → ``"45 ms"``."""
    return f"{ms / 1000:.1f} s" if ms >= 1000 else f"{ms:.0f} ms"


def escape(text: str) -> str:
    """Escape Slack's control characters (``&``, ``<``, ``>``) in text that came from outside, so
    ``<!channel>`` typed by a user is shown, never acted on."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
