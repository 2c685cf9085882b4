"""Roles: user IDs, user groups (cached, fresh on demand), '*', and the role ladder."""

from __future__ import annotations

import pytest

from services.access import GroupLookupFailed, Risk, RoleResolver, describe
from services.inventory import Role, Roles


async def test_roles_from_ids_groups_and_everyone() -> None:
    lookups: list[str] = []
    members = {"S0OPS": frozenset({"U0GROUPED"})}

    async def group_members(group: str) -> frozenset[str]:
        lookups.append(group)
        return members.get(group, frozenset())

    now = [0.0]
    resolver = RoleResolver(
        Roles(viewer=["*"], operator=["S0OPS"], admin=["U0ADMIN"]), group_members, ttl=60, clock=lambda: now[0]
    )
    assert await resolver.roles_of("U0ANYONE") == {Role.VIEWER}
    assert await resolver.roles_of("U0ADMIN") == set(Role)
    assert await resolver.roles_of("U0GROUPED") == {Role.VIEWER, Role.OPERATOR}
    calls = len(lookups)
    await resolver.roles_of("U0GROUPED")
    assert len(lookups) == calls  # cached
    members["S0OPS"] = frozenset()
    assert await resolver.roles_of("U0GROUPED", fresh=True) == {Role.VIEWER}  # removal seen at once
    now[0] = 61
    assert await resolver.roles_of("U0GROUPED") == {Role.VIEWER}


class Groups:
    """A user-group lookup whose members and failures the test sets; counts the lookups."""

    def __init__(self, **members: list[str]) -> None:
        self.members = {group: frozenset(users) for group, users in members.items()}
        self.failing: BaseException | None = None
        self.lookups: list[str] = []

    async def __call__(self, group: str) -> frozenset[str]:
        self.lookups.append(group)
        if self.failing is not None:
            raise self.failing
        return self.members.get(group, frozenset())


async def test_a_failing_group_lookup_grants_nothing() -> None:
    groups = Groups()
    groups.failing = ConnectionError("slack down")
    resolver = RoleResolver(Roles(operator=["S0OPS"]), groups)
    with pytest.raises(GroupLookupFailed) as refused:
        await resolver.roles_of("U0X")
    assert refused.value.outcome == "error" and refused.value.groups == ["S0OPS"]
    assert "could not check your Slack user groups" in refused.value.message
    assert refused.value.detail == "user group S0OPS could not be checked"
    assert describe(frozenset()) == "not in any opsbot role"
    assert describe({Role.VIEWER, Role.OPERATOR}) == "an operator"


@pytest.mark.parametrize(
    "failure",
    [ConnectionError("refused"), TimeoutError(), RuntimeError("missing_scope")],
    ids=["connection", "timeout", "error_reply"],
)
async def test_an_expired_entry_is_never_used_when_the_lookup_fails(failure: BaseException) -> None:
    groups = Groups(S0OPS=["U0GROUPED"])
    now = [0.0]
    resolver = RoleResolver(Roles(viewer=["*"], operator=["S0OPS"]), groups, ttl=60, clock=lambda: now[0])
    assert await resolver.roles_of("U0GROUPED") == {Role.VIEWER, Role.OPERATOR}
    groups.failing = failure
    now[0] = 30
    assert await resolver.roles_of("U0GROUPED") == {Role.VIEWER, Role.OPERATOR}  # still fresh: no lookup
    assert groups.lookups == ["S0OPS"]
    now[0] = 61  # expired: Slack is asked, fails, and the old answer does not count
    for _ in range(2):
        with pytest.raises(GroupLookupFailed):
            await resolver.roles_of("U0GROUPED")
    assert groups.lookups == ["S0OPS"] * 3
    groups.failing = None
    groups.members["S0OPS"] = frozenset()
    assert await resolver.roles_of("U0GROUPED") == {Role.VIEWER}  # back, and Slack's word is the new one


async def test_a_fresh_lookup_that_fails_refuses_even_with_a_cached_answer() -> None:
    groups = Groups(S0APPROVERS=["U0APP"])
    resolver = RoleResolver(Roles(approver=["S0APPROVERS"]), groups)
    assert Role.APPROVER in await resolver.roles_of("U0APP")
    groups.failing = TimeoutError()
    with pytest.raises(GroupLookupFailed):
        await resolver.roles_of("U0APP", fresh=True)  # an approval click never uses the cache
    with pytest.raises(GroupLookupFailed):
        await resolver.roles_of("U0APP")  # and the failure voided the cached answer


async def test_groups_are_read_only_for_roles_above_what_the_user_already_has() -> None:
    groups = Groups(S0ADMINS=["U0BOSS"], S0OPS=["U0OPS"])
    groups.failing = ConnectionError("slack down")
    roles = Roles(viewer=["*"], operator=["S0OPS", "U0DIRECT"], approver=["S0APPROVERS"], admin=["S0ADMINS", "U0ROOT"])
    resolver = RoleResolver(roles, groups)
    resolver.grant("opsbot:scheduler", Role.OPERATOR)
    assert await resolver.roles_of("U0ROOT") == set(Role)  # listed by id at the top: nothing to look up
    assert await resolver.roles_of("opsbot:scheduler") == {Role.VIEWER, Role.OPERATOR}  # no Slack user
    assert groups.lookups == []
    with pytest.raises(GroupLookupFailed) as refused:
        await resolver.roles_of("U0DIRECT")  # an operator by id, but is it an admin or approver too?
    assert refused.value.groups == ["S0ADMINS"] and groups.lookups == ["S0ADMINS"]

    groups.failing = None
    groups.lookups.clear()
    assert await resolver.roles_of("U0BOSS") == set(Role)
    assert groups.lookups == ["S0ADMINS"]  # the highest group that has the user decides; no more lookups


async def test_a_failing_group_of_the_same_role_does_not_hide_one_that_answers() -> None:
    calls: list[str] = []

    async def half_broken(group: str) -> frozenset[str]:
        calls.append(group)
        if group == "S0BROKEN":
            raise ConnectionError("slack down")
        return frozenset({"U0OPS"}) if group == "S0OPS" else frozenset()

    resolver = RoleResolver(Roles(operator=["S0BROKEN", "S0OPS"]), half_broken)
    assert await resolver.roles_of("U0OPS") == {Role.VIEWER, Role.OPERATOR}
    with pytest.raises(GroupLookupFailed):
        await resolver.roles_of("U0OTHER")  # S0BROKEN might have made them an operator
    assert calls == ["S0BROKEN", "S0OPS", "S0BROKEN"]  # S0OPS was cached


def test_risk_needs() -> None:
    assert Risk.READ.required_role is Role.VIEWER
    assert Risk.DESTRUCTIVE.required_role is Role.OPERATOR
    assert Risk.DESTRUCTIVE.needs_approval and not Risk.OPERATE.needs_approval
