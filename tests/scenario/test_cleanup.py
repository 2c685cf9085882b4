"""/ops cleanup and /ops reindex end to end: signed Slack requests, the plan, an approval, the result;
MongoDB on the nx-27017 test server, files in real directories; and one cleanup through `opsbot run`."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from handlers.approvals import APPROVE
from services.state import Approval, ApprovalState
from tests.bot.test_cli import opsbot
from tests.fixtures.servers import mongo_process
from tests.fixtures.slack import FakeSlack
from tests.fixtures.wait import wait_until
from tests.scenario.harness import Bot, all_text, inventory, running_bot
from tests.services.test_cleanup import collect_leaked_sockets

REQUESTER = "U0REQ1"
APPROVER = "U0APP1"
NOW = datetime.now(UTC)
S = ApprovalState


def vcc_inventory(database: str, root: Path, *, timeout: float = 3) -> str:
    return f"""
roles:
  operator: [{REQUESTER}]
  approver: [{APPROVER}]
services:
  vcc:
    components:
      mongo:
        type: mongodb
        uri: "${{VCC_MONGO}}"
        database: {database}
        timeout: {timeout}
        cleanup:
          - {{name: failed-jobs, collection: imagegenerationjobs, match: {{status: failed}}, older_than_days: 30}}
    cleanup:
      roots: {{uploads: "{root / "uploads"}", tmp: "{root / "tmp"}"}}
      files:
        - {{name: old-images, root: uploads, path: generated, match: "*.png", older_than_days: 30}}
        - {{name: temp-uploads, root: tmp, match: "upload_*", older_than_days: 1, recursive: false}}
  shop:
    components:
      api: {{type: http, url: "http://127.0.0.1:9"}}
"""


def make(path: Path, *, days: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"png")
    moment = (NOW - timedelta(days=days)).timestamp()
    os.utime(path, (moment, moment))
    return path


def job(status: str, days: float) -> dict[str, Any]:
    return {"status": status, "createdAt": NOW - timedelta(days=days)}


async def statuses(uri: str, database: str) -> list[tuple[str, int]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
    try:
        docs = await client[database].imagegenerationjobs.find({}).to_list()
    finally:
        await client.close()
    return sorted((d["status"], round((NOW - d["createdAt"]).total_seconds() / 86400)) for d in docs)


@dataclass
class World:
    bot: Bot
    slack: FakeSlack
    uri: str
    database: str
    root: Path

    async def request(self, text: str) -> Approval:
        before = len(self.slack.calls_to("chat.postMessage"))
        assert (await self.bot.command(text, user=REQUESTER)).status == 200
        posts = await self.slack.wait_for("chat.postMessage", count=before + 1)
        return await self.bot.approval_posted(posts[-1].params["blocks"][-1]["elements"][0]["value"])

    async def approve(self, approval: Approval) -> Approval:
        body = self.slack.block_actions_body(
            APPROVE, approval.id, user_id=APPROVER, response_url=self.slack.response_url(APPROVER)
        )
        assert (await self.bot.post(body)).status == 200
        return await self.bot.settled(approval)

    async def answer(self, text: str, key: str) -> str:
        body = self.slack.slash_body(text, user_id=REQUESTER, response_url=self.slack.response_url(key))
        assert (await self.bot.post(body)).status == 200
        [call] = await self.slack.wait_for(f"response_url/{key}")
        await wait_until(lambda: self.bot.container.deps.running.count == 0, "the command finishes")
        assert call.params.get("response_type") == "ephemeral"
        return str(call.params["text"])


async def seed(uri: str, database: str, root: Path) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
    await client[database].imagegenerationjobs.insert_many(
        [job("failed", 45), job("failed", 40), job("failed", 31), job("failed", 5), job("completed", 90)]
    )
    await client.close()
    make(root / "uploads" / "generated" / "a.png", days=40)
    make(root / "uploads" / "generated" / "2024" / "b.png", days=400)
    make(root / "uploads" / "generated" / "fresh.png", days=3)
    make(root / "tmp" / "upload_1", days=2)
    make(root / "tmp" / "keep.txt", days=20)


@pytest.fixture
async def world(fake_slack: FakeSlack, tmp_path: Path, mongo_uri: str) -> AsyncIterator[World]:
    database = f"vcc_{uuid.uuid4().hex[:8]}"
    await seed(mongo_uri, database, tmp_path)
    loaded = inventory(vcc_inventory(database, tmp_path), env={"VCC_MONGO": mongo_uri})
    async with running_bot(fake_slack, tmp_path / "state", loaded) as bot:
        yield World(bot, fake_slack, mongo_uri, database, tmp_path)


async def test_cleanup_plans_per_rule_and_the_run_deletes_exactly_the_plan(world: World) -> None:
    secret = make(world.root / "outside" / "secret.png", days=400)
    (world.root / "uploads" / "generated" / "escape.png").symlink_to(secret)

    approval = await world.request("cleanup vcc")

    shown = all_text(world.slack.calls_to("chat.postMessage")[-1])
    assert "Delete 3 document(s) and 3 file(s) (9 B) from vcc by 3 cleanup rule(s)" in shown
    assert "failed-jobs: delete 3 document(s) of mongo/imagegenerationjobs" in shown
    assert "old-images: delete 2 file(s), 6 B, *.png older than 30 days" in shown
    assert "generated/escape.png: a symbolic link, not followed" in shown
    assert "temp-uploads: delete 1 file(s)" in shown
    assert approval.plan["params"]["rules"][0]["count"] == 3 and "ids" not in approval.plan["params"]["rules"][0]
    # After the plan: a failed job old enough appears, and a planned image is rewritten.
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(world.uri, tz_aware=True)
    await client[world.database].imagegenerationjobs.insert_one(job("failed", 60))
    await client.close()
    (world.root / "uploads" / "generated" / "a.png").write_bytes(b"a new image")

    final = await world.approve(approval)

    assert final.state is S.SUCCEEDED, final.result
    lines = final.result.splitlines()
    assert lines[0] == "Cleaned up vcc: deleted 3 document(s) and 2 file(s) (6 B)."
    assert "failed-jobs: deleted 3 of 3 planned document(s) from mongo/imagegenerationjobs" in lines
    assert any(line.startswith("old-images: deleted 1 of 2 planned file(s)") and
               "generated/a.png: changed since the plan, kept" in line for line in lines)  # fmt: skip
    assert await statuses(world.uri, world.database) == [("completed", 90), ("failed", 5), ("failed", 60)]
    left = sorted(str(p.relative_to(world.root)) for p in world.root.rglob("*") if p.is_file() or p.is_symlink())
    assert [p for p in left if not p.startswith("state")] == [
        "outside/secret.png",
        "tmp/keep.txt",
        "uploads/generated/a.png",
        "uploads/generated/escape.png",
        "uploads/generated/fresh.png",
    ]
    thread = [c for c in world.slack.calls_to("chat.postMessage") if c.params.get("thread_ts") == final.message_ts]
    assert thread and "Cleaned up vcc" in all_text(thread[-1])


async def test_an_empty_plan_says_so_and_asks_for_nothing(world: World) -> None:
    first = await world.request("cleanup vcc")
    await world.approve(first)
    posts = len(world.slack.calls_to("chat.postMessage"))

    said = await world.answer("cleanup vcc", "again")

    assert said == "Nothing to clean up in `vcc`: no rule selects anything now."
    assert len(world.slack.calls_to("chat.postMessage")) == posts
    assert [a.id for a in await world.bot.container.store.list_approvals(list(S))] == [first.id]


async def test_bad_input_is_one_plain_sentence(world: World) -> None:
    assert (await world.answer("cleanup nosuch", "a")).startswith("There is no service called `nosuch`.")
    assert (await world.answer("cleanup shop", "b")).startswith("`shop` has no cleanup rules in the inventory")
    assert (await world.answer("reindex shop jobs", "c")) == "`shop` has no MongoDB component in the inventory."
    said = await world.answer("reindex vcc nosuch", "d")
    assert said.startswith(f"MongoDB database {world.database} has no collection `nosuch`; its collections: ")
    said = await world.answer("reindex vcc ../../etc", "e")
    assert said.startswith("`collection`: `../../etc` is not a valid collection.")
    assert world.slack.calls_to("chat.postMessage") == []


async def test_a_root_that_became_a_link_is_skipped_and_reported(world: World) -> None:
    tmp = world.root / "tmp"
    tmp.rename(world.root / "real-tmp")
    tmp.symlink_to(world.root / "real-tmp")

    approval = await world.request("cleanup vcc")

    shown = all_text(world.slack.calls_to("chat.postMessage")[-1])
    assert f"temp-uploads: skipped — `{tmp}` is a symbolic link; opsbot never follows links" in shown
    final = await world.approve(approval)
    assert final.state is S.SUCCEEDED and (world.root / "real-tmp" / "upload_1").exists()


async def test_reindex_shows_the_indexes_before_and_after(world: World) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(world.uri)
    await client[world.database].imagegenerationjobs.create_index("userId", unique=True)
    await client.close()

    approval = await world.request("reindex vcc imagegenerationjobs")

    shown = all_text(world.slack.calls_to("chat.postMessage")[-1])
    assert "Rebuild 1 index(es) of `imagegenerationjobs` in vcc/mongo" in shown and "before: _id_" in shown
    final = await world.approve(approval)
    assert final.state is S.SUCCEEDED, final.result
    assert final.result.startswith("Rebuilt 1 index(es) of `imagegenerationjobs`.")
    assert re.search(r"^after: \S+ \{\"userId\": 1\} unique$", final.result, re.MULTILINE), final.result


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # PYTHON-3923: see collect_leaked_sockets
async def test_mongodb_down_before_the_run_fails_saying_nothing_was_deleted(
    fake_slack: FakeSlack, tmp_path: Path
) -> None:
    with mongo_process() as (uri, proc):
        await seed(uri, "vcc", tmp_path)
        loaded = inventory(vcc_inventory("vcc", tmp_path, timeout=1), env={"VCC_MONGO": uri})
        async with running_bot(fake_slack, tmp_path / "state", loaded) as bot:
            world = World(bot, fake_slack, uri, "vcc", tmp_path)
            approval = await world.request("cleanup vcc")
            proc.terminate()
            proc.wait(10)

            final = await world.approve(approval)

    assert final.state is S.FAILED
    lines = final.result.splitlines()
    assert re.fullmatch(
        r"Failed: cleanup of vcc stopped at rule failed-jobs: deleting from `imagegenerationjobs` in MongoDB "
        r"database vcc failed \((no server answered within 1 s|.*connection refused)\): "
        r"0 of 3 planned document\(s\) deleted; the other 3 were not touched\.",
        lines[0],
    ), lines[0]
    assert lines[1:] == ["not started: old-images, temp-uploads"]
    assert (tmp_path / "uploads" / "generated" / "a.png").exists()
    await collect_leaked_sockets()


async def test_cleanup_through_opsbot_run(tmp_path: Path, mongo_uri: str) -> None:
    database = f"vcc_{uuid.uuid4().hex[:8]}"
    await seed(mongo_uri, database, tmp_path)
    config = tmp_path / "inventory.yaml"
    config.write_text(vcc_inventory(database, tmp_path))
    env = {"OPSBOT_CONFIG": str(config), "OPSBOT_STATE_DIR": str(tmp_path / "state"), "VCC_MONGO": mongo_uri}

    code, out, err = await opsbot("run", "cleanup vcc", env=env)
    assert code == 0, out + err
    assert "Delete 3 document(s) and 3 file(s)" in out
    match = re.search(r"/ops approve (\w{8})", out.replace("`", ""))
    assert match, out
    code, out, err = await opsbot("run", "--as", APPROVER, f"approve {match.group(1)}", env=env)

    assert code == 0, out + err
    assert "Cleaned up vcc: deleted 3 document(s) and 3 file(s) (9 B)." in out
    assert await statuses(mongo_uri, database) == [("completed", 90), ("failed", 5)]
    assert not (tmp_path / "tmp" / "upload_1").exists() and (tmp_path / "tmp" / "keep.txt").exists()
