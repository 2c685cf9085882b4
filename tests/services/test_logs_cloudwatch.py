"""The CloudWatch Logs backend against moto in server mode (Logs Insights and FilterLogEvents), and
against a loopback endpoint answering AWS's error shapes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from services.inventory import LambdaComponent
from services.logs.base import LogError, LogQuery
from services.logs.cloudwatch import CloudWatchLogs, filter_pattern, insights_query
from tests.fixtures.aws import FAKE_SECRET_ACCESS_KEY, aws_client
from tests.fixtures.servers import free_port

NOW = datetime.now(UTC).replace(microsecond=0)
T0 = NOW - timedelta(hours=2)
SECRET = "AKIAIOSFODNN7EXAMPLE wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@dataclass
class Group:
    name: str
    endpoint: str
    client: Any

    def put(self, events: list[tuple[datetime, str]], stream: str = "2025/03/01/[$LATEST]abc") -> None:
        self.client.create_log_stream(logGroupName=self.name, logStreamName=stream)
        ordered = sorted(events, key=lambda event: event[0])
        self.client.put_log_events(
            logGroupName=self.name,
            logStreamName=stream,
            logEvents=[{"timestamp": int(at.timestamp() * 1000), "message": text} for at, text in ordered],
        )

    def component(self) -> LambdaComponent:
        return LambdaComponent(type="lambda", function="worklog", endpoint_url=self.endpoint, log_group=self.name)


@pytest.fixture
def group(moto_endpoint: str) -> Iterator[Group]:
    client = aws_client("logs", moto_endpoint)
    name = f"/aws/lambda/worklog-{uuid.uuid4().hex[:8]}"
    client.create_log_group(logGroupName=name)
    try:
        yield Group(name, moto_endpoint, client)
    finally:
        client.delete_log_group(logGroupName=name)
        client.close()


@pytest.fixture
async def backend() -> AsyncIterator[CloudWatchLogs]:
    async with CloudWatchLogs() as made:
        yield made


def window(*, errors: bool = False, grep: str | None = None, limit: int = 50, hours: int = 2) -> LogQuery:
    return LogQuery(since=T0, until=T0 + timedelta(hours=hours), errors=errors, grep=grep, limit=limit)


def minute(m: int) -> datetime:
    return T0 + timedelta(minutes=m)


async def test_newest_first_and_cursor_to_older_page(group: Group, backend: CloudWatchLogs) -> None:
    group.put([(minute(m), f"INFO request {m}") for m in range(1, 8)])
    first = await backend.read(group.component(), window(limit=3), timeout=10)
    assert [line.text for line in first.lines] == ["INFO request 7", "INFO request 6", "INFO request 5"]
    assert first.lines[0].at == minute(7)
    assert first.lines[0].source == "2025/03/01/[$LATEST]abc"
    assert first.cursor is not None
    second = await backend.read(group.component(), replace(window(limit=3), cursor=first.cursor), timeout=10)
    assert [line.text for line in second.lines] == ["INFO request 4", "INFO request 3", "INFO request 2"]
    third = await backend.read(group.component(), replace(window(limit=3), cursor=second.cursor), timeout=10)
    assert [line.text for line in third.lines] == ["INFO request 1"]
    assert third.cursor is None


async def test_errors_are_refiltered_here_because_moto_ignores_filters(group: Group, backend: CloudWatchLogs) -> None:
    group.put(
        [
            (minute(1), "ERROR payment failed"),
            (minute(2), "INFO all fine"),
            (minute(3), "Traceback (most recent call last):"),
            (minute(4), "error in lower case is not the runbook's pattern"),
            (minute(5), "ValueError: Exception raised"),
            (minute(6), "INFO still fine"),
        ]
    )
    page = await backend.read(group.component(), window(errors=True, limit=10), timeout=10)
    assert [line.text for line in page.lines] == [
        "ValueError: Exception raised",
        "Traceback (most recent call last):",
        "ERROR payment failed",
    ]
    assert page.lines[-1].level == "error"
    # A full page of matches even though the engine returned unfiltered rows (moto): it went on older.
    two = await backend.read(group.component(), window(errors=True, limit=2), timeout=10)
    assert [line.text for line in two.lines] == ["ValueError: Exception raised", "Traceback (most recent call last):"]
    rest = await backend.read(group.component(), replace(window(errors=True, limit=2), cursor=two.cursor), timeout=10)
    assert [line.text for line in rest.lines] == ["ERROR payment failed"]


async def test_grep_is_plain_text_and_escaped(group: Group, backend: CloudWatchLogs) -> None:
    needle = 'user "bob" [admin] a|b .* \\ /x'
    group.put(
        [
            (minute(1), f"INFO login {needle} ok"),
            (minute(2), "INFO login user bob admin ab x"),
            (minute(3), 'INFO login user "bob" [admin] a|b'),
        ]
    )
    page = await backend.read(group.component(), window(grep=needle), timeout=10)
    assert [line.text for line in page.lines] == [f"INFO login {needle} ok"]
    sent = group.client.describe_queries(logGroupName=group.name)["queries"][-1]["queryString"]
    assert sent == insights_query(window(grep=needle), 50)
    assert r"filter @message like /user \"bob\" \[admin\] a\|b \.\* \\ \/x/" in sent
    assert filter_pattern(window(grep=needle)) == '"user \\"bob\\" [admin] a|b .* \\\\ /x"'
    assert filter_pattern(window(errors=True)) == "?ERROR ?Exception ?Traceback"


async def test_window_bounds(group: Group, backend: CloudWatchLogs) -> None:
    until = T0 + timedelta(hours=1)
    group.put(
        [
            (T0 - timedelta(milliseconds=1), "INFO just before"),
            (T0, "INFO at since"),
            (until - timedelta(milliseconds=1), "INFO last inside"),
            (until, "INFO at until"),
            (until + timedelta(seconds=1), "INFO after"),
        ]
    )
    page = await backend.read(group.component(), window(hours=1), timeout=10)
    assert [line.text for line in page.lines] == ["INFO last inside", "INFO at since"]
    assert page.console_url is None  # an endpoint that is not AWS has no console


async def test_console_link_carries_the_same_filter() -> None:
    component = LambdaComponent(type="lambda", function="worklog", region="ap-northeast-2")
    backend = CloudWatchLogs()
    try:
        url = backend._console_url(component, "/aws/lambda/worklog", window(errors=True))
    finally:
        await backend.close()
    assert url is not None
    assert url.startswith("https://ap-northeast-2.console.aws.amazon.com/cloudwatch/home?region=ap-northeast-2#logsV2:")
    assert "log-group/$252Faws$252Flambda$252Fworklog/log-events$3FfilterPattern$3D$253FERROR$2520$253FException" in url


async def test_planted_secret_is_returned_raw(group: Group, backend: CloudWatchLogs) -> None:
    group.put([(minute(1), f"ERROR boto failed with {SECRET}")])
    page = await backend.read(group.component(), window(), timeout=10)
    assert SECRET in page.lines[0].text  # raw: the command redacts every backend's lines


class _NoInsights:
    """The real moto client, except that StartQuery is refused as an IAM policy without it would."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def start_query(self, **_: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "StartQuery")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


async def test_without_insights_the_window_is_streamed(group: Group) -> None:
    group.put([(minute(m), f"ERROR failure {m}" if m % 2 else f"INFO fine {m}") for m in range(1, 10)])
    client = aws_client("logs", group.endpoint)
    backend = CloudWatchLogs(client_factory=lambda _: _NoInsights(client))
    try:
        first = await backend.read(group.component(), window(errors=True, limit=2), timeout=10)
        assert [line.text for line in first.lines] == ["ERROR failure 9", "ERROR failure 7"]
        assert first.note == "Logs Insights is not allowed (logs:StartQuery): read the window with FilterLogEvents."
        assert first.scanned == 9
        rest = await backend.read(
            group.component(), replace(window(errors=True, limit=2), cursor=first.cursor), timeout=10
        )
        assert [line.text for line in rest.lines] == ["ERROR failure 5", "ERROR failure 3"]
        last = await backend.read(
            group.component(), replace(window(errors=True, limit=2), cursor=rest.cursor), timeout=10
        )
        assert [line.text for line in last.lines] == ["ERROR failure 1"]
        assert last.cursor is None
    finally:
        await backend.close()
        client.close()


async def test_missing_log_group(moto_endpoint: str, backend: CloudWatchLogs) -> None:
    component = LambdaComponent(type="lambda", function="nothing-here", endpoint_url=moto_endpoint)
    with pytest.raises(LogError) as caught:
        await backend.read(component, window(), timeout=10)
    assert caught.value.message == (
        "CloudWatch Logs has no log group /aws/lambda/nothing-here in us-east-1 (has the function run yet?)."
    )


async def test_bad_cursor_and_bad_grep(group: Group, backend: CloudWatchLogs) -> None:
    with pytest.raises(LogError, match="no longer valid"):
        await backend.read(group.component(), replace(window(), cursor="next-please"), timeout=10)
    with pytest.raises(LogError, match="plain text on one line"):
        await backend.read(group.component(), window(grep="a\nb"), timeout=10)


# --- failures from an endpoint answering like AWS --------------------------------------------------


@dataclass
class FakeAws:
    """Answers every CloudWatch Logs call with one AWS JSON error, or never."""

    status: int = 400
    code: str = "ThrottlingException"
    hang: bool = False
    url: str = ""
    calls: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append(request.headers.get("X-Amz-Target", ""))
        if self.hang:
            await asyncio.sleep(3600)
        body = json.dumps({"__type": self.code, "message": "refused by the fake"})
        return web.Response(status=self.status, text=body, content_type="application/x-amz-json-1.1")


@pytest.fixture
async def fake_aws(moto_endpoint: str) -> AsyncIterator[FakeAws]:  # moto_endpoint: fake credentials in the env
    fake = FakeAws()
    app = web.Application()
    app.router.add_post("/", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    fake.url = f"http://127.0.0.1:{port}"
    yield fake
    await runner.cleanup()


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (400, "ThrottlingException", "CloudWatch Logs is rate-limiting the bot reading log group /aws/lambda/worklog; "
         "try again in a minute."),
        (400, "AccessDeniedException", "CloudWatch Logs refused: access denied (logs:StartQuery, logs:FilterLogEvents) "
         "reading log group /aws/lambda/worklog."),
        (400, "UnrecognizedClientException", "AWS refused the bot's credentials (UnrecognizedClientException) reading "
         "CloudWatch Logs log group /aws/lambda/worklog."),
        (500, "ServiceUnavailableException", "CloudWatch Logs answered ServiceUnavailableException reading log group "
         "/aws/lambda/worklog."),
    ],
)  # fmt: skip
async def test_refusals_are_one_sentence(
    fake_aws: FakeAws, backend: CloudWatchLogs, status: int, code: str, expected: str
) -> None:
    fake_aws.status, fake_aws.code = status, code
    component = LambdaComponent(type="lambda", function="worklog", endpoint_url=fake_aws.url)
    with pytest.raises(LogError) as caught:
        await backend.read(component, window(), timeout=10)
    assert caught.value.message == expected
    assert FAKE_SECRET_ACCESS_KEY not in caught.value.message
    if code == "AccessDeniedException":  # Insights refused, then FilterLogEvents refused too
        assert fake_aws.calls == ["Logs_20140328.StartQuery", "Logs_20140328.FilterLogEvents"]


async def test_a_hung_endpoint_is_bounded(fake_aws: FakeAws, backend: CloudWatchLogs) -> None:
    fake_aws.hang = True
    component = LambdaComponent(type="lambda", function="worklog", endpoint_url=fake_aws.url)
    with pytest.raises(LogError) as caught:
        await backend.read(component, window(), timeout=1.5)
    assert caught.value.message in (
        "CloudWatch Logs did not answer within 1.5 s for log group /aws/lambda/worklog.",
        f"{fake_aws.url} did not answer within 1.2 s for log group /aws/lambda/worklog.",
    )


async def test_nothing_listening(moto_endpoint: str, backend: CloudWatchLogs) -> None:
    component = LambdaComponent(type="lambda", function="worklog", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(LogError) as caught:
        await backend.read(component, window(), timeout=10)
    assert caught.value.message.startswith("Could not connect to http://127.0.0.1:")
    assert caught.value.message.endswith("for log group /aws/lambda/worklog (connection refused).")
