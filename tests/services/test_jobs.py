"""The jobs table of runbook 003 against a real PostgreSQL: summary, observe, reset of stuck jobs."""

from __future__ import annotations

import hashlib
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.errors import CommandError
from services.inventory import JobsTable
from services.jobs import Job, JobsClient, job_facts
from services.redaction import Redactor
from tests.fixtures.servers import PostgresServer, free_port
from tests.fixtures.servers import run_sql as run
from tests.fixtures.wait import wait_until

PASSWORD = "Sw0rdfish-jobs-42"
MESSAGE = "Reset by opsbot: stuck in processing"

JOBS_DDL = """
create table jobs (
    id integer primary key,
    status text not null,
    started_at timestamptz,
    error_message text
)
"""


async def rows(dsn: str, query: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return [dict(r) for r in await conn.fetch(query)]
    finally:
        await conn.close()


def client(dsn: str, *, timeout: float = 5.0, **spec: Any) -> JobsClient:
    return JobsClient(dsn, JobsTable(**spec), timeout=timeout)


def ago(minutes: int) -> str:
    return f"now() - interval '{minutes} minutes'"


@pytest.fixture
async def jobs_dsn(pg_login_dsn: str) -> str:
    """A database with a standard jobs table holding a known mix of jobs; its tests run twice, as the
    trusted superuser and as the SCRAM role (whose password must get through)."""
    await run(
        pg_login_dsn,
        JOBS_DDL,
        f"""insert into jobs values
            (1, 'pending', null, null),
            (2, 'pending', null, null),
            (3, 'done', {ago(500)}, null),
            (4, 'failed', {ago(400)}, 'boom'),
            (5, 'processing', {ago(10)}, null),
            (6, 'processing', {ago(120)}, null),
            (7, 'processing', {ago(180)}, 'earlier try failed'),
            (8, 'processing', {ago(90)}, null),
            (9, 'processing', null, null),
            (10, 'processing', {ago(45)}, null)""",
    )
    return pg_login_dsn


# -- summary -----------------------------------------------------------------------------------------


async def test_summary_counts_every_status_and_lists_stuck_jobs_oldest_first(jobs_dsn: str) -> None:
    before = datetime.now(UTC)
    summary = await client(jobs_dsn).summary()

    assert summary.counts == {"done": 1, "failed": 1, "pending": 2, "processing": 6}
    assert [job.id for job in summary.stuck] == ["7", "6", "8"]
    assert {job.status for job in summary.stuck} == {"processing"}
    assert summary.stuck_total == 3
    assert summary.threshold_minutes == 60
    assert abs(summary.checked_at - before) < timedelta(seconds=30)
    assert summary.checked_at.utcoffset() == timedelta(0)
    oldest = summary.stuck[0].started_at
    assert oldest is not None and oldest.utcoffset() == timedelta(0)
    assert abs((summary.checked_at - oldest) - timedelta(minutes=180)) < timedelta(seconds=30)


@pytest.mark.parametrize(("minutes", "expected"), [(30, ["7", "6", "8", "10"]), (60, ["7", "6", "8"]), (150, ["7"])])
async def test_summary_respects_the_threshold(jobs_dsn: str, minutes: int, expected: list[str]) -> None:
    summary = await client(jobs_dsn, stuck_after_minutes=minutes).summary()
    assert [job.id for job in summary.stuck] == expected
    assert summary.stuck_total == len(expected)
    assert summary.threshold_minutes == minutes


async def test_summary_limit_cuts_the_list_but_not_the_total(jobs_dsn: str) -> None:
    two = await client(jobs_dsn).summary(limit=2)
    none = await client(jobs_dsn).summary(limit=0)
    assert [job.id for job in two.stuck] == ["7", "6"]
    assert two.stuck_total == 3
    assert none.stuck == [] and none.stuck_total == 3


async def test_summary_of_an_empty_table(pg_dsn: str) -> None:
    await run(pg_dsn, JOBS_DDL)
    summary = await client(pg_dsn).summary()
    assert (summary.counts, summary.stuck, summary.stuck_total) == ({}, [], 0)


# -- id types ----------------------------------------------------------------------------------------

U1, U2, U3 = (str(uuid.UUID(int=n)) for n in (1, 2, 3))


@pytest.mark.parametrize(
    ("sql_type", "ids"),
    [
        ("integer", ["11", "12", "13"]),
        ("bigint", ["9000000000", "9000000001", "9000000002"]),
        ("uuid", [U1, U2, U3]),
        ("text", ["job-a", "job-b", "job-c"]),
        ("varchar(20)", ["A-1", "a-1", "b 2"]),
    ],
)
async def test_ids_of_any_type_work_for_summary_observe_and_reset(pg_dsn: str, sql_type: str, ids: list[str]) -> None:
    first, second, third = ids
    await run(
        pg_dsn,
        f"create table jobs (id {sql_type} primary key, status text, started_at timestamptz, error_message text)",
        f"""insert into jobs values
            ('{first}', 'processing', {ago(200)}, null),
            ('{second}', 'processing', {ago(100)}, null),
            ('{third}', 'processing', {ago(5)}, null)""",
    )
    jobs = client(pg_dsn)

    summary = await jobs.summary()
    assert [job.id for job in summary.stuck] == [first, second]

    seen = await jobs.observe([third, first])
    assert list(seen) == [third, first]
    assert seen[first] == Job(first, "processing", summary.stuck[0].started_at)

    assert await jobs.reset_stuck([first, second, third], message=MESSAGE) == [first, second]
    after = {r["id"]: r["status"] for r in await rows(pg_dsn, "select id::text as id, status from jobs")}
    assert after == {first: "pending", second: "pending", third: "processing"}


async def test_ids_are_matched_in_the_columns_own_type(pg_dsn: str) -> None:
    """``007`` is job 7 in an integer column; an upper-case uuid is the same uuid."""
    upper = str(uuid.uuid4()).upper()
    await run(
        pg_dsn,
        JOBS_DDL,
        f"insert into jobs values (7, 'processing', {ago(120)}, null)",
        "create table ujobs (id uuid primary key, status text, started_at timestamptz, error_message text)",
        f"insert into ujobs values ('{upper}', 'processing', {ago(120)}, null)",
    )
    seen = await client(pg_dsn).observe(["007"])
    assert seen == {"007": Job("7", "processing", seen["007"].started_at if seen["007"] else None)}
    assert await client(pg_dsn, table="ujobs").reset_stuck([upper], message=MESSAGE) == [upper]
    assert (await rows(pg_dsn, "select status from ujobs")) == [{"status": "pending"}]


async def test_an_id_that_does_not_fit_the_column_is_a_plain_error(jobs_dsn: str) -> None:
    with pytest.raises(CommandError) as caught:
        await client(jobs_dsn).reset_stuck(["6", "not-a-number"], message=MESSAGE)
    assert "`id`" in caught.value.message and "integer" in caught.value.message
    assert "not-a-number" in caught.value.message
    assert (await rows(jobs_dsn, "select status from jobs where id = 6")) == [{"status": "processing"}]


async def index_scans(dsn: str, index: str) -> int:
    """Index scans counted on ``index`` (statistics reach the shared view when a backend exits)."""
    found = await rows(dsn, f"select idx_scan from pg_stat_user_indexes where indexrelname = '{index}'")
    return int(found[0]["idx_scan"])


@pytest.mark.parametrize("sql_type", ["bigint", "uuid"])
async def test_lookups_by_id_use_the_index_on_the_id_column(pg_dsn: str, sql_type: str) -> None:
    key = "n::bigint" if sql_type == "bigint" else "md5(n::text)::uuid"
    await run(
        pg_dsn,
        f"create table jobs (id {sql_type} constraint jobs_pk primary key, status text, started_at timestamptz, "
        "error_message text)",
        f"insert into jobs select {key}, 'processing', now() - interval '2 hours', null "
        "from generate_series(1, 20000) as n",
        "analyze jobs",
    )
    wanted = "77" if sql_type == "bigint" else str(uuid.UUID(hashlib.md5(b"77", usedforsecurity=False).hexdigest()))
    [before] = await rows(pg_dsn, "select idx_scan from pg_stat_user_indexes where indexrelname = 'jobs_pk'")
    assert before["idx_scan"] == 0

    seen = await client(pg_dsn).observe([wanted])
    found = seen[wanted]
    assert found is not None and found.id == wanted

    # Comparing the column as text would read all 20000 rows and never touch the index.
    await wait_until(lambda: index_scans(pg_dsn, "jobs_pk"), "the lookup is counted as a scan of the index jobs_pk")


# -- timestamps --------------------------------------------------------------------------------------


@pytest.mark.parametrize("column_type", ["timestamp", "timestamptz", "timestamp(3) without time zone"])
async def test_started_column_with_or_without_time_zone(pg_dsn: str, column_type: str) -> None:
    """A timestamp without time zone holds UTC even when the session's TimeZone is far from it."""
    await run(
        pg_dsn,
        "do $$ begin execute format('alter database %I set timezone to %L', current_database(), 'Asia/Tokyo'); end $$",
        f"create table jobs (id int primary key, status text, started_at {column_type}, error_message text)",
    )
    # Values written the way a worker in UTC would: the UTC wall-clock time.
    utc_now = "(now() at time zone 'UTC')" if "without" in column_type or column_type == "timestamp" else "now()"
    await run(
        pg_dsn,
        f"""insert into jobs values
            (1, 'processing', {utc_now} - interval '30 minutes', null),
            (2, 'processing', {utc_now} - interval '2 hours', null)""",
    )
    jobs = client(pg_dsn)

    summary = await jobs.summary()
    assert [job.id for job in summary.stuck] == ["2"]
    started = summary.stuck[0].started_at
    assert started is not None and started.utcoffset() == timedelta(0)
    assert abs((summary.checked_at - started) - timedelta(hours=2)) < timedelta(seconds=30)

    seen = await jobs.observe(["1"])
    fresh = seen["1"]
    assert fresh is not None and fresh.started_at is not None
    assert abs((summary.checked_at - fresh.started_at) - timedelta(minutes=30)) < timedelta(seconds=30)

    assert await jobs.reset_stuck(["1", "2"], message=MESSAGE) == ["2"]


async def test_a_started_column_that_is_not_a_timestamp_is_refused(pg_dsn: str) -> None:
    await run(pg_dsn, "create table jobs (id int primary key, status text, started_at text, error_message text)")
    with pytest.raises(CommandError) as caught:
        await client(pg_dsn).summary()
    assert "`started_at`" in caught.value.message and "not a timestamp" in caught.value.message


# -- custom names ------------------------------------------------------------------------------------


async def test_custom_table_columns_statuses_and_schema(pg_dsn: str) -> None:
    await run(
        pg_dsn,
        "create schema ops",
        "create type ops.job_state as enum ('queued', 'running', 'finished')",
        """create table ops."JobQueue" ("JobId" bigint primary key, "State" ops.job_state not null,
                                        began timestamptz, failure varchar(12))""",
        f"""insert into ops."JobQueue" values
            (1, 'running', {ago(300)}, null),
            (2, 'running', {ago(5)}, null),
            (3, 'queued', null, null),
            (4, 'finished', {ago(999)}, null)""",
        # A table of the same name on the search path must not be the one read.
        """create table public."JobQueue" ("JobId" bigint primary key, "State" text, began timestamptz,
                                           failure text)""",
        f"""insert into public."JobQueue" values (1, 'running', {ago(300)}, null), (9, 'running', {ago(300)}, null)""",
    )
    jobs = client(
        pg_dsn,
        table="ops.JobQueue",
        id_column="JobId",
        status_column="State",
        started_column="began",
        error_column="failure",
        processing_value="running",
        pending_value="queued",
        stuck_after_minutes=60,
    )

    summary = await jobs.summary()
    assert summary.counts == {"finished": 1, "queued": 1, "running": 2}
    assert [job.id for job in summary.stuck] == ["1"]

    assert await jobs.reset_stuck(["1", "2", "9"], message=MESSAGE) == ["1"]
    ops = await rows(
        pg_dsn, 'select "JobId" as id, "State"::text as state, began, failure from ops."JobQueue" order by 1'
    )
    assert [(r["id"], r["state"]) for r in ops] == [(1, "queued"), (2, "running"), (3, "queued"), (4, "finished")]
    assert ops[0]["began"] is None
    assert ops[0]["failure"] == MESSAGE[:12]  # cut to the column's varchar(12), not an error
    public = await rows(pg_dsn, 'select "State" as state from public."JobQueue" order by "JobId"')
    assert public == [{"state": "running"}, {"state": "running"}]


# -- reset ---------------------------------------------------------------------------------------------


async def test_reset_touches_exactly_the_given_jobs_that_are_still_stuck(jobs_dsn: str) -> None:
    await run(jobs_dsn, "update jobs set status = 'done' where id = 8")  # finished since it was listed
    before = {r["id"]: r for r in await rows(jobs_dsn, "select * from jobs")}

    # 6, 7: stuck; 8: done meanwhile; 5: processing but recent; 1: pending; 404: never existed.
    reset = await client(jobs_dsn).reset_stuck(["7", "6", "8", "5", "1", "404"], message=MESSAGE)

    assert reset == ["7", "6"]
    after = {r["id"]: r for r in await rows(jobs_dsn, "select * from jobs")}
    for job_id in (6, 7):
        assert after[job_id]["status"] == "pending"
        assert after[job_id]["started_at"] is None
        assert after[job_id]["error_message"] == MESSAGE
    assert {k: v for k, v in after.items() if k not in (6, 7)} == {k: v for k, v in before.items() if k not in (6, 7)}


async def test_reset_of_nothing_changes_nothing(jobs_dsn: str) -> None:
    before = await rows(jobs_dsn, "select * from jobs order by id")
    assert await client(jobs_dsn).reset_stuck([], message=MESSAGE) == []
    assert await client(jobs_dsn).reset_stuck(["5", "1"], message=MESSAGE) == []
    assert await rows(jobs_dsn, "select * from jobs order by id") == before


async def test_reset_is_one_transaction(jobs_dsn: str) -> None:
    """A failure on the second row leaves the first one untouched too."""
    await run(
        jobs_dsn,
        "create sequence reset_calls",
        """create function refuse_second() returns trigger language plpgsql as $$
           begin
             if nextval('reset_calls') = 2 then raise exception 'refusing the second row'; end if;
             return new;
           end $$""",
        "create trigger refuse_second before update on jobs for each row execute function refuse_second()",
    )
    before = await rows(jobs_dsn, "select * from jobs order by id")

    with pytest.raises(CommandError) as caught:
        await client(jobs_dsn).reset_stuck(["6", "7", "8"], message=MESSAGE)

    assert "refusing the second row" in caught.value.message
    assert await rows(jobs_dsn, "select * from jobs order by id") == before
    [calls] = await rows(jobs_dsn, "select last_value from reset_calls")
    assert calls["last_value"] == 2  # the first row was updated, then rolled back


async def test_reset_without_an_error_column(pg_dsn: str) -> None:
    await run(
        pg_dsn,
        "create table jobs (id int primary key, status text, started_at timestamp)",
        "insert into jobs values (1, 'processing', (now() at time zone 'UTC') - interval '3 hours')",
    )
    jobs = client(pg_dsn, error_column=None)
    assert (await jobs.summary()).stuck_total == 1
    assert await jobs.reset_stuck(["1"], message=MESSAGE) == ["1"]
    assert await rows(pg_dsn, "select * from jobs") == [{"id": 1, "status": "pending", "started_at": None}]


# -- missing table or column ---------------------------------------------------------------------------


@pytest.mark.parametrize("table", ["nope", "ops.jobs", "public.nope"])
async def test_a_missing_table_is_named(pg_dsn: str, table: str) -> None:
    await run(pg_dsn, JOBS_DDL)
    with pytest.raises(CommandError) as caught:
        await client(pg_dsn, table=table).summary()
    assert caught.value.message.startswith(f"The jobs table `{table}` does not exist")
    assert "inventory" in caught.value.message and "\n" not in caught.value.message


@pytest.mark.parametrize(
    ("setting", "column"),
    [
        ("id_column", "job_id"),
        ("status_column", "state"),
        ("started_column", "began"),
        ("error_column", "failure"),
        ("status_column", "Status"),  # quoted identifiers are case-sensitive
    ],
)
async def test_a_missing_column_is_named(jobs_dsn: str, setting: str, column: str) -> None:
    jobs = JobsClient(jobs_dsn, JobsTable.model_validate({setting: column}), timeout=5.0)
    calls: list[Callable[[], Awaitable[object]]] = [
        jobs.summary,
        lambda: jobs.observe(["1"]),
        lambda: jobs.reset_stuck(["6"], message=MESSAGE),
    ]
    for call in calls:
        with pytest.raises(CommandError) as caught:
            await call()
        assert caught.value.message.startswith(f"The jobs table `jobs` has no column `{column}`;")
    assert (await rows(jobs_dsn, "select status from jobs where id = 6")) == [{"status": "processing"}]


async def test_the_default_error_column_must_exist(pg_dsn: str) -> None:
    await run(pg_dsn, "create table jobs (id int primary key, status text, started_at timestamptz)")
    with pytest.raises(CommandError, match="has no column `error_message`"):
        await client(pg_dsn).reset_stuck(["1"], message=MESSAGE)


async def test_a_locked_table_is_reported_within_the_timeout(jobs_dsn: str) -> None:
    locker = await asyncpg.connect(jobs_dsn, timeout=10)
    try:
        async with locker.transaction():
            await locker.execute("lock table jobs in access exclusive mode")
            started = time.monotonic()
            with pytest.raises(CommandError) as caught:
                await client(jobs_dsn, timeout=1.0).summary()
            elapsed = time.monotonic() - started
    finally:
        await locker.close()
    assert "did not answer within 1 s" in caught.value.message
    assert elapsed < 4


# -- connection problems ---------------------------------------------------------------------------------


async def test_an_unreachable_server_is_a_plain_sentence_without_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dsn = f"postgresql://opsbot:{PASSWORD}@127.0.0.1:{free_port()}/jobs"
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    with pytest.raises(CommandError) as caught:
        await JobsClient(dsn, JobsTable(), timeout=2.0, redactor=Redactor([PASSWORD])).summary()
    assert time.monotonic() - started < 3
    assert "connection refused" in caught.value.message
    assert caught.value.message.startswith("Cannot connect to the database of the jobs table `jobs`")
    assert PASSWORD not in caught.value.message and PASSWORD not in caplog.text
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


async def test_a_wrong_password_is_refused_in_a_plain_sentence_without_any_password(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    role = postgres_server.scram_role()
    jobs_dsn = await postgres_server.database_with(
        JOBS_DDL, f"insert into jobs values (6, 'processing', {ago(120)}, null)", scram=True
    )
    database = jobs_dsn.rsplit("/", 1)[1]
    wrong = postgres_server.scram_dsn(database, password="not-" + role.password)
    caplog.set_level(logging.DEBUG)

    with pytest.raises(CommandError) as caught:
        await JobsClient(wrong, JobsTable(), timeout=5.0, redactor=Redactor()).summary()

    assert caught.value.message.startswith("Cannot connect to the database of the jobs table `jobs`: ")
    assert caught.value.message.endswith(f'password authentication failed for user "{role.name}".')
    assert not role.found_in(caught.value.message + repr(caught.value) + caplog.text)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert (await rows(jobs_dsn, "select status from jobs where id = 6")) == [{"status": "processing"}]


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A port that accepts connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


async def test_a_server_that_never_answers_times_out_within_the_timeout(silent_port: int) -> None:
    dsn = f"postgresql://opsbot:{PASSWORD}@127.0.0.1:{silent_port}/jobs"
    started = time.monotonic()
    with pytest.raises(CommandError) as caught:
        await JobsClient(dsn, JobsTable(), timeout=1.0).reset_stuck(["1"], message=MESSAGE)
    assert 0.8 < time.monotonic() - started < 3
    assert "no answer within 1 s" in caught.value.message
    assert PASSWORD not in caught.value.message


async def test_a_missing_database_is_reported_without_the_password(postgres_server: PostgresServer) -> None:
    dsn = f"postgresql://postgres:{PASSWORD}@{postgres_server.host}:{postgres_server.port}/no_such_db"
    with pytest.raises(CommandError) as caught:
        await JobsClient(dsn, JobsTable(), timeout=5.0).summary()
    assert caught.value.message.startswith("Cannot connect to the database of the jobs table `jobs`")
    assert "no_such_db" in caught.value.message
    assert PASSWORD not in caught.value.message


async def test_a_malformed_dsn_does_not_echo_it() -> None:
    dsn = f"postgresql://opsbot:{PASSWORD}@127.0.0.1:notaport/jobs"
    with pytest.raises(CommandError) as caught:
        await JobsClient(dsn, JobsTable(), timeout=1.0).summary()
    assert "not valid" in caught.value.message
    assert PASSWORD not in caught.value.message


# -- observe and facts -----------------------------------------------------------------------------------


async def test_observe_reports_deleted_rows_as_none(jobs_dsn: str) -> None:
    jobs = client(jobs_dsn)
    first = await jobs.observe(["6", "7", "404"])
    assert first["404"] is None
    assert first["6"] is not None and first["6"].status == "processing"

    await run(jobs_dsn, "delete from jobs where id = 7", "update jobs set status = 'done' where id = 6")
    second = await jobs.observe(["6", "7", "404"])
    assert second["7"] is None
    assert second["6"] is not None and second["6"].status == "done"
    assert await jobs.observe([]) == {}


async def test_job_facts_are_stable_and_show_what_changed(jobs_dsn: str) -> None:
    jobs = client(jobs_dsn)
    first = await jobs.observe(["10", "6", "9", "404", "7"])
    again = await jobs.observe(["404", "7", "6", "9", "10"])

    facts = job_facts(first)
    assert facts == job_facts(again)
    assert list(facts) == ["job 6", "job 7", "job 9", "job 10", "job 404"]
    assert list(job_facts(again)) == list(facts)
    seen_6 = first["6"]
    assert seen_6 is not None and seen_6.started_at is not None
    assert facts["job 6"] == f"processing since {seen_6.started_at.isoformat()}"
    assert facts["job 9"] == "processing, not started"
    assert facts["job 404"] == "gone"

    await client(jobs_dsn).reset_stuck(["6"], message=MESSAGE)
    await run(jobs_dsn, "delete from jobs where id = 7")
    changed = job_facts(await jobs.observe(list(first)))
    assert {k for k in facts if facts[k] != changed[k]} == {"job 6", "job 7"}
    assert changed["job 6"] == "pending, not started" and changed["job 7"] == "gone"


def test_job_facts_sorts_text_ids_after_numbers() -> None:
    when = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    facts = job_facts({"b": None, "10": Job("10", "done", when), "2": None, "a": Job("a", "processing", when)})
    assert facts == {
        "job 2": "gone",
        "job 10": "done since 2024-05-01T10:00:00+00:00",
        "job a": "processing since 2024-05-01T10:00:00+00:00",
        "job b": "gone",
    }
    assert list(facts) == ["job 2", "job 10", "job a", "job b"]
