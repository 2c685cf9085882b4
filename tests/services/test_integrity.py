"""Runbook 003's integrity check on a real PostgreSQL and the Qdrant REST fake (the real AsyncQdrantClient over
HTTP): the lines and the overall status, the id sets both ways for both mappings, stale jobs, and every way a
target can be missing, broken, unreachable or hung."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from qdrant_client import models

from bot.logging import configure_logging
from services.errors import CommandError, InventoryError
from services.health import Status
from services.integrity import IntegrityChecker, IntegrityReport, Line, integrity_target, minutes_text
from services.inventory import LoadedInventory, parse_inventory
from services.redaction import Redactor
from tests.fixtures.qdrant import FakeQdrant
from tests.fixtures.servers import PostgresServer, free_port

pytestmark = pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection:UserWarning")

PASSWORD = "Pg-integrity-S3cret-77"
KEY = "qdr-integrity-K3y-5e6f7a8b"
COLLECTION = "youtube_content"

JOBS = """create table jobs (id integer primary key, status text not null, started_at timestamptz,
          error_message text)"""
CHANNELS = "create table channels (id integer primary key, name text)"


def inventory_yaml(
    qdrant_url: str,
    *,
    vector_id: str = "same_id",
    extra: str = "",
    tables: str = "[channels, chunks, jobs]",
    qdrant_timeout: float = 2,
) -> str:
    return f"""
services:
  yt:
    components:
      db:
        type: postgres
        dsn: ${{YT_DB}}
        timeout: 3
        jobs: {{table: jobs, stuck_after_minutes: 60}}
      vectors:
        type: qdrant
        url: {qdrant_url}
        api_key: ${{YT_QDRANT_KEY}}
        timeout: {qdrant_timeout}
        collections: [{COLLECTION}]
    integrity:
      database: db
      qdrant: vectors
      required_tables: {tables}
      chunks:
        - {{table: chunks, id_column: id, collection: {COLLECTION}, vector_id: {vector_id}}}
      page_size: 100
{extra}
  plain:
    components:
      db: {{type: postgres, dsn: "${{YT_DB}}"}}
"""


@dataclass
class Scene:
    loaded: LoadedInventory
    dsn: str

    async def check(self, **kwargs: Any) -> IntegrityReport:
        checker = IntegrityChecker(Redactor(self.loaded.secrets), **kwargs.pop("checker", {}))
        return await checker.check(integrity_target(self.loaded.inventory, "yt"), **kwargs)


async def seed(fake: FakeQdrant, points: Sequence[int | str | tuple[int | str, dict[str, Any]]]) -> None:
    """A collection holding these points (ids, or (id, payload)), written through a real client."""
    client = fake.client()
    try:
        await client.create_collection(
            COLLECTION, vectors_config=models.VectorParams(size=2, distance=models.Distance.DOT)
        )
        structs = []
        for point in points:
            pid, payload = point if isinstance(point, tuple) else (point, {})
            structs.append(models.PointStruct(id=pid, vector=[0.5, 0.5], payload=payload))
        for start in range(0, len(structs), 500):
            await client.upsert(COLLECTION, points=structs[start : start + 500])
    finally:
        await client.close()
    fake.require_api_key(KEY)
    fake.clear_requests()


async def scene(
    postgres_server: PostgresServer,
    fake: FakeQdrant,
    *sql: str,
    points: Sequence[int | str | tuple[int | str, dict[str, Any]]] | None = (),
    url: str | None = None,
    **options: Any,
) -> Scene:
    dsn = await postgres_server.database_with(CHANNELS, JOBS, *sql, password=PASSWORD)
    if points is not None:
        await seed(fake, points)
    text = inventory_yaml(url or fake.url, **options)
    loaded = parse_inventory(text, "t", {"YT_DB": dsn, "YT_QDRANT_KEY": KEY})
    return Scene(loaded, dsn)


def chunks_sql(ids: Sequence[Any], column_type: str = "integer") -> list[str]:
    statements = [f"create table chunks (id {column_type} primary key, body text)"]
    if ids:
        values = ", ".join(f"('{i}')" for i in ids)
        statements.append(f"insert into chunks (id) values {values}")
    return statements


def line(report: IntegrityReport, prefix: str) -> Line:
    [found] = [ln for ln in report.lines if ln.name.startswith(prefix)]
    return found


def everything_said(report: IntegrityReport) -> str:
    return "\n".join(f"{ln.name} {ln.status} {ln.detail}" for ln in report.lines)


# -- same_id -------------------------------------------------------------------------------------------


async def test_a_matching_service_is_healthy_line_by_line(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant
) -> None:
    ids = list(range(1, 251))
    world = await scene(postgres_server, fake_qdrant, *chunks_sql(ids), points=ids)
    report = await world.check()
    assert report.status is Status.HEALTHY, everything_said(report)
    assert [ln.name for ln in report.lines] == [
        "database db",
        "tables",
        f"collection {COLLECTION}",
        f"chunks chunks ↔ vectors {COLLECTION}",
        "jobs db/jobs",
    ]
    assert line(report, "database").detail.startswith("answers (PostgreSQL ")
    assert line(report, "tables").detail == "all 3 present: channels, chunks, jobs"
    assert line(report, "collection").detail.startswith("green · 250 points · ")
    assert line(report, "chunks").detail == "250 chunks, 250 vectors: the ids match"
    assert line(report, "jobs").detail == "no job in `processing` for over 1 day"
    [diff] = report.diffs
    assert (diff.chunks, diff.points, diff.orphans.count, diff.missing.count) == (250, 250, 0, 0)
    # Paged (page_size 100: 3 pages), ids only: no payload, no vectors travelled.
    scrolls = fake_qdrant.requests_to(f"/collections/{COLLECTION}/points/scroll", "POST")
    assert len(scrolls) == 3
    assert all(r.body["with_payload"] is False and r.body["with_vector"] is False for r in scrolls)
    assert all(r.api_key == KEY for r in fake_qdrant.requests)


async def test_orphans_and_missing_vectors_are_the_exact_id_sets(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant
) -> None:
    chunk_ids = [i for i in range(1, 301) if i not in (5, 150)]
    stray = str(uuid.UUID(int=7))
    point_ids: list[int | str] = [*(i for i in range(1, 301) if i not in (7, 299)), 1000, 1001, stray]
    world = await scene(postgres_server, fake_qdrant, *chunks_sql(chunk_ids, "bigint"), points=point_ids)
    report = await world.check()
    assert report.status is Status.WARNING
    [diff] = report.diffs
    # Qdrant's own order: integers by value, then UUIDs.
    assert diff.orphans.ids == ("5", "150", "1000", "1001", stray) and diff.orphans.complete
    assert diff.missing.ids == ("7", "299") and diff.missing.complete
    assert (diff.chunks, diff.points) == (298, 301)
    assert line(report, "chunks").detail == (
        "298 chunks, 301 vectors: 5 orphan vectors (e.g. `5`, `150`, `1000`, `1001`, "
        f"`{stray}`); 2 missing vectors (e.g. chunks `7`, `299`)"
    )


async def test_uuid_chunk_ids_against_uuid_points(postgres_server: PostgresServer, fake_qdrant: FakeQdrant) -> None:
    shared = sorted(str(uuid.uuid4()) for _ in range(120))
    only_pg, only_qdrant = str(uuid.uuid4()), str(uuid.uuid4())
    world = await scene(
        postgres_server, fake_qdrant, *chunks_sql([*shared, only_pg], "uuid"), points=[*shared, only_qdrant, 42]
    )
    [diff] = (await world.check()).diffs
    assert diff.orphans.ids == ("42", only_qdrant)
    assert diff.missing.ids == (only_pg,)
    assert diff.chunks == 121 and diff.points == 122


async def test_text_chunk_ids_mixing_numbers_uuids_and_neither(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant
) -> None:
    a, b = uuid.UUID(int=1 << 100), uuid.UUID(int=(1 << 127) + 5)
    text_ids = ["1", "007", "42", "100", str(a).upper(), "not-an-id", "-3", "99999999999999999999999"]
    points: list[int | str] = [1, 7, 100, 9999, str(a), str(b)]
    world = await scene(postgres_server, fake_qdrant, *chunks_sql(text_ids, "text"), points=points)
    [diff] = (await world.check()).diffs
    assert diff.orphans.ids == ("9999", str(b))
    # "42" has no point; the rest can never be a point id (not an unsigned 64-bit number nor a UUID).
    assert sorted(diff.missing.ids) == sorted(["42", "not-an-id", "-3", "99999999999999999999999"])
    assert diff.chunks == 8


async def test_negative_integer_ids_are_missing_vectors(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant
) -> None:
    world = await scene(postgres_server, fake_qdrant, *chunks_sql([-2, 1, 2]), points=[1, 2])
    [diff] = (await world.check()).diffs
    assert diff.missing.ids == ("-2",) and diff.orphans.count == 0


async def test_beyond_keep_ids_counts_and_samples_and_the_sink_gets_every_orphan(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant
) -> None:
    world = await scene(postgres_server, fake_qdrant, *chunks_sql(range(1, 101)), points=list(range(1, 351)))
    streamed: list[str] = []

    async def sink(collection: str, ids: Sequence[str]) -> None:
        assert collection == COLLECTION
        streamed.extend(ids)

    report = await world.check(checker={"keep_ids": 20}, orphan_sink=sink)
    [diff] = report.diffs
    assert diff.orphans.count == 250 and not diff.orphans.complete
    assert diff.orphans.ids == tuple(str(i) for i in range(101, 121))
    assert streamed == [str(i) for i in range(101, 351)]


async def test_an_unsupported_id_column_type_is_refused_plainly(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant
) -> None:
    sql = ["create table chunks (id timestamptz primary key)", "insert into chunks values (now())"]
    world = await scene(postgres_server, fake_qdrant, *sql, points=[1])
    report = await world.check()
    assert report.status is Status.CRITICAL
    assert line(report, "chunks").detail == (
        "not compared: the id column `id` of `chunks` is of type timestamp with time zone; "
        "the check compares smallint, integer, bigint, uuid, text or varchar ids"
    )


# -- payload mapping ---------------------------------------------------------------------------------


async def test_a_payload_mapping_is_anti_joined_both_ways(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant
) -> None:
    ids = list(range(1, 151))
    points: list[tuple[int | str, dict[str, Any]]] = [
        (str(uuid.UUID(int=1000 + i)), {"chunk_id": i, "other": "x" * 50}) for i in ids if i != 9
    ]
    no_field = str(uuid.UUID(int=5))
    dangling = str(uuid.UUID(int=6))
    as_text = str(uuid.UUID(int=7))
    points += [(no_field, {"title": "no chunk id"}), (dangling, {"chunk_id": 4242}), (as_text, {"chunk_id": "150"})]
    world = await scene(postgres_server, fake_qdrant, *chunks_sql(ids), points=points, vector_id="{payload: chunk_id}")
    report = await world.check()
    assert report.status is Status.WARNING
    [diff] = report.diffs
    assert diff.mapping == "payload:chunk_id"
    assert diff.orphans.ids == (no_field, dangling)  # point ids: what a fix deletes
    assert diff.missing.ids == ("9",)
    assert (diff.chunks, diff.points, diff.unmapped) == (150, 152, 1)
    assert "1 without a chunk id in the payload" in line(report, "chunks").detail
    # Only the one payload field travelled.
    scrolls = fake_qdrant.requests_to(f"/collections/{COLLECTION}/points/scroll", "POST")
    assert scrolls and all(r.body["with_payload"] == {"include": ["chunk_id"]} for r in scrolls)


async def test_a_payload_mapping_with_uuid_chunk_ids(postgres_server: PostgresServer, fake_qdrant: FakeQdrant) -> None:
    chunk_ids = [str(uuid.UUID(int=i)) for i in range(1, 11)]
    points: list[tuple[int | str, dict[str, Any]]] = [
        (i, {"meta": {"chunk": chunk_ids[i - 1].upper()}}) for i in range(1, 10)
    ]
    points.append((77, {"meta": {"chunk": "not a uuid"}}))
    world = await scene(
        postgres_server, fake_qdrant, *chunks_sql(chunk_ids, "uuid"), points=points, vector_id="{payload: meta.chunk}"
    )
    [diff] = (await world.check()).diffs
    assert diff.orphans.ids == ("77",) and diff.unmapped == 1
    assert diff.missing.ids == (chunk_ids[9],)


# -- stale jobs --------------------------------------------------------------------------------------

STALE_JOBS = """insert into jobs values
    (1, 'processing', now() - interval '2 days', null),
    (2, 'processing', now() - interval '3 hours', null),
    (3, 'pending', null, null),
    (4, 'done', now() - interval '5 days', null)"""


async def test_stale_jobs_use_the_integrity_threshold_of_one_day(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant
) -> None:
    world = await scene(postgres_server, fake_qdrant, *chunks_sql([1]), STALE_JOBS, points=[1])
    report = await world.check()
    assert report.status is Status.WARNING
    assert line(report, "jobs").detail == "1 job in `processing` for over 1 day: `1`"
    assert report.stale is not None and report.stale.ids == ("1",) and report.stale.complete
    assert report.stale.threshold_minutes == 1440


async def test_the_stale_threshold_is_configurable(postgres_server: PostgresServer, fake_qdrant: FakeQdrant) -> None:
    world = await scene(
        postgres_server, fake_qdrant, *chunks_sql([1]), STALE_JOBS, points=[1], extra="      stale_after_minutes: 120"
    )
    report = await world.check()
    assert report.stale is not None and report.stale.ids == ("1", "2")
    assert line(report, "jobs").detail == "2 jobs in `processing` for over 2 h: `1`, `2`"
    assert minutes_text(90) == "90 min" and minutes_text(2880) == "2 days"


# -- critical ----------------------------------------------------------------------------------------


async def test_a_red_collection_is_critical_and_not_compared(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant
) -> None:
    world = await scene(postgres_server, fake_qdrant, *chunks_sql([1, 2]), points=[1, 2, 3])
    fake_qdrant.set_status(COLLECTION, "red")
    report = await world.check()
    assert report.status is Status.CRITICAL
    assert line(report, "collection").status is Status.CRITICAL and line(report, "collection").detail.startswith("red")
    assert line(report, "chunks").detail == "not compared: the collection is red"
    assert report.diffs == ()
    assert not fake_qdrant.requests_to("*/points/scroll")


async def test_a_yellow_collection_is_a_warning_and_still_compared(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant
) -> None:
    world = await scene(postgres_server, fake_qdrant, *chunks_sql([1, 2]), points=[1, 2])
    fake_qdrant.set_status(COLLECTION, "yellow")
    report = await world.check()
    assert report.status is Status.WARNING and line(report, "collection").status is Status.WARNING
    assert line(report, "chunks").status is Status.HEALTHY


async def test_a_missing_collection_is_critical(postgres_server: PostgresServer, fake_qdrant: FakeQdrant) -> None:
    world = await scene(postgres_server, fake_qdrant, *chunks_sql([1]), points=None)
    fake_qdrant.require_api_key(KEY)
    report = await world.check()
    assert report.status is Status.CRITICAL
    assert line(report, "collection").detail == "does not exist"
    assert line(report, "chunks").detail == "not compared: the collection could not be read"


async def test_a_missing_required_table_is_critical(postgres_server: PostgresServer, fake_qdrant: FakeQdrant) -> None:
    world = await scene(
        postgres_server, fake_qdrant, *chunks_sql([1]), points=[1], tables="[channels, chunks, jobs, transcripts]"
    )
    report = await world.check()
    assert report.status is Status.CRITICAL
    assert line(report, "tables").detail == "missing: `transcripts` (3 of 4 present)"
    assert line(report, "chunks").status is Status.HEALTHY


async def test_a_missing_chunk_table_is_critical_and_not_compared(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant
) -> None:
    world = await scene(postgres_server, fake_qdrant, points=[1])
    report = await world.check()
    assert line(report, "tables").detail == "missing: `chunks` (2 of 3 present)"
    assert line(report, "chunks").detail == "not compared: the chunk table could not be read"
    assert report.status is Status.CRITICAL and not fake_qdrant.requests_to("*/points/scroll")


async def test_an_empty_chunk_table_against_a_full_collection_is_critical(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant
) -> None:
    world = await scene(postgres_server, fake_qdrant, *chunks_sql([]), points=[1, 2, 3])
    report = await world.check()
    assert report.status is Status.CRITICAL
    assert line(report, "chunks").detail.startswith(
        "the chunk table is empty while the collection has 3 points: not compared"
    )
    assert report.diffs == ()  # nothing a fix could take for orphans


async def test_both_empty_is_healthy(postgres_server: PostgresServer, fake_qdrant: FakeQdrant) -> None:
    world = await scene(postgres_server, fake_qdrant, *chunks_sql([]), points=[])
    report = await world.check()
    assert report.status is Status.HEALTHY
    assert line(report, "chunks").detail == "0 chunks, 0 vectors: the ids match"


async def test_an_unreachable_database_is_critical_without_the_password(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant, capfd: pytest.CaptureFixture[str]
) -> None:
    await seed(fake_qdrant, [1])
    dsn = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/nowhere"
    loaded = parse_inventory(inventory_yaml(fake_qdrant.url), "t", {"YT_DB": dsn, "YT_QDRANT_KEY": KEY})
    configure_logging("json", "DEBUG", Redactor())
    capfd.readouterr()
    report = await Scene(loaded, dsn).check()
    assert report.status is Status.CRITICAL
    assert line(report, "database").detail == "does not answer: connection refused"
    assert line(report, "chunks").detail == "not compared: the chunk table could not be read"
    assert line(report, "jobs").status is Status.CRITICAL
    assert line(report, "collection").status is Status.HEALTHY
    said = everything_said(report) + "".join(capfd.readouterr())
    assert PASSWORD not in said and KEY not in said


async def test_qdrant_down_is_critical_and_quick(postgres_server: PostgresServer, fake_qdrant: FakeQdrant) -> None:
    world = await scene(
        postgres_server, fake_qdrant, *chunks_sql([1]), points=None, url=f"http://127.0.0.1:{free_port()}"
    )
    started = time.monotonic()
    report = await world.check()
    assert time.monotonic() - started < 5
    assert report.status is Status.CRITICAL
    assert line(report, "collection").detail == "unreachable: connection refused"
    assert line(report, "chunks").detail == "not compared: the collection could not be read"
    assert line(report, "database").status is Status.HEALTHY


async def test_a_hung_qdrant_is_cut_off_at_its_timeout(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant
) -> None:
    world = await scene(postgres_server, fake_qdrant, *chunks_sql([1]), points=[1], qdrant_timeout=1)
    fake_qdrant.hang(path=f"/collections/{COLLECTION}")
    started = time.monotonic()
    report = await world.check()
    assert time.monotonic() - started < 5
    assert line(report, "collection").detail == "unreachable: no answer within 1 s"
    assert report.status is Status.CRITICAL


async def test_a_scroll_that_hangs_midway_fails_the_comparison_only(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant
) -> None:
    world = await scene(
        postgres_server, fake_qdrant, *chunks_sql(range(1, 301)), points=list(range(1, 301)), qdrant_timeout=1
    )
    fake_qdrant.hang(path=f"/collections/{COLLECTION}/points/scroll")
    started = time.monotonic()
    report = await world.check()
    assert time.monotonic() - started < 5
    assert line(report, "collection").status is Status.HEALTHY
    assert line(report, "chunks").detail == (
        f"not compared: reading the points of `{COLLECTION}` failed: no answer within 1 s"
    )
    assert report.diffs == () and report.status is Status.CRITICAL


async def test_the_whole_check_has_a_deadline(postgres_server: PostgresServer, fake_qdrant: FakeQdrant) -> None:
    world = await scene(
        postgres_server, fake_qdrant, *chunks_sql([1]), points=[1], qdrant_timeout=8, extra="      deadline_seconds: 1"
    )
    fake_qdrant.hang(path=f"/collections/{COLLECTION}/points/scroll")
    started = time.monotonic()
    report = await world.check()
    assert time.monotonic() - started < 4
    assert line(report, "deadline").detail == (
        "the check did not finish within 1 s; what is not listed above was not checked"
    )
    assert report.status is Status.CRITICAL


async def test_a_refused_api_key_is_said_without_the_key(
    postgres_server: PostgresServer, fake_qdrant: FakeQdrant
) -> None:
    world = await scene(postgres_server, fake_qdrant, *chunks_sql([1]), points=[1])
    fake_qdrant.require_api_key("another-key-entirely")
    report = await world.check()
    assert line(report, "collection").detail == "unreachable: the API key was refused"
    assert KEY not in everything_said(report)


# -- declarations --------------------------------------------------------------------------------------


async def test_a_service_without_an_integrity_section_is_refused(postgres_server: PostgresServer) -> None:
    loaded = parse_inventory(
        inventory_yaml("http://127.0.0.1:1"), "t", {"YT_DB": "postgresql://x@h/d", "YT_QDRANT_KEY": KEY}
    )
    with pytest.raises(CommandError) as caught:
        integrity_target(loaded.inventory, "plain")
    assert caught.value.message == (
        "`plain` declares no integrity check in the inventory "
        "(an `integrity:` section naming its database, tables and collections)."
    )


def test_the_integrity_section_is_validated_with_paths() -> None:
    text = """
services:
  yt:
    components:
      db: {type: postgres, dsn: "postgresql://u@h/d"}
      vectors: {type: qdrant, url: "http://q:6333", collections: [a]}
    integrity:
      database: vectors
      qdrant: db
      jobs: db
      chunks:
        - {table: chunks, collection: b}
        - {table: chunks, collection: b}
  other:
    components:
      db: {type: postgres, dsn: "postgresql://u@h/d"}
      vectors: {type: qdrant, url: "http://q:6333", collections: [a]}
    integrity:
      database: nope
      chunks:
        - {table: chunks, collection: a}
"""
    with pytest.raises(InventoryError) as caught:
        parse_inventory(text, "t", {})
    assert caught.value.problems == [
        "services.yt.integrity.database: 'vectors' is a qdrant component, not postgres",
        "services.yt.integrity.qdrant: 'db' is a postgres component, not qdrant",
        "services.yt.integrity.jobs: the postgres component 'db' declares no `jobs:` table",
        "services.yt.integrity.chunks: chunks against b is declared twice",
        "services.other.integrity.database: 'nope' is not a component of other (components: db, vectors)",
        "services.other.integrity.chunks.0: comparing with a collection needs `qdrant:` (a qdrant component)",
    ]


def test_a_bad_vector_id_mapping_is_one_plain_problem() -> None:
    text = inventory_yaml("http://q:6333", vector_id="{payload_field: chunk_id}")
    with pytest.raises(InventoryError) as caught:
        parse_inventory(text, "t", {"YT_DB": "postgresql://u@h/d", "YT_QDRANT_KEY": KEY})
    assert caught.value.problems == [
        "services.yt.integrity.chunks.0.vector_id: must be same_id (the point id is the chunk id) "
        "or {payload: <field>} (a payload field holds it)"
    ]
