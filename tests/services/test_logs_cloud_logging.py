"""The Cloud Logging backend: google-cloud-logging's real async client against the gRPC fake."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from services.inventory import CloudRunComponent, LambdaComponent
from services.logs.base import LogError, LogQuery
from services.logs.cloud_logging import CloudLoggingLogs, entries_filter, plaintext_channel
from tests.fixtures.cloud_logging import FakeLogging, start_logging_fake
from tests.fixtures.servers import free_port

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
SECRET = "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib3QifQ.c2lnbmF0dXJl"
COMPONENT = CloudRunComponent(type="cloudrun", project="demo-project", region="asia-northeast3", service="vcbl-chatbot")


@pytest.fixture
async def fake() -> AsyncIterator[FakeLogging]:
    made = await start_logging_fake()
    yield made
    await made.close()


@pytest.fixture
async def backend(fake: FakeLogging) -> AsyncIterator[CloudLoggingLogs]:
    async with CloudLoggingLogs(channel_factory=fake.channel) as made:
        yield made


def window(*, errors: bool = False, grep: str | None = None, limit: int = 50, minutes: int = 60) -> LogQuery:
    return LogQuery(since=T0, until=T0 + timedelta(minutes=minutes), errors=errors, grep=grep, limit=limit)


def minute(m: float) -> datetime:
    return T0 + timedelta(minutes=m)


async def test_newest_first_and_page_token_to_older_page(fake: FakeLogging, backend: CloudLoggingLogs) -> None:
    for m in range(1, 6):
        fake.add(minute(m), text=f"GET /chat {m}", severity="INFO")
    fake.add(minute(3), text="another service", service="other-service")
    fake.add(minute(3), text="another region", location="us-central1")
    fake.add(minute(3), text="a job, not a revision", resource_type="cloud_run_job")
    first = await backend.read(COMPONENT, window(limit=2), timeout=10)
    assert [line.text for line in first.lines] == ["GET /chat 5", "GET /chat 4"]
    assert first.lines[0].level == "info"
    assert first.lines[0].source == "vcbl-chatbot-00042-abc"
    assert first.lines[0].at == minute(5)
    assert first.cursor is not None
    sent = fake.requests[-1]
    assert sent.order_by == "timestamp desc"
    assert sent.page_size == 2
    assert list(sent.resource_names) == ["projects/demo-project"]
    second = await backend.read(COMPONENT, replace(window(limit=2), cursor=first.cursor), timeout=10)
    assert [line.text for line in second.lines] == ["GET /chat 3", "GET /chat 2"]
    third = await backend.read(COMPONENT, replace(window(limit=2), cursor=second.cursor), timeout=10)
    assert [line.text for line in third.lines] == ["GET /chat 1"]
    assert third.cursor is None
    assert first.console_url is not None
    assert first.console_url.startswith("https://console.cloud.google.com/logs/query;query=resource.type%20%3D%20")
    assert first.console_url.endswith("?project=demo-project")


async def test_errors_use_severity(fake: FakeLogging, backend: CloudLoggingLogs) -> None:
    fake.add(minute(1), text="Traceback: boom", severity="ERROR")
    fake.add(minute(2), text="ERROR in the text but logged at INFO", severity="INFO")
    fake.add(minute(3), text="out of memory", severity="CRITICAL")
    fake.add(minute(4), text="slow", severity="WARNING")
    page = await backend.read(COMPONENT, window(errors=True), timeout=10)
    assert [(line.text, line.level) for line in page.lines] == [
        ("out of memory", "critical"),
        ("Traceback: boom", "error"),
    ]
    assert "severity >= ERROR" in fake.requests[-1].filter


async def test_json_payload_message_and_fields(fake: FakeLogging, backend: CloudLoggingLogs) -> None:
    fake.add(minute(1), payload={"message": "user login failed", "user": "u-17", "attempt": 3}, severity="WARNING")
    page = await backend.read(COMPONENT, window(), timeout=10)
    assert page.lines[0].text == "user login failed"
    assert page.lines[0].fields == {"user": "u-17", "attempt": "3.0"}


async def test_grep_is_escaped_in_the_filter(fake: FakeLogging, backend: CloudLoggingLogs) -> None:
    needle = 'say "hi" \\ OR severity>=DEBUG'
    fake.add(minute(1), text=f"user typed {needle} here")
    fake.add(minute(2), text="say hi OR severity>=DEBUG")
    fake.add(minute(3), payload={"message": f"json {needle.upper()}"})
    page = await backend.read(COMPONENT, window(grep=needle), timeout=10)
    assert [line.text for line in page.lines] == [f"json {needle.upper()}", f"user typed {needle} here"]
    assert '(textPayload : "say \\"hi\\" \\\\ OR severity>=DEBUG" OR jsonPayload.message : ' in fake.requests[-1].filter


async def test_window_bounds(fake: FakeLogging, backend: CloudLoggingLogs) -> None:
    fake.add(T0 - timedelta(microseconds=1), text="before")
    fake.add(T0, text="at since")
    fake.add(minute(10) - timedelta(microseconds=1), text="last inside")
    fake.add(minute(10), text="at until")
    page = await backend.read(COMPONENT, window(minutes=10), timeout=10)
    assert [line.text for line in page.lines] == ["last inside", "at since"]
    assert entries_filter(COMPONENT, window(minutes=10)).splitlines()[3:] == [
        'timestamp >= "2025-03-01T09:00:00.000000Z"',
        'timestamp < "2025-03-01T09:10:00.000000Z"',
    ]


async def test_short_pages_are_followed_a_bounded_number_of_times(fake: FakeLogging, backend: CloudLoggingLogs) -> None:
    fake.add(minute(1), text="found at last")
    fake.short_pages = 1
    page = await backend.read(COMPONENT, window(), timeout=10)
    assert [line.text for line in page.lines] == ["found at last"]
    assert len(fake.requests) == 2
    fake.short_pages = 10
    still = await backend.read(COMPONENT, window(), timeout=10)
    assert still.lines == []
    assert len(fake.requests) == 2 + 3  # MAX_CALLS, never more: the API allows 60 a minute
    assert still.cursor is not None  # Logging is still searching: the next page goes on from there


async def test_planted_secret_is_returned_raw(fake: FakeLogging, backend: CloudLoggingLogs) -> None:
    fake.add(minute(1), text=f"auth header was {SECRET}", severity="ERROR")
    page = await backend.read(COMPONENT, window(), timeout=10)
    assert SECRET in page.lines[0].text  # raw: the command redacts every backend's lines


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, "Cloud Logging refused: permission denied (logging.logEntries.list on "
         "project demo-project, role Logs Viewer) reading Cloud Run service vcbl-chatbot (demo-project)."),
        (grpc.StatusCode.UNAUTHENTICATED, "Cloud Logging refused the bot's Google credentials (not authenticated) "
         "for Cloud Run service vcbl-chatbot (demo-project)."),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "Cloud Logging's quota of 60 reads a minute for project demo-project "
         "is used up; try again in a minute."),
        (grpc.StatusCode.INTERNAL, "Could not read Cloud Logging for Cloud Run service vcbl-chatbot (demo-project) "
         "(INTERNAL); try again later."),
    ],
)  # fmt: skip
async def test_refusals_are_one_sentence(
    fake: FakeLogging, backend: CloudLoggingLogs, code: grpc.StatusCode, expected: str
) -> None:
    fake.fail_next = [(code, "refused by the fake, token=ya29.secret")]
    with pytest.raises(LogError) as caught:
        await backend.read(COMPONENT, window(), timeout=10)
    assert caught.value.message == expected


async def test_a_failure_after_a_first_page_keeps_it(fake: FakeLogging, backend: CloudLoggingLogs) -> None:
    fake.add(minute(1), text="first")
    fake.add(minute(2), text="second")
    fake.page_size_cap = 1
    fake.fail_at = {2: (grpc.StatusCode.UNAVAILABLE, "backend went away")}  # the second call of the page
    page = await backend.read(COMPONENT, window(limit=2), timeout=10)
    assert [line.text for line in page.lines] == ["second"]
    assert page.note.startswith("Cloud Logging stopped answering part-way (")
    assert page.cursor == "p:1"


async def test_bad_page_token_is_one_sentence(backend: CloudLoggingLogs) -> None:
    with pytest.raises(LogError) as caught:
        await backend.read(COMPONENT, replace(window(), cursor="forged"), timeout=10)
    assert caught.value.message == "That page of Cloud Logging entries is no longer valid; run the command again."


async def test_a_hang_is_bounded(fake: FakeLogging, backend: CloudLoggingLogs) -> None:
    fake.hang = True
    with pytest.raises(LogError) as caught:
        await backend.read(COMPONENT, window(), timeout=1)
    assert caught.value.message in (
        "Cloud Logging did not answer within 1 s for Cloud Run service vcbl-chatbot (demo-project).",
        "Cloud Logging did not answer in time for Cloud Run service vcbl-chatbot (demo-project).",
    )


async def test_nothing_listening() -> None:
    async with CloudLoggingLogs(channel_factory=plaintext_channel(f"127.0.0.1:{free_port()}")) as backend:
        with pytest.raises(LogError) as caught:
            await backend.read(COMPONENT, window(), timeout=3)
    assert caught.value.message.startswith("Could not read Cloud Logging for Cloud Run service vcbl-chatbot")


async def test_bad_grep_and_wrong_component(backend: CloudLoggingLogs) -> None:
    with pytest.raises(LogError, match="plain text on one line"):
        await backend.read(COMPONENT, window(grep="a\x00b"), timeout=10)
    with pytest.raises(LogError, match="no logs for a lambda component"):
        await backend.read(LambdaComponent(type="lambda", function="f"), window(), timeout=10)


async def test_the_registry_builds_it_for_a_plaintext_endpoint(fake: FakeLogging) -> None:
    from services.logs.registry import LogDeps, build_log_backends

    fake.add(minute(1), text="through the registry")
    built = build_log_backends(LogDeps(logging_endpoint=fake.address), types=["cloudrun"])
    backend = built["cloudrun"]
    assert isinstance(backend, CloudLoggingLogs)
    try:
        page = await backend.read(COMPONENT, window(), timeout=10)
    finally:
        await backend.close()
    assert [line.text for line in page.lines] == ["through the registry"]
