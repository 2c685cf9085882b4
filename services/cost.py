"""A service's AWS cost from Cost Explorer (runbook 002's ``aws ce get-cost-and-usage``), as plain data.

One ``GetCostAndUsage`` query per report, grouped by AWS service (``SERVICE``), asking for both
``BlendedCost`` and ``UnblendedCost``, filtered by the service's declared cost allocation tags and/or
linked accounts (the inventory's ``cost:`` section):

- the current month: DAILY figures from the first day of last month up to yesterday (today's figure is
  hours late and partial, so a month "to date" runs through yesterday). From them: the month to date by
  AWS service, the same days of last month, a month-end projection (month to date plus the mean of the
  last seven days for each day left) and anomalies (a day over 2x the mean of the seven days before it);
- a past month: MONTHLY figures of that month and the month before, to compare with.

Cost Explorer's endpoint is in us-east-1 whatever the app's region, and each request costs $0.01, so a
query's answer is kept until the end of the UTC day in a small bounded in-process cache (`CostCache`,
one per running bot, keyed by the query and the day). boto3 blocks: calls run on a thread of their own,
bounded by botocore's timeouts and by the declared timeout overall. It needs ``ce:GetCostAndUsage``.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import math
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import boto3  # type: ignore[import-untyped]  # boto3 and botocore ship no type information
import structlog
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from services.clients import AWS_BAD_CREDENTIALS, AWS_DENIED, ThreadedClient, aws_error_code, public_endpoint
from services.errors import CommandError
from services.failures import network_problem
from services.inventory import CostSettings, Inventory

log = structlog.get_logger(__name__)

__all__ = [
    "METRICS",
    "PERMISSION",
    "REGION",
    "Anomaly",
    "CostCache",
    "CostError",
    "CostQuery",
    "CostReport",
    "ServiceCost",
    "cost_cache_for",
    "cost_services",
    "make_client",
    "parse_month",
    "read_costs",
]

PERMISSION = "ce:GetCostAndUsage"
REGION = "us-east-1"  # Cost Explorer's only endpoint, whatever the region of the app
METRICS = ("BlendedCost", "UnblendedCost")
ANOMALY_RATIO = 2.0  # a day over this many times the mean of the seven days before it
TRAILING_DAYS = 7
MAX_PAGES = 10  # a page is one more $0.01 request: bounded
MONTHS_KEPT = 38  # Cost Explorer keeps 13 months by default, 38 with multi-year data: older is refused here
CACHE_SIZE = 64

_MONTH = re.compile(r"(\d{4})-(\d{2})")
_THROTTLED = frozenset({"LimitExceededException", "ThrottlingException", "Throttling", "TooManyRequestsException"})


class CostError(CommandError):
    """The costs could not be read; the message is one plain sentence without secrets."""


# -- months ----------------------------------------------------------------------------------------


def _first(day: date) -> date:
    return day.replace(day=1)


def _next_month(first: date) -> date:
    return (first + timedelta(days=32)).replace(day=1)


def _previous_month(first: date) -> date:
    return (first - timedelta(days=1)).replace(day=1)


def _days_in(first: date) -> int:
    return calendar.monthrange(first.year, first.month)[1]


def month_name(first: date) -> str:
    """``date(2026, 11, 1)`` → ``"November 2026"``."""
    return f"{calendar.month_name[first.month]} {first.year}"


def parse_month(text: str | None, today: date) -> date:
    """The first day of the month ``YYYY-MM`` names (the current month when None); a malformed month, one
    in the future or one older than Cost Explorer keeps is refused in one sentence."""
    current = _first(today)
    if text is None:
        return current
    match = _MONTH.fullmatch(text.strip())
    if match is None or not 1 <= int(match[2]) <= 12 or int(match[1]) < 2000:
        raise CostError(f"{text[:20]!r} is not a month: write it as YYYY-MM, e.g. {current:%Y-%m}.")
    first = date(int(match[1]), int(match[2]), 1)
    if first > current:
        raise CostError(f"{first:%Y-%m} is in the future: the latest month with costs is {current:%Y-%m}.")
    if (current.year - first.year) * 12 + current.month - first.month > MONTHS_KEPT:
        raise CostError(f"{first:%Y-%m} is more than {MONTHS_KEPT} months ago: Cost Explorer keeps no costs that old.")
    return first


# -- the query -------------------------------------------------------------------------------------


def cost_filter(settings: CostSettings) -> dict[str, Any]:
    """The Cost Explorer ``Filter`` expression of a ``cost:`` section: every tag and the accounts, all required."""
    parts: list[dict[str, Any]] = [
        {"Tags": {"Key": key, "Values": list(values), "MatchOptions": ["EQUALS"]}}
        for key, values in sorted(settings.tags.items())
    ]
    if settings.accounts:
        parts.append({"Dimensions": {"Key": "LINKED_ACCOUNT", "Values": list(settings.accounts)}})
    return parts[0] if len(parts) == 1 else {"And": parts}


def describe_scope(settings: CostSettings) -> str:
    """``tag Project=work-logging, account 123456789012`` — what the figures are filtered by."""
    parts = [f"tag {key}={'|'.join(values)}" for key, values in sorted(settings.tags.items())]
    if settings.accounts:
        parts.append(("account " if len(settings.accounts) == 1 else "accounts ") + ", ".join(settings.accounts))
    return ", ".join(parts)


@dataclass(frozen=True)
class CostQuery:
    """One GetCostAndUsage query: [start, end) at a granularity, with the section's filter."""

    granularity: str  # DAILY | MONTHLY
    start: date
    end: date  # exclusive, as Cost Explorer reads it
    filter: Mapping[str, Any]

    def arguments(self) -> dict[str, Any]:
        return {
            "TimePeriod": {"Start": self.start.isoformat(), "End": self.end.isoformat()},
            "Granularity": self.granularity,
            "Metrics": list(METRICS),
            "GroupBy": [{"Type": "DIMENSION", "Key": "SERVICE"}],
            "Filter": dict(self.filter),
        }

    def key(self) -> str:
        return json.dumps(self.arguments(), sort_keys=True)


def plan_query(settings: CostSettings, month: date, today: date) -> CostQuery:
    """The one query a report needs: daily from last month's first day to yesterday for the current
    month; monthly, that month and the one before, for a past month."""
    previous = _previous_month(month)
    if month == _first(today):
        return CostQuery("DAILY", previous, today, cost_filter(settings))
    return CostQuery("MONTHLY", previous, _next_month(month), cost_filter(settings))


# -- the answer ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    """One ResultsByTime entry: its first day, the declared metric per AWS service, both totals."""

    start: date
    by_service: dict[str, float]
    totals: dict[str, float]  # metric -> sum over the groups
    estimated: bool

    def total(self, metric: str) -> float:
        return self.totals.get(metric, 0.0)


@dataclass(frozen=True)
class Answer:
    """What the query returned, parsed: periods by first day, the currency unit, whether pages were left."""

    periods: dict[date, Period]
    unit: str
    truncated: bool


def _amount(metrics: object, name: str) -> tuple[float, str | None]:
    if not isinstance(metrics, Mapping):
        return 0.0, None
    value = metrics.get(name)
    if not isinstance(value, Mapping):
        return 0.0, None
    try:
        amount = float(value.get("Amount") or 0)
    except (TypeError, ValueError):
        return 0.0, None
    unit = value.get("Unit")
    return (amount if math.isfinite(amount) else 0.0), (str(unit) if unit else None)


def _parse(pages: Sequence[Mapping[str, Any]], metric: str, truncated: bool) -> Answer:
    periods: dict[date, Period] = {}
    units: list[str] = []
    for page in pages:
        for item in page.get("ResultsByTime") or []:
            try:
                start = date.fromisoformat(str((item.get("TimePeriod") or {}).get("Start")))
            except ValueError:
                continue
            known = periods.get(start)
            by_service = dict(known.by_service) if known else {}
            totals = dict(known.totals) if known else dict.fromkeys(METRICS, 0.0)
            groups = item.get("Groups") or []
            for group in groups:
                keys = group.get("Keys") or ["?"]
                name = str(keys[0])
                for each in METRICS:
                    amount, unit = _amount(group.get("Metrics"), each)
                    totals[each] += amount
                    if unit:
                        units.append(unit)
                    if each == metric:
                        by_service[name] = by_service.get(name, 0.0) + amount
            if not groups:  # an ungrouped answer: only its Total
                for each in METRICS:
                    amount, unit = _amount(item.get("Total"), each)
                    totals[each] += amount
                    if unit:
                        units.append(unit)
            estimated = bool(item.get("Estimated")) or (known.estimated if known else False)
            periods[start] = Period(start, by_service, totals, estimated)
    unit = max(set(units), key=units.count) if units else "USD"
    return Answer(periods, unit, truncated)


# -- the cache -------------------------------------------------------------------------------------


class CostCache:
    """Answers of Cost Explorer queries for the UTC day they were read (each read costs $0.01): at most
    ``size`` of them, the least recently used dropped first, and none kept past its day."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._answers: OrderedDict[tuple[str, date], tuple[datetime, list[dict[str, Any]]]] = OrderedDict()
        self._locks: dict[tuple[str, date], asyncio.Lock] = {}

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str, day: date) -> tuple[datetime, list[dict[str, Any]]] | None:
        for stale in [k for k in self._answers if k[1] != day]:
            del self._answers[stale]
        for stale in [k for k, lock in self._locks.items() if k[1] != day and not lock.locked()]:
            del self._locks[stale]
        found = self._answers.get((key, day))
        if found is not None:
            self._answers.move_to_end((key, day))
        return found

    def put(self, key: str, day: date, read_at: datetime, pages: list[dict[str, Any]]) -> None:
        self._answers[(key, day)] = (read_at, pages)
        self._answers.move_to_end((key, day))
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)

    def lock(self, key: str, day: date) -> asyncio.Lock:
        """Held while that query is read, so two asking at once pay for one request (other queries
        do not wait behind it)."""
        return self._locks.setdefault((key, day), asyncio.Lock())


# One cache per running bot: keyed by the bot's state store, so it lives exactly as long as the bot does.
_CACHES: weakref.WeakKeyDictionary[object, CostCache] = weakref.WeakKeyDictionary()


def cost_cache_for(owner: object) -> CostCache:
    """The cost cache of the bot that owns ``owner`` (its state store), made on first use."""
    try:
        cache = _CACHES.get(owner)
        if cache is None:
            cache = _CACHES[owner] = CostCache()
    except TypeError:  # an owner that cannot be weakly referenced: no cache to share, each read pays
        return CostCache()
    return cache


# -- the report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceCost:
    """One AWS service's cost in the period, and over the period it is compared with (None: not compared)."""

    name: str
    amount: float
    before: float | None


@dataclass(frozen=True)
class Anomaly:
    """A day that cost over ``ANOMALY_RATIO`` times the mean of the seven days before it."""

    day: date
    amount: float
    mean: float

    @property
    def ratio(self) -> float | None:
        return self.amount / self.mean if self.mean > 0 else None


@dataclass(frozen=True)
class CostReport:
    """A service's AWS cost in one month: to date (through ``through``) for the current month, whole for a
    past one; by AWS service (the ``top`` dearest, the rest summed), against the comparison period."""

    service: str
    scope: str  # what the figures are filtered by
    metric: str
    unit: str
    month: date
    to_date: bool
    through: date | None  # the last day counted (None: no full day of the month yet)
    total: float
    totals: dict[str, float]  # both metrics
    before: float | None  # the same days of last month (to date) or the month before (past month)
    before_label: str
    top: list[ServiceCost]
    others: float
    others_count: int
    projection: float | None = None
    daily_rate: float | None = None
    anomalies: list[Anomaly] = field(default_factory=list)
    estimated: bool = False
    truncated: bool = False
    read_at: datetime | None = None
    cached: bool = False

    @property
    def empty(self) -> bool:
        """No cost at all in either period: often an unactivated tag or a wrong account."""
        return self.total == 0 and not self.before

    @property
    def change_pct(self) -> float | None:
        if self.before is None or self.before <= 0:
            return None
        return (self.total - self.before) / self.before * 100


def _top(
    current: dict[str, float], before: dict[str, float] | None, count: int
) -> tuple[list[ServiceCost], float, int]:
    ranked = sorted(current.items(), key=lambda item: (-item[1], item[0]))
    ranked = [(name, amount) for name, amount in ranked if round(amount, 2) != 0 or (before or {}).get(name)]
    shown = [ServiceCost(n, a, (before or {}).get(n, 0.0) if before is not None else None) for n, a in ranked[:count]]
    rest = ranked[count:]
    return shown, sum(a for _, a in rest), len(rest)


def _sum(periods: Sequence[Period], metric: str) -> tuple[dict[str, float], dict[str, float]]:
    by_service: dict[str, float] = {}
    totals = dict.fromkeys(METRICS, 0.0)
    for period in periods:
        for name, amount in period.by_service.items():
            by_service[name] = by_service.get(name, 0.0) + amount
        for each in METRICS:
            totals[each] += period.total(each)
    return by_service, totals


def anomalies(days: Mapping[date, float], within: Sequence[date], floor: float) -> list[Anomaly]:
    """The days of ``within`` over 2x the mean of the seven days before each (days missing count as 0),
    and at least ``floor``."""
    found = []
    for day in within:
        amount = days.get(day, 0.0)
        mean = sum(days.get(day - timedelta(days=n), 0.0) for n in range(1, TRAILING_DAYS + 1)) / TRAILING_DAYS
        if amount >= floor and amount > ANOMALY_RATIO * mean and amount > 0:
            found.append(Anomaly(day, amount, mean))
    return found


def month_to_date(service: str, settings: CostSettings, answer: Answer, month: date, today: date) -> CostReport:
    """The current month through yesterday, against the same days of last month, with a projection."""
    metric = settings.metric
    previous = _previous_month(month)
    through = today - timedelta(days=1) if today > month else None
    days_done = (through - month).days + 1 if through else 0
    this_month = [p for d, p in answer.periods.items() if month <= d < today]
    same_days_end = previous + timedelta(days=min(days_done, _days_in(previous)))
    last_month = [p for d, p in answer.periods.items() if previous <= d < same_days_end]
    current, totals = _sum(this_month, metric)
    before, before_totals = _sum(last_month, metric)
    top, others, others_count = _top(current, before, settings.top)
    daily = {d: p.total(metric) for d, p in answer.periods.items() if d < today}
    trailing = [daily.get(today - timedelta(days=n), 0.0) for n in range(1, TRAILING_DAYS + 1)]
    # The rate: the mean of the last seven days read (fewer when the answer starts later).
    known = [v for n, v in enumerate(trailing, 1) if today - timedelta(days=n) >= min(daily, default=today)]
    rate = sum(known) / len(known) if known else None
    left = _days_in(month) - days_done
    projection = totals[metric] + rate * left if rate is not None else None
    window = [month + timedelta(days=n) for n in range(days_done)]
    if days_done == 0:
        # On the first of the month no day is counted yet: show last month whole instead.
        label = f"{month_name(previous)} in all"
        whole, whole_totals = _sum([p for d, p in answer.periods.items() if previous <= d < month], metric)
        before_total = whole_totals[metric]
        top, others, others_count = _top(whole, None, settings.top)
    else:
        end_day = same_days_end - timedelta(days=1)
        span = f"{previous:%b} 1-{end_day.day}" if end_day > previous else f"{previous:%b} 1"
        label = f"same days of last month ({span})"
        before_total = before_totals[metric]
    return CostReport(
        service=service,
        scope=describe_scope(settings),
        metric=metric,
        unit=answer.unit,
        month=month,
        to_date=True,
        through=through,
        total=totals[metric],
        totals=totals,
        before=before_total,
        before_label=label,
        top=top,
        others=others,
        others_count=others_count,
        projection=projection,
        daily_rate=rate,
        anomalies=anomalies(daily, window, settings.anomaly_floor),
        estimated=any(p.estimated for p in this_month),
        truncated=answer.truncated,
    )


def whole_month(service: str, settings: CostSettings, answer: Answer, month: date) -> CostReport:
    """A past month's total by AWS service, against the month before."""
    metric = settings.metric
    previous = _previous_month(month)
    # Periods are matched by the month they start in: a MONTHLY answer has one per month.
    this = [p for d, p in answer.periods.items() if _first(d) == month]
    before = [p for d, p in answer.periods.items() if _first(d) == previous]
    current, totals = _sum(this, metric)
    earlier, earlier_totals = _sum(before, metric)
    top, others, others_count = _top(current, earlier if before else None, settings.top)
    return CostReport(
        service=service,
        scope=describe_scope(settings),
        metric=metric,
        unit=answer.unit,
        month=month,
        to_date=False,
        through=_next_month(month) - timedelta(days=1),
        total=totals[metric],
        totals=totals,
        before=earlier_totals[metric] if before else None,
        before_label=month_name(previous),
        top=top,
        others=others,
        others_count=others_count,
        estimated=any(p.estimated for p in this),
        truncated=answer.truncated,
    )


# -- reading ---------------------------------------------------------------------------------------


def make_client(settings: CostSettings) -> Any:
    """A Cost Explorer client: always us-east-1 (its only endpoint), bounded by the declared timeout."""
    config = Config(
        region_name=REGION,
        connect_timeout=settings.timeout,
        read_timeout=settings.timeout,
        retries={"total_max_attempts": 3, "mode": "standard"},  # standard mode retries LimitExceededException
    )
    endpoint = str(settings.endpoint_url) if settings.endpoint_url is not None else None
    # A session of its own: boto3's default session is not safe to share between threads.
    return boto3.session.Session().client("ce", region_name=REGION, endpoint_url=endpoint, config=config)


def _read_pages(client: Any, query: CostQuery) -> tuple[list[dict[str, Any]], bool]:
    pages: list[dict[str, Any]] = []
    token: str | None = None
    for _ in range(MAX_PAGES):
        arguments = query.arguments()
        if token:
            arguments["NextPageToken"] = token
        answer = client.get_cost_and_usage(**arguments)
        pages.append({"ResultsByTime": answer.get("ResultsByTime") or []})
        token = answer.get("NextPageToken")
        if not token:
            return pages, False
    return pages, True


def _failure(exc: BaseException, service: str, settings: CostSettings) -> CostError:
    where = f"the AWS costs of {service}"
    endpoint = public_endpoint(str(settings.endpoint_url) if settings.endpoint_url else None)
    api = endpoint or f"Cost Explorer ({REGION})"
    log.info("cost_read_failed", service=service, error=type(exc).__name__)
    if isinstance(exc, ClientError):
        code = aws_error_code(exc)
        if code in AWS_DENIED:
            return CostError(f"Cost Explorer refused: access denied ({PERMISSION}) reading {where}.")
        if code in _THROTTLED:
            return CostError(
                f"Cost Explorer is rate-limiting the bot ({PERMISSION} quota) reading {where}; try again in a minute."
            )
        if code in AWS_BAD_CREDENTIALS:
            return CostError(f"AWS refused the bot's credentials ({code}) reading {where}.")
        if code == "DataUnavailableException":
            return CostError(f"Cost Explorer has no data yet for {where} (is Cost Explorer enabled for the account?).")
        if code == "BillExpirationException":
            return CostError(f"Cost Explorer no longer keeps the month asked for, reading {where}.")
        if code == "ValidationException":
            return CostError(f"Cost Explorer refused the query for {where} as invalid (check its `cost:` section).")
        return CostError(f"Cost Explorer answered {code or 'an unknown error'} reading {where}.")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return CostError(
            f"No usable AWS credentials were found (environment, profile or instance role) to read {where}."
        )
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError):
        return CostError(f"{api} did not answer within {settings.timeout:g} s reading {where}.")
    problem = network_problem(exc)
    if isinstance(exc, EndpointConnectionError):
        return CostError(f"Could not connect to {api} to read {where}" + (f" ({problem})." if problem else "."))
    return CostError(f"{problem or type(exc).__name__} talking to {api} reading {where}.")


def cost_services(inventory: Inventory) -> list[str]:
    """The services with a ``cost:`` section, in inventory order."""
    return [name for name, service in inventory.services.items() if service.cost is not None]


def cost_settings(inventory: Inventory, service: str) -> CostSettings:
    """The service's ``cost:`` section, or one sentence saying it has none."""
    settings = inventory.services[service].cost
    if settings is None:
        others = cost_services(inventory)
        hint = f" (services with one: {', '.join(others)})" if others else ""
        raise CostError(
            f"{service} declares no AWS cost: add a `cost:` section with its cost allocation `tags` or linked "
            f"`accounts` to the inventory{hint}."
        )
    return settings


async def read_costs(
    service: str,
    settings: CostSettings,
    *,
    month: date,
    now: datetime,
    cache: CostCache,
    client_factory: Callable[[CostSettings], Any] = make_client,
) -> CostReport:
    """The service's cost report for ``month`` (the current month: to date), from today's cached answer
    when there is one, else from one Cost Explorer query within the declared timeout."""
    now = now.astimezone(UTC)
    today = now.date()
    query = plan_query(settings, month, today)
    key = query.key()
    async with cache.lock(key, today):
        found = cache.get(key, today)
        cached = found is not None
        if found is None:
            pages, truncated = await _fetch(service, settings, query, client_factory)
            if truncated:
                log.warning("cost_pages_left", service=service, pages=MAX_PAGES)
            found = (now, pages + ([{"truncated": True}] if truncated else []))
            cache.put(key, today, *found)
    read_at, pages = found
    answer = _parse(pages, settings.metric, any(p.get("truncated") for p in pages))
    if query.granularity == "DAILY":
        report = month_to_date(service, settings, answer, month, today)
    else:
        report = whole_month(service, settings, answer, month)
    return replace(report, read_at=read_at, cached=cached)


async def _fetch(
    service: str, settings: CostSettings, query: CostQuery, client_factory: Callable[[CostSettings], Any]
) -> tuple[list[dict[str, Any]], bool]:
    boto = ThreadedClient(lambda: client_factory(settings), threads=1, name=f"cost-{service[:20]}")
    try:
        async with asyncio.timeout(settings.timeout):
            client = await boto.get()
            return await boto.call(lambda: _read_pages(client, query))
    except TimeoutError:
        log.info("cost_read_failed", service=service, error="timeout")
        endpoint = public_endpoint(str(settings.endpoint_url) if settings.endpoint_url else None)
        api = endpoint or f"Cost Explorer ({REGION})"
        raise CostError(
            f"{api} did not answer within {settings.timeout:g} s reading the AWS costs of {service}."
        ) from None
    except (ClientError, BotoCoreError) as exc:
        # ``from None``: botocore's text may carry endpoint URLs or request ids, never shown.
        raise _failure(exc, service, settings) from None
    except ValueError:
        raise CostError(f"The Cost Explorer endpoint of {service} is not a valid URL.") from None
    finally:
        with contextlib.suppress(Exception):
            await boto.close()


def money(amount: float, unit: str = "USD") -> str:
    """``1234.5`` → ``"$1,234.50"`` (other currencies: ``"1,234.50 EUR"``)."""
    sign = "-" if amount < 0 and round(amount, 2) != 0 else ""
    text = f"{abs(amount):,.2f}"
    return f"{sign}${text}" if unit == "USD" else f"{sign}{text} {unit}"


# -- wording shared by the command and the digest --------------------------------------------------


def summary(report: CostReport) -> str:
    """The month's figure against its comparison, and the projection, in one plain line."""
    unit = report.unit
    if report.to_date and report.through is None:
        return (
            f"no full day of {month_name(report.month)} yet · {report.before_label}: {money(report.before or 0, unit)}"
        )
    if report.to_date and report.through is not None:
        head = f"month to date (to {report.through:%b} {report.through.day}) {money(report.total, unit)}"
    else:
        head = f"{month_name(report.month)} {money(report.total, unit)}"
    if report.before is not None:
        head += f" · {report.before_label} {money(report.before, unit)}{change_text(report.total, report.before)}"
    if report.projection is not None:
        head += f" · projected {money(report.projection, unit)} by month end"
    return head


def change_text(now: float, before: float | None) -> str:
    """`` (+52 %)`` — the change from ``before``; `` (new)`` from nothing; empty when not compared."""
    if before is None:
        return ""
    if before <= 0:
        return " (new)" if round(now, 2) > 0 else ""
    return f" ({(now - before) / before * 100:+.0f} %)"


def anomaly_text(item: Anomaly, unit: str = "USD") -> str:
    """``Cost anomaly on Thu Nov 12: $10.75, 6.1x the mean of the 7 days before ($1.75/day)``."""
    ratio = f"{item.ratio:.1f}x" if item.ratio is not None else f"over {ANOMALY_RATIO:g}x"
    return (
        f"Cost anomaly on {item.day:%a %b} {item.day.day}: {money(item.amount, unit)}, {ratio} the mean of the "
        f"{TRAILING_DAYS} days before ({money(item.mean, unit)}/day)"
    )


# -- the digest ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostStanding:
    """One service's month to date for a digest, or why it could not be read; ``anomalies`` are those of
    the digest's period only."""

    service: str
    report: CostReport | None
    problem: str = ""
    anomalies: list[Anomaly] = field(default_factory=list)


async def cost_standings(inventory: Inventory, owner: object, *, now: datetime, since: date) -> list[CostStanding]:
    """Every service with a ``cost:`` section, read concurrently (each within its own timeout, from the
    bot's cache of the day when it has the answer); anomalies on days from ``since`` on."""
    now = now.astimezone(UTC)

    async def one(name: str) -> CostStanding:
        settings = cost_settings(inventory, name)
        try:
            report = await read_costs(name, settings, month=_first(now.date()), now=now, cache=cost_cache_for(owner))
        except CostError as exc:
            return CostStanding(name, None, exc.message)
        return CostStanding(name, report, "", [a for a in report.anomalies if a.day >= since])

    return list(await asyncio.gather(*(one(name) for name in cost_services(inventory))))
