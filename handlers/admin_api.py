"""/ops api <service> <endpoint> [--limit N]: a table from the app's declared admin API (runbook 000)."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import Field

from handlers import blocks as bk
from handlers.context import Block, OpsContext, Reply
from handlers.registry import CommandArgs, resolve_service, subcommand
from services.access import Risk
from services.admin_api import LIMIT_DEFAULT, LIMIT_MAX, AdminTable, read_admin_endpoint, token_cache_for
from services.errors import CommandError

CELL_MAX = 40  # characters of one value shown; longer ones are cut with "…"
_SECTION_BUDGET = bk.MAX_SECTION_TEXT - 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class ApiArgs(CommandArgs):
    positional = ("service", "endpoint")
    service: str = Field(max_length=64)
    endpoint: str = Field(max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    limit: int = Field(LIMIT_DEFAULT, ge=1, le=LIMIT_MAX, description=f"rows shown, 1 to {LIMIT_MAX}")


@subcommand(
    "api",
    help="Read the app's admin API (its declared endpoints, e.g. videos, prompts) as a table",
    usage=f"<service> <endpoint> [--limit N (1-{LIMIT_MAX}, default {LIMIT_DEFAULT})]",
    risk=Risk.READ,
    args=ApiArgs,
)
async def api(ctx: OpsContext, args: ApiArgs) -> Reply:
    inventory = ctx.deps.inventory
    service = resolve_service(inventory, args.service)
    session = ctx.deps.deploys.http if ctx.deps.deploys is not None else None
    try:
        table = await read_admin_endpoint(
            session, token_cache_for(ctx.deps.store), inventory, service, args.endpoint, limit=args.limit
        )
    except CommandError as exc:
        raise CommandError(ctx.deps.redactor.redact(exc.message), outcome=exc.outcome) from None
    return render_table(table)


# -- rendering -----------------------------------------------------------------------------------------


def cell(value: Any) -> str:
    """One value as table text: on one line, no control characters, at most CELL_MAX characters."""
    if value is None:
        text = "—"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int | float):
        text = str(value)
    else:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    text = _CONTROL.sub(" ", text).replace("`", "'").strip()
    return text if len(text) <= CELL_MAX else text[: CELL_MAX - 1] + "…"


def table_lines(columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    """The header and rows as aligned plain-text lines (not yet escaped)."""
    cells = [[cell(c) for c in columns], *[[cell(v) for v in row] for row in rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return ["  ".join(value.ljust(widths[i]) for i, value in enumerate(line)).rstrip() for line in cells]


def _code_sections(lines: list[str]) -> list[Block]:
    """Escaped lines packed into as few ``` sections as fit Slack's section limit."""
    blocks: list[Block] = []
    current: list[str] = []
    size = 0
    for line in (bk.escape(line) for line in lines):
        if current and size + len(line) + 1 > _SECTION_BUDGET:
            blocks.append(bk.section("```" + "\n".join(current) + "```"))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    if current:
        blocks.append(bk.section("```" + "\n".join(current) + "```"))
    return blocks


def render_table(table: AdminTable) -> Reply:
    """The endpoint's rows as a monospace table, with how many were left out."""
    where = f"{table.service}/{table.component}"
    title = f"Admin API: {table.service} {table.endpoint}"
    shown = len(table.rows)
    if table.total is not None:
        counts = f"{shown} of {max(table.total, table.count)} shown (the API's total)"
    else:
        counts = f"{shown} of {table.count} shown"
    facts = [f"`GET {table.path}` on {where}", counts]
    blocks: list[Block] = [bk.header(title)]
    lines = [f"{title} — {counts}"]
    if table.rows:
        rows = table_lines(table.columns, table.rows)
        blocks += _code_sections(rows)
        lines += [bk.escape(row) for row in rows]
    else:
        blocks.append(bk.section("_No items._"))
        lines.append("No items.")
    if table.more > 0:
        more = f"{table.more} more not shown (`--limit` up to {LIMIT_MAX})"
        facts.append(more)
        lines.append(more.replace("`", ""))
    blocks.append(bk.context(bk.escape(" · ".join(facts))))
    return Reply("\n".join(lines), blocks, ephemeral=True)


__all__ = ["ApiArgs", "api", "cell", "render_table", "table_lines"]
