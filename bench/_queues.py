"""Bull/BullMQ queues for the queue benchmarks: jobs written fast in the libraries' exact key layout
(the one tests/services/test_queues.py checks against the real libraries), and a bot to drive."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as aioredis

from bot.container import Container, build_container
from bot.settings import Settings
from services.inventory import parse_inventory
from services.redaction import Redactor

CHUNK = 20_000  # jobs written per Lua call (the filler's calls are big; the bot's are not)
REASONS = ["ComfyUI timeout", "out of memory", "bad prompt", "upstream 502"]
EVENTS = 10_000  # BullMQ's default events stream cap, as it keeps it

# Writes jobs [first, first + count) of one state, finished (or added) 10 ms apart up to `now`, in one
# server-side loop; every `logs_every`-th job (0: none) also gets a `:logs` list of two lines.
FILL = r"""
local rcall = redis.call
local base, first, count, state, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local logs_every = tonumber(ARGV[6])
for i = first, first + count - 1 do
  local id = tostring(i)
  local ts = now - (first + count - i) * 10
  if state == "failed" then
    local reason = ARGV[7 + (i % 4)]
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
  if logs_every > 0 and i % logs_every == 0 then
    rcall("RPUSH", base .. id .. ":logs", "started", "finished")
  end
end
return count
"""


async def write_jobs(
    client: aioredis.Redis, base: str, state: str, first: int, count: int, *, now_ms: int, logs_every: int = 0
) -> None:
    """Jobs ``first`` .. ``first + count - 1`` of ``state`` (completed, failed, delayed, wait) under ``base``
    (``bull:render:``), the newest finished at ``now_ms``."""
    script = client.register_script(FILL)
    for start in range(first, first + count, CHUNK):
        n = min(CHUNK, first + count - start)
        await script(args=[base, start, n, state, now_ms, logs_every, *REASONS])


async def write_queue_keys(client: aioredis.Redis, base: str, library: str, last_id: int) -> None:
    """The keys beside the jobs: the id counter, and for BullMQ its ``meta`` (with the version that
    says BullMQ wrote it) and an ``events`` stream as full as BullMQ keeps it. Bull has neither."""
    await client.set(base + "id", last_id)
    if library != "bullmq":
        return
    await client.hset(base + "meta", mapping={"opts.maxLenEvents": EVENTS, "version": "bullmq:5.81.5"})
    pipe = client.pipeline(transaction=False)
    for i in range(EVENTS):
        pipe.xadd(base + "events", {"event": "completed" if i % 4 else "failed", "jobId": str(i)})
    await pipe.execute()


def queue_inventory(url: str, library: str, prefix: str, names: list[str], *, roles: str = "") -> str:
    """An inventory with one service, ``render``, whose Redis holds the queues ``names``."""
    return f"""
{roles}
services:
  render:
    components:
      redis:
        type: redis
        url: "{url}"
        queues: {{library: {library}, prefix: {prefix}, names: [{", ".join(names)}]}}
"""


@contextlib.asynccontextmanager
async def queue_bot(inventory_text: str, state_dir: Path) -> AsyncIterator[Container]:
    """The bot's real container (router, approval engine, plan lists) over ``inventory_text``, its state
    (SQLite, plan lists) in ``state_dir``."""
    settings = Settings(OPSBOT_STATE_DIR=str(state_dir), OPSBOT_CONFIG=str(state_dir / "unused.yaml"))
    loaded = parse_inventory(inventory_text, "bench", env={})
    async with build_container(settings, redactor=Redactor(), inventory=loaded) as container:
        yield container


def now_ms() -> int:
    return int(time.time() * 1000)
