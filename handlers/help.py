"""/ops help: generated from the registry, showing only what the caller may run."""

from __future__ import annotations

from handlers import blocks as bk
from handlers.context import OpsContext, Reply
from handlers.registry import NoArgs, Registry, may_run, registry, subcommand
from services.access import Risk, describe
from services.inventory import Role


def help_reply(commands: Registry, roles: frozenset[Role]) -> Reply:
    """Only what the caller may run."""
    allowed = [c for c in commands if may_run(roles, c)]
    if not allowed:
        text = (
            "You have no opsbot role yet, so there is nothing you can run. "
            "Ask an opsbot admin to add you to a role in the inventory."
        )
        return Reply(text, [bk.section(text)], ephemeral=True)
    lines = [f"`{c.synopsis}` — {c.help}" for c in allowed]
    hidden = sum(1 for _ in commands) - len(allowed)
    note = f"You are {describe(roles)}." + (f" {hidden} more command(s) need a higher role." if hidden else "")
    blocks = [bk.header("opsbot commands"), *bk.sections(lines), bk.context(note)]
    return Reply("opsbot commands: " + ", ".join(c.verb for c in allowed), blocks, ephemeral=True)


@subcommand("help", help="List the commands you may run", risk=Risk.READ, args=NoArgs)
async def help_command(ctx: OpsContext, args: NoArgs) -> Reply:
    return help_reply(registry, ctx.roles)
