"""/ops digest through signed Slack requests: problems first, what changed, posted or previewed."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bot.sample_app import SampleAppState, start_sample_app
from services.charts import daily_series
from services.state import Approval, ApprovalState, BackupRecord, BackupState, ProbeSample, StateStore, StoredAlert
from tests.fixtures.servers import PostgresServer, free_port
from tests.fixtures.slack import Call, FakeSlack
from tests.scenario.harness import Bot, inventory, running_bot

OPERATOR = "U0OPER1"
VIEWER = "U0VIEW1"
S = ApprovalState

JOBS_SQL = """
CREATE TABLE jobs (id bigint PRIMARY KEY, status text NOT NULL, started_at timestamptz, error_message text);
INSERT INTO jobs VALUES
    (1, 'processing', now() - interval '3 hours', NULL),
    (2, 'processing', now() - interval '5 minutes', NULL),
    (3, 'done', now() - interval '5 hours', NULL);
"""


def world_inventory(api_url: str, blog_db: Path, backups: Path, *, extra: str = "") -> str:
    return f"""
timezone: Asia/Seoul
roles:
  viewer: [{VIEWER}]
  operator: [{OPERATOR}]
backups:
  destinations:
    local: {{type: directory, path: "{backups}"}}
services:
  shop:
    components:
      api: {{type: http, url: "{api_url}", timeout: 2}}
  blog:
    components:
      db: {{type: sqlite, path: "{blog_db}"}}
{extra}
"""


def sqlite_db(path: Path) -> Path:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE posts (id INTEGER PRIMARY KEY)")
        db.commit()
    return path


def blocks_of(call: Call) -> list[dict[str, Any]]:
    blocks = call.json_param("blocks")
    assert isinstance(blocks, list)
    return blocks


def block_text(block: dict[str, Any]) -> str:
    if block.get("type") == "context":
        return " ".join(str(e.get("text", "")) for e in block.get("elements", []))
    return str((block.get("text") or {}).get("text", ""))


@dataclass
class World:
    bot: Bot
    slack: FakeSlack
    app: SampleAppState

    @property
    def store(self) -> StateStore:
        return self.bot.container.store

    async def ask(self, text: str, user: str = OPERATOR) -> None:
        body = self.slack.slash_body(text, user_id=user, channel_id="C0OPS", response_url=self.slack.response_url(user))
        assert (await self.bot.post(body)).status == 200

    async def answer(self, text: str, user: str = OPERATOR) -> Call:
        """Ask, and return the newest answer that reached the caller alone."""
        before = len(self.slack.calls_to(f"response_url/{user}"))
        await self.ask(text, user)
        calls = await self.slack.wait_for(f"response_url/{user}", count=before + 1, timeout=20)
        return calls[-1]

    async def posted(self, text: str) -> Call:
        """Ask, and return the message posted to the channel."""
        before = len(self.slack.calls_to("chat.postMessage"))
        await self.ask(text)
        posts = await self.slack.wait_for("chat.postMessage", count=before + 1, timeout=20)
        return posts[-1]


async def old_backup(store: StateStore, service: str, component: str, *, age: timedelta) -> BackupRecord:
    """A good catalog entry taken ``age`` ago (the digest reads the catalog, not the files)."""
    started = datetime.now(UTC) - age
    record = BackupRecord(
        id=f"{service}-{component}-old", service=service, component=component, source="sqlite", trigger="scheduled",
        requested_by="opsbot", destination="local", key=f"{service}/{component}/old.sqlite.zst",
        location="/backups/old.sqlite.zst", codec="zstd", state=BackupState.RUNNING, started_at=started,
    )  # fmt: skip
    await store.create_backup(record)
    done = await store.finish_backup(
        record.id, BackupState.GOOD, at=started + timedelta(minutes=1), size=4096, sha256="ab" * 32, manifest={}
    )
    assert done is not None
    return done


async def failed_run(store: StateStore, approval_id: str, *, ago: timedelta, action: str = "rollback") -> Approval:
    """An approval that was approved, ran and failed ``ago`` before now."""
    created = datetime.now(UTC) - ago - timedelta(minutes=5)
    approval = Approval(
        id=approval_id, action=action, service="shop", risk="destructive", requester=OPERATOR, channel="C0OPS",
        request_id="req-" + approval_id, summary=f"Roll shop back ({approval_id})", plan={"details": []},
        approver_role="approver", required_approvals=1, self_approve=False, created_at=created,
        expires_at=created + timedelta(minutes=15),
    )  # fmt: skip
    await store.create_approval(approval)
    step = created
    for before, after in ((S.PENDING, S.APPROVED), (S.APPROVED, S.RUNNING)):
        step += timedelta(minutes=1)
        assert await store.transition_approval(approval_id, [before], after, at=step, by="U0APPR1")
    done = await store.transition_approval(
        approval_id, [S.RUNNING], S.FAILED, at=datetime.now(UTC) - ago, result="The revision is not ready.\nmore"
    )
    assert done is not None
    return done


async def firing_alert(store: StateStore, key: str = "shop/api/ServiceDown") -> None:
    fired = (datetime.now(UTC) - timedelta(minutes=30)).isoformat()
    state = {"key": key, "phase": "firing", "since": fired, "fired_at": fired, "evidence": "not answering: HTTP 503"}
    await store.save_alert(StoredAlert(key, key.split("/")[0], state, datetime.now(UTC)))


@contextlib.asynccontextmanager
async def open_world(
    fake_slack: FakeSlack, tmp_path: Path, *, extra: str = "", env: dict[str, str] | None = None, **settings: Any
) -> AsyncIterator[World]:
    app = SampleAppState(status=503)
    runner, url = await start_sample_app(app)
    try:
        text = world_inventory(url, sqlite_db(tmp_path / "blog.sqlite3"), tmp_path / "backups", extra=extra)
        async with running_bot(fake_slack, tmp_path, inventory(text, env=env), **settings) as bot:
            yield World(bot, fake_slack, app)
    finally:
        await runner.cleanup()


@pytest.fixture
async def world(fake_slack: FakeSlack, tmp_path: Path) -> AsyncIterator[World]:
    async with open_world(fake_slack, tmp_path) as found:
        yield found


async def test_a_service_down_an_overdue_backup_and_a_failed_run_are_all_at_the_top(world: World) -> None:
    await old_backup(world.store, "blog", "db", age=timedelta(hours=30))
    await failed_run(world.store, "run-recent", ago=timedelta(hours=2))
    await failed_run(world.store, "run-last-week", ago=timedelta(days=3))
    answer = await world.answer("digest daily")
    assert answer.params["response_type"] == "ephemeral"
    blocks = blocks_of(answer)
    assert blocks[0]["type"] == "header" and "Daily digest" in block_text(blocks[0])
    top = block_text(blocks[2])  # header, period, then the problems
    assert top.startswith(":rotating_light: *3 problem(s), worst first:*")
    lines = top.splitlines()[1:]
    # worst first: the service down and the failed run (critical), then the overdue backup (a warning)
    assert "*shop* is critical" in lines[0] and "api: critical" in lines[0]
    assert "`run-recent`" in lines[1] and "*failed*" in lines[1] and "The revision is not ready." in lines[1]
    assert "*blog/db*" in lines[2] and "*overdue*" in lines[2] and "expected every 26 h" in lines[2]
    assert "run-last-week" not in json.dumps(blocks)  # outside the daily period
    assert "first digest" in block_text(blocks[3])
    everything = "\n".join(block_text(b) for b in blocks)
    assert ":x: *Every service healthy* — 1 of 2 not healthy: shop critical" in everything
    assert ":x: *Backups on time* — backup blog/db overdue" in everything
    assert ":white_check_mark: *Audit chain intact*" in everything
    assert "Finished in this period: 1 failed." in everything
    assert "Preview: only you see this" in block_text(blocks[-1])
    assert "3 problem(s)" in answer.params["text"]
    # A preview posts nothing to the channel and saves nothing to compare with.
    assert world.slack.calls_to("chat.postMessage") == []
    assert await world.store.last_digest("daily") is None
    weekly = json.dumps(blocks_of(await world.answer("digest weekly")))
    assert "run-last-week" in weekly and "run-recent" in weekly and "4 problem(s)" in weekly


@pytest.mark.parametrize("state", ["sqlite", "postgres"])
async def test_post_saves_a_snapshot_and_the_next_digest_says_what_changed(
    fake_slack: FakeSlack, tmp_path: Path, request: pytest.FixtureRequest, state: str
) -> None:
    settings = {}
    if state == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        settings["OPSBOT_STATE_URL"] = server.dsn(await server.create_database())
    async with open_world(fake_slack, tmp_path, **settings) as world:
        await old_backup(world.store, "blog", "db", age=timedelta(hours=30))
        await failed_run(world.store, "run-recent", ago=timedelta(hours=2))
        await firing_alert(world.store)
        post = await world.posted("digest daily --post")
        assert post.params["channel"] == "C0OPS"
        blocks = blocks_of(post)
        top = block_text(blocks[2])
        lines = top.splitlines()
        assert "4 problem(s)" in lines[0] and "*shop/api/ServiceDown* firing since" in lines[3]
        assert "not answering: HTTP 503" in lines[3] and "*blog/db*" in lines[4]  # ServiceDown is critical
        assert f"Posted by <@{OPERATOR}>" in block_text(blocks[-1])
        saved = await world.store.last_digest("daily")
        assert saved is not None
        first_at, snapshot = saved
        assert snapshot["health"] == {"shop": "critical", "blog": "healthy"}
        assert snapshot["backups_overdue"] == ["blog/db"]
        assert snapshot["runs_failed"] == ["run-recent"]
        assert snapshot["alerts_firing"] == ["shop/api/ServiceDown"]
        assert snapshot["checklist"]["health"] is False and snapshot["checklist"]["audit"] is True

        # The service recovers and its alert resolves; a fresh backup of blog is taken.
        world.app.status = None
        await world.store.save_alert(
            StoredAlert("shop/api/ServiceDown", "shop", {"phase": "ok", "evidence": "answering"}, datetime.now(UTC))
        )
        runner = world.bot.container.deps.backups
        assert runner is not None
        await runner.backup("blog", "db", trigger="manual", requested_by=OPERATOR)
        preview = blocks_of(await world.answer("digest daily"))
        changes = [block_text(b) for b in preview if block_text(b).startswith("_Since the last digest")]
        assert len(changes) == 6  # the problems and each of the five sections say what changed
        problems_change, health_change, backups_change, runs_change, alerts_change, checklist_change = changes
        assert "resolved: shop critical" in problems_change and "alert shop/api/ServiceDown firing" in problems_change
        assert health_change.endswith("recovered: shop")
        assert backups_change.endswith("back on time: blog/db")
        assert runs_change.endswith("no change")
        assert alerts_change.endswith("resolved: shop/api/ServiceDown")
        assert "now ticked: Every service healthy, Backups on time" in checklist_change
        assert "1 problem(s)" in block_text(preview[2])  # the failed run of the period is still there
        assert await world.store.last_digest("daily") == saved  # a preview changes nothing

        await world.posted("digest daily --post")
        newer = await world.store.last_digest("daily")
        assert newer is not None and newer[0] > first_at
        assert newer[1]["health"] == {"shop": "healthy", "blog": "healthy"} and newer[1]["alerts_firing"] == []
        assert await world.store.last_digest("weekly") is None  # each kind compares with its own
        events = [e for e in await world.store.audit_events(limit=20) if e.command == "digest"]
        assert [e.args for e in events] == ["digest daily --post", "digest daily", "digest daily --post"]


async def test_jobs_and_audit_checks_are_crossed_with_a_reason_not_an_exception(
    fake_slack: FakeSlack, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    dsn = postgres_server.dsn(await postgres_server.create_database())
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(JOBS_SQL)
    finally:
        await conn.close()
    extra = f"""
  pipeline:
    components:
      db: {{type: postgres, dsn: "${{PIPE_DB}}", jobs: {{}}}}
      gone: {{type: postgres, dsn: "postgresql://opsbot@127.0.0.1:{free_port()}/x", timeout: 1, jobs: {{}}}}
"""
    async with open_world(fake_slack, tmp_path, extra=extra, env={"PIPE_DB": dsn}) as world:
        await world.posted("health blog")  # leaves an audit event to tamper with
        with contextlib.closing(sqlite3.connect(tmp_path / "state.sqlite3")) as db:
            db.execute("DROP TRIGGER audit_events_no_update")  # what an intruder with file access could do
            db.execute("UPDATE audit_events SET detail = 'rewritten' WHERE seq = 1")
            db.commit()
        everything = "\n".join(block_text(b) for b in blocks_of(await world.answer("digest daily")))
        jobs = ":x: *No jobs stuck in processing* — pipeline/db: 1 stuck over 60 min; pipeline/gone: could not check"
        assert jobs in everything
        assert ":x: *Audit chain intact* — the hash chain breaks at event #1" in everything
        top = everything.split("_Since the last digest")[0]
        assert "*No jobs stuck in processing*" in top and "*Audit chain intact*" in top  # problems too


async def test_a_big_inventory_stays_within_slacks_limits(fake_slack: FakeSlack, tmp_path: Path) -> None:
    port = free_port()  # nothing listens: every probe is refused at once
    services = "\n".join(
        f'  svc{i:02d}:\n    components:\n      api: {{type: http, url: "http://127.0.0.1:{port}", timeout: 2}}'
        for i in range(60)
    )
    async with open_world(fake_slack, tmp_path, extra=services) as world:
        blocks = blocks_of(await world.answer("digest monthly"))
        assert len(blocks) <= 50
        assert all(len(block_text(b)) <= 3000 for b in blocks)
        everything = "\n".join(block_text(b) for b in blocks)
        assert "62 problem(s)" in block_text(blocks[2]) and "… and 37 more problems" in block_text(blocks[2])
        assert "… and 41 more services with problems" in everything


async def test_a_viewer_is_told_the_role_it_needs(world: World) -> None:
    answer = await world.answer("digest daily --post", user=VIEWER)
    assert answer.params["text"] == "`/ops digest` needs the operator role; you are a viewer."
    assert world.slack.calls_to("chat.postMessage") == []
    assert await world.store.last_digest("daily") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("digest hourly", "There is no `hourly` digest: choose daily, weekly or monthly."),
        ("digest daily --loud", "`/ops digest` has no option `--loud` (options: `--post`)."),
        ("digest daily weekly", "Unexpected `weekly`."),
    ],
)
async def test_bad_arguments_get_one_sentence_and_nothing_is_saved(world: World, text: str, expected: str) -> None:
    answer = await world.answer(text)
    assert expected in answer.params["text"] and "Traceback" not in answer.params["text"]
    assert await world.store.last_digest("daily") is None and world.slack.calls_to("chat.postMessage") == []


async def test_the_posted_weekly_digest_carries_a_chart_of_the_weeks_probes(world: World) -> None:
    now = datetime.now(UTC)
    samples = [
        ProbeSample(service, "api", now - timedelta(days=day, minutes=minute), status, latency)
        for day in range(7)
        for minute in range(0, 60, 10)
        for service, status, latency in (("shop", 2 if day == 3 else 0, 120.0 + day), ("blog", 0, 40.0))
    ]
    await world.store.record_probes(samples, keep_after=now - timedelta(days=35))
    post = await world.posted("digest weekly --post")
    [complete] = await world.slack.wait_for("files.completeUploadExternal", timeout=20)
    assert complete.params.get("channel_id") == post.params["channel"]
    [upload] = [c for c in world.slack.calls if c.method.startswith("upload/")]
    assert b"\x89PNG\r\n\x1a\n" in upload.raw  # a PNG went up
    # A preview or a daily digest uploads nothing.
    await world.answer("digest weekly")
    await world.posted("digest daily --post")
    assert len([c for c in world.slack.calls if c.method.startswith("upload/")]) == 1


def test_daily_series_counts_critical_rounds_as_down() -> None:
    start = datetime(2026, 11, 16, tzinfo=UTC)
    samples = [ProbeSample("shop", "api", start + timedelta(hours=h), 2 if h < 6 else 0, float(h)) for h in range(24)]
    days, availability, p95 = daily_series(samples, start, start + timedelta(days=1))
    assert days[0] == start.date() and availability["shop"][0] == 75.0 and availability["shop"][1] is None
    assert p95["shop"][0] == 22.0
