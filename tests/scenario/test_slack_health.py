"""The real app over HTTP: signed /ops requests in, fake Slack Web API calls out."""

from __future__ import annotations

import inspect
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from slack_bolt.kwargs_injection.async_args import AsyncArgs

from bot.app import build_bolt_app
from bot.sample_app import SampleAppState, start_sample_app
from tests.fixtures.servers import PostgresServer
from tests.fixtures.slack import FakeSlack, sign
from tests.fixtures.wait import wait_until
from tests.scenario.harness import BOT_TOKEN, SIGNING_SECRET, Bot, inventory, running_bot

ADMIN = "U0ADMIN1"
VIEWER = "U0VIEW1"
STRANGER = "U0NOBODY"


@pytest.fixture
async def sample_app() -> AsyncIterator[tuple[SampleAppState, str]]:
    state = SampleAppState(components={"db": "healthy", "llm": "degraded"})
    runner, url = await start_sample_app(state)
    yield state, url
    await runner.cleanup()


def shop_inventory(url: str, db: Path, *, extra: str = "") -> str:
    return f"""
roles:
  viewer: [{VIEWER}, S0VIEWERS]
  admin: [{ADMIN}]
services:
  shop:
    components:
      api: {{type: http, url: "{url}", metrics: /metrics, timeout: 2}}
      db: {{type: sqlite, path: "{db}"}}
{extra}
"""


@pytest.fixture
def shop_db(tmp_path: Path) -> Path:
    path = tmp_path / "shop.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (x)")
    return path


@pytest.fixture(params=["sqlite", "postgres"])
async def bot(
    request: pytest.FixtureRequest,
    fake_slack: FakeSlack,
    tmp_path: Path,
    sample_app: tuple[SampleAppState, str],
    shop_db: Path,
) -> AsyncIterator[Bot]:
    """The app with its state in SQLite, and again in PostgreSQL: the same scenarios pass on both."""
    state = {}
    if request.param == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        state["OPSBOT_STATE_URL"] = server.dsn(await server.create_database())
    async with running_bot(fake_slack, tmp_path, inventory(shop_inventory(sample_app[1], shop_db)), **state) as bot:
        assert bot.container.store.kind == request.param
        yield bot


def all_sent(slack: FakeSlack) -> str:
    return "\n".join(call.raw.decode(errors="replace") + json.dumps(call.params) for call in slack.calls)


def block_texts(blocks: list[dict[str, object]]) -> str:
    return json.dumps(blocks, ensure_ascii=False)


async def test_health_all_is_acked_then_posted_to_the_channel(bot: Bot, fake_slack: FakeSlack) -> None:
    answer = await bot.command("health all", user=VIEWER)
    assert answer.status == 200
    assert answer.body == ""  # a bare ack: the report comes as its own message
    [post] = await fake_slack.wait_for("chat.postMessage")
    assert post.params["channel"] == "C0OPS"
    assert post.token == BOT_TOKEN
    blocks = post.json_param("blocks")
    text = block_texts(blocks)
    assert "Health of all services: warning" in text
    assert "*api* (http)" in text and "*db* (sqlite)" in text
    assert "llm" in text  # the degraded component of the app's /health is reported by name
    assert "warning" in post.params["text"]
    events = await bot.container.store.audit_events()
    assert [(e.actor, e.command, e.outcome) for e in events] == [(VIEWER, "health", "ok")]
    assert events[0].channel == "C0OPS"


async def test_health_of_one_service_and_metrics(bot: Bot, fake_slack: FakeSlack) -> None:
    await bot.command("health shop", user=VIEWER)
    await fake_slack.wait_for("chat.postMessage")
    status, body = await bot.get("/metrics")
    assert status == 200
    assert 'opsbot_commands_total{outcome="ok",verb="health"} 1.0' in body
    assert "opsbot_probe_seconds_bucket" in body and 'component_type="sqlite"' in body
    assert 'opsbot_slack_requests_total{kind="command"} 1.0' in body


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({"X-Slack-Request-Timestamp": str(int(time.time())), "X-Slack-Signature": "v0=" + "0" * 64}, "bad signature"),
        ({}, "missing headers"),
        (None, "timestamp older than 5 minutes"),
    ],
)
async def test_unsigned_or_stale_requests_get_401_and_run_nothing(
    bot: Bot, fake_slack: FakeSlack, headers: dict[str, str] | None, why: str
) -> None:
    body = fake_slack.slash_body("health all", user_id=ADMIN)
    if headers is None:
        headers = sign(SIGNING_SECRET, body, int(time.time()) - 301)
    answer = await bot.post(body, headers)
    assert answer.status == 401, why
    # A barrier instead of a sleep: a signed request sent after the refused one. Once it has been
    # answered and audited, whatever the refused one had started would have shown too.
    await bot.command("help", user=ADMIN)
    await fake_slack.wait_for("response_url/default")
    audited = await wait_until(bot.container.store.audit_events, "the signed request is audited")
    assert [e.command for e in audited] == ["help"]
    assert fake_slack.calls_to("chat.postMessage") == []
    assert 'opsbot_slack_requests_total{kind="command"} 1.0' in (await bot.get("/metrics"))[1]


async def test_unknown_verb_suggests_the_closest(bot: Bot, fake_slack: FakeSlack) -> None:
    await bot.command("hleath all", user=VIEWER)
    [reply] = await fake_slack.wait_for("response_url/default")
    assert reply.params["response_type"] == "ephemeral"
    assert "Did you mean `/ops health`?" in reply.params["text"]
    assert fake_slack.calls_to("chat.postMessage") == []
    [event] = await bot.container.store.audit_events()
    assert (event.command, event.outcome) == ("unknown", "rejected")


async def test_unknown_service_is_refused_clearly(bot: Bot, fake_slack: FakeSlack) -> None:
    await bot.command("health shpo", user=VIEWER)
    [reply] = await fake_slack.wait_for("response_url/default")
    assert reply.params["response_type"] == "ephemeral"
    assert "There is no service called `shpo`. Did you mean `shop`?" in reply.params["text"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("health shop; rm -rf /", "Unexpected"),
        ("health $(reboot)", "There is no service called `$(reboot)`"),
        ("health 'unclosed", "Couldn't read the arguments"),
        ("health " + "x" * 600, "the limit is 500"),
        ("health 상점", "There is no service called `상점`"),
        ("health --force", "has no option `--force`"),
        ("health shop extra words", "Unexpected `extra words`"),
    ],
)
async def test_bad_arguments_get_one_plain_sentence(bot: Bot, fake_slack: FakeSlack, text: str, expected: str) -> None:
    await bot.command(text, user=VIEWER)
    [reply] = await fake_slack.wait_for("response_url/default")
    assert expected in reply.params["text"]
    assert "Traceback" not in reply.params["text"]
    assert fake_slack.calls_to("chat.postMessage") == []
    [event] = await bot.container.store.audit_events()
    assert event.outcome == "rejected"


async def test_help_lists_only_what_the_caller_may_run(bot: Bot, fake_slack: FakeSlack) -> None:
    await bot.command("", user=VIEWER)
    [reply] = await fake_slack.wait_for("response_url/default")
    listed = json.dumps(reply.params["blocks"])
    assert "/ops health [service|all]" in listed and "/ops help" in listed
    await bot.command("help", user=STRANGER)
    replies = await fake_slack.wait_for("response_url/default", 2)
    assert "You have no opsbot role yet" in replies[1].params["text"]


async def test_a_user_without_a_role_may_not_look(bot: Bot, fake_slack: FakeSlack) -> None:
    await bot.command("health all", user=STRANGER)
    [reply] = await fake_slack.wait_for("response_url/default")
    assert reply.params["text"] == "`/ops health` needs the viewer role; you are not in any opsbot role."
    [event] = await bot.container.store.audit_events()
    assert event.outcome == "denied"


async def test_user_group_membership_grants_its_role(bot: Bot, fake_slack: FakeSlack) -> None:
    fake_slack.set_usergroup("S0VIEWERS", ["U0INGROUP"])
    await bot.command("health all", user="U0INGROUP")
    await fake_slack.wait_for("chat.postMessage")
    assert fake_slack.calls_to("usergroups.users.list")[0].params["usergroup"] == "S0VIEWERS"


async def test_not_in_channel_falls_back_to_response_url(bot: Bot, fake_slack: FakeSlack) -> None:
    fake_slack.fail("chat.postMessage", "not_in_channel")
    await bot.command("health all", user=VIEWER)
    [reply] = await fake_slack.wait_for("response_url/default")
    assert reply.params["response_type"] == "in_channel"
    assert "Health of all services" in json.dumps(reply.params["blocks"])


async def test_rate_limited_post_is_retried(bot: Bot, fake_slack: FakeSlack) -> None:
    fake_slack.rate_limit_once("chat.postMessage", retry_after=1)
    await bot.command("health all", user=VIEWER)
    calls = await fake_slack.wait_for("chat.postMessage", 2, timeout=10)
    assert [c.status for c in calls] == [429, 200]


async def test_healthz_ready_metrics_endpoints(bot: Bot) -> None:
    assert (await bot.get("/healthz"))[0] == 200
    status, body = await bot.get("/ready")
    assert status == 200, body
    status, body = await bot.get("/metrics")
    assert status == 200 and "opsbot_commands_total" in body


async def test_big_report_is_summarised_and_continued_in_the_thread(
    fake_slack: FakeSlack, tmp_path: Path, sample_app: tuple[SampleAppState, str], shop_db: Path
) -> None:
    # 60 services of 4 components: more sections than one message may hold.
    components = "\n".join(f'      api{i}: {{type: http, url: "{sample_app[1]}", timeout: 3}}' for i in range(4))
    text = """
roles: {viewer: ["*"]}
services:
""" + "\n".join(f"  svc{s}:\n    components:\n" + components for s in range(60))
    async with running_bot(fake_slack, tmp_path, inventory(text)) as bot:
        await bot.command("health all")
        await fake_slack.wait_for("chat.postMessage", 2, timeout=20)
        await wait_until(lambda: bot.container.deps.running.count == 0, "the command finishes", timeout=20)
        posts = fake_slack.calls_to("chat.postMessage")
    first, rest = posts[0], posts[1:]
    assert "thread_ts" not in first.params
    assert all(p.params["thread_ts"] == "" or p.params.get("thread_ts") for p in rest)
    thread_ts = {p.params["thread_ts"] for p in rest}
    assert len(thread_ts) == 1
    total_lines = 0
    for post in posts:
        blocks = post.json_param("blocks")
        assert len(blocks) <= 50
        for block in blocks:
            if block["type"] == "section":
                assert len(block["text"]["text"]) <= 3000
        if post in rest:
            total_lines += sum(block["text"]["text"].count("(http)") for block in blocks if block["type"] == "section")
    assert total_lines == 240  # every component is in the thread: nothing cut silently
    assert "continues in the thread" in json.dumps(first.json_param("blocks"))


async def test_secrets_never_reach_slack_logs_or_audit(
    fake_slack: FakeSlack, tmp_path: Path, postgres_server: object, capfd: pytest.CaptureFixture[str]
) -> None:
    from bot.logging import configure_logging
    from services.redaction import Redactor
    from tests.fixtures.servers import PostgresServer

    assert isinstance(postgres_server, PostgresServer)
    password = "s3cr3t-Pa55word-xyz"
    dsn = postgres_server.dsn("postgres", password=password).replace("postgres:", "nosuchuser:", 1)
    text = """
roles: {viewer: ["*"]}
services:
  vault:
    components:
      db: {type: postgres, dsn: "${VAULT_DB}", timeout: 5}
"""
    loaded = inventory(text, env={"VAULT_DB": dsn})
    configure_logging("json", "DEBUG", Redactor(loaded.secrets | {BOT_TOKEN, SIGNING_SECRET}))
    async with running_bot(fake_slack, tmp_path, loaded) as bot:
        await bot.command("health vault; echo " + password)
        await bot.command("health vault")
        [post] = await fake_slack.wait_for("chat.postMessage", timeout=10)
        events = await bot.container.store.audit_events()
    assert "critical" in post.params["text"]
    captured = capfd.readouterr()
    everything = all_sent(fake_slack) + captured.out + captured.err + repr(events)
    assert password not in everything
    assert BOT_TOKEN not in everything.replace(f"Bearer {BOT_TOKEN}", "")  # only the auth header carries it
    assert SIGNING_SECRET not in everything
    assert "***" in repr(events)  # the password typed into the command was masked in the audit
    assert '"request_id"' in captured.err  # the bound request id is on the JSON log lines


def test_every_listener_parameter_is_a_bolt_argument(bot: Bot) -> None:
    """Bolt passes None for a parameter name it doesn't know: guard against that silent trap."""
    valid = set(inspect.signature(AsyncArgs.__init__).parameters) - {"self"}
    app = build_bolt_app(bot.container)
    assert app._async_listeners
    for listener in app._async_listeners:
        params = set(inspect.signature(listener.ack_function).parameters)
        assert params <= valid, f"{listener.ack_function.__name__}: {params - valid}"
    handler = app._async_listener_runner.listener_error_handler
    error_params = set(inspect.signature(handler.func).parameters)  # type: ignore[attr-defined]
    assert error_params and error_params <= valid | {"error"}


async def test_a_slow_check_tells_the_caller_it_is_under_way(
    fake_slack: FakeSlack, tmp_path: Path, sample_app: tuple[SampleAppState, str]
) -> None:
    state, url = sample_app
    state.delay = 3.0  # slower than the 2 s after which the caller hears from the bot
    api = f'{{type: http, url: "{url}", timeout: 5}}'
    text = f'roles: {{viewer: ["*"]}}\nservices: {{shop: {{components: {{api: {api}}}}}}}'
    async with running_bot(fake_slack, tmp_path, inventory(text)) as bot:
        await bot.command("health shop", user=VIEWER)
        [note] = await fake_slack.wait_for("response_url/default", timeout=5)
        assert note.params["response_type"] == "ephemeral"
        assert "Checking 1 component(s) of shop" in note.params["text"]
        assert fake_slack.calls_to("chat.postMessage") == []  # the report itself is still on its way
        [post] = await fake_slack.wait_for("chat.postMessage", timeout=10)
    assert "Health of shop" in post.params["text"]
