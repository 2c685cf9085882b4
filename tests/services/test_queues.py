"""The queue reader, clean and retry against queues written by the real Bull 4 and BullMQ 5 libraries."""

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
from tests.fixtures.bull import NodeQueues, node_queues  # noqa: F401  (the session fixture)
from tests.fixtures.servers import redis_process

LIBRARIES = ["bull", "bullmq"]
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
    prefix = f"q{next(_prefixes)}"
    settings = QueueSettings(library=library, prefix=prefix, names=names if names is not None else ["images"])  # type: ignore[arg-type]
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
    if library == "bullmq":  # Bull keeps prioritized jobs in wait; only BullMQ has flows
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
    finished = 8 if library == "bullmq" else 3
    assert status.finished_per_minute == pytest.approx(finished / 15)
    assert status.failed_per_minute == pytest.approx((3 if library == "bullmq" else 1) / 15)


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
    [status] = await client.status([client.ref("images")])
    assert status.paused and seen["paused"]
    assert status.counts == {state: seen["counts"][state] for state in status.counts}
    assert status.counts["paused"] + status.counts["waiting"] == 3
    assert status.oldest_waiting_seconds is not None


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


async def test_the_library_is_told_apart_and_a_mismatch_refused(redis_url: str, node_queues: NodeQueues) -> None:  # noqa: F811
    settings, spec = queue_of("bull")
    await node_queues.seed(redis_url, **{**spec, "library": "bullmq"}, waiting=1)
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


async def test_retry_of_a_paused_bull_queue_goes_to_paused(redis_url: str, node_queues: NodeQueues) -> None:  # noqa: F811
    settings, spec = queue_of("bull")
    ids = await node_queues.seed(redis_url, **spec, phases=[{"failed": ["boom"]}], paused=True)
    client = client_for(redis_url, settings)
    await client.retry(client.ref("images"), ids["failed"])
    seen = await node_queues.read(redis_url, **spec)
    assert seen["paused"] and seen["ids"]["paused"] == ids["failed"] and seen["ids"]["waiting"] == []


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
