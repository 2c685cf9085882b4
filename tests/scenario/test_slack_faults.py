"""Slack's Web API failing under the bot loses no reply, no plan and no final edit of an approval message.

Faults are injected into the fake Slack: HTTP 5xx (Slack did nothing), ``ok: false`` answers (some say
Slack did nothing, some that it may have done part of it), a hang longer than the bot's client timeout,
and a connection refused. A failure that proves nothing was posted is retried; after one where a retry
could post twice, the reply goes through the request's response_url instead. Edits are safe to repeat,
so they are retried after any of these.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

import bot.container
import handlers.slack
from handlers.approvals import APPROVE, DENY, status_line
from services.state import Approval, ApprovalState
from tests.fixtures.servers import PostgresServer
from tests.fixtures.slack import UNROUTED_RESPONSE_URL, Call, FakeSlack
from tests.fixtures.wait import wait_until
from tests.scenario.harness import Bot, all_text, inventory, running_bot

REQUESTER = "U0REQ1"  # operator
APPROVER = "U0APP1"
POST = "chat.postMessage"
EDIT = "chat.update"
CLIENT_TIMEOUT = 0.8  # seconds: the bot's Slack client timeout in these tests (10 s in production)
HANG = 2 * CLIENT_TIMEOUT  # how long the fake Slack sits on a call before answering it
ATTEMPTS = 1 + bot.container.SLACK_RETRIES  # calls the client makes before giving up on a 5xx
CLICKED_TS = "1700000000.000100"  # the ts Slack gives a message posted through response_url
# Port 9 of loopback (discard): nothing listens, so every connection is refused at once.
UNREACHABLE_API = UNROUTED_RESPONSE_URL.split("/response_url")[0] + "/api/"

JOBS_SQL = """
CREATE TABLE jobs (id bigint PRIMARY KEY, status text NOT NULL, started_at timestamptz, error_message text);
INSERT INTO jobs VALUES (1, 'processing', now() - interval '3 hours', NULL);
"""

INVENTORY = f"""
roles:
  viewer: ["*"]
  operator: [{REQUESTER}]
  approver: [{APPROVER}]
services:
  pipeline:
    components:
      db:
        type: postgres
        dsn: "${{PIPE_DB}}"
        timeout: 5
        jobs: {{}}
"""


@pytest.fixture
async def slack_bot(
    fake_slack: FakeSlack, tmp_path: Path, postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Bot]:
    """The bot, with a Slack client that gives up on a call after CLIENT_TIMEOUT (set before the bot is
    built: the client and its session read it then)."""
    monkeypatch.setattr(bot.container, "SLACK_TIMEOUT", CLIENT_TIMEOUT)
    dsn = await postgres_server.database_with(JOBS_SQL)
    async with running_bot(fake_slack, tmp_path, inventory(INVENTORY, env={"PIPE_DB": dsn})) as running:
        yield running


def inject(slack: FakeSlack, method: str, fault: str) -> None:
    """Make Slack fail ``method`` as ``fault`` says; every fault but "hang" and "5xx" clears itself."""
    match fault:
        case "503, then ok":
            slack.server_error(method, 503, times=ATTEMPTS - 1)
        case "service_unavailable, then ok":
            slack.fail(method, "service_unavailable", times=1)
        case "5xx, every retry":
            slack.server_error(method, 500, times=ATTEMPTS)
        case "internal_error":
            slack.fail(method, "internal_error", times=1)
        case "hang":
            slack.delay(method, HANG)
        case _:
            raise AssertionError(fault)


def plan_id(blocks: list[dict[str, Any]]) -> str:
    [actions] = [b for b in blocks if b["type"] == "actions"]
    return str(actions["elements"][0]["value"])


def in_channel_replies(slack: FakeSlack) -> list[Call]:
    return [c for c in slack.calls_to("response_url/default") if c.params.get("response_type") == "in_channel"]


async def in_channel_reply(slack: FakeSlack, what: str) -> Call:
    [reply] = await wait_until(lambda: in_channel_replies(slack), what)
    return reply


async def click(bot: Bot, action_id: str, approval_id: str, user: str, message_ts: str) -> None:
    body = bot.slack.block_actions_body(
        action_id, approval_id, user_id=user, response_url=bot.slack.response_url(user), message_ts=message_ts
    )
    assert (await bot.post(body)).status == 200


async def calls_with(slack: FakeSlack, method: str, found: Callable[[Call], bool], what: str) -> list[Call]:
    return await wait_until(lambda: [c for c in slack.calls_to(method) if found(c)], what)


# -- a command's reply ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["503, then ok", "service_unavailable, then ok"])
async def test_a_post_slack_provably_did_not_make_is_retried_into_the_channel(
    slack_bot: Bot, fake_slack: FakeSlack, fault: str
) -> None:
    inject(fake_slack, POST, fault)
    await slack_bot.command("health all")
    posts = await fake_slack.wait_for(POST, count=2 if fault.startswith("service") else ATTEMPTS, timeout=10)
    assert "Health of all services" in all_text(posts[-1])
    assert posts[-1].params["channel"] == "C0OPS"
    await wait_until(lambda: slack_bot.container.deps.running.count == 0, "the command finishes")
    assert len(fake_slack.calls_to(POST)) == len(posts)  # posted once, after the failures
    assert in_channel_replies(fake_slack) == []


@pytest.mark.parametrize("fault", ["5xx, every retry", "internal_error", "hang", "connection refused"])
async def test_a_reply_slack_failed_or_may_have_posted_comes_through_response_url(
    slack_bot: Bot, fake_slack: FakeSlack, fault: str
) -> None:
    client = slack_bot.container.slack
    assert client is not None
    if fault == "connection refused":
        await slack_bot.command("help")  # Bolt checks the token (auth.test) on the first request
        await fake_slack.wait_for("response_url/default")
        client.base_url = UNREACHABLE_API
    else:
        inject(fake_slack, POST, fault)
    try:
        await slack_bot.command("health all")
        reply = await in_channel_reply(fake_slack, "the report comes through response_url")
    finally:
        client.base_url = fake_slack.base_url
    assert "Health of all services" in json.dumps(reply.params["blocks"])
    expected_posts = {"5xx, every retry": ATTEMPTS, "internal_error": 1, "hang": 1, "connection refused": 0}[fault]
    # A hung post reaches the fake's record only when it answers (after the bot gave up on it).
    await fake_slack.wait_for(POST, count=expected_posts, timeout=10)
    await wait_until(lambda: slack_bot.container.deps.running.count == 0, "the command finishes")
    assert len(fake_slack.calls_to(POST)) == expected_posts  # never posted again after it may have landed
    assert len(in_channel_replies(fake_slack)) == 1
    [event] = [e for e in await slack_bot.container.store.audit_events() if e.command == "health"]
    assert event.outcome == "ok"


# -- an approval's plan --------------------------------------------------------------------------


async def test_a_plan_slack_provably_did_not_post_is_retried_with_its_buttons(
    slack_bot: Bot, fake_slack: FakeSlack
) -> None:
    inject(fake_slack, POST, "503, then ok")
    await slack_bot.command("jobs reset-stuck pipeline", user=REQUESTER)
    posts = await fake_slack.wait_for(POST, count=ATTEMPTS, timeout=10)
    assert [c.status for c in posts] == [503] * (ATTEMPTS - 1) + [200]
    approval = await slack_bot.approval_posted(plan_id(posts[-1].json_param("blocks")))
    await click(slack_bot, APPROVE, approval.id, APPROVER, str(approval.message_ts))
    final = await slack_bot.settled(approval)
    assert final.state is ApprovalState.SUCCEEDED
    assert in_channel_replies(fake_slack) == []


@pytest.mark.parametrize("fault", ["5xx, every retry", "internal_error", "hang"])
async def test_a_plan_slack_failed_to_post_comes_through_response_url_and_its_buttons_work(
    slack_bot: Bot, fake_slack: FakeSlack, fault: str
) -> None:
    inject(fake_slack, POST, fault)
    await slack_bot.command("jobs reset-stuck pipeline", user=REQUESTER)
    plan = await in_channel_reply(fake_slack, "the plan comes through response_url")
    fake_slack.delay(POST, 0)
    assert "Approval needed" in all_text(plan)
    approval_id = plan_id(plan.params["blocks"])
    assert f"an approver can also run `/ops approve {approval_id}`" in all_text(plan)
    waiting = await slack_bot.container.store.get_approval(approval_id)
    assert waiting is not None and waiting.state is ApprovalState.PENDING
    assert waiting.message_ts is None  # response_url gives no ts: the first click will tell

    # The click comes from the message response_url posted; its ts is where the approval is shown.
    await click(slack_bot, APPROVE, approval_id, APPROVER, CLICKED_TS)
    final = await slack_bot.settled(waiting)
    assert final.state is ApprovalState.SUCCEEDED
    assert (final.message_channel, final.message_ts) == ("C0OPS", CLICKED_TS)
    await calls_with(fake_slack, POST, lambda c: c.params.get("thread_ts") == CLICKED_TS, "the result in the thread")
    if fault == "hang":  # the hung post answers late: let it, so it lands in this test's record
        await calls_with(fake_slack, POST, lambda c: "thread_ts" not in c.params, "the hung post")
    assert len(in_channel_replies(fake_slack)) == 1


async def test_a_plan_slack_failed_to_post_can_be_approved_by_command(slack_bot: Bot, fake_slack: FakeSlack) -> None:
    inject(fake_slack, POST, "internal_error")
    await slack_bot.command("jobs reset-stuck pipeline", user=REQUESTER)
    plan = await in_channel_reply(fake_slack, "the plan comes through response_url")
    approval_id = plan_id(plan.params["blocks"])

    await slack_bot.command(f"approve {approval_id}", user=APPROVER)

    async def finished() -> Approval | None:
        current = await slack_bot.container.store.get_approval(approval_id)
        return current if current is not None and current.state.final else None

    final = await wait_until(finished, "the approved plan runs", timeout=20)
    assert final.state is ApprovalState.SUCCEEDED
    assert final.message_ts is None and fake_slack.calls_to(EDIT) == []  # no message to edit, and no error


# -- edits of an approval's message --------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "failures"), [("503, then ok", ATTEMPTS - 1), ("5xx, every retry", ATTEMPTS), ("internal_error", 1)]
)
async def test_the_final_edit_of_an_approval_message_is_retried_until_slack_takes_it(
    slack_bot: Bot, fake_slack: FakeSlack, fault: str, failures: int
) -> None:
    posted = await request_plan(slack_bot, fake_slack)
    inject(fake_slack, EDIT, fault)
    await click(slack_bot, DENY, posted.id, APPROVER, str(posted.message_ts))
    final = await slack_bot.settled(posted)
    assert final.state is ApprovalState.DENIED
    edits = await final_edits(slack_bot, final, count=failures + 1)
    assert len(edits) == failures + 1  # the failed ones, then the one Slack took


async def test_a_hung_edit_of_an_approval_message_is_tried_again(slack_bot: Bot, fake_slack: FakeSlack) -> None:
    posted = await request_plan(slack_bot, fake_slack)
    inject(fake_slack, EDIT, "hang")
    with structlog.testing.capture_logs() as logs:
        await click(slack_bot, DENY, posted.id, APPROVER, str(posted.message_ts))
        await fake_slack.wait_for(EDIT, timeout=10)  # the first, hung edit answers at last
        fake_slack.delay(EDIT, 0)
        final = await slack_bot.settled(posted)
        await wait_until(lambda: slack_bot.container.deps.running.count == 0, "the click is handled")
    assert final.state is ApprovalState.DENIED
    retried, failed = events(logs, "slack_edit_retry"), edit_failures(logs)
    assert retried and all(e["reason"] == "timeout" for e in retried)
    # The first, hung attempt was recorded late (above); a retry after its timeout was taken. (Later
    # hung attempts may be dropped by the server when the client gives up: not counted on.)
    edits = await final_edits(slack_bot, final, count=2)
    assert len(edits) >= 2 and failed  # tried again after the timeout, and Slack took it


async def test_a_final_edit_slack_keeps_refusing_is_tried_again_in_the_background(
    slack_bot: Bot, fake_slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handlers.slack, "EDIT_RETRY_SECONDS", 0.3)  # a retry or two in line, then the background
    monkeypatch.setattr(handlers.slack, "FINAL_EDIT_RETRIES", (0.1, 0.1, 0.1, 0.1))
    posted = await request_plan(slack_bot, fake_slack)
    fake_slack.fail(EDIT, "internal_error", times=3)  # longer than the retries in line
    with structlog.testing.capture_logs() as logs:
        await click(slack_bot, DENY, posted.id, APPROVER, str(posted.message_ts))
        final = await slack_bot.settled(posted)
        await wait_until(lambda: events(logs, "approval_message_edited_late"), "the late edit is logged")
    assert final.state is ApprovalState.DENIED
    assert len(edit_failures(logs)) == 3
    assert len(await final_edits(slack_bot, final, count=4)) == 4
    assert events(logs, "approval_final_edit_lost") == []


async def test_a_final_edit_slack_never_takes_is_logged_as_lost(
    slack_bot: Bot, fake_slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handlers.slack, "EDIT_RETRY_SECONDS", 0.3)
    monkeypatch.setattr(handlers.slack, "FINAL_EDIT_RETRIES", (0.1, 0.1))
    posted = await request_plan(slack_bot, fake_slack)
    fake_slack.fail(EDIT, "fatal_error")
    with structlog.testing.capture_logs() as logs:
        await click(slack_bot, DENY, posted.id, APPROVER, str(posted.message_ts))
        [lost] = await wait_until(lambda: events(logs, "approval_final_edit_lost"), "the lost edit is logged")
    assert (lost["approval"], lost["state"], lost["log_level"]) == (posted.id, "denied", "error")
    failed = edit_failures(logs)
    assert len(fake_slack.calls_to(EDIT)) == len(failed) >= 3  # in line, then twice in the background


async def request_plan(bot: Bot, slack: FakeSlack) -> Approval:
    await bot.command("jobs reset-stuck pipeline", user=REQUESTER)
    [post] = await slack.wait_for(POST)
    return await bot.approval_posted(plan_id(post.json_param("blocks")))


async def final_edits(bot: Bot, final: Approval, count: int) -> list[Call]:
    """The edits of ``final``'s message that show its final state, once there are ``count`` of them."""
    line = status_line(bot.container.deps.approvals, final)

    def found() -> list[Call]:
        edits = [c for c in bot.slack.calls_to(EDIT) if c.params.get("ts") == final.message_ts and line in all_text(c)]
        return edits if len(edits) >= count else []

    return await wait_until(found, f"{count} edit(s) of the message say {line!r}", timeout=30)


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e.get("event") == name]


def edit_failures(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    """Each failed attempt to edit: retried in line, or given up on in line (then in the background)."""
    return events(logs, "slack_edit_retry") + events(logs, "approval_message_edit_failed")


async def test_the_fake_answers_5xx_like_slack_s_edge(fake_slack: FakeSlack) -> None:
    client = AsyncWebClient(token="xoxb-test", base_url=fake_slack.base_url)
    fake_slack.server_error(POST, 502, times=1)
    with pytest.raises(SlackApiError) as info:
        await client.chat_postMessage(channel="C1", text="x")
    assert info.value.response.status_code == 502
    assert (await client.chat_postMessage(channel="C1", text="x"))["ok"]
    assert [c.status for c in fake_slack.calls_to(POST)] == [502, 200]
