"""Numbers as people read them in messages: sizes and durations."""

from __future__ import annotations


def human_bytes(size: float) -> str:
    """``7864320`` → ``"7.5 MB"`` (binary multiples, short names)."""
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1024
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def human_duration(ms: float) -> str:
    """``2300`` → ``"2.3 s"``, ``45.2`` → ``"45 ms"``."""
    return f"{ms / 1000:.1f} s" if ms >= 1000 else f"{ms:.0f} ms"


def escape(text: str) -> str:
    """Escape Slack's control characters (``&``, ``<``, ``>``) in text that came from outside, so
    ``<!channel>`` typed by a user is shown, never acted on."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
