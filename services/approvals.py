"""The approval engine: a plan waits for its approvers, runs once, and every step is audited.

It knows nothing of Slack. Handlers render approvals and turn clicks into calls here; every
state change is one compare-and-set in the state store, so a double click, a retry or a second
replica finds the work already done and is told why.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import structlog

from services.access import GroupLookupFailed, Risk, RoleResolver, describe
from services.audit import record_event
from services.errors import CommandError, PermissionDenied
from services.inventory import ApprovalSettings, Role
from services.locks import ServiceLocks
from services.redaction import Redactor
from services.state import Approval, ApprovalState, StateStore
from services.text import escape

log = structlog.get_logger(__name__)

S = ApprovalState
APPROVAL_ID = re.compile(r"^[a-z0-9]{8}$")
_ID_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i: ids are read aloud and typed
# How long observing the world (the fingerprint) may take before the run is called off.
OBSERVE_TIMEOUT = 30.0
# An approval left `approved` (never started) this long by a replica that died is failed by the sweeper.
STALE_APPROVED = timedelta(minutes=1)

Progress = Callable[[str], Awaitable[None]]
Changed = Callable[[Approval], Awaitable[None]]
ApprovalObserver = Callable[[str, str], None]  # (event, action), e.g. ("approved", "jobs reset-stuck")


def new_approval_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


def fingerprint(facts: Mapping[str, str]) -> str:
    """sha256 of the facts a plan saw, in a canonical form."""
    payload = json.dumps(dict(facts), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def drift(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """What changed between two observations, one line per fact: ``job 7: processing → done``."""
    return [
        f"{key}: {before.get(key, 'absent')} → {after.get(key, 'gone')}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]


@dataclass(frozen=True)
class Plan:
    """What a change will do, exactly, and the facts it saw (the fingerprint is their hash)."""

    action: str
    service: str
    summary: str
    details: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    facts: Mapping[str, str] = field(default_factory=dict)
    count: int | None = None
    """How many items (documents, files, jobs, points) it deletes or changes: a pre-approval's ceiling."""
    total: int | None = None
    """How many there are in what it deletes from (the collection), for a ceiling given as a share."""

    def stored(self) -> dict[str, Any]:
        return {
            "details": list(self.details),
            "params": dict(self.params),
            "facts": dict(self.facts),
            "fingerprint": fingerprint(self.facts),
            "count": self.count,
            "total": self.total,
        }


def plan_of(approval: Approval) -> Plan:
    """The plan an approval was made from."""
    return Plan(
        action=approval.action,
        service=approval.service,
        summary=approval.summary,
        details=tuple(approval.plan.get("details", ())),
        params=dict(approval.plan.get("params", {})),
        facts=dict(approval.plan.get("facts", {})),
        count=approval.plan.get("count"),
        total=approval.plan.get("total"),
    )


@dataclass(frozen=True)
class Outcome:
    """What a run did: one line, then the details (posted in the thread)."""

    summary: str
    details: tuple[str, ...] = ()
    ok: bool = True


class Action(Protocol):
    """The code behind one approval-gated command."""

    async def observe(self, plan: Plan) -> Mapping[str, str]:
        """The facts the plan depends on, as they are now (compared with ``plan.facts``)."""

    async def execute(self, plan: Plan, progress: Progress) -> Outcome:
        """Do the work. Raise CommandError for an expected failure."""


@dataclass(frozen=True)
class Policy:
    """The approval policy that applies to one request."""

    approver_role: Role
    self_approve: bool
    approvers: int
    expiry: timedelta
    critical: bool


def policy_for(settings: ApprovalSettings, action: str, risk: Risk) -> Policy:
    """Defaults, overridden by the risk level's rule, overridden by the command's rule."""
    values: dict[str, Any] = {
        "approver_role": "approver",
        "self_approve": risk is not Risk.DESTRUCTIVE,
        "approvers": None,
        "critical": False,
        "expiry_minutes": settings.expiry_minutes,
    }
    for rule in (settings.risk.get(risk.value), settings.commands.get(action)):  # type: ignore[call-overload]
        if rule is not None:
            values.update({name: getattr(rule, name) for name in rule.model_fields_set})
    return Policy(
        approver_role=Role(values["approver_role"]),
        self_approve=bool(values["self_approve"]),
        approvers=values["approvers"] or (2 if values["critical"] else 1),
        expiry=timedelta(minutes=values["expiry_minutes"]),
        critical=bool(values["critical"]),
    )


@dataclass(frozen=True)
class PreApproved:
    """Whether a schedule's plan may run without a click, and the sentence that says why (or why not)."""

    allowed: bool
    note: str


def preapproval(settings: ApprovalSettings, plan: Plan, schedule: str) -> PreApproved | None:
    """Hold a scheduled plan against the schedule's pre-approval; None when the schedule has none for
    this command (the plan is then posted for approval like any other)."""
    rule = settings.schedules.get(schedule)
    if rule is None or rule.command != plan.action:
        return None
    who = f"schedule `{schedule}`"
    if plan.count is None:
        return PreApproved(False, f"Posted for approval: {who} is pre-approved, but this plan does not count "
                                  "what it deletes.")  # fmt: skip
    if plan.count > rule.max_items:
        return PreApproved(
            False,
            f"Posted for approval: it deletes {plan.count:,} item(s), above the {rule.max_items:,} "
            f"{who} is pre-approved for.",
        )
    ceiling = f"up to {rule.max_items:,} item(s)"
    if rule.max_share_pct is not None:
        if not plan.total:
            return PreApproved(
                False,
                f"Posted for approval: {who} is pre-approved up to {rule.max_share_pct:g} % of what it deletes "
                "from, and this plan cannot say what share it is.",
            )
        share = 100 * plan.count / plan.total
        if share > rule.max_share_pct:
            return PreApproved(
                False,
                f"Posted for approval: it deletes {share:.1f} % ({plan.count:,} of {plan.total:,}), above the "
                f"{rule.max_share_pct:g} % {who} is pre-approved for.",
            )
        ceiling += f" and {rule.max_share_pct:g} %"
    return PreApproved(
        True, f"Pre-approved: {who} may run `/ops {plan.action}` unasked {ceiling}; this plan: {plan.count:,}."
    )


class Refused(CommandError):
    """A click or approval command that can do nothing; ``changed`` is set when finding that out
    changed the approval (it had expired), so its message should be brought up to date."""

    def __init__(self, message: str, *, outcome: str = "refused", changed: Approval | None = None) -> None:
        super().__init__(message, outcome=outcome)
        self.changed = changed


@dataclass(frozen=True)
class Decision:
    """The result of a click or an approval command: the approval now, a sentence for the person who
    acted, and whether the run should start (only for the vote that completed the approval)."""

    approval: Approval
    message: str
    start_run: bool = False


def lock_key(service: str) -> str:
    return f"service:{service}"


def mention(user: str | None) -> str:
    if not user:
        return "someone"
    return f"<@{user}>" if re.fullmatch(r"[UW][A-Z0-9]{2,}", user) else user


class ApprovalEngine:
    """Requests, votes, denials, cancellations, runs, expiry and recovery of approvals."""

    def __init__(
        self,
        store: StateStore,
        locks: ServiceLocks,
        roles: RoleResolver,
        settings: ApprovalSettings,
        redactor: Redactor,
        *,
        timezone: str = "UTC",
        clock: Callable[[], datetime] | None = None,
        observe: ApprovalObserver | None = None,
    ) -> None:
        self.store = store
        self.locks = locks
        self.roles = roles
        self.settings = settings
        self.redactor = redactor
        self.zone = ZoneInfo(timezone)
        self.clock = clock or (lambda: datetime.now(UTC))
        self.actions: dict[str, Action] = {}
        self.instance = uuid.uuid4().hex[:8]
        self.observe = observe

    def register(self, verb: str, action: Action) -> None:
        self.actions[verb] = action

    def when(self, moment: datetime | None) -> str:
        """A time as people in the ops channel read it."""
        if moment is None:
            return "?"
        local = moment.astimezone(self.zone)
        return (
            local.strftime("%H:%M %Z")
            if local.date() == self.clock().astimezone(self.zone).date()
            else (local.strftime("%Y-%m-%d %H:%M %Z"))
        )

    # -- requests -------------------------------------------------------------------------

    async def request(
        self,
        plan: Plan,
        *,
        risk: Risk,
        requester: str,
        channel: str,
        request_id: str,
        check_channel: bool = True,
    ) -> Approval:
        """Store ``plan`` as a pending approval (or refuse it: wrong channel, service busy)."""
        if plan.action not in self.actions:
            raise RuntimeError(f"no action registered for {plan.action!r}")
        if check_channel:
            self.check_channel(risk, channel)
        holder = await self.locks.holder(lock_key(plan.service))
        if holder is not None:
            raise CommandError(await self._busy(plan.service, holder), outcome="busy")
        policy = policy_for(self.settings, plan.action, risk)
        now = self.clock()
        for _ in range(5):
            approval = Approval(
                id=new_approval_id(),
                action=plan.action,
                service=plan.service,
                risk=risk.value,
                requester=requester,
                channel=channel,
                request_id=request_id,
                summary=self.redactor.redact(plan.summary),
                plan=json.loads(self.redactor.redact(json.dumps(plan.stored()))),
                approver_role=policy.approver_role.value,
                required_approvals=policy.approvers,
                self_approve=policy.self_approve,
                created_at=now,
                expires_at=now + policy.expiry,
            )
            try:
                await self.store.create_approval(approval)
            except KeyError:
                continue
            await self._audit(approval, "requested", requester, request_id, "pending", approval.summary)
            return approval
        raise RuntimeError("could not find a free approval id")

    async def grant(self, approval: Approval, *, schedule: str, request_id: str) -> Approval:
        """Approve a pending request on behalf of a schedule the policy pre-approves (see
        ``preapproval``); audited as approved by ``schedule:<name>``."""
        by = f"schedule:{schedule}"
        approved = await self.store.transition_approval(approval.id, [S.PENDING], S.APPROVED, at=self.clock(), by=by)
        if approved is None:
            raise RuntimeError(f"approval {approval.id} was no longer pending when its schedule approved it")
        await self._audit(approved, "approved", by, request_id, "approved", f"pre-approved for {by}")
        return approved

    def check_channel(self, risk: Risk, channel: str) -> None:
        """Refuse a destructive request from a channel the policy does not allow."""
        channels = self.settings.channels
        if risk is Risk.DESTRUCTIVE and channels and channel not in channels:
            where = ", ".join(f"<#{c}>" for c in channels)
            raise CommandError(f"Destructive commands may only be requested in {where}.", outcome="refused")

    async def _busy(self, service: str, holder: str) -> str:
        running = await self.store.get_approval(holder) if APPROVAL_ID.match(holder) else None
        what = f"approval `{holder}`"
        if running is not None:
            what += f" (`/ops {running.action}`, approved by {mention(running.decided_by)})"
        return f"`{service}` is busy: {what} is running on it. Try again when it has finished."

    async def get(self, approval_id: str) -> Approval:
        """The approval, or a clear refusal for an id that is malformed or unknown."""
        if not APPROVAL_ID.match(approval_id):
            raise CommandError(f"`{escape(approval_id[:20])}` is not an approval id (they look like `k3xm9q2p`).")
        approval = await self.store.get_approval(approval_id)
        if approval is None:
            raise CommandError(f"There is no approval `{approval_id}`.")
        return approval

    # -- decisions ------------------------------------------------------------------------

    async def approve(self, approval_id: str, user: str, *, request_id: str) -> Decision:
        """Count ``user``'s approval; the vote that completes it says to start the run."""
        approval = await self._checked(approval_id, user, request_id, "approve")
        roles = await self._clicker_roles(approval, user, request_id, "approve")
        needed = Role(approval.approver_role)
        if needed not in roles:
            await self._refuse(approval, user, request_id, "approve", "denied", "not an approver")
            raise PermissionDenied(f"Approving this needs the {needed.value} role; you are {describe(roles)}.")
        if user == approval.requester and not approval.self_approve:
            await self._refuse(approval, user, request_id, "approve", "refused", "self-approval")
            raise CommandError("You asked for this, so someone else has to approve it.", outcome="refused")
        now = self.clock()
        result = await self.store.vote_approval(approval.id, user, at=now)
        current = result.approval or approval
        if not result.counted:
            expired = None
            if current.state is S.PENDING and current.expires_at <= now:
                current = expired = await self._expire_one(current) or current
            why = self.why(current, user)
            await self._refuse(current, user, request_id, "approve", "refused", why)
            raise Refused(why, changed=expired)
        if not result.completed:
            left = current.required_approvals - len(current.votes)
            await self._audit(current, "vote", user, request_id, "ok", f"{left} more approval(s) needed")
            return Decision(current, f"Your approval is counted; it needs {left} more approver(s).")
        await self._audit(current, "approved", user, request_id, "approved", f"by {user}")
        return Decision(current, "Approved. The run starts now.", start_run=True)

    async def deny(self, approval_id: str, user: str, *, request_id: str) -> Decision:
        """An approver turns the request down."""
        approval = await self._checked(approval_id, user, request_id, "deny")
        roles = await self._clicker_roles(approval, user, request_id, "deny")
        needed = Role(approval.approver_role)
        if needed not in roles and user != approval.requester:
            await self._refuse(approval, user, request_id, "deny", "denied", "not an approver")
            raise PermissionDenied(f"Denying this needs the {needed.value} role; you are {describe(roles)}.")
        return await self._decide(approval, S.DENIED, user, request_id, "denied", "Denied. Nothing will run.")

    async def cancel(self, approval_id: str, user: str, *, request_id: str) -> Decision:
        """The requester withdraws the request."""
        approval = await self._checked(approval_id, user, request_id, "cancel")
        if user != approval.requester:
            await self._refuse(approval, user, request_id, "cancel", "refused", "not the requester")
            raise CommandError(
                f"Only {mention(approval.requester)}, who asked for it, can cancel this request.", outcome="refused"
            )
        return await self._decide(approval, S.CANCELLED, user, request_id, "cancelled", "Cancelled. Nothing will run.")

    async def _clicker_roles(self, approval: Approval, user: str, request_id: str, verb: str) -> frozenset[Role]:
        """The deciding user's roles, read afresh (user groups included); a group Slack could not
        read refuses the decision, audited as an error."""
        try:
            return await self.roles.roles_of(user, fresh=True)
        except GroupLookupFailed as exc:
            await self._refuse(approval, user, request_id, verb, exc.outcome, exc.detail)
            raise

    async def _checked(self, approval_id: str, user: str, request_id: str, verb: str) -> Approval:
        try:
            return await self.get(approval_id)
        except CommandError as exc:
            await record_event(
                self.store,
                self.redactor,
                request_id=request_id,
                actor=user,
                command=f"approval {verb}",
                args=approval_id[:40],
                channel="",
                outcome="refused",
                detail=exc.message,
            )
            raise

    async def _decide(
        self, approval: Approval, to: S, user: str, request_id: str, event: str, message: str
    ) -> Decision:
        now = self.clock()
        expired = None
        if approval.state is S.PENDING and approval.expires_at <= now:
            approval = expired = await self._expire_one(approval) or approval
        changed = await self.store.transition_approval(approval.id, [S.PENDING], to, at=now, by=user)
        if changed is None:
            current = await self.store.get_approval(approval.id) or approval
            why = self.why(current, user)
            await self._refuse(current, user, request_id, event, "refused", why)
            raise Refused(why, changed=expired)
        await self._audit(changed, event, user, request_id, event, f"by {user}")
        return Decision(changed, message)

    def why(self, approval: Approval, user: str | None = None) -> str:
        """Why nothing more can be done with an approval, in one sentence."""
        by = mention(approval.decided_by)
        match approval.state:
            case S.PENDING if user is not None and any(v.voter == user for v in approval.votes):
                left = approval.required_approvals - len(approval.votes)
                return f"You have already approved this; it still needs {left} more approver(s)."
            case S.PENDING:
                return "This request is still waiting for approval."
            case S.APPROVED:
                return f"Already approved by {by} at {self.when(approval.decided_at)}; the run is starting."
            case S.RUNNING:
                return f"Already approved by {by}; the run started at {self.when(approval.started_at)}."
            case S.SUCCEEDED | S.FAILED | S.INTERRUPTED:
                return f"This already ran ({approval.state.value}) after {by} approved it."
            case S.DENIED:
                return f"This request was denied by {by} at {self.when(approval.decided_at)}."
            case S.CANCELLED:
                return f"This request was cancelled by {by} at {self.when(approval.decided_at)}."
            case S.EXPIRED:
                return (
                    f"This request expired at {self.when(approval.expires_at)} without approval; "
                    f"ask again with `/ops {approval.action} {approval.service}`."
                )
        return f"This request is {approval.state.value}."

    # -- runs -----------------------------------------------------------------------------

    async def run(self, approval: Approval, *, request_id: str, progress: Progress, changed: Changed) -> Approval:
        """Run an approved plan once: lock the service, check the fingerprint, execute, record the end."""
        action = self.actions.get(approval.action)
        key = lock_key(approval.service)
        try:
            holder = await self.locks.acquire(key, approval.id)
        except CommandError as exc:  # the lock service is not answering: the run cannot start, and says so
            return await self._finish(
                approval, S.APPROVED, S.FAILED, request_id, f"Did not start: {exc.message}", changed
            )
        if holder is not None:
            why = await self._busy(approval.service, holder)
            return await self._finish(approval, S.APPROVED, S.FAILED, request_id, f"Did not start: {why}", changed)
        try:
            running = await self.store.transition_approval(approval.id, [S.APPROVED], S.RUNNING, at=self.clock())
            if running is None:  # someone else claimed it: it runs there, not here
                return await self.store.get_approval(approval.id) or approval
            await self._audit(running, "started", "opsbot", request_id, "running", f"on {self.instance}")
            await changed(running)
            return await self._execute(running, action, request_id, progress, changed)
        finally:
            await self.locks.release(key, approval.id)

    async def _execute(
        self, running: Approval, action: Action | None, request_id: str, progress: Progress, changed: Changed
    ) -> Approval:
        plan = plan_of(running)
        started = time.perf_counter()
        try:
            if action is None:
                raise CommandError(f"This bot does not know how to run `{running.action}` any more.")
            async with asyncio.timeout(OBSERVE_TIMEOUT):
                now = await action.observe(plan)
            changes = drift(plan.facts, now)
            if changes:
                text = "Did not run: what the plan saw has changed since it was approved.\n" + "\n".join(changes)
                return await self._finish(running, S.RUNNING, S.FAILED, request_id, text, changed, "drift")
            outcome = await action.execute(plan, progress)
        except CommandError as exc:
            return await self._finish(running, S.RUNNING, S.FAILED, request_id, f"Failed: {exc.message}", changed)
        except TimeoutError:
            text = f"Did not run: checking the current state took over {OBSERVE_TIMEOUT:g} s."
            return await self._finish(running, S.RUNNING, S.FAILED, request_id, text, changed)
        except asyncio.CancelledError:
            # Shutdown while running: say so now rather than leave it to the next start-up.
            text = "Interrupted: the bot was stopped during the run. Check the service before trying again."
            await asyncio.shield(self._finish(running, S.RUNNING, S.INTERRUPTED, request_id, text, changed))
            raise
        except Exception:
            log.exception("approval_run_failed", approval=running.id, action=running.action)
            text = f"Failed (ref {request_id}); the details are in the bot's log."
            return await self._finish(running, S.RUNNING, S.FAILED, request_id, text, changed)
        elapsed = time.perf_counter() - started
        text = "\n".join([outcome.summary, *outcome.details])
        to = S.SUCCEEDED if outcome.ok else S.FAILED
        return await self._finish(running, S.RUNNING, to, request_id, text, changed, duration=elapsed)

    async def _finish(
        self,
        approval: Approval,
        from_state: S,
        to: S,
        request_id: str,
        result: str,
        changed: Changed,
        event: str | None = None,
        duration: float = 0.0,
    ) -> Approval:
        result = self.redactor.redact(result)[:20_000]
        final = await self.store.transition_approval(approval.id, [from_state], to, at=self.clock(), result=result)
        if final is None:
            return await self.store.get_approval(approval.id) or approval
        first_line = result.splitlines()[0] if result else ""
        await self._audit(final, event or to.value, "opsbot", request_id, to.value, first_line, duration)
        await changed(final)
        return final

    # -- housekeeping ---------------------------------------------------------------------

    async def expire_due(self) -> list[Approval]:
        """Expire every pending approval past its expiry; each is audited."""
        expired = await self.store.expire_approvals(at=self.clock())
        for approval in expired:
            await self._audit(approval, "expired", "opsbot", approval.request_id, "expired", "no approval in time")
        return expired

    async def _expire_one(self, approval: Approval) -> Approval | None:
        expired = await self.store.transition_approval(approval.id, [S.PENDING], S.EXPIRED, at=self.clock())
        if expired is not None:
            await self._audit(expired, "expired", "opsbot", approval.request_id, "expired", "no approval in time")
        return expired

    async def recover(self) -> list[Approval]:
        """Runs whose process is gone (their service lock is not theirs) become ``interrupted``; approvals
        that were never started by a replica that died become ``failed``."""
        ended: list[Approval] = []
        now = self.clock()
        for approval in await self.store.list_approvals([S.RUNNING, S.APPROVED], limit=500):
            if await self.locks.holder(lock_key(approval.service)) == approval.id:
                continue  # still running somewhere
            if approval.state is S.RUNNING:
                to, text = (
                    S.INTERRUPTED,
                    (
                        "Interrupted: the bot stopped during the run (a crash or restart). "
                        "Check the service's state before trying again."
                    ),
                )
            elif approval.decided_at is not None and now - approval.decided_at > STALE_APPROVED:
                to, text = S.FAILED, "Did not start: the bot stopped between the approval and the run."
            else:
                continue
            final = await self.store.transition_approval(approval.id, [approval.state], to, at=now, result=text)
            if final is not None:
                await self._audit(final, to.value, "opsbot", approval.request_id, to.value, text)
                ended.append(final)
        return ended

    async def actionable(self, user: str) -> list[tuple[Approval, bool]]:
        """Pending approvals ``user`` may approve or cancel, with whether they may approve it."""
        roles = await self.roles.roles_of(user)
        now = self.clock()
        found: list[tuple[Approval, bool]] = []
        for approval in await self.store.list_approvals([S.PENDING], limit=200):
            if approval.expires_at <= now:
                continue
            voted = any(v.voter == user for v in approval.votes)
            own = approval.requester == user
            may_approve = Role(approval.approver_role) in roles and not voted and (not own or approval.self_approve)
            if may_approve or own:
                found.append((approval, may_approve))
        return found

    # -- audit ----------------------------------------------------------------------------

    async def _refuse(self, approval: Approval, user: str, request_id: str, verb: str, outcome: str, why: str) -> None:
        await self._audit(approval, f"{verb} refused", user, request_id, outcome, why)

    async def _audit(
        self,
        approval: Approval,
        event: str,
        actor: str,
        request_id: str,
        outcome: str,
        detail: str,
        duration: float = 0.0,
    ) -> None:
        if self.observe is not None:
            self.observe(event, approval.action)
        await record_event(
            self.store,
            self.redactor,
            request_id=request_id,
            actor=actor,
            command=f"approval {event}",
            args=f"{approval.id} {approval.action} {approval.service}",
            channel=approval.channel,
            outcome=outcome,
            service=approval.service,
            detail=detail,
            seconds=duration,
        )
