"""The scheduler loop: runs the inventory's schedules (services/schedules.py says when) once per fire time.

A fire time runs at most once: the replica that takes the lease ``schedule:<name>:<fire time ISO>`` runs it,
the others skip it. Fire times missed while the bot was down collapse into the latest one, which runs once
if it is still within the schedule's grace window, and never when it is older.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, Protocol

import structlog

from bot.container import Container
from handlers.context import Reply
from handlers.slack import post_reply
from services.access import SCHEDULER_USER
from services.failures import network_problem, short_error
from services.health import Status
from services.inventory import Role
from services.redaction import Redactor
from services.schedules import ScheduleSpec, aware, due, lease_key, next_fire, zone
from services.state import StateStore

log = structlog.get_logger(__name__)

OK = "ok"
RAN_ELSEWHERE = "skipped: another replica took this fire time"
FAILED_PREFIX = "failed: "


class Lease(Protocol):
    """First taker of a key wins it for good: a fire time's key is never given out again, so it never runs twice."""

    async def acquire(self, key: str, holder: str) -> bool:
        """Take ``key`` for ``holder``; False if anyone (``holder`` too) took it before."""
        ...


class Fired(NamedTuple):
    """What one pass did with one due fire time."""

    name: str
    fire_time: datetime
    outcome: str


@dataclass(frozen=True)
class ScheduleStatus:
    """One line of ``/ops schedules``: what runs when, and how its last run went (as this replica knows)."""

    name: str
    command: str
    when: str
    zone: str
    enabled: bool
    next_fire: datetime | None
    next_fire_local: datetime | None
    last_fire: datetime | None
    last_outcome: str | None
    running: bool


@dataclass
class _State:
    loaded: bool = False
    last_fire: datetime | None = None
    last_outcome: str | None = None
    task: asyncio.Task[Fired] | None = None


RunSchedule = Callable[[ScheduleSpec, datetime], Awaitable[str]]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Scheduler:
    """Runs the due schedules, each fire time once across replicas, concurrently up to ``max_concurrent``.

    ``run(spec, fire_time)`` runs the command and returns a short outcome ("posted", "12 MB"); an exception
    is recorded as ``failed: …`` and never stops the scheduler. ``last_runs(name)`` (the state store) gives
    the last fire time run by any replica, read once per schedule at start-up, so a restart neither repeats
    nor forgets; ``record(name, fire_time, outcome)`` stores each run this replica made.
    """

    def __init__(
        self,
        specs: Sequence[ScheduleSpec],
        run: RunSchedule,
        lease: Lease,
        *,
        holder: str,
        default_tz: str,
        clock: Callable[[], datetime] = _utc_now,
        last_runs: Callable[[str], Awaitable[datetime | None]] | None = None,
        record: Callable[[str, datetime, str], Awaitable[None]] | None = None,
        max_concurrent: int = 4,
        redactor: Redactor | None = None,
    ) -> None:
        names = [spec.name for spec in specs]
        doubled = sorted({name for name in names if names.count(name) > 1})
        if doubled:
            raise ValueError(f"schedule names must be unique: {', '.join(doubled)} appear more than once")
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, not {max_concurrent!r}")
        zone(default_tz)
        self._specs = list(specs)
        self._run = run
        self._lease = lease
        self._holder = holder
        self._default_tz = default_tz
        self._clock = clock
        self._last_runs = last_runs
        self._record = record
        self._slots = asyncio.Semaphore(max_concurrent)
        self._redactor = redactor
        self._states = {spec.name: _State() for spec in specs}

    def _now(self) -> datetime:
        return aware(self._clock(), "the scheduler's clock")

    def _reason(self, exc: BaseException) -> str:
        return network_problem(exc) or short_error(exc, self._redactor)

    async def _load(self, spec: ScheduleSpec, state: _State) -> bool:
        """Read the last fire time from the state store once; False (try again next pass) if it fails."""
        if state.loaded:
            return True
        if self._last_runs is not None:
            try:
                last = await self._last_runs(spec.name)
            except Exception as exc:
                # Running without knowing the last run could repeat it: wait for the store instead.
                log.warning("schedule_last_run_unknown", schedule=spec.name, reason=self._reason(exc))
                return False
            if last is not None and (state.last_fire is None or last > state.last_fire):
                state.last_fire = aware(last, "last_runs()")
        state.loaded = True
        return True

    async def _start_due(self) -> list[asyncio.Task[Fired]]:
        """Start a task for every schedule with a due fire time and no run in flight."""
        now = self._now()
        started: list[asyncio.Task[Fired]] = []
        for spec in self._specs:
            state = self._states[spec.name]
            if not spec.enabled or state.task is not None or not await self._load(spec, state):
                continue
            try:
                fire_time = due(spec, state.last_fire, now, self._default_tz)
            except Exception:  # one schedule's trouble must not keep the others from running
                log.exception("schedule_due_failed", schedule=spec.name)
                continue
            if fire_time is None:
                continue
            task = asyncio.create_task(self._fire(spec, state, fire_time), name=f"opsbot-schedule:{spec.name}")
            state.task = task
            task.add_done_callback(functools.partial(_finished, state))
            started.append(task)
        return started

    async def _fire(self, spec: ScheduleSpec, state: _State, fire_time: datetime) -> Fired:
        async with self._slots:
            return await self._take_and_run(spec, state, fire_time)

    async def _take_and_run(self, spec: ScheduleSpec, state: _State, fire_time: datetime) -> Fired:
        deadline = fire_time + timedelta(minutes=spec.grace_minutes)
        now = self._now()
        if now > deadline:  # waited for a free slot past the grace window
            state.last_fire = fire_time
            state.last_outcome = "skipped: no free slot within the grace window"
            log.warning("schedule_skipped", schedule=spec.name, fire_time=fire_time.isoformat(), reason="no slot")
            return Fired(spec.name, fire_time, state.last_outcome)
        key = lease_key(spec.name, fire_time)
        try:
            mine = await self._lease.acquire(key, self._holder)
        except Exception as exc:
            # Fail closed: without the lease another replica may be running it. Retried next pass.
            reason = self._reason(exc)
            log.warning(
                "schedule_lease_unavailable", schedule=spec.name, fire_time=fire_time.isoformat(), reason=reason
            )
            return Fired(spec.name, fire_time, f"not started: lease unavailable ({reason})")
        state.last_fire = fire_time
        if not mine:
            log.info("schedule_taken_elsewhere", schedule=spec.name, fire_time=fire_time.isoformat())
            return Fired(spec.name, fire_time, RAN_ELSEWHERE)
        log.info("schedule_started", schedule=spec.name, fire_time=fire_time.isoformat(), command=spec.command)
        try:
            outcome = await self._run(spec, fire_time) or OK
        except Exception as exc:
            log.exception("schedule_run_failed", schedule=spec.name, fire_time=fire_time.isoformat())
            outcome = FAILED_PREFIX + short_error(exc, self._redactor)
        else:
            log.info("schedule_finished", schedule=spec.name, fire_time=fire_time.isoformat(), outcome=outcome)
        state.last_outcome = outcome
        if self._record is not None:
            try:
                await self._record(spec.name, fire_time, outcome)
            except Exception:
                log.exception("schedule_record_failed", schedule=spec.name, fire_time=fire_time.isoformat())
        return Fired(spec.name, fire_time, outcome)

    async def tick(self) -> list[Fired]:
        """One pass: start every due run and wait for the runs it started; what each did, in spec order."""
        return list(await asyncio.gather(*await self._start_due()))

    async def loop(self, stop: asyncio.Event, every: float = 30.0, *, drain: float = 30.0) -> None:
        """Pass every ``every`` seconds until ``stop`` is set, without waiting for runs between passes (a slow
        backup does not hold up a keep-alive ping); then wait up to ``drain`` seconds for runs in flight and
        cancel the rest."""
        in_flight: set[asyncio.Task[Fired]] = set()
        while not stop.is_set():
            try:
                for task in await self._start_due():
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
            except Exception:
                log.exception("schedule_pass_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
        await _drain(in_flight, drain)

    def status(self) -> list[ScheduleStatus]:
        """Every schedule with its next fire time (UTC and local), last fire time and last outcome."""
        now = self._now()
        lines = []
        for spec in self._specs:
            state = self._states[spec.name]
            zone_name = "UTC" if spec.every_minutes is not None else spec.timezone or self._default_tz
            upcoming = next_fire(spec, now, self._default_tz) if spec.enabled else None
            lines.append(
                ScheduleStatus(
                    name=spec.name,
                    command=spec.command,
                    when=spec.when,
                    zone=zone_name,
                    enabled=spec.enabled,
                    next_fire=upcoming,
                    next_fire_local=upcoming.astimezone(zone(zone_name)) if upcoming is not None else None,
                    last_fire=state.last_fire,
                    last_outcome=state.last_outcome,
                    running=state.task is not None,
                )
            )
        return lines


def _finished(state: _State, task: asyncio.Task[Fired]) -> None:
    """Free the schedule for its next fire time, and log what a run let through (none should)."""
    if state.task is task:
        state.task = None
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("schedule_task_crashed", task=task.get_name(), exc_info=exc)


async def _drain(tasks: Iterable[asyncio.Task[Fired]], grace: float) -> None:
    """Let runs in flight finish for up to ``grace`` seconds, then cancel what is left."""
    pending = set(tasks)
    if not pending:
        return
    _, late = await asyncio.wait(pending, timeout=grace)
    for task in late:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)  # their crashes were logged by _finished


class StoreLease:
    """Leases as rows of the state store's ``schedule_runs``: claiming a fire time is inserting it, so
    exactly one replica sharing the store runs it — and a restart never runs it again.

    The only lease production uses (``build_scheduler``): with SQLite for one process, with PostgreSQL for
    replicas. A replica that dies mid-run leaves its fire time claimed and unfinished; it is not run again.
    """

    def __init__(self, store: StateStore, clock: Callable[[], datetime] = _utc_now) -> None:
        self.store = store
        self.clock = clock

    async def acquire(self, key: str, holder: str) -> bool:
        """Claim the fire time ``key`` names for ``holder``; False if it was claimed before."""
        prefix, name, fire = key.split(":", 2)
        if prefix != "schedule":
            raise ValueError(f"not a schedule lease key: {key!r}")
        return await self.store.claim_schedule_run(name, datetime.fromisoformat(fire), holder=holder, at=self.clock())


def build_scheduler(container: Container, *, holder: str, clock: Callable[[], datetime] = _utc_now) -> Scheduler | None:
    """The inventory's schedules, run through the router as the scheduler, posted to the ops channel."""
    inventory = container.loaded.inventory
    if not inventory.schedules:
        return None
    deps = container.deps
    deps.roles.grant(SCHEDULER_USER, Role.OPERATOR)
    store = container.store
    channel = inventory.ops_channel

    async def dispatch(spec: ScheduleSpec, text: str) -> tuple[Reply, str]:
        reply = await container.router.dispatch(
            user_id=SCHEDULER_USER, channel_id=channel or "schedule", text=text, deps=deps,
            interface="schedule", schedule=spec.name,
        )  # fmt: skip
        if container.slack is not None and channel:
            reply.ephemeral = False  # a schedule speaks to the whole ops channel
            ts = await post_reply(container.slack, channel, reply)
            if ts is not None and reply.approval_id is not None:
                await store.attach_approval_message(reply.approval_id, channel, ts)
        first = reply.text.splitlines()[0] if reply.text else ""
        if reply.outcome not in ("ok", "pending"):
            raise RuntimeError(f"{reply.outcome}: {first}"[:300])
        return reply, first

    async def run(spec: ScheduleSpec, fire_time: datetime) -> str:
        reply, first = await dispatch(spec, spec.command)
        if spec.on_warning == "fix" and reply.status is Status.WARNING:
            # Runbook 003's daily cron: check, fix on a warning (its plan posted for approval unless this
            # schedule is pre-approved for it), and the fix's run checks again.
            _, fixed = await dispatch(spec, "integrity fix " + spec.command.split(maxsplit=1)[1])
            return f"{first[:140]} · then {fixed[:150]}"
        return first[:300] or OK

    async def last_run(name: str) -> datetime | None:
        found = (await store.last_schedule_runs()).get(name)
        return found.fire_at if found else None

    async def record(name: str, fire_time: datetime, outcome: str) -> None:
        await store.finish_schedule_run(name, fire_time, outcome=outcome, at=clock())

    return Scheduler(
        inventory.schedules, run, StoreLease(store, clock), holder=holder, default_tz=inventory.timezone,
        last_runs=last_run, record=record, redactor=container.redactor, clock=clock,
    )  # fmt: skip
