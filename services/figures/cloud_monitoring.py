"""Figures of Cloud Run services and Cloud SQL instances from Cloud Monitoring (`/ops status`).

Every figure is one ``ListTimeSeries`` call per window (the window asked for and the one before it,
for the trend), with the aggregation done by Cloud Monitoring so that only a few points travel:

- counts (``run.googleapis.com/request_count``): ALIGN_DELTA over the whole window, REDUCE_SUM
  grouped by ``response_code_class`` — one number per class;
- distributions (``request_latencies``, ``container/cpu/utilizations``, ``container/memory/utilizations``):
  ALIGN_DELTA over the whole window, REDUCE_SUM — one merged histogram of the window, from which
  p50/p95/p99 are read by interpolating inside its buckets, as Cloud Monitoring's own percentile
  aligners do. One call gives all three percentiles instead of one call per percentile;
- gauges (instance count, Cloud SQL CPU, memory, connections, disk): ALIGN_MEAN or ALIGN_MAX per
  step of about a hundredth of the window (never under Cloud Monitoring's 60 s), reduced across
  series, then the peak, the p95 or the latest step is taken here.

It talks to the Cloud Monitoring API v3 through google-cloud-monitoring's async client (gRPC); the
channel is injectable so the tests run the real client against a grpc.aio fake. It needs
``monitoring.timeSeries.list`` on the project (role Monitoring Viewer, ``roles/monitoring.viewer``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

import grpc
import structlog
from google.api_core import exceptions as api_exceptions
from google.cloud import monitoring_v3
from google.cloud.monitoring_v3.services.metric_service.transports.grpc_asyncio import (
    MetricServiceGrpcAsyncIOTransport,
)

from services.failures import network_problem
from services.figures.base import FigureError, Measurement, Window
from services.inventory import CloudRunComponent, CloudSqlComponent, Component

log = structlog.get_logger(__name__)

__all__ = [
    "CPU_UTILIZATIONS",
    "INSTANCE_COUNT",
    "MEMORY_UTILIZATIONS",
    "NO_DATA",
    "PERMISSION",
    "REQUEST_COUNT",
    "REQUEST_LATENCIES",
    "SQL_CONNECTIONS",
    "SQL_CPU",
    "SQL_DISK_QUOTA",
    "SQL_DISK_USED",
    "SQL_MEMORY",
    "SQL_POSTGRES_BACKENDS",
    "CloudMonitoringFigures",
    "plaintext_channel",
]

SCOPE = "https://www.googleapis.com/auth/monitoring.read"
PERMISSION = "monitoring.timeSeries.list"

CLOUD_RUN_RESOURCE = "cloud_run_revision"
REQUEST_COUNT = "run.googleapis.com/request_count"
REQUEST_LATENCIES = "run.googleapis.com/request_latencies"
INSTANCE_COUNT = "run.googleapis.com/container/instance_count"
CPU_UTILIZATIONS = "run.googleapis.com/container/cpu/utilizations"
MEMORY_UTILIZATIONS = "run.googleapis.com/container/memory/utilizations"

CLOUD_SQL_RESOURCE = "cloudsql_database"
SQL_POSTGRES_BACKENDS = "cloudsql.googleapis.com/database/postgresql/num_backends"
SQL_CONNECTIONS = "cloudsql.googleapis.com/database/network/connections"  # MySQL and SQL Server only
SQL_CPU = "cloudsql.googleapis.com/database/cpu/utilization"
SQL_MEMORY = "cloudsql.googleapis.com/database/memory/utilization"
SQL_DISK_USED = "cloudsql.googleapis.com/database/disk/bytes_used"
SQL_DISK_QUOTA = "cloudsql.googleapis.com/database/disk/quota"

MIN_STEP = timedelta(seconds=60)  # Cloud Monitoring's smallest alignment period
STEPS_PER_WINDOW = 100
MAX_SERIES = 500  # series read at most per call; reduced queries answer one or a few
MAX_CALLS_AT_ONCE = 8
NO_DATA = "no data in the window"

T = TypeVar("T")
Aligner = monitoring_v3.Aggregation.Aligner
Reducer = monitoring_v3.Aggregation.Reducer
ChannelFactory = Callable[[], grpc.aio.Channel]


@dataclass(frozen=True)
class _Query:
    """One ListTimeSeries: a metric, its aggregation, and whether it is aligned per step or per window."""

    metric: str
    aligner: Any  # an Aligner member (proto-plus enums are untyped)
    reducer: Any
    group_by: tuple[str, ...] = ()
    per_step: bool = False


@dataclass(frozen=True)
class _Point:
    end: float  # POSIX seconds of the point's end time
    value: Any  # int | float | a google.api.Distribution message


@dataclass(frozen=True)
class _Series:
    metric_labels: dict[str, str]
    points: list[_Point]


def _first_failure(group: BaseExceptionGroup[Any]) -> BaseException:
    """The FigureError inside a (nested) exception group if there is one, else its first exception."""
    leaves: list[BaseException] = []
    todo: list[BaseException] = [group]
    while todo:
        item = todo.pop(0)
        if isinstance(item, BaseExceptionGroup):
            todo.extend(item.exceptions)
        else:
            leaves.append(item)
    return next((leaf for leaf in leaves if isinstance(leaf, FigureError)), leaves[0])


async def _all(*calls: Coroutine[Any, Any, T]) -> list[T]:
    """Run the calls at once; the first failure cancels the others and is raised as it is."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]
    except BaseExceptionGroup as failed:
        raise _first_failure(failed) from None
    return [task.result() for task in tasks]


def _quote(value: str) -> str:
    """A Cloud Monitoring filter string literal (double-quoted, backslash escapes)."""
    return json.dumps(value)


def _step(window: Window) -> timedelta:
    """About a hundredth of the window, in whole minutes, and never under a minute."""
    minutes = max(1, math.ceil(window.length.total_seconds() / 60 / STEPS_PER_WINDOW))
    return max(MIN_STEP, timedelta(minutes=minutes))


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _value(point: Any) -> Any:
    """The point's value as int, float or a Distribution message (None for other kinds)."""
    raw = monitoring_v3.TypedValue.pb(point.value)
    kind = raw.WhichOneof("value")
    if kind == "int64_value":
        return int(raw.int64_value)
    if kind == "double_value":
        return float(raw.double_value)
    if kind == "distribution_value":
        return raw.distribution_value
    return None


# --- distributions ----------------------------------------------------------------------------------


def _bounds(options: Any) -> list[float]:
    """The bucket boundaries b0 < b1 < … of a Distribution's bucket options (finite buckets + 1)."""
    kind = options.WhichOneof("options")
    if kind == "linear_buckets":
        linear = options.linear_buckets
        return [linear.offset + linear.width * i for i in range(linear.num_finite_buckets + 1)]
    if kind == "exponential_buckets":
        exponential = options.exponential_buckets
        return [exponential.scale * exponential.growth_factor**i for i in range(exponential.num_finite_buckets + 1)]
    if kind == "explicit_buckets":
        return list(options.explicit_buckets.bounds)
    return []


def _merge(distributions: Sequence[Any]) -> tuple[list[float], list[int]] | None:
    """Bucket boundaries and summed counts of histograms with the same buckets (the first one's);
    None when there is nothing to merge or no buckets."""
    bounds: list[float] | None = None
    counts: list[int] = []
    for distribution in distributions:
        if distribution.count <= 0:
            continue
        own = _bounds(distribution.bucket_options)
        if not own:
            continue
        if bounds is None:
            bounds = own
            counts = [0] * (len(own) + 1)  # underflow, finite buckets, overflow
        elif own != bounds:
            continue  # a histogram with other buckets cannot be added bucket by bucket; Cloud Run's never differ
        for index, count in enumerate(distribution.bucket_counts):
            if index < len(counts):
                counts[index] += int(count)
    if bounds is None or sum(counts) == 0:
        return None
    return bounds, counts


def _percentile(bounds: list[float], counts: list[int], share: float) -> tuple[float, bool]:
    """The ``share`` quantile, interpolated linearly inside its bucket; True when it falls in the
    overflow bucket, whose upper edge is unknown (the value is then its lower edge: "at least")."""
    total = sum(counts)
    rank = share * total
    seen = 0
    for index, count in enumerate(counts):
        if count == 0 or seen + count < rank:
            seen += count
            continue
        if index > len(bounds) - 1:  # overflow: [b_last, +inf)
            return bounds[-1], True
        if index == 0:  # underflow: (-inf, b0); latencies and utilizations are never negative
            low, high = min(0.0, bounds[0]), bounds[0]
        else:
            low, high = bounds[index - 1], bounds[index]
        return low + (high - low) * (rank - seen) / count, False
    return bounds[-1], True


def _quantile(values: Sequence[float], share: float) -> float:
    """The ``share`` quantile of plain numbers, linearly interpolated between ranks."""
    ordered = sorted(values)
    position = share * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def plaintext_channel(address: str) -> ChannelFactory:
    """Channels to a plaintext gRPC Cloud Monitoring API at ``host:port`` (an emulator, the tests' fake):
    no TLS and no credentials, so nothing secret ever travels to it (``OPSBOT_MONITORING_ENDPOINT``)."""

    def channel() -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(address)

    return channel


# --- the source -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """Where a component's time series are: the project, the filter on its resource, and for messages."""

    project: str
    resource_filter: str
    describe: str
    token: str | None = None


def _target(component: Component) -> _Target:
    if isinstance(component, CloudRunComponent):
        return _Target(
            project=component.project,
            resource_filter=(
                f"resource.type = {_quote(CLOUD_RUN_RESOURCE)}"
                f" AND resource.labels.service_name = {_quote(component.service)}"
                f" AND resource.labels.location = {_quote(component.region)}"
            ),
            describe=f"Cloud Run service {component.service} ({component.project})",
        )
    if isinstance(component, CloudSqlComponent):
        token = component.access_token.get_secret_value() if component.access_token is not None else None
        return _Target(
            project=component.project,
            resource_filter=(
                f"resource.type = {_quote(CLOUD_SQL_RESOURCE)}"
                f" AND resource.labels.database_id = {_quote(f'{component.project}:{component.instance}')}"
            ),
            describe=f"Cloud SQL instance {component.instance} ({component.project})",
            token=token or None,
        )
    raise FigureError(f"Cloud Monitoring has no figures for a {component.type} component.")


class CloudMonitoringFigures:
    """The `cloudrun` and `cloudsql` figure source: reads Cloud Monitoring time series.

    One object serves every component of both types; its clients (one per set of credentials) are
    made on first use and kept until ``close()``.
    """

    kinds = ("cloudrun", "cloudsql")

    def __init__(self, *, channel_factory: ChannelFactory | None = None) -> None:
        self._channel_factory = channel_factory
        self._clients: dict[str, monitoring_v3.MetricServiceAsyncClient] = {}
        self._lock = asyncio.Lock()

    async def measure(
        self,
        component: Component,
        window: Window,
        *,
        timeout: float,  # noqa: ASYNC109  # the FigureSource interface: the caller's bound, applied here
    ) -> list[Measurement]:
        """The component's figures over ``window`` and the window before it, within ``timeout`` seconds."""
        target = _target(component)
        if window.length < MIN_STEP:
            raise FigureError("Cloud Monitoring figures need a window of at least one minute.")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout(timeout):
                client = await self._client(target, timeout)
                reader = _Reader(client, target, deadline)
                if isinstance(component, CloudRunComponent):
                    return await _cloud_run(reader, window)
                return await _cloud_sql(reader, window)
        except TimeoutError:
            raise FigureError(
                f"Cloud Monitoring did not answer within {_seconds(timeout)} for {target.describe}."
            ) from None

    # --- clients ---------------------------------------------------------------------------------

    async def _client(self, target: _Target, limit: float) -> monitoring_v3.MetricServiceAsyncClient:
        """The client for the target's credentials: the injected channel, an access token, or ADC."""
        key = "channel" if self._channel_factory is not None else _credential_key(target.token)
        async with self._lock:
            client = self._clients.get(key)
            if client is None:
                if self._channel_factory is not None:
                    transport = MetricServiceGrpcAsyncIOTransport(channel=self._channel_factory())
                    client = monitoring_v3.MetricServiceAsyncClient(transport=transport)
                else:
                    credentials = await _credentials(target, limit)
                    client = monitoring_v3.MetricServiceAsyncClient(credentials=credentials)
                self._clients[key] = client
            return client

    async def close(self) -> None:
        """Close every client's channel (clients are made again if used afterwards)."""
        async with self._lock:
            clients: list[Any] = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            await client.transport.close()

    async def __aenter__(self) -> CloudMonitoringFigures:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _credential_key(token: str | None) -> str:
    """A dictionary key for a set of credentials that is not the token itself."""
    if token is None:
        return "adc"
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]


async def _credentials(target: _Target, limit: float) -> Any:
    """An access token's credentials, or Application Default Credentials looked up in a thread
    (google-auth blocks). Its messages may quote credential files, so only the kind of failure is told."""
    import google.auth
    import google.auth.exceptions
    from google.oauth2.credentials import Credentials

    if target.token is not None:
        return Credentials(token=target.token)  # type: ignore[no-untyped-call]
    try:
        credentials, _ = await asyncio.wait_for(asyncio.to_thread(google.auth.default, scopes=[SCOPE]), limit)
    except google.auth.exceptions.GoogleAuthError as exc:
        log.warning("google_credentials_failed", source="cloud_monitoring", error=type(exc).__name__)
        raise FigureError(
            f"The bot has no usable Google credentials to read Cloud Monitoring for {target.describe} "
            f"({type(exc).__name__})."
        ) from None
    return credentials


class _Reader:
    """Runs the queries of one measure() against one client, a few at a time, within one deadline."""

    def __init__(self, client: monitoring_v3.MetricServiceAsyncClient, target: _Target, deadline: float) -> None:
        self._client = client
        self._target = target
        self._deadline = deadline
        self._gate = asyncio.Semaphore(MAX_CALLS_AT_ONCE)

    async def both(self, query: _Query, window: Window) -> tuple[list[_Series], list[_Series]]:
        """The query over the window and over the one before it."""
        current, previous = await _all(self.read(query, window), self.read(query, window.previous))
        return current, previous

    async def read(self, query: _Query, window: Window) -> list[_Series]:
        period = _step(window) if query.per_step else window.length
        request = monitoring_v3.ListTimeSeriesRequest(
            name=f"projects/{self._target.project}",
            filter=f"metric.type = {_quote(query.metric)} AND {self._target.resource_filter}",
            interval=monitoring_v3.TimeInterval(start_time=window.start, end_time=window.end),
            aggregation=monitoring_v3.Aggregation(
                alignment_period=period,
                per_series_aligner=query.aligner,
                cross_series_reducer=query.reducer,
                group_by_fields=list(query.group_by),
            ),
            view=monitoring_v3.ListTimeSeriesRequest.TimeSeriesView.FULL,
            page_size=100,
        )
        async with self._gate:
            return await self._call(self._collect(request), query.metric)

    async def _collect(self, request: monitoring_v3.ListTimeSeriesRequest) -> list[_Series]:
        remaining = max(0.05, self._deadline - asyncio.get_running_loop().time())
        # No retries: a status answer is wanted now, and the caller's timeout bounds the whole read.
        pager = await self._client.list_time_series(request=request, retry=None, timeout=remaining)
        found: list[_Series] = []
        async for series in pager:
            points = [_Point(point.interval.end_time.timestamp(), _value(point)) for point in series.points]
            found.append(_Series(dict(series.metric.labels), [p for p in points if p.value is not None]))
            if len(found) >= MAX_SERIES:
                break
        return found

    async def _call(self, call: Awaitable[list[_Series]], metric: str) -> list[_Series]:
        try:
            return await call
        except api_exceptions.GoogleAPIError as exc:
            raise self._failure(exc, metric) from None

    def _failure(self, exc: api_exceptions.GoogleAPIError, metric: str) -> FigureError:
        what = self._target.describe
        project = self._target.project
        log.warning(
            "cloud_monitoring_error", target=what, metric=metric, error=type(exc).__name__,
            code=str(getattr(exc, "grpc_status_code", "")),
        )  # fmt: skip
        if isinstance(exc, api_exceptions.PermissionDenied):
            return FigureError(
                f"Cloud Monitoring refused: permission denied ({PERMISSION} on project {project}, "
                f"role Monitoring Viewer) reading {what}."
            )
        if isinstance(exc, api_exceptions.Unauthenticated):
            return FigureError(f"Cloud Monitoring refused the bot's Google credentials (not authenticated) for {what}.")
        if isinstance(exc, api_exceptions.ResourceExhausted):
            return FigureError(
                f"Cloud Monitoring quota exceeded for project {project} (time series reads); try again in a minute."
            )
        if isinstance(exc, api_exceptions.DeadlineExceeded):
            return FigureError(f"Cloud Monitoring did not answer in time for {what}.")
        if isinstance(exc, api_exceptions.ServiceUnavailable | api_exceptions.RetryError):
            reason = network_problem(exc) or "unavailable"
            return FigureError(f"Could not reach Cloud Monitoring for {what} ({reason}); try again later.")
        if isinstance(exc, api_exceptions.NotFound):
            return FigureError(f"Cloud Monitoring knows no project {project} (or the bot may not see it).")
        if isinstance(exc, api_exceptions.InvalidArgument):
            detail = " ".join(str(getattr(exc, "message", "")).split())[:160]
            return FigureError(
                f"Cloud Monitoring refused the query for {metric.rsplit('/', 1)[-1]} of {what}"
                + (f": {detail}" if detail else ".")
            )
        return FigureError(f"Cloud Monitoring failed ({type(exc).__name__}) for {what}.")


# --- Cloud Run ----------------------------------------------------------------------------------------

_REQUESTS = _Query(REQUEST_COUNT, Aligner.ALIGN_DELTA, Reducer.REDUCE_SUM, ("metric.label.response_code_class",))
_LATENCIES = _Query(REQUEST_LATENCIES, Aligner.ALIGN_DELTA, Reducer.REDUCE_SUM)
_INSTANCES = _Query(INSTANCE_COUNT, Aligner.ALIGN_MAX, Reducer.REDUCE_SUM, per_step=True)
_CPU = _Query(CPU_UTILIZATIONS, Aligner.ALIGN_DELTA, Reducer.REDUCE_SUM)
_MEMORY = _Query(MEMORY_UTILIZATIONS, Aligner.ALIGN_DELTA, Reducer.REDUCE_SUM)


def _requests(series: list[_Series]) -> tuple[float | None, float | None]:
    """Requests in the window and the share answered 5xx, in %; (None, None) without data."""
    if not any(s.points for s in series):
        return None, None
    total = 0.0
    errors = 0.0
    for item in series:
        amount = sum(float(point.value) for point in item.points if isinstance(point.value, int | float))
        total += amount
        if item.metric_labels.get("response_code_class") == "5xx":
            errors += amount
    return total, (100.0 * errors / total if total > 0 else None)


def _histogram(series: list[_Series]) -> tuple[list[float], list[int]] | None:
    return _merge([point.value for item in series for point in item.points if not isinstance(point.value, int | float)])


def _percentiles(series: list[_Series], shares: Sequence[float], scale: float) -> list[tuple[float | None, bool]]:
    histogram = _histogram(series)
    if histogram is None:
        return [(None, False) for _ in shares]
    bounds, counts = histogram
    found: list[tuple[float | None, bool]] = []
    for share in shares:
        value, beyond = _percentile(bounds, counts, share)
        found.append((value * scale, beyond))
    return found


def _peak(series: list[_Series]) -> float | None:
    """The largest per-step value (the steps are already reduced across series)."""
    values = [float(point.value) for item in series for point in item.points if isinstance(point.value, int | float)]
    return max(values) if values else None


async def _cloud_run(reader: _Reader, window: Window) -> list[Measurement]:
    read = await _all(*(reader.both(query, window) for query in (_REQUESTS, _LATENCIES, _INSTANCES, _CPU, _MEMORY)))
    (requests, requests_before), (latencies, latencies_before), (instances, instances_before) = read[:3]
    (cpu, cpu_before), (memory, memory_before) = read[3:]
    count, error_rate = _requests(requests)
    count_before, error_rate_before = _requests(requests_before)
    figures = [
        Measurement("requests", "requests", count, "count", count_before, "" if count is not None else NO_DATA),
        Measurement(
            "error_rate_pct",
            "5xx rate",
            error_rate,
            "%",
            error_rate_before,
            "" if error_rate is not None else ("no requests in the window" if count == 0 else NO_DATA),
        ),
    ]
    shares = (0.5, 0.95, 0.99)
    now = _percentiles(latencies, shares, 1.0)
    before = _percentiles(latencies_before, shares, 1.0)
    for share, (value, beyond), (previous, _) in zip(shares, now, before, strict=True):
        name = f"p{round(share * 100)}"
        note = NO_DATA if value is None else ("at least: beyond the last latency bucket" if beyond else "")
        figures.append(Measurement(f"latency_{name}_ms", f"latency {name}", value, "ms", previous, note))
    peak, peak_before = _peak(instances), _peak(instances_before)
    figures.append(Measurement("instances", "instances (peak)", peak, "count", peak_before, _noted(peak)))
    for name, label, now_series, before_series in (
        ("cpu_p95_pct", "CPU p95", cpu, cpu_before),
        ("memory_p95_pct", "memory p95", memory, memory_before),
    ):
        ((value, _),) = _percentiles(now_series, (0.95,), 100.0)
        ((previous, _),) = _percentiles(before_series, (0.95,), 100.0)
        figures.append(Measurement(name, label, value, "%", previous, _noted(value)))
    return figures


def _noted(value: float | None) -> str:
    return NO_DATA if value is None else ""


# --- Cloud SQL ----------------------------------------------------------------------------------------

_BACKENDS = _Query(SQL_POSTGRES_BACKENDS, Aligner.ALIGN_MEAN, Reducer.REDUCE_SUM, per_step=True)
_CONNECTIONS = _Query(SQL_CONNECTIONS, Aligner.ALIGN_MEAN, Reducer.REDUCE_SUM, per_step=True)
_SQL_CPU = _Query(SQL_CPU, Aligner.ALIGN_MEAN, Reducer.REDUCE_MAX, per_step=True)
_SQL_MEMORY = _Query(SQL_MEMORY, Aligner.ALIGN_MEAN, Reducer.REDUCE_MAX, per_step=True)
_DISK_USED = _Query(SQL_DISK_USED, Aligner.ALIGN_MAX, Reducer.REDUCE_MAX, per_step=True)
_DISK_QUOTA = _Query(SQL_DISK_QUOTA, Aligner.ALIGN_MAX, Reducer.REDUCE_MAX, per_step=True)


def _steps(series: list[_Series]) -> list[float]:
    return [float(point.value) for item in series for point in item.points if isinstance(point.value, int | float)]


def _p95(series: list[_Series], scale: float) -> float | None:
    values = _steps(series)
    return _quantile(values, 0.95) * scale if values else None


def _latest(series: list[_Series]) -> float | None:
    """The value of the newest step (disk use and size: what they are at the end of the window)."""
    points = [point for item in series for point in item.points if isinstance(point.value, int | float)]
    if not points:
        return None
    return float(max(points, key=lambda point: point.end).value)


def _share(used: float | None, size: float | None) -> float | None:
    return 100.0 * used / size if used is not None and size else None


async def _cloud_sql(reader: _Reader, window: Window) -> list[Measurement]:
    # PostgreSQL counts its connections as backends; MySQL and SQL Server as network connections.
    # Both are asked for at once: an instance has data for only one of them.
    queries = (_BACKENDS, _CONNECTIONS, _SQL_CPU, _SQL_MEMORY, _DISK_USED, _DISK_QUOTA)
    read = await _all(*(reader.both(query, window) for query in queries))
    (backends, backends_before), (connections, connections_before), (cpu, cpu_before) = read[:3]
    (memory, memory_before), (used, used_before), (quota, quota_before) = read[3:]
    postgres = any(item.points for item in backends + backends_before)
    peak = _peak(backends if postgres else connections)
    peak_before = _peak(backends_before if postgres else connections_before)
    cpu_p95, cpu_p95_before = _p95(cpu, 100.0), _p95(cpu_before, 100.0)
    memory_p95, memory_p95_before = _p95(memory, 100.0), _p95(memory_before, 100.0)
    disk_used, disk_used_before = _latest(used), _latest(used_before)
    disk_size, disk_size_before = _latest(quota), _latest(quota_before)
    disk_pct, disk_pct_before = _share(disk_used, disk_size), _share(disk_used_before, disk_size_before)
    return [
        Measurement("connections", "connections (peak)", peak, "count", peak_before, _noted(peak)),
        Measurement("cpu_p95_pct", "CPU p95", cpu_p95, "%", cpu_p95_before, _noted(cpu_p95)),
        Measurement("memory_p95_pct", "memory p95", memory_p95, "%", memory_p95_before, _noted(memory_p95)),
        Measurement("disk_used_bytes", "disk used", disk_used, "bytes", disk_used_before, _noted(disk_used)),
        Measurement("disk_size_bytes", "disk size", disk_size, "bytes", disk_size_before, _noted(disk_size)),
        Measurement("disk_used_pct", "disk used", disk_pct, "%", disk_pct_before, _noted(disk_pct)),
    ]
