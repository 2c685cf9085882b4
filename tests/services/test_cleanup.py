"""Cleanup of old MongoDB documents (on the nx-27017 test server) and index rebuilds.

nx-27017 runs the deletions for real. What it cannot do (see tests/services/backup/
test_mongodb_fidelity.py): keep index names, directions and options. Its count with an ``_id: {$in}``
of ObjectIds is wrong (the deletion itself is right), so the tests count with find. Index fidelity
of a rebuild is proved against RawMongo, at the codec level: the bytes of each createIndexes spec
must equal the bytes listIndexes gave.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import Int64, ObjectId, encode
from pymongo import AsyncMongoClient

from services.cleanup import (
    DeletionInterrupted,
    DocumentCleaner,
    MongoAccess,
    decode_id,
    describe_rule,
    encode_id,
    rule_filter,
)
from services.errors import CommandError, InventoryError
from services.inventory import DocumentCleanupRule, MongoComponent, parse_inventory
from services.redaction import Redactor
from services.reindex import IndexRebuilder
from tests.fixtures.raw_mongo import RawMongo
from tests.fixtures.servers import mongo_process
from tests.fixtures.wait import wait_until
from tests.services.backup.test_mongodb_fidelity import INDEXES, without_ns

NOW = datetime.now(UTC).replace(microsecond=0)


def pymongo_tasks() -> list[asyncio.Task[Any]]:
    """Tasks of the PyMongo driver that have not finished yet."""
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and "/pymongo/" in getattr(getattr(task.get_coro(), "cr_code", None), "co_filename", "")
    ]


async def collect_leaked_sockets() -> None:
    """PyMongo leaks the socket of a connect attempt its monitor was making when the client closed
    (PYTHON-3923, see tests/services/test_probes_datastores.py): free it here, where it is expected."""
    await wait_until(lambda: not pymongo_tasks(), "PyMongo's cancelled monitor tasks finish")
    gc.collect()


RULE = DocumentCleanupRule(
    name="failed-jobs", collection="imagegenerationjobs", match={"status": "failed"}, older_than_days=30
)


def component(uri: str, database: str, timeout: float = 3.0) -> MongoComponent:
    return MongoComponent.model_validate({"type": "mongodb", "uri": uri, "database": database, "timeout": timeout})


def cleaner(uri: str, database: str, timeout: float = 3.0) -> DocumentCleaner:
    return DocumentCleaner(MongoAccess(component(uri, database, timeout), Redactor()))


def job(status: str, days: float, _id: Any = None) -> dict[str, Any]:
    return {"_id": ObjectId() if _id is None else _id, "status": status, "createdAt": NOW - timedelta(days=days)}


@pytest.fixture
async def jobs_db(mongo_uri: str) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A fresh database with runbook 001's imagegenerationjobs; its name and the documents."""
    name = f"vcc_{uuid.uuid4().hex[:8]}"
    docs = [
        job("failed", 45),
        job("failed", 40),
        job("failed", 31),
        job("failed", 60, "legacy-string-id"),
        job("failed", 50, 7),  # nx-27017 hands an Int64 back as an Int32: test_ids_keep_their_bson_type covers it
        job("failed", 10),  # too recent
        job("completed", 90),  # not failed
    ]
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri, tz_aware=True)
    await client[name].imagegenerationjobs.insert_many(docs)
    await client[name].users.insert_one({"name": "kept"})
    try:
        yield name, docs
    finally:
        await client.drop_database(name)
        await client.close()


async def ids_left(uri: str, database: str) -> set[str]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
    try:
        return {encode_id(d["_id"]) for d in await client[database].imagegenerationjobs.find({}).to_list()}
    finally:
        await client.close()


def test_ids_keep_their_bson_type() -> None:
    for value in (ObjectId("65f0c0ffee00000000000001"), Int64(7), 7, "7", uuid.UUID(int=1).bytes):
        again = decode_id(encode_id(value))
        assert encode({"_id": again}) == encode({"_id": value})


def test_a_rule_reads_as_people_say_it() -> None:
    rule = DocumentCleanupRule(
        name="r", collection="jobs", match={"status": ["failed", "cancelled"], "kind": "image"}, older_than_days=7
    )
    cutoff = NOW - timedelta(days=7)

    assert (
        describe_rule(rule)
        == "jobs where status in (failed, cancelled) and kind = image and createdAt older than 7 days"
    )
    assert rule_filter(rule, cutoff) == {
        "status": {"$in": ["failed", "cancelled"]},
        "kind": "image",
        "createdAt": {"$lt": cutoff},
    }


async def test_the_plan_lists_the_oldest_eligible_documents(mongo_uri: str, jobs_db: tuple[str, Any]) -> None:
    database, docs = jobs_db

    found = await cleaner(mongo_uri, database).scan(RULE, now=NOW, limit=3)

    assert found.total == 5
    assert list(found.ids) == [encode_id(docs[i]["_id"]) for i in (3, 4, 0)]  # 60, 50, 45 days old
    assert found.oldest == NOW - timedelta(days=60) and found.newest == NOW - timedelta(days=45)


async def test_the_run_deletes_exactly_the_planned_documents(mongo_uri: str, jobs_db: tuple[str, Any]) -> None:
    database, docs = jobs_db
    documents = cleaner(mongo_uri, database)
    found = await documents.scan(RULE, now=NOW, limit=100)
    assert len(found.ids) == 5
    # After the plan: an old failed job appears, and a planned one is retried (no longer failed).
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri, tz_aware=True)
    late = job("failed", 70)
    await client[database].imagegenerationjobs.insert_one(late)
    await client[database].imagegenerationjobs.update_one({"_id": docs[1]["_id"]}, {"$set": {"status": "pending"}})
    await client.close()
    steps: list[int] = []

    async def progress(deleted: int) -> None:
        steps.append(deleted)

    deleted = await documents.delete(RULE, found.ids, found.cutoff, progress=progress, batch=2)

    assert deleted == 4 and steps == [2, 3, 4]
    assert await ids_left(mongo_uri, database) == {encode_id(d["_id"]) for d in (docs[1], docs[5], docs[6], late)}


async def test_a_missing_collection_is_one_sentence(mongo_uri: str, jobs_db: tuple[str, Any]) -> None:
    database, _ = jobs_db
    rule = RULE.model_copy(update={"collection": "nosuch"})
    with pytest.raises(CommandError, match=f"MongoDB database {database} has no collection `nosuch`"):
        await cleaner(mongo_uri, database).scan(rule, now=NOW, limit=10)


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # PYTHON-3923: see collect_leaked_sockets
async def test_a_server_that_is_down_is_one_sentence() -> None:
    with mongo_process() as (uri, proc):
        proc.terminate()
        proc.wait(10)
        with pytest.raises(CommandError, match=r"no server answered within 0\.5 s|refused"):
            await cleaner(uri, "vcc", timeout=0.5).scan(RULE, now=NOW, limit=10)
    await collect_leaked_sockets()


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # PYTHON-3923: see collect_leaked_sockets
async def test_mongodb_down_mid_run_says_what_was_and_was_not_deleted() -> None:
    with mongo_process() as (uri, proc):
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
        await client.vcc.imagegenerationjobs.insert_many([job("failed", 40 + n) for n in range(7)])
        await client.close()
        documents = cleaner(uri, "vcc", timeout=1.0)
        found = await documents.scan(RULE, now=NOW, limit=100)

        async def stop_after_first_batch(deleted: int) -> None:
            proc.terminate()
            proc.wait(10)

        with pytest.raises(DeletionInterrupted) as caught:
            await documents.delete(RULE, found.ids, found.cutoff, progress=stop_after_first_batch, batch=3)

    assert (caught.value.deleted, caught.value.uncertain, caught.value.untouched) == (3, 3, 1)
    assert caught.value.message.startswith(
        "deleting from `imagegenerationjobs` in MongoDB database vcc failed (no server answered within 1 s"
    )
    assert caught.value.message.endswith(
        "3 of 7 planned document(s) deleted; a batch of 3 was in flight, so those may or may not be deleted; "
        "the other 1 were not touched"
    )
    del caught
    await collect_leaked_sockets()


# --- reindex -------------------------------------------------------------------------------------------


def rebuilder(uri: str, database: str) -> IndexRebuilder:
    return IndexRebuilder(MongoAccess(component(uri, database), Redactor()))


async def test_a_rebuild_recreates_every_index_from_the_same_bson(raw_mongo: RawMongo) -> None:
    raw_mongo.seed("shop", "orders", indexes=[encode(spec) for spec in INDEXES])
    indexes = rebuilder(raw_mongo.uri, "shop")
    before = await indexes.indexes("orders")
    names = [spec.name for spec in before if spec.rebuildable]
    assert names == [str(spec["name"]) for spec in INDEXES[1:]]
    notes: list[str] = []

    async def progress(note: str) -> None:
        notes.append(note)

    rebuilt = await indexes.rebuild("orders", names, progress)

    sent = [(c.name, c.body) for c in raw_mongo.commands("shop") if c.name in ("dropIndexes", "createIndexes")]
    assert [(name, body[name]) for name, body in sent] == [
        (verb, "orders") for _ in names for verb in ("dropIndexes", "createIndexes")
    ]
    for (_, drop), (_, create), spec in zip(sent[::2], sent[1::2], INDEXES[1:], strict=True):
        assert drop["index"] == spec["name"]
        [created] = create["indexes"]
        assert created.raw == encode(without_ns(spec))  # every option, type and key order as listed
    assert [s.name for s in rebuilt.after] == ["_id_", *names]
    assert rebuilt.differences() == []  # the 4.2-style "ns" is left out, as createIndexes wants
    assert len(notes) == len(names) and notes[0] == f"Rebuilding index {names[0]} (1 of {len(names)})…"
    shown = {s.name: s.describe() for s in before}
    assert shown["email_1"] == 'email_1 {"email": 1} sparse'
    assert shown["expiresAt_1"] == 'expiresAt_1 {"expiresAt": 1} expireAfterSeconds=3600'


async def test_a_rebuild_of_an_unknown_collection_names_the_known_ones(raw_mongo: RawMongo) -> None:
    raw_mongo.seed("shop", "orders")
    raw_mongo.seed("shop", "users")

    with pytest.raises(CommandError, match=r"has no collection `nosuch`; its collections: `orders`, `users`\."):
        await rebuilder(raw_mongo.uri, "shop").indexes("nosuch")


async def test_a_rebuild_on_the_test_server_keeps_its_indexes(mongo_uri: str, jobs_db: tuple[str, Any]) -> None:
    database, _ = jobs_db
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    await client[database].imagegenerationjobs.create_index([("createdAt", -1), ("status", 1)])
    await client[database].imagegenerationjobs.create_index("userId", unique=True)
    await client.close()
    indexes = rebuilder(mongo_uri, database)
    before = await indexes.indexes("imagegenerationjobs")

    rebuilt = await indexes.rebuild("imagegenerationjobs", [s.name for s in before if s.rebuildable])

    assert sorted(s.describe() for s in rebuilt.after) == sorted(s.describe() for s in before)
    # nx-27017 rewrites names and directions: fidelity is the RawMongo test's job; here, nothing is lost.
    assert any("unique" in s.describe() for s in rebuilt.after) and len(before) == 3


# --- the inventory -------------------------------------------------------------------------------------

CLEANUP_INVENTORY = """
services:
  vcc:
    components:
      mongo:
        type: mongodb
        uri: mongodb://127.0.0.1:1
        database: vcc
        cleanup:
          - {name: failed-jobs, collection: imagegenerationjobs, match: {status: failed}, older_than_days: 30}
          - {name: by-id, collection: jobs, match: {_id: 1}, older_than_days: 30}
          - {name: sys, collection: system.users, older_than_days: 30}
    cleanup:
      roots: {uploads: /srv/vcc/uploads, everything: /, relative: srv/x}
      files:
        - {name: escape, root: uploads, path: ../../etc, older_than_days: 1}
        - {name: absolute, root: uploads, path: /etc, older_than_days: 1}
        - {name: slash, root: uploads, match: "a/b", older_than_days: 1}
"""


def test_config_check_refuses_cleanup_paths_outside_their_roots() -> None:
    with pytest.raises(InventoryError) as caught:
        parse_inventory(CLEANUP_INVENTORY, "t", env={})

    assert sorted(caught.value.problems) == [
        "services.vcc.cleanup.files.0.path: '../../etc' leaves its root (use a path relative to the root, without ..)",
        "services.vcc.cleanup.files.1.path: '/etc' leaves its root (use a path relative to the root, without ..)",
        "services.vcc.cleanup.files.2.match: String should match pattern '^[^/\\\\]+$'",
        "services.vcc.cleanup.roots: everything: '/' must be an absolute directory below / (without ..)",
        "services.vcc.components.mongo.cleanup.1: match may not name _id (a plan deletes by the ids it lists)",
        "services.vcc.components.mongo.cleanup.2: system.users: system collections are not cleaned up",
    ]


def test_file_rules_name_declared_roots_and_rule_names_are_unique() -> None:
    text = """
services:
  vcc:
    components:
      mongo:
        type: mongodb
        uri: mongodb://127.0.0.1:1
        database: vcc
        cleanup: [{name: old, collection: jobs, older_than_days: 30}]
    cleanup:
      roots: {uploads: /srv/vcc/uploads}
      files: [{name: old, root: uploads, older_than_days: 1}]
  other:
    components:
      api: {type: http, url: "http://127.0.0.1:9"}
    cleanup:
      files: [{name: tmp, root: tmp, older_than_days: 1}]
"""
    with pytest.raises(InventoryError) as caught:
        parse_inventory(text, "t", env={})

    assert caught.value.problems == [
        "services.other.cleanup: file rule 'tmp': root 'tmp' is not one of roots: []",
    ]
    with pytest.raises(InventoryError) as caught:
        parse_inventory(text.split("  other:")[0], "t", env={})
    assert caught.value.problems == ["services.vcc.cleanup: the rule name 'old' is used twice"]
