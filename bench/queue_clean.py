"""Cleaning 500,000 completed jobs: time, Redis round trips, and does the server stay responsive?

A private redis-server holds one queue, `render`, in BullMQ's exact key layout (bench/_queues.py): N completed
jobs finished over 8 days ago (every 100th with a `:logs` list), plus jobs that must be left alone — 10,000
completed within the last 7 days, 20,000 failed (old), 20,000 waiting, 5,000 delayed — a `meta` hash and a
full `events` stream. Then the product's path, through the real router and approval engine (the console
interface): `/ops queue clean render render completed --older-than 7d` by an operator (the plan: its id list
saved beside the approval), then `/ops approve <id>` by an approver (the run: observe, fingerprint, removal
in batches). Then the same for Bull 4's layout (no meta version, no events stream), by default at a smaller size.

Printed per phase (plan, run): wall time; jobs removed per second; Redis round trips (writes on the bot's
connections: a pipeline is one), top-level calls from INFO commandstats (EVALSHA, ZRANGEBYSCORE, …) and the
commands the server executed (INFO `total_commands_processed`, which counts the commands inside the Lua
scripts too); the longest single command from SLOWLOG (threshold 1 ms; target: under 50 ms — batches, not
one huge call); PING round trips from another process during both phases; peak RSS of this process; the
size of the plan's id list file. Then checks: every planned job gone with its logs, nothing else touched,
the key count down by exactly what was removed. Exits 1 if a check fails or a command took 50 ms or more.

    uv run python -m bench.queue_clean [--jobs 500000] [--bull-jobs 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection

from bench._queues import queue_bot, queue_inventory, write_jobs, write_queue_keys
from bench.common import ROOT, percentile
from bot.console import Console
from bot.logging import configure_logging
from services.approvals import plan_of
from services.redaction import Redactor
from tests.fixtures.servers import redis_process

QUEUE = "render"
REQUESTER, APPROVER = "U0BREQ1", "U0BAPP1"
ROLES = f"roles:\n  operator: [{REQUESTER}]\n  approver: [{APPROVER}]"
DAY_MS = 86_400_000
# Jobs that must be left alone: (state, count, finished how long ago).
UNTOUCHED = (("failed", 20_000, 8 * DAY_MS), ("wait", 20_000, 0), ("delayed", 5_000, 0), ("completed", 10_000, 0))
LOGS_EVERY = 100  # every 100th job has a `:logs` list
SLOW_US = 1_000  # SLOWLOG threshold
LIMIT_MS = 50.0  # the longest single command may not reach this
OWN = ("ping", "info", "slowlog", "config")  # the bench's own commands, not the bot's
TOP_LEVEL = ("evalsha", "eval", "zrangebyscore", "zrange", "zcount")  # the bot's commands the scripts never call
CHECK = 10_000  # keys per EXISTS when checking


# -- what the bot sends: writes on redis.asyncio connections (a pipeline is one write) ----------------


class RoundTrips:
    """Counts the writes of every redis.asyncio connection in this process; the bench's own reads of the
    server's figures go through the sync client, so between two readings only the bot's are counted."""

    def __init__(self) -> None:
        self.count = 0

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        original = AbstractConnection.send_packed_command

        async def send(conn: AbstractConnection, command: Any, check_health: bool = True) -> None:
            self.count += 1
            await original(conn, command, check_health)

        AbstractConnection.send_packed_command = send  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


@dataclass
class Reading:
    """The server's counters at one moment, and this process's round trips and peak RSS."""

    commands: int
    calls: dict[str, int]
    usec: dict[str, int]  # the server's time in each command
    trips: int
    at: float


@dataclass
class Phase:
    name: str
    seconds: float
    trips: int
    commands: int  # executed by the server, inside scripts too, without the bench's own
    calls: dict[str, int]  # top-level and inner, by command, without the bench's own
    busy: dict[str, float]  # seconds the server spent in each top-level command of the bot
    slowest: list[tuple[float, str]]  # (ms, command) from SLOWLOG, longest first
    slow_entries: int
    rss_mb: float
    extra: dict[str, str] = field(default_factory=dict)

    def lines(self, removed: int | None = None) -> list[str]:
        top = ", ".join(f"{name} {n:,}" for name, n in sorted(self.calls.items(), key=lambda kv: -kv[1])[:8])
        longest = f"{self.slowest[0][0]:.2f} ms ({self.slowest[0][1]})" if self.slowest else f"< {SLOW_US / 1000:g} ms"
        rate = f"  ({removed / self.seconds:,.0f} jobs/s)" if removed else ""
        return [
            f"  {self.name:<5} {self.seconds:8.2f} s{rate}",
            f"        round trips {self.trips:,}; commands executed {self.commands:,}; calls: {top}",
            "        server time in "
            + (", ".join(f"{name} {s:.2f} s" for name, s in self.busy.items()) or "its scripts and ranges: none"),
            f"        longest command {longest}; {self.slow_entries} command(s) over {SLOW_US / 1000:g} ms"
            + (f"; next: {', '.join(f'{ms:.2f} ms' for ms, _ in self.slowest[1:4])}" if len(self.slowest) > 1 else ""),
            f"        peak RSS of this process {self.rss_mb:.1f} MB"
            + "".join(f"; {k} {v}" for k, v in self.extra.items()),
        ]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Server:
    """The bench's own (sync) view of the server: counters and SLOWLOG."""

    def __init__(self, url: str, trips: RoundTrips) -> None:
        self.admin = redis.Redis.from_url(url, decode_responses=True)
        self.trips = trips
        self.admin.config_set("slowlog-log-slower-than", SLOW_US)
        self.admin.config_set("slowlog-max-len", 100_000)

    def read(self) -> Reading:
        stats = self.admin.info("stats")
        found = {k.removeprefix("cmdstat_"): v for k, v in self.admin.info("commandstats").items()}
        calls = {k: int(v["calls"]) for k, v in found.items()}
        usec = {k: int(v["usec"]) for k, v in found.items()}
        return Reading(int(stats["total_commands_processed"]), calls, usec, self.trips.count, time.perf_counter())

    def start(self) -> Reading:
        self.admin.slowlog_reset()
        return self.read()

    def phase(self, name: str, before: Reading) -> Phase:
        after = self.read()
        slow = self.admin.slowlog_get(100_000)
        calls = {k: n - before.calls.get(k, 0) for k, n in after.calls.items()}
        # The bench's own commands (its PINGs and INFOs: a command is counted once it has run, so both
        # deltas hold two INFOs) are not the bot's.
        own = sum(calls.get(k, 0) for k in OWN)
        calls = {k: n for k, n in calls.items() if n and k not in OWN}
        busy = {k: (after.usec[k] - before.usec.get(k, 0)) / 1e6 for k in TOP_LEVEL if k in calls}
        slowest = sorted(
            (
                (int(e["duration"]) / 1000, _command(e["command"]))
                for e in slow
                if not _command(e["command"]).startswith("slowlog")  # its own RESET
            ),
            reverse=True,
        )
        return Phase(
            name, after.at - before.at, after.trips - before.trips, after.commands - before.commands - own, calls,
            busy, slowest, len(slowest), peak_rss_mb(),
        )  # fmt: skip

    def close(self) -> None:
        self.admin.close()


def _command(raw: Any) -> str:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    words = text.split()
    return " ".join(words[:3])[:60].lower() if words else "?"


# -- a PING from another process every 5 ms: what any other client of this Redis sees ------------------


def probe(url: str) -> None:
    """`--probe URL`: PING until SIGTERM, then print the round trips (ms) as JSON."""
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    client = redis.Redis.from_url(url)
    client.ping()
    print("ready", flush=True)
    seconds: list[float] = []
    while not stop:
        started = time.perf_counter()
        client.ping()
        seconds.append(time.perf_counter() - started)
        time.sleep(0.005)
    print(json.dumps([s * 1000 for s in seconds]), flush=True)


@contextlib.asynccontextmanager
async def pinging(url: str) -> AsyncIterator[list[float]]:
    """Runs the probe process; the list is filled with its PING round trips (ms) on exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.queue_clean", "--probe", url, stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    assert proc.stdout is not None
    found: list[float] = []
    try:
        assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"ready"
        yield found
    finally:
        proc.terminate()
        out, _ = await proc.communicate()
        with contextlib.suppress(ValueError):
            found.extend(json.loads(out))


# -- one queue, one library ---------------------------------------------------------------------------


@dataclass
class Layout:
    base: str
    old: range  # the completed jobs to clean
    untouched: dict[str, range]  # state -> ids
    keys: int  # keys in the database after filling


async def fill(client: aioredis.Redis, library: str, jobs: int) -> Layout:
    await client.flushdb()
    base = f"bull:{QUEUE}:"
    now = int(time.time() * 1000)
    await write_jobs(client, base, "completed", 1, jobs, now_ms=now - 8 * DAY_MS, logs_every=LOGS_EVERY)
    untouched: dict[str, range] = {}
    first = jobs + 1
    for state, count, ago in UNTOUCHED:
        await write_jobs(client, base, state, first, count, now_ms=now - ago, logs_every=LOGS_EVERY)
        untouched["recent completed" if state == "completed" else state] = range(first, first + count)
        first += count
    await write_queue_keys(client, base, library, first - 1)
    return Layout(base, range(1, jobs + 1), untouched, int(await client.dbsize()))


async def missing(client: aioredis.Redis, keys: list[str]) -> int:
    """How many of ``keys`` do not exist."""
    present = 0
    for start in range(0, len(keys), CHECK):
        present += int(await client.exists(*keys[start : start + CHECK]))
    return len(keys) - present


async def verify(client: aioredis.Redis, layout: Layout, planned: list[str], removed: int) -> list[str]:
    """What is wrong after the run (nothing: an empty list)."""
    base, problems = layout.base, []
    expected = {str(i) for i in layout.old}
    if set(planned) != expected:
        problems.append(f"the plan listed {len(planned):,} ids, not the {len(expected):,} old completed jobs")
    if removed != len(planned):
        problems.append(f"the run says {removed:,} removed of {len(planned):,} planned")
    left = len(planned) - await missing(client, [base + i for i in planned])
    if left:
        problems.append(f"{left:,} planned job hash(es) still there")
    logged = [i for i in planned if int(i) % LOGS_EVERY == 0]
    left = len(logged) - await missing(client, [f"{base}{i}:logs" for i in logged])
    if left:
        problems.append(f"{left:,} planned job log list(s) still there")
    sizes = {
        "recent completed": await client.zcard(base + "completed"),
        "failed": await client.zcard(base + "failed"),
        "wait": await client.llen(base + "wait"),
        "delayed": await client.zcard(base + "delayed"),
    }
    for state, ids in layout.untouched.items():
        if sizes[state] != len(ids):
            problems.append(f"{state}: {sizes[state]:,} in the list/set, expected {len(ids):,}")
        gone = await missing(client, [base + str(i) for i in ids])
        gone += await missing(client, [f"{base}{i}:logs" for i in ids if i % LOGS_EVERY == 0])
        if gone:
            problems.append(f"{state}: {gone:,} key(s) of jobs that must stay are gone")
    keys = int(await client.dbsize())
    expected_keys = layout.keys - len(layout.old) - len(layout.old) // LOGS_EVERY
    if keys != expected_keys:
        problems.append(f"{keys:,} keys left, expected {expected_keys:,}")
    return problems


async def one_case(url: str, library: str, jobs: int, state_dir: Path, trips: RoundTrips) -> bool:
    client = aioredis.from_url(url, decode_responses=True)
    server = Server(url, trips)
    try:
        started = time.perf_counter()
        layout = await fill(client, library, jobs)
        memory = (await client.info("memory"))["used_memory_human"]
        print(
            f"\n{library}: {jobs:,} old completed jobs + {sum(len(r) for r in layout.untouched.values()):,} to leave "
            f"alone ({layout.keys:,} keys, {memory}), written in {time.perf_counter() - started:.1f} s; "
            f"peak RSS before planning {peak_rss_mb():.1f} MB"
        )
        text = queue_inventory(url, library, "bull", [QUEUE], roles=ROLES)
        async with queue_bot(text, state_dir) as container, pinging(url) as pings:
            requester = Console(container, REQUESTER, out=io.StringIO())
            approver = Console(container, APPROVER, out=io.StringIO())
            with trips.counting():
                before = server.start()
                asked = await requester.execute(f"queue clean render {QUEUE} completed --older-than 7d")
                plan_phase = server.phase("plan", before)
                if asked.approval_id is None:
                    print(f"  the plan was refused: {asked.text}")
                    return False
                before = server.start()
                ran = await approver.execute(f"approve {asked.approval_id}")
                run_phase = server.phase("run", before)
            approval = await container.store.get_approval(asked.approval_id)
            assert approval is not None
            plan = plan_of(approval)
            ref = str(plan.params["ids_ref"])
            list_file = state_dir / "plan-lists" / f"{ref}.json.gz"
            lists = container.deps.approvals.actions["queue clean"].lists  # type: ignore[attr-defined]
            loading = time.perf_counter()
            planned: list[str] = await lists.load(ref)
            load_seconds = time.perf_counter() - loading
        summary = approval.result.splitlines()[0] if approval.result else ran.text
        removed = int(summary.split()[1].replace(",", "")) if summary.startswith("Removed ") else 0
        plan_phase.extra["id list file"] = f"{list_file.stat().st_size / 1e6:.2f} MB ({len(planned):,} ids)"
        plan_phase.extra["loading it"] = f"{load_seconds * 1000:.0f} ms"
        if approval.started_at and approval.finished_at:
            run_phase.extra["started → finished"] = (
                f"{(approval.finished_at - approval.started_at).total_seconds():.2f} s"
            )
        print(f"  {approval.state.value}: {summary}")
        for line in [*plan_phase.lines(), *run_phase.lines(removed)]:
            print(line)
        if pings:
            print(
                f"  PING from another process every 5 ms during both: n={len(pings):,} "
                f"p50={percentile(pings, 50):.2f} ms p99={percentile(pings, 99):.2f} ms max={max(pings):.2f} ms "
                f"mean={statistics.fmean(pings):.2f} ms"
            )
        problems = await verify(client, layout, planned, removed)
        longest = max([ms for p in (plan_phase, run_phase) for ms, _ in p.slowest[:1]], default=0.0)
        if longest >= LIMIT_MS:
            problems.append(f"a single command took {longest:.1f} ms (limit {LIMIT_MS:g} ms)")
        if approval.state.value != "succeeded":
            problems.append(f"the approval ended {approval.state.value}")
        print("  checks: " + ("all planned jobs and their logs gone, nothing else touched, key count exact"
                              if not problems else "FAILED: " + "; ".join(problems)))  # fmt: skip
        return not problems
    finally:
        server.close()
        await client.aclose()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500_000, help="old completed jobs to clean (BullMQ)")
    parser.add_argument("--bull-jobs", type=int, default=100_000, help="the same for Bull 4 (0: skip)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe)
        return 0
    configure_logging("console", "WARNING", Redactor())
    trips = RoundTrips()
    ok = True
    print(f"load average before: {load_average()}")
    with redis_process() as base:
        url = f"{base}/0"
        for library, jobs in (("bullmq", args.jobs), ("bull", args.bull_jobs)):
            if jobs > 0:
                with tempfile.TemporaryDirectory() as tmp:
                    ok &= await one_case(url, library, jobs, Path(tmp), trips)
    print(f"\nload average after: {load_average()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
