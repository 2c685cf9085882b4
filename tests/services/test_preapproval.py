"""The pre-approval of scheduled plans (DESIGN: pre-approved schedules): only the named command of the
named schedule, only below the ceiling of items and of share; every refusal says why."""

from __future__ import annotations

import pytest

from services.approvals import Plan, preapproval
from services.inventory import ApprovalSettings, PreApproval


def settings(**rule: object) -> ApprovalSettings:
    return ApprovalSettings(schedules={"nightly": PreApproval.model_validate({"command": "cleanup", **rule})})


def plan(count: int | None, total: int | None = None, action: str = "cleanup") -> Plan:
    return Plan(action=action, service="vcc", summary="Delete things", count=count, total=total)


def test_no_pre_approval_for_another_schedule_or_command() -> None:
    rules = settings(max_items=10)
    assert preapproval(rules, plan(1), "weekly") is None
    assert preapproval(rules, plan(1, action="queue clean"), "nightly") is None


@pytest.mark.parametrize(("count", "allowed"), [(0, True), (9, True), (10, True), (11, False), (None, False)])
def test_the_item_ceiling_is_inclusive_and_an_uncounted_plan_is_posted(count: int | None, allowed: bool) -> None:
    found = preapproval(settings(max_items=10), plan(count), "nightly")
    assert found is not None and found.allowed is allowed
    if count is None:
        assert (
            found.note
            == "Posted for approval: schedule `nightly` is pre-approved, but this plan does not count what it deletes."
        )
    elif allowed:
        assert found.note == (
            f"Pre-approved: schedule `nightly` may run `/ops cleanup` unasked up to 10 item(s); this plan: {count}."
        )
    else:
        assert found.note == (
            "Posted for approval: it deletes 11 item(s), above the 10 schedule `nightly` is pre-approved for."
        )


@pytest.mark.parametrize(
    ("count", "total", "allowed", "said"),
    [
        (5, 100, True, "unasked up to 1,000 item(s) and 5 %; this plan: 5."),
        (6, 100, False, "it deletes 6.0 % (6 of 100), above the 5 % schedule `nightly` is pre-approved for."),
        (3, 0, False, "this plan cannot say what share it is."),
        (3, None, False, "this plan cannot say what share it is."),
        # An emptied chunk table makes every vector an orphan: 100 % is far above any share ceiling.
        (800, 800, False, "it deletes 100.0 % (800 of 800)"),
    ],
)
def test_the_share_ceiling(count: int, total: int | None, allowed: bool, said: str) -> None:
    found = preapproval(settings(max_items=1000, max_share_pct=5), plan(count, total), "nightly")
    assert found is not None and found.allowed is allowed and said in found.note


def test_count_and_total_are_kept_with_the_stored_plan() -> None:
    stored = plan(7, 70).stored()
    assert stored["count"] == 7 and stored["total"] == 70 and "count" not in stored["facts"]
