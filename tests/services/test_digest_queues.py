"""The digest's queue facts over queues written by the real Bull 4 and BullMQ 5 libraries, and its
scheduled-cleanup facts from stored approvals: gathered as plain data by ``services.digest``."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.access import SCHEDULER_USER
from services.backup.runner import BackupRunner
from services.digest import QueueFacts, gather_digest, scheduled_cleanups
from services.health import HealthProbe, ProbeObserver, Target
from services.inventory import Inventory, parse_inventory
from services.queues import queue_targets
from services.redaction import Redactor
from services.state import Approval, ApprovalState, StateStore
from services.state.factory import open_state_store
from tests.fixtures.bull import NodeQueues, node_queues  # noqa: F401  (the session fixture)
from tests.fixtures.servers import free_port

S = ApprovalState
LIBRARIES = ["bull", "bullmq", "bullmq6"]  # as the fixture names them; BullMQ 6 is `library: bullmq` in the inventory
_prefixes = itertools.count()


@dataclass
class Sources:
    """What ``gather_digest`` reads: a real inventory and state store, no probes, no backups."""

    inventory: Inventory
    store: StateStore
    redactor: Redactor = field(default_factory=Redactor)
    probes: Mapping[str, HealthProbe] = field(default_factory=dict)
    backups: BackupRunner | None = None
    observe_probe: ProbeObserver | None = None

    def probe_for(self, target: Target) -> HealthProbe | None:
        return None


def inventory_of(components: str, *, schedules: str = "") -> Inventory:
    text = f"""
timezone: Asia/Seoul
services:
  shop:
    components:
{components}
  blog:
    components:
      api: {{type: http, url: "http://127.0.0.1:9/", timeout: 1}}
{schedules}
"""
    return parse_inventory(text, "test inventory", env={}).inventory


def redis_component(name: str, url: str, library: str, prefix: str, *, timeout: float = 5) -> str:
    queues = f"{{library: {library}, prefix: {prefix}, names: [images, mail]}}"
    return f'      {name}: {{type: redis, url: "{url}", timeout: {timeout:g}, queues: {queues}}}'


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    opened = await open_state_store(None, default_path=tmp_path / "state.sqlite3")
    try:
        yield opened
    finally:
        await opened.close()


async def gather_queues(sources: Sources, now: datetime) -> list[QueueFacts]:
    facts = await gather_digest(sources, "daily", now=now)
    return facts.queues


@pytest.mark.parametrize("library", LIBRARIES)
async def test_failed_jobs_are_counted_since_the_previous_digest_with_the_oldest_waiting_job(
    library: str,
    redis_url: str,
    store: StateStore,
    node_queues: NodeQueues,  # noqa: F811
) -> None:
    prefix = f"dq{next(_prefixes)}"
    spec = {"library": library, "prefix": prefix}
    # finishedOn three days ago, then now (the library's clock is shifted back for the first phase).
    await node_queues.seed(
        redis_url, **spec, queue="images", phases=[{"days_ago": 3, "failed": ["old"]}, {"failed": ["a", "b"]}],
        waiting=2,
    )  # fmt: skip
    await node_queues.seed(redis_url, **spec, queue="mail", phases=[{"failed": ["c"], "completed": 2}])
    sources = Sources(inventory_of(redis_component("jobs", redis_url, library.removesuffix("6"), prefix)), store)
    now = datetime.now(UTC)

    # No previous digest: the daily period (24 h) is the window, so the job failed 3 days ago is left out.
    [first] = await gather_queues(sources, now)
    assert first.service == "shop" and first.since == now - timedelta(hours=24) and first.unread == []
    by_name = {q.ref.name: q for q in first.queues}
    assert by_name["images"].failed == 2 and by_name["mail"].failed == 1 and first.failed == 3
    assert not by_name["images"].paused and first.paused == []
    oldest = first.oldest
    assert oldest is not None and oldest.ref.name == "images"
    assert oldest.oldest_waiting_seconds is not None and 0 <= oldest.oldest_waiting_seconds < 120
    assert by_name["mail"].oldest_waiting_seconds is None  # nothing waits there

    # The previous daily digest was posted four days ago: the window reaches back to it.
    await store.save_digest("daily", at=now - timedelta(days=4), snapshot={})
    [since_last] = await gather_queues(sources, now)
    assert since_last.since == now - timedelta(days=4)
    assert {q.ref.name: q.failed for q in since_last.queues} == {"images": 3, "mail": 1}

    # Posted an hour ago: only what failed since then (the jobs that failed just now).
    await store.save_digest("daily", at=now - timedelta(hours=1), snapshot={})
    [recent] = await gather_queues(sources, now)
    assert recent.failed == 3
    # A window that ends before the jobs failed counts none of them (the score is finishedOn, not more).
    client = queue_targets(sources.inventory, "shop")[0].client(Redactor())
    seen = await client.activity(
        [client.ref("images")], since_ms=int((now - timedelta(days=5)).timestamp() * 1000),
        now_ms=int((now - timedelta(days=1)).timestamp() * 1000),
    )  # fmt: skip
    assert [q.failed for q in seen] == [1]


@pytest.mark.parametrize("library", LIBRARIES)
async def test_a_paused_queue_is_said_with_its_oldest_waiting_job(
    library: str,
    redis_url: str,
    store: StateStore,
    node_queues: NodeQueues,  # noqa: F811
) -> None:
    prefix = f"dq{next(_prefixes)}"
    await node_queues.seed(redis_url, library=library, prefix=prefix, queue="mail", waiting=2, paused=True)
    seen = await node_queues.read(redis_url, library=library, prefix=prefix, queue="mail")
    assert seen["paused"] is True
    sources = Sources(inventory_of(redis_component("jobs", redis_url, library.removesuffix("6"), prefix)), store)
    [facts] = await gather_queues(sources, datetime.now(UTC))
    assert facts.paused == ["mail"] and facts.failed == 0
    oldest = facts.oldest
    assert oldest is not None and oldest.ref.name == "mail" and oldest.paused


async def test_a_redis_that_is_down_or_hangs_is_said_and_the_other_component_still_read(
    redis_url: str,
    store: StateStore,
    node_queues: NodeQueues,  # noqa: F811
) -> None:
    prefix = f"dq{next(_prefixes)}"
    await node_queues.seed(redis_url, library="bullmq", prefix=prefix, queue="images", phases=[{"failed": ["x"]}])

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, reads, says nothing until the client goes away
        writer.close()

    hung = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    hung_port = hung.sockets[0].getsockname()[1]
    components = "\n".join(
        [
            redis_component("jobs", redis_url, "bullmq", prefix),
            redis_component("down", f"redis://127.0.0.1:{free_port()}/0", "bullmq", prefix),
            redis_component("hung", f"redis://127.0.0.1:{hung_port}/0", "bullmq", prefix, timeout=0.5),
        ]
    )
    sources = Sources(inventory_of(components), store)
    try:
        facts = await gather_digest(sources, "daily", now=datetime.now(UTC))
    finally:
        hung.close()
        await hung.wait_closed()
    [shop] = facts.queues
    assert shop.failed == 1 and [q.ref.name for q in shop.queues] == ["images", "mail"]
    assert shop.unread == [
        ("down", "Redis failed while reading the queues: connection refused."),
        ("hung", "Redis failed while reading the queues: no answer within 0.5 s."),
    ]
    assert facts.health is not None  # the rest of the digest was gathered


async def test_a_service_whose_only_redis_is_down_has_no_queues_and_a_reason(store: StateStore) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    sources = Sources(inventory_of(redis_component("jobs", url, "bull", "bull")), store)
    [shop] = (await gather_digest(sources, "weekly", now=datetime.now(UTC))).queues
    assert shop.queues == [] and shop.failed == 0 and shop.oldest is None
    assert shop.unread == [("jobs", "Redis failed while reading the queues: connection refused.")]


def approval(approval_id: str, *, action: str, service: str, requester: str, ended: datetime, state: S) -> Approval:
    created = ended - timedelta(minutes=5)
    return Approval(
        id=approval_id, action=action, service=service, risk="destructive", requester=requester, channel="C0OPS",
        request_id="req-" + approval_id, summary=f"Delete old things from {service}", plan={}, approver_role="approver",
        required_approvals=1, self_approve=False, created_at=created, expires_at=created + timedelta(minutes=15),
        state=state, finished_at=ended, result=f"Cleaned up {service}: deleted 1,234 document(s).\ndetails",
    )  # fmt: skip


async def test_scheduled_cleanups_are_the_schedulers_newest_per_service(redis_url: str, store: StateStore) -> None:
    now = datetime.now(UTC)
    schedules = """
schedules:
  - {name: nightly-shop, cron: "0 3 29 2 *", command: "cleanup shop"}
  - {name: nightly-blog, cron: "0 3 29 2 *", command: "queue clean blog images failed --older-than 7d"}
  - {name: disabled-blog, cron: "0 3 29 2 *", command: "cleanup blog", enabled: false}
  - {name: digest, cron: "0 3 29 2 *", command: "digest daily --post"}
"""
    inventory = inventory_of(redis_component("jobs", redis_url, "bull", "bull"), schedules=schedules)
    finished = [
        approval("old", action="cleanup", service="shop", requester=SCHEDULER_USER, ended=now - timedelta(hours=5),
                 state=S.SUCCEEDED),
        approval("new", action="queue clean", service="shop", requester=SCHEDULER_USER,
                 ended=now - timedelta(hours=2), state=S.FAILED),
        approval("human", action="cleanup", service="shop", requester="U0OPER1", ended=now - timedelta(hours=1),
                 state=S.SUCCEEDED),
        approval("retry", action="queue retry", service="shop", requester=SCHEDULER_USER,
                 ended=now - timedelta(minutes=30), state=S.SUCCEEDED),
        approval("elsewhere", action="cleanup", service="gone", requester=SCHEDULER_USER,
                 ended=now - timedelta(hours=3), state=S.SUCCEEDED),
    ]  # fmt: skip
    found = scheduled_cleanups(inventory, finished)
    assert [(c.service, c.run.id if c.run else None, c.schedules) for c in found] == [
        ("shop", "new", ["nightly-shop"]),
        ("blog", None, ["nightly-blog"]),  # scheduled, but nothing ran in the period
        ("gone", "elsewhere", []),  # no longer in the inventory: still said
    ]
    # No cleanup schedule and no scheduled cleanup: nothing to say.
    assert scheduled_cleanups(inventory_of(redis_component("jobs", redis_url, "bull", "bull")), finished[2:4]) == []


async def test_the_gathered_cleanups_come_from_the_periods_stored_approvals(redis_url: str, store: StateStore) -> None:
    now = datetime.now(UTC)
    for item in (
        approval("in-period", action="cleanup", service="shop", requester=SCHEDULER_USER,
                 ended=now - timedelta(hours=3), state=S.SUCCEEDED),
        approval("last-week", action="cleanup", service="blog", requester=SCHEDULER_USER,
                 ended=now - timedelta(days=3), state=S.SUCCEEDED),
    ):  # fmt: skip
        await store.create_approval(item)
    sources = Sources(inventory_of(redis_component("jobs", redis_url, "bull", "bull")), store)
    daily = await gather_digest(sources, "daily", now=now)
    assert [(c.service, c.run.id if c.run else None) for c in daily.cleanups] == [("shop", "in-period")]
    assert daily.cleanups[0].run is not None and daily.cleanups[0].run.state is S.SUCCEEDED
    weekly = await gather_digest(sources, "weekly", now=now)
    assert [(c.service, c.run.id if c.run else None) for c in weekly.cleanups] == [
        ("shop", "in-period"),
        ("blog", "last-week"),
    ]
