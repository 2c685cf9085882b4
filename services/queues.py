"""Bull (4.x) and BullMQ (5.x, 6.x) job queues on Redis: counts, health, and removal/retry of exact job ids.

The key layout and the per-job semantics are taken from each library's own Lua scripts at the
versions pinned in tests/fixtures/node/package-lock.json (bull 4.16.5: lib/commands/*.lua; bullmq
5.81.5 and 6.7.0: src/commands/*.lua), and the tests check them against jobs written by those libraries:

- a queue's keys are ``<prefix>:<queue>:<part>``; a job is the hash ``<prefix>:<queue>:<id>`` with
  its log list ``…:<id>:logs``;
- lists: ``wait``, ``active``, ``paused`` (LPUSH at the head, workers take from the tail, so the
  oldest waiting job is the last element); sorted sets: ``delayed``, ``completed`` and ``failed``
  (scored by ``finishedOn``, ms), BullMQ's ``prioritized`` and ``waiting-children``;
- paused: Bull sets the ``meta-paused`` key (and ``paused`` in ``meta``); BullMQ sets ``paused`` in
  the ``meta`` hash; Bull and BullMQ 5 move waiting jobs to the ``paused`` list, BullMQ 6 keeps them
  in ``wait`` (the ``meta`` flag alone says paused; its resume moves a ``paused`` list left by 5 back
  to ``wait``). Both BullMQ majors share one ``library: bullmq``: the scripts that move jobs read the
  major from ``meta``'s ``version`` (``bullmq:6.7.0``) at run time;
- BullMQ 5 may leave a deprecated marker (``0:…``) at the tail of ``wait``: not a job;
- BullMQ logs every transition to the ``events`` stream (ids are ms timestamps); Bull has none.

Nothing here reads a whole list or set: counts are LLEN/ZCARD, samples are bounded ranges.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.errors import CommandError
from services.inventory import Inventory, QueueSettings, RedisComponent
from services.probes.redis import redis_problem
from services.redaction import Redactor

Library = Literal["bull", "bullmq"]
Finished = Literal["completed", "failed"]

QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Every state, in the order they are shown, and the key that holds it.
STATE_KEYS: dict[str, str] = {
    "waiting": "wait",
    "active": "active",
    "delayed": "delayed",
    "prioritized": "prioritized",
    "waiting-children": "waiting-children",
    "paused": "paused",
    "failed": "failed",
    "completed": "completed",
}
LISTS = frozenset({"waiting", "active", "paused"})
# Bull keeps prioritized jobs in `wait` (its `priority` set only orders them) and has no flows.
STATES: dict[Library, tuple[str, ...]] = {
    "bull": ("waiting", "active", "delayed", "paused", "failed", "completed"),
    "bullmq": tuple(STATE_KEYS),
}
RATE_WINDOW_MS = 15 * 60_000  # jobs finished per minute, averaged over this window
EVENTS_READ = 1_000  # newest stream entries read for the rate (a busier window: rate over their span)
REASON_SAMPLE = 200  # newest failed jobs whose failedReason is grouped
TOP_REASONS = 5
DISCOVER_SCANS = 200  # SCAN calls (COUNT 1000) at most when discovering queues
DISCOVER_MAX = 100  # queues at most
BATCH = 500  # job ids per Lua call: each call stays well under a few ms on the server
PAGE = 10_000  # ids per ZRANGEBYSCORE page when planning


@dataclass(frozen=True)
class QueueRef:
    """One queue: which library wrote it, its key prefix and its name."""

    library: Library
    prefix: str
    name: str

    @property
    def base(self) -> str:
        """The prefix of every key of this queue, job hashes included: ``bull:images:``."""
        return f"{self.prefix}:{self.name}:"

    def key(self, part: str) -> str:
        return self.base + part


@dataclass(frozen=True)
class QueueStatus:
    """What `/ops queue` shows for one queue."""

    ref: QueueRef
    counts: dict[str, int]  # state -> jobs, only the states the library has
    paused: bool
    oldest_waiting_seconds: float | None
    finished_per_minute: float
    failed_per_minute: float
    rate_capped: bool  # the window held more events than were read: the rate is over the newest ones' span
    reasons: list[tuple[str, int]]  # (failedReason, jobs) among the sampled failed jobs, most first
    reasons_sampled: int

    @property
    def failure_share(self) -> float | None:
        """Failed among finished over the rate window, 0..1; None when nothing finished."""
        return self.failed_per_minute / self.finished_per_minute if self.finished_per_minute else None


@dataclass(frozen=True)
class QueueActivity:
    """What a digest says of one queue: the jobs that failed in a window, its oldest waiting job, paused."""

    ref: QueueRef
    failed: int  # jobs in `failed` whose finishedOn (its score, ms) falls in the window
    oldest_waiting_seconds: float | None
    paused: bool


@dataclass(frozen=True)
class BatchResult:
    """What a removal or retry did: the ids it handled, and the planned ids it left alone."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class QueueRunFailed(CommandError):
    """Redis failed part-way through a run: says what was done, what may have been, what was not."""

    def __init__(self, message: str, done: BatchResult) -> None:
        super().__init__(message, outcome="error")
        self.done = done


def check_queue_name(name: str) -> str:
    """The name, or a refusal of wildcards, path characters and other key-breaking text."""
    if not QUEUE_NAME.match(name):
        raise CommandError(
            "A queue name is letters, digits, `.`, `_` and `-` (at most 100, no wildcards, colons or slashes)."
        )
    return name


def parse_age(text: str, *, most_days: int = 365) -> int:
    """``7d``, ``12h``, ``30m`` → milliseconds; a refusal outside 1 minute .. ``most_days`` days."""
    match = re.fullmatch(r"(\d{1,6})\s*(m|min|h|d)", text.strip().lower())
    if match is None:
        raise CommandError("`--older-than` is a number of minutes, hours or days, like `30m`, `12h` or `7d`.")
    value = int(match.group(1))
    unit = {"m": 60_000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}[match.group(2)]
    ms = value * unit
    if not 60_000 <= ms <= most_days * 86_400_000:
        raise CommandError(f"`--older-than` must be between 1 minute and {most_days} days.")
    return ms


def _marker(item: Any) -> bool:
    """BullMQ 5's deprecated wait-list marker (``0:<ts>``), which is not a job."""
    return isinstance(item, str) and item.startswith("0:")


def _reason(text: str | None) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else "(no reason given)"
    return line if len(line) <= 120 else line[:119] + "…"


def _problem(exc: BaseException, timeout: float, redactor: Redactor | None) -> str:
    """Why Redis did not answer, as a phrase without the URL's password (the health probe's words)."""
    return redis_problem(exc, timeout, redactor).removeprefix("Redis error: ")


# -- the removal and retry scripts -------------------------------------------------------------------

# Where a BullMQ job that becomes waiting again goes (a retried job, a parent whose last child was removed),
# for both majors. BullMQ 5.81.5 includes/getTargetQueueList.lua: to `paused` while `meta` says paused.
# BullMQ 6.7.0 dropped it: moveJobsToWait-8, includes/{moveParentToWait,removeParentDependencyKey}.lua push
# to `wait` always and ask includes/isQueuePausedOrMaxed.lua only whether to add the worker marker (its
# pause-7.lua no longer RENAMEs wait to paused). The layout is that of the major in `meta`'s `version`,
# which every Queue of either major writes on opening (classes/queue.js metaValues: "bullmq:6.7.0"),
# read in the script so that it holds for the batch. No version, or another library's (BullMQ Pro's
# numbers are not BullMQ's): 5's layout, the one both read back: 6.7.0's resume moves a `paused` list
# into `wait`, whereas 5.81.5's resume RENAMEs `paused` over `wait`, dropping jobs pushed there.
_BULLMQ_LAYOUT = r"""
local rcall = redis.call
local function bullmqMajor(queueMetaKey)
  local version = rcall("HGET", queueMetaKey, "version")
  return tonumber(string.match(version or "", "^bullmq:(%d+)%.") or "5") or 5
end
local function getTargetQueueList(queueMetaKey, activeKey, waitKey, pausedKey)
  local queueAttributes = rcall("HMGET", queueMetaKey, "paused", "concurrency")
  if queueAttributes[1] then
    if bullmqMajor(queueMetaKey) >= 6 then return waitKey, true end
    return pausedKey, true
  else
    if queueAttributes[2] then
      local activeCount = rcall("LLEN", activeKey)
      if activeCount >= tonumber(queueAttributes[2]) then return waitKey, true else return waitKey, false end
    end
  end
  return waitKey, false
end
"""

# Per job, what BullMQ's cleanJobsInSet does to a finished job (cleanSet -> removeJob(job, hard=true,
# prefix, removeDeduplicationKey=true)), restricted to the planned ids that are still in the set and no
# newer than the plan's cutoff. The helper functions are BullMQ's own (MIT), copied from 5.81.5's
# src/commands/includes/{removeJobKeys,removeParentDependencyKey,removeDeduplicationKeyIfNeededOnRemoval,
# addJobInTargetList,addBaseMarkerIfNeeded,destructureJobKey}.lua; in 6.7.0 cleanJobsInSet-3, cleanSet,
# removeJob and these are the same but for the parent's target list (getTargetQueueList above).
#   KEYS[1] the state set, KEYS[2] the events stream; ARGV[1] the job key prefix, ARGV[2] the cutoff score,
#   ARGV[3..] job ids.  Returns the ids removed.
BULLMQ_REMOVE = (
    _BULLMQ_LAYOUT
    + r"""
local function getJobIdFromKey(jobKey) return string.match(jobKey, ".*:(.*)") end
local function getJobKeyPrefix(jobKey, jobId) return string.sub(jobKey, 0, #jobKey - #jobId) end
local function removeJobKeys(jobKey)
  return rcall("DEL", jobKey, jobKey .. ':logs', jobKey .. ':dependencies',
    jobKey .. ':processed', jobKey .. ':failed', jobKey .. ':unsuccessful')
end
local function addBaseMarkerIfNeeded(markerKey, isPausedOrMaxed)
  if not isPausedOrMaxed then rcall("ZADD", markerKey, 0, "0") end
end
local function _moveParentToWait(parentPrefix, parentId, emitEvent)
  local parentTarget, isPausedOrMaxed = getTargetQueueList(parentPrefix .. "meta", parentPrefix .. "active",
    parentPrefix .. "wait", parentPrefix .. "paused")
  rcall("RPUSH", parentTarget, parentId)
  addBaseMarkerIfNeeded(parentPrefix .. "marker", isPausedOrMaxed)
  if emitEvent then
    rcall("XADD", parentPrefix .. "events", "*", "event", "waiting", "jobId", parentId, "prev", "waiting-children")
  end
end
local function removeParentDependencyKey(jobKey, hard, parentKey, baseKey, debounceId)
  if parentKey then
    local parentDependenciesKey = parentKey .. ":dependencies"
    local result = rcall("SREM", parentDependenciesKey, jobKey)
    if result > 0 then
      local pendingDependencies = rcall("SCARD", parentDependenciesKey)
      if pendingDependencies == 0 then
        local parentId = getJobIdFromKey(parentKey)
        local parentPrefix = getJobKeyPrefix(parentKey, parentId)
        local numRemovedElements = rcall("ZREM", parentPrefix .. "waiting-children", parentId)
        if numRemovedElements == 1 then
          if hard then
            if parentPrefix == baseKey then
              removeParentDependencyKey(parentKey, hard, nil, baseKey, nil)
              removeJobKeys(parentKey)
              if debounceId then rcall("DEL", parentPrefix .. "de:" .. debounceId) end
            else
              _moveParentToWait(parentPrefix, parentId)
            end
          else
            _moveParentToWait(parentPrefix, parentId, true)
          end
        end
      end
      return true
    end
  else
    local parentAttributes = rcall("HMGET", jobKey, "parentKey", "deid")
    local missedParentKey = parentAttributes[1]
    if ((type(missedParentKey) == "string") and missedParentKey ~= "" and (rcall("EXISTS", missedParentKey) == 1)) then
      local parentDependenciesKey = missedParentKey .. ":dependencies"
      local result = rcall("SREM", parentDependenciesKey, jobKey)
      if result > 0 then
        local pendingDependencies = rcall("SCARD", parentDependenciesKey)
        if pendingDependencies == 0 then
          local parentId = getJobIdFromKey(missedParentKey)
          local parentPrefix = getJobKeyPrefix(missedParentKey, parentId)
          local numRemovedElements = rcall("ZREM", parentPrefix .. "waiting-children", parentId)
          if numRemovedElements == 1 then
            if hard then
              if parentPrefix == baseKey then
                removeParentDependencyKey(missedParentKey, hard, nil, baseKey, nil)
                removeJobKeys(missedParentKey)
                if parentAttributes[2] then rcall("DEL", parentPrefix .. "de:" .. parentAttributes[2]) end
              else
                _moveParentToWait(parentPrefix, parentId)
              end
            else
              _moveParentToWait(parentPrefix, parentId, true)
            end
          end
        end
        return true
      end
    end
  end
  return false
end
local function removeDeduplicationKeyIfNeededOnRemoval(prefixKey, jobId, deduplicationId)
  if deduplicationId then
    local deduplicationKey = prefixKey .. "de:" .. deduplicationId
    local currentJobId = rcall('GET', deduplicationKey)
    if currentJobId and currentJobId == jobId then
      rcall("DEL", deduplicationKey)
      rcall("DEL", prefixKey .. "dn:" .. deduplicationId)
    end
  end
end

local setKey = KEYS[1]
local prefix = ARGV[1]
local cutoff = tonumber(ARGV[2])
local removed = {}
for i = 3, #ARGV do
  local jobId = ARGV[i]
  local score = rcall("ZSCORE", setKey, jobId)
  if score and tonumber(score) <= cutoff then
    local jobKey = prefix .. jobId
    removeParentDependencyKey(jobKey, true, nil, prefix)
    removeDeduplicationKeyIfNeededOnRemoval(prefix, jobId, rcall("HGET", jobKey, "deid"))
    removeJobKeys(jobKey)
    rcall("ZREM", setKey, jobId)
    removed[#removed + 1] = jobId
  end
end
if #removed > 0 then
  -- One event per batch, trimmed like the library's own events (a 500,000-job clean adds 1,000 of them).
  local maxEvents = rcall("HGET", prefix .. "meta", "opts.maxLenEvents") or 10000
  rcall("XADD", KEYS[2], "MAXLEN", "~", maxEvents, "*", "event", "cleaned", "count", #removed)
end
return removed
"""
)

# Per job, what Bull 4.16.5's cleanJobsInSet does to a completed or failed job: skip it while locked,
# else ZREM it from the set and from `priority`, DEL the job hash and its logs, and drop its rate-limiter
# index entry. Only the planned ids still in the set and no newer than the cutoff.
#   KEYS[1] the state set, KEYS[2] `priority`, KEYS[3] the limiter key; ARGV as above.
BULL_REMOVE = r"""
local rcall = redis.call
local setKey = KEYS[1]
local prefix = ARGV[1]
local cutoff = tonumber(ARGV[2])
local limiterIndexTable = KEYS[3] .. ":index"
local removed = {}
for i = 3, #ARGV do
  local jobId = ARGV[i]
  local score = rcall("ZSCORE", setKey, jobId)
  local jobKey = prefix .. jobId
  if score and tonumber(score) <= cutoff and rcall("EXISTS", jobKey .. ":lock") == 0 then
    rcall("ZREM", setKey, jobId)
    rcall("ZREM", KEYS[2], jobId)
    rcall("DEL", jobKey)
    rcall("DEL", jobKey .. ":logs")
    local limitedSetKey = rcall("HGET", limiterIndexTable, jobId)
    if limitedSetKey then
      rcall("SREM", limitedSetKey, jobId)
      rcall("HDEL", limiterIndexTable, jobId)
    end
    removed[#removed + 1] = jobId
  end
end
return removed
"""

# A queue's health in one read-only call, so that no reply carries thousands of entries to parse:
# the failedReason of the newest ARGV[4] failed jobs, and the jobs finished since ARGV[2] (ms) —
# for BullMQ the `completed`/`failed` events among the newest ARGV[3] entries of its stream (with
# the time of the oldest entry read, when the window holds more), for Bull ZCOUNTs by finishedOn.
#   KEYS[1] failed, KEYS[2] events (BullMQ) or completed (Bull); ARGV[1] the job key prefix,
#   ARGV[5] the library.  Returns {completed, failed, entries read, oldest entry id, {reasons}}.
QUEUE_HEALTH = r"""
local reasons = {}
for i, id in ipairs(redis.call("ZREVRANGE", KEYS[1], 0, tonumber(ARGV[4]) - 1)) do
  reasons[i] = redis.call("HGET", ARGV[1] .. id, "failedReason") or ""
end
local completed, failed, read, oldest = 0, 0, 0, ""
if ARGV[5] == "bullmq" then
  local entries = redis.call("XREVRANGE", KEYS[2], "+", ARGV[2], "COUNT", tonumber(ARGV[3]))
  read = #entries
  for _, entry in ipairs(entries) do
    local fields = entry[2]
    for k = 1, #fields, 2 do
      if fields[k] == "event" then
        if fields[k + 1] == "completed" then completed = completed + 1
        elseif fields[k + 1] == "failed" then failed = failed + 1 end
        break
      end
    end
  end
  if read > 0 then oldest = entries[read][1] end
else
  completed = redis.call("ZCOUNT", KEYS[2], ARGV[2], "+inf")
  failed = redis.call("ZCOUNT", KEYS[1], ARGV[2], "+inf")
end
return {completed, failed, read, oldest, reasons}
"""

# What a digest reads of one queue, read-only in one call. Both libraries score `failed` by finishedOn (ms):
# bull 4.16.5 lib/commands/moveToFinished-9.lua:74 `rcall("ZADD", targetSet, timestamp, ARGV[1])` with
# ARGV[2] = job.finishedOn = Date.now() (lib/job.js:332); bullmq 5.81.5 commands/moveToFinished-14.lua:172
# `rcall("ZADD", targetSet, timestamp, jobId)` with ARGV[2] = Date.now() (classes/scripts.js:699); the same
# line in bullmq 6.7.0 (moveToFinished-14.lua:172, classes/redis-queue-backend.js:988).
#   KEYS[1] failed, KEYS[2] wait, KEYS[3] paused, KEYS[4] meta, KEYS[5] meta-paused; ARGV[1] the job key
#   prefix, ARGV[2] the window's start (exclusive, ms), ARGV[3] its end (ms).
#   Returns {failed in the window, the oldest waiting job's timestamp or "", meta paused, meta-paused}.
QUEUE_ACTIVITY = r"""
local failed = redis.call("ZCOUNT", KEYS[1], "(" .. ARGV[2], ARGV[3])
local tail = false
for _, key in ipairs({KEYS[2], KEYS[3]}) do
  local items = redis.call("LRANGE", key, -2, -1)
  for i = #items, 1, -1 do
    if string.sub(items[i], 1, 2) ~= "0:" then tail = items[i] break end
  end
  if tail then break end
end
local stamp = ""
if tail then stamp = redis.call("HGET", ARGV[1] .. tail, "timestamp") or "" end
return {failed, stamp, redis.call("HEXISTS", KEYS[4], "paused"), redis.call("EXISTS", KEYS[5])}
"""

# BullMQ's moveJobsToWait-8 (Queue.retryJobs({state: 'failed'})), for exactly the planned ids still in
# `failed`: clear finishedOn/processedOn/failedReason, log a `waiting` event (prev failed), move them to the
# target list (5.81.5: wait, or paused while paused; 6.7.0: wait), and add the marker that wakes workers.
# 6.7.0 also puts a retried child of a flow back among its parent's dependencies
# (includes/moveChildBackToParentDependencies.lua, copied); 5.81.5's moveJobsToWait does not.
#   KEYS: failed, events, wait, paused, meta, active, marker; ARGV[1] the job key prefix, ARGV[2..] ids.
BULLMQ_RETRY = (
    _BULLMQ_LAYOUT
    + r"""
local function moveChildBackToParentDependencies(jobKey, prevState)
  local parentKey = rcall("HGET", jobKey, "parentKey")
  if parentKey and rcall("EXISTS", parentKey) == 1 then
    if prevState == "failed" then
      if rcall("ZREM", parentKey .. ":unsuccessful", jobKey) == 1 or
        rcall("HDEL", parentKey .. ":failed", jobKey) == 1 then
        rcall("SADD", parentKey .. ":dependencies", jobKey)
      end
    else
      if rcall("HDEL", parentKey .. ":processed", jobKey) == 1 then
        rcall("SADD", parentKey .. ":dependencies", jobKey)
      end
    end
  end
end
local function getOrSetMaxEvents(metaKey)
  local maxEvents = rcall("HGET", metaKey, "opts.maxLenEvents")
  if not maxEvents then
    maxEvents = 10000
    rcall("HSET", metaKey, "opts.maxLenEvents", maxEvents)
  end
  return maxEvents
end
local target, isPausedOrMaxed = getTargetQueueList(KEYS[5], KEYS[6], KEYS[3], KEYS[4])
local backToParent = bullmqMajor(KEYS[5]) >= 6
local moved = {}
for i = 2, #ARGV do
  local jobId = ARGV[i]
  if rcall("ZSCORE", KEYS[1], jobId) then
    local jobKey = ARGV[1] .. jobId
    rcall("HDEL", jobKey, "finishedOn", "processedOn", "failedReason")
    if backToParent then moveChildBackToParentDependencies(jobKey, "failed") end
    moved[#moved + 1] = jobId
  end
end
if #moved > 0 then
  local maxEvents = getOrSetMaxEvents(KEYS[5])
  for _, jobId in ipairs(moved) do
    rcall("XADD", KEYS[2], "MAXLEN", "~", maxEvents, "*", "event", "waiting", "jobId", jobId, "prev", "failed")
  end
  rcall("ZREM", KEYS[1], unpack(moved))
  rcall("LPUSH", target, unpack(moved))
  if not isPausedOrMaxed then rcall("ZADD", KEYS[7], 0, "0") end
end
return moved
"""
)

# Bull 4.16.5's retryJobs, for exactly the planned ids still in `failed`: clear finishedOn/processedOn/
# failedReason and LPUSH them to `wait`, or to `paused` while the queue is paused (`meta-paused`).
#   KEYS: failed, wait, meta-paused, paused; ARGV[1] the job key prefix, ARGV[2..] ids.
BULL_RETRY = r"""
local rcall = redis.call
local target
if rcall("EXISTS", KEYS[3]) ~= 1 then target = KEYS[2] else target = KEYS[4] end
local moved = {}
for i = 2, #ARGV do
  local jobId = ARGV[i]
  if rcall("ZSCORE", KEYS[1], jobId) then
    rcall("HDEL", ARGV[1] .. jobId, "finishedOn", "processedOn", "failedReason")
    moved[#moved + 1] = jobId
  end
end
if #moved > 0 then
  rcall("ZREM", KEYS[1], unpack(moved))
  rcall("LPUSH", target, unpack(moved))
end
return moved
"""


class QueueClient:
    """Reads, cleans and retries the Bull/BullMQ queues of one Redis; each call opens its own connection."""

    def __init__(self, url: str, settings: QueueSettings, *, timeout: float, redactor: Redactor | None = None) -> None:
        self._url = url
        self.settings = settings
        self._timeout = timeout
        self._redactor = redactor

    @contextlib.asynccontextmanager
    async def _redis(self, what: str) -> AsyncIterator[aioredis.Redis]:
        """A connection (no silent retries: a destructive call is sent once), and plain failures."""
        try:
            client = aioredis.from_url(
                self._url,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                decode_responses=True,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise CommandError(f"The Redis URL of the queues is not valid ({type(exc).__name__}).") from None
        try:
            yield client
        except CommandError:
            raise
        except (RedisError, OSError, TimeoutError) as exc:
            raise CommandError(f"Redis failed while {what}: {_problem(exc, self._timeout, self._redactor)}.") from None
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    # -- which queues ------------------------------------------------------------------------------

    def ref(self, name: str) -> QueueRef:
        return QueueRef(self.settings.library, self.settings.prefix, check_queue_name(name))

    async def queues(self) -> tuple[list[QueueRef], bool]:
        """The declared queues, or those found by a bounded SCAN for ``<prefix>:*:id``; and whether the
        scan stopped before the end (more may exist)."""
        if self.settings.names:
            return [self.ref(n) for n in self.settings.names], False
        prefix = self.settings.prefix
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + ":*:id"
        found: set[str] = set()
        cursor: int = 0
        async with self._redis("looking for queues") as client:
            for _ in range(DISCOVER_SCANS):
                cursor, keys = await client.scan(cursor, match=pattern, count=1000)
                for key in keys:
                    name = str(key)[len(prefix) + 1 : -len(":id")]
                    if QUEUE_NAME.match(name):
                        found.add(name)
                if cursor == 0 or len(found) >= DISCOVER_MAX:
                    break
        names = sorted(found)[:DISCOVER_MAX]
        return [self.ref(n) for n in names], cursor != 0

    async def find(self, name: str) -> QueueRef:
        """The queue called ``name``, declared or present in Redis; else a refusal naming the known ones."""
        check_queue_name(name)
        if self.settings.names:
            if name not in self.settings.names:
                known = ", ".join(f"`{n}`" for n in self.settings.names)
                raise CommandError(f"There is no queue `{name}` here; the declared queues are {known}.")
            return self.ref(name)
        ref = self.ref(name)
        async with self._redis("looking for the queue") as client:
            exists = await client.exists(ref.key("id"), ref.key("meta"), ref.key("wait"), ref.key("failed"))
        if not exists:
            raise CommandError(f"There is no queue `{name}` under the prefix `{ref.prefix}` in this Redis.")
        return ref

    async def written_by(self, ref: QueueRef) -> Library:
        """Which library's keys the queue has: BullMQ records its version in ``meta``, Bull never does."""
        async with self._redis("reading the queue") as client:
            version = await client.hget(ref.key("meta"), "version")
            events = await client.exists(ref.key("events"))
        return "bullmq" if str(version or "").startswith("bullmq") or events else "bull"

    async def check_library(self, ref: QueueRef) -> None:
        """Refuse to change a queue whose keys are not the declared library's."""
        found = await self.written_by(ref)
        if found != ref.library:
            raise CommandError(
                f"The queue `{ref.name}` was written by {found}, but the inventory says {ref.library}; "
                "fix the inventory before changing it."
            )

    # -- /ops queue --------------------------------------------------------------------------------

    async def status(self, refs: Sequence[QueueRef], *, now_ms: int | None = None) -> list[QueueStatus]:
        """Counts and health of each queue, in two pipelined round trips whatever the number of jobs;
        nothing the server does for it is more than a bounded range (a few ms per queue)."""
        if not refs:
            return []
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        since = now - RATE_WINDOW_MS
        async with self._redis("reading the queues") as client:
            health = client.register_script(QUEUE_HEALTH)
            pipe = client.pipeline(transaction=False)
            for ref in refs:
                for state in STATES[ref.library]:
                    key = ref.key(STATE_KEYS[state])
                    if state in LISTS:
                        pipe.llen(key)
                    else:
                        pipe.zcard(key)
                pipe.lrange(ref.key("wait"), -2, -1)
                pipe.lrange(ref.key("paused"), -1, -1)
                pipe.hexists(ref.key("meta"), "paused")
                pipe.exists(ref.key("meta-paused"))
                finished = ref.key("events" if ref.library == "bullmq" else "completed")
                args: list[str | int] = [ref.base, since, EVENTS_READ, REASON_SAMPLE, ref.library]
                await health(keys=[ref.key("failed"), finished], args=args, client=pipe)
            first = await pipe.execute()
            found: list[tuple[QueueRef, dict[str, int], bool, str | None, list[Any]]] = []
            i = 0
            for ref in refs:
                states = STATES[ref.library]
                counts = {s: int(n) for s, n in zip(states, first[i : i + len(states)], strict=True)}
                i += len(states)
                wait_tail, paused_tail, meta_paused, bull_paused, checked = first[i : i + 5]
                i += 5
                if wait_tail and _marker(wait_tail[-1]):
                    counts["waiting"] = max(0, counts["waiting"] - 1)
                    wait_tail = wait_tail[:-1]
                tail = (wait_tail[-1:] or paused_tail[-1:] or [None])[0]
                paused = bool(meta_paused) or (ref.library == "bull" and bool(bull_paused))
                found.append((ref, counts, paused, tail, checked))
            pipe = client.pipeline(transaction=False)
            for ref, _, _, tail, _ in found:
                if tail:
                    pipe.hget(ref.key(tail), "timestamp")
                else:
                    pipe.echo("")
            stamps = await pipe.execute()
        return [self._status(now, *item, stamp) for item, stamp in zip(found, stamps, strict=True)]

    @staticmethod
    def _status(
        now: int, ref: QueueRef, counts: dict[str, int], paused: bool, tail: str | None, checked: list[Any], stamp: Any
    ) -> QueueStatus:
        completed, failed, read, oldest_entry, reasons = checked
        minutes = RATE_WINDOW_MS / 60_000
        estimated = int(read) >= EVENTS_READ and bool(oldest_entry)
        if estimated:
            # More events in the window than were read: the rate over the span the newest ones cover.
            span_ms = now - int(str(oldest_entry).split("-")[0])
            minutes = max(span_ms, 1000) / 60_000
        grouped = Counter(_reason(r or None) for r in reasons)
        oldest = max(0.0, (now - int(stamp)) / 1000) if stamp and str(stamp).isdigit() else None
        return QueueStatus(
            ref=ref,
            counts=counts,
            paused=paused,
            oldest_waiting_seconds=oldest,
            finished_per_minute=(int(completed) + int(failed)) / minutes,
            failed_per_minute=int(failed) / minutes,
            rate_capped=estimated,
            reasons=grouped.most_common(TOP_REASONS),
            reasons_sampled=len(reasons),
        )

    async def activity(
        self, refs: Sequence[QueueRef], *, since_ms: int, now_ms: int | None = None
    ) -> list[QueueActivity]:
        """For a digest: each queue's jobs failed after ``since_ms`` (up to now), its oldest waiting job and
        whether it is paused; one pipelined round trip, the whole read bounded by the component's timeout."""
        if not refs:
            return []
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        try:
            async with asyncio.timeout(self._timeout), self._redis("reading the queues") as client:
                pipe = client.pipeline(transaction=False)
                for ref in refs:
                    keys = [ref.key(part) for part in ("failed", "wait", "paused", "meta", "meta-paused")]
                    pipe.eval(QUEUE_ACTIVITY, len(keys), *keys, ref.base, int(since_ms), now)
                replies = await pipe.execute()
        except TimeoutError:
            problem = f"no answer within {self._timeout:g} s"
            raise CommandError(f"Redis failed while reading the queues: {problem}.") from None
        found: list[QueueActivity] = []
        for ref, (failed, stamp, meta_paused, bull_paused) in zip(refs, replies, strict=True):
            oldest = max(0.0, (now - int(stamp)) / 1000) if stamp and str(stamp).isdigit() else None
            paused = bool(meta_paused) or (ref.library == "bull" and bool(bull_paused))
            found.append(QueueActivity(ref, int(failed), oldest, paused))
        return found

    # -- plans ---------------------------------------------------------------------------------------

    async def finished_ids(
        self, ref: QueueRef, state: Finished, *, cutoff_ms: float, limit: int
    ) -> tuple[list[str], int]:
        """Ids in ``completed``/``failed`` finished at or before ``cutoff_ms``, oldest first, at most
        ``limit``; and how many such jobs there are in all. Read in pages, never one huge call."""
        key = ref.key(state)
        top: float | str = "+inf" if cutoff_ms == float("inf") else int(cutoff_ms)
        ids: dict[str, None] = {}
        async with self._redis("listing the jobs") as client:
            total = int(await client.zcount(key, "-inf", top))
            offset = 0
            while len(ids) < min(limit, total):
                # By rank: the jobs finished by the cutoff are the set's first ranks, and ZRANGE finds a rank
                # in O(log N), where ZRANGEBYSCORE's LIMIT walks `offset` entries from the start on every page.
                size = min(PAGE, limit - len(ids))
                scored = await client.zrange(key, offset, offset + size - 1, withscores=True)
                page = cast("list[tuple[str, float]]", scored)  # (member, score): decode_responses
                ids.update(dict.fromkeys(str(i) for i, score in page if score <= cutoff_ms))
                if len(page) < size or page[-1][1] > cutoff_ms:
                    break
                offset += len(page)
        return list(ids)[:limit], total

    # -- runs ----------------------------------------------------------------------------------------

    async def remove(
        self,
        ref: QueueRef,
        state: Finished,
        ids: Sequence[str],
        *,
        cutoff_ms: float,
        progress: Callable[[int, int], Awaitable[None]] | None = None,
    ) -> BatchResult:
        """Remove exactly these jobs, if still in ``state`` and finished by ``cutoff_ms``, as the library
        removes a job; atomically per batch. Raises QueueRunFailed saying what was done if Redis fails."""
        if ref.library == "bullmq":
            script, keys = BULLMQ_REMOVE, [ref.key(state), ref.key("events")]
        else:
            script, keys = BULL_REMOVE, [ref.key(state), ref.key("priority"), ref.key("limiter")]
        cutoff = "1e300" if cutoff_ms == float("inf") else str(int(cutoff_ms))  # Lua's tonumber has no "+inf"
        return await self._batches(ref, script, keys, [ref.base, cutoff], ids, "removed", progress)

    async def retry(
        self, ref: QueueRef, ids: Sequence[str], *, progress: Callable[[int, int], Awaitable[None]] | None = None
    ) -> BatchResult:
        """Move exactly these failed jobs back to waiting, as the library's retryJobs does."""
        if ref.library == "bullmq":
            parts = ("failed", "events", "wait", "paused", "meta", "active", "marker")
            script, keys = BULLMQ_RETRY, [ref.key(p) for p in parts]
        else:
            script, keys = BULL_RETRY, [ref.key(p) for p in ("failed", "wait", "meta-paused", "paused")]
        return await self._batches(ref, script, keys, [ref.base], ids, "retried", progress)

    async def _batches(
        self,
        ref: QueueRef,
        script: str,
        keys: list[str],
        args: list[str],
        ids: Sequence[str],
        verb: str,
        progress: Callable[[int, int], Awaitable[None]] | None,
    ) -> BatchResult:
        done: list[str] = []
        handled = 0
        try:
            client = aioredis.from_url(
                self._url,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                decode_responses=True,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise CommandError(f"The Redis URL of the queues is not valid ({type(exc).__name__}).") from None
        try:
            run = client.register_script(script)
            for start in range(0, len(ids), BATCH):
                batch = [str(i) for i in ids[start : start + BATCH]]
                try:
                    result = await run(keys=keys, args=[*args, *batch])
                except (RedisError, OSError, TimeoutError) as exc:
                    problem = _problem(exc, self._timeout, self._redactor)
                    done_set = set(done)  # once: a plan may hold a million ids
                    so_far = BatchResult(done, [i for i in ids[:handled] if i not in done_set])
                    left = len(ids) - handled - len(batch)
                    raise QueueRunFailed(
                        f"Redis failed part-way ({problem}): {len(done):,} job(s) of `{ref.name}` were {verb}; "
                        f"a batch of {len(batch):,} may or may not have been {verb} (each batch is all or nothing); "
                        f"{left:,} planned job(s) were not touched.",
                        so_far,
                    ) from None
                done.extend(str(x) for x in result)
                handled += len(batch)
                if progress is not None:
                    await progress(handled, len(ids))
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()
        done_set = set(done)
        return BatchResult(done, [i for i in ids if i not in done_set])


@dataclass(frozen=True)
class QueueTarget:
    """A service's Redis component that holds queues."""

    component: str
    spec: RedisComponent
    settings: QueueSettings

    def client(self, redactor: Redactor) -> QueueClient:
        return QueueClient(
            self.spec.url.get_secret_value(), self.settings, timeout=self.spec.timeout, redactor=redactor
        )


def queue_targets(inventory: Inventory, service: str) -> list[QueueTarget]:
    """The Redis components of the service called ``service`` that declare queues (none: empty)."""
    found = inventory.services.get(service)
    if found is None:
        return []
    return [
        QueueTarget(component, spec, spec.queues)
        for component, spec in found.components.items()
        if isinstance(spec, RedisComponent) and spec.queues is not None
    ]
