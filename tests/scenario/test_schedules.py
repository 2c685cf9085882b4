"""Schedules from the inventory run through the real container: once per fire time across two bots
sharing one PostgreSQL state, posted to the ops channel, audited, and shown by /ops schedules."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bot.scheduler import SCHEDULER_USER, build_scheduler
from tests.fixtures.servers import PostgresServer
from tests.fixtures.slack import FakeSlack
from tests.scenario.harness import Bot, inventory, running_bot

VIEWER = "U0VIEW1"
INVENTORY = """
ops_channel: C0OPSCHAN
timezone: Asia/Seoul
roles: {viewer: ["*"]}
schedules:
  - {name: nightly-health, cron: "0 2 * * *", command: "health all"}
  - {name: keepalive, every_minutes: 14, command: "health shop", enabled: false}
services:
  shop:
    components:
      db: {type: sqlite, path: "DB"}
"""
FIRE = datetime(2026, 11, 22, 17, 0, tzinfo=UTC)  # 02:00 on the 23rd in Seoul


@contextlib.asynccontextmanager
async def two_bots(fake_slack: FakeSlack, tmp_path: Path, state_url: str) -> AsyncIterator[tuple[Bot, Bot]]:
    db = tmp_path / "shop.db"
    db.touch()
    loaded = inventory(INVENTORY.replace("DB", str(db)))
    async with (
        running_bot(fake_slack, tmp_path / "a", loaded, OPSBOT_STATE_URL=state_url) as first,
        running_bot(fake_slack, tmp_path / "b", loaded, OPSBOT_STATE_URL=state_url) as second,
    ):
        yield first, second


async def test_two_replicas_run_a_fire_time_once_and_post_it_to_the_ops_channel(
    fake_slack: FakeSlack, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    url = postgres_server.dsn(await postgres_server.create_database())
    async with two_bots(fake_slack, tmp_path, url) as (first, second):
        now = [FIRE.replace(minute=0, second=30)]
        schedulers = [
            build_scheduler(bot.container, holder=name, clock=lambda: now[0])
            for name, bot in (("a", first), ("b", second))
        ]
        assert all(s is not None for s in schedulers)
        results = [await s.tick() for s in schedulers if s is not None]
        ran = [fired for result in results for fired in result if fired.name == "nightly-health"]
        assert len([f for f in ran if not f.outcome.startswith("skipped")]) == 1  # one replica ran it
        posts = [c for c in fake_slack.calls_to("chat.postMessage") if c.params.get("channel") == "C0OPSCHAN"]
        assert len(posts) == 1 and "Health of all services" in str(posts[0].params.get("text"))
        events = [e for e in await first.container.store.audit_events(limit=50) if e.actor == SCHEDULER_USER]
        assert [e.command for e in events] == ["health"]
        # A restart does not run it again: the fire time is claimed in the shared state.
        again = build_scheduler(second.container, holder="c", clock=lambda: now[0])
        assert again is not None
        assert [f for f in await again.tick() if f.name == "nightly-health" and not f.outcome.startswith("skip")] == []
        runs = await first.container.store.last_schedule_runs()
        assert (
            runs["nightly-health"].fire_at == FIRE
            and "Health of all services: healthy" in runs["nightly-health"].outcome
        )
        assert "keepalive" not in runs  # disabled


async def test_schedules_lists_each_one_with_its_next_and_last_run(fake_slack: FakeSlack, tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    db.touch()
    loaded = inventory(INVENTORY.replace("DB", str(db)))
    async with running_bot(fake_slack, tmp_path, loaded) as bot:
        await bot.container.store.claim_schedule_run("nightly-health", FIRE, holder="x", at=FIRE)
        await bot.container.store.finish_schedule_run("nightly-health", FIRE, outcome="failed: boom", at=FIRE)
        body = fake_slack.slash_body(
            "schedules", user_id=VIEWER, channel_id="C0OPS", response_url=fake_slack.response_url(VIEWER)
        )
        assert (await bot.post(body)).status == 200
        [answer] = await fake_slack.wait_for(f"response_url/{VIEWER}")
        shown = str(answer.params.get("blocks"))
        assert "*nightly-health*" in shown and "`0 2 * * *`" in shown and "/ops health all" in shown
        assert "last Mon 2026-11-23 02:00 Asia/Seoul: failed: boom" in shown
        assert "next " in shown and "Asia/Seoul" in shown
        assert "*keepalive*" in shown and "*disabled*" in shown and "never run yet" in shown


async def test_a_run_without_a_result_is_running_then_said_to_be_lost(fake_slack: FakeSlack, tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    db.touch()
    loaded = inventory(INVENTORY.replace("DB", str(db)))
    async with running_bot(fake_slack, tmp_path, loaded) as bot:
        store = bot.container.store
        now = datetime.now(UTC)
        shown: list[str] = []
        for started, key in ((now - timedelta(hours=3, minutes=7), "old"), (now - timedelta(minutes=5), "fresh")):
            fire = started.replace(second=0, microsecond=0)
            await store.claim_schedule_run("nightly-health", fire, holder=f"replica-{key}", at=started)
            body = fake_slack.slash_body(
                "schedules", user_id=VIEWER, channel_id="C0OPS", response_url=fake_slack.response_url(key)
            )
            assert (await bot.post(body)).status == 200
            [answer] = await fake_slack.wait_for(f"response_url/{key}")
            shown.append(str(answer.params.get("blocks")))
        assert "no result 3 h 7 min after it started on replica-old: that replica probably stopped" in shown[0]
        assert "running (started 5 min ago on replica-fresh)" in shown[1]
