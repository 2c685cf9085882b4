"""Scheduler: local fire times in a DST-free and a DST zone, missed runs once, one run per fire time across
replicas (through the state store's claims, on real SQLite and PostgreSQL), failures recorded, every-N-minutes,
and clear validation errors.

Time is a mutable clock the tests move; nothing waits for real time to pass. Replicas racing as real processes:
tests/scenario/test_replicas.py.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from pydantic import ValidationError

from bot.scheduler import (
    FAILED_PREFIX,
    OK,
    RAN_ELSEWHERE,
    Fired,
    Lease,
    RunSchedule,
    Scheduler,
    StoreLease,
)
from services.schedules import ScheduleSpec, due, latest_fire, lease_key, next_fire
from services.state import StateStore, open_state_store
from tests.fixtures.servers import PostgresServer

SEOUL = ZoneInfo("Asia/Seoul")
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class ClaimLease:
    """StoreLease's rule (the first claim of a key wins it for good) in a dict, for tests that need no store."""

    def __init__(self) -> None:
        self.holders: dict[str, str] = {}

    async def acquire(self, key: str, holder: str) -> bool:
        if key in self.holders:
            return False
        self.holders[key] = holder
        return True


class Runs:
    """Records every run, as the command dispatcher the lead wires in later would perform it."""

    def __init__(self, fail: Callable[[ScheduleSpec, datetime], bool] = lambda spec, fire: False) -> None:
        self.calls: list[tuple[str, datetime, str]] = []
        self.fail = fail

    def runner(self, replica: str) -> RunSchedule:
        async def run(spec: ScheduleSpec, fire_time: datetime) -> str:
            self.calls.append((spec.name, fire_time, replica))
            if self.fail(spec, fire_time):
                raise RuntimeError(f"{spec.command} broke")
            return f"ran {spec.command}"

        return run


def spec(name: str = "digest", **fields: object) -> ScheduleSpec:
    fields.setdefault("command", "digest daily --post")
    if "every_minutes" not in fields:
        fields.setdefault("cron", "0 2 * * *")
    return ScheduleSpec.model_validate({"name": name, **fields})


def fires(one: ScheduleSpec, start: datetime, end: datetime, default_tz: str = "Asia/Seoul") -> list[datetime]:
    """Every fire time in (start, end], stepped with next_fire."""
    found: list[datetime] = []
    moment = start
    while (moment := next_fire(one, moment, default_tz)) <= end:
        found.append(moment)
    return found


def local(moments: list[datetime], zone: ZoneInfo) -> list[str]:
    return [m.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z") for m in moments]


# ---------------------------------------------------------------------------------------------- fire times


def test_daily_two_am_in_seoul_fires_at_five_pm_utc_the_day_before() -> None:
    daily = spec(cron="0 2 * * *")  # no zone of its own: the inventory's default
    found = fires(daily, datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 3, 5, tzinfo=UTC))
    assert found == [datetime(2025, 3, day, 17, 0, tzinfo=UTC) for day in (1, 2, 3, 4)]
    assert local(found, SEOUL)[0] == "2025-03-02 02:00 KST"
    # The schedule's own zone wins over the default.
    assert next_fire(daily, datetime(2025, 3, 1, tzinfo=UTC), "UTC") == datetime(2025, 3, 1, 2, 0, tzinfo=UTC)
    tokyo = spec(cron="0 2 * * *", timezone="Asia/Tokyo")
    assert next_fire(tokyo, datetime(2025, 3, 1, tzinfo=UTC), "UTC") == datetime(2025, 3, 1, 17, 0, tzinfo=UTC)
    # Strictly after: a fire time is not its own next one; and results are UTC whatever zone `after` is in.
    first = next_fire(daily, datetime(2025, 3, 2, 2, 0, tzinfo=SEOUL), "Asia/Seoul")
    assert first == datetime(2025, 3, 2, 17, 0, tzinfo=UTC)
    assert first.tzinfo is UTC


def test_weekly_and_monthly_expressions_in_local_time() -> None:
    weekly = spec(cron="0 9 * * mon")
    found = fires(weekly, datetime(2025, 6, 1, tzinfo=UTC), datetime(2025, 6, 30, tzinfo=UTC))
    assert local(found, SEOUL) == [f"2025-06-{day:02} 09:00 KST" for day in (2, 9, 16, 23, 30)]
    assert all(m.astimezone(SEOUL).weekday() == 0 for m in found)

    monthly = spec(cron="30 3 1 * *")
    found = fires(monthly, datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 12, 31, tzinfo=UTC))
    # 1 January 03:30 KST is 31 December UTC, before the window: the other eleven months fire.
    assert local(found, SEOUL) == [f"2025-{month:02}-01 03:30 KST" for month in range(2, 13)]
    assert found[0] == datetime(2025, 1, 31, 18, 30, tzinfo=UTC)

    last_day = spec(cron="0 23 L * *", timezone="UTC")
    found = fires(last_day, datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 4, 1, tzinfo=UTC))
    assert [m.day for m in found] == [31, 29, 31]  # 2024 is a leap year

    at_midnight = spec(cron="@weekly", timezone="Europe/Berlin")
    found = fires(at_midnight, datetime(2025, 6, 1, tzinfo=UTC), datetime(2025, 6, 16, tzinfo=UTC))
    assert local(found, BERLIN) == ["2025-06-08 00:00 CEST", "2025-06-15 00:00 CEST"]


def test_berlin_spring_forward_runs_the_skipped_time_once_an_hour_later() -> None:
    nightly = spec(cron="30 2 * * *", timezone="Europe/Berlin")
    found = fires(nightly, datetime(2025, 3, 28, tzinfo=UTC), datetime(2025, 4, 1, 12, tzinfo=UTC))
    # 30 March: clocks jump 02:00 → 03:00, so 02:30 does not exist; it runs at 03:30 CEST, once.
    assert local(found, BERLIN) == [
        "2025-03-28 02:30 CET",
        "2025-03-29 02:30 CET",
        "2025-03-30 03:30 CEST",
        "2025-03-31 02:30 CEST",
        "2025-04-01 02:30 CEST",
    ]
    assert found[2] == datetime(2025, 3, 30, 1, 30, tzinfo=UTC)


def test_berlin_fall_back_runs_the_repeated_time_once_at_its_first_occurrence() -> None:
    nightly = spec(cron="30 2 * * *", timezone="Europe/Berlin")
    found = fires(nightly, datetime(2025, 10, 24, tzinfo=UTC), datetime(2025, 10, 28, 12, tzinfo=UTC))
    # 26 October: 02:00-03:00 happens twice (CEST, then CET); 02:30 runs in the first, not again.
    assert local(found, BERLIN) == [
        "2025-10-24 02:30 CEST",
        "2025-10-25 02:30 CEST",
        "2025-10-26 02:30 CEST",
        "2025-10-27 02:30 CET",
        "2025-10-28 02:30 CET",
    ]
    # Once a day, whatever moment next_fire and latest_fire are asked from inside the repeated hour.
    inside_second_pass = datetime(2025, 10, 26, 1, 15, tzinfo=UTC)  # 02:15 CET
    assert next_fire(nightly, inside_second_pass, "UTC") == datetime(2025, 10, 27, 1, 30, tzinfo=UTC)
    assert latest_fire(nightly, inside_second_pass, "UTC") == datetime(2025, 10, 26, 0, 30, tzinfo=UTC)


def test_new_york_both_transitions_fire_once_a_day() -> None:
    spring = spec(cron="30 2 * * *", timezone="America/New_York")
    found = fires(spring, datetime(2025, 3, 8, 12, tzinfo=UTC), datetime(2025, 3, 10, 12, tzinfo=UTC))
    assert local(found, NEW_YORK) == ["2025-03-09 03:30 EDT", "2025-03-10 02:30 EDT"]

    fall = spec(cron="30 1 * * *", timezone="America/New_York")
    found = fires(fall, datetime(2025, 11, 1, 12, tzinfo=UTC), datetime(2025, 11, 3, 12, tzinfo=UTC))
    assert local(found, NEW_YORK) == ["2025-11-02 01:30 EDT", "2025-11-03 01:30 EST"]


def test_wildcard_hour_or_minute_keeps_real_time_rhythm_through_both_transitions() -> None:
    half_hourly = spec(cron="*/30 * * * *", timezone="Europe/Berlin")
    for start in (datetime(2025, 3, 29, 22, tzinfo=UTC), datetime(2025, 10, 25, 22, tzinfo=UTC)):
        found = fires(half_hourly, start, start + timedelta(hours=6))
        assert len(found) == 12
        assert {b - a for a, b in itertools.pairwise(found)} == {timedelta(minutes=30)}
    hourly = spec(cron="15 * * * *", timezone="Europe/Berlin")
    found = fires(hourly, datetime(2025, 10, 25, 22, tzinfo=UTC), datetime(2025, 10, 26, 4, tzinfo=UTC))
    assert local(found, BERLIN)[2:5] == ["2025-10-26 02:15 CEST", "2025-10-26 02:15 CET", "2025-10-26 03:15 CET"]
    assert {b - a for a, b in itertools.pairwise(found)} == {timedelta(hours=1)}


def test_every_fourteen_minutes_is_zone_free_and_the_same_on_every_replica() -> None:
    ping = spec("keepalive", every_minutes=14, command="health work-logging")
    start = datetime(2025, 3, 30, 0, 3, tzinfo=UTC)
    found = fires(ping, start, start + timedelta(hours=3), default_tz="Europe/Berlin")
    assert {b - a for a, b in itertools.pairwise(found)} == {timedelta(minutes=14)}
    assert len(found) in (12, 13)
    # Whole multiples of 14 minutes since 1970: any replica, any zone, gets the same instants.
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert all((m - epoch) % timedelta(minutes=14) == timedelta(0) for m in found)
    assert fires(ping, start, start + timedelta(hours=3), default_tz="Asia/Seoul") == found
    assert latest_fire(ping, found[3], "UTC") == found[3]
    assert latest_fire(ping, found[3] - timedelta(seconds=1), "UTC") == found[2]


# ------------------------------------------------------------------------------------------------- due()


def test_due_collapses_three_days_of_missed_runs_into_one_within_grace() -> None:
    daily = spec(cron="0 2 * * *", grace_minutes=60)
    last = datetime(2025, 3, 1, 17, 0, tzinfo=UTC)  # 02:00 KST on 2 March, the last run before going down
    back_up = datetime(2025, 3, 4, 17, 40, tzinfo=UTC)  # 3 days later, 40 min after the 5 March fire time
    assert due(daily, last, back_up, "Asia/Seoul") == datetime(2025, 3, 4, 17, 0, tzinfo=UTC)
    # Once it has run, nothing else is due until the next fire time.
    assert due(daily, datetime(2025, 3, 4, 17, 0, tzinfo=UTC), back_up, "Asia/Seoul") is None
    # Back 2 hours after the fire time: beyond the grace window, so not at all (the next one runs as usual).
    assert due(daily, last, back_up + timedelta(minutes=81), "Asia/Seoul") is None
    # Exactly at the edge of the window it still runs.
    assert due(daily, last, back_up + timedelta(minutes=20), "Asia/Seoul") == datetime(2025, 3, 4, 17, tzinfo=UTC)
    # First start ever (no last fire): within grace runs, older does not.
    assert due(daily, None, back_up, "Asia/Seoul") == datetime(2025, 3, 4, 17, 0, tzinfo=UTC)
    assert due(daily, None, back_up + timedelta(hours=3), "Asia/Seoul") is None
    # Disabled schedules are never due.
    assert due(spec(cron="0 2 * * *", enabled=False), last, back_up, "Asia/Seoul") is None


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="time-zone-aware"):
        next_fire(spec(), datetime(2025, 3, 1), "UTC")  # naive: the point of the test
    with pytest.raises(ValueError, match="time-zone-aware"):
        due(spec(), datetime(2025, 3, 1), datetime(2025, 3, 2, tzinfo=UTC), "UTC")


# ------------------------------------------------------------------------------------------------ Scheduler


def make(
    specs: list[ScheduleSpec],
    runs: Runs,
    clock: Clock,
    lease: Lease | None = None,
    *,
    holder: str = "replica-a",
    store: dict[str, tuple[datetime, str]] | None = None,
) -> Scheduler:
    """A scheduler whose state store, when given, is a dict of name → (last fire time, outcome)."""

    async def last_runs(name: str) -> datetime | None:
        assert store is not None
        return store[name][0] if name in store else None

    async def record(name: str, fire_time: datetime, outcome: str) -> None:
        assert store is not None
        store[name] = (fire_time, outcome)

    return Scheduler(
        specs,
        runs.runner(holder),
        lease if lease is not None else ClaimLease(),
        holder=holder,
        default_tz="Asia/Seoul",
        clock=clock,
        last_runs=last_runs if store is not None else None,
        record=record if store is not None else None,
    )


async def test_ticks_over_a_berlin_dst_weekend_run_at_the_documented_local_times() -> None:
    clock = Clock(datetime(2025, 10, 24, 12, tzinfo=UTC))
    runs = Runs()
    nightly = spec("integrity", cron="30 2 * * *", timezone="Europe/Berlin", command="integrity youtube")
    scheduler = make([nightly], runs, clock)
    while clock.now < datetime(2025, 10, 28, 12, tzinfo=UTC):
        await scheduler.tick()
        clock.advance(minutes=5)
    ran = [fire for _, fire, _ in runs.calls]
    assert local(ran, BERLIN) == [
        "2025-10-25 02:30 CEST",
        "2025-10-26 02:30 CEST",
        "2025-10-27 02:30 CET",
        "2025-10-28 02:30 CET",
    ]
    [line] = scheduler.status()
    assert line.last_fire == ran[-1] and line.last_outcome == "ran integrity youtube"
    assert line.next_fire == datetime(2025, 10, 29, 1, 30, tzinfo=UTC)
    assert line.next_fire_local is not None and line.next_fire_local.strftime("%H:%M %Z") == "02:30 CET"
    assert (line.when, line.zone, line.running) == ("30 2 * * *", "Europe/Berlin", False)


async def test_restart_after_three_days_down_runs_the_missed_schedule_once() -> None:
    store: dict[str, tuple[datetime, str]] = {"digest": (datetime(2025, 3, 1, 17, tzinfo=UTC), OK)}
    clock = Clock(datetime(2025, 3, 4, 17, 25, tzinfo=UTC))  # 25 min after the 4th missed fire time
    runs = Runs()
    scheduler = make([spec(grace_minutes=60)], runs, clock, store=store)
    assert await scheduler.tick() == [Fired("digest", datetime(2025, 3, 4, 17, tzinfo=UTC), "ran digest daily --post")]
    for _ in range(10):  # later passes before the next fire time find nothing due
        clock.advance(minutes=1)
        assert await scheduler.tick() == []
    assert len(runs.calls) == 1
    assert store["digest"] == (datetime(2025, 3, 4, 17, tzinfo=UTC), "ran digest daily --post")

    # A second restart (fresh process, fresh in-memory lease) reads the store and does not repeat it.
    again = make([spec(grace_minutes=60)], runs, clock, store=store)
    assert await again.tick() == []
    assert len(runs.calls) == 1


async def test_restart_beyond_the_grace_window_runs_nothing_until_the_next_fire_time() -> None:
    store: dict[str, tuple[datetime, str]] = {"digest": (datetime(2025, 3, 1, 17, tzinfo=UTC), OK)}
    clock = Clock(datetime(2025, 3, 4, 18, 30, tzinfo=UTC))  # 90 min after the last missed fire time
    runs = Runs()
    scheduler = make([spec(grace_minutes=60)], runs, clock, store=store)
    assert await scheduler.tick() == []
    clock.now = datetime(2025, 3, 5, 17, 0, 30, tzinfo=UTC)
    assert [fire for _, fire, _ in await scheduler.tick()] == [datetime(2025, 3, 5, 17, tzinfo=UTC)]
    assert [fire for _, fire, _ in runs.calls] == [datetime(2025, 3, 5, 17, tzinfo=UTC)]


async def test_keepalive_every_fourteen_minutes_down_for_hours_pings_once_then_every_fourteen() -> None:
    clock = Clock(datetime(2025, 3, 4, 9, 0, tzinfo=UTC))
    runs = Runs()
    ping = spec("keepalive", every_minutes=14, command="health work-logging")
    store = {"keepalive": (clock.now - timedelta(hours=5), OK)}
    scheduler = make([ping], runs, clock, store=store)
    for _ in range(60):  # an hour, a pass a minute
        await scheduler.tick()
        clock.advance(minutes=1)
    ran = [fire for _, fire, _ in runs.calls]
    # Five hours of missed pings collapse into the latest (08:48, 12 min before start), then one every 14 min.
    assert [m.strftime("%H:%M") for m in ran] == ["08:48", "09:02", "09:16", "09:30", "09:44", "09:58"]


@pytest.fixture(params=["sqlite", "postgres"])
async def two_stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[StateStore]]:
    """Two state stores on one database, as two bot processes would each open it."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.sqlite3'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.dsn(await server.create_database())
    stores = [await open_state_store(url, default_path=tmp_path / "unused.sqlite3") for _ in range(2)]
    yield stores
    for store in stores:
        await store.close()


async def test_two_replicas_sharing_one_state_store_run_each_fire_time_once(two_stores: list[StateStore]) -> None:
    clock = Clock(datetime(2025, 3, 1, 12, tzinfo=UTC))
    runs = Runs()
    specs = [spec(), spec("keepalive", every_minutes=14, command="health work-logging")]
    a, b = (
        make(specs, runs, clock, StoreLease(store, clock), holder=holder)
        for store, holder in zip(two_stores, ("replica-a", "replica-b"), strict=True)
    )
    outcomes: list[Fired] = []
    for _ in range(3 * 24 * 12):  # three days, both replicas passing at the same moment every 5 min
        for result in await asyncio.gather(a.tick(), b.tick()):
            outcomes.extend(result)
        clock.advance(minutes=5)
    digests = [(fire, who) for name, fire, who in runs.calls if name == "digest"]
    assert [fire for fire, _ in digests] == [datetime(2025, 3, day, 17, tzinfo=UTC) for day in (1, 2, 3)]
    pings = [fire for name, fire, _ in runs.calls if name == "keepalive"]
    assert len(pings) == len(set(pings)) > 300
    # Every fire time was offered to both replicas: one ran it, the other was told it ran elsewhere.
    by_fire: dict[tuple[str, datetime], list[str]] = {}
    for name, fire, outcome in outcomes:
        by_fire.setdefault((name, fire), []).append(outcome)
    assert len(by_fire) == len(runs.calls)
    assert all(len(o) == 2 and o.count(RAN_ELSEWHERE) == 1 for o in by_fire.values())
    # The claim is a row in the shared store naming the replica that ran it.
    last = (await two_stores[1].last_schedule_runs())["digest"]
    assert last.fire_at == datetime(2025, 3, 3, 17, tzinfo=UTC)
    assert last.holder == next(who for fire, who in digests if fire == last.fire_at)
    assert all(s.last_fire == last.fire_at for r in (a, b) for s in r.status() if s.name == "digest")


async def test_store_lease_gives_a_fire_time_to_one_claim_for_good(two_stores: list[StateStore]) -> None:
    clock = Clock(datetime(2025, 3, 1, 17, tzinfo=UTC))
    one, other = (StoreLease(store, clock) for store in two_stores)
    key = lease_key("digest", datetime(2025, 3, 1, 17, tzinfo=UTC))
    results = await asyncio.gather(*(lease.acquire(key, f"h{i}") for i in range(10) for lease in (one, other)))
    assert sorted(results) == [False] * 19 + [True]
    winner = f"h{results.index(True) // 2}"
    [run] = (await two_stores[0].last_schedule_runs()).values()
    assert (run.name, run.fire_at, run.holder, run.started_at) == ("digest", clock.now, winner, clock.now)
    # No lapse and no re-entry: days later, the winner itself cannot take that fire time again.
    clock.advance(days=30)
    assert await one.acquire(key, winner) is False and await other.acquire(key, winner) is False
    assert await one.acquire(lease_key("digest", datetime(2025, 3, 2, 17, tzinfo=UTC)), "h1") is True
    with pytest.raises(ValueError, match="not a schedule lease key"):
        await one.acquire("backup:digest:2025-03-01T17:00:00+00:00", "h1")


async def test_a_failing_run_is_recorded_and_the_next_fire_time_still_runs() -> None:
    store: dict[str, tuple[datetime, str]] = {}
    clock = Clock(datetime(2025, 3, 1, 17, 0, 10, tzinfo=UTC))
    runs = Runs(fail=lambda one, fire: one.name == "digest" and fire.day == 1)
    other = spec("ping", every_minutes=14, command="health all")
    scheduler = make([spec(), other], runs, clock, store=store)
    results = {name: outcome for name, _, outcome in await scheduler.tick()}
    assert results["digest"] == FAILED_PREFIX + "RuntimeError: digest daily --post broke"
    assert results["ping"] == "ran health all"  # the failure touched nothing else
    assert store["digest"] == (datetime(2025, 3, 1, 17, tzinfo=UTC), results["digest"])
    assert next(s for s in scheduler.status() if s.name == "digest").last_outcome == results["digest"]
    assert await scheduler.tick() == []  # a failed fire time is not retried pass after pass
    clock.now = datetime(2025, 3, 2, 17, 0, 10, tzinfo=UTC)
    results = {name: outcome for name, _, outcome in await scheduler.tick()}
    assert results["digest"] == "ran digest daily --post"
    assert store["digest"] == (datetime(2025, 3, 2, 17, tzinfo=UTC), "ran digest daily --post")


class FlakyLease:
    """A ClaimLease whose backing service is down for the first ``down`` calls."""

    def __init__(self, down: int) -> None:
        self.inner = ClaimLease()
        self.down = down

    async def acquire(self, key: str, holder: str) -> bool:
        if self.down > 0:
            self.down -= 1
            raise ConnectionRefusedError("Connect call failed ('127.0.0.1', 1)")
        return await self.inner.acquire(key, holder)


async def test_lease_or_state_store_down_starts_nothing_and_retries_next_pass() -> None:
    clock = Clock(datetime(2025, 3, 1, 17, 1, tzinfo=UTC))
    runs = Runs()
    scheduler = make([spec()], runs, clock, FlakyLease(down=1))
    [(_, _, outcome)] = await scheduler.tick()
    assert outcome.startswith("not started: lease unavailable") and "refused" in outcome
    assert runs.calls == []
    clock.advance(seconds=30)
    assert [outcome for _, _, outcome in await scheduler.tick()] == ["ran digest daily --post"]

    # The state store cannot say when it last ran: run nothing rather than risk repeating it.
    broken = {"calls": 0}

    async def last_runs(name: str) -> datetime | None:
        broken["calls"] += 1
        if broken["calls"] == 1:
            raise OSError("state store down")
        return None

    runs = Runs()
    careful = Scheduler(
        [spec()], runs.runner("a"), ClaimLease(), holder="a", default_tz="Asia/Seoul", clock=clock, last_runs=last_runs
    )
    assert await careful.tick() == []
    assert await careful.tick() != [] and len(runs.calls) == 1


async def test_a_state_database_that_is_gone_fails_closed(postgres_server: PostgresServer, tmp_path: Path) -> None:
    database = await postgres_server.create_database()
    store = await open_state_store(postgres_server.dsn(database), default_path=tmp_path / "unused.sqlite3")
    try:
        # Dropped under the open pool: its connections are cut and new ones are refused.
        admin = await asyncpg.connect(postgres_server.dsn(), timeout=10)
        try:
            await admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
        finally:
            await admin.close()
        clock = Clock(datetime(2025, 3, 1, 17, 1, tzinfo=UTC))
        runs = Runs()
        scheduler = make([spec()], runs, clock, StoreLease(store, clock))
        [(_, _, outcome)] = await scheduler.tick()
        assert outcome.startswith("not started: lease unavailable"), outcome
        assert runs.calls == []
        [(_, _, outcome)] = await scheduler.tick()  # tried again on the next pass, still closed
        assert outcome.startswith("not started: lease unavailable") and runs.calls == []
    finally:
        await store.close()


async def test_runs_are_concurrent_within_the_bound() -> None:
    clock = Clock(datetime(2025, 3, 1, 17, 0, 5, tzinfo=UTC))
    gate = asyncio.Event()
    started: list[str] = []
    two_started = asyncio.Event()

    async def run(one: ScheduleSpec, fire_time: datetime) -> str:
        started.append(one.name)
        if len(started) == 2:
            two_started.set()
        await gate.wait()
        return OK

    specs = [spec(f"s{i}") for i in range(3)]
    scheduler = Scheduler(specs, run, ClaimLease(), holder="a", default_tz="Asia/Seoul", clock=clock, max_concurrent=2)
    tick = asyncio.create_task(scheduler.tick())
    await asyncio.wait_for(two_started.wait(), 5)
    for _ in range(20):  # give a third run every chance to start: it must not
        await asyncio.sleep(0)
    assert sorted(started) == ["s0", "s1"]
    assert [s.running for s in scheduler.status()] == [True, True, True]
    gate.set()
    assert [outcome for _, _, outcome in await asyncio.wait_for(tick, 5)] == [OK, OK, OK]
    assert sorted(started) == ["s0", "s1", "s2"]
    assert [s.running for s in scheduler.status()] == [False, False, False]


async def test_loop_keeps_firing_other_schedules_while_a_slow_run_goes_on() -> None:
    clock = Clock(datetime(2025, 3, 1, 17, 0, 5, tzinfo=UTC))
    release_backup = asyncio.Event()
    pinged = asyncio.Event()
    done: list[tuple[str, datetime]] = []

    async def run(one: ScheduleSpec, fire_time: datetime) -> str:
        if one.name == "backup":
            await release_backup.wait()
        else:
            pinged.set()
        done.append((one.name, fire_time))
        return OK

    backup = spec("backup", cron="0 2 * * *", command="backup shop")
    ping = spec("keepalive", every_minutes=14, command="health work-logging")
    scheduler = Scheduler([backup, ping], run, ClaimLease(), holder="a", default_tz="Asia/Seoul", clock=clock)
    stop = asyncio.Event()
    looping = asyncio.create_task(scheduler.loop(stop, every=0.001))
    await asyncio.wait_for(pinged.wait(), 5)  # the 16:58 ping, started beside the backup
    pinged.clear()
    clock.now = datetime(2025, 3, 1, 17, 12, 30, tzinfo=UTC)  # the next ping's time; the backup still runs
    await asyncio.wait_for(pinged.wait(), 5)
    assert [name for name, _ in done] == ["keepalive", "keepalive"]
    assert next(s for s in scheduler.status() if s.name == "backup").running
    release_backup.set()
    stop.set()
    await asyncio.wait_for(looping, 5)
    assert ("backup", datetime(2025, 3, 1, 17, tzinfo=UTC)) in done


async def test_loop_cancels_runs_still_going_after_the_drain() -> None:
    clock = Clock(datetime(2025, 3, 1, 17, 0, 5, tzinfo=UTC))
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def run(one: ScheduleSpec, fire_time: datetime) -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return OK

    scheduler = Scheduler([spec()], run, ClaimLease(), holder="a", default_tz="Asia/Seoul", clock=clock)
    stop = asyncio.Event()
    looping = asyncio.create_task(scheduler.loop(stop, every=0.001, drain=0.01))
    await asyncio.wait_for(started.wait(), 5)
    stop.set()
    await asyncio.wait_for(looping, 5)
    assert cancelled.is_set()
    assert not scheduler.status()[0].running


def test_status_lists_next_fire_in_utc_and_local_time() -> None:
    clock = Clock(datetime(2025, 3, 1, 12, tzinfo=UTC))
    specs = [spec(), spec("keepalive", every_minutes=14, command="health all"), spec("off", enabled=False)]
    scheduler = make(specs, Runs(), clock)
    digest, keepalive, off = scheduler.status()
    assert digest.next_fire == datetime(2025, 3, 1, 17, tzinfo=UTC)
    assert digest.next_fire_local == datetime(2025, 3, 2, 2, tzinfo=SEOUL)
    assert str(digest.next_fire_local.tzinfo if digest.next_fire_local else None) == "Asia/Seoul"
    assert (digest.when, digest.zone, digest.command) == ("0 2 * * *", "Asia/Seoul", "digest daily --post")
    assert (digest.last_fire, digest.last_outcome) == (None, None)
    assert keepalive.when == "every 14 min" and keepalive.zone == "UTC"
    assert keepalive.next_fire == datetime(2025, 3, 1, 12, 12, tzinfo=UTC)
    assert (keepalive.next_fire - datetime(1970, 1, 1, tzinfo=UTC)) % timedelta(minutes=14) == timedelta(0)
    assert (off.enabled, off.next_fire, off.next_fire_local) == (False, None, None)


def test_scheduler_refuses_bad_set_ups() -> None:
    run = Runs().runner("a")
    with pytest.raises(ValueError, match="unique: digest"):
        Scheduler([spec(), spec()], run, ClaimLease(), holder="a", default_tz="UTC")
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        Scheduler([spec()], run, ClaimLease(), holder="a", default_tz="Mars/Olympus")
    naive = Scheduler([spec()], run, ClaimLease(), holder="a", default_tz="UTC", clock=lambda: datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="clock must be a time-zone-aware"):
        naive.status()


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"cron": "61 2 * * *"},
            re.escape("cron '61 2 * * *' is not a valid cron expression: minute '61' is out of range"),
        ),
        (
            {"cron": "0 25 * * *"},
            re.escape("cron '0 25 * * *' is not a valid cron expression: hour '25' is out of range"),
        ),
        ({"cron": "0 2 * * 8"}, "day-of-week '8' is out of range"),
        ({"cron": "0 2 * foo *"}, "month 'foo'"),
        ({"cron": "every night"}, "cron 'every night' is not a valid cron expression: it needs five fields"),
        ({"cron": "0 0 2 * * *"}, "needs five fields .* not 6"),
        ({"cron": "0 0 30 2 *"}, re.escape("cron '0 0 30 2 *' is not a valid cron expression: ") + ".*can never occur"),
        ({"cron": "H 2 * * *"}, "H and R fields are not supported"),
        ({"cron": "R 2 * * *"}, "H and R fields are not supported"),
        ({"cron": "@reboot"}, "cron '@reboot' is not a valid cron expression: use one of @yearly"),
        ({"timezone": "Asia/Busan"}, "unknown time zone 'Asia/Busan'"),
        ({"timezone": "../etc/passwd"}, "unknown time zone"),
        ({"every_minutes": 14}, "schedule 'digest': give either cron or every_minutes \\(both given\\)"),
        ({"cron": None}, "give either cron or every_minutes \\(neither given\\)"),
        ({"cron": None, "every_minutes": 0}, "greater than or equal to 1"),
        ({"cron": None, "every_minutes": 14, "timezone": "Asia/Seoul"}, "timezone applies to cron only"),
        ({"command": "/ops digest daily"}, "write the command as typed after /ops"),
        ({"command": "  "}, "command is empty"),
        ({"name": "Daily Digest"}, "should match pattern"),
        ({"grace_minutes": 0}, "greater than or equal to 1"),
        ({"crontab": "0 2 * * *"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_schedules_are_refused_with_a_clear_message(fields: dict[str, object], message: str) -> None:
    data: dict[str, object] = {"name": "digest", "cron": "0 2 * * *", "command": "digest daily", **fields}
    with pytest.raises(ValidationError, match=message):
        ScheduleSpec.model_validate(data)


def test_good_schedules_are_normalised_and_frozen() -> None:
    one = ScheduleSpec.model_validate(
        {
            "name": "nightly-backup",
            "cron": "  30   2 * * *",
            "timezone": "Asia/Seoul",
            "command": ' logs shop --grep "a  b" ',
        }
    )
    assert (one.cron, one.command, one.grace_minutes) == ("30 2 * * *", 'logs shop --grep "a  b"', 60)
    assert one.enabled and one.when == "30 2 * * *"
    assert not one.follows_real_time and spec(cron="@hourly").follows_real_time
    with pytest.raises(ValidationError, match="frozen"):
        one.command = "restore shop"  # type: ignore[misc]
