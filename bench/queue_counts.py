"""How long does `/ops queue` take over 10 BullMQ queues, and does it grow with the number of jobs?

A private redis-server is filled with BullMQ's exact key layout (the one tests/services/test_queues.py
checks against the real library): per queue, job hashes and the `wait` list, `delayed`, `completed`
and `failed` sorted sets scored by finishedOn, a `meta` hash and an `events` stream capped as BullMQ
caps it. Then `/ops queue` runs through the real router (the console interface) again and again, first
with 10,000 jobs in all, then with 1,000,000. Target: under 200 ms, flat in the number of jobs.

    uv run python -m bench.queue_counts [--jobs 1000000] [--runs 30]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from bench._queues import now_ms, queue_bot, queue_inventory, write_jobs, write_queue_keys
from bench.common import summary
from bot.console import Console
from bot.logging import configure_logging
from services.redaction import Redactor
from tests.fixtures.servers import redis_process

QUEUES = 10
# What share of a queue's jobs are in each state.
SHARES = {"completed": 0.6, "failed": 0.2, "wait": 0.15, "delayed": 0.05}


async def fill(url: str, total: int) -> None:
    client = aioredis.from_url(url)
    await client.flushdb()
    now = now_ms()
    per_queue = total // QUEUES
    for q in range(QUEUES):
        base = f"bull:render{q}:"
        next_id = 1
        for state, share in SHARES.items():
            count = int(per_queue * share)
            await write_jobs(client, base, state, next_id, count, now_ms=now)
            next_id += count
        await write_queue_keys(client, base, "bullmq", per_queue)
    await client.aclose()


async def measure(url: str, runs: int, state_dir: Path) -> list[float]:
    names = [f"render{q}" for q in range(QUEUES)]
    seconds: list[float] = []
    async with queue_bot(queue_inventory(url, "bullmq", "bull", names), state_dir) as container:
        console = Console(container, None, out=io.StringIO())
        reply = await console.execute("queue render")
        assert reply.outcome == "ok" and reply.text.startswith(f"render queues: {QUEUES} queue(s)"), reply.text
        for _ in range(runs):
            started = time.perf_counter()
            reply = await console.execute("queue render")
            seconds.append(time.perf_counter() - started)
        assert reply.outcome == "ok", reply.text
    return seconds


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    configure_logging("console", "WARNING", Redactor())
    with redis_process() as base, tempfile.TemporaryDirectory() as tmp:
        url = f"{base}/0"
        for total in (10_000, args.jobs):
            started = time.perf_counter()
            await fill(url, total)
            client = aioredis.from_url(url)
            keys = await client.dbsize()
            memory = (await client.info("memory"))["used_memory_human"]
            await client.aclose()
            took = time.perf_counter() - started
            print(f"filled {total:,} jobs in {QUEUES} queues ({keys:,} keys, {memory}) in {took:.1f} s")
            seconds = await measure(url, args.runs, Path(tmp))
            print(summary(f"/ops queue, {total:,} jobs", seconds))


if __name__ == "__main__":
    asyncio.run(main())
