"""/ops integrity fix end to end: signed Slack requests, the plan with its buttons, an approval, the result and
the re-check in the thread; the daily integrity schedule that fixes on a warning, with and without a
pre-approval; and the fix through `opsbot run`. Real PostgreSQL, the Qdrant REST fake, the fake Slack."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from qdrant_client import models

from bot.scheduler import build_scheduler
from handlers.approvals import APPROVE
from handlers.commands import policy_problems
from handlers.digest import build_digest
from services.access import SCHEDULER_USER
from services.inventory import parse_inventory
from services.state import Approval, ApprovalState
from tests.bot.test_cli import opsbot
from tests.fixtures.qdrant import FakeQdrant
from tests.fixtures.servers import PostgresServer, run_sql
from tests.fixtures.slack import FakeSlack
from tests.fixtures.wait import wait_until
from tests.scenario.harness import Bot, all_text, approval_id_of, inventory, running_bot

pytestmark = pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection:UserWarning")

S = ApprovalState
REQUESTER = "U0REQ1"
APPROVER = "U0APP1"
KEY = "qdr-scenario-K3y-77aa"
PASSWORD = "Pg-scenario-S3cret-41"
COLLECTION = "youtube_content"
CHANNEL = "C0OPSCHAN"
FIRE = datetime(2026, 11, 22, 18, 0, tzinfo=UTC)  # 03:00 in Seoul
ORPHANS = {"7", "50", "500"}


def yt_inventory(qdrant_url: str, *, pre: str = "", on_warning: str = "fix") -> str:
    return f"""
ops_channel: {CHANNEL}
timezone: Asia/Seoul
roles:
  operator: [{REQUESTER}]
  approver: [{APPROVER}]
approvals:
  schedules: {{{pre}}}
schedules:
  - {{name: daily-integrity, cron: "0 3 * * *", command: "integrity yt", on_warning: {on_warning}}}
services:
  yt:
    components:
      db:
        type: postgres
        dsn: ${{YT_DB}}
        timeout: 3
        jobs: {{table: jobs, stuck_after_minutes: 60}}
      vectors:
        type: qdrant
        url: {qdrant_url}
        api_key: ${{YT_QDRANT_KEY}}
        timeout: 3
        collections: [{COLLECTION}]
    integrity:
      database: db
      qdrant: vectors
      required_tables: [chunks, jobs]
      chunks:
        - {{table: chunks, id_column: id, collection: {COLLECTION}}}
  plain:
    components:
      db: {{type: postgres, dsn: "${{YT_DB}}"}}
"""


async def seed(dsn: str, fake: FakeQdrant) -> None:
    """Chunks 1..40 but 7 and 50; points 1..40 but 12, plus 50 and 500: orphans 7, 50, 500 (of 41 points),
    chunk 12 without a vector; job 1 stale (2 days), job 2 in processing for 2 hours only."""
    await run_sql(
        dsn,
        "create table chunks (id bigint primary key, body text)",
        "insert into chunks (id) select g from generate_series(1, 40) g where g <> 7",
        "create table jobs (id integer primary key, status text not null, started_at timestamptz, error_message text)",
        "insert into jobs values (1, 'processing', now() - interval '2 days', null), "
        "(2, 'processing', now() - interval '2 hours', null)",
    )
    client = fake.client()
    try:
        await client.create_collection(
            COLLECTION, vectors_config=models.VectorParams(size=2, distance=models.Distance.DOT)
        )
        ids = [*(i for i in range(1, 41) if i != 12), 50, 500]
        await client.upsert(COLLECTION, points=[models.PointStruct(id=i, vector=[0.5, 0.5]) for i in ids])
    finally:
        await client.close()
    fake.require_api_key(KEY)


async def points(fake: FakeQdrant) -> set[str]:
    client = fake.client(KEY)
    try:
        found, _ = await client.scroll(COLLECTION, limit=1000, with_payload=False)
    finally:
        await client.close()
    return {str(p.id) for p in found}


async def job_statuses(dsn: str) -> dict[int, str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {int(r["id"]): str(r["status"]) for r in await conn.fetch("select id, status from jobs")}
    finally:
        await conn.close()


@dataclass
class World:
    bot: Bot
    slack: FakeSlack
    fake: FakeQdrant
    dsn: str

    async def request(self, text: str) -> Approval:
        before = len(self.slack.calls_to("chat.postMessage"))
        assert (await self.bot.command(text, user=REQUESTER)).status == 200
        return await self.bot.plan_posted(before)

    async def approve(self, approval: Approval) -> Approval:
        body = self.slack.block_actions_body(
            APPROVE, approval.id, user_id=APPROVER, response_url=self.slack.response_url(APPROVER)
        )
        assert (await self.bot.post(body)).status == 200
        return await self.bot.settled(approval)

    async def answer(self, text: str, key: str) -> str:
        body = self.slack.slash_body(text, user_id=REQUESTER, response_url=self.slack.response_url(key))
        assert (await self.bot.post(body)).status == 200
        await self.slack.wait_for(f"response_url/{key}", timeout=20)
        await wait_until(lambda: self.bot.container.deps.running.count == 0, "the command finishes")
        *_, call = self.slack.calls_to(f"response_url/{key}")  # after any "Checking …" note
        return str(call.params["text"])

    async def fire(self) -> str:
        scheduler = build_scheduler(self.bot.container, holder="a", clock=lambda: FIRE + timedelta(seconds=20))
        assert scheduler is not None
        [fired] = await scheduler.tick()
        return fired.outcome

    def channel_posts(self) -> list[str]:
        return [all_text(c) for c in self.slack.calls_to("chat.postMessage") if c.params.get("channel") == CHANNEL]


@pytest.fixture
async def world(
    fake_slack: FakeSlack,
    fake_qdrant: FakeQdrant,
    postgres_server: PostgresServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[World]:
    dsn = await postgres_server.database_with(password=PASSWORD)
    await seed(dsn, fake_qdrant)
    pre = getattr(request, "param", "")
    loaded = inventory(yt_inventory(fake_qdrant.url, pre=pre), env={"YT_DB": dsn, "YT_QDRANT_KEY": KEY})
    async with running_bot(fake_slack, tmp_path / "state", loaded) as bot:
        yield World(bot, fake_slack, fake_qdrant, dsn)


async def test_the_fix_is_planned_approved_run_and_checked_again_in_the_thread(world: World) -> None:
    world.fake.support_snapshots()
    approval = await world.request("integrity fix yt")

    assert approval.summary == (
        f"In yt: delete 3 orphan vector(s) from `{COLLECTION}` and reset 1 job(s) in processing for over 1 day "
        "to `pending`"
    )
    plan = all_text(world.slack.calls_to("chat.postMessage")[-1])
    assert "`7`, `50`, `500`" in plan and "stale jobs of `db/jobs`: `1`" in plan
    assert "1 chunk(s) of `chunks` have no vector" in plan
    assert approval.plan["count"] == 4 and approval.plan["total"] == 41
    assert await points(world.fake) >= ORPHANS  # nothing deleted before the approval

    final = await world.approve(approval)

    assert final.state is S.SUCCEEDED, final.result
    assert not ORPHANS & await points(world.fake)
    assert await job_statuses(world.dsn) == {1: "pending", 2: "processing"}
    [snapshot] = world.fake.snapshots(COLLECTION)
    [thread] = [c for c in world.slack.calls_to("chat.postMessage") if c.params.get("thread_ts") == final.message_ts]
    said = all_text(thread)
    assert "Deleted 3 of 3 planned orphan vector(s); reset 1 of 1 stale job(s) to `pending`." in said
    assert f"snapshot of `{COLLECTION}` taken first: `{snapshot}`" in said
    assert "integrity check again: warning" in said  # chunk 12 still has no vector: not the fix's business
    assert "39 chunks, 38 vectors: 1 missing vector" in said
    assert KEY not in said and PASSWORD not in said

    # The warning the fix was for is gone: asked again, there is nothing to fix (and no approval).
    again = await world.answer("integrity fix yt", "again")
    assert again.startswith("Nothing to fix in `yt`: no orphan vector, and no job in processing for over 1 day.")
    assert len(await world.bot.container.store.list_approvals(list(S))) == 1


async def test_bad_input_is_one_plain_sentence_and_asks_for_nothing(world: World) -> None:
    unknown = await world.answer("integrity fix nosuch", "unknown")
    assert "There is no service called `nosuch`." in unknown
    undeclared = await world.answer("integrity fix plain", "plain")
    assert "`plain` declares no integrity check in the inventory" in undeclared
    await run_sql(world.dsn, "delete from chunks")
    emptied = await world.answer("integrity fix yt", "emptied")
    assert "is critical, so no fix is planned" in emptied and "the chunk table is empty" in emptied
    assert await world.bot.container.store.list_approvals(list(S)) == []
    assert len(await points(world.fake)) == 41


@pytest.mark.parametrize("world", ["daily-integrity: {command: integrity fix, max_items: 10, max_share_pct: 20}"],
                         indirect=True)  # fmt: skip
async def test_a_pre_approved_schedule_fixes_a_warning_unasked_and_says_so(world: World) -> None:
    outcome = await world.fire()

    assert outcome.startswith(
        ":large_yellow_circle: Integrity of yt: warning · then succeeded: /ops integrity fix yt"
    ), outcome
    [approval] = await world.bot.container.store.list_approvals(list(S))
    assert approval.state is S.SUCCEEDED and approval.decided_by == "schedule:daily-integrity"
    assert approval.requester == SCHEDULER_USER
    assert not ORPHANS & await points(world.fake)
    check, fixed = world.channel_posts()
    assert "Integrity of yt: warning" in check
    assert (
        "Pre-approved: schedule `daily-integrity` may run `/ops integrity fix` unasked up to 10 item(s) and 20 %; "
        "this plan: 4." in fixed
    )
    assert "approved by schedule:daily-integrity" in fixed and "integrity check again: warning" in fixed
    assert not any(approval_id_of(c) for c in world.slack.calls_to("chat.postMessage"))  # no buttons
    events = [(e.actor, e.command, e.outcome) for e in await world.bot.container.store.audit_events(limit=30)]
    assert ("schedule:daily-integrity", "approval approved", "approved") in events


@pytest.mark.parametrize("world", ["daily-integrity: {command: integrity fix, max_items: 10, max_share_pct: 5}"],
                         indirect=True)  # fmt: skip
async def test_above_the_share_ceiling_the_schedule_posts_the_fix_for_approval(world: World) -> None:
    outcome = await world.fire()

    assert "then pending: /ops integrity fix yt" in outcome
    [approval] = await world.bot.container.store.list_approvals(list(S))
    assert approval.state is S.PENDING
    [_, posted] = [c for c in world.slack.calls_to("chat.postMessage") if c.params.get("channel") == CHANNEL]
    assert approval_id_of(posted) == approval.id  # with its buttons
    assert "Posted for approval: it deletes 9.8 % (4 of 41), above the 5 % schedule `daily-integrity`" in (
        all_text(posted)
    )
    assert await points(world.fake) >= ORPHANS
    assert await job_statuses(world.dsn) == {1: "processing", 2: "processing"}


async def test_without_a_pre_approval_the_schedule_posts_the_fix_and_nothing_runs(world: World) -> None:
    outcome = await world.fire()

    assert "then pending: /ops integrity fix yt" in outcome
    [approval] = await world.bot.container.store.list_approvals(list(S))
    assert approval.state is S.PENDING and approval.requester == SCHEDULER_USER
    posted = world.channel_posts()[1]
    assert "Pre-approved" not in posted and "Posted for approval" not in posted
    assert await points(world.fake) >= ORPHANS

    final = await world.approve(await world.bot.approval_posted(approval.id))  # an approver presses the button
    assert final.state is S.SUCCEEDED and final.decided_by == APPROVER
    assert not ORPHANS & await points(world.fake)


async def test_a_healthy_check_asks_for_no_fix(world: World) -> None:
    await run_sql(world.dsn, "insert into chunks (id) values (7), (50), (500)", "delete from chunks where id = 12",
                  "update jobs set status = 'completed'")  # fmt: skip

    outcome = await world.fire()

    assert "Integrity of yt: healthy" in outcome and "then" not in outcome
    assert len(world.channel_posts()) == 1
    assert await world.bot.container.store.list_approvals(list(S)) == []


def test_on_warning_belongs_to_integrity_schedules_and_its_pre_approval_to_the_fix() -> None:
    text = yt_inventory("http://127.0.0.1:9", pre="daily-integrity: {command: integrity fix, max_items: 5}")
    env = {"YT_DB": "postgresql://u@127.0.0.1:9/db", "YT_QDRANT_KEY": KEY}
    assert policy_problems(parse_inventory(text, "t", env).inventory) == []
    wrong = text.replace('command: "integrity yt", on_warning: fix', 'command: "health yt", on_warning: fix')
    assert policy_problems(parse_inventory(wrong, "t", env).inventory) == [
        "schedules.0.on_warning: only an `integrity <service>` schedule can fix on a warning (this one runs "
        "`/ops health`)",
        "approvals.schedules.daily-integrity.command: schedule `daily-integrity` runs `/ops health`, not "
        "`/ops integrity fix`",
    ]
    no_fix = yt_inventory("http://127.0.0.1:9", pre="daily-integrity: {command: integrity fix, max_items: 5}",
                          on_warning="null")  # fmt: skip
    assert policy_problems(parse_inventory(no_fix, "t", env).inventory) == [
        "approvals.schedules.daily-integrity.command: schedule `daily-integrity` runs `/ops integrity`, not "
        "`/ops integrity fix`"
    ]


async def test_the_fix_through_opsbot_run(
    tmp_path: Path, fake_qdrant: FakeQdrant, postgres_server: PostgresServer
) -> None:
    dsn = await postgres_server.database_with(password=PASSWORD)
    await seed(dsn, fake_qdrant)
    config = tmp_path / "inventory.yaml"
    config.write_text(yt_inventory(fake_qdrant.url))
    env = {"OPSBOT_CONFIG": str(config), "OPSBOT_STATE_DIR": str(tmp_path / "state"), "YT_DB": dsn,
           "YT_QDRANT_KEY": KEY, "PYTHONWARNINGS": "ignore::UserWarning"}  # fmt: skip

    code, out, err = await opsbot("run", "integrity fix yt", env=env)
    assert code == 0, out + err
    assert f"delete 3 orphan vector(s) from `{COLLECTION}`" in out
    match = re.search(r"/ops approve (\w{8})", out.replace("`", ""))
    assert match, out
    assert await points(fake_qdrant) >= ORPHANS
    code, out, err = await opsbot("run", "--as", APPROVER, f"approve {match.group(1)}", env=env)

    assert code == 0, out + err
    assert "Deleted 3 of 3 planned orphan vector(s); reset 1 of 1 stale job(s) to `pending`." in out
    assert "no snapshot of `youtube_content`: Qdrant took none" in out
    assert "integrity check again: warning" in out
    assert not ORPHANS & await points(fake_qdrant)
    assert KEY not in out + err and PASSWORD not in out + err


async def test_the_digest_has_an_integrity_line_per_service(world: World) -> None:
    digest = await build_digest(world.bot.container.deps, "daily", now=datetime.now(UTC))

    said = "\n".join(str(b.get("text", {}).get("text", "")) for b in digest.blocks if isinstance(b.get("text"), dict))
    assert (
        f"*yt* integrity warning — chunks chunks ↔ vectors {COLLECTION}: 39 chunks, 41 vectors: 3 orphan vectors"
        in said
    )
    assert "(and 1 more)" in said  # the stale job
    assert any(p.key == "integrity:yt" for p in digest.problems)
    assert "*Integrity*" in said and "*plain* integrity" not in said  # no `integrity:` section, no line
