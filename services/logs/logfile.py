"""Log files on the bot's host (the `logfile` component): JSON lines, plain text or nginx access logs,
with their rotated files (`app.log.1`, `app.log.2.gz`, `app.log-20260101.gz`).

A window is found by binary search on the lines' timestamps (seek, read one block, find the next line
start, read its time), so the last hour of a 5 GB file costs a few dozen small reads plus the hour
itself; lines are then read backwards in blocks, newest first. gzip files cannot be searched: they are
streamed forward, keeping only the newest matches. Only the declared files are read: the cursor names a
file by its name in the declared set (never a path), links are not followed, and a live file's last line
still being written (no newline yet) is left for the next read. The cursor is ``name@offset@inode``:
lines starting before ``offset`` of that file (found by inode after a rotation) come next.
"""

from __future__ import annotations

import asyncio
import fnmatch
import gzip
import json
import os
import re
import stat
import time
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import IO, cast
from zoneinfo import ZoneInfo

from services.inventory import Component, LogfileComponent
from services.logs.base import Level, LogError, LogLine, LogPage, LogQuery
from services.logs.groups import parse_nginx, status_matches

__all__ = ["LineParser", "LogFile", "LogfileBackend", "ReadStats", "declared_files", "read_logfile"]

BLOCK = 1024 * 1024  # most bytes read at once when reading backwards
FIRST_BLOCK = 32 * 1024  # the first read backwards (then doubled up to BLOCK)
PROBE = 16 * 1024  # the binary search stops when the window's edge is known to this many bytes
LOOK = 4 * 1024  # bytes one probe reads first (more only for a line longer than this)
MAX_LINE = 1024 * 1024  # a longer "line" (a binary file, a runaway write) is skipped, not kept in memory
MAX_FIELDS = 20
_ROTATED = re.compile(r"^(?P<base>.+?)(?:\.(?P<n>\d{1,4})|-(?P<date>\d{8,10}))?(?P<gz>\.gz)?$")

_LEVELS: dict[str, Level] = {
    "critical": "critical", "crit": "critical", "fatal": "critical", "emerg": "critical", "emergency": "critical",
    "alert": "critical", "panic": "critical", "error": "error", "err": "error", "severe": "error",
    "warning": "warning", "warn": "warning", "info": "info", "notice": "info", "information": "info",
    "debug": "debug", "trace": "debug", "fine": "debug",
}  # fmt: skip
_LETTERS: dict[str, Level] = {"e": "error", "w": "warning", "i": "info", "d": "debug"}
_NUMERIC_LEVELS: tuple[tuple[int, Level], ...] = ((50, "critical"), (40, "error"), (30, "warning"), (20, "info"))
_ERROR_WORDS = re.compile(r"\b(?:Traceback|Exception|ERROR|FATAL|CRITICAL)\b")
_NGINX_TIME = "%d/%b/%Y:%H:%M:%S %z"
_ERROR_BYTES = (b"err", b"crit", b"fatal", b"severe", b"emerg", b"alert", b"panic", b"exception", b"traceback")


def normalise_level(value: object) -> Level | None:
    """ERROR/err/E/40 → "error"; None when the value names no level."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return next((level for floor, level in _NUMERIC_LEVELS if value >= floor), "debug")
    if isinstance(value, str):
        word = value.strip().lower()
        if word.isdigit():
            return normalise_level(int(word))
        return _LEVELS.get(word) or _LETTERS.get(word)
    return None


class LineParser:
    """Reads time, level and message of one line in the component's format."""

    def __init__(self, spec: LogfileComponent) -> None:
        self.spec = spec
        self.zone: tzinfo = ZoneInfo(spec.timezone)
        self._level = re.compile(spec.level_pattern)
        self._time = re.compile(spec.time_pattern)
        # The JSON time field found without decoding the whole object (binary search, gzip skipping).
        self._json_time = re.compile(rb'"' + re.escape(spec.time_field.encode()) + rb'"\s*:\s*"?([^",}]+)')
        self._nginx_time = re.compile(rb"\[([^\]]{10,40})\]")

    def _when(self, text: str, fmt: str) -> datetime | None:
        try:
            if fmt == "iso":
                at = datetime.fromisoformat(text.strip().replace(",", "."))
            else:
                at = datetime.strptime(text.strip(), fmt)
        except ValueError:
            try:  # epoch seconds or milliseconds
                number = float(text)
            except ValueError:
                return None
            return datetime.fromtimestamp(number / 1000 if number > 1e11 else number, UTC)
        if at.tzinfo is None:
            at = at.replace(tzinfo=self.zone)
        return at.astimezone(UTC)

    def time_of(self, raw: bytes) -> datetime | None:
        """The line's timestamp (cheap: the line is not decoded as a whole)."""
        fmt = self.spec.format
        if fmt == "json":
            found = self._json_time.search(raw)
            return self._when(found.group(1).decode("utf-8", "replace"), "iso") if found else None
        if fmt == "nginx_combined":
            found = self._nginx_time.search(raw)
            return self._when(found.group(1).decode("ascii", "replace"), _NGINX_TIME) if found else None
        match = self._time.search(raw[:512].decode("utf-8", "replace"))
        return self._when(match["time"], self.spec.time_format) if match else None

    def parse(self, raw: bytes, source: str) -> LogLine:
        """One whole line, decoded."""
        text = raw.decode("utf-8", "replace").rstrip("\r")
        fmt = self.spec.format
        if fmt == "json":
            return self._json(text, raw, source)
        if fmt == "nginx_combined":
            request = parse_nginx(text)
            if request is None:
                return LogLine(None, None, text, source)
            level: Level = "error" if request.status >= 500 else "warning" if request.status >= 400 else "info"
            fields = {"ip": request.ip, "method": request.method, "path": request.path,
                      "status": str(request.status), "bytes": str(request.bytes)}  # fmt: skip
            return LogLine(self._when(request.time, _NGINX_TIME), level, text, source, fields)
        found = self._level.search(text)
        return LogLine(self.time_of(raw), normalise_level(found["level"]) if found else None, text, source)

    def _json(self, text: str, raw: bytes, source: str) -> LogLine:
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            found = self._level.search(text)
            return LogLine(self.time_of(raw), normalise_level(found["level"]) if found else None, text, source)
        spec = self.spec
        message = record.get(spec.message_field)
        fields: dict[str, str] = {}
        for key, value in record.items():
            if key in (spec.message_field, spec.level_field, spec.time_field) or len(fields) >= MAX_FIELDS:
                continue
            fields[str(key)[:64]] = (value if isinstance(value, str) else json.dumps(value, default=str))[:300]
        at = record.get(spec.time_field)
        return LogLine(
            self._when(str(at), "iso") if at is not None else None,
            normalise_level(record.get(spec.level_field)),
            text if message is None else str(message),
            source,
            fields,
        )


@dataclass(frozen=True)
class LogFile:
    """One declared file: its name (what a cursor names), path, whether gzip, and when last written."""

    name: str
    path: Path
    gz: bool
    mtime: float
    size: int
    inode: int
    rank: int  # 0: a live file; n: rotated (app.log.n); dated files by their date


def declared_files(spec: LogfileComponent) -> list[LogFile]:
    """The component's files, newest first: what its path or glob names and, when ``rotated``, the files
    rotated from them. Links and anything not a regular file are left out."""
    directory, pattern = spec.path.parent, spec.path.name
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        raise LogError(f"The log directory {directory} does not exist on the bot's host.") from None
    except OSError as exc:
        raise LogError(f"The log directory {directory} cannot be read ({exc.strerror or 'error'}).") from None
    files: list[LogFile] = []
    for entry in entries:
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            continue
        name = entry.name
        if fnmatch.fnmatchcase(name, pattern):
            rank = 0
        elif spec.rotated and (found := _ROTATED.match(name)) and fnmatch.fnmatchcase(found["base"], pattern):
            if found["n"] is None and found["date"] is None and found["gz"] is None:
                continue
            rank = int(found["n"]) if found["n"] else 1
        else:
            continue
        info = entry.stat(follow_symlinks=False)
        files.append(LogFile(name, Path(entry.path), name.endswith(".gz"), info.st_mtime, info.st_size,
                             info.st_ino, rank))  # fmt: skip
    files.sort(key=lambda f: (-f.mtime, f.rank, f.name))
    return files


@dataclass
class ReadStats:
    """What one read cost: bytes read from disk (compressed bytes for gzip) and lines looked at."""

    bytes_read: int = 0
    scanned: int = 0
    files: list[str] = field(default_factory=list)


class _Counted:
    """A binary file whose reads are counted."""

    def __init__(self, handle: IO[bytes], stats: ReadStats) -> None:
        self.handle = handle
        self.stats = stats

    def read_at(self, offset: int, size: int) -> bytes:
        self.handle.seek(offset)
        data = self.handle.read(size)
        self.stats.bytes_read += len(data)
        return data


def _open(file: LogFile) -> IO[bytes]:
    """Open without following a link put there since the listing; only a regular file."""
    fd = os.open(file.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LogError(f"{file.name} is not a regular file.")
    return os.fdopen(fd, "rb")


class _Filter:
    def __init__(self, query: LogQuery, spec: LogfileComponent) -> None:
        self.query = query
        self.grep = query.grep.lower().encode() if query.grep else None
        # --errors on JSON lines: a line that names no error word and has no numeric or one-letter level
        # cannot be an error; most lines are skipped without being decoded (substring tests run in C).
        self.errors = query.errors and spec.format == "json"
        field = re.escape(spec.level_field.encode())
        self.coded_level = re.compile(rb'"' + field + rb'"\s*:\s*(?:\d|"[A-Za-z]")')

    def raw(self, raw: bytes) -> bool:
        """A cheap test on the raw line: False only when the line cannot match."""
        if self.errors:
            lowered = raw.lower()
            if not any(word in lowered for word in _ERROR_BYTES) and not self.coded_level.search(raw):
                return False
        return self.grep is None or self.grep in raw.lower()

    def line(self, line: LogLine) -> bool:
        query = self.query
        if query.errors and not (
            line.level in ("error", "critical") or (line.level is None and _ERROR_WORDS.search(line.text))
        ):
            return False
        if query.status is not None:
            status = line.fields.get("status", "")
            if not status.isdigit() or not status_matches(int(status), query.status):
                return False
        return True


@dataclass
class _Page:
    lines: list[LogLine] = field(default_factory=list)
    cursor: str | None = None
    note: str = ""


def _cursor(file: LogFile, offset: int) -> str:
    return f"{file.name}@{offset}@{file.inode}"


def _parse_cursor(cursor: str, files: list[LogFile]) -> tuple[int, int]:
    """(index of the file in ``files``, offset); a cursor naming anything else is refused before any read."""
    name, _, rest = cursor.partition("@")
    offset_text, _, inode_text = rest.partition("@")
    if not offset_text.isdigit() or (inode_text and not inode_text.isdigit()) or "/" in name or "\\" in name:
        raise LogError("That page position is not one opsbot gave; run the command again.")
    for index, file in enumerate(files):
        if inode_text and file.inode == int(inode_text) and not file.gz:
            return index, int(offset_text)  # the same file, renamed by a rotation since
    for index, file in enumerate(files):
        if file.name == name:
            return index, int(offset_text)
    raise LogError(f"{name[:60]!r} is not one of this component's log files (it may have been rotated away).")


class _Reader:
    """One page of one component: the declared files, newest first, until ``limit`` lines matched."""

    def __init__(self, spec: LogfileComponent, query: LogQuery, deadline: float, stats: ReadStats) -> None:
        self.spec = spec
        self.query = query
        self.deadline = deadline
        self.stats = stats
        self.parser = LineParser(spec)
        self.filter = _Filter(query, spec)
        self.since = query.since.astimezone(UTC)
        self.until = query.until.astimezone(UTC)

    def read(self) -> _Page:
        files = declared_files(self.spec)
        start, end_offset = (0, None) if self.query.cursor is None else _parse_cursor(self.query.cursor, files)
        page = _Page()
        if not files:
            page.note = f"no file matches {self.spec.path}"
            return page
        for index in range(start, len(files)):
            file = files[index]
            if file.mtime < self.since.timestamp() - 1:
                break  # written last before the window: it and every older file hold nothing of it
            self.stats.files.append(file.name)
            end = end_offset if index == start else None
            try:
                done = self._gz(file, end, page) if file.gz else self._plain(file, end, page, live=index == 0)
            except (OSError, EOFError, zlib.error) as exc:
                page.note = f"{file.name} could not be read to the end ({type(exc).__name__})"
                return page
            if done:
                return page
        return page

    def _expired(self, page: _Page, file: LogFile, offset: int) -> bool:
        if time.monotonic() < self.deadline:
            return False
        page.cursor = _cursor(file, offset)
        page.note = "stopped at the time budget; older lines are on the next page"
        return True

    # -- plain files: binary search, then backwards ------------------------------------------------------

    def _first_time_from(self, handle: _Counted, position: int, size: int) -> tuple[int, datetime | None]:
        """The first line starting at or after ``position`` that has a time: (its start, its time);
        (size, None) when none does before the end. Reads a few KB, more only for long lines."""
        base = max(position - 1, 0)  # a line starts after a newline: one at position - 1 starts one at position
        buffer = handle.read_at(base, min(LOOK, size - base))
        if position > 0:
            while (newline := buffer.find(b"\n")) < 0:
                if base + len(buffer) >= size or len(buffer) > MAX_LINE:
                    return size, None
                buffer += handle.read_at(base + len(buffer), min(PROBE, size - base - len(buffer)))
            position = base + newline + 1
            buffer = buffer[newline + 1 :]
        checked = 0
        while position < size and checked < 64:
            end = buffer.find(b"\n")
            if end < 0 and position + len(buffer) < size:
                if len(buffer) > MAX_LINE:
                    return size, None
                buffer += handle.read_at(position + len(buffer), min(PROBE, size - position - len(buffer)))
                continue
            piece = buffer if end < 0 else buffer[:end]
            at = self.parser.time_of(piece) if piece.strip() else None
            if at is not None:
                return position, at
            position += len(piece) + 1
            buffer = buffer[len(piece) + 1 :]
            checked += 1
        return min(position, size), None

    def _offset_of(self, handle: _Counted, size: int, moment: datetime) -> int:
        """The start of the first line at or after ``moment`` (``size`` when there is none): a binary
        search that assumes the file is in time order, as a log is."""
        lo, hi = 0, size
        while hi - lo > PROBE:
            mid = (lo + hi) // 2
            start, at = self._first_time_from(handle, mid, size)
            if at is not None and at < moment:
                lo = start + 1 if start >= mid else mid + 1
            else:
                hi = mid
        start, at = self._first_time_from(handle, lo, size)
        if at is None or at >= moment:
            return start
        while start < size:  # the last stretch, forward in blocks from a line known to be before
            data = handle.read_at(start, min(2 * PROBE, size - start))
            pieces = data.split(b"\n")
            if start + len(data) < size:
                pieces.pop()  # the block's last line may be cut: the next block starts with it
            if not pieces:
                return self._first_time_from(handle, start + 1, size)[0]
            for piece in pieces:
                at = self.parser.time_of(piece) if piece.strip() else None
                if at is not None and at >= moment:
                    return start
                start += len(piece) + 1
        return size

    def _plain(self, file: LogFile, end: int | None, page: _Page, *, live: bool) -> bool:
        with _open(file) as raw_handle:
            handle = _Counted(raw_handle, self.stats)
            size = os.fstat(raw_handle.fileno()).st_size  # what was there when we looked: appends come later
            if end is not None and end > size:
                raise LogError(f"The page position is past the end of {file.name}; run the command again.")
            first = self._first_time_from(handle, 0, size)[1]
            if first is not None and first >= self.until:
                return False  # all after the window (an older file holds it)
            stop = size if end is None else end
            if end is None and self.until.timestamp() <= file.mtime:  # a cursor is already inside the window
                stop = self._offset_of(handle, size, self.until)
            if first is None or first >= self.since:
                start, bounded = 0, True
            elif end is None:
                start, bounded = self._offset_of(handle, stop, self.since), True
            else:  # a next page: the window's start is found on the way back instead of searched again
                start, bounded = 0, False
            return self._backwards(handle, file, start, stop, size, page, live=live, bounded=bounded)

    def _backwards(
        self,
        handle: _Counted,
        file: LogFile,
        start: int,
        stop: int,
        size: int,
        page: _Page,
        *,
        live: bool,
        bounded: bool = True,
    ) -> bool:
        """Lines of ``[start, stop)``, newest first, into the page. Not ``bounded``: ``start`` is not the
        window's start, so a block whose first line is before the window is checked line by line, and the
        first line before it ends the read."""
        position = stop
        carry = b""
        limit = self.query.limit
        block = min(BLOCK, max(FIRST_BLOCK, limit * 200))  # a small page reads little; a long read grows
        while position > start:
            if self._expired(page, file, position + len(carry)):
                return True
            size_now = min(block, position - start)
            block = min(block * 2, BLOCK)
            position -= size_now
            chunk = handle.read_at(position, size_now) + carry
            pieces = chunk.split(b"\n")
            if position > start:
                carry = pieces[0]
                offset = position + len(carry) + 1
                pieces = pieces[1:]
                if len(carry) > MAX_LINE:
                    carry = b""  # not a line anyone can read; skipped
            else:
                carry = b""
                offset = position
            starts: list[int] = []
            for piece in pieces:
                starts.append(offset)
                offset += len(piece) + 1
            check = not bounded and not self._after_since(pieces)
            last = len(pieces) - 1
            for i in range(last, -1, -1):
                piece = pieces[i]
                line_start = starts[i]
                if check and (at := self.parser.time_of(piece)) is not None and at < self.since:
                    return True  # the window's start: nothing older in this file or the older ones
                if line_start + len(piece) >= size and live and not chunk.endswith(b"\n"):
                    continue  # the live file's last line, still being written: the next read has it
                if not piece or piece.isspace():
                    continue
                self.stats.scanned += 1
                if not self.filter.raw(piece):
                    continue
                line = self.parser.parse(piece, file.name)
                if not self.filter.line(line):
                    continue
                page.lines.append(line)
                if len(page.lines) >= limit:
                    page.cursor = _cursor(file, line_start)  # at the file's start: the next page goes on
                    return True
        return False

    def _after_since(self, pieces: list[bytes]) -> bool:
        """Whether the first line with a time among the block's first few is in the window (then, the log
        being in time order, the whole block is)."""
        for piece in pieces[:8]:
            at = self.parser.time_of(piece) if piece.strip() else None
            if at is not None:
                return at >= self.since
        return False

    # -- gzip: streamed forward, the newest matches kept ---------------------------------------------

    def _gz(self, file: LogFile, end: int | None, page: _Page) -> bool:
        wanted = self.query.limit - len(page.lines)
        kept: deque[tuple[int, LogLine]] = deque(maxlen=wanted)
        matched = 0
        offset = 0
        carry = b""
        with _open(file) as raw_handle:
            counted = _CountingReader(raw_handle, self.stats)
            with gzip.GzipFile(fileobj=cast("IO[bytes]", counted), mode="rb") as stream:
                done = False
                while not done:
                    if time.monotonic() > self.deadline:
                        page.note = f"stopped at the time budget inside {file.name}; some of its lines are not shown"
                        break
                    data = stream.read(BLOCK)
                    if not data:
                        pieces = [carry] if carry else []
                        carry = b""
                        done = True
                    else:
                        pieces = (carry + data).split(b"\n")
                        carry = pieces.pop()
                        if len(carry) > MAX_LINE:
                            offset += len(carry)
                            carry = b""
                    for piece in pieces:
                        line_start = offset
                        offset += len(piece) + 1
                        if end is not None and line_start >= end:
                            done = True
                            break
                        if not piece.strip():
                            continue
                        at = self.parser.time_of(piece)
                        if at is not None and at < self.since:
                            continue
                        if at is not None and at >= self.until:
                            done = True
                            break
                        self.stats.scanned += 1
                        if not self.filter.raw(piece):
                            continue
                        line = self.parser.parse(piece, file.name)
                        if self.filter.line(line):
                            matched += 1
                            kept.append((line_start, line))
        page.lines.extend(line for _, line in reversed(kept))
        if kept and (matched > len(kept) or len(page.lines) >= self.query.limit):
            page.cursor = _cursor(file, kept[0][0])
            return True
        return False


class _CountingReader:
    """A file object for GzipFile whose reads (compressed bytes) are counted."""

    def __init__(self, handle: IO[bytes], stats: ReadStats) -> None:
        self.handle = handle
        self.stats = stats

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.stats.bytes_read += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        return None

    @property
    def closed(self) -> bool:
        return self.handle.closed


def read_logfile(spec: LogfileComponent, query: LogQuery, *, deadline: float) -> tuple[LogPage, ReadStats]:
    """One page of a logfile component's lines, newest first (blocking: run it in a thread), and what it
    cost. ``deadline`` is a ``time.monotonic()`` value: past it, what was found is returned with a note
    and a cursor to go on from."""
    stats = ReadStats()
    try:
        page = _Reader(spec, query, deadline, stats).read()
    except PermissionError:
        raise LogError(f"The bot may not read {spec.path} (permission denied).") from None
    except FileNotFoundError:
        raise LogError(f"A log file of {spec.path} vanished while it was read (rotated?); try again.") from None
    return LogPage(page.lines, stats.scanned, page.cursor, page.note), stats


def _iter_lines(spec: LogfileComponent, query: LogQuery, deadline: float) -> Iterator[LogLine]:
    """Every matching line of the window, newest first, page after page (tests and benchmarks)."""
    cursor = query.cursor
    while True:
        page, _ = read_logfile(spec, _with_cursor(query, cursor), deadline=deadline)
        yield from page.lines
        if page.cursor is None:
            return
        cursor = page.cursor


def _with_cursor(query: LogQuery, cursor: str | None) -> LogQuery:
    from dataclasses import replace

    return replace(query, cursor=cursor)


class LogfileBackend:
    """The `logfile` component's backend: the blocking reads run in a worker thread, bounded by the
    caller's timeout (checked between blocks)."""

    async def read(self, component: Component, query: LogQuery, *, timeout: float) -> LogPage:  # noqa: ASYNC109
        if not isinstance(component, LogfileComponent):
            raise LogError(f"a {component.type} component has no log files")
        deadline = time.monotonic() + max(timeout, 0.05)
        page, _ = await asyncio.to_thread(read_logfile, component, query, deadline=deadline)
        return page
