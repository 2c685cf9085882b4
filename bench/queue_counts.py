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

from bench.common import summary
from bot.console import Console
from bot.container import build_container
from bot.logging import configure_logging
from bot.settings import Settings
from services.inventory import parse_inventory
from services.redaction import Redactor
from tests.fixtures.servers import redis_process

QUEUES = 10
CHUNK = 20_000  # jobs written per Lua call
# What share of a queue's jobs are in each state.
SHARES = {"completed": 0.6, "failed": 0.2, "wait": 0.15, "delayed": 0.05}
REASONS = ["ComfyUI timeout", "out of memory", "bad prompt", "upstream 502"]

# Writes jobs [first, first + count) of one state in BullMQ's layout, in one server-side loop.
FILL = r"""
local rcall = redis.call
local base, first, count, state, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
for i = first, first + count - 1 do
  local id = tostring(i)
  local ts = now - (first + count - i) * 10
  if state == "failed" then
    local reason = ARGV[6 + (i % 4)]
    rcall("HSET", base .. id, "name", "render", "data", "{}", "opts", "{}", "timestamp", ts,
          "processedOn", ts, "finishedOn", ts, "failedReason", reason, "attemptsMade", 1)
    rcall("ZADD", base .. "failed", ts, id)
  elseif state == "completed" then
    rcall("HSET", base .. id, "name", "render", "data", "{}", "opts", "{}", "timestamp", ts,
          "processedOn", ts, "finishedOn", ts, "returnvalue", '"done"', "attemptsMade", 1)
    rcall("ZADD", base .. "completed", ts, id)
  elseif state == "delayed" then
    rcall("HSET", base .. id, "name", "render", "data", "{}", "opts", "{}", "timestamp", ts, "delay", 3600000)
    rcall("ZADD", base .. "delayed", (now + 3600000) * 4096 + (i % 4096), id)
  else
    rcall("HSET", base .. id, "name", "render", "data", "{}", "opts", "{}", "timestamp", ts)
    rcall("LPUSH", base .. "wait", id)
  end
end
return count
"""


async def fill(url: str, total: int) -> None:
    client = aioredis.from_url(url)
    await client.flushdb()
    script = client.register_script(FILL)
    now = int(time.time() * 1000)
    per_queue = total // QUEUES
    for q in range(QUEUES):
        base = f"bull:render{q}:"
        await client.hset(base + "meta", mapping={"opts.maxLenEvents": 10000, "version": "bullmq:5.81.5"})
        await client.set(base + "id", per_queue)
        next_id = 1
        for state, share in SHARES.items():
            count = int(per_queue * share)
            for start in range(next_id, next_id + count, CHUNK):
                n = min(CHUNK, next_id + count - start)
                await script(args=[base, start, n, state, now, *REASONS])
            next_id += count
        pipe = client.pipeline(transaction=False)
        for i in range(10_000):  # the stream as BullMQ keeps it: ~10,000 newest events
            pipe.xadd(base + "events", {"event": "completed" if i % 4 else "failed", "jobId": str(i)})
        await pipe.execute()
    await client.aclose()


async def measure(url: str, runs: int, state_dir: Path) -> list[float]:
    names = ", ".join(f"render{q}" for q in range(QUEUES))
    text = f"""
services:
  render:
    components:
      redis: {{type: redis, url: "{url}", queues: {{library: bullmq, prefix: bull, names: [{names}]}}}}
"""
    settings = Settings(OPSBOT_STATE_DIR=str(state_dir), OPSBOT_CONFIG=str(state_dir / "unused.yaml"))
    loaded = parse_inventory(text, "bench", env={})
    seconds: list[float] = []
    async with build_container(settings, redactor=Redactor(), inventory=loaded) as container:
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
