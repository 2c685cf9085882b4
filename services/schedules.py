"""Schedules in the inventory: when each one fires and which fire time is due now (no I/O here).

Cron expressions are read with croniter, in the schedule's IANA zone (the inventory's default when the
schedule names none). croniter is stepped over the *wall clock* (naive local times), and each wall time is
turned into instants here, because croniter's own time-zone-aware stepping fires "30 2 * * *" twice in
Europe/Berlin on the day summer time ends and at 03:00 on the day it starts. The rules, chosen and tested:

- A wall time the clocks skip (spring forward) fires as much later as the jump: "30 2 * * *" runs at 03:30
  local that day, once.
- A wall time that happens twice (fall back) fires once, at its first occurrence (summer time) — unless the
  minute or hour field starts with ``*`` ("*/5 * * * *", "15 * * * *", "@hourly"): such schedules keep
  their real-time rhythm and fire at both occurrences, as Vixie cron does for its wildcard jobs.
- ``every_minutes`` ignores zones: it fires at whole multiples of N minutes since 1970-01-01 UTC, so every
  replica computes the same fire times (and so the same lease keys).

A fire time runs at most once: the replica that takes the lease ``schedule:<name>:<fire time ISO>`` runs it,
the others skip it. Fire times missed while the bot was down collapse into the latest one, which runs once
if it is still within the schedule's grace window, and never when it is older.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

# The inventory's name pattern (services/inventory.py imports this module, so it is repeated here).
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


_SLACK = timedelta(hours=3)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# croniter's shorthands, spelled out so their fields can be read like any expression's.
_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")
# croniter's H (hashed) and R (random) terms: R differs per replica, which would break the one-run lease.
_HASHED_OR_RANDOM = re.compile(r"^[hr](\(|/|$)", re.IGNORECASE)

# How long a fire time's lease outlives its grace window: covers clocks of replicas that disagree a little.


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (use an IANA name such as Asia/Seoul)") from None


def _fields(expression: str) -> list[str]:
    """The five fields of an expression, with croniter's @-shorthands spelled out."""
    text = " ".join(expression.split())
    return _ALIASES.get(text.lower(), text).split(" ")


def _croniter_reason(exc: BaseException) -> str:
    """croniter's message without the expression it repeats: "is out of range", "Day(s) [30] can never…"."""
    lines = str(exc).strip().splitlines()
    text = re.sub(r"^\[.*?\]\s*", "", lines[-1]) if lines else type(exc).__name__
    return text.replace("is not acceptable, out of range", "is out of range").replace("is not acceptable. ", "")


def _cron_problem(fields: list[str], exc: BaseException) -> str:
    """Name the field at fault when one alone is bad (croniter names none), else croniter's reason."""
    for index, field in enumerate(fields):
        try:
            croniter.expand(" ".join(field if i == index else "*" for i in range(len(fields))), strict=True)
        except CroniterError as field_exc:
            reason = _croniter_reason(field_exc)
            separator = " " if reason.startswith("is ") else ": "
            return f"{_FIELD_NAMES[index]} {field!r}{separator}{reason}"
    return _croniter_reason(exc)


class ScheduleSpec(BaseModel):
    """One scheduled /ops command, as declared in the inventory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    cron: str | None = Field(None, description='Five-field cron expression, e.g. "0 2 * * *", or @daily etc.')
    every_minutes: int | None = Field(
        None, ge=1, le=1440, description="Instead of cron: every N minutes (keep-alive pings), zone-independent."
    )
    timezone: str | None = Field(None, description="IANA zone of the cron expression; default: the inventory's.")
    command: str = Field(min_length=1, max_length=500, description='The /ops command it runs, e.g. "health all".')
    grace_minutes: int = Field(
        60, ge=1, le=10080, description="How late a fire time missed while the bot was down may still run."
    )
    enabled: bool = True
    on_warning: Literal["fix"] | None = Field(
        None,
        description="Only for `integrity <service>`: `fix` asks for `/ops integrity fix <service>` when the check "
        "ends in a warning (posted for approval unless the approval policy pre-approves it for this schedule).",
    )

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = " ".join(value.split())
        fields = _fields(value)
        if value.startswith("@") and value.lower() not in _ALIASES:
            raise ValueError(f"cron {value!r} is not a valid cron expression: use one of {', '.join(_ALIASES)}")
        if len(fields) != 5:
            raise ValueError(
                f"cron {value!r} is not a valid cron expression: it needs five fields "
                f"(minute hour day-of-month month day-of-week), not {len(fields)}"
            )
        if any(_HASHED_OR_RANDOM.match(part) for field in fields for part in field.split(",")):
            raise ValueError(f"cron {value!r} is not a valid cron expression: H and R fields are not supported")
        try:
            croniter.expand(value, strict=True)
            croniter(value, datetime(2000, 1, 1)).get_next(datetime)
        except CroniterBadDateError:
            raise ValueError(f"cron {value!r} is not a valid cron expression: it never fires") from None
        except CroniterError as exc:
            raise ValueError(f"cron {value!r} is not a valid cron expression: {_cron_problem(fields, exc)}") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            zone(value)
        return value

    @field_validator("command")
    @classmethod
    def _plain_command(cls, value: str) -> str:
        value = value.strip()  # only the ends: quoted arguments keep their inner spaces
        if not value:
            raise ValueError("command is empty")
        if value.startswith("/"):
            raise ValueError(f"write the command as typed after /ops (e.g. 'health all'), not {value!r}")
        return value

    @model_validator(mode="after")
    def _cron_or_every(self) -> Self:
        if (self.cron is None) == (self.every_minutes is None):
            which = "both" if self.cron is not None else "neither"
            raise ValueError(f"schedule {self.name!r}: give either cron or every_minutes ({which} given)")
        if self.every_minutes is not None and self.timezone is not None:
            raise ValueError(f"schedule {self.name!r}: timezone applies to cron only, not to every_minutes")
        return self

    @property
    def when(self) -> str:
        """The schedule as people read it: the cron expression or "every 14 min"."""
        return self.cron if self.cron is not None else f"every {self.every_minutes} min"

    @property
    def follows_real_time(self) -> bool:
        """True when the minute or hour field starts with ``*``: such a schedule fires at both occurrences
        of a repeated wall time, keeping its rhythm through the night clocks fall back."""
        if self.cron is None:
            return True
        minute, hour = _fields(self.cron)[:2]
        return minute.startswith("*") or hour.startswith("*")


def aware(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be a time-zone-aware datetime, not {moment!r}")
    return moment.astimezone(UTC)


def _instants(wall: datetime, zone: ZoneInfo, follows_real_time: bool) -> tuple[datetime, ...]:
    """The instants a naive wall time fires at in ``zone``, by the rules in the module docstring.

    ``fold=0`` is PEP 495's reading: the first occurrence of a repeated time, and a skipped time shifted
    forward by the jump.
    """
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if follows_real_time:
        second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
        if second > first:  # a repeated wall time; in a skipped one `second` comes first
            return first, second
    return (first,)


def _local_wall(moment: datetime, zone: ZoneInfo) -> datetime:
    return moment.astimezone(zone).replace(tzinfo=None)


def _cron_next(expression: str, follows_real_time: bool, zone: ZoneInfo, after: datetime) -> datetime:
    # Wall order and instant order agree except within _SLACK of a clock change, so start that far back
    # and stop once the wall clock is that far past the best instant found.
    steps = croniter(expression, _local_wall(after, zone) - _SLACK)
    best: datetime | None = None
    while True:
        wall: datetime = steps.get_next(datetime)
        if best is not None and wall > _local_wall(best, zone) + _SLACK:
            return best
        for instant in _instants(wall, zone, follows_real_time):
            if instant > after and (best is None or instant < best):
                best = instant


def _cron_latest(expression: str, follows_real_time: bool, zone: ZoneInfo, until: datetime) -> datetime:
    steps = croniter(expression, _local_wall(until, zone) + _SLACK)
    best: datetime | None = None
    while True:
        wall: datetime = steps.get_prev(datetime)
        if best is not None and wall < _local_wall(best, zone) - _SLACK:
            return best
        for instant in _instants(wall, zone, follows_real_time):
            if instant <= until and (best is None or instant > best):
                best = instant


def _cron(spec: ScheduleSpec) -> str:
    if spec.cron is None:  # only a spec built without validation gets here
        raise ValueError(f"schedule {spec.name!r} has neither cron nor every_minutes")
    return spec.cron


def next_fire(spec: ScheduleSpec, after: datetime, default_tz: str) -> datetime:
    """The first fire time strictly after ``after``, in UTC (whether or not the schedule is enabled)."""
    after = aware(after, "after")
    if spec.every_minutes is not None:
        period = timedelta(minutes=spec.every_minutes)
        return _EPOCH + ((after - _EPOCH) // period + 1) * period
    return _cron_next(_cron(spec), spec.follows_real_time, zone(spec.timezone or default_tz), after)


def latest_fire(spec: ScheduleSpec, until: datetime, default_tz: str) -> datetime:
    """The last fire time at or before ``until``, in UTC."""
    until = aware(until, "until")
    if spec.every_minutes is not None:
        period = timedelta(minutes=spec.every_minutes)
        return _EPOCH + ((until - _EPOCH) // period) * period
    return _cron_latest(_cron(spec), spec.follows_real_time, zone(spec.timezone or default_tz), until)


def due(spec: ScheduleSpec, last_fire: datetime | None, now: datetime, default_tz: str) -> datetime | None:
    """The fire time to run now, if any: the latest one at or before ``now``, when it is after ``last_fire``
    and at most ``grace_minutes`` old. Missed fire times collapse into that one, so they run once, not N times.
    """
    if not spec.enabled:
        return None
    now = aware(now, "now")
    latest = latest_fire(spec, now, default_tz)
    if last_fire is not None and latest <= aware(last_fire, "last_fire"):
        return None
    if latest < now - timedelta(minutes=spec.grace_minutes):
        return None
    return latest


def lease_key(name: str, fire_time: datetime) -> str:
    """The lease that gives one replica one fire time of one schedule."""
    return f"schedule:{name}:{aware(fire_time, 'fire_time').isoformat()}"
