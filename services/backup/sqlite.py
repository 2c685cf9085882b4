"""SQLite backups through SQLite's online backup API, which copies pages under SQLite's own locks.

A plain file copy of a live database can catch a write half done; the backup API cannot. In WAL
mode the copy holds one read snapshot, which never blocks the app's writers. In rollback-journal
mode a reader blocks writers, so the copy goes a few pages at a time and lets them in between
steps (SQLite then restarts the copy; after a few restarts it finishes in one step). All sqlite3
work runs in a worker thread; a cancelled operation stops it at its next step.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from services.backup.base import BackupError, DumpInfo
from services.backup.bridge import file_chunks, in_thread, private_dir, spooled

_STEP_PAGES = 1024  # pages per backup step (4 MB at the default page size)
_RESTARTS = 3  # copies restarted by the app's writes before the copy is made in one step
_PROGRESS_STEPS = 10_000  # SQLite VM steps between two looks at the stop flag
_PROBLEM_LINES = 3  # integrity_check lines quoted in an error
_UNUSABLE = "the SQLite backup cannot be used"


class _Stopped(Exception):
    """Raised inside the backup's progress callback to stop a copy that was cancelled."""


class _TooBusy(Exception):
    """The app wrote so often that the stepwise copy kept restarting."""


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _connect(path: Path, busy_timeout: float, mode: str, stop: threading.Event) -> sqlite3.Connection:
    """``mode=rw`` / ``ro``: an existing file only (``rwc`` would create a missing one)."""
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode={mode}", uri=True, timeout=busy_timeout)
    conn.isolation_level = None  # transactions are begun explicitly
    conn.set_progress_handler(stop.is_set, _PROGRESS_STEPS)  # a true result interrupts the statement
    return conn


def _stats(conn: sqlite3.Connection) -> dict[str, Any]:
    """Rows per table and the page count: what a check compares again."""
    names = [
        str(row[0])
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
            "ORDER BY name"
        )
    ]
    tables = {name: int(conn.execute(f"SELECT count(*) FROM {_quote(name)}").fetchone()[0]) for name in names}  # noqa: S608
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    return {"tables": tables, "page_count": pages}


def _copy(source: sqlite3.Connection, target: sqlite3.Connection, stop: threading.Event, *, stepwise: bool) -> None:
    """Backup API from ``source`` into ``target``; stepwise copies give up after a few restarts."""
    last_remaining: int | None = None
    restarts = 0

    def progress(status: int, remaining: int, total: int) -> None:
        nonlocal last_remaining, restarts
        if stop.is_set():
            raise _Stopped
        if last_remaining is not None and remaining > last_remaining:
            restarts += 1
            if restarts > _RESTARTS:
                raise _TooBusy
        last_remaining = remaining

    if not stepwise:
        source.backup(target, pages=-1, progress=progress)
        return
    try:
        source.backup(target, pages=_STEP_PAGES, progress=progress)
    except _TooBusy:
        source.backup(target, pages=-1, progress=progress)


def _dump_to(path: Path, copy: Path, busy_timeout: float, stop: threading.Event) -> dict[str, Any]:
    """Runs in a worker thread: copy the live database to ``copy``; return its stats."""
    source = _connect(path, busy_timeout, "ro", stop)
    try:
        wal = str(source.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal"
        if wal:
            # One read snapshot for the whole copy: consistent, and WAL writers are not blocked.
            source.execute("BEGIN")
            source.execute("SELECT count(*) FROM sqlite_master").fetchone()
        target = sqlite3.connect(copy)
        target.set_progress_handler(stop.is_set, _PROGRESS_STEPS)  # the counting below can be long too
        try:
            _copy(source, target, stop, stepwise=True)
            if wal:
                source.execute("COMMIT")
            # The artifact is one self-contained file (no -wal beside it when it is opened later).
            target.execute("PRAGMA journal_mode=DELETE").fetchone()
            return _stats(target)
        finally:
            target.close()
    finally:
        source.close()


def _verify(copy: Path, busy_timeout: float, stop: threading.Event) -> dict[str, Any]:
    """Runs in a worker thread: integrity_check must say "ok"; returns the copy's stats."""
    conn = _connect(copy, busy_timeout, "ro", stop)
    try:
        lines = [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]
        if lines != ["ok"]:
            quoted = "; ".join(line[:120] for line in lines[:_PROBLEM_LINES])
            raise BackupError(f"{_UNUSABLE}: integrity_check found {quoted}")
        return _stats(conn)
    finally:
        conn.close()


def _restore_into(copy: Path, target_path: Path, busy_timeout: float, stop: threading.Event) -> None:
    """Runs in a worker thread: the copy's pages into the target in one step, i.e. one write
    transaction; the app's open connections see the new content at their next read."""
    source = _connect(copy, busy_timeout, "ro", stop)
    try:
        target = sqlite3.connect(target_path, timeout=busy_timeout)
        try:
            _copy(source, target, stop, stepwise=False)
        finally:
            target.close()
    finally:
        source.close()


def _problem(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "interrupted" in text:
        return "it was stopped"
    if "not a database" in text:
        return "the file is not an SQLite database"
    if "malformed" in text:
        return f"the file is damaged ({text})"
    if "locked" in text or "busy" in text:
        return f"the database stayed locked by another connection ({text})"
    return text


def _total_rows(stats: Mapping[str, Any]) -> int:
    return sum(int(count) for count in dict(stats.get("tables", {})).values())


class SqliteSource:
    """One SQLite database file, copied with the online backup API (safe while the app writes)."""

    kind = "sqlite"
    extension = "sqlite"

    def __init__(self, path: Path, *, timeout: float) -> None:
        self._path = Path(path)
        self._timeout = timeout  # busy timeout: how long to wait for the app's locks
        self._info = DumpInfo()

    def describe(self) -> str:
        return f"SQLite database {self._path}"

    @property
    def info(self) -> DumpInfo:
        return self._info

    async def _in_thread(self, work: Callable[[threading.Event], Any], failed: str) -> Any:
        """``work(stop)`` in a worker thread; sqlite3 errors become "<failed>: <why>"."""
        stop = threading.Event()
        try:
            return await in_thread(lambda: work(stop), stop=stop.set, name="sqlite")
        except sqlite3.Error as exc:
            raise BackupError(f"{failed}: {_problem(exc)}") from None
        except OSError as exc:
            raise BackupError(f"{failed}: {exc.strerror or exc}") from None

    async def dump(self) -> AsyncIterator[bytes]:
        """A consistent copy made in a private temporary directory, streamed, then deleted."""
        if not self._path.is_file():
            what = "is a directory, not a file" if self._path.is_dir() else "does not exist"
            raise BackupError(f"the SQLite database {self._path} {what}")
        async with private_dir() as directory:
            copy = directory / "copy.sqlite"
            stats = await self._in_thread(
                lambda stop: _dump_to(self._path, copy, self._timeout, stop), f"cannot copy {self.describe()}"
            )
            async for chunk in file_chunks(copy):
                yield chunk
        version = sqlite3.sqlite_version
        self._info = DumpInfo(tools={"sqlite": version, "python": sys.version.split()[0]}, stats=stats)

    async def check(self, chunks: AsyncIterator[bytes], stats: Mapping[str, Any]) -> str:
        """integrity_check on a temporary copy; row counts per table must equal the manifest's."""
        async with spooled(chunks, suffix=".sqlite") as copy:
            found = await self._in_thread(lambda stop: _verify(copy, self._timeout, stop), _UNUSABLE)
        expected = stats.get("tables")
        if expected is not None and dict(expected) != found["tables"]:
            differ = sorted(set(expected) ^ set(found["tables"])) or sorted(
                name for name in expected if expected[name] != found["tables"].get(name)
            )
            raise BackupError(f"the SQLite copy's row counts differ from its manifest (table {differ[0]})")
        if "page_count" in stats and stats["page_count"] != found["page_count"]:
            raise BackupError(
                f"the SQLite copy has {found['page_count']} pages, its manifest says {stats['page_count']}"
            )
        return f"integrity_check ok: {len(found['tables'])} tables, {_total_rows(found):,} rows"

    async def restore(self, chunks: AsyncIterator[bytes]) -> str:
        """Check a temporary copy first, then copy it into the database in one write transaction."""
        if not self._path.parent.is_dir():
            closer = getattr(chunks, "aclose", None)
            if closer is not None:
                await closer()
            raise BackupError(f"cannot restore {self._path}: the directory {self._path.parent} does not exist")
        async with spooled(chunks, suffix=".sqlite") as copy:
            found = await self._in_thread(lambda stop: _verify(copy, self._timeout, stop), _UNUSABLE)
            await self._in_thread(
                lambda stop: _restore_into(copy, self._path, self._timeout, stop), f"cannot restore {self._path}"
            )
        tables = len(found["tables"])
        return f"restored {tables} table{'' if tables == 1 else 's'} ({_total_rows(found):,} rows) into {self._path}"
