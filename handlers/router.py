"""The /ops router: find the verb, check the role, parse the arguments, run, audit, measure."""

from __future__ import annotations

import difflib
import time
import uuid

import structlog

from handlers import blocks as bk
from handlers.approvals import approval_reply
from handlers.context import Deps, Live, OpsContext, Progress, Reply
from handlers.help import help_reply
from handlers.registry import Registry, clip_token, may_run, parse_args, tokenize
from services.access import describe
from services.approvals import Plan
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
    ) -> Reply:
        request_id = request_id or new_request_id()
        started = time.perf_counter()
        verb = "help"
        args_text = deps.redactor.redact(text.strip())[:500]
        service: str | None = None
        outcome = "ok"
        detail = ""
        with structlog.contextvars.bound_contextvars(request_id=request_id, user=user_id):
            try:
                roles = await deps.roles.roles_of(user_id)
                tokens = tokenize(text)
                if not tokens or tokens[0].lower() in ("help", "-h", "--help", "?"):
                    reply = help_reply(self.registry, roles)
                else:
                    command, rest = self.registry.find(tokens)
                    if command is None:
                        verb = "unknown"
                        raise CommandError(self._unknown(tokens[0], roles))
                    verb = command.verb
                    structlog.contextvars.bind_contextvars(verb=verb)
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
                        approval = await deps.approvals.request(
                            result,
                            risk=command.risk,
                            requester=user_id,
                            channel=channel_id,
                            request_id=request_id,
                            check_channel=interface == "slack",
                        )
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

    def _unknown(self, word: str, roles: frozenset[Role]) -> str:
        allowed = sorted({c.verb.split()[0] for c in self.registry if may_run(roles, c)})
        close = difflib.get_close_matches(word.lower(), allowed, n=3, cutoff=0.6)
        shown = clip_token(word)
        if close:
            return f"There is no `/ops {shown}`. Did you mean " + " or ".join(f"`/ops {c}`" for c in close) + "?"
        return f"There is no `/ops {shown}`. Type `/ops help` to see what you can run."
