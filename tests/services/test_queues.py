"""The queue reader, clean and retry against queues written by the real Bull 4, BullMQ 5 and BullMQ 6 libraries."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.errors import CommandError
from services.inventory import QueueSettings
from services.plan_lists import PlanLists
from services.queues import BATCH, QueueClient, QueueRef, QueueRunFailed, check_queue_name, parse_age
from tests.fixtures.bull import BULLMQ, LIBRARIES, NodeQueues, inventory_library, node_queues  # noqa: F401
from tests.fixtures.servers import redis_process

_prefixes = itertools.count()
# Jobs of every kind: some finished ten days ago, some just now, waiting, delayed, prioritized.
SEED: dict[str, Any] = {
    "phases": [
        {"days_ago": 10, "completed": 3, "failed": ["boom A", "boom A"]},
        {"completed": 2, "failed": ["boom B"]},
    ],
    "waiting": 2,
    "delayed": 1,
    "prioritized": 1,
}
DAY_MS = 86_400_000


def queue_of(library: str, names: list[str] | None = None) -> tuple[QueueSettings, dict[str, str]]:
    """The inventory's settings for a queue whose jobs ``library`` (as jobs.js names it) writes, and its spec."""
    prefix = f"q{next(_prefixes)}"
    settings = QueueSettings(
        library=inventory_library(library),  # type: ignore[arg-type]
        prefix=prefix,
        names=names if names is not None else ["images"],
    )
    return settings, {"library": library, "prefix": prefix, "queue": "images"}


def client_for(url: str, settings: QueueSettings) -> QueueClient:
    return QueueClient(url, settings, timeout=5)


async def keys_of(url: str, pattern: str) -> set[str]:
    client = aioredis.from_url(url, decode_responses=True)
    try:
        return {k async for k in client.scan_iter(match=pattern, count=1000)}
    finally:
        await client.aclose()


@pytest.mark.parametrize("library", LIBRARIES)
async def test_counts_and_health_match_what_the_library_reads(
    library: str,
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
) -> None:
    settings, spec = queue_of(library)
    await node_queues.seed(redis_url, **spec, **SEED)
    seen = await node_queues.read(redis_url, **spec)
    client = client_for(redis_url, settings)
    [status] = await client.status([client.ref("images")])

    assert status.counts == {state: seen["counts"][state] for state in status.counts}
    expected_states = {"waiting", "active", "delayed", "paused", "failed", "completed"}
    if library in BULLMQ:  # Bull keeps prioritized jobs in wait; only BullMQ has flows
        expected_states |= {"prioritized", "waiting-children"}
        assert status.counts["prioritized"] == 1 and status.counts["waiting"] == 2
    else:
        assert status.counts["waiting"] == 3
    assert set(status.counts) == expected_states
    assert status.counts["completed"] == 5 and status.counts["failed"] == 3 and status.counts["delayed"] == 1
    assert status.paused is seen["paused"] is False
    assert status.reasons == [("boom A", 2), ("boom B", 1)] and status.reasons_sampled == 3
    assert status.oldest_waiting_seconds is not None and 0 <= status.oldest_waiting_seconds < 120
    # BullMQ's events stream is stamped by the server (all eight finished now); Bull's sets by finishedOn.
    finished = 8 if library in BULLMQ else 3
    assert status.finished_per_minute == pytest.approx(finished / 15)
    assert status.failed_per_minute == pytest.approx((3 if library in BULLMQ else 1) / 15)


@pytest.mark.parametrize("library", LIBRARIES)
async def test_a_paused_queue_is_seen_paused_with_its_jobs_counted(
    library: str,
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
) -> None:
    settings, spec = queue_of(library)
    await node_queues.seed(redis_url, **spec, waiting=3, paused=True)
    seen = await node_queues.read(redis_url, **spec)
    client = client_for(redis_url, settings)
    ref = client.ref("images")
    [status] = await client.status([ref])
    assert status.paused and seen["paused"]
    assert status.counts == {state: seen["counts"][state] for state in status.counts}
    # Bull and BullMQ 5 move a paused queue's jobs to `paused`; BullMQ 6 leaves them in `wait` and only
    # sets `paused` in `meta` (6.7.0 pause-7.lua).
    assert await _layout(redis_url, ref) == (paused_in_wait if library == "bullmq6" else paused_list)(3)
    assert status.counts["waiting" if library == "bullmq6" else "paused"] == 3
    assert status.counts["paused"] + status.counts["waiting"] == 3
    assert status.oldest_waiting_seconds is not None and 0 <= status.oldest_waiting_seconds < 120
    [activity] = await client.activity([ref], since_ms=0)
    assert activity.paused and activity.oldest_waiting_seconds is not None
    if library in BULLMQ:
        assert seen["version"] == {"bullmq": "bullmq:5.81.5", "bullmq6": "bullmq:6.7.0"}[library]


async def test_queues_are_discovered_with_a_bounded_scan(redis_url: str, node_queues: NodeQueues) -> None:  # noqa: F811
    settings, spec = queue_of("bullmq", names=[])
    await node_queues.seed(redis_url, **spec, waiting=1)
    await node_queues.seed(redis_url, **{**spec, "queue": "mail"}, waiting=1)
    other = aioredis.from_url(redis_url)
    await other.set(f"{spec['prefix']}:not-a-queue", "1")
    await other.set(f"{spec['prefix']}:bad*name:id", "1")  # a name no command could type: not listed
    await other.aclose()
    client = client_for(redis_url, settings)
    refs, more = await client.queues()
    assert [r.name for r in refs] == ["images", "mail"] and not more
    assert await client.written_by(refs[0]) == "bullmq"
    assert (await client.find("mail")).name == "mail"
    with pytest.raises(CommandError, match="There is no queue `nope`"):
        await client.find("nope")


@pytest.mark.parametrize("library", BULLMQ)
async def test_the_library_is_told_apart_and_a_mismatch_refused(
    library: str,
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
) -> None:
    settings, spec = queue_of("bull")
    await node_queues.seed(redis_url, **{**spec, "library": library}, waiting=1)
    client = client_for(redis_url, settings)
    with pytest.raises(CommandError, match="written by bullmq, but the inventory says bull"):
        await client.check_library(client.ref("images"))


@pytest.mark.parametrize("library", LIBRARIES)
async def test_clean_removes_exactly_the_planned_jobs_and_the_library_reads_the_rest(
    library: str,
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
) -> None:
    settings, spec = queue_of(library)
    ids = await node_queues.seed(redis_url, **spec, **SEED)
    before = await node_queues.read(redis_url, **spec)
    client = client_for(redis_url, settings)
    ref = client.ref("images")
    now = max(int(x) for x in await _scores(redis_url, ref.key("completed")))
    cutoff = now - 7 * DAY_MS
    planned, total = await client.finished_ids(ref, "completed", cutoff_ms=cutoff, limit=1000)
    assert planned == ids["completed"][:3] and total == 3
    # A waiting job and an unknown id slipped into the plan: both must be left alone.
    result = await client.remove(ref, "completed", [*planned, ids["waiting"][0], "9999"], cutoff_ms=cutoff)
    assert result.done == planned and result.skipped == [ids["waiting"][0], "9999"]

    after = await node_queues.read(redis_url, **spec)
    expected = {state: list(before["ids"][state]) for state in before["ids"]}
    expected["completed"] = [i for i in expected["completed"] if i not in planned]
    assert after["ids"] == expected
    assert after["counts"]["completed"] == 2 and after["reasons"] == before["reasons"]
    left = await keys_of(redis_url, f"{ref.base}*")
    for job in planned:
        assert not {ref.key(job), ref.key(f"{job}:logs")} & left
    assert ref.key(ids["completed"][3]) in left and ref.key(f"{ids['completed'][3]}:logs") in left
    assert ref.key(ids["waiting"][0]) in left


@pytest.mark.parametrize("library", LIBRARIES)
async def test_clean_leaves_a_planned_job_that_finished_again_after_the_cutoff(
    library: str,
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
) -> None:
    settings, spec = queue_of(library)
    await node_queues.seed(redis_url, **spec, phases=[{"days_ago": 10, "failed": ["old", "old"]}])
    client = client_for(redis_url, settings)
    ref = client.ref("images")
    cutoff = max(int(x) for x in await _scores(redis_url, ref.key("failed"))) + DAY_MS
    planned, _ = await client.finished_ids(ref, "failed", cutoff_ms=cutoff, limit=10)
    # Between the plan and the run, one job is retried and fails again now: it is newer than the cutoff.
    retried = planned[0]
    await client.retry(ref, [retried])
    await node_queues.run(redis_url, {"op": "work", **spec})
    r = aioredis.from_url(redis_url)
    await r.zadd(ref.key("failed"), {retried: cutoff + 1})
    await r.aclose()
    result = await client.remove(ref, "failed", planned, cutoff_ms=cutoff)
    assert result.done == planned[1:] and result.skipped == [retried]
    assert (await node_queues.read(redis_url, **spec))["ids"]["failed"] == [retried]


@pytest.mark.parametrize("library", LIBRARIES)
async def test_retry_moves_failed_jobs_back_to_waiting_and_a_worker_takes_them(
    library: str,
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
) -> None:
    settings, spec = queue_of(library)
    ids = await node_queues.seed(redis_url, **spec, phases=[{"completed": 1, "failed": ["boom", "boom"]}])
    client = client_for(redis_url, settings)
    ref = client.ref("images")
    planned, total = await client.finished_ids(ref, "failed", cutoff_ms=float("inf"), limit=10)
    assert sorted(planned) == sorted(ids["failed"]) and total == 2
    result = await client.retry(ref, [*planned, ids["completed"][0]])
    assert result.done == planned and result.skipped == ids["completed"]
    seen = await node_queues.read(redis_url, **spec)
    assert seen["ids"]["failed"] == [] and sorted(seen["ids"]["waiting"]) == sorted(planned)
    assert seen["ids"]["completed"] == ids["completed"]
    client_r = aioredis.from_url(redis_url, decode_responses=True)
    fields = await client_r.hmget(ref.key(planned[0]), ["failedReason", "finishedOn", "processedOn", "data"])
    await client_r.aclose()
    assert fields[:3] == [None, None, None] and fields[3] is not None
    # A real worker picks the retried jobs up (BullMQ needs its marker for that) and they fail again.
    await node_queues.run(redis_url, {"op": "work", **spec})
    again = await node_queues.read(redis_url, **spec)
    assert sorted(again["ids"]["failed"]) == sorted(planned) and again["counts"]["waiting"] == 0


@pytest.mark.parametrize("library", LIBRARIES)
async def test_retry_of_a_paused_queue_goes_where_the_library_keeps_paused_jobs(
    library: str,
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
) -> None:
    settings, spec = queue_of(library)
    ids = await node_queues.seed(redis_url, **spec, phases=[{"failed": ["boom"]}], waiting=1, paused=True)
    client = client_for(redis_url, settings)
    ref = client.ref("images")
    result = await client.retry(ref, ids["failed"])
    assert result.done == ids["failed"] and result.skipped == []
    # Bull 4.16.5 / BullMQ 5.81.5: LPUSH to `paused` while paused; BullMQ 6.7.0 moveJobsToWait-8: to `wait`.
    layout = paused_in_wait if library == "bullmq6" else paused_list
    assert await _layout(redis_url, ref) == layout(2)
    assert await _head(redis_url, ref.key("wait" if library == "bullmq6" else "paused")) == ids["failed"][0]
    seen = await node_queues.read(redis_url, **spec)
    assert seen["paused"] and seen["ids"]["failed"] == []
    assert seen["counts"]["waiting" if library == "bullmq6" else "paused"] == 2
    # Resumed by the library, a real worker takes both: the waiting job completes, the retried one fails again.
    await node_queues.resume(redis_url, **spec)
    await node_queues.work(redis_url, **spec)
    after = await node_queues.read(redis_url, **spec)
    assert after["ids"]["failed"] == ids["failed"] and after["ids"]["completed"] == ids["waiting"]
    assert after["counts"]["waiting"] == after["counts"]["paused"] == 0 and not after["paused"]


async def test_a_bullmq_queue_without_a_version_is_retried_in_the_layout_both_majors_read(
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
) -> None:
    settings, spec = queue_of("bullmq6")
    ids = await node_queues.seed(redis_url, **spec, phases=[{"failed": ["boom"]}], paused=True)
    client = client_for(redis_url, settings)
    ref = client.ref("images")
    r = aioredis.from_url(redis_url)
    await r.hdel(ref.key("meta"), "version")  # as left by a Queue opened with skipMetasUpdate
    await r.aclose()
    assert (await client.retry(ref, ids["failed"])).done == ids["failed"]
    # No version: BullMQ 5's layout (`paused`), which BullMQ 6's resume moves back to `wait`.
    assert await _layout(redis_url, ref) == paused_list(1)
    await node_queues.resume(redis_url, **spec)
    assert await _layout(redis_url, ref) == {"wait": 1, "paused": 0, "meta paused": False}
    await node_queues.work(redis_url, **spec)
    after = await node_queues.read(redis_url, **spec)
    assert after["ids"]["failed"] == ids["failed"] and after["counts"]["waiting"] == 0


async def _flow_twin(url: str, node: NodeQueues, library: str, **flow: Any) -> tuple[QueueClient, dict[str, Any]]:
    """A parent in queue `parents` whose child in `images` the real library failed."""
    settings, spec = queue_of(library)
    made = await node.run(url, {"op": "flow", **spec, "parent_queue": "parents", "reasons": ["boom"], **flow})
    return client_for(url, settings), {**spec, **made["ids"]}


async def _parent_side(url: str, twin: dict[str, Any]) -> dict[str, object]:
    """Where the parent is and what it holds of its child, by key, ids left out (each twin has its own)."""
    base, parent = f"{twin['prefix']}:parents:", twin["parent"][0]
    client = aioredis.from_url(url, decode_responses=True)
    try:
        return {
            "wait": await client.lrange(base + "wait", 0, -1) == [parent],
            "paused": await client.lrange(base + "paused", 0, -1) == [parent],
            "waiting-children": await client.zcard(base + "waiting-children"),
            "dependencies": await client.scard(f"{base}{parent}:dependencies"),
            "failed children": await client.hlen(f"{base}{parent}:failed"),
            "child keys": len(await keys_of(url, f"{twin['prefix']}:images:{twin['children'][0]}*")),
        }
    finally:
        await client.aclose()


@pytest.mark.parametrize("library", BULLMQ)
async def test_cleaning_a_failed_child_frees_its_paused_parent_as_the_library_does(
    library: str,
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
) -> None:
    client, ours = await _flow_twin(redis_url, node_queues, library, pause_parent=True)
    _, theirs = await _flow_twin(redis_url, node_queues, library, pause_parent=True)
    ref = client.ref("images")
    assert (await client.remove(ref, "failed", ours["children"], cutoff_ms=float("inf"))).done == ours["children"]
    await node_queues.run(redis_url, {"op": "clean", **theirs, "state": "failed"})
    # The last dependency gone, the parent leaves waiting-children for its queue's waiting list: `paused` while
    # that queue is paused in 5.81.5 (getTargetQueueList), `wait` in 6.7.0 (removeParentDependencyKey).
    expected = {"wait": library == "bullmq6", "paused": library == "bullmq"}
    expected |= {"waiting-children": 0, "dependencies": 0, "failed children": 0, "child keys": 0}
    assert await _parent_side(redis_url, ours) == await _parent_side(redis_url, theirs) == expected


@pytest.mark.parametrize("library", BULLMQ)
async def test_retrying_a_failed_child_puts_it_back_as_the_library_does(
    library: str,
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
) -> None:
    client, ours = await _flow_twin(redis_url, node_queues, library, cpof=True)
    _, theirs = await _flow_twin(redis_url, node_queues, library, cpof=True)
    assert (await client.retry(client.ref("images"), ours["children"])).done == ours["children"]
    await node_queues.run(redis_url, {"op": "retry", **theirs})
    # continueParentOnFailure moved the child to the parent's `failed` hash and the parent to wait; 6.7.0's
    # moveJobsToWait puts the retried child back among the dependencies, 5.81.5's leaves it.
    six = library == "bullmq6"
    expected = {"wait": True, "paused": False, "waiting-children": 0, "dependencies": int(six)}
    expected |= {"failed children": int(not six), "child keys": 1}  # the job hash (it wrote no log)
    assert await _parent_side(redis_url, ours) == await _parent_side(redis_url, theirs) == expected
    for twin in (ours, theirs):
        seen = await node_queues.read(redis_url, **{k: twin[k] for k in ("library", "prefix", "queue")})
        assert seen["ids"]["waiting"] == twin["children"] and seen["ids"]["failed"] == []


async def test_redis_going_down_mid_run_says_what_was_and_was_not_removed(node_queues: NodeQueues) -> None:  # noqa: F811
    with redis_process() as base:
        url = f"{base}/0"
        settings, spec = queue_of("bullmq")
        ids = await node_queues.seed(url, **spec, phases=[{"completed": 3}])
        client = client_for(url, settings)
        ref = client.ref("images")
        planned = ids["completed"] + [f"gone-{n}" for n in range(2 * BATCH + 200)]

        async def stop_redis(handled: int, total: int) -> None:
            admin = aioredis.from_url(url)
            try:
                await admin.shutdown(nosave=True)
            except Exception:  # noqa: S110 (the connection drops as the server stops)
                pass
            finally:
                await admin.aclose()

        with pytest.raises(QueueRunFailed) as failed:
            await client.remove(ref, "completed", planned, cutoff_ms=float("inf"), progress=stop_redis)
    message = failed.value.message
    assert "3 job(s) of `images` were removed" in message
    assert f"a batch of {BATCH} may or may not have been removed" in message
    assert f"{len(planned) - 2 * BATCH:,} planned job(s) were not touched" in message
    assert failed.value.done.done == ids["completed"]


async def test_a_dead_redis_is_one_sentence(node_queues: NodeQueues) -> None:  # noqa: F811
    settings, _ = queue_of("bull")
    client = QueueClient("redis://127.0.0.1:1/0", settings, timeout=2)
    with pytest.raises(CommandError, match=r"^Redis failed while reading the queues: connection refused\.$"):
        await client.status([client.ref("images")])


@pytest.mark.parametrize("name", ["im*", "a:b", "../etc", "x/y", "[ab]", "", "-x", "a" * 101, "é"])
def test_queue_names_with_wildcards_or_path_characters_are_refused(name: str) -> None:
    with pytest.raises(CommandError, match="A queue name is letters"):
        check_queue_name(name)


def test_older_than_is_read_and_bounded() -> None:
    assert parse_age("7d") == 7 * DAY_MS and parse_age("12h") == 12 * 3_600_000 and parse_age("30m") == 1_800_000
    for bad in ("0d", "400d", "59s", "abc", "-1d", "1e3d"):
        with pytest.raises(CommandError, match="--older-than"):
            parse_age(bad)


async def test_plan_lists_keep_exactly_the_list(tmp_path: Path) -> None:
    lists = PlanLists(tmp_path / "plans", sample=3)
    saved = await lists.save([str(n) for n in range(100_000)])
    assert saved.count == 100_000 and saved.sample == ("0", "1", "2")
    assert await lists.load(saved.ref) == [str(n) for n in range(100_000)]
    path = tmp_path / "plans" / f"{saved.ref}.json.gz"
    path.write_bytes(gzip.compress(b'["0","1"]'))
    with pytest.raises(CommandError, match="is not the list that was approved"):
        await lists.load(saved.ref)
    path.unlink()
    with pytest.raises(CommandError, match="not in this bot's state directory"):
        await lists.load(saved.ref)
    with pytest.raises(CommandError, match="not valid"):
        await lists.load("../../etc/passwd")


def paused_list(jobs: int) -> dict[str, object]:
    """The keys of a paused queue whose waiting jobs are in ``paused`` (Bull 4, BullMQ 5)."""
    return {"wait": 0, "paused": jobs, "meta paused": True}


def paused_in_wait(jobs: int) -> dict[str, object]:
    """The keys of a paused queue whose waiting jobs stay in ``wait`` (BullMQ 6)."""
    return {"wait": jobs, "paused": 0, "meta paused": True}


async def _layout(url: str, ref: QueueRef) -> dict[str, object]:
    """Where the queue's waiting jobs are, read from its keys (markers and all) rather than by the library."""
    client = aioredis.from_url(url, decode_responses=True)
    try:
        paused = bool(await client.hexists(ref.key("meta"), "paused")) or bool(
            await client.exists(ref.key("meta-paused"))
        )
        return {
            "wait": await client.llen(ref.key("wait")),
            "paused": await client.llen(ref.key("paused")),
            "meta paused": paused,
        }
    finally:
        await client.aclose()


async def _head(url: str, key: str) -> str | None:
    """The newest entry of a list (LPUSH puts a retried job there)."""
    client = aioredis.from_url(url, decode_responses=True)
    try:
        head: str | None = await client.lindex(key, 0)
        return head
    finally:
        await client.aclose()


async def _scores(url: str, key: str) -> list[float]:
    client = aioredis.from_url(url)
    try:
        return [score for _, score in await client.zrange(key, 0, -1, withscores=True)]
    finally:
        await client.aclose()


def test_queue_ref_keys() -> None:
    ref = QueueRef("bullmq", "bull", "images")
    assert ref.key("wait") == "bull:images:wait" and ref.base == "bull:images:"


async def test_a_busy_stream_gives_the_rate_over_the_newest_events(redis_url: str) -> None:
    settings, _ = queue_of("bullmq")
    client = client_for(redis_url, settings)
    ref = client.ref("images")
    now = 1_800_000_000_000
    r = aioredis.from_url(redis_url)
    pipe = r.pipeline(transaction=False)
    for n in range(1500):  # 1,500 events over the last 7.5 minutes, one in five a failure
        event = "failed" if n % 5 == 0 else "completed"
        pipe.xadd(ref.key("events"), {"event": event, "jobId": str(n)}, id=f"{now - 450_000 + n * 300}-0")
    await pipe.execute()
    await r.aclose()
    [status] = await client.status([ref], now_ms=now)
    # The newest 1,000 events cover the last 300 s: 200 a minute, 40 of them failures.
    assert status.rate_capped
    assert status.finished_per_minute == pytest.approx(200, rel=0.01)
    assert status.failed_per_minute == pytest.approx(40, rel=0.01)
    assert status.failure_share == pytest.approx(0.2, rel=0.01)
