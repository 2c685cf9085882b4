"""Health of an SQLite file: present, readable, passes quick_check; size and journal mode."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from services.health import ProbeResult, Status
from services.inventory import Component, SqliteComponent
from services.probes._common import human_bytes, since_ms

_PROBLEM_LINES = 3
"""quick_check lines quoted in the detail; the rest are counted."""


# Share of the probe's timeout the check may use, so it ends with its own reason, not a bare timeout.
_CHECK_SHARE = 0.9
# SQLite calls the progress handler every this many virtual-machine steps.
_PROGRESS_STEPS = 10_000


@dataclass(frozen=True)
class _Findings:
    size_bytes: int
    wal_bytes: int
    journal_mode: str
    page_count: int
    problems: list[str]


def _inspect(path: Path, busy_timeout: float) -> _Findings:
    """Runs in a worker thread. Opens read-only, so a missing file is never created.

    A thread cannot be cancelled, so SQLite itself interrupts the check at the deadline: a huge
    database never keeps a worker busy after its probe has been reported."""
    size = path.stat().st_size
    wal = path.with_name(path.name + "-wal")
    wal_size = wal.stat().st_size if wal.exists() else 0
    deadline = time.monotonic() + busy_timeout * _CHECK_SHARE
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=busy_timeout * _CHECK_SHARE)
    conn.set_progress_handler(lambda: time.monotonic() > deadline, _PROGRESS_STEPS)
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
        mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0])
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    finally:
        conn.close()
    problems = [str(row[0]) for row in rows if row and row[0] != "ok"]
    return _Findings(size, wal_size, mode.lower(), pages, problems)


class SqliteProbe:
    """Checks an SQLite database file in a worker thread, read-only."""

    async def probe(self, component: Component) -> ProbeResult:
        """quick_check plus size and journal mode; a file that is missing or corrupt is CRITICAL."""
        if not isinstance(component, SqliteComponent):
            raise TypeError(f"SqliteProbe cannot probe a {component.type} component")
        started = time.perf_counter()
        path = component.path
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "file not found"
            return ProbeResult(Status.CRITICAL, f"{what}: {path}", since_ms(started))
        try:
            found = await asyncio.to_thread(_inspect, path, component.timeout)
        except sqlite3.DatabaseError as exc:
            text = str(exc)
            if "interrupted" in text:
                detail = f"quick_check did not finish within {component.timeout * _CHECK_SHARE:.2g} s"
            elif "not a database" in text:
                detail = f"not a valid SQLite database ({text}): {path}"
            elif "malformed" in text:
                detail = f"database is corrupt ({text})"
            elif "locked" in text or "busy" in text:
                detail = f"database is locked by another process ({text})"
            else:
                detail = f"cannot read the database: {text}"
            return ProbeResult(Status.CRITICAL, detail, since_ms(started))
        except OSError as exc:
            return ProbeResult(Status.CRITICAL, f"cannot read the file: {exc.strerror or exc}", since_ms(started))
        latency = since_ms(started)
        facts: dict[str, str | int | float] = {
            "size_bytes": found.size_bytes,
            "size": human_bytes(found.size_bytes),
            "wal_bytes": found.wal_bytes,
            "journal_mode": found.journal_mode,
            "page_count": found.page_count,
        }
        mode = "WAL" if found.journal_mode == "wal" else f"journal mode {found.journal_mode} (not WAL)"
        if found.problems:
            facts["integrity_problems"] = len(found.problems)
            quoted = "; ".join(line[:120] for line in found.problems[:_PROBLEM_LINES])
            more = len(found.problems) - _PROBLEM_LINES
            if more > 0:
                quoted += f" (+{more} more)"
            return ProbeResult(Status.CRITICAL, f"quick_check failed: {quoted}", latency, facts)
        detail = f"SQLite · {human_bytes(found.size_bytes)} · {mode} · quick_check ok"
        return ProbeResult(Status.HEALTHY, detail, latency, facts)
