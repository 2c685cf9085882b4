"""Summaries of many log lines: error groups (`/ops logs`) and nginx traffic (`/ops traffic`).

An error group is every message that reads the same once its variable parts are masked: timestamps,
UUIDs, quoted values, IP addresses, and every word with a digit in it (numbers, hex ids, user42). Memory
is bounded whatever the number of lines: at most ``max_groups`` groups (the rest are counted as "other"),
at most ``max_keys`` keys per counter.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime

from services.errors import CommandError
from services.inventory import Component
from services.logs.base import LogBackend, LogLine, LogPage, LogQuery
from services.logs.mask import scrub
from services.redaction import Redactor

__all__ = [
    "ErrorGroup",
    "ErrorGroups",
    "LogRead",
    "NginxRequest",
    "TrafficSummary",
    "group_key",
    "parse_nginx",
    "read_logs",
    "read_traffic",
]

SUMMARY_PAGES = 5  # pages read after the shown one, for the summary (Cloud Logging allows 60 calls a minute)
SUMMARY_LINES = 20_000  # lines the summary counts at most
TRAFFIC_LINES = 500_000  # access lines /ops traffic counts at most
PAGE = 1000  # lines asked for per page beyond the first
MAX_MESSAGE = 400  # characters of a message that decide its group (and are kept as the example)

# Applied in order: each replaces what the ones after it would otherwise break into pieces. Each runs only
# when the line holds the character it needs (most lines hold no timestamp, UUID or quote).
_MASKS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    (
        ":",
        re.compile(
            r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?"
            r"|\b\d{2}:\d{2}:\d{2}\b"
        ),
        "<time>",
    ),
    ("-", re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"), "<id>"),
    ("\"'`", re.compile(r"\"[^\"]*\"|'[^']*'|`[^`]*`"), '"<v>"'),
    (".", re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"), "<ip>"),
    # Any word with a digit in it (42, 0x7ffe, 3f9a2c1e, user42, 12ms) is one variable value: a hex id that
    # happens to have no letter must not make a group of its own (8 or more hex letters without a digit is
    # a hex id too: no English word is one).
    ("", re.compile(r"\b(?=\w*\d)\w+\b|\b(?:[a-f]{8,}|[A-F]{8,})\b"), "<n>"),
)


def group_key(message: str) -> str:
    """The shape of a message: its variable parts masked (``user 42 not found`` → ``user <n> not found``)."""
    text = message[:MAX_MESSAGE]
    for needs, pattern, mask in _MASKS:
        if not needs or any(ch in text for ch in needs):
            text = pattern.sub(mask, text)
    return " ".join(text.split())


@dataclass
class ErrorGroup:
    """Messages of one shape: how many, when first and last seen, and one example (the newest)."""

    key: str
    count: int
    first_seen: datetime | None
    last_seen: datetime | None
    example: str
    level: str | None = None


class ErrorGroups:
    """Groups error lines by shape, in bounded memory; lines may come in any order."""

    def __init__(self, max_groups: int = 500) -> None:
        self.max_groups = max_groups
        self._groups: dict[str, ErrorGroup] = {}
        self.other = 0  # lines of shapes beyond max_groups
        self.lines = 0

    def add(self, line: LogLine) -> None:
        """Count one line in its group."""
        self.lines += 1
        key = group_key(line.text)
        group = self._groups.get(key)
        if group is None:
            if len(self._groups) >= self.max_groups:
                self.other += 1
                return
            self._groups[key] = ErrorGroup(key, 1, line.at, line.at, line.text[:MAX_MESSAGE], line.level)
            return
        group.count += 1
        if line.at is not None:
            if group.first_seen is None or line.at < group.first_seen:
                group.first_seen = line.at
            if group.last_seen is None or line.at >= group.last_seen:
                group.last_seen = line.at
                group.example = line.text[:MAX_MESSAGE]

    def extend(self, lines: Iterable[LogLine]) -> None:
        for line in lines:
            self.add(line)

    def __len__(self) -> int:
        return len(self._groups)

    def top(self, n: int = 10) -> list[ErrorGroup]:
        """The ``n`` biggest groups, most lines first (newest last-seen first among equals)."""
        ordered = sorted(
            self._groups.values(), key=lambda g: (-g.count, -(g.last_seen.timestamp() if g.last_seen else 0.0))
        )
        return ordered[:n]


# -- nginx access logs ---------------------------------------------------------------------------------

_NGINX = re.compile(
    r'^(?P<ip>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+|-)'
    r'(?: "(?P<referer>[^"]*)" "(?P<agent>[^"]*)")?'
)


@dataclass(frozen=True)
class NginxRequest:
    """One request of an nginx `combined` access log."""

    ip: str
    time: str
    method: str
    path: str
    status: int
    bytes: int
    referer: str
    agent: str


def parse_nginx(line: str) -> NginxRequest | None:
    """A `combined` access-log line, or None when the line is not one."""
    found = _NGINX.match(line)
    if found is None:
        return None
    parts = found["request"].split(" ")
    method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("-", found["request"][:200])
    size = found["bytes"]
    return NginxRequest(
        ip=found["ip"],
        time=found["time"],
        method=method,
        path=path.split("?", 1)[0][:200],
        status=int(found["status"]),
        bytes=0 if size == "-" else int(size),
        referer=found["referer"] or "",
        agent=found["agent"] or "",
    )


def status_matches(status: int, wanted: str) -> bool:
    """``--status 4xx|5xx|404``: whether a response status is one of those wanted."""
    if len(wanted) == 3 and wanted.endswith("xx"):
        return status // 100 == int(wanted[0])
    return str(status) == wanted


class BoundedCounter:
    """A Counter that keeps at most ``max_keys`` keys: when full, the smaller half is dropped (their
    counts go to ``dropped``), so a flood of distinct paths or IPs never grows memory without end."""

    def __init__(self, max_keys: int = 20_000) -> None:
        self.max_keys = max_keys
        self.counts: Counter[str] = Counter()
        self.dropped = 0

    def add(self, key: str) -> None:
        self.counts[key] += 1
        if len(self.counts) > self.max_keys:
            keep = dict(self.counts.most_common(self.max_keys // 2))
            self.dropped += sum(self.counts.values()) - sum(keep.values())
            self.counts = Counter(keep)

    def top(self, n: int) -> list[tuple[str, int]]:
        return self.counts.most_common(n)


@dataclass
class TrafficSummary:
    """Runbook 001's "suspicious access patterns": requests, status classes, top paths and client IPs,
    and the IPs with most 4xx answers, over a window."""

    requests: int = 0
    unparsed: int = 0
    bytes: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    paths: BoundedCounter = field(default_factory=BoundedCounter)
    ips: BoundedCounter = field(default_factory=BoundedCounter)
    ips_4xx: BoundedCounter = field(default_factory=BoundedCounter)
    first: datetime | None = None
    last: datetime | None = None

    def add(self, line: LogLine) -> None:
        """Count one access-log line (its nginx fields when the backend parsed it, else its text)."""
        request = parse_nginx(line.text) if "status" not in line.fields else None
        if request is not None:
            ip, path, status, size = request.ip, request.path, request.status, request.bytes
        elif "status" in line.fields and line.fields["status"].isdigit():
            ip, path = line.fields.get("ip", "-"), line.fields.get("path", "-")
            status = int(line.fields["status"])
            size = int(line.fields["bytes"]) if line.fields.get("bytes", "").isdigit() else 0
        else:
            self.unparsed += 1
            return
        self.requests += 1
        self.bytes += size
        self.statuses[f"{status // 100}xx"] += 1
        self.paths.add(path)
        self.ips.add(ip)
        if 400 <= status < 500:
            self.ips_4xx.add(ip)
        if line.at is not None:
            self.first = line.at if self.first is None or line.at < self.first else self.first
            self.last = line.at if self.last is None or line.at > self.last else self.last


# -- reading a window for a command: every line scrubbed as it arrives ------------------------------


def _clean(line: LogLine, redactor: Redactor) -> LogLine:
    """The line as it may leave the bot: every text in it scrubbed."""
    fields = {k: scrub(redactor, v) for k, v in line.fields.items()} if line.fields else line.fields
    return replace(line, text=scrub(redactor, line.text), fields=fields, source=redactor.redact(line.source))


@dataclass
class LogRead:
    """What one `/ops logs` read found: the shown page, and the summary over it and the pages after."""

    page: LogPage
    lines: list[LogLine]
    levels: Counter[str]
    groups: ErrorGroups
    scanned: int
    matched: int
    complete: bool  # the summary covers the whole window
    notes: list[str]


async def _read(backend: LogBackend, spec: Component, query: LogQuery, deadline: float) -> LogPage | None:
    """One page, or None when the backend did not answer by the deadline."""
    left = deadline - time.monotonic()
    if left <= 0.05:
        return None
    try:
        async with asyncio.timeout(left + 0.3):  # the backend's own budget first; this one if it ignores it
            return await backend.read(spec, query, timeout=left)
    except TimeoutError:
        return None


async def read_logs(
    backend: LogBackend, spec: Component, query: LogQuery, redactor: Redactor, *, deadline: float
) -> LogRead:
    """The page asked for, then (for the summary) older pages of the window until it ends, the summary's
    caps or the deadline: every line scrubbed as it arrives."""
    page = await _read(backend, spec, query, deadline)
    if page is None:
        raise CommandError("The logs did not answer in time; try a shorter window.", outcome="error")
    lines = [_clean(line, redactor) for line in page.lines]
    notes = [redactor.redact(page.note)] if page.note else []
    summary = LogRead(replace(page, lines=lines), lines, Counter(), ErrorGroups(), page.scanned, 0, False, notes)
    _count(summary, lines, query.errors)
    cursor, pages = page.cursor, 0
    while cursor is not None and pages < SUMMARY_PAGES and summary.matched < SUMMARY_LINES:
        more = await _read(backend, spec, replace(query, cursor=cursor, limit=PAGE), deadline)
        if more is None:
            break
        pages += 1
        summary.scanned += more.scanned
        _count(summary, [_clean(line, redactor) for line in more.lines], query.errors)
        cursor = more.cursor
        if more.note and not more.cursor:
            summary.notes.append(redactor.redact(more.note))
    summary.complete = cursor is None
    return summary


def _count(summary: LogRead, lines: list[LogLine], errors_only: bool) -> None:
    summary.matched += len(lines)
    for line in lines:
        summary.levels[line.level or "no level"] += 1
        if line.level in ("error", "critical") or (errors_only and line.level is None):
            summary.groups.add(line)


async def read_traffic(
    backend: LogBackend, spec: Component, query: LogQuery, redactor: Redactor, *, deadline: float
) -> tuple[TrafficSummary, bool]:
    """Every access line of the window, page after page, counted (scrubbed first); and whether the whole
    window was read before the deadline or the line cap."""
    summary = TrafficSummary()
    scanned, cursor = 0, query.cursor
    while scanned < TRAFFIC_LINES:
        page = await _read(backend, spec, replace(query, cursor=cursor), deadline)
        if page is None:
            return summary, False
        scanned += page.scanned
        for line in page.lines:
            summary.add(_clean(line, redactor))
        cursor = page.cursor
        if cursor is None:
            return summary, True
    return summary, False
