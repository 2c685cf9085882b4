"""/ops audit [service] [--user @x] [--limit N]: who did what, newest first."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from handlers import blocks as bk
from handlers.context import OpsContext, Reply
from handlers.registry import CommandArgs, resolve_service, subcommand
from services.access import Risk

_MENTION = re.compile(r"^<@([UW][A-Z0-9]{2,})(?:\|[^>]*)?>$")
_USER_ID = re.compile(r"^[UW][A-Z0-9]{2,}$|^local:[\w.-]{1,64}$")


def user_id_of(text: str) -> str:
    """A Slack mention (``<@U123|ana>``), a bare user ID, or ``local:<login>``; anything else is refused."""
    text = text.strip()
    if match := _MENTION.match(text):
        return match.group(1)
    if _USER_ID.match(text):
        return text
    raise ValueError("give a user as a Slack mention (@name) or a user ID like U012AB3CD")


class AuditArgs(CommandArgs):
    positional = ("service",)
    service: str | None = Field(None, max_length=64)
    user: str | None = Field(None, max_length=120)
    limit: int = Field(20, ge=1, le=100)

    @field_validator("user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        return None if value is None else user_id_of(value)


@subcommand(
    "audit",
    help="Recent audit events, newest first",
    usage="[service] [--user @name] [--limit N]",
    risk=Risk.READ,
    args=AuditArgs,
)
async def audit(ctx: OpsContext, args: AuditArgs) -> Reply:
    service = resolve_service(ctx.deps.inventory, args.service) if args.service else None
    events = await ctx.deps.store.audit_events(service=service, actor=args.user, limit=args.limit)
    scope = " ".join(filter(None, [f"service `{service}`" if service else "", f"<@{args.user}>" if args.user else ""]))
    if not events:
        text = f"No audit events{' for ' + scope if scope else ''}."
        return Reply(text, [bk.section(text)], ephemeral=True)
    lines = []
    for e in events:
        when = e.ts.strftime("%m-%d %H:%M:%S UTC") if e.ts else "?"
        who = f"<@{e.actor}>" if _USER_ID.match(e.actor) and not e.actor.startswith("local:") else bk.escape(e.actor)
        args_text = f" `{bk.escape(bk.clip(e.args, 120))}`" if e.args else ""
        detail = f" — {bk.escape(bk.clip(e.detail, 160))}" if e.detail else ""
        lines.append(f"`#{e.seq}` {when} {who} *{bk.escape(e.command)}*{args_text} → {e.outcome}{detail}")
    title = f"Audit: last {len(events)} event(s)" + (f" for {scope}" if scope else "")
    blocks = [bk.header(title), *bk.sections(lines), bk.context("`opsbot audit verify` checks the hash chain.")]
    return Reply(title, blocks, ephemeral=True)
