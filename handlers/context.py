"""What a command receives (OpsContext, Deps) and what it returns (Reply)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from services.access import RoleResolver
from services.approvals import ApprovalEngine
from services.backup.runner import BackupRunner
from services.deploy.providers import DeployProviders
from services.figures.base import FigureSource
from services.figures.http import ScrapeHistory
from services.health import HealthProbe, InFlightProbes, ProbeObserver, Status, Target
from services.inventory import Inventory, LoadedInventory, Role
from services.logs.base import LogBackend
from services.redaction import Redactor
from services.state import Approval, StateStore

log = structlog.get_logger(__name__)

Block = dict[str, Any]
Progress = Callable[[str], Awaitable[None]]
Live = Callable[[str, list[Block]], Awaitable[None]]
CommandObserver = Callable[[str, str, float], None]


class RunningCommands:
    """Counts commands still at work, so a shutdown can wait for them (nothing half-answered)."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def count(self) -> int:
        return self._count

    @contextlib.asynccontextmanager
    async def track(self) -> AsyncIterator[None]:
        self._count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._count -= 1
            if self._count == 0:
                self._idle.set()

    async def idle(self) -> None:
        """Return once no command is running."""
        await self._idle.wait()


class PendingAcks:
    """Slack requests received whose answer (the ack) has not gone out yet.

    Acks first: a command's work waits until none is pending, so that a burst of commands is acked
    before any of them starts working (work started after one ack otherwise delays the next ones).
    A steady stream of requests never holds work back longer than ``most_wait``.
    """

    def __init__(self, most_wait: float = 0.5) -> None:
        self.most_wait = most_wait
        self._count = 0
        self._none = asyncio.Event()
        self._none.set()

    @property
    def count(self) -> int:
        return self._count

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """Count one request until its answer is ready to go out."""
        self._count += 1
        self._none.clear()
        try:
            yield
        finally:
            self._count -= 1
            if self._count == 0:
                self._none.set()

    async def settled(self) -> None:
        """Return once no ack is pending (this request's own included), or after ``most_wait``."""
        if self._count == 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.most_wait):
                await self._none.wait()


class Notifier(Protocol):
    """Where approvals are shown as they change (the Slack message; the console; nowhere)."""

    async def show(self, approval: Approval, note: str | None = None) -> None:
        """Bring the approval's message up to date (``note``: a progress line)."""

    async def finished(self, approval: Approval) -> None:
        """A run has ended: post its result (details in the message's thread)."""

    async def announce(self, channel: str | None, text: str) -> None:
        """Tell a channel something nobody asked about (an interrupted run)."""


class SilentNotifier:
    """Shows nothing: for interfaces without a place to show approvals."""

    async def show(self, approval: Approval, note: str | None = None) -> None:
        return None

    async def finished(self, approval: Approval) -> None:
        return None

    async def announce(self, channel: str | None, text: str) -> None:
        return None


@dataclass
class Deps:
    """Everything commands need, built once by bot/ and handed in."""

    loaded: LoadedInventory
    store: StateStore
    probes: Mapping[str, HealthProbe]
    redactor: Redactor
    roles: RoleResolver
    approvals: ApprovalEngine
    notifier: Notifier = field(default_factory=SilentNotifier)
    backups: BackupRunner | None = None
    deploys: DeployProviders | None = None
    observe_probe: ProbeObserver | None = None
    observe_command: CommandObserver | None = None
    in_flight: InFlightProbes = field(default_factory=InFlightProbes)
    running: RunningCommands = field(default_factory=RunningCommands)
    acks: PendingAcks = field(default_factory=PendingAcks)
    figures: Mapping[str, FigureSource] = field(default_factory=dict)
    """`/ops status`'s figure sources by component type, built once (empty: built per request)."""
    scrape_history: ScrapeHistory = field(default_factory=ScrapeHistory)
    logs: Mapping[str, LogBackend] = field(default_factory=dict)
    """`/ops logs`'s backends by component type, built once (empty: built per request)."""
    """The watcher's kept /metrics scrapes, which `/ops status` reads request rates from."""

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
    progress: Progress | None = None
    live: Live | None = None

    async def tell(self, text: str) -> None:
        """A short note to the caller alone while a slow command works (never fails the command)."""
        if self.progress is None:
            return
        try:
            await self.progress(text)
        except Exception:
            log.warning("progress_note_failed", exc_info=True)

    async def show(self, text: str, blocks: list[Block]) -> None:
        """Post, then edit, this request's one public status message (a backup's progress); the
        final reply replaces it. Never fails the command."""
        if self.live is None:
            return
        try:
            await self.live(text, blocks)
        except Exception:
            log.warning("live_message_failed", exc_info=True)


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
    approval_id: str | None = None
    detail: str = ""  # for the audit log, when the outcome needs explaining (which backups failed)
    files: list[Upload] = field(default_factory=list)  # uploaded in the thread of a public reply


@dataclass(frozen=True)
class Upload:
    """A file a reply carries (the weekly digest's chart)."""

    filename: str
    title: str
    content: bytes
