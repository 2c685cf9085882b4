"""Approvals end to end: a signed /ops request, the plan with its buttons, signed clicks, one run."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog.testing

from handlers.approvals import APPROVE, CANCEL, DENY, sweep
from services.state import Approval, ApprovalState
from tests.fixtures.servers import PostgresServer, free_port
from tests.fixtures.slack import Call, FakeSlack, sign
from tests.fixtures.wait import wait_until
from tests.scenario.harness import SIGNING_SECRET, Bot, inventory, running_bot

REQUESTER = "U0REQ1"  # operator
APPROVER = "U0APP1"
APPROVER_2 = "U0APP2"
BOSS = "U0BOSS"  # operator and approver: asks, but may not approve their own destructive request
VIEWER = "U0VIEW1"
CLICKERS = [f"U0C{n:03d}" for n in range(50)]  # approvers for the click race
S = ApprovalState

JOBS_SQL = """
CREATE TABLE jobs (
    id bigint PRIMARY KEY,
    status text NOT NULL,
    started_at timestamptz,
    error_message text
);
INSERT INTO jobs VALUES
    (1, 'processing', now() - interval '3 hours', NULL),
    (2, 'processing', now() - interval '2 hours', NULL),
    (3, 'processing', now() - interval '90 minutes', NULL),
    (4, 'processing', now() - interval '10 minutes', NULL),
    (5, 'done', now() - interval '5 hours', NULL);
"""


def pipeline_inventory(*, extra: str = "", timeout: int = 5) -> str:
    approvers = ", ".join([APPROVER, APPROVER_2, BOSS, *CLICKERS])
    return f"""
health: {{deadline: {max(10, timeout)}}}
roles:
  viewer: [{VIEWER}]
  operator: [{REQUESTER}]
  approver: [{approvers}]
services:
  pipeline:
    components:
      db:
        type: postgres
        dsn: "${{PIPE_DB}}"
        timeout: {timeout}
        jobs: {{}}
{extra}
"""


async def create_jobs_db(server: PostgresServer, sql: str = JOBS_SQL) -> str:
    """A fresh database holding the jobs table; its DSN."""
    return await server.database_with(sql)


@pytest.fixture
async def jobs_dsn(postgres_server: PostgresServer) -> str:
    return await create_jobs_db(postgres_server)


async def jobs_state(dsn: str) -> dict[int, tuple[str, bool, str | None]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id, status, started_at IS NULL AS cleared, error_message FROM jobs ORDER BY id")
    finally:
        await conn.close()
    return {r["id"]: (r["status"], r["cleared"], r["error_message"]) for r in rows}


@dataclass
class World:
    bot: Bot
    slack: FakeSlack
    dsn: str

    async def request(
        self, user: str = REQUESTER, channel: str = "C0OPS", text: str = "jobs reset-stuck pipeline"
    ) -> Approval:
        before = len(self.slack.calls_to("chat.postMessage"))
        answer = await self.bot.command(text, user=user, channel=channel)
        assert answer.status == 200
        return await self.bot.plan_posted(before)

    async def click(self, action_id: str, approval: Approval, user: str, **kwargs: Any) -> int:
        body = self.slack.block_actions_body(
            action_id, approval.id, user_id=user, response_url=self.slack.response_url(user), **kwargs
        )
        return (await self.bot.post(body)).status

    async def answer_to(self, user: str, timeout: float = 10) -> str:  # noqa: ASYNC109
        [call] = await self.slack.wait_for(f"response_url/{user}", timeout=timeout)
        return str(call.params["text"])

    async def settled(self, approval: Approval) -> Approval:
        return await self.bot.settled(approval)

    async def events(self, command: str) -> list[Any]:
        return [e for e in await self.bot.container.store.audit_events(limit=500) if e.command == command]


@contextlib.asynccontextmanager
async def open_world(
    fake_slack: FakeSlack, tmp_path: Path, jobs_dsn: str, *, extra: str = "", **state: str
) -> AsyncIterator[World]:
    loaded = inventory(pipeline_inventory(extra=extra), env={"PIPE_DB": jobs_dsn})
    async with running_bot(fake_slack, tmp_path, loaded, **state) as bot:
        yield World(bot, fake_slack, jobs_dsn)


@pytest.fixture(params=["sqlite", "postgres"])
async def world(
    request: pytest.FixtureRequest, fake_slack: FakeSlack, tmp_path: Path, jobs_dsn: str
) -> AsyncIterator[World]:
    """The bot with its state in SQLite, and again in PostgreSQL."""
    state: dict[str, str] = {}
    if request.param == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        state["OPSBOT_STATE_URL"] = server.dsn(await server.create_database())
    async with open_world(fake_slack, tmp_path, jobs_dsn, **state) as world:
        assert world.bot.container.store.kind == request.param
        yield world


def edits(slack: FakeSlack) -> list[Call]:
    return slack.calls_to("chat.update")


def texts(call: Call) -> str:
    return str(call.params.get("text", "")) + str(call.params.get("blocks", ""))


async def test_request_shows_the_plan_and_approve_runs_it_once(world: World) -> None:
    approval = await world.request()
    [post] = world.slack.calls_to("chat.postMessage")
    blocks = post.params["blocks"]
    shown = str(blocks)
    assert "Reset 3 job(s) stuck in `processing` for over 60 min in pipeline/db" in shown
    assert all(f"job `{n}`" in shown for n in (1, 2, 3)) and "job `4`" not in shown
    buttons = blocks[-1]["elements"]
    assert [b["action_id"] for b in buttons] == [APPROVE, DENY, CANCEL]
    assert {b["value"] for b in buttons} == {approval.id}  # the button carries the id, nothing else
    assert "Reset 3 job(s)" in buttons[0]["confirm"]["text"]["text"]
    assert approval.state is S.PENDING and approval.requester == REQUESTER
    assert approval.plan["params"]["ids"] == ["1", "2", "3"]

    started = time.perf_counter()
    assert await world.click(APPROVE, approval, APPROVER) == 200
    assert time.perf_counter() - started < 1.5  # the click is acked before the run
    assert await world.answer_to(APPROVER) == "Approved. The run starts now."
    final = await world.settled(approval)
    assert final.state is S.SUCCEEDED and final.decided_by == APPROVER
    assert final.result.startswith("Reset 3 of 3 job(s) to pending.")

    jobs = await jobs_state(world.dsn)
    assert [jobs[n][:2] for n in (1, 2, 3)] == [("pending", True)] * 3
    assert all("reset by opsbot" in str(jobs[n][2]) for n in (1, 2, 3))
    assert jobs[4] == ("processing", False, None) and jobs[5] == ("done", False, None)

    updates = [texts(c) for c in edits(world.slack)]
    assert any("Running" in u for u in updates) and "Done" in updates[-1]
    assert all(c.params["ts"] == final.message_ts for c in edits(world.slack))
    thread = [c for c in world.slack.calls_to("chat.postMessage") if c.params.get("thread_ts") == final.message_ts]
    assert thread and "Reset 3 of 3" in texts(thread[-1])
    lifecycle = [e.command for e in reversed(await world.bot.container.store.audit_events(limit=50))]
    assert [c for c in lifecycle if c.startswith("approval")] == [
        "approval requested",
        "approval approved",
        "approval started",
        "approval succeeded",
    ]
    assert await world.bot.container.store.verify_audit() is None
    _, metrics = await world.bot.get("/metrics")
    assert 'opsbot_approval_events_total{action="jobs reset-stuck",event="succeeded"} 1.0' in metrics


async def test_fifty_concurrent_approve_clicks_run_it_exactly_once(world: World) -> None:
    approval = await world.request()
    statuses = await asyncio.gather(*(world.click(APPROVE, approval, user) for user in CLICKERS))
    assert statuses == [200] * 50
    final = await world.settled(approval)
    assert final.state is S.SUCCEEDED
    assert len(await world.events("approval started")) == 1
    answers = [await world.answer_to(user) for user in CLICKERS]
    assert answers.count("Approved. The run starts now.") == 1
    assert all(
        a.startswith("Already approved by") or a.startswith("This already ran") for a in answers if "starts" not in a
    )
    assert len(await world.events("approval approve refused")) == 49


async def test_self_approval_of_a_destructive_request_is_refused(world: World) -> None:
    approval = await world.request(user=BOSS)
    await world.click(APPROVE, approval, BOSS)
    assert await world.answer_to(BOSS) == "You asked for this, so someone else has to approve it."
    assert (await world.bot.container.store.get_approval(approval.id)).state is S.PENDING  # type: ignore[union-attr]
    [refused] = await world.events("approval approve refused")
    assert (refused.actor, refused.outcome, refused.detail) == (BOSS, "refused", "self-approval")


async def test_a_non_approvers_click_is_refused_and_audited(world: World) -> None:
    approval = await world.request()
    for user in (REQUESTER, VIEWER, "U0STRANGER"):
        await world.click(APPROVE, approval, user)
        assert (await world.answer_to(user)).startswith("Approving this needs the approver role; you are ")
    assert (await world.bot.container.store.get_approval(approval.id)).state is S.PENDING  # type: ignore[union-attr]
    refused = await world.events("approval approve refused")
    assert sorted(e.actor for e in refused) == sorted([REQUESTER, VIEWER, "U0STRANGER"])
    assert {e.outcome for e in refused} == {"denied"}
    assert (await jobs_state(world.dsn))[1][0] == "processing"


async def test_approve_after_expiry_is_refused_and_the_message_says_expired(world: World) -> None:
    approval = await world.request()
    engine = world.bot.container.deps.approvals
    engine.clock = lambda: datetime.now(UTC) + timedelta(minutes=16)
    await world.click(APPROVE, approval, APPROVER)
    answer = await world.answer_to(APPROVER)
    assert answer.startswith("This request expired at ") and "/ops jobs reset-stuck pipeline" in answer
    stored = await world.bot.container.store.get_approval(approval.id)
    assert stored is not None and stored.state is S.EXPIRED
    await wait_until(lambda: any("Expired" in texts(e) for e in edits(world.slack)), "the message says Expired")
    assert (await jobs_state(world.dsn))[1][0] == "processing"


async def test_the_sweeper_edits_expired_requests_without_a_click(world: World) -> None:
    approval = await world.request()
    deps = world.bot.container.deps
    await sweep(deps)
    assert edits(world.slack) == []  # nothing due yet
    deps.approvals.clock = lambda: datetime.now(UTC) + timedelta(minutes=15, seconds=1)
    await sweep(deps)
    [edit] = edits(world.slack)
    assert edit.params["ts"] == approval.message_ts and "Expired" in texts(edit)
    assert "approval_approve" not in texts(edit)  # the buttons are gone
    assert len(await world.events("approval expired")) == 1


async def test_deny_ends_it_and_nothing_runs(world: World) -> None:
    approval = await world.request()
    await world.click(DENY, approval, APPROVER)
    assert await world.answer_to(APPROVER) == "Denied. Nothing will run."
    await world.click(APPROVE, approval, APPROVER_2)
    assert (await world.answer_to(APPROVER_2)).startswith(f"This request was denied by <@{APPROVER}>")
    assert (await world.bot.container.store.get_approval(approval.id)).state is S.DENIED  # type: ignore[union-attr]
    await wait_until(lambda: any("Denied" in texts(e) for e in edits(world.slack)), "the message says Denied")
    assert (await jobs_state(world.dsn))[1][0] == "processing"


async def test_only_the_requester_may_cancel(world: World) -> None:
    approval = await world.request()
    await world.click(CANCEL, approval, APPROVER)
    assert await world.answer_to(APPROVER) == f"Only <@{REQUESTER}>, who asked for it, can cancel this request."
    assert (await world.bot.container.store.get_approval(approval.id)).state is S.PENDING  # type: ignore[union-attr]
    await world.click(CANCEL, approval, REQUESTER)
    assert await world.answer_to(REQUESTER) == "Cancelled. Nothing will run."
    assert (await world.bot.container.store.get_approval(approval.id)).state is S.CANCELLED  # type: ignore[union-attr]


async def test_fingerprint_drift_stops_the_run_and_says_what_changed(world: World) -> None:
    approval = await world.request()
    conn = await asyncpg.connect(world.dsn)
    try:  # job 2 finishes between the plan and the approval
        await conn.execute("UPDATE jobs SET status = 'done' WHERE id = 2")
    finally:
        await conn.close()
    await world.click(APPROVE, approval, APPROVER)
    final = await world.settled(approval)
    assert final.state is S.FAILED
    assert final.result.startswith("Did not run: what the plan saw has changed")
    assert "job 2: processing since" in final.result and "→ done since" in final.result
    jobs = await jobs_state(world.dsn)
    assert jobs[1][0] == "processing" and jobs[3][0] == "processing" and jobs[2][0] == "done"
    assert len(await world.events("approval drift")) == 1


async def test_a_replayed_old_click_is_rejected_and_a_forged_id_is_refused(world: World) -> None:
    approval = await world.request()
    body = world.slack.block_actions_body(APPROVE, approval.id, user_id=APPROVER)
    stale = sign(SIGNING_SECRET, body, timestamp=int(time.time()) - 301)
    answer = await world.bot.post(body, headers={"Content-Type": "application/x-www-form-urlencoded", **stale})
    assert answer.status == 401
    for forged, user in (("zzzzzzzz", "U0C001"), ("'; DROP TABLE approvals; --", "U0C002")):
        body = world.slack.block_actions_body(
            APPROVE, forged, user_id=user, response_url=world.slack.response_url(user)
        )
        assert (await world.bot.post(body)).status == 200
    assert await world.answer_to("U0C001") == "There is no approval `zzzzzzzz`."
    assert (await world.answer_to("U0C002")).endswith("is not an approval id (they look like `k3xm9q2p`).")
    assert (await world.bot.container.store.get_approval(approval.id)).state is S.PENDING  # type: ignore[union-attr]
    assert len(await world.events("approval approve")) == 2  # both refusals are audited


async def test_a_slack_retry_of_a_click_does_nothing_more(world: World) -> None:
    approval = await world.request()
    await world.click(APPROVE, approval, APPROVER)
    await world.settled(approval)
    body = world.slack.block_actions_body(
        APPROVE, approval.id, user_id=APPROVER, response_url=world.slack.response_url("retry")
    )
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Retry-Num": "1",
        **sign(SIGNING_SECRET, body),
    }
    with structlog.testing.capture_logs() as logs:
        assert (await world.bot.post(body, headers=headers)).status == 200
        [retry] = await world.slack.wait_for("response_url/retry")
    assert str(retry.params["text"]).startswith("This already ran (succeeded)")
    assert any(e.get("event") == "slack_retry_of_click" and e.get("retry") == "1" for e in logs)
    assert len(await world.events("approval started")) == 1


async def test_a_second_destructive_request_on_a_busy_service_is_refused_naming_the_run(world: World) -> None:
    approval = await world.request()
    locks = world.bot.container.deps.approvals.locks
    assert await locks.acquire("service:pipeline", approval.id) is None  # as if its run were under way
    try:
        await world.bot.command("jobs reset-stuck pipeline", user=REQUESTER)
        [answer] = await world.slack.wait_for("response_url/default")
        assert str(answer.params["text"]).startswith(f"`pipeline` is busy: approval `{approval.id}`")
        await world.click(APPROVE, approval, APPROVER)
        final = await world.settled(approval)
        assert final.state is S.FAILED and final.result.startswith("Did not start: `pipeline` is busy")
    finally:
        await locks.release("service:pipeline", approval.id)
    assert (await jobs_state(world.dsn))[1][0] == "processing"


async def test_runs_left_running_by_a_dead_process_become_interrupted(world: World) -> None:
    approval = await world.request()
    store = world.bot.container.store
    now = datetime.now(UTC)
    await store.vote_approval(approval.id, APPROVER, at=now)
    await store.transition_approval(approval.id, [S.APPROVED], S.RUNNING, at=now)  # and then the process died
    await sweep(world.bot.container.deps)
    final = await store.get_approval(approval.id)
    assert final is not None and final.state is S.INTERRUPTED
    assert "Interrupted" in texts(edits(world.slack)[-1])
    told = [c for c in world.slack.calls_to("chat.postMessage") if "was interrupted" in texts(c)]
    assert len(told) == 1 and told[0].params["channel"] == "C0OPS"


async def test_two_approver_policy_needs_two_distinct_people(
    fake_slack: FakeSlack, tmp_path: Path, jobs_dsn: str
) -> None:
    extra = 'approvals:\n  commands:\n    "jobs reset-stuck": {critical: true}\n'
    async with open_world(fake_slack, tmp_path, jobs_dsn, extra=extra) as world:
        approval = await world.request()
        assert approval.required_approvals == 2
        await world.click(APPROVE, approval, APPROVER)
        assert await world.answer_to(APPROVER) == "Your approval is counted; it needs 1 more approver(s)."
        fake_slack.reset()
        await world.click(APPROVE, approval, APPROVER)
        assert await world.answer_to(APPROVER) == "You have already approved this; it still needs 1 more approver(s)."
        assert (await world.bot.container.store.get_approval(approval.id)).state is S.PENDING  # type: ignore[union-attr]
        await world.click(APPROVE, approval, APPROVER_2)
        assert await world.answer_to(APPROVER_2) == "Approved. The run starts now."
        final = await world.settled(approval)
        assert final.state is S.SUCCEEDED and [v.voter for v in final.votes] == [APPROVER, APPROVER_2]


async def test_destructive_requests_only_from_the_configured_channels(
    fake_slack: FakeSlack, tmp_path: Path, jobs_dsn: str
) -> None:
    async with open_world(fake_slack, tmp_path, jobs_dsn, extra="approvals:\n  channels: [C0OPS]\n") as world:
        await world.bot.command("jobs reset-stuck pipeline", user=REQUESTER, channel="C0RANDOM")
        [answer] = await fake_slack.wait_for("response_url/default")
        assert answer.params["text"] == "Destructive commands may only be requested in <#C0OPS>."
        assert answer.params["response_type"] == "ephemeral"
        assert await world.bot.container.store.list_approvals([S.PENDING]) == []
        approval = await world.request(channel="C0OPS")
        assert approval.state is S.PENDING


async def test_read_commands_jobs_approvals_and_audit(world: World) -> None:
    await world.bot.command("jobs pipeline", user=VIEWER)
    [answer] = await world.slack.wait_for("response_url/default")
    shown = texts(answer)
    assert "done 1, processing 4" in shown and "3 stuck" in shown
    approval = await world.request()
    world.slack.reset()
    await world.bot.command("approvals", user=APPROVER)
    [mine] = await world.slack.wait_for("response_url/default")
    assert approval.id in texts(mine) and "approve or deny" in texts(mine)
    world.slack.reset()
    await world.bot.command("approvals", user=VIEWER)
    [none] = await world.slack.wait_for("response_url/default")
    assert none.params["text"].startswith("Nothing is waiting for you")
    world.slack.reset()
    await world.bot.command(f"audit pipeline --user <@{REQUESTER}|req> --limit 5", user=VIEWER)
    [audit] = await world.slack.wait_for("response_url/default")
    assert "approval requested" in texts(audit) and "jobs reset-stuck" in texts(audit)
    world.slack.reset()
    await world.bot.command("audit --user bob", user=VIEWER)
    [bad] = await world.slack.wait_for("response_url/default")
    assert "a Slack mention" in bad.params["text"]
    world.slack.reset()
    await world.bot.command("jobs reset-stuck nosuch", user=REQUESTER)
    [unknown] = await world.slack.wait_for("response_url/default")
    assert unknown.params["text"].startswith("There is no service called `nosuch`")


async def test_a_pending_request_survives_a_restart_of_the_bot(
    fake_slack: FakeSlack, tmp_path: Path, jobs_dsn: str
) -> None:
    async with open_world(fake_slack, tmp_path, jobs_dsn) as before:
        approval = await before.request()
    async with open_world(fake_slack, tmp_path, jobs_dsn) as after:  # same state, a new process
        await sweep(after.bot.container.deps)  # what `serve` does first: nothing to expire or recover
        assert (await after.bot.container.store.get_approval(approval.id)).state is S.PENDING  # type: ignore[union-attr]
        await after.click(APPROVE, approval, APPROVER)
        final = await after.settled(approval)
    assert final.state is S.SUCCEEDED
    assert (await jobs_state(jobs_dsn))[1][:2] == ("pending", True)


async def test_bad_input_to_the_new_commands_gets_one_sentence_and_nothing_runs(world: World) -> None:
    cases = {
        "jobs": "Missing `service`. Usage: `/ops jobs <service> [component]`",
        "jobs pipeline nosuch": "`pipeline` has no jobs table in a component called `nosuch`; known: `db`.",
        "audit --limit 0": "`--limit`: input should be greater than or equal to 1.",
        "audit --limit 1000": "`--limit`: input should be less than or equal to 100.",
        "audit nosuch": "There is no service called `nosuch`.",
        "approve": "Missing `approval_id`. Usage: `/ops approve <id>`",
        "deny ZZ-not-an-id": "`zz-not-an-id` is not an approval id (they look like `k3xm9q2p`).",
        "cancel abcdefgh": "There is no approval `abcdefgh`.",
    }
    for text, expected in cases.items():
        world.slack.reset()
        await world.bot.command(text, user=APPROVER)
        [answer] = await world.slack.wait_for("response_url/default")
        assert answer.params["response_type"] == "ephemeral"
        assert expected in answer.params["text"], (text, answer.params["text"])
        assert "Traceback" not in str(answer.params)
    assert await world.bot.container.store.list_approvals(list(S)) == []
    assert (await jobs_state(world.dsn))[1][0] == "processing"


async def test_an_unreachable_jobs_database_is_one_sentence_without_its_password(
    fake_slack: FakeSlack, tmp_path: Path
) -> None:
    dsn = f"postgresql://app:s3cret-Pw-91@127.0.0.1:{free_port()}/jobs"
    async with open_world(fake_slack, tmp_path, dsn) as world:
        for text in ("jobs pipeline", "jobs reset-stuck pipeline"):
            fake_slack.reset()
            await world.bot.command(text, user=REQUESTER)
            [answer] = await fake_slack.wait_for("response_url/default")
            assert answer.params["response_type"] == "ephemeral"
            assert "connection refused" in answer.params["text"].lower(), answer.params["text"]
            assert "s3cret-Pw-91" not in "".join(c.raw.decode(errors="replace") for c in fake_slack.calls)
        events = await world.bot.container.store.audit_events()
        assert [e.outcome for e in events[:2]] == ["rejected", "rejected"]
        assert all("s3cret-Pw-91" not in e.detail + e.args for e in events)
        assert await world.bot.container.store.list_approvals(list(S)) == []
