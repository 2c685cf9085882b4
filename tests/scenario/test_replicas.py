"""Two real `opsbot serve` replicas running at the same time on one PostgreSQL state store.

A schedule fires every minute; both replicas race for every fire time, and each fire time runs
(probes, posts to the ops channel, is recorded) exactly once, none skipped. A replica SIGKILLed in
the middle of a run does not take the next fire time with it: the other replica runs it.

A minute is the shortest interval a schedule may have (``every_minutes >= 1``) and ``serve`` looks
for due schedules every 20 s, so the replicas are launched through a few lines (``LAUNCHER``) that
give the scheduler a clock running ``SPEED`` times faster than real time, shared by both
replicas, and a short pass interval, then run ``bot.cli.main(["serve"])`` as usual. Everything
else (inventory, PostgreSQL state, the claims that make a fire time run once, Slack) is the
production path; nothing in the product knows about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from tests.fixtures.servers import free_port
from tests.fixtures.slack import FakeSlack
from tests.fixtures.wait import wait_until

ROOT = Path(__file__).parents[2]
SPEED = 20.0  # scheduler seconds per real second: the one-minute schedule fires every 3 s
PASS_EVERY = 0.1  # real seconds between two scheduler passes (serve's own is 20 s)
MINUTE = timedelta(minutes=1)
CHANNEL = "C0REPLICAS"
SECRET = "signing-secret-for-replicas"
# What a replica logs for a fire time it tried: it ran it, or another replica had claimed it.
TOOK_PART = ("schedule_started", "schedule_taken_elsewhere")

LAUNCHER = """
import functools, os, sys, time
from datetime import UTC, datetime

import bot.serve
from bot.cli import main
from bot.scheduler import build_scheduler

origin, speed = float(os.environ["TEST_CLOCK_ORIGIN"]), float(os.environ["TEST_CLOCK_SPEED"])


def clock():
    return datetime.fromtimestamp(origin + (time.time() - origin) * speed, UTC)


bot.serve.build_scheduler = functools.partial(build_scheduler, clock=clock)
bot.serve.SCHEDULE_EVERY = float(os.environ["TEST_SCHEDULE_EVERY"])
sys.exit(main(["serve"]))
"""

INVENTORY = """
ops_channel: {channel}
alerts: {{enabled: false}}
schedules:
  - {{name: heartbeat, every_minutes: 1, grace_minutes: 1, command: "health shop"}}
services:
  shop:
    components:
      api: {{type: http, url: "{url}", readiness: null, detail: null, timeout: 8}}
"""


class Target:
    """The app the scheduled `health shop` probes; while ``gate`` is clear its answers hang."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = 0

    async def healthz(self, request: web.Request) -> web.Response:
        if not self.gate.is_set():
            self.held += 1
            await self.gate.wait()
        return web.json_response({"status": "ok"})


@contextlib.asynccontextmanager
async def target_app() -> AsyncIterator[tuple[Target, str]]:
    target = Target()
    app = web.Application()
    app.router.add_get("/healthz", target.healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield target, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        target.gate.set()  # let a held probe answer so the runner can close
        await runner.cleanup()


@dataclass
class Replica:
    name: str
    proc: asyncio.subprocess.Process
    base: str
    log: Path

    def events(self, event: str) -> list[dict[str, Any]]:
        """The replica's JSON log lines for ``event``."""
        lines = self.log.read_text(errors="replace").splitlines()
        found = [json.loads(line) for line in lines if line.startswith("{")]
        return [line for line in found if line.get("event") == event]

    def fire_times(self, event: str) -> set[str]:
        return {str(line.get("fire_time")) for line in self.events(event)}

    def tail(self, chars: int = 3000) -> str:
        return f"--- {self.name} log ---\n" + self.log.read_text(errors="replace")[-chars:]


async def start_replica(name: str, env: dict[str, str], log_dir: Path) -> Replica:
    port = free_port()
    log = log_dir / f"{name}.log"
    with log.open("wb") as sink:  # a file, so a chatty replica never blocks on a full pipe
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LAUNCHER, env=env | {"OPSBOT_PORT": str(port)}, cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL, stderr=sink,
        )  # fmt: skip
    return Replica(name, proc, f"http://127.0.0.1:{port}", log)


async def until_ready(replica: Replica, http: aiohttp.ClientSession) -> None:
    async def ready() -> bool:
        assert replica.proc.returncode is None, (
            f"{replica.name} exited with {replica.proc.returncode}\n{replica.tail()}"
        )
        with contextlib.suppress(aiohttp.ClientConnectionError):
            async with http.get(f"{replica.base}/ready") as resp:
                return resp.status == 200
        return False

    await wait_until(ready, f"{replica.name} answers /ready", timeout=30)


async def runs(dsn: str) -> list[asyncpg.Record]:
    """The state store's run records of the schedule, oldest fire time first."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return list(
            await conn.fetch(
                "SELECT fire_at, holder, finished_at, outcome FROM schedule_runs"
                " WHERE name = 'heartbeat' ORDER BY fire_at"
            )
        )
    finally:
        await conn.close()


def posts(fake_slack: FakeSlack) -> list[str]:
    return [
        str(c.params.get("text")) for c in fake_slack.calls_to("chat.postMessage") if c.params.get("channel") == CHANNEL
    ]


async def test_two_replicas_at_once_run_each_fire_time_once_and_survive_a_kill_mid_run(
    fake_slack: FakeSlack, tmp_path: Path, pg_dsn: str
) -> None:
    origin = time.time()

    def scheduler_now() -> datetime:
        return datetime.fromtimestamp(origin + (time.time() - origin) * SPEED, UTC)

    async with target_app() as (target, url):
        config = tmp_path / "opsbot.yaml"
        config.write_text(INVENTORY.format(channel=CHANNEL, url=url))
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "OPSBOT_", "TEST_CLOCK"))}
        env = base_env | {
            "SLACK_BOT_TOKEN": "xoxb-replicas",
            "SLACK_SIGNING_SECRET": SECRET,
            "OPSBOT_SLACK_API_URL": fake_slack.base_url,
            "OPSBOT_CONFIG": str(config),
            "OPSBOT_STATE_URL": pg_dsn,
            "OPSBOT_HOST": "127.0.0.1",
            "OPSBOT_LOG_FORMAT": "json",
            "TEST_CLOCK_ORIGIN": repr(origin),
            "TEST_CLOCK_SPEED": repr(SPEED),
            "TEST_SCHEDULE_EVERY": repr(PASS_EVERY),
        }
        replicas: list[Replica] = []
        try:
            for name in ("a", "b"):
                (tmp_path / name).mkdir()
                replicas.append(await start_replica(name, env | {"OPSBOT_STATE_DIR": str(tmp_path / name)}, tmp_path))
            async with aiohttp.ClientSession() as http:
                await asyncio.gather(*(until_ready(r, http) for r in replicas))
            both_up = scheduler_now()

            # Three fire times after both replicas were up, each finished: both raced for it.
            async def three_finished() -> list[asyncpg.Record]:
                done = [r for r in await runs(pg_dsn) if r["fire_at"] > both_up and r["finished_at"] is not None]
                return done[:3] if len(done) >= 3 else []

            raced = await wait_until(three_finished, "three fire times finish with both replicas up", timeout=30)
            for row in raced:
                fire = row["fire_at"].isoformat()

                def took_part(fire: str = fire) -> list[str]:
                    seen = [r.name for r in replicas for e in TOOK_PART if fire in r.fire_times(e)]
                    return seen if len(set(seen)) == 2 else []

                # The loser may look a moment after the winner has finished.
                await wait_until(took_part, f"both replicas try {fire}", timeout=10)
                ran = [r.name for r in replicas if fire in r.fire_times("schedule_started")]
                assert len(ran) == 1, f"{fire} started on {ran}\n" + "\n".join(r.tail() for r in replicas)
                assert sorted(took_part()) == ["a", "b"], f"{fire}: {took_part()}"
                assert "Health of shop: healthy" in row["outcome"], row["outcome"]

            # The next probe hangs: the replica running that fire time is killed mid-run.
            target.gate.clear()
            await wait_until(lambda: target.held, "a scheduled probe reaches the held app", timeout=30)
            killed_fire = max(r["fire_at"] for r in await runs(pg_dsn) if r["finished_at"] is None)
            [victim] = [r for r in replicas if killed_fire.isoformat() in r.fire_times("schedule_started")]
            [survivor] = [r for r in replicas if r is not victim]
            victim.proc.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(victim.proc.wait(), 10) == -signal.SIGKILL
            target.gate.set()

            # The next fire time is not lost: the survivor runs it.
            next_fire = killed_fire + MINUTE

            async def next_finished() -> list[asyncpg.Record]:
                return [r for r in await runs(pg_dsn) if r["fire_at"] == next_fire and r["finished_at"] is not None]

            await wait_until(next_finished, f"the survivor runs {next_fire.isoformat()}", timeout=30)
            assert next_fire.isoformat() in survivor.fire_times("schedule_started"), survivor.tail()
            # Stopped as a deployment would: a run in flight finishes and is recorded first.
            survivor.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(survivor.proc.wait(), 30) == 0, survivor.tail()
        finally:
            for replica in replicas:
                if replica.proc.returncode is None:
                    replica.proc.kill()
                    await replica.proc.wait()

    records = await runs(pg_dsn)
    fire_times = [r["fire_at"] for r in records]
    # None missed and none twice: one record per minute from the first fire time to the last.
    assert fire_times == [fire_times[0] + i * MINUTE for i in range(len(fire_times))], fire_times
    assert len(fire_times) >= 5
    # The killed run stays claimed and unfinished (a fire time runs at most once, never again);
    # every other one finished and posted once to the ops channel.
    assert [r["fire_at"] for r in records if r["finished_at"] is None] == [killed_fire]
    finished = [r for r in records if r["finished_at"] is not None]
    assert all("Health of shop: healthy" in r["outcome"] for r in finished), [r["outcome"] for r in finished]
    texts = posts(fake_slack)
    assert len(texts) == len(finished), texts
    assert all("Health of shop: healthy" in text for text in texts), texts
