"""Audit events kept on local disk while the state store is down, and appended once it answers.

Every command is audited, including those of an outage. When the store cannot take an event, it is
written here as one JSON line and fsynced before the command's answer goes out, so a crash loses
nothing. The next append that reaches the store first appends what was spooled, oldest first, so
the store chains them in order (the store stamps them when they arrive; each keeps the moment it
happened in its detail). The spool is bounded: past ``max_events`` a new event is dropped, counted
and logged, rather than filling the disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import structlog

from services.state.base import AuditRecord

log = structlog.get_logger(__name__)

MAX_EVENTS = 10_000
DETAIL_LIMIT = 500


class AuditSpool:
    """An append-only JSON-lines file of audit records waiting for the store."""

    def __init__(self, path: Path, *, max_events: int = MAX_EVENTS) -> None:
        self.path = path
        self.max_events = max_events
        self.dropped = 0
        self._file_lock = threading.Lock()
        self._lock = asyncio.Lock()
        self._pending = self._count()

    @property
    def pending(self) -> int:
        """Events waiting in the spool."""
        return self._pending

    def _count(self) -> int:
        try:
            with self.path.open("rb") as f:
                return sum(1 for line in f if line.strip())
        except FileNotFoundError:
            return 0

    async def add(self, record: AuditRecord, *, at: datetime | None = None) -> bool:
        """Spool ``record`` (fsynced); False if the spool is full and it was dropped."""
        async with self._lock:
            if self._pending >= self.max_events:
                self.dropped += 1
                log.error("audit_spool_full", dropped=self.dropped, pending=self._pending, command=record.command)
                return False
            moment = (at or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
            line = json.dumps({"at": moment, "record": dataclasses.asdict(record)}, ensure_ascii=False) + "\n"
            await asyncio.to_thread(self._write, line)
            self._pending += 1
            return True

    def _write(self, line: str) -> None:
        with self._file_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    async def drain(self, append: Callable[[AuditRecord], Awaitable[object]]) -> int:
        """Append every spooled record with ``append``, oldest first; how many went. If ``append``
        fails, what was not appended stays spooled and the error propagates."""
        if not self._pending:
            return 0
        async with self._lock:
            lines = await asyncio.to_thread(self._read)
            done = 0
            try:
                for line in lines:
                    try:
                        record = _record(line)
                    except (ValueError, KeyError, TypeError):  # a line cut short by a crash mid-write
                        self.dropped += 1
                        log.error("audit_spool_line_unreadable", line=line[:200])
                    else:
                        await append(record)
                    done += 1
            finally:
                await asyncio.to_thread(self._keep, lines[done:])
                self._pending = len(lines) - done
            if done:
                log.info("audit_spool_drained", appended=done)
            return done

    def _read(self) -> list[str]:
        with self._file_lock:
            try:
                return [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
            except FileNotFoundError:
                return []

    def _keep(self, lines: list[str]) -> None:
        """Replace the spool with ``lines`` (atomically: a crash leaves the old or the new file)."""
        with self._file_lock:
            if not lines:
                self.path.unlink(missing_ok=True)
                return
            tmp = self.path.with_suffix(".tmp")
            with tmp.open("w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)


def _record(line: str) -> AuditRecord:
    """A spooled line back to its record, the moment it happened kept in the detail."""
    entry = json.loads(line)
    fields = dict(entry["record"])
    note = f"[{entry['at']}, written late: the state store was down] "
    fields["detail"] = (note + str(fields.get("detail", "")))[:DETAIL_LIMIT]
    return AuditRecord(**fields)
