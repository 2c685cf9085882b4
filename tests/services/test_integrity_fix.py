"""`/ops integrity fix` at the service level, on a real PostgreSQL and the Qdrant REST fake (the real
AsyncQdrantClient over HTTP): the plan's exact lists, the drift rule (only what is still orphan or stale),
snapshots taken or not, Qdrant or PostgreSQL failing part way, an empty plan and a refused one."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from qdrant_client import models

from services.approvals import drift
from services.errors import CommandError
from services.integrity import IntegrityChecker, IntegrityTarget, integrity_target
from services.integrity_fix import FixPlan, IntegrityFixer, orphans_fact, outcome_lines
from services.inventory import LoadedInventory, parse_inventory
from services.plan_lists import PlanLists, list_ref
from services.redaction import Redactor
from tests.fixtures.qdrant import FakeQdrant
from tests.fixtures.servers import PostgresServer, postgres_cluster_control, run_sql

pytestmark = pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection:UserWarning")

PASSWORD = "Pg-fix-S3cret-9931"
KEY = "qdr-fix-K3y-0a1b2c3d"
COLLECTION = "youtube_content"
JOBS = """create table jobs (id integer primary key, status text not null, started_at timestamptz,
          error_message text)"""
# Jobs 1 and 2 are stale (over the integrity threshold, 1 day); 3 is stuck for the jobs table's own
# 60 minutes but not stale for the check, 4 is done: only 1 and 2 are planned.
JOB_ROWS = """insert into jobs values
  (1, 'processing', now() - interval '3 days', null),
  (2, 'processing', now() - interval '2 days', null),
  (3, 'processing', now() - interval '3 hours', null),
  (4, 'completed', now() - interval '5 days', null)"""
CHUNKS = [i for i in range(1, 121) if i not in (7, 50)]
POINTS: list[int | str] = [*(i for i in range(1, 121) if i != 99), 500, 501, "00000000-0000-0000-0000-000000000007"]
ORPHANS = ["7", "50", "500", "501", "00000000-0000-0000-0000-000000000007"]


def inventory_yaml(dsn_var: str, qdrant_url: str) -> str:
    return f"""
services:
  yt:
    components:
      db:
        type: postgres
        dsn: ${{{dsn_var}}}
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
      page_size: 100
"""


@dataclass
class World:
    loaded: LoadedInventory
    dsn: str
    fake: FakeQdrant
    lists: PlanLists

    @property
    def target(self) -> IntegrityTarget:
        return integrity_target(self.loaded.inventory, "yt")

    def fixer(self, **kwargs: Any) -> IntegrityFixer:
        return IntegrityFixer(Redactor(self.loaded.secrets), self.lists, **kwargs)

    async def points(self) -> list[str]:
        client = self.fake.client(KEY)
        try:
            found, _ = await client.scroll(COLLECTION, limit=1000, with_payload=False)
        finally:
            await client.close()
        return [str(p.id) for p in found]

    async def jobs(self) -> dict[int, str]:
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch("select id, status from jobs order by id")
        finally:
            await conn.close()
        return {int(r["id"]): str(r["status"]) for r in rows}


async def seed(fake: FakeQdrant, points: Sequence[int | str]) -> None:
    client = fake.client()
    try:
        await client.create_collection(
            COLLECTION, vectors_config=models.VectorParams(size=2, distance=models.Distance.DOT)
        )
        structs = [models.PointStruct(id=p, vector=[0.5, 0.5]) for p in points]
        if structs:
            await client.upsert(COLLECTION, points=structs)
    finally:
        await client.close()
    fake.require_api_key(KEY)
    fake.clear_requests()


def chunk_rows(ids: Sequence[int]) -> list[str]:
    statements = ["create table chunks (id bigint primary key, body text)"]
    if ids:
        statements.append("insert into chunks (id) values " + ", ".join(f"({i})" for i in ids))
    return statements


async def world_on(
    dsn: str, fake: FakeQdrant, tmp_path: Path, *, chunks: Sequence[int] = CHUNKS, points: Sequence[int | str] = POINTS
) -> World:
    await run_sql(dsn, JOBS, JOB_ROWS, *chunk_rows(chunks))
    await seed(fake, points)
    loaded = parse_inventory(inventory_yaml("YT_DB", fake.url), "t", {"YT_DB": dsn, "YT_QDRANT_KEY": KEY})
    return World(loaded, dsn, fake, PlanLists(tmp_path / "plan-lists"))


@pytest.fixture
async def world(postgres_server: PostgresServer, fake_qdrant: FakeQdrant, tmp_path: Path) -> World:
    dsn = await postgres_server.database_with(password=PASSWORD)
    return await world_on(dsn, fake_qdrant, tmp_path)


class Notes:
    """The run's progress notes, with a hook to change the world at one of them."""

    def __init__(self, at: str | None = None, then: Any = None) -> None:
        self.seen: list[str] = []
        self._at, self._then = at, then

    async def __call__(self, note: str) -> None:
        self.seen.append(note)
        if self._at is not None and note.startswith(self._at) and self._then is not None:
            then, self._then = self._then, None
            then()


async def ids_in(lists: PlanLists, plan: FixPlan) -> list[str]:
    [orphans] = plan.orphans
    return await lists.load(orphans.saved.ref)


# -- planning ------------------------------------------------------------------------------------------


async def test_the_plan_lists_exactly_the_orphans_and_the_stale_jobs(world: World) -> None:
    plan = await world.fixer().plan(world.target)

    assert await ids_in(world.lists, plan) == ORPHANS
    [orphans] = plan.orphans
    assert (orphans.collection, orphans.table, orphans.points, orphans.saved.count) == (COLLECTION, "chunks", 122, 5)
    assert plan.jobs is not None and await world.lists.load(plan.jobs.saved.ref) == ["1", "2"]
    assert (plan.jobs.minutes, plan.jobs.total) == (1440, 2)
    assert (plan.count, plan.total) == (7, 122)  # 5 orphans + 2 jobs, of the collection's 122 points
    assert plan.facts[orphans_fact(COLLECTION)] == orphans.saved.ref
    assert plan.facts["stale jobs"] == plan.jobs.saved.ref
    assert plan.facts["table chunks"].startswith("oid ") and plan.facts["jobs table jobs"].startswith("oid ")
    assert plan.facts[f"collection {COLLECTION}"].startswith("vectors ")
    [missing] = plan.missing
    assert missing.missing.ids == ("99",)  # a chunk without a vector: not the fix's business
    assert plan.params()["orphans"] == [{"collection": COLLECTION, "table": "chunks", "ref": orphans.saved.ref,
                                         "count": 5}]  # fmt: skip


async def test_a_list_longer_than_the_check_keeps_is_streamed_whole(world: World) -> None:
    fixer = world.fixer(checker=IntegrityChecker(Redactor(world.loaded.secrets), keep_ids=2))
    plan = await fixer.plan(world.target)

    [diff] = plan.report.diffs
    assert diff.orphans.ids == ("7", "50") and not diff.orphans.complete  # the report kept two
    assert await ids_in(world.lists, plan) == ORPHANS  # the saved list has all five


async def test_an_emptied_chunk_table_is_refused_and_saves_nothing(world: World) -> None:
    await run_sql(world.dsn, "delete from chunks")
    with pytest.raises(CommandError) as caught:
        await world.fixer().plan(world.target)
    assert "is critical, so no fix is planned" in caught.value.message
    assert "the chunk table is empty while the collection has 122 points" in caught.value.message
    assert await asyncio.to_thread(lambda: sorted(world.lists.root.glob("*"))) == []  # nothing saved, no temp file


async def test_a_critical_check_after_orphans_were_streamed_saves_no_list(world: World) -> None:
    await run_sql(world.dsn, "drop table jobs")  # a required table: critical, though the ids were compared
    with pytest.raises(CommandError) as caught:
        await world.fixer().plan(world.target)
    assert "tables: missing: `jobs`" in caught.value.message
    assert await asyncio.to_thread(lambda: sorted(world.lists.root.glob("*"))) == []  # the streamed list is gone


async def test_a_matching_service_plans_nothing(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant, tmp_path: Path
) -> None:
    dsn = await postgres_server.database_with(password=PASSWORD)
    world = await world_on(dsn, fake_qdrant, tmp_path, chunks=list(range(1, 21)), points=list(range(1, 21)))
    await run_sql(dsn, "update jobs set status = 'completed'")
    plan = await world.fixer().plan(world.target)
    assert plan.empty and plan.count == 0 and plan.orphans == () and plan.jobs is None


async def test_an_unknown_database_is_one_sentence(world: World, postgres_server: PostgresServer) -> None:
    bad = parse_inventory(
        inventory_yaml("YT_DB", world.fake.url),
        "t",
        {"YT_DB": postgres_server.dsn("no_such_db", password=PASSWORD), "YT_QDRANT_KEY": KEY},
    )
    with pytest.raises(CommandError) as caught:
        await world.fixer().plan(integrity_target(bad.inventory, "yt"))
    assert caught.value.message.startswith("Cannot read the state of `yt`: cannot connect to the database `db`")
    assert PASSWORD not in caught.value.message


# -- running -------------------------------------------------------------------------------------------


async def test_the_run_deletes_and_resets_exactly_the_plan_then_checks_again(world: World) -> None:
    fixer = world.fixer(batch=2)
    plan = await fixer.plan(world.target)
    world.fake.clear_requests()

    run = await fixer.run(world.target, plan.params(), Notes())

    assert sorted(await world.points()) == sorted(str(p) for p in POINTS if str(p) not in ORPHANS)
    assert await world.jobs() == {1: "pending", 2: "pending", 3: "processing", 4: "completed"}
    deletes = world.fake.requests_to(f"/collections/{COLLECTION}/points/delete", "POST")
    assert [d.body["points"] for d in deletes] == [[7, 50], [500, 501], ["00000000-0000-0000-0000-000000000007"]]
    [collection] = run.collections
    assert (collection.deleted, collection.back, collection.gone) == (5, [], [])
    assert collection.snapshot is None and "Qdrant took none (Qdrant answered 500" in collection.no_snapshot
    assert run.recheck is not None
    summary, details = outcome_lines(run)
    assert summary == "Deleted 5 of 5 planned orphan vector(s); reset 2 of 2 stale job(s) to `pending`."
    assert any(d.startswith(f"no snapshot of `{COLLECTION}`: Qdrant took none") for d in details)
    assert "integrity check again: warning" in details  # the missing vector of chunk 99 is still there
    recheck = "\n".join(details)
    assert (
        "118 chunks, 117 vectors: 1 missing vector" in recheck
        and "orphan" not in recheck.split("integrity check again")[1]
    )
    assert "no job in `processing` for over 1 day" in recheck


async def test_a_snapshot_is_taken_first_and_named_where_the_server_takes_one(world: World) -> None:
    world.fake.support_snapshots()
    fixer = world.fixer()
    plan = await fixer.plan(world.target)
    world.fake.clear_requests()

    run = await fixer.run(world.target, plan.params(), Notes())

    [name] = world.fake.snapshots(COLLECTION)
    [collection] = run.collections
    assert collection.snapshot == name and name.startswith(f"{COLLECTION}-1-")
    paths = [r.path for r in world.fake.requests if r.method == "POST"]
    assert paths.index(f"/collections/{COLLECTION}/snapshots") < paths.index(f"/collections/{COLLECTION}/points/delete")
    _, details = outcome_lines(run)
    assert f"snapshot of `{COLLECTION}` taken first: `{name}` (recover the collection from it to undo)" in details


async def test_only_planned_ids_still_orphans_are_deleted_and_only_jobs_still_stale_reset(world: World) -> None:
    fixer = world.fixer()
    plan = await fixer.plan(world.target)
    # After the plan: chunk 50 comes back, a new orphan appears, orphan 501 is deleted by someone else,
    # and job 2 finishes.
    await run_sql(world.dsn, "insert into chunks (id) values (50)", "update jobs set status = 'completed' where id = 2")
    client = world.fake.client(KEY)
    try:
        await client.upsert(COLLECTION, points=[models.PointStruct(id=9000, vector=[0.5, 0.5])])
        await client.delete(COLLECTION, points_selector=models.PointIdsList(points=[501]))
    finally:
        await client.close()

    assert drift(plan.facts, await fixer.observe(world.target, plan.params())) == []  # same tables, same lists
    run = await fixer.run(world.target, plan.params(), Notes())

    left = await world.points()
    assert "50" in left and "9000" in left  # back, and new since the plan: both kept
    assert not {"7", "500", "501", "00000000-0000-0000-0000-000000000007"} & set(left)
    [collection] = run.collections
    assert (collection.deleted, collection.back, collection.gone) == (3, ["50"], ["501"])
    assert await world.jobs() == {1: "pending", 2: "completed", 3: "processing", 4: "completed"}
    summary, details = outcome_lines(run)
    assert summary == "Deleted 3 of 5 planned orphan vector(s); reset 1 of 2 stale job(s) to `pending`."
    assert "left alone (1, their chunk is back): 50" in details
    assert "already gone (1, not counted as deleted): 501" in details
    assert "jobs left alone (1, no longer stale): 2" in details
    assert "9000" in "\n".join(details)  # the re-check sees the new orphan; a new plan would list it


async def test_a_table_made_again_or_a_list_gone_is_drift(world: World) -> None:
    fixer = world.fixer()
    plan = await fixer.plan(world.target)
    await run_sql(world.dsn, "drop table chunks", *chunk_rows(CHUNKS))
    [orphans] = plan.orphans
    (world.lists.root / f"{orphans.saved.ref}.json.gz").unlink()

    changes = drift(plan.facts, await fixer.observe(world.target, plan.params()))

    assert [c.split(":")[0] for c in changes] == [orphans_fact(COLLECTION), "table chunks"]
    assert "is not in this bot's state directory any more" in changes[0]


async def test_qdrant_failing_mid_run_says_what_was_and_was_not_done(world: World) -> None:
    fixer = world.fixer(batch=2)
    plan = await fixer.plan(world.target)
    path = f"/collections/{COLLECTION}/points/delete"
    notes = Notes("2 of 5", lambda: world.fake.fail(503, path=path, method="POST", times=None))

    with pytest.raises(CommandError) as caught:
        await fixer.run(world.target, plan.params(), notes)

    message = caught.value.message
    assert message == (
        f"The fix of `yt` stopped while deleting orphan vectors from `{COLLECTION}`: Qdrant failed: Qdrant answered "
        "503 Service Unavailable. Done: 2 of 5 planned orphan vector(s) deleted from "
        f"`{COLLECTION}`. Not done: 3 planned orphan vector(s) of `{COLLECTION}` not deleted; 2 stale job(s) not reset."
    )
    left = set(await world.points())
    assert not {"7", "50"} & left and {"500", "501", "00000000-0000-0000-0000-000000000007"} <= left
    assert await world.jobs() == {1: "processing", 2: "processing", 3: "processing", 4: "completed"}
    assert KEY not in message


async def test_qdrant_unavailable_at_the_snapshot_deletes_nothing(world: World) -> None:
    fixer = world.fixer()
    plan = await fixer.plan(world.target)
    world.fake.fail(503, path=f"/collections/{COLLECTION}/snapshots", times=None, text="<html>no upstream</html>")

    with pytest.raises(CommandError) as caught:
        await fixer.run(world.target, plan.params(), Notes())

    assert caught.value.message == (
        f"The fix of `yt` stopped while taking snapshots: Qdrant did not answer the snapshot request for "
        f"`{COLLECTION}`: Qdrant answered 503 Service Unavailable. Done: nothing. Not done: 5 planned orphan "
        f"vector(s) of `{COLLECTION}` not deleted; 2 stale job(s) not reset."
    )
    assert len(await world.points()) == len(POINTS)
    assert world.fake.requests_to(f"/collections/{COLLECTION}/points/delete") == []


async def test_postgres_down_mid_run_says_what_was_and_was_not_done(fake_qdrant: FakeQdrant, tmp_path: Path) -> None:
    with postgres_cluster_control(max_connections=20) as cluster:
        dsn = cluster.server.dsn(await cluster.server.create_database(), password=PASSWORD)
        world = await world_on(dsn, fake_qdrant, tmp_path)
        fixer = world.fixer()
        plan = await fixer.plan(world.target)
        notes = Notes("Resetting", cluster.stop)

        with pytest.raises(CommandError) as caught:
            await fixer.run(world.target, plan.params(), notes)

        message = caught.value.message
        assert message.startswith("The fix of `yt` stopped while resetting the stale jobs: ")
        assert message.endswith(
            f"Done: 5 of 5 planned orphan vector(s) deleted from `{COLLECTION}`. Not done: 2 stale job(s) not reset."
        )
        assert PASSWORD not in message
        assert not set(ORPHANS) & set(await world.points())
        cluster.start()
        assert await world.jobs() == {1: "processing", 2: "processing", 3: "processing", 4: "completed"}


# -- the streamed plan list ----------------------------------------------------------------------------


async def test_a_streamed_list_is_the_same_file_and_reference_as_a_saved_one(tmp_path: Path) -> None:
    streamed, saved = PlanLists(tmp_path / "a", sample=3), PlanLists(tmp_path / "b", sample=3)
    ids = [str(i) for i in range(1000)] + ['quote"d', "ünï"]
    async with streamed.writer() as writer:
        for start in range(0, len(ids), 7):
            await writer.add(ids[start : start + 7])
        made = await writer.finish()
    whole = await saved.save(ids)
    assert made == whole and made.ref == list_ref(ids) and made.count == 1002 and made.sample == ("0", "1", "2")
    assert await streamed.load(made.ref) == ids
    with gzip.open(streamed.root / f"{made.ref}.json.gz") as f:
        assert json.loads(f.read()) == ids
    assert not list(streamed.root.glob(".plan-*"))


async def test_an_unfinished_streamed_list_leaves_nothing(tmp_path: Path) -> None:
    lists = PlanLists(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        async with lists.writer() as writer:
            await writer.add(["1", "2"])
            raise RuntimeError("boom")
    assert [p.name for p in await asyncio.to_thread(lambda: list(tmp_path.iterdir()))] == []
