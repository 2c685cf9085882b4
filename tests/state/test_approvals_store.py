"""Approvals in the state store: every transition is one compare-and-set, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from services.state import Approval, ApprovalState, StateStore
from tests.state.conftest import Backend

NOW = datetime(2026, 11, 22, 3, 0, 0, 123456, tzinfo=UTC)
P = ApprovalState


def approval(approval_id: str = "ap1", *, required: int = 1, minutes: int = 15) -> Approval:
    return Approval(
        id=approval_id,
        action="jobs reset-stuck",
        service="pipeline",
        risk="destructive",
        requester="U0REQ",
        channel="C0OPS",
        request_id="req-1",
        summary="Reset 2 stuck jobs",
        plan={"details": ["job 1", "job 2"], "params": {"ids": ["1", "2"]}, "facts": {"job 1": "processing"}},
        approver_role="approver",
        required_approvals=required,
        self_approve=False,
        created_at=NOW,
        expires_at=NOW + timedelta(minutes=minutes),
    )


async def test_create_and_read_back_everything(store: StateStore) -> None:
    original = approval()
    await store.create_approval(original)
    stored = await store.get_approval("ap1")
    assert stored == original
    assert await store.get_approval("nope") is None


async def test_an_id_is_used_once(store: StateStore) -> None:
    await store.create_approval(approval())
    with pytest.raises(KeyError):
        await store.create_approval(approval())


async def test_transition_is_compare_and_set(store: StateStore) -> None:
    await store.create_approval(approval())
    denied = await store.transition_approval("ap1", [P.PENDING], P.DENIED, at=NOW, by="U0APP")
    assert denied is not None
    assert (denied.state, denied.decided_by, denied.decided_at, denied.version) == (P.DENIED, "U0APP", NOW, 2)
    # Already denied: a second transition from pending finds nothing to change.
    assert await store.transition_approval("ap1", [P.PENDING], P.CANCELLED, at=NOW, by="U0REQ") is None
    assert await store.transition_approval("missing", [P.PENDING], P.DENIED, at=NOW) is None
    assert (await store.get_approval("ap1")).state is P.DENIED  # type: ignore[union-attr]


async def test_run_transitions_stamp_their_times_and_result(store: StateStore) -> None:
    await store.create_approval(approval())
    await store.vote_approval("ap1", "U0APP", at=NOW)
    running = await store.transition_approval("ap1", [P.APPROVED], P.RUNNING, at=NOW + timedelta(seconds=1))
    assert running is not None and running.started_at == NOW + timedelta(seconds=1)
    done = await store.transition_approval(
        "ap1", [P.RUNNING], P.SUCCEEDED, at=NOW + timedelta(seconds=2), result="reset 2 jobs"
    )
    assert done is not None
    assert (done.state, done.finished_at, done.result) == (P.SUCCEEDED, NOW + timedelta(seconds=2), "reset 2 jobs")
    assert done.decided_by == "U0APP"  # the approver is kept through the run


async def test_fifty_concurrent_votes_complete_it_once(store: StateStore) -> None:
    await store.create_approval(approval())
    results = await asyncio.gather(*(store.vote_approval("ap1", f"U{n:04d}", at=NOW) for n in range(50)))
    assert sum(r.completed for r in results) == 1
    assert sum(r.counted for r in results) == 1
    final = await store.get_approval("ap1")
    assert final is not None and final.state is P.APPROVED and len(final.votes) == 1


async def test_two_stores_racing_on_one_database_complete_it_once(store: StateStore, backend: Backend) -> None:
    await store.create_approval(approval())
    other = await backend.open()
    try:
        results = await asyncio.gather(
            *(s.vote_approval("ap1", f"U{n:04d}", at=NOW) for n in range(40) for s in (store, other))
        )
        claims = await asyncio.gather(
            *(s.transition_approval("ap1", [P.APPROVED], P.RUNNING, at=NOW) for _ in range(20) for s in (store, other))
        )
    finally:
        await other.close()
    assert sum(r.completed for r in results) == 1
    assert sum(c is not None for c in claims) == 1


async def test_two_approver_policy_needs_two_distinct_voters(store: StateStore) -> None:
    await store.create_approval(approval(required=2))
    first = await store.vote_approval("ap1", "U0AAA", at=NOW)
    assert first.counted and not first.completed
    assert first.approval is not None and first.approval.state is P.PENDING
    again = await store.vote_approval("ap1", "U0AAA", at=NOW)
    assert not again.counted and not again.completed
    second = await store.vote_approval("ap1", "U0BBB", at=NOW + timedelta(seconds=5))
    assert second.counted and second.completed
    assert second.approval is not None
    assert [v.voter for v in second.approval.votes] == ["U0AAA", "U0BBB"]
    assert second.approval.state is P.APPROVED and second.approval.decided_by == "U0BBB"


async def test_no_vote_counts_after_expiry_or_on_a_decided_approval(store: StateStore) -> None:
    await store.create_approval(approval(minutes=15))
    late = await store.vote_approval("ap1", "U0APP", at=NOW + timedelta(minutes=15))
    assert not late.counted and late.approval is not None and late.approval.state is P.PENDING
    missing = await store.vote_approval("zzz", "U0APP", at=NOW)
    assert missing.approval is None and not missing.counted
    await store.create_approval(replace(approval("ap2"), created_at=NOW + timedelta(seconds=1)))
    await store.transition_approval("ap2", [P.PENDING], P.CANCELLED, at=NOW, by="U0REQ")
    assert not (await store.vote_approval("ap2", "U0APP", at=NOW)).counted


async def test_expire_moves_only_due_pending_approvals(store: StateStore) -> None:
    await store.create_approval(approval("due", minutes=1))
    await store.create_approval(approval("later", minutes=30))
    await store.create_approval(approval("voted", minutes=1))
    await store.vote_approval("voted", "U0APP", at=NOW)
    expired = await store.expire_approvals(at=NOW + timedelta(minutes=1))
    assert [a.id for a in expired] == ["due"]
    assert expired[0].state is P.EXPIRED
    assert await store.expire_approvals(at=NOW + timedelta(minutes=1)) == []
    assert (await store.get_approval("later")).state is P.PENDING  # type: ignore[union-attr]


async def test_list_by_state_is_newest_first(store: StateStore) -> None:
    for n in range(3):
        await store.create_approval(replace(approval(f"a{n}"), created_at=NOW + timedelta(minutes=n)))
    await store.transition_approval("a1", [P.PENDING], P.DENIED, at=NOW, by="U0APP")
    assert [a.id for a in await store.list_approvals([P.PENDING])] == ["a2", "a0"]
    assert [a.id for a in await store.list_approvals([P.PENDING, P.DENIED], limit=2)] == ["a2", "a1"]
    assert await store.list_approvals([]) == []


async def test_attach_message(store: StateStore) -> None:
    await store.create_approval(approval())
    await store.attach_approval_message("ap1", "C0OPS", "1700000000.000100")
    stored = await store.get_approval("ap1")
    assert stored is not None and (stored.message_channel, stored.message_ts) == ("C0OPS", "1700000000.000100")
