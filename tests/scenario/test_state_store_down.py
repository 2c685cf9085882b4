"""The bot's own PostgreSQL state store stops (a real server, stopped and started): commands that
need it say so plainly, health still answers, and every command of the outage is audited — spooled
on local disk (fsynced) and appended to the chain, in order, once the store is back."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fixtures.servers import Cluster, postgres_cluster_control
from tests.fixtures.slack import FakeSlack
from tests.fixtures.wait import wait_until
from tests.scenario.harness import Bot, inventory, running_bot

VIEWER = "U0VIEW1"
DOWN = "opsbot's state store is not answering just now; try again in a minute."


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    with postgres_cluster_control(max_connections=20) as made:
        yield made


@pytest.fixture
async def bot(fake_slack: FakeSlack, tmp_path: Path, cluster: Cluster) -> AsyncIterator[Bot]:
    db = tmp_path / "shop.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
    text = f"""
roles:
  viewer: [{VIEWER}]
services:
  shop:
    components:
      db: {{type: sqlite, path: "{db}"}}
"""
    state = cluster.server.dsn(await cluster.server.create_database())
    async with running_bot(fake_slack, tmp_path, inventory(text), OPSBOT_STATE_URL=state) as running:
        yield running


async def ask(bot: Bot, fake_slack: FakeSlack, text: str, name: str) -> str:
    body = fake_slack.slash_body(text, user_id=VIEWER, response_url=fake_slack.response_url(name))
    assert (await bot.post(body)).status == 200
    [answer] = await fake_slack.wait_for(f"response_url/{name}", timeout=20)
    return str(answer.params["text"])


async def test_an_outage_is_said_plainly_and_its_commands_are_audited_afterwards(
    bot: Bot, fake_slack: FakeSlack, cluster: Cluster, tmp_path: Path
) -> None:
    store = bot.container.store
    spool = tmp_path / "audit-spool.jsonl"
    assert await ask(bot, fake_slack, "approvals", "before") != DOWN
    cluster.stop()

    assert await ask(bot, fake_slack, "approvals", "down1") == DOWN  # not "failed (ref …)"
    await bot.command("health shop", user=VIEWER)  # health needs no state: it still answers
    [post] = await fake_slack.wait_for("chat.postMessage", timeout=20)
    assert "shop" in str(post.params["text"])
    assert await ask(bot, fake_slack, "audit", "down2") == DOWN

    def spooled() -> list[dict[str, object]]:
        lines = spool.read_text().splitlines() if spool.exists() else []
        return [json.loads(line)["record"] for line in lines]

    during = await wait_until(lambda: spooled()[2:] and spooled(), "three events spooled")
    assert [(r["command"], r["outcome"]) for r in during] == [
        ("approvals", "error"),
        ("health", "ok"),
        ("audit", "error"),
    ]
    assert all(r["actor"] == VIEWER for r in during)

    assert "opsbot_audit_spool_pending 3.0" in (await bot.get("/metrics"))[1]
    cluster.start()
    assert await ask(bot, fake_slack, "help", "after") != DOWN
    await wait_until(lambda: not spool.exists(), "the spool is appended and removed")
    events = await store.audit_events(limit=10)
    assert [e.command for e in reversed(events)] == ["approvals", "approvals", "health", "audit", "help"]
    late = list(reversed(events))[1:4]
    assert all("written late: the state store was down" in e.detail for e in late)
    assert await store.verify_audit() is None  # spooled events joined the chain, unbroken
    metrics = (await bot.get("/metrics"))[1]
    assert "opsbot_audit_spool_pending 0.0" in metrics and "opsbot_audit_spool_dropped 0.0" in metrics
