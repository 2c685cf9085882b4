"""/ops help: generated from the registry, showing only what the caller may run."""

from __future__ import annotations

from handlers.context import OpsContext, Reply
from handlers.registry import NoArgs, registry, subcommand
from handlers.router import help_reply
from services.access import Risk


@subcommand("help", help="List the commands you may run", risk=Risk.READ, args=NoArgs)
async def help_command(ctx: OpsContext, args: NoArgs) -> Reply:
    return help_reply(registry, ctx.roles)
