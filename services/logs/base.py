"""What a log backend gives `/ops logs`: pages of lines, newest first, with the backend's own cursor.

A backend reads one component's logs where they live (Cloud Logging, CloudWatch Logs, Render, docker
compose, a file on the bot's host). It knows nothing of Slack, of error groups or of redaction: the
command groups, redacts (every line, before it leaves the bot) and renders what the backends return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from services.inventory import Component

__all__ = ["Level", "LogBackend", "LogError", "LogLine", "LogPage", "LogQuery"]

Level = Literal["critical", "error", "warning", "info", "debug"]
"""A line's level, normalised (ERROR/ERR/E/severity 500 → "error"); None when the line says none."""


@dataclass(frozen=True)
class LogQuery:
    """What to read: the window ``[since, until)``, filters, how many lines, and where to go on from.

    ``grep`` is plain text typed by a user: each backend escapes it for its own query language (never
    passes it as a pattern). ``status`` filters nginx access lines: ``"4xx"``, ``"5xx"`` or one code.
    ``cursor`` is a value this backend returned in ``LogPage.cursor`` (opaque to everyone else).
    """

    since: datetime
    until: datetime
    errors: bool = False
    grep: str | None = None
    limit: int = 50
    status: str | None = None
    cursor: str | None = None


@dataclass(frozen=True)
class LogLine:
    """One log line: when (aware, UTC), its level, its text (the message; for JSON logs the message
    field, the rest kept in ``fields``), and where it came from (a file, a container, a revision)."""

    at: datetime | None
    level: Level | None
    text: str
    source: str = ""
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LogPage:
    """Matching lines, newest first, at most the query's limit; ``scanned`` lines were looked at to find
    them; ``cursor`` reads the next, older page (None: nothing older in the window); ``note`` says what is
    missing or approximate ("the backend stopped at its 5 s budget"); ``console_url`` opens the same query
    in the provider's console, where there is one."""

    lines: list[LogLine]
    scanned: int
    cursor: str | None = None
    note: str = ""
    console_url: str | None = None


class LogError(Exception):
    """The logs could not be read; the message is one plain sentence without secrets."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LogBackend(Protocol):
    """Reads one component type's logs. Never blocks the loop; bounded by ``timeout`` seconds (a slow
    backend returns what it found with a note, or raises LogError); raises LogError, never a driver's
    exception."""

    async def read(self, component: Component, query: LogQuery, *, timeout: float) -> LogPage: ...  # noqa: ASYNC109
