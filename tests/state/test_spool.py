"""The audit spool: events of an outage kept on disk, bounded, and appended in order afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.state import AuditRecord
from services.state.spool import AuditSpool


def record(n: int, detail: str = "") -> AuditRecord:
    return AuditRecord(f"r{n}", "U0OPS1", "health", f"health shop {n}", "C0OPS", "ok", 1.0, "shop", detail)


async def test_spooled_events_survive_a_restart_and_drain_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit-spool.jsonl"
    first = AuditSpool(path)
    for n in range(3):
        assert await first.add(record(n, "probe said ok"))
    assert first.pending == 3 and path.read_text().count("\n") == 3

    again = AuditSpool(path)  # a new process: what was fsynced is still there
    assert again.pending == 3
    appended: list[AuditRecord] = []

    async def append(r: AuditRecord) -> None:
        appended.append(r)

    assert await again.drain(append) == 3
    assert [r.request_id for r in appended] == ["r0", "r1", "r2"]
    assert all(r.detail.endswith("probe said ok") and "written late: the state store was down" in r.detail
               for r in appended)  # fmt: skip
    assert again.pending == 0 and not path.exists()
    assert await again.drain(append) == 0


async def test_a_failed_drain_keeps_what_was_not_appended(tmp_path: Path) -> None:
    spool = AuditSpool(tmp_path / "spool.jsonl")
    for n in range(4):
        await spool.add(record(n))
    appended: list[str] = []

    async def flaky(r: AuditRecord) -> None:
        if len(appended) == 2:
            raise ConnectionError("down again")
        appended.append(r.request_id)

    with pytest.raises(ConnectionError):
        await spool.drain(flaky)
    assert appended == ["r0", "r1"] and spool.pending == 2
    rest: list[str] = []

    async def append(r: AuditRecord) -> None:
        rest.append(r.request_id)

    assert await AuditSpool(spool.path).drain(append) == 2
    assert rest == ["r2", "r3"]


async def test_the_spool_is_bounded_and_counts_what_it_dropped(tmp_path: Path) -> None:
    spool = AuditSpool(tmp_path / "spool.jsonl", max_events=2)
    assert [await spool.add(record(n)) for n in range(4)] == [True, True, False, False]
    assert spool.pending == 2 and spool.dropped == 2


async def test_a_line_cut_short_by_a_crash_is_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    spool = AuditSpool(path)
    await spool.add(record(0))
    with path.open("a") as f:
        f.write('{"at": "2026-12-02T03:00:00+00:00", "record": {"request_')
    spool = AuditSpool(path)
    got: list[str] = []

    async def append(r: AuditRecord) -> None:
        got.append(r.request_id)

    assert await spool.drain(append) == 2
    assert got == ["r0"] and spool.dropped == 1 and not path.exists()
