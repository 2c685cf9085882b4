"""Does one approval run exactly once when many approvers click at once on several replicas?

Starts a throwaway PostgreSQL cluster and redis-server, a fake Slack, and M `opsbot serve` replicas
(real processes) sharing their state (PostgreSQL) and locks (Redis), with a `pipeline` service whose
jobs table has 3 stuck jobs. Each round restores the stuck jobs, asks for `/ops jobs reset-stuck
pipeline`, then fires N concurrent signed Approve clicks from N approvers, spread over the replicas.
Prints per round and overall: executions (runs started, from the audit log; must be exactly 1), the
time from the first click sent to the run's start (its "approval started" audit event), and the
click-ack latency (HTTP 200 round trip of each click). Exits 1 if any round ran other than once.

    uv run python -m bench.approval_race [--replicas 2] [--clicks 50] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.common import ROOT, child_env, percentile, post_signed, summary
from services.state import StateStore, open_state_store
from tests.fixtures.servers import free_port, postgres_cluster, redis_process
from tests.fixtures.slack import FakeSlack
from tests.scenario.test_approvals import create_jobs_db

SECRET = "bench-signing-secret"
TOKEN = "xoxb-bench-token"
REQUESTER = "U0BREQ"
STARTED = "Approved. The run starts now."

JOBS_SQL = """
CREATE TABLE jobs (id bigint PRIMARY KEY, status text NOT NULL, started_at timestamptz, error_message text);
INSERT INTO jobs VALUES (1, 'done', NULL, NULL), (2, 'done', NULL, NULL), (3, 'done', NULL, NULL),
                        (4, 'processing', now() - interval '10 minutes', NULL);
"""
RESTORE_SQL = """
UPDATE jobs SET status = 'processing', error_message = NULL,
       started_at = now() - (id || ' hours')::interval
WHERE id IN (1, 2, 3)
"""


# -- the replicas --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def replicas(count: int, env: dict[str, str], log_dir: Path) -> AsyncIterator[list[str]]:
    """``count`` `opsbot serve` processes; yields their base URLs once every /ready says 200."""
    procs: list[asyncio.subprocess.Process] = []
    urls: list[str] = []
    try:
        for n in range(count):
            port = free_port()
            with (log_dir / f"replica-{n}.log").open("wb") as sink:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bot.cli", "serve", env=env | {"OPSBOT_PORT": str(port)}, cwd=ROOT,
                    stdout=asyncio.subprocess.DEVNULL, stderr=sink,
                )  # fmt: skip
            procs.append(proc)
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 90
        async with aiohttp.ClientSession() as http:
            for n, (url, proc) in enumerate(zip(urls, procs, strict=True)):
                while True:
                    if proc.returncode is not None or time.monotonic() > deadline:
                        log = (log_dir / f"replica-{n}.log").read_text(errors="replace")[-3000:]
                        raise SystemExit(f"replica {url} did not become ready:\n{log}")
                    with contextlib.suppress(aiohttp.ClientConnectionError):
                        async with http.get(url + "/ready") as resp:
                            if resp.status == 200:
                                break
                    await asyncio.sleep(0.1)
        yield urls
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 30)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def post(http: aiohttp.ClientSession, url: str, body: str) -> float:
    return await post_signed(http, url, body, SECRET)


async def poll(what: str, check: Any, timeout: float = 60) -> Any:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while (found := await check()) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)
    return found


async def one_round(
    number: int, urls: list[str], clickers: list[str], slack: FakeSlack, store: StateStore, jobs_dsn: str,
    http: aiohttp.ClientSession,
) -> tuple[int, float, list[float], str]:  # fmt: skip
    """Restore, request, race the clicks: (executions, seconds to run start, click acks, final state)."""
    conn = await asyncpg.connect(jobs_dsn)
    try:
        await conn.execute(RESTORE_SQL)
    finally:
        await conn.close()
    posted = len(slack.calls_to("chat.postMessage"))
    await post(http, urls[number % len(urls)], slack.slash_body("jobs reset-stuck pipeline", user_id=REQUESTER))
    posts = await slack.wait_for("chat.postMessage", count=posted + 1, timeout=30)
    approval_id = str(posts[-1].params["blocks"][-1]["elements"][0]["value"])

    async def attached() -> str | None:
        approval = await store.get_approval(approval_id)
        return approval.message_ts if approval is not None else None

    message_ts = await poll("the approval message", attached)
    bodies = [
        slack.block_actions_body(
            "approval_approve",
            approval_id,
            user_id=user,
            message_ts=message_ts,
            response_url=slack.response_url(f"r{number}-{user}"),
        )
        for user in clickers
    ]
    sent = time.time()
    acks = await asyncio.gather(*(post(http, urls[n % len(urls)], body) for n, body in enumerate(bodies)))
    # Every clicker is answered; the winner only after its run ended and released the service lock.
    answers = [(await slack.wait_for(f"response_url/r{number}-{user}", timeout=60))[0] for user in clickers]
    final = await store.get_approval(approval_id)
    assert final is not None
    started = [
        e
        for e in await store.audit_events(limit=len(clickers) * 2 + 50)
        if e.command == "approval started" and e.args.startswith(approval_id)
    ]
    to_start = (started[-1].ts.timestamp() - sent) if started and started[-1].ts else float("nan")
    winners = sum(1 for a in answers if a.params.get("text") == STARTED)
    state = final.state.value + ("" if winners == 1 else f", {winners} clickers told it starts")
    return len(started), to_start, acks, state


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--clicks", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    clickers = [f"U0B{n:04d}" for n in range(args.clicks)]
    slack = FakeSlack()
    slack.start()
    failed = False
    try:
        with (
            postgres_cluster(max_connections=300) as pg,
            redis_process() as redis,
            tempfile.TemporaryDirectory() as tmp,
        ):
            state_dsn, jobs_dsn = pg.dsn(await pg.create_database()), await create_jobs_db(pg, JOBS_SQL)
            redis_url = f"{redis}/0"
            inventory = Path(tmp) / "opsbot.yaml"
            inventory.write_text(
                f"roles:\n  operator: [{REQUESTER}]\n  approver: [{', '.join(clickers)}]\n"
                "services:\n  pipeline:\n    components:\n"
                f"      db: {{type: postgres, dsn: '{jobs_dsn}', timeout: 5, jobs: {{}}}}\n"
            )
            env = child_env(
                SLACK_BOT_TOKEN=TOKEN, SLACK_SIGNING_SECRET=SECRET, OPSBOT_SLACK_API_URL=slack.base_url,
                OPSBOT_CONFIG=str(inventory), OPSBOT_STATE_URL=state_dsn, OPSBOT_REDIS_URL=redis_url,
                OPSBOT_HOST="127.0.0.1", OPSBOT_LOG_LEVEL="WARNING", OPSBOT_LOG_FORMAT="json",
            )  # fmt: skip
            async with replicas(args.replicas, env, Path(tmp)) as urls:
                store = await open_state_store(state_dsn, default_path=Path(tmp) / "unused.sqlite3")
                connector = aiohttp.TCPConnector(limit=args.clicks * 2)
                try:
                    async with aiohttp.ClientSession(connector=connector) as http:
                        print(
                            f"approval race: {args.rounds} rounds of {args.clicks} concurrent signed Approve clicks "
                            f"over {args.replicas} `opsbot serve` replicas (PostgreSQL state, Redis locks)"
                        )
                        all_acks: list[float] = []
                        to_starts: list[float] = []
                        for number in range(args.rounds):
                            runs, to_start, acks, state = await one_round(
                                number, urls, clickers, slack, store, jobs_dsn, http
                            )
                            ok = runs == 1 and state == "succeeded"
                            failed |= not ok
                            all_acks += acks
                            to_starts.append(to_start)
                            print(
                                f"round {number + 1}: executions={runs} ({'ok' if ok else 'WRONG'}, {state})  "
                                f"first click -> run start {to_start * 1000:6.1f} ms  "
                                f"click ack p50={percentile(acks, 50) * 1000:6.1f} ms "
                                f"p99={percentile(acks, 99) * 1000:6.1f} ms"
                            )
                finally:
                    await store.close()
        print(summary("click ack, all rounds", all_acks))
        print(summary("first click -> run start", to_starts))
        print("executions: exactly 1 in every round" if not failed else "executions: NOT exactly 1 in some round")
    finally:
        slack.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
