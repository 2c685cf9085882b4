"""A user-group lookup that fails grants nothing, ever: through signed /ops commands and Approve clicks,
with Slack's usergroups.users.list answering ``ok: false``, timing out, or not reachable at all.

The roles of these users come only from user groups, and each test first lets the group be read
successfully, so an old answer is there to (wrongly) fall back on.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import bot.container
from handlers.approvals import APPROVE
from services.state import Approval, ApprovalState
from tests.fixtures.servers import PostgresServer
from tests.fixtures.slack import UNROUTED_RESPONSE_URL, FakeSlack
from tests.fixtures.wait import wait_until
from tests.scenario.harness import Bot, inventory, running_bot

LOOKUP = "usergroups.users.list"
OPERATOR = "U0GOPS1"  # an operator through S0OPS only
APPROVER = "U0GAPP1"  # an approver through S0APPROVERS only
REQUESTER = "U0REQ1"  # an operator by id: asks for the change the approver then tries to approve
REFUSAL = "opsbot could not check your Slack user groups just now, so nothing was done; try again in a minute."
CLIENT_TIMEOUT = 0.6  # seconds: the bot's Slack client timeout in the timeout case (10 s in production)
# Port 9 of loopback (discard): nothing listens, so every connection is refused at once.
UNREACHABLE_API = UNROUTED_RESPONSE_URL.split("/response_url")[0] + "/api/"

JOBS_SQL = """
CREATE TABLE jobs (id bigint PRIMARY KEY, status text NOT NULL, started_at timestamptz, error_message text);
INSERT INTO jobs VALUES (1, 'processing', now() - interval '3 hours', NULL);
"""


def group_inventory() -> str:
    return f"""
roles:
  viewer: ["*"]
  operator: [S0OPS, {REQUESTER}]
  approver: [S0APPROVERS]
services:
  pipeline:
    components:
      db:
        type: postgres
        dsn: "${{PIPE_DB}}"
        timeout: 5
        jobs: {{}}
"""


@pytest.fixture(params=["error_reply", "timeout", "connection_refused"])
def failure(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How Slack fails the lookup. For a timeout the bot's client gives up after CLIENT_TIMEOUT (set
    before the bot is built: the client and its session read it then), so the test stays fast."""
    if request.param == "timeout":
        monkeypatch.setattr(bot.container, "SLACK_TIMEOUT", CLIENT_TIMEOUT)
    return str(request.param)


@pytest.fixture
async def group_bot(
    failure: str, fake_slack: FakeSlack, tmp_path: Path, postgres_server: PostgresServer
) -> AsyncIterator[Bot]:
    """The bot, built after ``failure`` set its Slack client timeout."""
    fake_slack.set_usergroup("S0OPS", [OPERATOR])
    fake_slack.set_usergroup("S0APPROVERS", [APPROVER])
    dsn = await postgres_server.database_with(JOBS_SQL)
    async with running_bot(fake_slack, tmp_path, inventory(group_inventory(), env={"PIPE_DB": dsn})) as running:
        yield running


@contextlib.contextmanager
def lookup_failing(bot: Bot, how: str) -> Iterator[None]:
    """Make the bot's next usergroups.users.list (the only one in the window) fail ``how``; then Slack
    answers again."""
    client = bot.container.slack
    assert client is not None
    base_url = client.base_url
    if how == "error_reply":
        bot.slack.fail(LOOKUP, "fatal_error", times=1)
    elif how == "timeout":
        bot.slack.delay(LOOKUP, CLIENT_TIMEOUT + 1.0)
    else:
        # Only the lookup talks to the Web API in this window (answers go through response_url).
        client.base_url = UNREACHABLE_API
    try:
        yield
    finally:
        bot.slack.delay(LOOKUP, 0)
        client.base_url = base_url


async def command(bot: Bot, text: str, user: str, answers_to: str) -> None:
    """A signed /ops from ``user`` whose answers go to ``response_url/<answers_to>``."""
    body = bot.slack.slash_body(text, user_id=user, response_url=bot.slack.response_url(answers_to))
    assert (await bot.post(body)).status == 200


async def answers_to(bot: Bot, name: str, count: int) -> list[str]:
    calls = await bot.slack.wait_for(f"response_url/{name}", count=count, timeout=15)
    assert all(c.params.get("response_type") == "ephemeral" for c in calls)
    return [str(c.params["text"]) for c in calls]


async def settle_lookups(bot: Bot, how: str, before: int, after: int) -> None:
    """Slack saw ``before`` lookups, then the failed one (unless it never got there), then ``after``;
    waiting for them all keeps a delayed answer from landing in the next test."""
    failed = 0 if how == "connection_refused" else 1
    calls = await bot.slack.wait_for(LOOKUP, count=before + failed + after, timeout=10)
    assert len(calls) == before + failed + after  # the failure was never retried into a success


async def test_a_command_after_the_groups_cache_expired_is_refused_when_the_lookup_fails(
    group_bot: Bot, failure: str
) -> None:
    bot = group_bot
    await command(bot, "help", OPERATOR, "op")
    [help_text] = await answers_to(bot, "op", 1)
    assert "jobs reset-stuck" in help_text  # S0OPS was read: an operator, and the answer is cached
    lookups = len(bot.slack.calls_to(LOOKUP))
    bot.container.deps.roles.ttl = 0  # the cached membership has expired

    with lookup_failing(bot, failure):
        await command(bot, "jobs reset-stuck pipeline", OPERATOR, "op")
        answers = await answers_to(bot, "op", 2)
    assert answers[1] == REFUSAL
    assert bot.slack.calls_to("chat.postMessage") == []  # no plan was posted
    assert await bot.container.store.list_approvals(list(ApprovalState), limit=10) == []
    [event, *_] = await bot.container.store.audit_events(limit=10)
    assert (event.actor, event.command, event.args, event.outcome) == (
        OPERATOR, "jobs reset-stuck", "jobs reset-stuck pipeline", "error",
    )  # fmt: skip
    assert event.detail == REFUSAL

    # Slack answers again: the same command is planned, on what Slack says now.
    await command(bot, "jobs reset-stuck pipeline", OPERATOR, "op")
    await bot.slack.wait_for("chat.postMessage", timeout=15)
    await settle_lookups(bot, failure, lookups, 2)  # S0APPROVERS (failed), then S0APPROVERS and S0OPS
    assert len(bot.slack.calls_to("response_url/op")) == 2  # the refusal was the one answer


async def test_a_command_the_roles_held_without_groups_allow_still_runs_when_the_lookup_fails(
    group_bot: Bot, failure: str
) -> None:
    bot = group_bot
    await command(bot, "help", OPERATOR, "op")
    await answers_to(bot, "op", 1)
    bot.container.deps.roles.ttl = 0  # the cached membership has expired
    lookups = len(bot.slack.calls_to(LOOKUP))

    with lookup_failing(bot, failure):
        await command(bot, "schedules", OPERATOR, "op")  # read-only: everyone is a viewer
        answer = (await answers_to(bot, "op", 2))[1]
    assert answer != REFUSAL and "schedule" in answer
    [event, *_] = await bot.container.store.audit_events(limit=10)
    assert (event.actor, event.command, event.outcome) == (OPERATOR, "schedules", "ok")
    await settle_lookups(bot, failure, lookups, 0)


async def test_an_approve_click_is_refused_when_the_lookup_fails(group_bot: Bot, failure: str) -> None:
    bot = group_bot
    await command(bot, "help", APPROVER, "app")
    [help_reply] = await bot.slack.wait_for("response_url/app", timeout=15)
    assert "You are an approver." in str(help_reply.params["blocks"])  # S0APPROVERS was read, and cached
    approval = await request_change(bot)
    lookups = len(bot.slack.calls_to(LOOKUP))

    with lookup_failing(bot, failure):
        body = bot.slack.block_actions_body(
            APPROVE, approval.id, user_id=APPROVER, response_url=bot.slack.response_url("app")
        )
        assert (await bot.post(body)).status == 200
        answers = await answers_to(bot, "app", 2)
    assert answers[1] == REFUSAL
    stored = await bot.container.store.get_approval(approval.id)
    assert stored is not None and stored.state is ApprovalState.PENDING and not stored.votes
    events = await bot.container.store.audit_events(limit=20)
    [refused] = [e for e in events if e.command == "approval approve refused"]
    assert (refused.actor, refused.outcome) == (APPROVER, "error")
    assert refused.detail == "user group S0APPROVERS could not be checked"
    assert not [e for e in events if e.command in ("approval approved", "approval started")]
    await settle_lookups(bot, failure, lookups, 0)
    assert len(bot.slack.calls_to("response_url/app")) == 2


async def request_change(bot: Bot) -> Approval:
    await command(bot, "jobs reset-stuck pipeline", REQUESTER, "req")
    [post] = await bot.slack.wait_for("chat.postMessage", timeout=15)
    approval_id = post.params["blocks"][-1]["elements"][0]["value"]

    async def attached() -> Approval | None:
        found = await bot.container.store.get_approval(approval_id)
        return found if found is not None and found.message_ts else None

    return await wait_until(attached, f"approval {approval_id} is posted")
