"""What a command receives (OpsContext, Deps) and what it returns (Reply)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.access import RoleResolver
from services.health import HealthProbe, ProbeObserver, Status, Target
from services.inventory import Inventory, LoadedInventory, Role
from services.redaction import Redactor
from services.state import StateStore

Block = dict[str, Any]
CommandObserver = Callable[[str, str, float], None]


@dataclass
class Deps:
    """Everything commands need, built once by bot/ and handed in."""

    loaded: LoadedInventory
    store: StateStore
    probes: Mapping[str, HealthProbe]
    redactor: Redactor
    roles: RoleResolver
    observe_probe: ProbeObserver | None = None
    observe_command: CommandObserver | None = None

    @property
    def inventory(self) -> Inventory:
        return self.loaded.inventory

    def probe_for(self, target: Target) -> HealthProbe | None:
        return self.probes.get(target.type)


@dataclass(frozen=True)
class OpsContext:
    """One request: who asked, where, and the request id that ties logs and audit together."""

    user_id: str
    channel_id: str
    request_id: str
    roles: frozenset[Role]
    deps: Deps
    interface: str = "slack"


@dataclass
class Reply:
    """A command's answer. ``blocks`` is the full content; ``summary`` is shown first when it is too
    long for one Slack message (the rest then continues in the thread)."""

    text: str
    blocks: list[Block] = field(default_factory=list)
    summary: list[Block] | None = None
    ephemeral: bool = False
    status: Status | None = None
    outcome: str = "ok"
