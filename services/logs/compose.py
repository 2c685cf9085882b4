"""Logs of a docker compose project (runbooks 001 and 003): ``docker compose logs`` on the bot's host.

``docker compose logs --no-color --timestamps --since T --until T [service…]`` prints the window oldest
first, every line as ``web-1  | 2025-03-01T09:00:00.123456789Z message``. The output is streamed from the
child (never held whole: at most ``MAX_BYTES`` are read, each line cut to ``MAX_LINE`` bytes) and the
newest ``limit`` matching lines are kept in a bounded deque. The child is killed with its process group
when the time budget runs out; what was read by then is returned with a note. Compose has no cursor of
its own, so ours is the timestamp of the oldest line returned (and how many lines at that very instant
were shown): the next page reads the window up to there. The text is returned raw (redaction is the
command's job).
"""

from __future__ import annotations

import heapq
import re
from collections import deque
from datetime import UTC, datetime, timedelta

from services.deploy.base import DeployError
from services.deploy.compose import ComposeProject
from services.inventory import Component, ComposeComponent
from services.logs.base import Level, LogError, LogLine, LogPage, LogQuery

__all__ = ["MAX_BYTES", "MAX_LINE", "ComposeLogs", "level_in_text", "parse_compose_line"]

MAX_BYTES = 256 * 1024 * 1024
"""Bytes of ``docker compose logs`` output read for one page at most; the rest of the window is not read."""
MAX_LINE = 16 * 1024
"""Bytes kept of one log line (a stack trace printed on one line, a base64 blob)."""

_PREFIX = re.compile(r"^(?P<source>[^|\s][^|]*?)\s*\|\s?(?P<rest>.*)$")
_STAMP = re.compile(r"^(?P<stamp>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d))\s?(?P<text>.*)$")
_LEVEL_WORDS = re.compile(
    r"\b(?P<word>CRITICAL|FATAL|PANIC|EMERG(?:ENCY)?|ALERT|ERROR|ERR|Traceback|Exception|WARN(?:ING)?|INFO|"
    r"NOTICE|DEBUG|TRACE)\b",
    re.IGNORECASE,
)
_LEVELS: dict[str, Level] = {
    "critical": "critical",
    "fatal": "critical",
    "panic": "critical",
    "emerg": "critical",
    "emergency": "critical",
    "alert": "critical",
    "error": "error",
    "err": "error",
    "traceback": "error",
    "exception": "error",
    "warn": "warning",
    "warning": "warning",
    "info": "info",
    "notice": "info",
    "debug": "debug",
    "trace": "debug",
}
_ERRORS = frozenset({"error", "critical"})


def level_in_text(text: str) -> Level | None:
    """The level a plain-text line states (its first level word: ``ERROR``, ``[warn]``, ``level=info``,
    ``Traceback`` → error), or None."""
    found = _LEVEL_WORDS.search(text[:300])
    return _LEVELS[found.group("word").lower()] if found else None


def _timestamp(stamp: str) -> datetime | None:
    """docker's RFC 3339 with nanoseconds, as an aware UTC datetime (microseconds kept)."""
    text = stamp.replace("Z", "+00:00")
    if "." in text:
        head, _, tail = text.partition(".")
        digits = re.match(r"\d+", tail)
        if digits is None:
            return None
        text = f"{head}.{digits.group()[:6].ljust(6, '0')}{tail[digits.end() :]}"
    try:
        return datetime.fromisoformat(text).astimezone(UTC)
    except ValueError:
        return None


def parse_compose_line(raw: str) -> LogLine:
    """One line of ``docker compose logs --no-color --timestamps``: its container prefix, docker's
    timestamp, the text, and the level the text states."""
    source = ""
    rest = raw
    prefix = _PREFIX.match(raw)
    if prefix is not None:
        source, rest = prefix.group("source").strip(), prefix.group("rest")
    at: datetime | None = None
    stamped = _STAMP.match(rest)
    if stamped is not None and (at := _timestamp(stamped.group("stamp"))) is not None:
        rest = stamped.group("text")
    return LogLine(at=at, level=level_in_text(rest), text=rest, source=source)


def _size(count: int) -> str:
    return f"{count // (1024 * 1024)} MiB" if count >= 1024 * 1024 else f"{count // 1024} KiB"


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _cursor(until: datetime, skip: int) -> str:
    return f"{_stamp(until)}|{skip}"


def _read_cursor(cursor: str) -> tuple[datetime, int]:
    stamp, _, skip = cursor.partition("|")
    moment = _timestamp(stamp)
    if moment is None or not skip.isdigit():
        raise LogError("That page of compose logs is no longer valid; run the command again.")
    return moment, int(skip)


class ComposeLogs:
    """The `compose` log backend: the project's services' output through ``docker compose logs``."""

    def __init__(self, *, max_bytes: int = MAX_BYTES) -> None:
        self._max_bytes = max_bytes

    async def read(
        self,
        component: Component,
        query: LogQuery,
        *,
        timeout: float,  # noqa: ASYNC109  # the LogBackend interface: the caller's bound, applied here
    ) -> LogPage:
        """The newest ``query.limit`` matching lines of the window (or of its part before the cursor)."""
        if not isinstance(component, ComposeComponent):
            raise LogError(f"docker compose has no logs for a {component.type} component.")
        until, skip = (query.until, 0) if query.cursor is None else _read_cursor(query.cursor)
        until = min(until, query.until)
        if until <= query.since:
            return LogPage(lines=[], scanned=0)
        try:
            project = ComposeProject.for_component(component, docker=component.docker)
        except DeployError as exc:
            raise LogError(exc.message) from None
        # docker's --until is inclusive to the second on some versions: ask for a second more, cut here.
        args = [
            "logs",
            "--no-color",
            "--timestamps",
            "--since",
            _stamp(query.since),
            "--until",
            _stamp(until + timedelta(seconds=1)),
            *component.services,  # checked against compose's rule by ComposeProject
        ]
        # The newest ``limit`` matching lines by time (compose interleaves containers as they print, so
        # the last lines read are not always the newest): a bounded min-heap on (time, order read).
        newest: list[tuple[datetime, int, LogLine]] = []
        edge: deque[tuple[datetime, int, LogLine]] = deque(maxlen=query.limit + skip)
        counts = {"scanned": 0, "order": 0, "dropped": 0}
        last_at = query.since
        grep = query.grep

        def keep(item: tuple[datetime, int, LogLine]) -> None:
            if len(newest) < query.limit:
                heapq.heappush(newest, item)
            elif item[:2] > newest[0][:2]:
                heapq.heapreplace(newest, item)
                counts["dropped"] += 1
            else:
                counts["dropped"] += 1

        def on_line(raw: bytes) -> None:
            nonlocal last_at
            line = parse_compose_line(raw.decode("utf-8", "replace"))
            at = line.at or last_at  # a line without docker's stamp belongs with the one before
            last_at = at
            if at < query.since or at > until or (at == until and query.cursor is None):
                return
            counts["scanned"] += 1
            if query.errors and line.level not in _ERRORS:
                return
            if grep is not None and grep not in line.text:
                return
            counts["order"] += 1
            item = (at, counts["order"], line)
            if at == until:
                if len(edge) == edge.maxlen:
                    counts["dropped"] += 1  # an older one at that instant, for a later page
                edge.append(item)  # the cursor's own instant: the newest ``skip`` of these were shown
            else:
                keep(item)

        budget = max(timeout - 1.0, timeout * 0.8)
        try:
            end = await project.stream(*args, on_line=on_line, timeout=budget, max_bytes=self._max_bytes)
        except DeployError as exc:
            raise LogError(f"Could not read the logs of compose project {project.label}: {exc.message}") from None
        edge_items = list(edge)
        for item in edge_items[: max(len(edge_items) - skip, 0)]:
            keep(item)
        ordered = sorted(newest, key=lambda item: item[:2], reverse=True)
        lines = [line for _, _, line in ordered]
        note = ""
        if end.stopped == "timeout":
            note = f"docker compose logs did not finish within {budget:.0f} s: the newest lines may be missing."
        elif end.stopped == "bytes":
            note = (
                f"Read the first {_size(self._max_bytes)} of the window only: the newest lines "
                "may be missing; narrow the window."
            )
        cursor = None
        if counts["dropped"] and ordered:
            oldest = ordered[-1][0]
            shown = sum(1 for at, _, _ in ordered if at == oldest)
            cursor = _cursor(oldest, shown + (skip if oldest == until else 0))
        scanned = counts["scanned"]
        return LogPage(lines=lines, scanned=scanned, cursor=cursor, note=note)
