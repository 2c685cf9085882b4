"""The Render log backend against a loopback fake of Render's GET /v1/logs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from pydantic import SecretStr

from services.inventory import LambdaComponent, RenderComponent
from services.logs.base import LogError, LogQuery
from services.logs.render import RenderLogs, console_url
from tests.fixtures.render import API_KEY, SERVICE
from tests.fixtures.render_logs import OWNER, Answer, FakeRenderLogs, start_render_logs_fake
from tests.fixtures.servers import free_port

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
SECRET = "sk-proj-AbCdEf0123456789AbCdEf0123456789"


@pytest.fixture
async def fake() -> AsyncIterator[FakeRenderLogs]:
    made = await start_render_logs_fake()
    yield made
    await made.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as made:
        yield made


def component(fake: FakeRenderLogs, **changes: object) -> RenderComponent:
    values: dict[str, object] = {
        "type": "render",
        "service_id": SERVICE,
        "api_key": API_KEY,
        "owner_id": OWNER,
        "api_url": fake.url,
    }
    return RenderComponent.model_validate(values | changes)


def window(*, errors: bool = False, grep: str | None = None, limit: int = 50, minutes: int = 60) -> LogQuery:
    return LogQuery(since=T0, until=T0 + timedelta(minutes=minutes), errors=errors, grep=grep, limit=limit)


def minute(m: float) -> datetime:
    return T0 + timedelta(minutes=m)


async def test_newest_first_and_cursor_to_older_page(fake: FakeRenderLogs, session: aiohttp.ClientSession) -> None:
    for m in range(1, 6):
        fake.add(minute(m), f"GET /api {m}")
    fake.add(minute(3), "another service", resource="srv-d0xyz789worker")
    backend = RenderLogs(session)
    first = await backend.read(component(fake), window(limit=2), timeout=5)
    assert [line.text for line in first.lines] == ["GET /api 5", "GET /api 4"]
    assert first.lines[0].at == minute(5)
    assert first.lines[0].level == "info"
    assert first.lines[0].source == "srv-d0abc123shopapi-7d9f8-x2k4p"
    query, authorization = fake.requests[-1]
    assert authorization == f"Bearer {API_KEY}"
    assert query["ownerId"] == [OWNER]
    assert query["resource"] == [SERVICE]
    assert query["direction"] == ["backward"]
    assert query["startTime"] == ["2025-03-01T09:00:00.000000Z"]
    assert query["endTime"] == ["2025-03-01T10:00:00.000000Z"]
    assert first.cursor is not None
    second = await backend.read(component(fake), replace(window(limit=2), cursor=first.cursor), timeout=5)
    assert [line.text for line in second.lines] == ["GET /api 3", "GET /api 2"]
    third = await backend.read(component(fake), replace(window(limit=2), cursor=second.cursor), timeout=5)
    assert [line.text for line in third.lines] == ["GET /api 1"]
    assert third.cursor is None
    assert first.console_url is None  # not Render's own API: no dashboard link


async def test_lines_sharing_an_instant_are_neither_lost_nor_repeated(
    fake: FakeRenderLogs, session: aiohttp.ClientSession
) -> None:
    for i in range(5):
        fake.add(minute(2), f"burst {i}")
    fake.add(minute(1), "before the burst")
    backend = RenderLogs(session)
    seen: list[str] = []
    cursor = None
    for _ in range(6):
        page = await backend.read(component(fake), replace(window(limit=2), cursor=cursor), timeout=5)
        seen += [line.text for line in page.lines]
        cursor = page.cursor
        if cursor is None:
            break
    assert sorted(seen) == sorted([f"burst {i}" for i in range(5)] + ["before the burst"])
    assert len(seen) == 6


async def test_errors_use_the_level_label(fake: FakeRenderLogs, session: aiohttp.ClientSession) -> None:
    fake.add(minute(1), "database connection lost", level="error")
    fake.add(minute(2), "ERROR mentioned at info level", level="info")
    page = await RenderLogs(session).read(component(fake), window(errors=True), timeout=5)
    assert [(line.text, line.level) for line in page.lines] == [("database connection lost", "error")]
    assert fake.queries()[-1]["level"] == ["error", "critical", "fatal", "alert", "emergency"]  # OR'd by Render


async def test_grep_with_punctuation_is_matched_here_and_plain_text_also_by_render(
    fake: FakeRenderLogs, session: aiohttp.ClientSession
) -> None:
    # Render documents only "wildcards and regex" for `text`: punctuation is never sent to it.
    needle = "order (#42) cost $5.00 [x]*"
    fake.add(minute(1), f"paid {needle} ok")
    fake.add(minute(2), "order #42 cost $5X00 x")
    fake.add(minute(3), "order (#42) cost $5.00 [x]")
    page = await RenderLogs(session).read(component(fake), window(grep=needle), timeout=5)
    assert [line.text for line in page.lines] == [f"paid {needle} ok"]
    assert "text" not in fake.queries()[-1]
    page = await RenderLogs(session).read(component(fake), window(grep="cost"), timeout=5)
    assert len(page.lines) == 3 and fake.queries()[-1]["text"] == ["cost"]


async def test_a_page_served_oldest_first_is_shown_newest_first(
    fake: FakeRenderLogs, session: aiohttp.ClientSession
) -> None:
    for m in (1, 2, 3):
        fake.add(minute(m), f"line {m}")
    fake.oldest_first = True
    page = await RenderLogs(session).read(component(fake), window(), timeout=5)
    assert [line.text for line in page.lines] == ["line 3", "line 2", "line 1"]


async def test_window_bounds(fake: FakeRenderLogs, session: aiohttp.ClientSession) -> None:
    fake.add(T0 - timedelta(milliseconds=1), "before")
    fake.add(T0, "at since")
    fake.add(minute(10) - timedelta(milliseconds=1), "last inside")
    fake.add(minute(10), "at until")  # Render's window includes its end: cut here
    page = await RenderLogs(session).read(component(fake), window(minutes=10), timeout=5)
    assert [line.text for line in page.lines] == ["last inside", "at since"]


async def test_planted_secret_is_returned_raw(fake: FakeRenderLogs, session: aiohttp.ClientSession) -> None:
    fake.add(minute(1), f"calling OpenAI with {SECRET}", level="error")
    page = await RenderLogs(session).read(component(fake), window(), timeout=5)
    assert SECRET in page.lines[0].text  # raw: the command redacts every backend's lines


async def test_a_short_retry_after_is_waited_out_once(fake: FakeRenderLogs, session: aiohttp.ClientSession) -> None:
    fake.add(minute(1), "after the wait")
    fake.fail_next = [Answer(429, '{"id":"x","message":"rate limited"}', headers={"Retry-After": "0.1"})]
    page = await RenderLogs(session).read(component(fake), window(), timeout=5)
    assert [line.text for line in page.lines] == ["after the wait"]
    assert len(fake.requests) == 2


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (Answer(429, '{"id":"x","message":"rate limited"}', headers={"Retry-After": "30"}),
         "Render is rate-limiting the bot's log reads (Retry-After 30 s); try again in a minute."),
        (Answer(502, "<html><body>Bad gateway</body></html>", "text/html"),
         f"Render's log API failed (502) for service {SERVICE}; try again later."),
        (Answer(200, "<html><body>Maintenance</body></html>", "text/html"),
         f"Render's log API answered text/html instead of JSON for service {SERVICE}."),
        (Answer(200, '{"logs": "nope"}'),
         f"Render's log API answered something other than a page of logs for service {SERVICE}."),
        (Answer(400, f'{{"id":"x","message":"bad key {API_KEY} in request"}}'),
         f"Render refused the log query for service {SERVICE} (400): bad key *** in request."),
        (Answer(404, '{"id":"x","message":"not found"}'),
         f"Render knows no such owner or service for {SERVICE}; check owner_id in the inventory."),
    ],
)  # fmt: skip
async def test_failures_are_one_sentence(
    fake: FakeRenderLogs, session: aiohttp.ClientSession, answer: Answer, expected: str
) -> None:
    fake.fail_next = [answer]
    with pytest.raises(LogError) as caught:
        await RenderLogs(session).read(component(fake), window(), timeout=5)
    assert caught.value.message == expected
    assert API_KEY not in caught.value.message


async def test_a_wrong_key_is_refused(fake: FakeRenderLogs, session: aiohttp.ClientSession) -> None:
    with pytest.raises(LogError) as caught:
        await RenderLogs(session).read(component(fake, api_key="rnd_WrongKey000000000000"), window(), timeout=5)
    assert caught.value.message == f"Render refused the API key for service {SERVICE}."


async def test_a_hang_is_bounded(fake: FakeRenderLogs, session: aiohttp.ClientSession) -> None:
    fake.hang = True
    with pytest.raises(LogError) as caught:
        await RenderLogs(session).read(component(fake), window(), timeout=0.5)
    assert caught.value.message == f"Render's log API did not answer within 0.5 s for service {SERVICE}."


async def test_nothing_listening(session: aiohttp.ClientSession) -> None:
    gone = RenderComponent(
        type="render",
        service_id=SERVICE,
        api_key=SecretStr(API_KEY),
        owner_id=OWNER,
        api_url=f"http://127.0.0.1:{free_port()}/v1",
    )
    with pytest.raises(LogError) as caught:
        await RenderLogs(session).read(gone, window(), timeout=5)
    assert caught.value.message == f"Could not reach Render's log API for service {SERVICE} (connection refused)."


async def test_bad_input_reads_nothing(fake: FakeRenderLogs, session: aiohttp.ClientSession) -> None:
    backend = RenderLogs(session)
    with pytest.raises(LogError, match="has no owner_id in the inventory"):
        await backend.read(component(fake, owner_id=None), window(), timeout=5)
    with pytest.raises(LogError, match="no longer valid"):
        await backend.read(component(fake), replace(window(), cursor="!!not-a-cursor"), timeout=5)
    with pytest.raises(LogError, match="plain text on one line"):
        await backend.read(component(fake), window(grep="a\rb"), timeout=5)
    with pytest.raises(LogError, match="must be https://"):
        await backend.read(component(fake, api_url="http://api.example.com/v1"), window(), timeout=5)
    with pytest.raises(LogError, match="no logs for a lambda component"):
        await backend.read(LambdaComponent(type="lambda", function="f"), window(), timeout=5)
    assert fake.requests == []


def test_console_link_only_for_renders_own_api(fake: FakeRenderLogs) -> None:
    real = RenderComponent(type="render", service_id=SERVICE, api_key=SecretStr(API_KEY), owner_id=OWNER)
    assert console_url(real) == f"https://dashboard.render.com/web/{SERVICE}/logs"
    assert console_url(component(fake)) is None


async def test_the_registry_builds_the_remote_backends(fake: FakeRenderLogs, session: aiohttp.ClientSession) -> None:
    from services.logs.cloud_logging import CloudLoggingLogs
    from services.logs.cloudwatch import CloudWatchLogs
    from services.logs.compose import ComposeLogs
    from services.logs.registry import LogDeps, build_log_backends

    built = build_log_backends(LogDeps(session=session), types=["render", "lambda", "cloudrun", "compose"])
    assert {kind: type(backend) for kind, backend in built.items()} == {
        "render": RenderLogs,
        "lambda": CloudWatchLogs,
        "cloudrun": CloudLoggingLogs,
        "compose": ComposeLogs,
    }
    fake.add(minute(1), "through the registry")
    page = await built["render"].read(component(fake), window(), timeout=5)
    assert [line.text for line in page.lines] == ["through the registry"]
    for backend in built.values():
        close = getattr(backend, "close", None)
        if close is not None:
            await close()


async def test_without_a_session_it_says_so(fake: FakeRenderLogs) -> None:
    with pytest.raises(LogError) as caught:
        await RenderLogs(None).read(component(fake), window(), timeout=5)
    assert caught.value.message == "The bot has no HTTP session to reach Render's log API."
