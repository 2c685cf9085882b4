"""Backups end to end through signed Slack requests: /ops backup, list, verify, and an approved restore."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from handlers.approvals import APPROVE
from services.inventory import Retention
from services.state import ApprovalState, BackupRecord, BackupState
from tests.fixtures.servers import PostgresServer, ScramRole
from tests.fixtures.slack import Call, FakeSlack
from tests.fixtures.wait import wait_until
from tests.scenario.harness import Bot, inventory, running_bot

OPERATOR = "U0OPER1"
APPROVER = "U0APPR1"
VIEWER = "U0VIEW1"

SHOP_SQL = """
CREATE TABLE orders (id bigint PRIMARY KEY, item text NOT NULL, qty int NOT NULL);
INSERT INTO orders SELECT n, 'item ' || n, n % 7 FROM generate_series(1, 2000) AS n;
"""


def shop_inventory(backups: Path, *, extra_backups: str = "", extra_services: str = "") -> str:
    return f"""
roles:
  viewer: [{VIEWER}]
  operator: [{OPERATOR}]
  approver: [{APPROVER}]
backups:
  destinations:
    local: {{type: directory, path: "{backups}"}}
{extra_backups}
services:
  shop:
    components:
      db: {{type: postgres, dsn: "${{SHOP_DB}}"}}
  blog:
    components:
      db: {{type: postgres, dsn: "${{BLOG_DB}}"}}
{extra_services}
"""


async def make_db(server: PostgresServer, sql: str) -> str:
    """A fresh database holding ``sql``, owned by the SCRAM role: its DSN logs in with a real password."""
    return await server.database_with(sql, scram=True)


async def query(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def texts(call: Call) -> str:
    return str(call.params.get("text", "")) + json.dumps(call.params.get("blocks", ""))


@dataclass
class Shop:
    bot: Bot
    slack: FakeSlack
    dsn: str
    backups: Path
    role: ScramRole  # whose password is in dsn: it must never show

    async def backup(self, text: str = "backup shop db", user: str = OPERATOR) -> BackupRecord:
        """Run /ops backup and wait for the final edit of its live message; the newest record."""
        before = len(self.slack.calls_to("chat.update"))
        await self.ask(text, user)

        def finished() -> bool:
            updates = self.slack.calls_to("chat.update")[before:]
            return any("Backup of shop:" in str(c.params.get("text")) and "done" in str(c.params.get("text"))
                       for c in updates)  # fmt: skip

        await wait_until(finished, "the backup's live message says done", timeout=20)
        runner = self.bot.container.deps.backups
        assert runner is not None
        newest = await runner.newest_good("shop", "db")
        assert newest is not None
        return newest

    async def ask(self, text: str, user: str) -> None:
        """A slash command whose ephemeral answers arrive at the fake's response_url/<user>."""
        body = self.slack.slash_body(text, user_id=user, channel_id="C0OPS", response_url=self.slack.response_url(user))
        assert (await self.bot.post(body)).status == 200

    async def answer(self, user: str, count: int = 1) -> str:
        calls = await self.slack.wait_for(f"response_url/{user}", count=count, timeout=20)
        return str(calls[-1].params["text"])

    async def events(self, command: str) -> list[object]:
        return [e for e in await self.bot.container.store.audit_events(limit=500) if e.command == command]


@contextlib.asynccontextmanager
async def open_shop(
    fake_slack: FakeSlack, tmp_path: Path, server: PostgresServer, *, extra_backups: str = ""
) -> AsyncIterator[Shop]:
    shop = await make_db(server, SHOP_SQL)
    blog = await make_db(server, "CREATE TABLE posts (id int PRIMARY KEY); INSERT INTO posts VALUES (1);")
    backups = tmp_path / "backups"
    loaded = inventory(shop_inventory(backups, extra_backups=extra_backups), env={"SHOP_DB": shop, "BLOG_DB": blog})
    async with running_bot(fake_slack, tmp_path, loaded) as bot:
        yield Shop(bot, fake_slack, shop, backups, server.scram_role())


@pytest.fixture
async def shop(fake_slack: FakeSlack, tmp_path: Path, postgres_server: PostgresServer) -> AsyncIterator[Shop]:
    async with open_shop(fake_slack, tmp_path, postgres_server) as world:
        yield world


async def test_backup_posts_progress_then_the_result_and_catalogs_a_good_backup(shop: Shop) -> None:
    record = await shop.backup()
    [post] = shop.slack.calls_to("chat.postMessage")
    assert post.params["channel"] == "C0OPS" and "Backup of shop" in texts(post)
    updates = shop.slack.calls_to("chat.update")
    assert len({c.params["ts"] for c in updates}) == 1  # one message, edited to the result
    final = updates[-1]
    shown = texts(final)
    assert record.id in shown and record.sha256 is not None and record.sha256 in shown
    assert record.state is BackupState.GOOD and record.trigger == "manual" and record.requested_by == OPERATOR
    stored = shop.backups / record.key
    assert stored.is_file() and stored.stat().st_size == record.size
    manifest = json.loads((shop.backups / f"{record.key}.manifest.json").read_text())
    assert manifest["sha256"] == record.sha256 and manifest["size"] == record.size
    assert manifest["tools"]["pg_dump"] and manifest["source"]["kind"] == "postgres"
    assert not list(shop.backups.rglob("*.partial*"))
    [event] = await shop.events("backup")
    assert event.outcome == "ok" and record.id in event.detail  # type: ignore[attr-defined]
    for call in shop.slack.calls:
        assert not shop.role.found_in(json.dumps(call.params))


async def test_list_shows_backups_newest_first_and_warns_when_overdue(shop: Shop) -> None:
    await shop.ask("backup list shop", VIEWER)
    [empty] = await shop.slack.wait_for(f"response_url/{VIEWER}")
    assert "*db* has no good backup yet." in texts(empty) and "No backups yet." in texts(empty)
    first = await shop.backup()
    second = await shop.backup()
    await shop.ask("backup list shop", VIEWER)
    calls = await shop.slack.wait_for(f"response_url/{VIEWER}", count=2)
    listing = texts(calls[-1])
    assert listing.index(second.id) < listing.index(first.id)
    assert "no good backup" not in listing and "older than the expected" not in listing
    runner = shop.bot.container.deps.backups
    assert runner is not None
    runner.clock = lambda: datetime.now(UTC) + timedelta(hours=30)
    await shop.ask("backup list shop", VIEWER)
    calls = await shop.slack.wait_for(f"response_url/{VIEWER}", count=3)
    assert "older than the expected 26 h" in texts(calls[-1])


async def test_verify_passes_then_fails_loudly_when_the_object_is_altered(shop: Shop) -> None:
    record = await shop.backup()
    await shop.ask(f"backup verify {record.id}", OPERATOR)
    calls = await shop.slack.wait_for(f"response_url/{OPERATOR}", count=2)
    assert "is good: sha256 matches" in texts(calls[-1])
    checked = await shop.bot.container.store.get_backup(record.id)
    assert checked is not None and checked.verify_result.startswith("ok: ")
    stored = shop.backups / record.key
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    posts_before = len(shop.slack.calls_to("chat.postMessage"))
    await shop.ask(f"backup verify {record.id}", OPERATOR)
    posts = await shop.slack.wait_for("chat.postMessage", count=posts_before + 1, timeout=20)
    assert "FAILED verification" in texts(posts[-1])  # loud: in the channel, not only to the caller
    checked = await shop.bot.container.store.get_backup(record.id)
    assert checked is not None and checked.verify_result.startswith("failed: ")
    events = await shop.events("backup verify")
    assert [e.outcome for e in events] == ["error", "ok"]  # type: ignore[attr-defined]


async def test_restore_needs_approval_takes_a_safety_backup_and_brings_the_rows_back(shop: Shop) -> None:
    record = await shop.backup()
    conn = await asyncpg.connect(shop.dsn)
    try:
        await conn.execute("DELETE FROM orders WHERE id > 10; INSERT INTO orders VALUES (9999, 'late', 1)")
    finally:
        await conn.close()
    before = len(shop.slack.calls_to("chat.postMessage"))
    await shop.ask(f"restore shop {record.id}", OPERATOR)
    posts = await shop.slack.wait_for("chat.postMessage", count=before + 1)
    plan = texts(posts[-1])
    assert f"Restore shop/db from backup `{record.id}`" in plan and "Overwrites: PostgreSQL database" in plan
    assert "safety backup" in plan and not shop.role.found_in(plan)
    approval_id = posts[-1].params["blocks"][-1]["elements"][0]["value"]
    assert await query(shop.dsn, "SELECT count(*) FROM orders") == 11  # nothing ran yet
    body = shop.slack.block_actions_body(
        APPROVE, approval_id, user_id=APPROVER, response_url=shop.slack.response_url(APPROVER)
    )
    approval = await shop.bot.approval_posted(approval_id)
    assert (await shop.bot.post(body)).status == 200
    approval = await shop.bot.settled(approval, timeout=30)
    assert approval.state is ApprovalState.SUCCEEDED, approval.result
    assert await query(shop.dsn, "SELECT count(*) FROM orders") == 2000
    assert await query(shop.dsn, "SELECT count(*) FROM orders WHERE id = 9999") == 0
    safety = [r for r in await shop.bot.container.store.list_backups(service="shop") if r.trigger == "safety"]
    assert len(safety) == 1 and safety[0].state is BackupState.GOOD
    assert safety[0].id in approval.result and "healthy" in approval.result


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("restore shop shop-db-20260101-000000-dead", "There is no backup `shop-db-20260101-000000-dead`"),
        ("restore shop ../../etc/passwd", "backup_id"),
        ("restore nosuch x-1", "There is no service called `nosuch`"),
    ],
)
async def test_restore_refusals_are_one_sentence_and_store_nothing(shop: Shop, text: str, expected: str) -> None:
    await shop.ask(text, OPERATOR)
    answer = await shop.answer(OPERATOR)
    assert expected in answer and "Traceback" not in answer
    assert await shop.bot.container.store.list_approvals(list(ApprovalState)) == []


async def test_restore_of_another_services_backup_or_component_is_refused(shop: Shop) -> None:
    runner = shop.bot.container.deps.backups
    assert runner is not None
    blog = await runner.backup("blog", "db", trigger="manual", requested_by=OPERATOR)
    await shop.ask(f"restore shop {blog.id}", OPERATOR)
    assert f"Backup `{blog.id}` belongs to `blog`, not `shop`: nothing was planned." in await shop.answer(OPERATOR)
    await shop.ask(f"restore blog {blog.id} cache", OPERATOR)
    assert "is of `db`, not `cache`" in await shop.answer(OPERATOR, count=2)
    assert await shop.bot.container.store.list_approvals(list(ApprovalState)) == []


async def test_only_operators_back_up_and_viewers_are_told_why(shop: Shop) -> None:
    await shop.ask("backup shop db", VIEWER)
    assert "needs the operator role" in await shop.answer(VIEWER)
    assert await shop.bot.container.store.list_backups() == []


async def test_unknown_component_and_nothing_to_back_up_are_refused(shop: Shop) -> None:
    await shop.ask("backup shop cache", OPERATOR)
    assert "`shop` has no component `cache` to back up; known: `db`." in await shop.answer(OPERATOR)
    assert await shop.bot.container.store.list_backups() == []


async def test_retention_keeps_the_newest_and_deletes_the_rest(
    fake_slack: FakeSlack, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    async with open_shop(fake_slack, tmp_path, postgres_server, extra_backups="  retention: {keep_last: 2}") as shop:
        runner = shop.bot.container.deps.backups
        assert runner is not None
        made = [await runner.backup("shop", "db", trigger="manual", requested_by=OPERATOR) for _ in range(4)]
        good = await shop.bot.container.store.list_backups(service="shop", states=[BackupState.GOOD])
        assert [r.id for r in good] == [made[3].id, made[2].id]
        assert not (shop.backups / made[0].key).exists() and (shop.backups / made[3].key).exists()
        assert not (shop.backups / f"{made[0].key}.manifest.json").exists()
        # keep_days alone, with every backup old: the newest good one is still kept
        runner.clock = lambda: datetime.now(UTC) + timedelta(days=400)
        runner.settings = runner.settings.model_copy(update={"retention": Retention(keep_last=None, keep_days=1)})
        assert await runner.apply_retention("shop", "db") == [made[2].id]
        good = await shop.bot.container.store.list_backups(service="shop", states=[BackupState.GOOD])
        assert [r.id for r in good] == [made[3].id]


async def test_a_cancelled_backup_leaves_no_object_and_no_good_entry(shop: Shop) -> None:
    runner = shop.bot.container.deps.backups
    assert runner is not None
    conn = await asyncpg.connect(shop.dsn)
    try:  # enough data that the dump is still running when it is cancelled
        await conn.execute(
            "CREATE TABLE big AS SELECT n, md5(n::text) || md5((n * 7)::text) AS pad FROM generate_series(1, 400000) n"
        )
    finally:
        await conn.close()
    task = asyncio.create_task(runner.backup("shop", "db", trigger="manual", requested_by=OPERATOR))
    await wait_until(lambda: list(shop.backups.rglob("*.partial*")), "the dump starts writing its partial file")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [record] = await shop.bot.container.store.list_backups()
    assert record.state is BackupState.FAILED and "cancelled" in record.error
    assert [p for p in shop.backups.rglob("*") if p.is_file()] == []
