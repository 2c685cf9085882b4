"""The approval engine's rules on their own: policy, drift, ids, who may act on what."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.access import Risk, RoleResolver
from services.approvals import (
    ApprovalEngine,
    Outcome,
    Plan,
    Progress,
    Refused,
    drift,
    fingerprint,
    new_approval_id,
    policy_for,
)
from services.errors import CommandError, PermissionDenied
from services.inventory import ApprovalSettings, Role, Roles
from services.locks import LocalLocks, open_locks
from services.redaction import Redactor
from services.state import ApprovalState, StateStore, open_state_store
from tests.fixtures.servers import redis_process

S = ApprovalState
NOW = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


class Recorder:
    """An action that records what it was asked to do; its facts can be changed by the test."""

    def __init__(self) -> None:
        self.facts: dict[str, str] = {"row 1": "stuck"}
        self.ran: list[Plan] = []
        self.fail: Exception | None = None

    async def observe(self, plan: Plan) -> Mapping[str, str]:
        return dict(self.facts)

    async def execute(self, plan: Plan, progress: Progress) -> Outcome:
        await progress("working")
        if self.fail is not None:
            raise self.fail
        self.ran.append(plan)
        return Outcome("did it", ("line 1", "line 2"))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    opened = await open_state_store(None, default_path=tmp_path / "state.db")
    yield opened
    await opened.close()


def engine_for(store: StateStore, settings: ApprovalSettings | None = None) -> tuple[ApprovalEngine, Recorder]:
    roles = Roles(operator=["U0REQ"], approver=["U0APP", "U0APP2"], admin=["U0ADM"])
    engine = ApprovalEngine(
        store,
        LocalLocks(),
        RoleResolver(roles),
        settings or ApprovalSettings(),
        Redactor(["hunter2"]),
        timezone="Asia/Seoul",
        clock=lambda: NOW,
    )
    action = Recorder()
    engine.register("fix", action)
    return engine, action


def plan(summary: str = "Fix row 1") -> Plan:
    return Plan("fix", "shop", summary, ("row 1",), {"ids": [1]}, {"row 1": "stuck"})


async def noop(*_: object) -> None:
    return None


def test_policy_defaults_by_risk() -> None:
    settings = ApprovalSettings()
    destructive = policy_for(settings, "fix", Risk.DESTRUCTIVE)
    assert (destructive.approver_role, destructive.self_approve, destructive.approvers) == (Role.APPROVER, False, 1)
    assert destructive.expiry == timedelta(minutes=15)
    assert policy_for(settings, "fix", Risk.CHANGE).self_approve is True


def test_policy_command_rule_overrides_the_risk_rule_field_by_field() -> None:
    settings = ApprovalSettings.model_validate(
        {
            "expiry_minutes": 30,
            "risk": {"destructive": {"approver_role": "admin", "expiry_minutes": 5}},
            "commands": {"fix": {"critical": True}, "other": {"approvers": 3}},
        }
    )
    fix = policy_for(settings, "fix", Risk.DESTRUCTIVE)
    assert (fix.approver_role, fix.approvers, fix.critical, fix.expiry) == (Role.ADMIN, 2, True, timedelta(minutes=5))
    assert policy_for(settings, "other", Risk.CHANGE).approvers == 3
    assert policy_for(settings, "other", Risk.CHANGE).expiry == timedelta(minutes=30)


def test_drift_names_each_changed_fact_and_fingerprint_is_order_free() -> None:
    before = {"job 1": "processing", "job 2": "processing"}
    assert drift(before, dict(before)) == []
    assert drift(before, {"job 1": "done", "job 2": "processing", "job 3": "new"}) == [
        "job 1: processing → done",
        "job 3: absent → new",
    ]
    assert drift(before, {"job 1": "processing"}) == ["job 2: processing → gone"]
    assert fingerprint({"a": "1", "b": "2"}) == fingerprint({"b": "2", "a": "1"}) != fingerprint({"a": "1"})


def test_ids_are_short_and_unambiguous() -> None:
    ids = {new_approval_id() for _ in range(500)}
    assert len(ids) == 500
    assert all(len(i) == 8 and not set(i) & set("0o1li") for i in ids)


async def test_a_request_stores_the_plan_redacted_with_its_policy(store: StateStore) -> None:
    engine, _ = engine_for(store)
    approval = await engine.request(
        plan("Fix row 1 using hunter2"), risk=Risk.DESTRUCTIVE, requester="U0REQ", channel="C0OPS", request_id="r1"
    )
    assert approval.summary == "Fix row 1 using ***"
    assert (approval.state, approval.required_approvals, approval.self_approve) == (S.PENDING, 1, False)
    assert approval.expires_at == NOW + timedelta(minutes=15)
    assert approval.plan["fingerprint"] == fingerprint({"row 1": "stuck"})
    with pytest.raises(RuntimeError):  # a plan with no code behind it is a programming error, never stored
        await engine.request(
            Plan("nope", "shop", "x"), risk=Risk.CHANGE, requester="U0REQ", channel="C", request_id="r"
        )


async def test_approve_runs_the_action_once_and_records_the_result(store: StateStore) -> None:
    engine, action = engine_for(store)
    approval = await engine.request(plan(), risk=Risk.DESTRUCTIVE, requester="U0REQ", channel="C0OPS", request_id="r")
    decision = await engine.approve(approval.id, "U0APP", request_id="r2")
    assert decision.start_run
    seen: list[ApprovalState] = []

    async def changed(a: object) -> None:
        seen.append(a.state)  # type: ignore[attr-defined]

    final = await engine.run(decision.approval, request_id="r2", progress=noop, changed=changed)
    assert final.state is S.SUCCEEDED and final.result == "did it\nline 1\nline 2"
    assert seen == [S.RUNNING, S.SUCCEEDED]
    again = await engine.run(decision.approval, request_id="r3", progress=noop, changed=changed)
    assert again.state is S.SUCCEEDED and len(action.ran) == 1  # a second run call finds it claimed
    assert await engine.locks.holder("service:shop") is None  # the lock is released


async def test_a_run_whose_lock_service_is_down_ends_failed_and_says_why(store: StateStore) -> None:
    """Redis (the lock store) down when the last vote lands: the run cannot start, so the approval
    ends failed with the reason, audited and shown, instead of staying approved with nothing to run it."""
    engine, action = engine_for(store)
    with redis_process() as url:  # up while the plan is requested and approved, down when the run starts
        engine.locks = await open_locks(f"{url}/0", timeout=1)
        approval = await engine.request(
            plan(), risk=Risk.DESTRUCTIVE, requester="U0REQ", channel="C0OPS", request_id="r"
        )
        decision = await engine.approve(approval.id, "U0APP", request_id="r2")
    try:
        seen: list[ApprovalState] = []

        async def changed(a: object) -> None:
            seen.append(a.state)  # type: ignore[attr-defined]

        final = await engine.run(decision.approval, request_id="r2", progress=noop, changed=changed)
    finally:
        await engine.locks.close()
    assert final.state is S.FAILED
    assert final.result == "Did not start: The lock service (Redis) is not answering, so nothing was started."
    assert seen == [S.FAILED] and action.ran == []
    [event] = [e for e in await store.audit_events() if e.command == "approval failed"]
    assert event.outcome == "failed" and "not answering" in event.detail


async def test_a_failing_action_ends_failed_with_a_plain_message(store: StateStore) -> None:
    engine, action = engine_for(store)
    for error, expected in (
        (CommandError("the database refused: hunter2"), "Failed: the database refused: ***"),
        (RuntimeError("boom"), "Failed (ref r2); the details are in the bot's log."),
    ):
        action.fail = error
        approval = await engine.request(plan(), risk=Risk.DESTRUCTIVE, requester="U0REQ", channel="C", request_id="r")
        decision = await engine.approve(approval.id, "U0APP", request_id="r2")
        final = await engine.run(decision.approval, request_id="r2", progress=noop, changed=noop)
        assert (final.state, final.result) == (S.FAILED, expected)


async def test_roles_are_checked_fresh_and_admins_may_approve(store: StateStore) -> None:
    engine, _ = engine_for(store)
    approval = await engine.request(plan(), risk=Risk.DESTRUCTIVE, requester="U0REQ", channel="C", request_id="r")
    with pytest.raises(PermissionDenied, match="needs the approver role; you are an operator"):
        await engine.approve(approval.id, "U0REQ", request_id="r")
    assert (await engine.approve(approval.id, "U0ADM", request_id="r")).start_run


async def test_change_requests_may_be_self_approved(store: StateStore) -> None:
    engine, _ = engine_for(store)
    approval = await engine.request(plan(), risk=Risk.CHANGE, requester="U0APP", channel="C", request_id="r")
    assert (await engine.approve(approval.id, "U0APP", request_id="r")).start_run


async def test_recover_interrupts_orphaned_runs_and_fails_stale_approvals(store: StateStore) -> None:
    engine, _ = engine_for(store)
    orphan = await engine.request(plan(), risk=Risk.DESTRUCTIVE, requester="U0REQ", channel="C", request_id="r")
    stale = await engine.request(plan(), risk=Risk.DESTRUCTIVE, requester="U0REQ", channel="C", request_id="r")
    fresh = await engine.request(plan(), risk=Risk.DESTRUCTIVE, requester="U0REQ", channel="C", request_id="r")
    for a in (orphan, stale, fresh):
        await engine.approve(a.id, "U0APP", request_id="r")
    await store.transition_approval(orphan.id, [S.APPROVED], S.RUNNING, at=NOW)
    await store.transition_approval(stale.id, [S.APPROVED], S.APPROVED, at=NOW - timedelta(minutes=5), by="U0APP")
    ended = {a.id: a.state for a in await engine.recover()}
    assert ended == {orphan.id: S.INTERRUPTED, stale.id: S.FAILED}
    assert (await store.get_approval(fresh.id)).state is S.APPROVED  # type: ignore[union-attr]


async def test_a_run_holding_its_lock_is_not_recovered(store: StateStore) -> None:
    engine, _ = engine_for(store)
    approval = await engine.request(plan(), risk=Risk.DESTRUCTIVE, requester="U0REQ", channel="C", request_id="r")
    await engine.approve(approval.id, "U0APP", request_id="r")
    await store.transition_approval(approval.id, [S.APPROVED], S.RUNNING, at=NOW)
    await engine.locks.acquire("service:shop", approval.id)
    assert await engine.recover() == []


async def test_actionable_lists_what_each_user_may_do(store: StateStore) -> None:
    engine, _ = engine_for(store)
    mine = await engine.request(plan(), risk=Risk.DESTRUCTIVE, requester="U0APP", channel="C", request_id="r")
    theirs = await engine.request(plan(), risk=Risk.DESTRUCTIVE, requester="U0REQ", channel="C", request_id="r")
    assert {(a.id, may) for a, may in await engine.actionable("U0APP")} == {(theirs.id, True), (mine.id, False)}
    assert [a.id for a, may in await engine.actionable("U0REQ")] == [theirs.id]
    assert await engine.actionable("U0NOBODY") == []


async def test_times_are_shown_in_the_inventory_zone(store: StateStore) -> None:
    engine, _ = engine_for(store)
    assert engine.when(NOW) == "12:00 KST"
    assert engine.when(NOW - timedelta(days=2)) == "2026-11-20 12:00 KST"


async def test_expired_decisions_say_so_and_report_the_change(store: StateStore) -> None:
    engine, _ = engine_for(store)
    approval = await engine.request(plan(), risk=Risk.DESTRUCTIVE, requester="U0REQ", channel="C", request_id="r")
    engine.clock = lambda: NOW + timedelta(minutes=15)
    with pytest.raises(Refused) as refused:
        await engine.deny(approval.id, "U0APP", request_id="r")
    assert refused.value.changed is not None and refused.value.changed.state is S.EXPIRED
    assert refused.value.message.startswith("This request expired at 12:15 KST")
