"""Cloud Run and Cloud SQL figures for `/ops status`, read with the real google-cloud-monitoring async
client from a grpc.aio fake of ``google.monitoring.v3.MetricService`` on loopback.

The fake aggregates as Cloud Monitoring does (alignment periods, per-series aligners, cross-series
reducers, distributions added bucket by bucket) and refuses aligners and reducers that do not fit the
metric's kind and value type, so the queries the source sends are checked on every call, and the
figures below are computed by hand from the points written.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.cloud import monitoring_v3

from services.figures.base import FigureError, Measurement, Window
from services.figures.cloud_monitoring import (
    CPU_UTILIZATIONS,
    INSTANCE_COUNT,
    MEMORY_UTILIZATIONS,
    NO_DATA,
    REQUEST_COUNT,
    REQUEST_LATENCIES,
    SQL_CONNECTIONS,
    SQL_CPU,
    SQL_DISK_QUOTA,
    SQL_DISK_USED,
    SQL_MEMORY,
    SQL_POSTGRES_BACKENDS,
    CloudMonitoringFigures,
)
from services.inventory import CloudRunComponent, CloudSqlComponent, LambdaComponent
from tests.fixtures.monitoring import FakeMonitoring, explicit, exponential, linear, start_monitoring_fake

END = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
HOUR = Window(END, timedelta(hours=1))
REGION = "asia-northeast3"
GIB = 2**30
MIB = 2**20
Aligner = monitoring_v3.Aggregation.Aligner
Reducer = monitoring_v3.Aggregation.Reducer


def revision(name: str, *, service: str = "shop", region: str = REGION) -> dict[str, str]:
    return {
        "project_id": "demo-project",
        "service_name": service,
        "revision_name": name,
        "configuration_name": service,
        "location": region,
    }


def database(instance: str = "main-db") -> dict[str, str]:
    return {"project_id": "demo-project", "database_id": f"demo-project:{instance}", "region": REGION}


def minutes(window: Window, values: list[Any]) -> list[tuple[datetime, Any]]:
    """One point per minute of the window, newest first: ``values[k]`` ends k minutes and 30 s before its end."""
    return [(window.end - timedelta(minutes=k, seconds=30), value) for k, value in enumerate(values)]


def each_minute(window: Window, value: Any, count: int = 60) -> list[tuple[datetime, Any]]:
    return minutes(window, [value] * count)


def run_component(service: str = "shop") -> CloudRunComponent:
    return CloudRunComponent(type="cloudrun", project="demo-project", region=REGION, service=service)


def sql_component(instance: str = "main-db") -> CloudSqlComponent:
    return CloudSqlComponent(type="cloudsql", project="demo-project", instance=instance)


def by_name(figures: list[Measurement]) -> dict[str, Measurement]:
    names = [figure.name for figure in figures]
    assert len(names) == len(set(names)), f"a figure is given twice: {names}"
    return {figure.name: figure for figure in figures}


@pytest.fixture
async def fake() -> AsyncIterator[FakeMonitoring]:
    server = await start_monitoring_fake()
    yield server
    await server.close()


@pytest.fixture
async def source(fake: FakeMonitoring) -> AsyncIterator[CloudMonitoringFigures]:
    async with CloudMonitoringFigures(channel_factory=fake.channel) as figures:
        yield figures


# --- Cloud Run -----------------------------------------------------------------------------------------


def busy_shop(fake: FakeMonitoring) -> None:
    """shop in asia-northeast3: two revisions; the same names elsewhere must not count."""
    a, b = revision("shop-00001-abc"), revision("shop-00002-def")
    before = HOUR.previous
    # Requests: this hour 850 x 2xx, 100 x 4xx, 50 x 5xx (5 %); the hour before 490 x 2xx, 10 x 5xx (2 %).
    fake.add(REQUEST_COUNT, a, each_minute(HOUR, 10), labels={"response_code_class": "2xx", "response_code": "200"})
    fake.add(REQUEST_COUNT, b, each_minute(HOUR, 5, 50), labels={"response_code_class": "2xx", "response_code": "200"})
    fake.add(REQUEST_COUNT, b, each_minute(HOUR, 2, 50), labels={"response_code_class": "4xx", "response_code": "404"})
    fake.add(REQUEST_COUNT, a, each_minute(HOUR, 1, 50), labels={"response_code_class": "5xx", "response_code": "503"})
    fake.add(
        REQUEST_COUNT, a, each_minute(before, 10, 49), labels={"response_code_class": "2xx", "response_code": "200"}
    )
    fake.add(
        REQUEST_COUNT, b, each_minute(before, 1, 10), labels={"response_code_class": "5xx", "response_code": "500"}
    )

    # Latencies (exponential buckets 1, 2, 4, … ms): this hour 50 in [64, 128), 45 in [128, 256),
    # 5 in [512, 1024), spread over revisions and minutes; the hour before 100 in [32, 64).
    def latency(bucket: int, count: int) -> Any:
        counts = [0] * 14
        counts[bucket] = count
        return exponential(counts)

    fake.add(REQUEST_LATENCIES, a, minutes(HOUR, [latency(7, 10)] * 5))
    fake.add(REQUEST_LATENCIES, b, minutes(HOUR, [latency(8, 45), latency(10, 5)]))
    fake.add(REQUEST_LATENCIES, a, minutes(before, [latency(6, 50), latency(6, 50)]))
    # Instances: 2 active on a and 1 on b every minute; at minute 40, 3 active on b and 1 idle on a.
    fake.add(INSTANCE_COUNT, a, each_minute(HOUR, 2), labels={"state": "active"})
    fake.add(INSTANCE_COUNT, b, minutes(HOUR, [1] * 40 + [3] + [1] * 19), labels={"state": "active"})
    fake.add(INSTANCE_COUNT, a, minutes(HOUR, [0] * 40 + [1]), labels={"state": "idle"})
    fake.add(INSTANCE_COUNT, a, each_minute(before, 1), labels={"state": "active"})

    # CPU (linear buckets of 0.1): 80 samples in [0.2, 0.3), 20 in [0.8, 0.9); before: 100 in [0.2, 0.3).
    def cpu(bucket: int, count: int) -> Any:
        counts = [0] * 12
        counts[bucket] = count
        return linear(counts, offset=0.0, width=0.1)

    fake.add(CPU_UTILIZATIONS, a, minutes(HOUR, [cpu(3, 40), cpu(3, 40)]))
    fake.add(CPU_UTILIZATIONS, b, minutes(HOUR, [cpu(9, 20)]))
    fake.add(CPU_UTILIZATIONS, a, minutes(before, [cpu(3, 100)]))
    # Memory (explicit bounds 0, .25, .5, .75, 1): 10 samples in [0.5, 0.75); nothing the hour before.
    fake.add(MEMORY_UTILIZATIONS, b, minutes(HOUR, [explicit([0, 0.25, 0.5, 0.75, 1.0], [0, 0, 0, 10, 0, 0])]))
    # The same service name in another region, and another service here: neither may count.
    elsewhere, other = revision("shop-00009-zzz", region="europe-west1"), revision("other-1", service="other")
    for labels in (elsewhere, other):
        fake.add(REQUEST_COUNT, labels, each_minute(HOUR, 1000), labels={"response_code_class": "5xx"})
        fake.add(REQUEST_LATENCIES, labels, minutes(HOUR, [latency(13, 1000)]))
        fake.add(INSTANCE_COUNT, labels, each_minute(HOUR, 50), labels={"state": "active"})


async def test_cloudrun_figures_and_trends_over_the_window(
    fake: FakeMonitoring, source: CloudMonitoringFigures
) -> None:
    busy_shop(fake)
    fake.page_size_cap = 2  # three response classes come back on two pages

    figures = by_name(await source.measure(run_component(), HOUR, timeout=5.0))

    assert list(figures) == [
        "requests", "error_rate_pct", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms",
        "instances", "cpu_p95_pct", "memory_p95_pct",
    ]  # fmt: skip
    expected = {
        "requests": (1000, 500, "count"),
        "error_rate_pct": (5.0, 2.0, "%"),
        "latency_p50_ms": (128.0, 48.0, "ms"),  # 50th of 100 is the last in [64, 128); before: mid [32, 64)
        "latency_p95_ms": (256.0, 62.4, "ms"),
        "latency_p99_ms": (921.6, 63.68, "ms"),  # 4th of the 5 in [512, 1024): 512 + 512 x 4/5
        "instances": (6, 1, "count"),  # minute 40: 2 + 3 active, 1 idle
        "cpu_p95_pct": (87.5, 29.5, "%"),  # 15th of the 20 in [0.8, 0.9)
        "memory_p95_pct": (73.75, None, "%"),
    }
    for name, (value, previous, unit) in expected.items():
        figure = figures[name]
        assert figure.value == pytest.approx(value), name
        assert figure.previous == (pytest.approx(previous) if previous is not None else None), name
        assert figure.unit == unit, name
        assert figure.note == "", name


async def test_cloudrun_queries_name_the_service_region_metric_and_aggregation(
    fake: FakeMonitoring, source: CloudMonitoringFigures
) -> None:
    busy_shop(fake)
    await source.measure(run_component(), HOUR, timeout=5.0)

    for metric, aligner, reducer, group_by, period in (
        (REQUEST_COUNT, Aligner.ALIGN_DELTA, Reducer.REDUCE_SUM, ["metric.label.response_code_class"], 3600),
        (REQUEST_LATENCIES, Aligner.ALIGN_DELTA, Reducer.REDUCE_SUM, [], 3600),
        (INSTANCE_COUNT, Aligner.ALIGN_MAX, Reducer.REDUCE_SUM, [], 60),
        (CPU_UTILIZATIONS, Aligner.ALIGN_DELTA, Reducer.REDUCE_SUM, [], 3600),
        (MEMORY_UTILIZATIONS, Aligner.ALIGN_DELTA, Reducer.REDUCE_SUM, [], 3600),
    ):
        calls = fake.calls(metric)
        first_pages = [call for call in calls if not call.page_token]
        assert len(first_pages) == 2, f"{metric}: one read per window, got {len(first_pages)}"
        intervals = sorted((call.interval.start_time, call.interval.end_time) for call in first_pages)
        assert intervals == [(HOUR.previous.start, HOUR.previous.end), (HOUR.start, HOUR.end)], metric
        for call in calls:
            assert call.name == "projects/demo-project"
            assert 'resource.type = "cloud_run_revision"' in call.filter
            assert 'resource.labels.service_name = "shop"' in call.filter
            assert f'resource.labels.location = "{REGION}"' in call.filter
            assert call.aggregation.per_series_aligner == aligner, metric
            assert call.aggregation.cross_series_reducer == reducer, metric
            assert list(call.aggregation.group_by_fields) == group_by, metric
            assert call.aggregation.alignment_period == timedelta(seconds=period), metric
    assert len(fake.calls()) == len(fake.calls(REQUEST_COUNT)) + 8  # only the paged request count read twice


async def test_a_week_is_read_in_steps_of_whole_minutes(fake: FakeMonitoring, source: CloudMonitoringFigures) -> None:
    week = Window(END, timedelta(days=7))
    fake.add(INSTANCE_COUNT, revision("shop-00001-abc"), [(END - timedelta(days=3), 4), (END - timedelta(days=9), 2)])

    figures = by_name(await source.measure(run_component(), week, timeout=5.0))

    assert (figures["instances"].value, figures["instances"].previous) == (4, 2)
    periods = {call.aggregation.alignment_period for call in fake.calls(INSTANCE_COUNT)}
    assert periods == {timedelta(minutes=101)}  # 10,080 minutes in about a hundred steps


async def test_missing_data_is_none_with_a_note(fake: FakeMonitoring, source: CloudMonitoringFigures) -> None:
    """A service nobody called this hour: instances exist, nothing else was recorded."""
    fake.add(INSTANCE_COUNT, revision("quiet-1", service="quiet"), each_minute(HOUR, 1), labels={"state": "idle"})

    figures = by_name(await source.measure(run_component("quiet"), HOUR, timeout=5.0))

    assert figures["instances"].value == 1
    assert figures["instances"].previous is None
    for name in ("requests", "error_rate_pct", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms",
                 "cpu_p95_pct", "memory_p95_pct"):  # fmt: skip
        assert figures[name].value is None, name
        assert figures[name].previous is None, name
        assert figures[name].note == NO_DATA, name


async def test_zero_requests_give_no_error_rate(fake: FakeMonitoring, source: CloudMonitoringFigures) -> None:
    fake.add(REQUEST_COUNT, revision("shop-1"), each_minute(HOUR, 0, 5), labels={"response_code_class": "2xx"})

    figures = by_name(await source.measure(run_component(), HOUR, timeout=5.0))

    assert figures["requests"].value == 0
    assert figures["error_rate_pct"].value is None
    assert figures["error_rate_pct"].note == "no requests in the window"


async def test_latency_beyond_the_last_bucket_is_a_lower_bound(
    fake: FakeMonitoring, source: CloudMonitoringFigures
) -> None:
    counts = [0] * 6  # finite buckets up to 16 ms, then overflow
    counts[5] = 10
    counts[3] = 90
    fake.add(REQUEST_LATENCIES, revision("shop-1"), minutes(HOUR, [exponential(counts)]))

    figures = by_name(await source.measure(run_component(), HOUR, timeout=5.0))

    assert figures["latency_p50_ms"].value == pytest.approx(4 + 4 * 50 / 90)
    assert figures["latency_p50_ms"].note == ""
    assert figures["latency_p99_ms"].value == 16.0
    assert "at least" in figures["latency_p99_ms"].note


# --- Cloud SQL -----------------------------------------------------------------------------------------


async def test_cloudsql_figures_and_trends(fake: FakeMonitoring, source: CloudMonitoringFigures) -> None:
    db, before = database(), HOUR.previous
    fake.add(SQL_POSTGRES_BACKENDS, db, minutes(HOUR, [10] * 20 + [25] + [10] * 39), labels={"database": "app"})
    fake.add(SQL_POSTGRES_BACKENDS, db, each_minute(HOUR, 2), labels={"database": "postgres"})
    fake.add(SQL_POSTGRES_BACKENDS, db, each_minute(before, 5), labels={"database": "app"})
    fake.add(SQL_CPU, db, minutes(HOUR, [0.01 * (k + 1) for k in range(60)]))  # 1 % … 60 %
    fake.add(SQL_CPU, db, each_minute(before, 0.2))
    fake.add(SQL_MEMORY, db, each_minute(HOUR, 0.5))
    fake.add(SQL_MEMORY, db, each_minute(before, 0.4))
    fake.add(SQL_DISK_USED, db, minutes(HOUR, [10 * GIB - k * MIB for k in range(60)]))  # grows to 10 GiB
    fake.add(SQL_DISK_USED, db, minutes(before, [9 * GIB] * 60))
    fake.add(SQL_DISK_QUOTA, db, each_minute(HOUR, 20 * GIB))
    fake.add(SQL_DISK_QUOTA, db, each_minute(before, 20 * GIB))
    other = database("other-db")  # another instance of the project must not count
    fake.add(SQL_POSTGRES_BACKENDS, other, each_minute(HOUR, 500), labels={"database": "app"})
    fake.add(SQL_CPU, other, each_minute(HOUR, 0.99))

    figures = by_name(await source.measure(sql_component(), HOUR, timeout=5.0))

    expected = {
        "connections": (27, 5, "count"),  # minute 20: 25 + 2
        "cpu_p95_pct": (57.05, 20.0, "%"),  # 95th percentile of 60 per-minute means, interpolated
        "memory_p95_pct": (50.0, 40.0, "%"),
        "disk_used_bytes": (10 * GIB, 9 * GIB, "bytes"),  # the newest minute, not the largest
        "disk_size_bytes": (20 * GIB, 20 * GIB, "bytes"),
        "disk_used_pct": (50.0, 45.0, "%"),
    }
    assert list(figures) == list(expected)
    for name, (value, previous, unit) in expected.items():
        figure = figures[name]
        assert figure.value == pytest.approx(value), name
        assert figure.previous == pytest.approx(previous), name
        assert figure.unit == unit, name
    for call in fake.calls():
        assert 'resource.type = "cloudsql_database"' in call.filter
        assert 'resource.labels.database_id = "demo-project:main-db"' in call.filter
        assert call.aggregation.alignment_period == timedelta(minutes=1)


async def test_mysql_connections_come_from_network_connections(
    fake: FakeMonitoring, source: CloudMonitoringFigures
) -> None:
    fake.add(SQL_CONNECTIONS, database(), minutes(HOUR, [12, 30, 7]))

    figures = by_name(await source.measure(sql_component(), HOUR, timeout=5.0))

    assert figures["connections"].value == 30
    assert figures["disk_used_pct"].value is None
    assert figures["disk_used_pct"].note == NO_DATA


# --- failures ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (
            grpc.StatusCode.PERMISSION_DENIED,
            "Permission monitoring.timeSeries.list denied (or the resource may not exist).",
            "Cloud Monitoring refused: permission denied (monitoring.timeSeries.list on project demo-project",
        ),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Quota exceeded for quota metric 'Time series queries' of service 'monitoring.googleapis.com'.",
            "Cloud Monitoring quota exceeded for project demo-project",
        ),
        (grpc.StatusCode.UNAVAILABLE, "The service is currently unavailable.", "Could not reach Cloud Monitoring"),
        (grpc.StatusCode.UNAUTHENTICATED, "Request had invalid authentication credentials.", "not authenticated"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline exceeded.", "did not answer in time"),
    ],
)
async def test_api_errors_are_one_plain_sentence(
    fake: FakeMonitoring, source: CloudMonitoringFigures, code: grpc.StatusCode, message: str, expected: str
) -> None:
    busy_shop(fake)
    fake.fail_next = [(code, message)]

    with pytest.raises(FigureError) as caught:
        await source.measure(run_component(), HOUR, timeout=5.0)

    assert caught.value.message.startswith(expected) or expected in caught.value.message, caught.value.message
    assert caught.value.message.endswith(".")
    assert "\n" not in caught.value.message


async def test_a_hanging_api_is_cut_off_at_the_timeout(fake: FakeMonitoring, source: CloudMonitoringFigures) -> None:
    fake.hang = True
    loop = asyncio.get_running_loop()
    started = loop.time()

    with pytest.raises(FigureError, match=r"did not answer within 0\.5 s for Cloud SQL instance main-db"):
        await source.measure(sql_component(), HOUR, timeout=0.5)

    assert loop.time() - started < 2.0
    assert fake.requests, "the fake never saw a request: the timeout was not what stopped it"


async def test_the_source_works_again_after_a_failure(fake: FakeMonitoring, source: CloudMonitoringFigures) -> None:
    fake.fail_next = [(grpc.StatusCode.UNAVAILABLE, "try again")]
    with pytest.raises(FigureError):
        await source.measure(sql_component(), HOUR, timeout=5.0)
    fake.add(SQL_CPU, database(), each_minute(HOUR, 0.3))

    figures = by_name(await source.measure(sql_component(), HOUR, timeout=5.0))

    assert figures["cpu_p95_pct"].value == pytest.approx(30.0)


async def test_bad_requests_are_refused_before_any_call(fake: FakeMonitoring, source: CloudMonitoringFigures) -> None:
    with pytest.raises(FigureError, match="at least one minute"):
        await source.measure(run_component(), Window(END, timedelta(seconds=30)), timeout=5.0)
    lambda_component = LambdaComponent(type="lambda", function="work")
    with pytest.raises(FigureError, match="no figures for a lambda component"):
        await source.measure(lambda_component, HOUR, timeout=5.0)
    assert fake.requests == []


@pytest.fixture
def no_google_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[None]:
    """No ADC anywhere: no variable, no gcloud config, no metadata server."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    yield


async def test_missing_google_credentials_are_named_plainly(no_google_credentials: None) -> None:
    async with CloudMonitoringFigures() as source:
        with pytest.raises(FigureError, match="no usable Google credentials to read Cloud Monitoring for Cloud Run"):
            await source.measure(run_component(), HOUR, timeout=5.0)
