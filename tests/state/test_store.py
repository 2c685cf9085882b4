"""The state store contract, run unchanged on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.state import GENESIS_HASH, AuditEvent, AuditRecord, StateStore, chain_hash
from services.state.base import AUDIT_COLUMNS, audit_row, seal
from services.state.migrations import LATEST_VERSION, MIGRATIONS
from tests.state.conftest import Backend


def record(n: int, *, service: str | None = "shop", actor: str = "U001", **changes: Any) -> AuditRecord:
    base = AuditRecord(
        request_id=f"req-{n}",
        actor=actor,
        command="health",
        args=f"shop --n {n}",
        channel="C0OPS",
        outcome="ok",
        duration_ms=12.5 + n,
        service=service,
    )
    return replace(base, **changes)


async def append_many(store: StateStore, count: int) -> None:
    for n in range(1, count + 1):
        await store.append_audit(record(n))


async def chain(store: StateStore) -> list[tuple[int, str, str]]:
    return [(e.seq, e.prev_hash, e.hash) async for e in store.iter_audit()]


def assert_one_chain(links: list[tuple[int, str, str]], count: int) -> None:
    assert [seq for seq, _, _ in links] == list(range(1, count + 1))
    prevs = [prev for _, prev, _ in links]
    assert len(set(prevs)) == count, "two events share a prev_hash: the chain forked"
    assert prevs == [GENESIS_HASH] + [h for _, _, h in links[:-1]]


async def test_ping(store: StateStore, backend: Backend) -> None:
    assert store.kind == backend.kind
    await store.ping()


async def test_migrations_are_idempotent(store: StateStore, backend: Backend) -> None:
    assert await store.schema_version() == LATEST_VERSION
    await store.append_audit(record(1))
    await store.close()

    again = await backend.open()
    try:
        assert await again.schema_version() == LATEST_VERSION
        assert [e.request_id for e in await again.audit_events()] == ["req-1"]
    finally:
        await again.close()
    rows = await backend.fetch("SELECT version FROM schema_version ORDER BY version")
    assert [row[0] for row in rows] == [m.version for m in MIGRATIONS]


async def test_two_stores_migrating_a_fresh_database_at_once(backend: Backend) -> None:
    opened = await asyncio.gather(*(backend.open() for _ in range(4)), return_exceptions=True)
    stores = [s for s in opened if not isinstance(s, BaseException)]
    try:
        # Every open must succeed; the ones that did are closed whatever happens.
        assert len(stores) == len(opened), [s for s in opened if isinstance(s, BaseException)]
        for store in stores:
            assert await store.schema_version() == LATEST_VERSION
        for n, store in enumerate(stores, 1):
            await store.append_audit(record(n))
        assert await stores[0].verify_audit() is None
        assert_one_chain(await chain(stores[-1]), len(stores))
    finally:
        for store in stores:
            await store.close()
    rows = await backend.fetch("SELECT version FROM schema_version ORDER BY version")
    assert [row[0] for row in rows] == [m.version for m in MIGRATIONS]


async def test_empty_store(store: StateStore) -> None:
    assert await store.audit_events() == []
    assert [e async for e in store.iter_audit()] == []
    assert await store.verify_audit() is None


async def test_append_returns_the_stored_chained_event(store: StateStore) -> None:
    first = await store.append_audit(record(1, service=None, detail="백업 완료 ✓"))
    second = await store.append_audit(record(2))

    assert (first.seq, second.seq) == (1, 2)
    assert first.prev_hash == GENESIS_HASH
    assert second.prev_hash == first.hash
    assert first.ts is not None and second.ts is not None
    assert first.ts.utcoffset() == timedelta(0) and first.ts.tzinfo is UTC
    assert first.ts <= second.ts
    assert first.hash == chain_hash(GENESIS_HASH, record(1, service=None, detail="백업 완료 ✓"), first.ts)
    assert await store.audit_events() == [second, first]


async def test_list_is_newest_first_filtered_and_limited(store: StateStore) -> None:
    await store.append_audit(record(1, service="shop", actor="U001"))
    await store.append_audit(record(2, service="vcbl", actor="U002"))
    await store.append_audit(record(3, service="shop", actor="U002"))
    await store.append_audit(record(4, service=None, actor="U001"))
    await store.append_audit(record(5, service="shop", actor="U001"))

    def ids(events: list[AuditEvent]) -> list[str]:
        return [e.request_id for e in events]

    assert ids(await store.audit_events()) == ["req-5", "req-4", "req-3", "req-2", "req-1"]
    assert ids(await store.audit_events(limit=2)) == ["req-5", "req-4"]
    assert ids(await store.audit_events(service="shop")) == ["req-5", "req-3", "req-1"]
    assert ids(await store.audit_events(actor="U002")) == ["req-3", "req-2"]
    assert ids(await store.audit_events(service="shop", actor="U001")) == ["req-5", "req-1"]
    assert ids(await store.audit_events(service="shop", actor="U001", limit=1)) == ["req-5"]
    assert await store.audit_events(service="nope") == []


@pytest.mark.parametrize("limit", [0, -1])
async def test_limit_must_be_positive(store: StateStore, limit: int) -> None:
    with pytest.raises(ValueError, match="limit must be at least 1"):
        await store.audit_events(limit=limit)


async def test_iter_audit_is_oldest_first_in_batches(store: StateStore) -> None:
    await append_many(store, 10)
    assert [e.seq async for e in store.iter_audit(batch_size=3)] == list(range(1, 11))
    assert [e async for e in store.iter_audit(batch_size=4)] == list(reversed(await store.audit_events(limit=100)))


async def test_iter_audit_stops_at_the_head_it_started_from(store: StateStore) -> None:
    await append_many(store, 4)
    seen = []
    async for event in store.iter_audit(batch_size=2):
        seen.append(event.seq)
        await store.append_audit(record(100 + event.seq))
    assert seen == [1, 2, 3, 4]
    assert await store.verify_audit() is None


async def test_intact_chain_verifies(store: StateStore) -> None:
    await append_many(store, 7)
    assert await store.verify_audit() is None


async def test_audit_table_refuses_update_and_delete(store: StateStore, backend: Backend) -> None:
    await append_many(store, 2)
    with pytest.raises(Exception, match="append-only"):
        await backend.execute("UPDATE audit_events SET args = 'x' WHERE seq = 1")
    with pytest.raises(Exception, match="append-only"):
        await backend.execute("DELETE FROM audit_events WHERE seq = 2")
    assert await store.verify_audit() is None


async def test_tampered_args_are_detected_at_their_seq(store: StateStore, backend: Backend) -> None:
    await append_many(store, 5)
    await backend.allow_tampering()
    await backend.execute("UPDATE audit_events SET args = 'shop --all' WHERE seq = 3")
    assert await store.verify_audit() == 3


async def test_rehashed_tampering_breaks_the_next_link(store: StateStore, backend: Backend) -> None:
    await append_many(store, 5)
    third = (await store.audit_events(limit=3))[-1]
    assert third.seq == 3 and third.ts is not None
    forged = chain_hash(third.prev_hash, record(3, args="forged"), third.ts)
    await backend.allow_tampering()
    await backend.execute(f"UPDATE audit_events SET args = 'forged', hash = '{forged}' WHERE seq = 3")
    assert await store.verify_audit() == 4


@pytest.mark.parametrize(("deleted", "broken"), [(1, 1), (3, 3), (5, 5)])
async def test_deleted_events_are_detected(store: StateStore, backend: Backend, deleted: int, broken: int) -> None:
    await append_many(store, 5)
    await backend.allow_tampering()
    await backend.execute(f"DELETE FROM audit_events WHERE seq = {deleted}")
    assert await store.verify_audit() == broken


async def test_concurrent_appends_form_one_chain(store: StateStore) -> None:
    events = await asyncio.gather(*(store.append_audit(record(n)) for n in range(100)))
    assert sorted(e.seq for e in events) == list(range(1, 101))
    assert_one_chain(await chain(store), 100)
    assert await store.verify_audit() is None


async def test_two_stores_appending_concurrently_form_one_chain(store: StateStore, backend: Backend) -> None:
    other = await backend.open()
    try:
        await asyncio.gather(
            *(store.append_audit(record(n, actor="U001")) for n in range(50)),
            *(other.append_audit(record(n, actor="U002")) for n in range(50)),
        )
        assert_one_chain(await chain(store), 100)
        assert await other.verify_audit() is None
        assert len(await store.audit_events(actor="U002", limit=100)) == 50
    finally:
        await other.close()


def sql_literal(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, datetime):
        value = value.isoformat()
    return "'" + str(value).replace("'", "''") + "'"


async def insert_row(backend: Backend, event: AuditEvent) -> None:
    """INSERT ``event`` behind the store's back: the append-only triggers do not stop inserts."""
    values = ", ".join(sql_literal(v) for v in audit_row(event, event.ts))
    await backend.execute(f"INSERT INTO audit_events ({AUDIT_COLUMNS}) VALUES ({values})")


def forged_event(seq: int, prev_hash: str) -> AuditEvent:
    """What someone who knows the hashing scheme would write: a well-formed link after ``prev_hash``."""
    forged = record(666, actor="U0MALLORY", args="shop --drop-all")
    return seal(forged, seq=seq, ts=datetime.now(UTC), prev_hash=prev_hash)


async def forge_past_head(backend: Backend, events: list[AuditEvent], *, chained: bool) -> None:
    """Append a forged row after the last event without advancing ``audit_head``."""
    prev = events[-1].hash if chained else "f" * 64
    await insert_row(backend, forged_event(len(events) + 1, prev))


async def forge_in_middle(backend: Backend, events: list[AuditEvent], at: int) -> None:
    """Forge an event at seq ``at``: later events move up one, the one after it is relinked to it, the head follows."""
    fake = forged_event(at, events[at - 2].hash if at > 1 else GENESIS_HASH)
    await backend.allow_tampering()
    # Two steps: a single ``seq = seq + 1`` would collide with the next row's primary key on the way.
    await backend.execute(
        f"UPDATE audit_events SET seq = seq + 1000000 WHERE seq >= {at}",
        "UPDATE audit_events SET seq = seq - 999999 WHERE seq >= 1000000",
        f"UPDATE audit_events SET prev_hash = '{fake.hash}' WHERE seq = {at + 1}",
        "UPDATE audit_head SET seq = seq + 1 WHERE id = 1",
    )
    await insert_row(backend, fake)


async def test_a_forged_row_is_a_well_formed_link(store: StateStore, backend: Backend) -> None:
    # The forgeries below mean something only if the forged row is itself a valid link. (With the head
    # advanced as well, as here, only a head hash kept outside the database would give it away.)
    events = [await store.append_audit(record(n)) for n in range(1, 4)]
    await forge_past_head(backend, events, chained=True)
    await backend.execute("UPDATE audit_head SET seq = 4, hash = (SELECT hash FROM audit_events WHERE seq = 4)")
    assert await store.verify_audit() is None


@pytest.mark.parametrize(("at", "broken"), [(1, 2), (3, 4), (5, 6)])
async def test_an_event_forged_into_the_chain_is_detected(
    store: StateStore, backend: Backend, at: int, broken: int
) -> None:
    events = [await store.append_audit(record(n)) for n in range(1, 6)]
    await forge_in_middle(backend, events, at)
    rows = await backend.fetch("SELECT seq, actor FROM audit_events ORDER BY seq")
    assert [seq for seq, _ in rows] == list(range(1, 7)) and rows[at - 1][1] == "U0MALLORY"
    # The forged link itself holds; the event after it no longer hashes to what it stores.
    assert await store.verify_audit() == broken


@pytest.mark.parametrize("chained", [True, False], ids=["chained", "unchained"])
async def test_an_event_forged_past_the_head_is_detected(store: StateStore, backend: Backend, chained: bool) -> None:
    events = [await store.append_audit(record(n)) for n in range(1, 6)]
    await forge_past_head(backend, events, chained=chained)  # no tampering needed: inserts are allowed
    assert await store.verify_audit() == 6
