"""Approvals across real `opsbot serve` processes: two replicas racing on one approval, and a bot killed mid-run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg
import pytest

from handlers.approvals import APPROVE
from services.state import Approval, ApprovalState, StateStore, open_state_store
from tests.fixtures.servers import PostgresServer, free_port
from tests.fixtures.slack import Call, FakeSlack, sign
from tests.fixtures.wait import wait_until
from tests.scenario.test_approvals import CLICKERS, REQUESTER, create_jobs_db, pipeline_inventory
from tests.scenario.test_approvals import JOBS_SQL as BASE_JOBS_SQL

ROOT = Path(__file__).parents[2]
SECRET = "signing-secret-for-approval-processes"
STARTED = "Approved. The run starts now."
S = ApprovalState
T = TypeVar("T")

JOBS_SQL = (
    BASE_JOBS_SQL
    + """
-- Every UPDATE statement on jobs leaves a row here, even one that changes no row (a second run of
-- the reset would find nothing stuck and change nothing, but it would still be counted).
CREATE TABLE jobs_update_statements (at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE jobs_row_updates (id bigint NOT NULL);
CREATE FUNCTION count_jobs_statement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO jobs_update_statements DEFAULT VALUES; RETURN NULL; END $$;
CREATE FUNCTION count_jobs_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO jobs_row_updates VALUES (NEW.id); RETURN NULL; END $$;
CREATE TRIGGER jobs_statement AFTER UPDATE ON jobs FOR EACH STATEMENT EXECUTE FUNCTION count_jobs_statement();
CREATE TRIGGER jobs_row AFTER UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION count_jobs_row();
"""
)


@pytest.fixture
async def jobs_dsn(postgres_server: PostgresServer) -> str:
    return await create_jobs_db(postgres_server, JOBS_SQL)


@dataclass
class Replica:
    name: str
    proc: asyncio.subprocess.Process
    base: str
    log: Path

    def tail(self, chars: int = 3000) -> str:
        return f"--- {self.name} log ---\n" + self.log.read_text(errors="replace")[-chars:]


def bot_env(tmp_path: Path, fake_slack: FakeSlack, jobs_dsn: str, *, timeout: int, **extra: str) -> dict[str, str]:
    config = tmp_path / "opsbot.yaml"
    config.write_text(pipeline_inventory(timeout=timeout))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "OPSBOT_"))}
    return env | {
        "SLACK_BOT_TOKEN": "xoxb-approval-processes",
        "SLACK_SIGNING_SECRET": SECRET,
        "OPSBOT_SLACK_API_URL": fake_slack.base_url,
        "OPSBOT_CONFIG": str(config),
        "OPSBOT_HOST": "127.0.0.1",
        "OPSBOT_LOG_FORMAT": "json",
        "PIPE_DB": jobs_dsn,
        **extra,
    }


@contextlib.asynccontextmanager
async def replica(name: str, env: dict[str, str], log_dir: Path) -> AsyncIterator[Replica]:
    """`opsbot serve` as a real process (its log in a file, so a chatty bot never blocks on a pipe),
    yielded once /ready answers 200; killed if still running afterwards."""
    port = free_port()
    log = log_dir / f"{name}.log"
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.cli", "serve", env=env | {"OPSBOT_PORT": str(port)}, cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL, stderr=sink,
        )  # fmt: skip
    bot = Replica(name, proc, f"http://127.0.0.1:{port}", log)
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                assert proc.returncode is None, f"{name} exited with {proc.returncode}\n{bot.tail()}"
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with http.get(f"{bot.base}/ready") as resp:
                        return resp.status == 200
                return False

            await wait_until(ready, f"{name} to be ready", timeout=30)
        yield bot
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def stop(bot: Replica) -> int:
    bot.proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(bot.proc.wait(), 30)


async def post(http: aiohttp.ClientSession, bot: Replica, body: str) -> int:
    headers = {"Content-Type": "application/x-www-form-urlencoded", **sign(SECRET, body)}
    async with http.post(f"{bot.base}/slack/events", data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def request_reset(
    http: aiohttp.ClientSession, bot: Replica, slack: FakeSlack, store: StateStore
) -> tuple[str, str]:
    """`/ops jobs reset-stuck pipeline` through ``bot``: the approval id and its message's ts."""
    before = len(slack.calls_to("chat.postMessage"))
    body = slack.slash_body("jobs reset-stuck pipeline", user_id=REQUESTER, response_url=slack.response_url())
    assert await post(http, bot, body) == 200
    posts = await slack.wait_for("chat.postMessage", count=before + 1, timeout=15)
    approval_id = str(posts[-1].params["blocks"][-1]["elements"][0]["value"])

    async def attached() -> str | None:  # the message ts is remembered just after the post
        return (await approval_now(store, approval_id)).message_ts

    return approval_id, await wait_until(attached, "the approval message to be attached", timeout=10)


def click_body(slack: FakeSlack, approval_id: str, user: str, message_ts: str) -> str:
    return slack.block_actions_body(
        APPROVE, approval_id, user_id=user, response_url=slack.response_url(user), message_ts=message_ts
    )


async def approval_now(store: StateStore, approval_id: str) -> Approval:
    approval = await store.get_approval(approval_id)
    assert approval is not None, f"no approval {approval_id} in the state store"
    return approval


async def events(store: StateStore, command: str, approval_id: str) -> list[Any]:
    return [e for e in await store.audit_events(limit=1000) if e.command == command and e.args.startswith(approval_id)]


async def fetch_jobs(dsn: str) -> tuple[dict[int, tuple[str, bool, str | None]], int, list[int]]:
    """Jobs by id (status, started_at cleared, error_message), UPDATE statements run, rows updated."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id, status, started_at IS NULL AS cleared, error_message FROM jobs ORDER BY id")
        statements = await conn.fetchval("SELECT count(*) FROM jobs_update_statements")
        updated = [r["id"] for r in await conn.fetch("SELECT id FROM jobs_row_updates ORDER BY id")]
    finally:
        await conn.close()
    return {r["id"]: (r["status"], r["cleared"], r["error_message"]) for r in rows}, statements, updated


def texts(call: Call) -> str:
    return str(call.params.get("text", "")) + str(call.params.get("blocks", ""))


@pytest.mark.timeout(120)
async def test_fifty_clicks_over_two_replicas_run_the_reset_exactly_once(
    postgres_server: PostgresServer, redis_url: str, jobs_dsn: str, fake_slack: FakeSlack, tmp_path: Path
) -> None:
    state_dsn = postgres_server.dsn(await postgres_server.create_database())
    env = bot_env(tmp_path, fake_slack, jobs_dsn, timeout=5, OPSBOT_STATE_URL=state_dsn, OPSBOT_REDIS_URL=redis_url)
    async with contextlib.AsyncExitStack() as stack:
        a, b = await asyncio.gather(
            stack.enter_async_context(replica("replica-a", env, tmp_path)),
            stack.enter_async_context(replica("replica-b", env, tmp_path)),
        )
        store = await open_state_store(state_dsn, default_path=tmp_path / "unused.sqlite3")
        stack.push_async_callback(store.close)
        http = await stack.enter_async_context(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)))

        approval_id, message_ts = await request_reset(http, a, fake_slack, store)
        assert (await approval_now(store, approval_id)).state is S.PENDING
        bodies = [
            (a if n % 2 == 0 else b, click_body(fake_slack, approval_id, user, message_ts))
            for n, user in enumerate(CLICKERS)
        ]
        statuses = await asyncio.gather(*(post(http, bot, body) for bot, body in bodies))
        assert statuses == [200] * 50

        async def finished() -> Approval | None:
            current = await approval_now(store, approval_id)
            return current if current.state.final else None

        final = await wait_until(finished, "the approval to finish", timeout=20)
        answers: list[Call] = []
        for user in CLICKERS:
            [answer] = await fake_slack.wait_for(f"response_url/{user}", timeout=15)
            answers.append(answer)

        logs = a.tail() + b.tail()
        assert final.state is S.SUCCEEDED, f"{final.state}: {final.result}\n{logs}"
        assert final.result.startswith("Reset 3 of 3 job(s) to pending.")
        assert final.decided_by in CLICKERS
        assert len(await events(store, "approval started", approval_id)) == 1, logs
        assert len(await events(store, "approval succeeded", approval_id)) == 1
        assert len(await events(store, "approval approve refused", approval_id)) == 49

        assert {c.params.get("response_type") for c in answers} == {"ephemeral"}
        said = [str(c.params["text"]) for c in answers]
        assert said.count(STARTED) == 1, said
        winner = CLICKERS[said.index(STARTED)]
        assert winner == final.decided_by
        others = [t for t in said if t != STARTED]
        assert all(t.startswith(("Already approved by", "This already ran (succeeded)")) for t in others), others

        jobs, statements, updated = await fetch_jobs(jobs_dsn)
        assert statements == 1, f"the reset's UPDATE ran {statements} times"
        assert updated == [1, 2, 3]
        assert [jobs[n][:2] for n in (1, 2, 3)] == [("pending", True)] * 3
        assert all(str(jobs[n][2]).startswith("reset by opsbot") for n in (1, 2, 3))
        assert jobs[4] == ("processing", False, None) and jobs[5] == ("done", False, None)

        def done_edits() -> list[Call]:
            return [
                c for c in fake_slack.calls_to("chat.update") if c.params.get("ts") == message_ts and "Done" in texts(c)
            ]

        await wait_until(done_edits, "the approval message is edited to Done", timeout=20)

        codes = await asyncio.gather(stop(a), stop(b))
        assert list(codes) == [0, 0], logs
        assert "Traceback" not in a.tail(10**7) + b.tail(10**7)


@pytest.mark.timeout(120)
async def test_a_bot_killed_during_a_run_leaves_it_interrupted_for_the_next_one_to_report(
    jobs_dsn: str, fake_slack: FakeSlack, tmp_path: Path
) -> None:
    # A long statement timeout: the reset waits on the row locks until the bot is killed.
    env = bot_env(tmp_path, fake_slack, jobs_dsn, timeout=60, OPSBOT_STATE_DIR=str(tmp_path / "state"))
    jobs_db = jobs_dsn.rsplit("/", 1)[1]
    async with contextlib.AsyncExitStack() as stack:
        blocker = await asyncpg.connect(jobs_dsn)
        stack.push_async_callback(blocker.close)
        watcher = await asyncpg.connect(jobs_dsn)
        stack.push_async_callback(watcher.close)
        first = await stack.enter_async_context(replica("first", env, tmp_path))
        store = await open_state_store(None, default_path=tmp_path / "state" / "state.sqlite3")
        stack.push_async_callback(store.close)
        http = await stack.enter_async_context(aiohttp.ClientSession())

        approval_id, message_ts = await request_reset(http, first, fake_slack, store)
        blocking = blocker.transaction()
        await blocking.start()
        locked = await blocker.fetch("SELECT id FROM jobs WHERE status = 'processing' ORDER BY id FOR UPDATE")
        assert [r["id"] for r in locked] == [1, 2, 3, 4]
        assert await post(http, first, click_body(fake_slack, approval_id, CLICKERS[0], message_ts)) == 200

        async def running() -> Approval | None:
            current = await approval_now(store, approval_id)
            assert not current.state.final, f"{current.state}: {current.result}\n{first.tail()}"
            return current if current.state is S.RUNNING else None

        await wait_until(running, "the run to start", timeout=20)

        async def reset_waits_on_the_row_locks() -> bool:
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'opsbot'"
                " AND wait_event_type = 'Lock' AND query ILIKE 'update%'",
                jobs_db,
            )
            return bool(waiting)

        await wait_until(reset_waits_on_the_row_locks, "the bot's UPDATE to wait on the row locks", timeout=20)
        first.proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(first.proc.wait(), 10) == -signal.SIGKILL
        await blocking.rollback()

        async def orphan_gone() -> bool:
            left = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'opsbot'", jobs_db
            )
            return bool(left == 0)

        # The dead bot's backend gets the row locks now, then finds its client gone and rolls back.
        await wait_until(orphan_gone, "the dead bot's database session to end", timeout=20)
        assert (await approval_now(store, approval_id)).state is S.RUNNING  # nobody has noticed yet
        updates_before = len(fake_slack.calls_to("chat.update"))
        posts_before = len(fake_slack.calls_to("chat.postMessage"))

        second = await stack.enter_async_context(replica("second", env, tmp_path))

        async def interrupted() -> Approval | None:
            current = await approval_now(store, approval_id)
            return current if current.state is S.INTERRUPTED else None

        final = await wait_until(interrupted, "the new bot to mark the run interrupted", timeout=10)
        assert final.result.startswith("Interrupted: the bot stopped during the run")

        async def told() -> tuple[list[Call], list[Call]] | None:
            edits = [
                c
                for c in fake_slack.calls_to("chat.update")[updates_before:]
                if c.params.get("ts") == message_ts and "Interrupted" in texts(c)
            ]
            said = [c for c in fake_slack.calls_to("chat.postMessage")[posts_before:] if "was interrupted" in texts(c)]
            return (edits, said) if edits and said else None

        edits, said = await wait_until(told, "the message edit and the channel notice", timeout=10)
        assert all("approval_approve" not in texts(c) for c in edits)  # the buttons are gone
        assert len(said) == 1 and said[0].params["channel"] == "C0OPS" and approval_id in texts(said[0])
        assert len(await events(store, "approval interrupted", approval_id)) == 1
        assert len(await events(store, "approval started", approval_id)) == 1

        jobs, statements, updated = await fetch_jobs(jobs_dsn)
        assert [jobs[n] for n in (1, 2, 3, 4)] == [("processing", False, None)] * 4  # nothing half-applied
        assert (statements, updated) == (0, [])
        assert await stop(second) == 0, second.tail()
