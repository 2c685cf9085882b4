"""The /ops router: find the verb, check the role, parse the arguments, run, audit, measure."""

from __future__ import annotations

import difflib
import time
import uuid
from dataclasses import replace

import structlog

from handlers import blocks as bk
from handlers.approvals import approval_reply, result_reply, run_approved
from handlers.context import Deps, Live, OpsContext, Progress, Reply
from handlers.help import help_reply
from handlers.registry import Registry, Subcommand, clip_token, may_run, parse_args, tokenize
from services.access import GroupLookupFailed, describe
from services.approvals import Plan, preapproval
from services.audit import record_event
from services.errors import CommandError, PermissionDenied
from services.inventory import Role

log = structlog.get_logger(__name__)


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


def error_reply(message: str) -> Reply:
    return Reply(message, [bk.section(f":warning: {message}")], ephemeral=True)


class Router:
    """Turns command text from any interface (Slack, console, one-shot run) into a Reply."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def dispatch(
        self,
        *,
        user_id: str,
        channel_id: str,
        text: str,
        deps: Deps,
        request_id: str | None = None,
        interface: str = "slack",
        progress: Progress | None = None,
        live: Live | None = None,
        schedule: str | None = None,
    ) -> Reply:
        """Run one /ops command for ``user_id`` and return its reply; every outcome is audited.

        ``schedule`` names the schedule a command comes from: a plan its approval policy pre-approves
        (below the ceiling) runs at once, approved by the schedule; any other plan is posted for approval.
        """
        request_id = request_id or new_request_id()
        started = time.perf_counter()
        verb = "help"
        args_text = deps.redactor.redact(text.strip())[:500]
        service: str | None = None
        outcome = "ok"
        detail = ""
        with structlog.contextvars.bound_contextvars(request_id=request_id, user=user_id):
            try:
                tokens = tokenize(text)
                asks_help = not tokens or tokens[0].lower() in ("help", "-h", "--help", "?")
                command, rest = (None, []) if asks_help else self.registry.find(tokens)
                if command is not None:
                    verb = command.verb
                    structlog.contextvars.bind_contextvars(verb=verb)
                elif not asks_help:
                    verb = "unknown"
                roles = await self._roles(deps, user_id, command)
                if asks_help:
                    reply = help_reply(self.registry, roles)
                else:
                    if command is None:
                        raise CommandError(self._unknown(tokens[0], roles))
                    if not may_run(roles, command):
                        raise PermissionDenied(
                            f"`/ops {command.verb}` needs the {command.risk.required_role.value} role; "
                            f"you are {describe(roles)}."
                        )
                    args = parse_args(command, rest)
                    if command.risk.needs_approval and interface == "slack":
                        deps.approvals.check_channel(command.risk, channel_id)  # before any planning
                    service = getattr(args, "service", None)
                    ctx = OpsContext(user_id, channel_id, request_id, roles, deps, interface, progress, live)
                    log.info("command_started", args=args_text)
                    result = await command.func(ctx, args)
                    if isinstance(result, Plan):
                        # A change waits for its approvers: store the plan and show it, with buttons.
                        pre = preapproval(deps.approvals.settings, result, schedule) if schedule else None
                        if pre is not None:
                            result = replace(result, details=(pre.note, *result.details))
                        approval = await deps.approvals.request(
                            result,
                            risk=command.risk,
                            requester=user_id,
                            channel=channel_id,
                            request_id=request_id,
                            check_channel=interface == "slack",
                        )
                        if pre is not None and pre.allowed and schedule is not None:
                            approval = await deps.approvals.grant(approval, schedule=schedule, request_id=request_id)
                            reply = result_reply(deps.approvals, await run_approved(deps, approval, request_id))
                            outcome, detail = reply.outcome, reply.detail
                        else:
                            reply = approval_reply(deps.approvals, approval, interface=interface)
                            detail = f"approval {approval.id} pending"
                    else:
                        reply = result
                        outcome, detail = reply.outcome, reply.detail
            except CommandError as exc:
                outcome, detail = exc.outcome, exc.message
                log.info("command_refused", outcome=outcome, reason=deps.redactor.redact(exc.message))
                reply = error_reply(deps.redactor.redact(exc.message))
            except Exception:
                outcome, detail = "error", f"failed (ref {request_id})"
                log.exception("command_failed", args=args_text)
                reply = error_reply(
                    f"Sorry — `/ops {verb}` failed (ref {request_id}). The details are in the bot's log."
                )
            elapsed = time.perf_counter() - started
            reply.outcome = outcome
            if outcome == "ok" and reply.status is not None:
                detail = f"status {reply.status.label}"
            elif outcome == "ok" and reply.approval_id is not None:
                outcome = "pending"
            # The answer still reaches the user if this write fails; a lost write is loud in the log.
            await record_event(
                deps.store,
                deps.redactor,
                request_id=request_id,
                actor=user_id,
                command=verb,
                args=args_text,
                channel=channel_id,
                outcome=outcome,
                service=service,
                detail=detail,
                seconds=elapsed,
            )
            if deps.observe_command is not None:
                deps.observe_command(verb, outcome, elapsed)
            log.info("command_finished", outcome=outcome, duration_ms=round(elapsed * 1000, 1))
        return reply

    @staticmethod
    async def _roles(deps: Deps, user_id: str, command: Subcommand | None) -> frozenset[Role]:
        """The caller's roles. When a user group cannot be read, the roles held without groups still
        count: enough for this command (or for help), it runs; otherwise the caller is refused."""
        try:
            return await deps.roles.roles_of(user_id)
        except GroupLookupFailed:
            certain = deps.roles.direct_roles(user_id)
            if command is None or may_run(certain, command):
                log.info("usergroup_lookup_failed_but_not_needed", verb=command.verb if command else "help")
                return certain
            raise

    def _unknown(self, word: str, roles: frozenset[Role]) -> str:
        allowed = sorted({c.verb.split()[0] for c in self.registry if may_run(roles, c)})
        close = difflib.get_close_matches(word.lower(), allowed, n=3, cutoff=0.6)
        shown = clip_token(word)
        if close:
            return f"There is no `/ops {shown}`. Did you mean " + " or ".join(f"`/ops {c}`" for c in close) + "?"
        return f"There is no `/ops {shown}`. Type `/ops help` to see what you can run."
