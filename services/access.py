"""Risk levels and who may do what (DESIGN.md, "Roles and risk")."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Iterable
from enum import StrEnum

import structlog

from services.errors import CommandError, PermissionDenied
from services.inventory import Role, Roles

log = structlog.get_logger(__name__)

SCHEDULER_USER = "opsbot:scheduler"  # the actor scheduled commands run (and are audited) as


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

GROUP_CACHE_TTL = 300.0  # seconds a user group's members are trusted (the README's 5 minutes)
_SLACK_USER = re.compile(r"^[UW][A-Z0-9]+$")  # only Slack users can be in a user group


class GroupLookupFailed(CommandError):
    """A user group that could give the caller a role could not be read from Slack: nothing is granted
    on old or partial data, and the caller is told to try again (audited as an error)."""

    def __init__(self, groups: list[str]) -> None:
        super().__init__(
            "opsbot could not check your Slack user groups just now, so nothing was done; try again in a minute.",
            outcome="error",
        )
        self.groups = groups
        self.detail = f"user group{'s' if len(groups) > 1 else ''} {', '.join(groups)} could not be checked"


class RoleResolver:
    """Works out a Slack user's roles from user IDs and user-group IDs in the inventory.

    Group membership comes from ``group_members`` (the Web API, for the bot) and is cached for
    ``ttl`` seconds; ``fresh=True`` bypasses the cache (approval clicks). Groups are read only for
    roles above what the user holds without them. A group that cannot be read grants nothing, and
    its old members are never used: the caller is refused with :class:`GroupLookupFailed`, because
    the role it might have given is unknown.
    """

    def __init__(
        self,
        roles: Roles,
        group_members: GroupMembers | None = None,
        *,
        ttl: float = GROUP_CACHE_TTL,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._roles = roles
        self._group_members = group_members
        self.ttl = ttl
        self._clock = clock or time.monotonic
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._granted: dict[str, Role] = {}

    @property
    def read_listed(self) -> frozenset[str]:
        """Services with their own readers in ``roles.read``."""
        return frozenset(self._roles.read)

    def grant(self, user_id: str, role: Role) -> None:
        """Give a user a role outside the inventory (the local CLI user)."""
        self._granted[user_id] = role

    async def _members(self, group_id: str, fresh: bool) -> frozenset[str] | None:
        """The group's members, or None when Slack could not say (never the expired entry)."""
        if self._group_members is None:
            return frozenset()
        now = self._clock()
        cached = self._cache.get(group_id)
        if cached is not None and not fresh and now - cached[0] < self.ttl:
            return cached[1]
        try:
            members = await self._group_members(group_id)
        except Exception:
            self._cache.pop(group_id, None)  # what it said before no longer counts
            log.warning("usergroup_lookup_failed", usergroup=group_id, exc_info=True)
            return None
        self._cache[group_id] = (now, members)
        return members

    def _direct(self, user_id: str) -> Role | None:
        top: Role | None = self._granted.get(user_id)
        for role in Role:
            if any(member in ("*", user_id) for member in self._roles.members(role)):
                top = role if top is None or role.rank > top.rank else top
        return top

    def direct_roles(self, user_id: str) -> frozenset[Role]:
        """The roles the user holds without any user group: what is certain when Slack cannot be asked."""
        return implied(self._direct(user_id))

    async def roles_of(self, user_id: str, *, fresh: bool = False) -> frozenset[Role]:
        """The user's roles. Raises :class:`GroupLookupFailed` when the groups of a role above the
        user's other roles could not be read (that role might be theirs)."""
        top = self._direct(user_id)
        if self._group_members is None or not _SLACK_USER.match(user_id):
            return implied(top)
        for role in reversed(Role):  # the highest role first: the first group that has the user decides
            if top is not None and role.rank <= top.rank:
                break
            unreadable: list[str] = []
            for group in (m for m in self._roles.members(role) if m.startswith("S")):
                members = await self._members(group, fresh)
                if members is None:
                    unreadable.append(group)
                elif user_id in members:
                    return implied(role)
            if unreadable:  # this role may be theirs, and no lower role can settle it
                raise GroupLookupFailed(unreadable)
        return implied(top)

    async def may_read(self, user_id: str, service: str, roles: frozenset[Role], *, fresh: bool = False) -> bool:
        """Whether the user may read ``service``'s sensitive data (logs; users and usage), given the roles
        they hold (DESIGN: per-service read permission). Admins always may. A service listed in
        ``roles.read``: only its listed users, user groups or "*". A service not listed: operators and up,
        never viewers. A listed user group that cannot be read grants nothing: the caller is refused with
        :class:`GroupLookupFailed`, as for roles."""
        if Role.ADMIN in roles:
            return True
        readers = self._roles.read.get(service)
        if readers is None:
            return Role.OPERATOR in roles
        if any(member in ("*", user_id) for member in readers):
            return True
        if self._group_members is None or not _SLACK_USER.match(user_id):
            return False
        unreadable: list[str] = []
        for group in (m for m in readers if m.startswith("S")):
            members = await self._members(group, fresh)
            if members is None:
                unreadable.append(group)
            elif user_id in members:
                return True
        if unreadable:
            raise GroupLookupFailed(unreadable)
        return False


async def check_read(resolver: RoleResolver, user_id: str, service: str, roles: frozenset[Role], what: str) -> None:
    """Refuse, in one sentence, a sensitive read (``what``: "logs", "users", "usage") of a service the
    caller may not read; the one check every such command makes."""
    if not await resolver.may_read(user_id, service, roles):
        listed = service in resolver.read_listed
        why = "is not given to you in the inventory's roles.read" if listed else "needs the operator role"
        raise PermissionDenied(f"Reading the {what} of `{service}` {why}; you are {describe(roles)}.")
