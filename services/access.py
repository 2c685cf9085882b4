"""Risk levels and who may do what (DESIGN.md, "Roles and risk")."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from enum import StrEnum

import structlog

from services.inventory import Role, Roles

log = structlog.get_logger(__name__)


class Risk(StrEnum):
    """How much a command can hurt; decides the role it needs and whether it waits for approval."""

    READ = "read"
    OPERATE = "operate"
    CHANGE = "change"
    DESTRUCTIVE = "destructive"

    @property
    def required_role(self) -> Role:
        return Role.VIEWER if self is Risk.READ else Role.OPERATOR

    @property
    def needs_approval(self) -> bool:
        return self in (Risk.CHANGE, Risk.DESTRUCTIVE)


def implied(top: Role | None) -> frozenset[Role]:
    """A role together with every role below it."""
    if top is None:
        return frozenset()
    return frozenset(r for r in Role if r.rank <= top.rank)


def describe(roles: Iterable[Role]) -> str:
    """The highest of a set of roles, for messages ("you are a viewer")."""
    top = max(roles, key=lambda r: r.rank, default=None)
    if top is None:
        return "not in any opsbot role"
    return f"{'an' if top in (Role.OPERATOR, Role.APPROVER, Role.ADMIN) else 'a'} {top.value}"


GroupMembers = Callable[[str], Awaitable[frozenset[str]]]


class RoleResolver:
    """Works out a Slack user's roles from user IDs and user-group IDs in the inventory.

    Group membership comes from ``group_members`` (the Web API, for the bot) and is cached for
    ``ttl`` seconds; ``fresh=True`` bypasses the cache (approval clicks). A group that cannot be
    resolved grants nothing: access fails closed.
    """

    def __init__(
        self,
        roles: Roles,
        group_members: GroupMembers | None = None,
        *,
        ttl: float = 300.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._roles = roles
        self._group_members = group_members
        self._ttl = ttl
        self._clock = clock or time.monotonic
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._granted: dict[str, Role] = {}

    def grant(self, user_id: str, role: Role) -> None:
        """Give a user a role outside the inventory (the local CLI user)."""
        self._granted[user_id] = role

    async def _members(self, group_id: str, fresh: bool) -> frozenset[str]:
        if self._group_members is None:
            return frozenset()
        now = self._clock()
        cached = self._cache.get(group_id)
        if cached is not None and not fresh and now - cached[0] < self._ttl:
            return cached[1]
        try:
            members = await self._group_members(group_id)
        except Exception:
            log.warning("usergroup_lookup_failed", usergroup=group_id, exc_info=True)
            return cached[1] if cached is not None and not fresh else frozenset()
        self._cache[group_id] = (now, members)
        return members

    async def roles_of(self, user_id: str, *, fresh: bool = False) -> frozenset[Role]:
        top: Role | None = self._granted.get(user_id)
        for role in Role:
            for member in self._roles.members(role):
                if member in ("*", user_id) or (
                    member.startswith("S") and user_id in await self._members(member, fresh)
                ):
                    top = role if top is None or role.rank > top.rank else top
                    break
        return implied(top)
