"""/ops stats: its rendering within Block Kit's limits, and the command end to end through signed Slack
requests and `opsbot run`, on real PostgreSQL and Redis, Qdrant over REST (the fake) and nx-27017."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from pymongo import AsyncMongoClient
from qdrant_client import models

from handlers.blocks import messages_for, render_text
from handlers.stats import render_stats
from services.health import Status
from services.state import ApprovalState
from services.stats import (
    CollectionStats,
    ComponentStats,
    MongoCollectionStats,
    MongoStats,
    PostgresStats,
    PrefixCount,
    QdrantStats,
    RedisStats,
    ServiceStats,
    TableStats,
    VectorConfig,
)
from tests.fixtures.qdrant import FakeQdrant
from tests.fixtures.servers import PostgresServer, free_port
from tests.fixtures.slack import FakeSlack
from tests.fixtures.slack_checks import MESSAGE_BLOCKS, check_blocks
from tests.scenario.harness import Bot, all_text, inventory, running_bot

pytestmark = pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection:UserWarning")

ROOT = Path(__file__).parents[2]
VIEWER, OUTSIDER = "U0VIEW1", "U0NOBODY"
PASSWORD = "r3dis-Secret-77"
MIB = 1024 * 1024


# -- rendering -----------------------------------------------------------------------------------------


def table(i: int) -> TableStats:
    return TableStats("public", f"table_{i:02}", 1000 * i, "reltuples", i * MIB, i * MIB // 4, i * MIB * 5 // 4)


def everything(tables: int = 40) -> ServiceStats:
    shown = [table(i) for i in range(tables, tables - 15, -1)]
    postgres = PostgresStats("app", 900 * MIB, shown, tables, 123 * MIB)
    qdrant = QdrantStats(
        [
            CollectionStats(
                "youtube_content", "green", Status.HEALTHY, 12_345, 12_000, 3,
                [VectorConfig("", 768, "Cosine")], 2,
            ),
            CollectionStats("gone", problem="missing"),
        ]
    )  # fmt: skip
    mongo = MongoStats(
        "vcc",
        [MongoCollectionStats("users", 1234, 2 * MIB, 3 * MIB, 3, MIB // 2)],
        collection_count=30,
        others=29,
        others_bytes=7 * MIB,
        unread=0,
        data_bytes=9 * MIB,
    )
    redis = RedisStats(
        12 * MIB, 20 * MIB, 0, 0, 250_000, [PrefixCount("cache:", 4000), PrefixCount("<!channel>", 7)], 1000, 5007,
        complete=False, stopped="the SCAN stopped after 200 calls",
    )  # fmt: skip
    return ServiceStats(
        "youtube",
        [
            ComponentStats("db", "postgres", 40.0, data=postgres),
            ComponentStats("vectors", "qdrant", 12.0, data=qdrant),
            ComponentStats("mongo", "mongodb", 30.0, data=mongo),
            ComponentStats("cache", "redis", 5.0, data=redis),
            ComponentStats("queue", "redis", 1000.0, problem="connection refused"),
        ],
        [("web", "http")],
    )


def test_the_report_shows_the_largest_tables_then_how_many_more_within_block_kit() -> None:
    reply = render_stats(everything())
    assert check_blocks(reply.blocks, MESSAGE_BLOCKS) is None
    text = render_text(reply.blocks)
    assert "`table_40` ~40,000 rows · table 40.0 MB · indexes 10.0 MB · total 50.0 MB" in text
    assert "`table_26`" in text and "`table_25`" not in text
    assert "… and 25 more tables, 123.0 MB in all" in text
    assert "database `app` 900.0 MB · 40 tables" in text
    assert "`youtube_content` green · 12,345 points (12,000 vectors indexed) · 3 segments" in text
    assert "vectors 768-dim Cosine · 2 payload indexes" in text and "`gone` missing (no such collection)" in text
    assert "`users` ~1,234 documents · data 2.0 MB · storage 3.0 MB · 3 indexes 512.0 KB" in text
    assert "… and 29 more collections, 7.0 MB in all" in text
    assert "`cache:` at least 4,000 keys" in text and "under no declared prefix: at least 1,000" in text
    assert "the SCAN stopped after 200 calls (5,007 of 250,000 keys seen): the counts are lower bounds" in text
    assert "memory 12.0 MB (peak 20.0 MB), no maxmemory set · 250,000 keys in db 0" in text
    assert "queue (redis) could not be read: connection refused" in text
    assert "No stats for their type: web (http)" in text
    assert "<!channel>" not in str(reply.blocks) and "&lt;!channel&gt;" in str(reply.blocks)
    assert reply.status is Status.WARNING and reply.ephemeral
    assert reply.text.splitlines() == [
        "Stats of youtube: 4 of 5 component(s) read; 1 could not be: queue",
        "queue: could not be read: connection refused",
    ]


def test_a_complete_scan_is_exact_and_a_report_without_problems_is_healthy() -> None:
    redis = RedisStats(MIB, None, 100 * MIB, 2, 10, [PrefixCount("cache:", 1)], 9, 10, complete=True)
    reply = render_stats(ServiceStats("svc", [ComponentStats("cache", "redis", 3.0, data=redis)], []))
    text = render_text(reply.blocks)
    assert "`cache:` 1 key" in text and "at least" not in text
    assert "memory 1.0 MB of 100.0 MB (1 %) · 10 keys in db 2" in text
    assert "Counted with a full SCAN (10 keys seen)." in text
    assert reply.status is Status.HEALTHY


def test_a_service_with_many_components_is_split_into_messages_slack_accepts() -> None:
    one = everything().components
    many = ServiceStats("big", [item for _ in range(12) for item in one], [])
    reply = render_stats(many)
    assert len(reply.blocks) > MESSAGE_BLOCKS
    messages = messages_for(reply)
    assert len(messages) > 1 and messages[1].in_thread
    for message in messages:
        assert check_blocks(message.blocks, MESSAGE_BLOCKS) is None


# -- end to end ----------------------------------------------------------------------------------------


def stats_inventory(qdrant_url: str) -> str:
    return f"""
roles:
  viewer: [{VIEWER}]
services:
  youtube:
    components:
      web:
        type: http
        url: http://127.0.0.1:1
      db:
        type: postgres
        dsn: "${{YT_DB}}"
      vectors:
        type: qdrant
        url: {qdrant_url}
        collections: [youtube_content]
      mongo:
        type: mongodb
        uri: "${{YT_MONGO}}"
        database: yt_stats
        collections: [videos]
      cache:
        type: redis
        url: "${{YT_REDIS}}"
        key_prefixes: ["yt:cache:", "yt:job:"]
      old-cache:
        type: redis
        url: "${{YT_OLD_REDIS}}"
        timeout: 2
"""


@dataclass
class World:
    bot: Bot
    slack: FakeSlack
    config: str
    env: dict[str, str]

    async def ask(self, text: str, user: str = VIEWER) -> str:
        """The one ephemeral answer to a command."""
        name = f"r{len(self.slack.calls)}"
        body = self.slack.slash_body(text, user_id=user, channel_id="C0OPS", response_url=self.slack.response_url(name))
        assert (await self.bot.post(body)).status == 200
        [answer] = await self.slack.wait_for(f"response_url/{name}", timeout=20)
        assert answer.params.get("response_type") == "ephemeral", answer.params
        assert check_blocks(answer.json_param("blocks") or [], MESSAGE_BLOCKS) is None
        return all_text(answer)


async def seed(env: dict[str, str], qdrant: FakeQdrant) -> None:
    redis = aioredis.from_url(env["YT_REDIS"])
    try:
        await redis.mset({**{f"yt:cache:{i}": "v" for i in range(25)}, **{f"yt:job:{i}": "v" for i in range(4)}})
    finally:
        await redis.aclose()
    mongo: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(env["YT_MONGO"])
    try:
        await mongo["yt_stats"].drop_collection("videos")
        await mongo["yt_stats"]["videos"].insert_many([{"n": i} for i in range(9)])
    finally:
        await mongo.close()
    client = qdrant.client()
    try:
        await client.create_collection(
            "youtube_content", vectors_config=models.VectorParams(size=4, distance=models.Distance.COSINE)
        )
        await client.upsert("youtube_content", [models.PointStruct(id=i, vector=[0.5] * 4) for i in range(1, 6)])
    finally:
        await client.close()


@pytest.fixture
async def world(
    fake_slack: FakeSlack,
    fake_qdrant: FakeQdrant,
    tmp_path: Path,
    postgres_server: PostgresServer,
    redis_url: str,
    mongo_uri: str,
) -> AsyncIterator[World]:
    dsn = await postgres_server.database_with(
        "create table chunks (id bigint primary key, body text)",
        "insert into chunks select g, repeat('x', 100) from generate_series(1, 500) g",
        "analyze chunks",
    )
    env = {
        "YT_DB": dsn,
        "YT_MONGO": mongo_uri,
        "YT_REDIS": redis_url,
        "YT_OLD_REDIS": f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0",
    }
    await seed(env, fake_qdrant)
    text = stats_inventory(fake_qdrant.url)
    async with running_bot(fake_slack, tmp_path, inventory(text, env=env)) as bot:
        yield World(bot, fake_slack, text, env)


async def test_stats_through_slack_show_every_component_and_say_which_could_not_be_read(world: World) -> None:
    text = await world.ask("stats youtube")
    assert "`chunks` ~500 rows · table " in text and "1 table" in text
    assert "`youtube_content` green · 5 points" in text and "vectors 4-dim Cosine" in text
    assert "`videos` ~9 documents" in text
    assert "`yt:cache:` 25 keys" in text and "`yt:job:` 4 keys" in text and "29 keys in db 0" in text
    assert "old-cache* (redis) could not be read: connection refused" in text
    assert "No stats for their type: web (http)" in text
    assert "4 of 5 component(s) read; 1 could not be: old-cache" in text
    said = "\n".join(all_text(call) for call in world.slack.calls)
    assert PASSWORD not in said and world.env["YT_DB"] not in said

    one = await world.ask("stats youtube cache")
    assert "`yt:cache:` 25 keys" in one and "chunks" not in one and "1 of 1 component(s) read" in one


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stats nosuch", "There is no service called `nosuch`."),
        ("stats youtube nope", "`youtube` has no component called `nope`; its components are `web`, `db`"),
        ("stats youtube web", "`youtube/web` is a http component: stats cover PostgreSQL, Qdrant, MongoDB and Redis"),
        ("stats", "Missing `service`. Usage: `/ops stats <service> [component]`"),
    ],
)
async def test_bad_input_is_one_sentence(world: World, text: str, expected: str) -> None:
    answer = await world.ask(text)
    assert expected in answer.splitlines()[0], answer
    assert world.slack.calls_to("chat.postMessage") == []
    assert await world.bot.container.store.list_approvals(list(ApprovalState)) == []


async def test_someone_without_a_role_is_refused(world: World) -> None:
    answer = await world.ask("stats youtube", user=OUTSIDER)
    assert "chunks" not in answer and "`/ops stats` needs the viewer role" in answer


async def test_opsbot_run_prints_the_stats(world: World, tmp_path: Path) -> None:
    config = tmp_path / "opsbot.yaml"
    config.write_text(world.config)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "OPSBOT_"))}
    env |= {"OPSBOT_CONFIG": str(config), "OPSBOT_STATE_DIR": str(tmp_path / "cli-state"), **world.env}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "run", "stats youtube",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 1, (text, err.decode())  # one component could not be read: a warning
    assert "Stats: youtube" in text and "`chunks` ~500 rows" in text and "`yt:job:` 4 keys" in text
    assert "old-cache (redis) could not be read: connection refused" in text
    assert PASSWORD not in text + err.decode()
