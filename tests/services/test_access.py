"""Roles: user IDs, user groups (cached, fresh on demand), '*', and the role ladder."""

from __future__ import annotations

from services.access import Risk, RoleResolver, describe
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


async def test_a_failing_group_lookup_grants_nothing() -> None:
    async def broken(group: str) -> frozenset[str]:
        raise ConnectionError("slack down")

    resolver = RoleResolver(Roles(operator=["S0OPS"]), broken)
    assert await resolver.roles_of("U0X") == frozenset()
    assert describe(frozenset()) == "not in any opsbot role"
    assert describe({Role.VIEWER, Role.OPERATOR}) == "an operator"


def test_risk_needs() -> None:
    assert Risk.READ.required_role is Role.VIEWER
    assert Risk.DESTRUCTIVE.required_role is Role.OPERATOR
    assert Risk.DESTRUCTIVE.needs_approval and not Risk.OPERATE.needs_approval
