"""Lambda figures for `/ops status` from CloudWatch GetMetricData.

moto in server mode serves GetMetricData for Sum and Maximum, but it emits no Lambda metrics of its
own and computes no percentiles: the tests write the datapoints with ``put_metric_data`` and check
what the source derives from them. moto answers 500 to a ``p95`` query over a period that has data
(moto 5.2: its statistics return None for extended statistics, which it then fails to format), so in
the moto tests the function has no Duration datapoints (the p95 query comes back empty, as it would for
a function never invoked), and the p95 path (request and parsing of the value) is tested against a
real boto3 client with botocore's Stubber answering what CloudWatch documents.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.stub import Stubber  # type: ignore[import-untyped]

from services.figures.base import FigureError, Measurement, Window
from services.figures.cloudwatch import NO_DATA, LambdaFigures
from services.inventory import CloudRunComponent, LambdaComponent
from tests.fixtures.aws import FAKE_SECRET_ACCESS_KEY, aws_client

NOW = datetime.now(UTC).replace(second=0, microsecond=0)
HOUR = Window(NOW, timedelta(hours=1))


def component(function: str, endpoint: str | None = None, alias: str = "live") -> LambdaComponent:
    return LambdaComponent.model_validate(
        {"type": "lambda", "function": function, "alias": alias, "region": "us-east-1", "endpoint_url": endpoint}
    )


def by_name(figures: list[Measurement]) -> dict[str, Measurement]:
    return {figure.name: figure for figure in figures}


@pytest.fixture
def cloudwatch(moto_endpoint: str) -> Iterator[Any]:
    """A boto3 CloudWatch client on moto, for writing datapoints."""
    client = aws_client("cloudwatch", moto_endpoint)
    yield client
    client.close()


@pytest.fixture
async def source() -> AsyncIterator[LambdaFigures]:
    async with LambdaFigures() as figures:
        yield figures


def put(client: Any, metric: str, dimensions: dict[str, str], points: list[tuple[datetime, float]]) -> None:
    client.put_metric_data(
        Namespace="AWS/Lambda",
        MetricData=[
            {
                "MetricName": metric,
                "Dimensions": [{"Name": k, "Value": v} for k, v in dimensions.items()],
                "Timestamp": at,
                "Value": value,
                "Unit": "Count",
            }
            for at, value in points
        ],
    )


def ago(minutes: float) -> datetime:
    return NOW - timedelta(minutes=minutes)


async def test_counts_error_rate_and_concurrency_with_trend(
    moto_endpoint: str, cloudwatch: Any, source: LambdaFigures
) -> None:
    name = f"work-{uuid.uuid4().hex[:8]}"
    alias = {"FunctionName": name, "Resource": f"{name}:live"}
    put(cloudwatch, "Invocations", alias, [(ago(5), 120), (ago(25), 80), (ago(59), 200)])  # 400 this hour
    put(cloudwatch, "Errors", alias, [(ago(5), 6), (ago(40), 14)])  # 20: 5 %
    put(cloudwatch, "Throttles", alias, [(ago(10), 3)])
    put(cloudwatch, "ConcurrentExecutions", {"FunctionName": name}, [(ago(5), 4), (ago(30), 9), (ago(50), 2)])
    put(cloudwatch, "Invocations", alias, [(ago(70), 100), (ago(110), 100)])  # 200 the hour before
    put(cloudwatch, "Errors", alias, [(ago(70), 2)])  # 1 %
    put(cloudwatch, "ConcurrentExecutions", {"FunctionName": name}, [(ago(90), 3)])
    # Invocations through another alias and another function's own: neither may count.
    put(cloudwatch, "Invocations", {"FunctionName": name, "Resource": f"{name}:canary"}, [(ago(5), 5000)])
    put(cloudwatch, "Errors", {"FunctionName": name, "Resource": f"{name}:canary"}, [(ago(5), 5000)])
    put(cloudwatch, "ConcurrentExecutions", {"FunctionName": f"{name}-other"}, [(ago(5), 900)])

    figures = by_name(await source.measure(component(name, moto_endpoint), HOUR, timeout=10.0))

    expected = {
        "invocations": (400, 200, "count"),
        "errors": (20, 2, "count"),
        "error_rate_pct": (5.0, 1.0, "%"),
        "throttles": (3, 0, "count"),  # none the hour before, while invoked: zero, not unknown
        "concurrent_executions": (9, 3, "count"),
    }
    for key, (value, previous, unit) in expected.items():
        assert figures[key].value == pytest.approx(value), key
        assert figures[key].previous == pytest.approx(previous), key
        assert figures[key].unit == unit, key
        assert figures[key].note == "", key
    # No Duration datapoints (see the module docstring): the p95 is unknown and says so.
    assert figures["latency_p95_ms"].value is None
    assert figures["latency_p95_ms"].note == NO_DATA


async def test_a_function_without_datapoints_is_unknown_not_zero(moto_endpoint: str, source: LambdaFigures) -> None:
    figures = by_name(
        await source.measure(component(f"idle-{uuid.uuid4().hex[:8]}", moto_endpoint), HOUR, timeout=10.0)
    )

    for key in ("invocations", "errors", "error_rate_pct", "throttles", "latency_p95_ms", "concurrent_executions"):
        assert figures[key].value is None, key
        assert figures[key].previous is None, key
        assert figures[key].note == NO_DATA, key


async def test_zero_invocations_give_no_error_rate(moto_endpoint: str, cloudwatch: Any, source: LambdaFigures) -> None:
    name = f"quiet-{uuid.uuid4().hex[:8]}"
    put(cloudwatch, "Invocations", {"FunctionName": name, "Resource": f"{name}:live"}, [(ago(3), 0)])

    figures = by_name(await source.measure(component(name, moto_endpoint), HOUR, timeout=10.0))

    assert figures["invocations"].value == 0
    assert figures["errors"].value == 0
    assert figures["error_rate_pct"].value is None
    assert figures["error_rate_pct"].note == "no invocations in the window"


# --- the p95 path and errors, with botocore's Stubber on a real client ---------------------------------


@pytest.fixture
def stubbed() -> Iterator[tuple[Any, Stubber]]:
    client = aws_client("cloudwatch", "http://127.0.0.1:9")  # never reached: the Stubber answers
    with Stubber(client) as stubber:
        yield client, stubber
    client.close()


def answer(values: dict[str, list[float]]) -> dict[str, Any]:
    return {
        "MetricDataResults": [
            {
                "Id": key,
                "Label": key,
                "Timestamps": [NOW - timedelta(hours=1)] * len(v),
                "Values": v,
                "StatusCode": "Complete",
            }
            for key, v in values.items()
        ],
        "Messages": [],
    }


async def test_duration_p95_is_asked_for_the_alias_and_read(stubbed: tuple[Any, Stubber]) -> None:
    client, stubber = stubbed
    name = "work-log"
    seen: list[dict[str, Any]] = []
    client.meta.events.register(
        "provide-client-params.cloudwatch.GetMetricData", lambda params, **_: seen.append(params)
    )
    # The two windows run concurrently, so either call may come first: both answers carry the same p95s
    # for the current and previous window, told apart by their invocations.
    stubber.add_response("get_metric_data", answer({"invocations": [50], "duration": [812.5], "concurrency": [3]}))
    stubber.add_response("get_metric_data", answer({"invocations": [50], "duration": [812.5], "concurrency": [3]}))

    async with LambdaFigures(client_factory=lambda _: client) as source:
        figures = by_name(await source.measure(component(name), HOUR, timeout=5.0))

    assert figures["latency_p95_ms"].value == pytest.approx(812.5)
    assert figures["latency_p95_ms"].previous == pytest.approx(812.5)
    assert figures["latency_p95_ms"].unit == "ms"
    stubber.assert_no_pending_responses()
    assert len(seen) == 2
    windows = sorted((params["StartTime"], params["EndTime"]) for params in seen)
    assert windows == [(HOUR.previous.start, HOUR.previous.end), (HOUR.start, HOUR.end)]
    queries = {query["Id"]: query["MetricStat"] for query in seen[0]["MetricDataQueries"]}
    assert queries["duration"]["Stat"] == "p95"
    assert queries["duration"]["Period"] == 3600
    assert queries["duration"]["Metric"] == {
        "Namespace": "AWS/Lambda",
        "MetricName": "Duration",
        "Dimensions": [{"Name": "FunctionName", "Value": name}, {"Name": "Resource", "Value": f"{name}:live"}],
    }
    assert {key: (stat["Metric"]["MetricName"], stat["Stat"]) for key, stat in queries.items()} == {
        "invocations": ("Invocations", "Sum"),
        "errors": ("Errors", "Sum"),
        "throttles": ("Throttles", "Sum"),
        "duration": ("Duration", "p95"),
        "concurrency": ("ConcurrentExecutions", "Maximum"),
    }
    assert queries["concurrency"]["Metric"]["Dimensions"] == [{"Name": "FunctionName", "Value": name}]


async def test_pages_are_followed(stubbed: tuple[Any, Stubber]) -> None:
    client, stubber = stubbed
    for _ in range(2):  # each window: a first page with a NextToken, then the rest
        first = answer({"invocations": [30]})
        first["NextToken"] = "page-2"
        stubber.add_response("get_metric_data", first)
        stubber.add_response("get_metric_data", answer({"invocations": [12]}))

    async with LambdaFigures(client_factory=lambda _: client) as source:
        figures = by_name(await source.measure(component("paged"), HOUR, timeout=5.0))

    assert figures["invocations"].value == 42
    stubber.assert_no_pending_responses()


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("AccessDenied", 403, "CloudWatch refused: access denied (cloudwatch:GetMetricData) reading Lambda function f"),
        ("Throttling", 400, "CloudWatch is rate-limiting the bot (cloudwatch:GetMetricData quota)"),
        ("InvalidClientTokenId", 403, "AWS refused the bot's credentials (InvalidClientTokenId)"),
    ],
)
async def test_api_errors_are_one_plain_sentence(
    stubbed: tuple[Any, Stubber], code: str, status: int, expected: str
) -> None:
    client, stubber = stubbed
    for _ in range(2):
        stubber.add_client_error(
            "get_metric_data", service_error_code=code, service_message=f"secret {FAKE_SECRET_ACCESS_KEY}",
            http_status_code=status,
        )  # fmt: skip

    async with LambdaFigures(client_factory=lambda _: client) as source:
        with pytest.raises(FigureError) as caught:
            await source.measure(component("f"), HOUR, timeout=5.0)

    assert caught.value.message.startswith(expected), caught.value.message
    assert FAKE_SECRET_ACCESS_KEY not in caught.value.message  # AWS's own text is never passed on


async def test_a_hanging_endpoint_is_cut_off_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAHANGTEST0000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_ACCESS_KEY)
    accepted: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # keep the connection open and say nothing

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        async with LambdaFigures() as source:
            started = loop.time()
            with pytest.raises(FigureError, match=r"did not answer within 0\.5 s for Lambda function hung"):
                await source.measure(component("hung", f"http://127.0.0.1:{port}"), HOUR, timeout=0.5)
            assert loop.time() - started < 2.0
        assert accepted, "the source never connected: the timeout was not what stopped it"
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_bad_requests_are_refused_before_any_call(stubbed: tuple[Any, Stubber]) -> None:
    client, _ = stubbed  # no response queued: any call would fail the test with a StubResponseError
    async with LambdaFigures(client_factory=lambda _: client) as source:
        with pytest.raises(FigureError, match="at least one minute"):
            await source.measure(component("f"), Window(NOW, timedelta(seconds=20)), timeout=5.0)
        run = CloudRunComponent(type="cloudrun", project="demo-project", region="asia-northeast3", service="shop")
        with pytest.raises(FigureError, match="no Lambda figures for a cloudrun component"):
            await source.measure(run, HOUR, timeout=5.0)
