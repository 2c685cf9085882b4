"""/ops digest's queue and scheduled-cleanup lines, through signed Slack requests (the fake Slack checks
every payload): queues written by the real BullMQ library, cleanups from stored approvals."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.access import SCHEDULER_USER
from services.state import Approval, ApprovalState, StateStore
from tests.fixtures.bull import NodeQueues, node_queues  # noqa: F401  (the session fixture)
from tests.fixtures.servers import free_port
from tests.fixtures.slack import FakeSlack
from tests.scenario.test_digest import OPERATOR, block_text, blocks_of, open_world

S = ApprovalState
TITLE = "*Queues and scheduled cleanups*"


def extra_inventory(redis_url: str, prefix: str) -> str:
    queues = f"{{library: bullmq, prefix: {prefix}, names: [images, mail]}}"
    return f"""
  queued:
    components:
      jobs: {{type: redis, url: "{redis_url}", timeout: 2, queues: {queues}}}
  cache:
    components:
      jobs: {{type: redis, url: "redis://127.0.0.1:{free_port()}/0", timeout: 1, queues: {queues}}}
schedules:
  - {{name: nightly-blog, cron: "0 3 29 2 *", command: "cleanup blog"}}
"""


async def finished_cleanup(
    store: StateStore, approval_id: str, *, requester: str, ago: timedelta, result: str, action: str = "cleanup"
) -> None:
    ended = datetime.now(UTC) - ago
    created = ended - timedelta(minutes=5)
    await store.create_approval(
        Approval(
            id=approval_id, action=action, service="shop", risk="destructive", requester=requester,
            channel="C0OPS", request_id="req-" + approval_id, summary="Delete old documents from shop", plan={},
            approver_role="approver", required_approvals=1, self_approve=False, created_at=created,
            expires_at=created + timedelta(minutes=15), state=S.SUCCEEDED, finished_at=ended, result=result,
        )
    )  # fmt: skip


def section(blocks: list[dict[str, object]]) -> tuple[str, str]:
    """The queues section's text and its "since the last digest" line."""
    texts = [block_text(b) for b in blocks]
    [start] = [i for i, t in enumerate(texts) if t.startswith(TITLE)]
    end = next(i for i in range(start, len(texts)) if texts[i].startswith("_Since the last digest"))
    return "\n".join(texts[start:end]), texts[end]


async def test_queue_and_cleanup_lines_and_what_changed_since_the_last_digest(
    fake_slack: FakeSlack,
    tmp_path: Path,
    redis_url: str,
    node_queues: NodeQueues,  # noqa: F811
) -> None:
    prefix = "digestq"
    spec = {"library": "bullmq", "prefix": prefix}
    await node_queues.seed(redis_url, **spec, queue="mail", waiting=1)  # the oldest waiting job
    await node_queues.seed(redis_url, **spec, queue="images", phases=[{"failed": ["a", "b"]}], waiting=1)
    async with open_world(fake_slack, tmp_path, extra=extra_inventory(redis_url, prefix)) as world:
        await finished_cleanup(
            world.store, "sched-1", requester=SCHEDULER_USER, ago=timedelta(hours=2),
            result="Cleaned up shop: deleted 1,234 document(s) and 56 file(s) (3.0 MB).\nrule old-logs: 56 file(s)",
        )  # fmt: skip
        await finished_cleanup(world.store, "by-hand", requester=OPERATOR, ago=timedelta(hours=1), result="Cleaned")

        text, change = section(blocks_of(await world.answer("digest daily")))
        lines = text.splitlines()
        assert lines[0] == f"{TITLE} — 2 failed job(s) in this period, 0 paused queue(s)"
        assert lines[1] == (
            ":large_yellow_circle: *queued* queues: 2 failed job(s) in this period (images 2) · "
            "oldest waiting job: `mail`, added just now"
        )
        assert lines[2] == (
            ":large_yellow_circle: *cache* queues could not be read — "
            "jobs: Redis failed while reading the queues: connection refused"
        )
        assert re.fullmatch(
            r":large_green_circle: \*shop\* last scheduled cleanup: `sched-1` `/ops cleanup shop` \*succeeded\* "
            r"(\d{4}-\d\d-\d\d )?\d\d:\d\d KST: "
            r"Cleaned up shop: deleted 1,234 document\(s\) and 56 file\(s\) \(3\.0 MB\)\.",
            lines[3],
        ), lines[3]
        assert "rule old-logs" not in text and "by-hand" not in text  # the first line; the scheduler's only
        assert lines[4] == ":grey_question: *blog*: no scheduled cleanup ran in this period (schedule `nightly-blog`)"
        assert change.endswith("first digest")

        post = await world.posted("digest daily --post")
        saved = await world.store.last_digest("daily")
        assert saved is not None and saved[1]["queues_paused"] == []
        assert TITLE in "\n".join(block_text(b) for b in blocks_of(post))

        # After the posted digest: one more job fails and the library pauses `mail`.
        await node_queues.seed(redis_url, **spec, queue="images", phases=[{"failed": ["c"]}])
        await node_queues.seed(redis_url, **spec, queue="mail", paused=True)
        text, change = section(blocks_of(await world.answer("digest daily")))
        lines = text.splitlines()
        assert lines[0] == f"{TITLE} — 1 failed job(s) since the last digest, 1 paused queue(s)"
        assert lines[1] == (
            ":large_yellow_circle: *queued* queues: 1 failed job(s) since the last digest (images 1) · "
            "oldest waiting job: `mail`, added just now · :double_vertical_bar: paused: `mail`"
        )
        assert change.startswith("_Since the last digest (") and change.endswith("newly paused: queued/mail")


async def test_without_queues_or_scheduled_cleanups_the_digest_has_no_such_section(
    fake_slack: FakeSlack, tmp_path: Path
) -> None:
    async with open_world(fake_slack, tmp_path) as world:
        everything = "\n".join(block_text(b) for b in blocks_of(await world.answer("digest daily")))
        assert "*Approvals and runs*" in everything and TITLE not in everything
