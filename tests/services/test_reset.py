"""services/reset.py and the inventory's `reset:` section, on real PostgreSQL, Redis, SQLite backups, files
and the Qdrant REST fake (as a server without snapshots, and with them where a test turns them on)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from qdrant_client import AsyncQdrantClient, models

from handlers.reset import backup_facts, identities_now
from services import reset as reset_module
from services.access import Risk
from services.approvals import drift, policy_for
from services.backup.runner import BackupRunner
from services.errors import CommandError, InventoryError
from services.inventory import Inventory, parse_inventory
from services.locks import LocalLocks
from services.plan_lists import PlanLists
from services.redaction import Redactor
from services.reset import (
    CollectionTarget,
    ResetScope,
    ResetStopped,
    TargetCount,
    check_backups,
    empty_collection,
    files_identity,
    reset_scope,
    run_reset,
    snapshot,
    stored_file,
    survey_collection,
    survey_database,
    survey_files,
    survey_keys,
)
from services.state import StateStore, open_state_store
from tests.fixtures.qdrant import FakeQdrant
from tests.fixtures.servers import redis_process, run_sql

REDACTOR = Redactor()

SCHEMA = (
    "create table channels (id serial primary key, name text)",
    "create table contents (id serial primary key, channel_id int references channels(id), title text)",
    "create table transcripts (id serial primary key, content_id int references contents(id))",
    "create table chunks (id serial primary key, content_id int references contents(id), body text)",
    "create table jobs (id serial primary key, content_id int references contents(id), status text, "
    "started_at timestamptz, error_message text)",
    "insert into channels (name) select 'c' || g from generate_series(1, 2) g",
    "insert into contents (channel_id, title) select 1 + g % 2, 't' || g from generate_series(1, 4) g",
    "insert into transcripts (content_id) select 1 + g % 4 from generate_series(1, 4) g",
    "insert into chunks (content_id, body) select 1 + g % 4, 'b' from generate_series(1, 10) g",
    "insert into jobs (content_id, status) select 1 + g % 4, 'completed' from generate_series(1, 3) g",
)


def yaml_for(root: Path, *, extra: str = "", soft_tables: str = "[chunks, transcripts, contents]") -> str:
    return f"""
services:
  yt:
    components:
      db: {{type: postgres, dsn: "${{YT_DB}}", timeout: 5, jobs: {{table: jobs}}}}
      vectors: {{type: qdrant, url: "${{YT_QDRANT}}", collections: [youtube_content, other], timeout: 5}}
      cache: {{type: redis, url: "${{YT_REDIS}}", timeout: 3}}
      meta: {{type: sqlite, path: "{root / "meta.db"}"}}
    reset:
      keep: [channels]
      soft:
        jobs: [db]
        tables: {{db: {soft_tables}}}
        collections: {{vectors: [youtube_content]}}
        redis: {{cache: ["yt:cache:*", "yt:job:*"]}}
        files: [{{path: "{root / "tmp"}", match: "*.part"}}]
      hard:
        tables: {{db: [channels]}}
{extra}
"""


@dataclass
class World:
    inventory: Inventory
    dsn: str
    redis_url: str
    qdrant: FakeQdrant
    root: Path
    lists: PlanLists

    def scope(self, mode: str = "soft") -> ResetScope:
        return reset_scope(self.inventory, "yt", mode)  # type: ignore[arg-type]

    async def rows(self) -> dict[str, int]:
        conn = await asyncpg.connect(self.dsn)
        try:
            return {
                t: int(await conn.fetchval(f"select count(*) from {t}"))
                for t in ("channels", "contents", "transcripts", "chunks", "jobs")
            }
        finally:
            await conn.close()

    async def points(self, name: str = "youtube_content") -> int:
        client = self.qdrant.client()
        try:
            return (await client.count(name, exact=True)).count
        finally:
            await client.close()


async def seed_qdrant(client: AsyncQdrantClient, name: str, count: int, size: int = 4) -> None:
    await client.create_collection(name, vectors_config=models.VectorParams(size=size, distance=models.Distance.COSINE))
    await client.upsert(
        name, points=[models.PointStruct(id=i, vector=[0.1 * (i % 7 + 1)] * size) for i in range(1, count + 1)]
    )


@pytest.fixture
async def world(pg_dsn: str, redis_url: str, fake_qdrant: FakeQdrant, tmp_path: Path) -> AsyncIterator[World]:
    await run_sql(pg_dsn, *SCHEMA)
    client = fake_qdrant.client()
    await seed_qdrant(client, "youtube_content", 25)
    await seed_qdrant(client, "other", 3)
    await client.close()
    cache = aioredis.from_url(redis_url)
    await cache.mset({f"yt:cache:{i}": "v" for i in range(30)} | {"yt:job:1": "j", "other:1": "keep"})
    await cache.aclose()
    (tmp_path / "tmp" / "sub").mkdir(parents=True)
    for name in ("a.part", "sub/b.part", "keep.txt"):
        (tmp_path / "tmp" / name).write_bytes(b"xx")
    env = {"YT_DB": pg_dsn, "YT_QDRANT": fake_qdrant.url, "YT_REDIS": redis_url}
    loaded = parse_inventory(yaml_for(tmp_path), "test", env=env)
    yield World(loaded.inventory, pg_dsn, redis_url, fake_qdrant, tmp_path, PlanLists(tmp_path / "lists"))


async def plan_files(world: World, scope: ResetScope) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """What the handler does for files at plan time: the list saved, its identity."""
    params: dict[str, dict[str, Any]] = {}
    facts: dict[str, str] = {}
    for target in scope.files:
        found = survey_files(target)
        saved = await world.lists.save([stored_file(f) for f in found.files])
        params[target.label] = {"ref": saved.ref, "root_id": found.root_id, "count": saved.count}
        facts[target.label] = files_identity(found.root_id, saved.ref, saved.count)
    return params, facts


async def plan_facts(world: World, scope: ResetScope) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    counts: list[TargetCount] = []
    for component, tables in scope.databases.items():
        counts += await survey_database(component, tables, count_seconds=5, redactor=REDACTOR)
    counts += [await survey_collection(t, count_seconds=5, redactor=REDACTOR) for t in scope.collections]
    counts += [await survey_keys(t, seconds=5, redactor=REDACTOR) for t in scope.keys]
    files, file_facts = await plan_files(world, scope)
    return {c.target.label: c.identity for c in counts} | file_facts, files


async def noop(text: str) -> None:
    return None


# -- the inventory --------------------------------------------------------------------------------------


def problems_of(text: str) -> list[str]:
    with pytest.raises(InventoryError) as caught:
        parse_inventory(
            text, "test", env={"YT_DB": "postgresql://u@h/d", "YT_QDRANT": "http://h", "YT_REDIS": "redis://h"}
        )
    return caught.value.problems


def test_a_reset_section_naming_wrong_components_is_refused_by_path(tmp_path: Path) -> None:
    text = yaml_for(tmp_path).replace("redis: {cache:", "redis: {db:").replace("[youtube_content]}", "[nosuch]}")
    text = text.replace("jobs: [db]", "jobs: [cache]").replace("keep: [channels]", "keep: [chunks]")
    assert problems_of(text) == [
        "services.yt.reset.soft.jobs: 'cache' is a redis component, not postgres",
        "services.yt.reset.soft.collections.vectors: 'nosuch' is not one of the collections of 'vectors': "
        "youtube_content, other",
        "services.yt.reset.soft.redis.db: 'db' is a postgres component, not redis",
        "services.yt.reset.keep: 'chunks' is kept, but `soft.tables` empties it",
    ]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (('"yt:cache:*"', '"*"'), "services.yt.reset.soft.redis.cache.0: '*' is not a key pattern"),
        (('"yt:cache:*"', '"yt:[ab"'), "services.yt.reset.soft.redis.cache.0: 'yt:[ab': its [ ] brackets do not pair"),
        (('"yt:cache:*"', '"opsbot:lock:*"'), "keys under opsbot: are the bot's own"),
        (("[chunks, transcripts", '["chunks; drop table x", transcripts'), "services.yt.reset.soft.tables.db.0:"),
        (("{db: [channels]}", "{db: [channels, chunks]}"), "the table 'chunks' of 'db' is listed twice"),
        (("keep: [channels]", "keep: [channels]\n      backup_max_age: 1x"), "'1x' is not a duration"),
        (("keep: [channels]", "keep: [channels]\n      backup_max_age: 90d"), "must be between 1 minute and 30 days"),
        (('match: "*.part"', 'match: "../*"'), "services.yt.reset.soft.files.0.match"),
    ],
)
def test_bad_reset_settings_are_one_line_each(tmp_path: Path, change: tuple[str, str], problem: str) -> None:
    text = yaml_for(tmp_path)
    assert change[0] in text
    found = problems_of(text.replace(change[0], change[1]))
    assert len(found) == 1 and problem in found[0], found


def test_an_empty_reset_section_and_a_jobs_component_without_a_jobs_table_are_refused(tmp_path: Path) -> None:
    text = yaml_for(tmp_path).replace(", jobs: {table: jobs}}", "}")
    assert "services.yt.reset.soft.jobs: the postgres component 'db' has no `jobs:` table" in problems_of(text)
    empty = "services:\n  yt:\n    components:\n      api: {type: http, url: 'http://h'}\n    reset: {keep: [x]}\n"
    assert problems_of(empty) == ["services.yt.reset: declares nothing to empty (`soft:` and `hard:` are both empty)"]


def test_resets_need_two_approvers_unless_the_commands_policy_says_otherwise(tmp_path: Path) -> None:
    env = {"YT_DB": "postgresql://u@h/d", "YT_QDRANT": "http://h", "YT_REDIS": "redis://h"}
    default = parse_inventory(yaml_for(tmp_path), "t", env=env).inventory.approvals
    assert policy_for(default, "reset soft", Risk.DESTRUCTIVE).approvers == 2
    assert policy_for(default, "reset hard", Risk.DESTRUCTIVE).approvers == 2
    assert policy_for(default, "cleanup", Risk.DESTRUCTIVE).approvers == 1
    extra = 'approvals:\n  commands:\n    "reset soft": {approvers: 1}\n    "reset hard": {expiry_minutes: 5}\n'
    settings = parse_inventory(extra + yaml_for(tmp_path), "t", env=env).inventory.approvals
    assert policy_for(settings, "reset soft", Risk.DESTRUCTIVE).approvers == 1
    hard = policy_for(settings, "reset hard", Risk.DESTRUCTIVE)
    assert (hard.approvers, hard.critical, hard.expiry) == (2, True, timedelta(minutes=5))


def test_the_scope_orders_the_jobs_table_first_and_hard_targets_after_the_soft_ones(world: World) -> None:
    soft, hard = world.scope("soft"), world.scope("hard")
    assert [t.label for t in soft.databases["db"]] == [
        "table db.jobs", "table db.chunks", "table db.transcripts", "table db.contents"
    ]  # fmt: skip
    assert [t.label for t in hard.databases["db"]][-1] == "table db.channels"
    assert soft.keep == ["channels"] and hard.keep == []
    plain = parse_inventory(
        "services:\n  x:\n    components:\n      api: {type: http, url: 'http://h'}\n", "t", env={}
    ).inventory
    with pytest.raises(CommandError, match=r"^`x` has no `reset:` section in the inventory"):
        reset_scope(plain, "x", "soft")


# -- planning ------------------------------------------------------------------------------------------


async def test_the_survey_counts_each_target_exactly(world: World) -> None:
    scope = world.scope("soft")
    tables = await survey_database("db", scope.databases["db"], count_seconds=5, redactor=REDACTOR)
    assert [(c.target.label, c.text) for c in tables] == [
        ("table db.jobs", "3 row(s)"),
        ("table db.chunks", "10 row(s)"),
        ("table db.transcripts", "4 row(s)"),
        ("table db.contents", "4 row(s)"),
    ]
    assert all(c.identity.startswith("oid ") and c.exact for c in tables)
    collection = await survey_collection(scope.collections[0], count_seconds=5, redactor=REDACTOR)
    assert (collection.number, collection.exact, collection.identity.startswith("config ")) == (25, True, True)
    keys = [await survey_keys(t, seconds=5, redactor=REDACTOR) for t in scope.keys]
    assert [(k.number, k.text) for k in keys] == [(30, "30 key(s)"), (1, "1 key(s)")]
    found = survey_files(scope.files[0])
    assert sorted(f.path for f in found.files) == ["a.part", "sub/b.part"]


async def test_a_bounded_key_count_says_at_least(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reset_module, "SCAN_COUNT", 5)
    monkeypatch.setattr(reset_module, "SCAN_CALLS", 1)
    found = await survey_keys(world.scope().keys[0], seconds=5, redactor=REDACTOR)
    assert not found.exact and found.text.startswith(
        f"at least {found.number:,} key(s) (the count stopped after 1 SCAN"
    )
    assert found.number is not None and found.number < 30


async def test_a_count_that_takes_too_long_becomes_an_estimate_saying_so(world: World) -> None:
    await run_sql(world.dsn, "analyze chunks")
    locker = await asyncpg.connect(world.dsn)
    try:
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("lock table chunks in access exclusive mode")
        found = await survey_database("db", world.scope().databases["db"][1:2], count_seconds=0.2, redactor=REDACTOR)
        await transaction.rollback()
    finally:
        await locker.close()
    assert [c.text for c in found] == ["about 10 row(s) (an estimate: counting them took over 0.2 s)"]
    assert not found[0].exact


@pytest.mark.parametrize(
    ("tables", "said"),
    [
        ("[chunks, transcripts, contents, nosuch]", "PostgreSQL `db` has no table `nosuch` (declared in the reset"),
        ("[contents, chunks, transcripts]", "The reset empties `db.contents` before `chunks`, which references it; "
         "list `chunks` first. Nothing was planned."),
        ("[chunks, contents]", "`db.transcripts` references `contents` but is not emptied by this reset: its rows "
         "would block the delete; declare it (before `contents`) or keep `contents`. Nothing was planned."),
    ],
)  # fmt: skip
async def test_a_missing_table_or_a_broken_order_is_refused_in_one_sentence(
    world: World, tables: str, said: str
) -> None:
    env = {"YT_DB": world.dsn, "YT_QDRANT": world.qdrant.url, "YT_REDIS": world.redis_url}
    inventory = parse_inventory(yaml_for(world.root, soft_tables=tables), "t", env=env).inventory
    scope = reset_scope(inventory, "yt", "soft")
    with pytest.raises(CommandError) as caught:
        await survey_database("db", scope.databases["db"], count_seconds=5, redactor=REDACTOR)
    assert caught.value.message.startswith(said), caught.value.message
    assert "\n" not in caught.value.message
    assert (await world.rows())["chunks"] == 10


async def test_unreachable_servers_are_one_sentence_without_secrets(world: World) -> None:
    env = {
        "YT_DB": "postgresql://opsbot:pg-Secret-9@127.0.0.1:9/x",
        "YT_QDRANT": "http://127.0.0.1:9",
        "YT_REDIS": "redis://:redis-Secret-9@127.0.0.1:9/0",
    }
    scope = reset_scope(parse_inventory(yaml_for(world.root), "t", env=env).inventory, "yt", "soft")
    said: list[str] = []
    for work in (
        survey_database("db", scope.databases["db"], count_seconds=1, redactor=REDACTOR),
        survey_collection(scope.collections[0], count_seconds=1, redactor=REDACTOR),
        survey_keys(scope.keys[0], seconds=1, redactor=REDACTOR),
    ):
        with pytest.raises(CommandError) as caught:
            await work
        said.append(caught.value.message)
    assert said[0].startswith("PostgreSQL `db` did not answer: ") and said[1].startswith("Qdrant `vectors` did not")
    assert said[2].startswith("Redis `cache` did not answer: ")
    assert not any("Secret-9" in s for s in said), said


# -- drift ---------------------------------------------------------------------------------------------


async def test_identities_do_not_drift_with_counts_but_do_with_a_recreated_table_or_collection(world: World) -> None:
    scope = world.scope("soft")
    facts, files = await plan_facts(world, scope)
    await run_sql(world.dsn, "insert into chunks (content_id, body) values (1, 'new')")
    cache = aioredis.from_url(world.redis_url)
    await cache.set("yt:cache:new", "v")
    await cache.aclose()
    assert drift(facts, await identities_now(scope, files, world.lists, REDACTOR)) == []

    await run_sql(world.dsn, "drop table chunks", "create table chunks (id serial primary key, body text)")
    client = world.qdrant.client()
    await client.delete_collection("youtube_content")
    await seed_qdrant(client, "youtube_content", 25, size=8)
    await client.close()
    changes = drift(facts, await identities_now(scope, files, world.lists, REDACTOR))

    assert len(changes) == 2, changes
    assert changes[0].startswith("collection vectors/youtube_content: config ") and changes[1].startswith(
        "table db.chunks: oid "
    )
    with pytest.raises(ResetStopped) as caught:
        await run_reset(
            scope, identities=facts, files=files, lists=world.lists, runner=None, take_backups=False,
            requested_by="t", redactor=REDACTOR, progress=noop,
        )  # fmt: skip
    message = caught.value.message
    assert message.startswith("Soft reset of yt stopped at database db: `chunks` is not the table the plan saw")
    assert "nothing of database `db` was deleted (its transaction was rolled back)" in message
    assert "Nothing was deleted before it." in message
    assert (await world.rows())["jobs"] == 3


# -- running -------------------------------------------------------------------------------------------


async def test_a_soft_reset_empties_exactly_its_targets_and_keeps_the_rest(world: World) -> None:
    scope = world.scope("soft")
    facts, files = await plan_facts(world, scope)
    (world.root / "tmp" / "late.part").write_bytes(b"late")  # not in the plan: kept
    cache = aioredis.from_url(world.redis_url)
    await cache.config_resetstat()
    world.qdrant.clear_requests()

    ledger = await run_reset(
        scope, identities=facts, files=files, lists=world.lists, runner=None, take_backups=False,
        requested_by="t", redactor=REDACTOR, progress=noop,
    )  # fmt: skip

    assert ledger.done == [
        "table db.jobs: deleted 3 row(s)",
        "table db.chunks: deleted 10 row(s)",
        "table db.transcripts: deleted 4 row(s)",
        "table db.contents: deleted 4 row(s)",
        "collection vectors/youtube_content: deleted 25 point(s); config and payload indexes kept",
        "keys cache yt:cache:*: removed 30 key(s)",
        "keys cache yt:job:*: removed 1 key(s)",
        f"files {world.root / 'tmp'} *.part: deleted 2 of 2 file(s) (4 B)",
    ]
    assert await world.rows() == {"channels": 2, "contents": 0, "transcripts": 0, "chunks": 0, "jobs": 0}
    assert (await world.points(), await world.points("other")) == (0, 3)
    stats = await cache.info("commandstats")  # before the test's own KEYS below
    assert await cache.keys("*") == [b"other:1"]
    await cache.aclose()
    assert "cmdstat_unlink" in stats and "cmdstat_scan" in stats
    assert not {"cmdstat_keys", "cmdstat_flushdb", "cmdstat_flushall", "cmdstat_del"} & set(stats)
    paths = {(r.method, r.path) for r in world.qdrant.requests}
    assert ("POST", "/collections/youtube_content/points/delete") in paths
    assert not {m for m, p in paths if p == "/collections/youtube_content"} - {"GET"}  # never deleted or re-created
    assert sorted(p.name for p in (world.root / "tmp").rglob("*")) == ["keep.txt", "late.part", "sub"]


async def test_points_go_in_batches_and_the_collection_keeps_its_config(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reset_module, "QDRANT_BATCH", 10)
    target = world.scope().collections[0]
    before = await survey_collection(target, count_seconds=5, redactor=REDACTOR)
    world.qdrant.clear_requests()

    assert await empty_collection(target, before.identity, REDACTOR, noop) == 25

    deletes = world.qdrant.requests_to("/collections/youtube_content/points/delete", "POST")
    assert [len(r.body["points"]) for r in deletes] == [10, 10, 5]
    after = await survey_collection(target, count_seconds=5, redactor=REDACTOR)
    assert (after.number, after.identity) == (0, before.identity)


async def test_the_fake_qdrant_makes_no_snapshot_and_says_so(world: World) -> None:
    name, why = await snapshot(world.scope().collections[0], REDACTOR)
    assert name is None
    assert why.startswith("Qdrant could not make one (Qdrant answered 500")
    assert world.qdrant.requests_to("/collections/youtube_content/snapshots", "POST")


async def test_a_server_with_snapshots_snapshots_the_collection_before_a_hard_reset_and_names_it(
    world: World,
) -> None:
    world.qdrant.support_snapshots()
    env = {"YT_DB": world.dsn, "YT_QDRANT": world.qdrant.url, "YT_REDIS": world.redis_url}
    text = yaml_for(world.root).replace("keep: [channels]", "keep: [channels]\n      require_snapshot: true")
    scope = reset_scope(parse_inventory(text, "t", env=env).inventory, "yt", "hard")
    facts, files = await plan_facts(world, scope)
    ledger = await run_reset(
        scope, identities=facts, files=files, lists=world.lists, runner=None, take_backups=False,
        requested_by="t", redactor=REDACTOR, progress=noop,
    )  # fmt: skip
    [made] = world.qdrant.snapshots("youtube_content")
    [note] = [n for n in ledger.notes if n.startswith("collection vectors/youtube_content")]
    assert made in note and "snapshot" in note
    assert await world.points() == 0  # emptied after the snapshot was taken
    snapshot_at = world.qdrant.requests.index(
        world.qdrant.requests_to("/collections/youtube_content/snapshots", "POST")[0]
    )
    first_delete = world.qdrant.requests_to("/collections/youtube_content/points/delete", "POST")[0]
    assert snapshot_at < world.qdrant.requests.index(first_delete)


async def test_a_failing_table_delete_rolls_back_its_whole_database(world: World) -> None:
    await run_sql(
        world.dsn,
        "create function refuse() returns trigger language plpgsql as $$ begin raise exception 'no deletes here'; "
        "end $$",
        "create trigger refuse before delete on transcripts for each row execute function refuse()",
    )
    scope = world.scope("soft")
    facts, files = await plan_facts(world, scope)

    with pytest.raises(ResetStopped) as caught:
        await run_reset(
            scope, identities=facts, files=files, lists=world.lists, runner=None, take_backups=False,
            requested_by="t", redactor=REDACTOR, progress=noop,
        )  # fmt: skip

    lines = caught.value.message.splitlines()
    assert lines[0] == (
        "Soft reset of yt stopped at database db: PostgreSQL `db` failed: RaiseError: no deletes here; nothing of "
        "database `db` was deleted (its transaction was rolled back)."
    )
    assert "not done — table db.jobs" in lines and "not done — keys cache yt:cache:*" in lines
    assert lines[-1] == "Nothing was deleted before it."
    assert await world.rows() == {"channels": 2, "contents": 4, "transcripts": 4, "chunks": 10, "jobs": 3}
    assert await world.points() == 25


async def test_qdrant_failing_mid_run_reports_what_was_and_was_not_done(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reset_module, "QDRANT_BATCH", 10)
    monkeypatch.setattr(reset_module, "PROGRESS_EVERY", 0)
    scope = world.scope("soft")
    facts, files = await plan_facts(world, scope)

    async def break_qdrant(text: str) -> None:
        if "point(s) deleted" in text:
            world.qdrant.fail(503, path="/collections/*", times=None)

    with pytest.raises(ResetStopped) as caught:
        await run_reset(
            scope, identities=facts, files=files, lists=world.lists, runner=None, take_backups=False,
            requested_by="t", redactor=REDACTOR, progress=break_qdrant,
        )  # fmt: skip

    lines = caught.value.message.splitlines()
    assert lines[0] == (
        "Soft reset of yt stopped at collection vectors/youtube_content: Qdrant `vectors` failed: Qdrant answered "
        "503 Service Unavailable (10 point(s) deleted before that)."
    )
    assert lines[1:5] == [
        "done — table db.jobs: deleted 3 row(s)",
        "done — table db.chunks: deleted 10 row(s)",
        "done — table db.transcripts: deleted 4 row(s)",
        "done — table db.contents: deleted 4 row(s)",
    ]
    assert lines[5:] == [
        "not done — collection vectors/youtube_content",
        "not done — keys cache yt:cache:*",
        "not done — keys cache yt:job:*",
        f"not done — files {world.root / 'tmp'} *.part",
    ]
    world.qdrant.reset()  # the knob off; the fake's data went with it, so only Redis is checked below
    cache = aioredis.from_url(world.redis_url)
    assert len(await cache.keys("yt:*")) == 31
    await cache.aclose()


async def test_redis_down_when_the_run_reaches_it_reports_the_rest(world: World, tmp_path: Path) -> None:
    with redis_process() as url:
        env = {"YT_DB": world.dsn, "YT_QDRANT": world.qdrant.url, "YT_REDIS": f"{url}/0"}
        scope = reset_scope(parse_inventory(yaml_for(world.root), "t", env=env).inventory, "yt", "soft")
        facts, files = await plan_facts(world, scope)
    # The private Redis is gone now: the run reaches it after PostgreSQL and Qdrant.
    with pytest.raises(ResetStopped) as caught:
        await run_reset(
            scope, identities=facts, files=files, lists=world.lists, runner=None, take_backups=False,
            requested_by="t", redactor=REDACTOR, progress=noop,
        )  # fmt: skip
    lines = caught.value.message.splitlines()
    assert lines[0].startswith("Soft reset of yt stopped at keys cache yt:cache:*: Redis `cache` failed: ")
    assert lines[0].endswith("(0 key(s) removed before that).")
    assert "done — collection vectors/youtube_content: deleted 25 point(s); config and payload indexes kept" in lines
    assert lines[-2:] == ["not done — keys cache yt:job:*", f"not done — files {world.root / 'tmp'} *.part"]
    assert await world.points() == 0 and (world.root / "tmp" / "a.part").exists()


# -- hard resets and backups ---------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    opened = await open_state_store(f"sqlite://{tmp_path / 'state.db'}", default_path=tmp_path / "x.db")
    yield opened
    await opened.close()


def runner_for(world: World, store: StateStore, *, later: timedelta = timedelta(0)) -> BackupRunner:
    (world.root / "backups" / "backups").mkdir(parents=True, exist_ok=True)
    return BackupRunner(
        store, world.inventory, LocalLocks(), REDACTOR, base_dir=world.root / "backups",
        clock=lambda: datetime.now(UTC) + later,
    )  # fmt: skip


def sqlite_db(path: Path) -> None:
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.execute("create table if not exists t (x)")
        conn.execute("insert into t values (1)")
    conn.close()


async def test_backup_checks_name_what_is_missing_old_or_unverified(world: World, store: StateStore) -> None:
    runner = runner_for(world, store)
    max_age = timedelta(hours=1)
    checks = await check_backups(runner, "yt", max_age)
    assert [c.problem for c in checks] == ["`db` has no good backup", "`meta` has no good backup"]

    sqlite_db(world.root / "meta.db")
    meta = await runner.backup("yt", "meta", trigger="manual", requested_by="t")
    [_, unverified] = await check_backups(runner, "yt", max_age)
    assert unverified.problem == f"`meta`'s backup `{meta.id}` is not verified"
    assert (await runner.verify(meta.id)).ok
    [_, good] = await check_backups(runner, "yt", max_age)
    assert (good.problem, good.record.id if good.record else None) == (None, meta.id)
    [_, old] = await check_backups(runner_for(world, store, later=timedelta(hours=3)), "yt", max_age)
    assert old.problem == f"`meta`'s newest good backup `{meta.id}` is 3 h 0 min old, older than 1 h"


async def test_backup_first_takes_and_verifies_backups_and_deletes_nothing_when_one_fails(
    world: World, store: StateStore
) -> None:
    runner = runner_for(world, store)
    scope = world.scope("hard")
    facts, files = await plan_facts(world, scope)
    # meta.db does not exist: its backup fails after db's succeeded.
    with pytest.raises(ResetStopped) as caught:
        await run_reset(
            scope, identities=facts, files=files, lists=world.lists, runner=runner, take_backups=True,
            requested_by="t", redactor=REDACTOR, progress=noop,
        )  # fmt: skip
    message = caught.value.message
    assert message.startswith("Nothing was deleted: the backup of `meta` failed: "), message
    assert "(taken and verified before it: `yt-db-" in message
    assert await world.rows() == {"channels": 2, "contents": 4, "transcripts": 4, "chunks": 10, "jobs": 3}

    sqlite_db(world.root / "meta.db")
    ledger = await run_reset(
        scope, identities=facts, files=files, lists=world.lists, runner=runner, take_backups=True,
        requested_by="t", redactor=REDACTOR, progress=noop,
    )  # fmt: skip
    assert await world.rows() == {"channels": 0, "contents": 0, "transcripts": 0, "chunks": 0, "jobs": 0}
    assert [n.split(" of ")[1].split(" ")[0] for n in ledger.notes[:2]] == ["db", "meta"]
    assert ledger.notes[2].startswith(
        "collection vectors/youtube_content: no snapshot — Qdrant could not make one (Qdrant answered 500"
    )
    assert ledger.notes[2].endswith("its vectors can only be rebuilt by re-indexing")
    assert "table db.channels: deleted 2 row(s)" in ledger.done


async def test_require_snapshot_stops_a_hard_reset_before_anything_is_deleted(world: World) -> None:
    env = {"YT_DB": world.dsn, "YT_QDRANT": world.qdrant.url, "YT_REDIS": world.redis_url}
    text = yaml_for(world.root).replace("keep: [channels]", "keep: [channels]\n      require_snapshot: true")
    scope = reset_scope(parse_inventory(text, "t", env=env).inventory, "yt", "hard")
    facts, files = await plan_facts(world, scope)
    with pytest.raises(ResetStopped) as caught:
        await run_reset(
            scope, identities=facts, files=files, lists=world.lists, runner=None, take_backups=False,
            requested_by="t", redactor=REDACTOR, progress=noop,
        )  # fmt: skip
    assert caught.value.message.startswith(
        "Hard reset of yt stopped at collection vectors/youtube_content: no snapshot"
    )
    assert "`require_snapshot` is set, so nothing was deleted" in caught.value.message
    assert await world.points() == 25 and (await world.rows())["jobs"] == 3


async def test_the_survey_reads_concurrently_sized_targets_quickly(world: World) -> None:
    # A sanity check of the handler's gather: all three kinds at once, within the components' timeouts.
    scope = world.scope()
    async with asyncio.timeout(15):
        found = await asyncio.gather(
            survey_database("db", scope.databases["db"], count_seconds=5, redactor=REDACTOR),
            survey_collection(CollectionTarget("vectors", scope.collections[0].spec, "other"), count_seconds=5,
                              redactor=REDACTOR),
            survey_keys(scope.keys[1], seconds=5, redactor=REDACTOR),
        )  # fmt: skip
    assert [len(found[0]), found[1].number, found[2].number] == [4, 3, 1]


async def test_a_backup_that_ages_past_the_limit_before_the_run_is_drift(world: World, store: StateStore) -> None:
    sqlite_db(world.root / "meta.db")
    runner = runner_for(world, store)
    for component in ("db", "meta"):
        assert (await runner.verify((await runner.backup("yt", component, trigger="manual", requested_by="t")).id)).ok
    scope = world.scope("hard")
    planned = await backup_facts(runner, scope, take_first=False)
    assert planned == {
        "backup db": "a good, verified backup is young enough",
        "backup meta": "a good, verified backup is young enough",
    }
    assert drift(planned, await backup_facts(runner, scope, take_first=False)) == []
    later = await backup_facts(runner_for(world, store, later=timedelta(minutes=61)), scope, take_first=False)
    changes = drift(planned, later)
    assert len(changes) == 2 and changes[0].startswith("backup db: a good, verified backup is young enough → `db`'s ")
    assert changes[0].endswith("is 1 h 1 min old, older than 1 h")
