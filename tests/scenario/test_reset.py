"""/ops reset soft|hard end to end: signed Slack requests, the plan, two approvers, the result in the thread;
real PostgreSQL and Redis, the Qdrant REST fake (a server without snapshots), real files; and `opsbot run`."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from handlers.approvals import APPROVE
from services.state import Approval, ApprovalState, BackupState
from tests.bot.test_cli import opsbot
from tests.fixtures.qdrant import FakeQdrant
from tests.fixtures.servers import run_sql
from tests.fixtures.slack import FakeSlack
from tests.fixtures.wait import wait_until
from tests.scenario.harness import Bot, all_text, inventory, running_bot
from tests.services.test_reset import SCHEMA, seed_qdrant

REQUESTER = "U0REQ1"
FIRST, SECOND = "U0APP1", "U0APP2"
S = ApprovalState


def yt_inventory(root: Path) -> str:
    return f"""
roles:
  operator: [{REQUESTER}]
  approver: [{FIRST}, {SECOND}]
backups:
  destinations: {{local: {{type: directory, path: "{root / "backups"}"}}}}
  compression: gzip
services:
  yt:
    components:
      db: {{type: postgres, dsn: "${{YT_DB}}", timeout: 5, jobs: {{table: jobs}}}}
      vectors: {{type: qdrant, url: "${{YT_QDRANT}}", collections: [youtube_content], timeout: 5}}
      cache: {{type: redis, url: "${{YT_REDIS}}", timeout: 3}}
    reset:
      keep: [channels]
      soft:
        jobs: [db]
        tables: {{db: [chunks, transcripts, contents]}}
        collections: {{vectors: [youtube_content]}}
        redis: {{cache: ["yt:cache:*"]}}
        files: [{{path: "{root / "tmp"}"}}]
      hard:
        tables: {{db: [channels]}}
  shop:
    components:
      api: {{type: http, url: "http://127.0.0.1:9"}}
"""


async def rows(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            t: int(await conn.fetchval(f"select count(*) from {t}"))
            for t in ("channels", "contents", "transcripts", "chunks", "jobs")
        }
    finally:
        await conn.close()


@dataclass
class World:
    bot: Bot
    slack: FakeSlack
    dsn: str
    redis_url: str
    qdrant: FakeQdrant
    root: Path

    async def request(self, text: str) -> Approval:
        before = len(self.slack.calls_to("chat.postMessage"))
        assert (await self.bot.command(text, user=REQUESTER)).status == 200
        return await self.bot.plan_posted(before)

    async def click(self, approval: Approval, user: str) -> None:
        body = self.slack.block_actions_body(
            APPROVE, approval.id, user_id=user, response_url=self.slack.response_url(user)
        )
        assert (await self.bot.post(body)).status == 200

    async def approve_twice(self, approval: Approval) -> Approval:
        await self.click(approval, FIRST)
        store = self.bot.container.store

        async def one_vote() -> Approval | None:
            current = await store.get_approval(approval.id)
            return current if current is not None and len(current.votes) == 1 else None

        pending = await wait_until(one_vote, "the first approval is counted")
        assert pending.state is S.PENDING and pending.required_approvals == 2
        await self.click(approval, SECOND)
        return await self.bot.settled(approval)

    async def answer(self, text: str, key: str) -> str:
        body = self.slack.slash_body(text, user_id=REQUESTER, response_url=self.slack.response_url(key))
        assert (await self.bot.post(body)).status == 200
        [call] = await self.slack.wait_for(f"response_url/{key}")
        await wait_until(lambda: self.bot.container.deps.running.count == 0, "the command finishes")
        return str(call.params["text"])

    async def keys(self) -> list[bytes]:
        cache = aioredis.from_url(self.redis_url)
        try:
            return sorted(await cache.keys("*"))
        finally:
            await cache.aclose()

    async def points(self) -> int:
        client = self.qdrant.client()
        try:
            return (await client.count("youtube_content", exact=True)).count
        finally:
            await client.close()


async def seed(dsn: str, redis_url: str, qdrant: FakeQdrant, root: Path) -> None:
    await run_sql(dsn, *SCHEMA)
    client = qdrant.client()
    await seed_qdrant(client, "youtube_content", 12)
    await client.close()
    cache = aioredis.from_url(redis_url)
    await cache.mset({"yt:cache:1": "a", "yt:cache:2": "b", "session:1": "keep"})
    await cache.aclose()
    (root / "tmp").mkdir()
    (root / "tmp" / "upload.part").write_bytes(b"abc")
    (root / "backups").mkdir()


@pytest.fixture
async def world(
    fake_slack: FakeSlack, tmp_path: Path, pg_dsn: str, redis_url: str, fake_qdrant: FakeQdrant
) -> AsyncIterator[World]:
    await seed(pg_dsn, redis_url, fake_qdrant, tmp_path)
    env = {"YT_DB": pg_dsn, "YT_QDRANT": fake_qdrant.url, "YT_REDIS": redis_url}
    async with running_bot(fake_slack, tmp_path / "state", inventory(yt_inventory(tmp_path), env=env)) as bot:
        yield World(bot, fake_slack, pg_dsn, redis_url, fake_qdrant, tmp_path)


async def test_a_soft_reset_needs_two_approvers_and_empties_exactly_its_targets(world: World) -> None:
    approval = await world.request("reset soft yt")

    shown = all_text(world.slack.calls_to("chat.postMessage")[-1])
    assert (
        "Soft reset of yt: empty 4 table(s) (21 rows), 1 collection(s) (12 points), 1 key pattern(s) (2 keys), "
        "1 directory(ies) (1 files, 3 B); keeps channels"
    ) in shown
    for line in (
        "table db.jobs — the job queue: 3 row(s)",
        "table db.chunks: 10 row(s)",
        "collection vectors/youtube_content: 12 point(s); its config and payload indexes are kept",
        "keys cache yt:cache:*: 2 key(s)",
        f"files {world.root / 'tmp'}: 1 file(s), 3 B",
        "Kept: channels.",
        "Cannot be restored afterwards: table rows, except from a backup (`/ops backup list yt`); Redis keys",
        "vectors (a soft reset takes no snapshot: they are rebuilt by re-indexing)",
    ):
        assert line in shown, line
    assert approval.required_approvals == 2

    final = await world.approve_twice(approval)

    assert final.state is S.SUCCEEDED, final.result
    lines = final.result.splitlines()
    assert lines[0] == "Soft reset of yt done: 7 target(s) emptied; kept channels."
    assert "table db.chunks: deleted 10 row(s)" in lines and "keys cache yt:cache:*: removed 2 key(s)" in lines
    assert await rows(world.dsn) == {"channels": 2, "contents": 0, "transcripts": 0, "chunks": 0, "jobs": 0}
    assert await world.points() == 0 and await world.keys() == [b"session:1"]
    assert not (world.root / "tmp" / "upload.part").exists()
    thread = [c for c in world.slack.calls_to("chat.postMessage") if c.params.get("thread_ts") == final.message_ts]
    assert thread and "Soft reset of yt done" in all_text(thread[-1])

    said = await world.answer("reset soft yt", "again")
    assert said == "Nothing to reset in `yt`: every target of a soft reset is empty now."
    assert [a.id for a in await world.bot.container.store.list_approvals(list(S))] == [approval.id]


async def test_a_hard_reset_without_a_fresh_verified_backup_is_refused(world: World) -> None:
    posts = len(world.slack.calls_to("chat.postMessage"))
    said = await world.answer("reset hard yt", "hard")
    assert said == (
        "Hard reset of `yt` refused: `db` has no good backup — it needs a good, verified backup of each younger than "
        "1 h. Take them with `/ops backup yt` and `/ops backup verify <id>`, or ask with `--backup-first`; nothing "
        "was planned."
    )
    assert len(world.slack.calls_to("chat.postMessage")) == posts
    assert (await rows(world.dsn))["channels"] == 2


async def test_a_hard_reset_with_backup_first_backs_up_verifies_then_empties_everything(world: World) -> None:
    approval = await world.request("reset hard yt --backup-first")
    shown = all_text(world.slack.calls_to("chat.postMessage")[-1])
    assert "Hard reset of yt after backing up and verifying first: empty 5 table(s) (23 rows)" in shown
    assert "Backups: the run first backs up and verifies `db`; if one fails, nothing is deleted." in shown
    assert "Qdrant: a snapshot of each collection is taken first; where the server cannot make one" in shown

    final = await world.approve_twice(approval)

    assert final.state is S.SUCCEEDED, final.result
    assert await rows(world.dsn) == {"channels": 0, "contents": 0, "transcripts": 0, "chunks": 0, "jobs": 0}
    [backup] = await world.bot.container.store.list_backups(service="yt", states=[BackupState.GOOD])
    assert backup.component == "db" and backup.verify_result.startswith("ok")
    assert f"backup `{backup.id}` of db taken and verified" in final.result
    assert "collection vectors/youtube_content: no snapshot — Qdrant could not make one" in final.result


async def test_bad_input_is_one_plain_sentence_and_posts_nothing(world: World) -> None:
    assert (await world.answer("reset soft nosuch", "a")).startswith("There is no service called `nosuch`.")
    assert (await world.answer("reset soft shop", "b")).startswith("`shop` has no `reset:` section in the inventory")
    said = await world.answer("reset soft yt --backup-first", "c")
    assert said.startswith("`/ops reset soft` has no option `--backup-first`")
    await run_sql(world.dsn, "drop table transcripts")
    said = await world.answer("reset soft yt", "d")
    assert said == "PostgreSQL `db` has no table `transcripts` (declared in the reset section); nothing was planned."
    assert world.slack.calls_to("chat.postMessage") == []
    assert await world.points() == 12


async def test_a_table_recreated_after_the_plan_stops_the_run_before_it_deletes(world: World) -> None:
    approval = await world.request("reset soft yt")
    await run_sql(world.dsn, "drop table chunks", "create table chunks (id serial primary key, content_id int)")

    final = await world.approve_twice(approval)

    assert final.state is S.FAILED
    assert final.result.startswith("Did not run: what the plan saw has changed since it was approved.")
    assert re.search(r"^table db\.chunks: oid \d+ → oid \d+$", final.result, re.MULTILINE), final.result
    assert (await rows(world.dsn))["jobs"] == 3 and await world.points() == 12


async def test_a_soft_reset_through_opsbot_run(
    tmp_path: Path, pg_dsn: str, redis_url: str, fake_qdrant: FakeQdrant
) -> None:
    await seed(pg_dsn, redis_url, fake_qdrant, tmp_path)
    config = tmp_path / "inventory.yaml"
    config.write_text(yt_inventory(tmp_path))
    env = {
        "OPSBOT_CONFIG": str(config),
        "OPSBOT_STATE_DIR": str(tmp_path / "state"),
        "YT_DB": pg_dsn,
        "YT_QDRANT": fake_qdrant.url,
        "YT_REDIS": redis_url,
    }

    code, out, err = await opsbot("run", "--as", REQUESTER, "reset soft yt", env=env)
    assert code == 0, out + err
    assert "Soft reset of yt: empty 4 table(s) (21 rows)" in out
    match = re.search(r"/ops approve (\w{8})", out.replace("`", ""))
    assert match, out
    code, out, err = await opsbot("run", "--as", FIRST, f"approve {match.group(1)}", env=env)
    assert code == 0, out + err
    assert (await rows(pg_dsn))["chunks"] == 10  # one approval of two: nothing ran yet
    code, out, err = await opsbot("run", "--as", SECOND, f"approve {match.group(1)}", env=env)

    assert code == 0, out + err
    assert "Soft reset of yt done: 7 target(s) emptied; kept channels." in out
    assert await rows(pg_dsn) == {"channels": 2, "contents": 0, "transcripts": 0, "chunks": 0, "jobs": 0}
