"""/ops logs and /ops traffic: a component's log lines, error groups and nginx traffic, within 5 s.

Every line is scrubbed (the inventory's secrets, and secrets written inside log lines) as soon as a backend
returns it, before it is grouped, counted or shown. Who may read which service's logs is the inventory's
per-service read permission (services/access.py ``check_read``).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shlex
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import Field, create_model, field_validator

from handlers import blocks as bk
from handlers.context import Block, Deps, OpsContext, Reply, Upload
from handlers.registry import CLICK_COMMANDS, CommandArgs, clip_token, resolve_service, subcommand
from services.access import Risk, check_read
from services.clients import close_each
from services.errors import CommandError
from services.inventory import Component, Inventory, LogfileComponent
from services.logs.base import LogBackend, LogError, LogLine, LogQuery
from services.logs.groups import ErrorGroup, LogRead, TrafficSummary, read_logs, read_traffic
from services.logs.registry import LOG_BACKENDS, LogDeps, build_log_backends

DEADLINE = 5.0  # seconds every /ops logs and /ops traffic answers within
RENDER_MARGIN = 0.4  # of which this much is kept for grouping and rendering
MAX_WINDOW = timedelta(days=7)
MAX_LIMIT = 1000
SHOWN_CHARS = 9_000  # more than this of lines goes into a file in the thread
LINE_CHARS = 400
NEXT_PAGE = "logs_next_page"
CURSOR_TOKEN = 180  # a longer cursor is kept by the bot, the button carrying its key
PAGE_CURSORS: OrderedDict[str, str] = OrderedDict()  # key -> cursor, the newest MAX_KEPT_CURSORS
MAX_KEPT_CURSORS = 500
_RELATIVE = re.compile(r"^([0-9]{1,5})\s*(m|min|h|d|w)$", re.IGNORECASE)
_UNIT = {"m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_STATUS = r"^([1-5]xx|[1-5][0-9]{2})$"


# `--from` is a Python keyword: the field is declared by name.
_Window = create_model(
    "_Window",
    __base__=CommandArgs,
    **{"from": (str | None, Field(None, max_length=40))},  # type: ignore[call-overload]
)


class LogsArgs(_Window):
    positional = ("service", "component")
    service: str = Field(max_length=64)
    component: str | None = Field(None, max_length=64)
    since: str | None = Field(None, max_length=20)
    to: str | None = Field(None, max_length=40)
    errors: bool = False
    grep: str | None = Field(None, min_length=1, max_length=200)
    limit: int = Field(50, ge=1)
    status: str | None = Field(None, pattern=_STATUS)
    cursor: str | None = Field(None, max_length=200)

    @field_validator("limit")
    @classmethod
    def _at_most(cls, value: int) -> int:
        if value > MAX_LIMIT:
            raise ValueError(f"at most {MAX_LIMIT:,} lines a page (ask for the next page for more)")
        return value


class TrafficArgs(_Window):
    positional = ("service", "component")
    service: str = Field(max_length=64)
    component: str | None = Field(None, max_length=64)
    since: str | None = Field(None, max_length=20)
    to: str | None = Field(None, max_length=40)


# -- the window ----------------------------------------------------------------------------------------


def _moment(text: str, zone: tzinfo, option: str) -> datetime:
    try:
        at = datetime.fromisoformat(text.strip().replace(" ", "T", 1) if " " in text.strip() else text.strip())
    except ValueError:
        raise CommandError(
            f"`{option} {clip_token(text)}` is not a time: use 2026-12-02T14:30 (the inventory's zone) or an ISO "
            "time with an offset."
        ) from None
    return (at if at.tzinfo else at.replace(tzinfo=zone)).astimezone(UTC)


def parse_log_window(
    since: str | None, start: str | None, end: str | None, zone: tzinfo, now: datetime
) -> tuple[datetime, datetime]:
    """``--since 1h`` or ``--from T --to T`` → ``[since, until)`` in UTC; one sentence for anything else."""
    if since is not None and (start is not None or end is not None):
        raise CommandError("Give either `--since` or `--from`/`--to`, not both.")
    if start is None and end is not None:
        raise CommandError("`--to` needs a `--from`.")
    if start is None:
        found = _RELATIVE.match((since or "1h").strip())
        if found is None:
            raise CommandError(f"`--since {clip_token(since or '')}` is not a length: use 15m, 1h or 2d.")
        length = timedelta(seconds=int(found.group(1)) * _UNIT[found.group(2).lower()])
        if length > MAX_WINDOW:
            raise CommandError(f"`--since {since}` is longer than the 7 days opsbot reads at once; use 7d or less.")
        if length <= timedelta(0):
            raise CommandError("`--since` must be longer than nothing.")
        return now - length, now + timedelta(seconds=1)
    begin = _moment(start, zone, "--from")
    until = _moment(end, zone, "--to") if end is not None else now + timedelta(seconds=1)
    if begin > now or until > now + timedelta(minutes=1):
        raise CommandError("That window is in the future; logs can only be read up to now.")
    if until <= begin:
        raise CommandError("`--to` must be after `--from`.")
    if until - begin > MAX_WINDOW:
        raise CommandError("That window is longer than the 7 days opsbot reads at once; make it 7 days or less.")
    return begin, until


# -- which component ---------------------------------------------------------------------------------


def log_component(
    inventory: Inventory, service: str, name: str | None, *, nginx: bool = False
) -> tuple[str, Component]:
    """The component to read: the one named (which must have logs), else the service's first with logs
    (for traffic: its first nginx access log)."""
    components = inventory.services[service].components
    if name is not None:
        key = name.lower()
        if key not in components:
            known = ", ".join(f"`{c}`" for c in components)
            raise CommandError(f"`{service}` has no component called `{clip_token(name)}` (it has {known}).")
        spec = components[key]
        if spec.type not in LOG_BACKENDS:
            raise CommandError(f"`{service}/{key}` is a {spec.type} component; opsbot cannot read logs of one.")
        return key, spec
    for key, spec in components.items():
        if nginx and not (isinstance(spec, LogfileComponent) and spec.format == "nginx_combined"):
            continue
        if spec.type in LOG_BACKENDS:
            return key, spec
    if nginx:
        raise CommandError(
            f"`{service}` declares no nginx access log (a `logfile` component with `format: nginx_combined`)."
        )
    raise CommandError(f"`{service}` has no component whose logs opsbot can read.")


@contextlib.asynccontextmanager
async def _backend(deps: Deps, spec: Component) -> AsyncIterator[LogBackend]:
    """The bot's backend for the component's type, or one made (and closed) for this request alone."""
    if spec.type in deps.logs:
        yield deps.logs[spec.type]
        return
    made = build_log_backends(LogDeps(), types={spec.type})
    try:
        yield made[spec.type]
    finally:
        await close_each(made.values(), what="log_backend")


# -- reading -----------------------------------------------------------------------------------------


# -- /ops logs -----------------------------------------------------------------------------------------


@subcommand(
    "logs",
    help="A component's log lines, newest first, with error groups (read permission per service)",
    usage="<service> [component] [--since 1h | --from T --to T] [--errors] [--grep TEXT] [--limit N] "
    "[--status 4xx|5xx|404]",
    risk=Risk.READ,
    args=LogsArgs,
)
async def logs(ctx: OpsContext, args: LogsArgs) -> Reply:
    deadline = time.monotonic() + DEADLINE - RENDER_MARGIN
    inventory = ctx.deps.inventory
    service = resolve_service(inventory, args.service)
    await check_read(ctx.deps.roles, ctx.user_id, service, ctx.roles, "logs")
    name, spec = log_component(inventory, service, args.component)
    zone = ZoneInfo(inventory.timezone)
    since, until = parse_log_window(args.since, getattr(args, "from"), args.to, zone, datetime.now(UTC))
    cursor = _stored_cursor(args.cursor) if args.cursor else None
    query = LogQuery(since, until, args.errors, args.grep, args.limit, args.status, cursor)
    try:
        async with _backend(ctx.deps, spec) as backend:
            found = await read_logs(backend, spec, query, ctx.deps.redactor, deadline=deadline)
    except LogError as exc:
        raise CommandError(ctx.deps.redactor.redact(exc.message), outcome="error") from None
    return render_logs(service, name, spec, query, found, zone)


def _stored_cursor(value: str) -> str:
    if not value.startswith("@"):
        return value
    cursor = PAGE_CURSORS.get(value[1:])
    if cursor is None:
        raise CommandError("That page is no longer kept by the bot; run the command again.")
    return cursor


def _keep_cursor(cursor: str) -> str:
    """A cursor short enough for the button's command, or ``@key`` of one the bot keeps (the newest 500)."""
    if len(cursor) <= CURSOR_TOKEN and not cursor.startswith("@"):
        return cursor
    key = secrets.token_urlsafe(9)
    PAGE_CURSORS[key] = cursor
    while len(PAGE_CURSORS) > MAX_KEPT_CURSORS:
        PAGE_CURSORS.popitem(last=False)
    return f"@{key}"


def _when(at: datetime | None, zone: tzinfo, with_date: bool) -> str:
    if at is None:
        return " " * (14 if with_date else 8)
    local = at.astimezone(zone)
    return local.strftime("%m-%d %H:%M:%S" if with_date else "%H:%M:%S")


def _line_text(line: LogLine, zone: tzinfo, with_date: bool) -> str:
    level = (line.level or "-").upper()[:5]
    text = line.text if len(line.text) <= LINE_CHARS else line.text[: LINE_CHARS - 1] + "…"
    return f"{_when(line.at, zone, with_date)} {level:5} {text}".replace("\n", " ⏎ ")


def _code(lines: list[str]) -> list[Block]:
    """Lines in code blocks within Slack's section limit (escaped: nothing in a log line is acted on)."""
    blocks: list[Block] = []
    current: list[str] = []
    size = 0
    for line in lines:
        safe = bk.escape(line.replace("`", "'"))
        if current and size + len(safe) + 1 > bk.MAX_SECTION_TEXT - 20:
            blocks.append(bk.section("```" + "\n".join(current) + "```"))
            current, size = [], 0
        current.append(safe)
        size += len(safe) + 1
    if current:
        blocks.append(bk.section("```" + "\n".join(current) + "```"))
    return blocks


def _window_words(query: LogQuery, zone: tzinfo) -> str:
    fmt = "%Y-%m-%d %H:%M"
    return f"{query.since.astimezone(zone):{fmt}} to {query.until.astimezone(zone):{fmt}} ({zone})"


def render_logs(service: str, name: str, spec: Component, query: LogQuery, found: LogRead, zone: tzinfo) -> Reply:
    """Summary first (scanned, matched, levels, error groups), the newest lines, a Next page button."""
    where = f"{service}/{name}"
    filters = [w for w in ("errors" if query.errors else "", f"grep {query.grep!r}" if query.grep else "",
                           f"status {query.status}" if query.status else "") if w]  # fmt: skip
    title = f"Logs of {where}" + (f" · {', '.join(filters)}" if filters else "")
    scope = "" if found.complete else " (the newest of the window; the summary stops there)"
    levels = " · ".join(f"{n:,} {lvl}" for lvl, n in sorted(found.levels.items(), key=lambda kv: -kv[1]))
    head = [
        bk.header(title),
        bk.context(
            f"{_window_words(query, zone)} · {found.scanned:,} lines scanned, {found.matched:,} matched{scope}"
            + (f" · {levels}" if levels else "")
        ),
    ]
    with_date = query.until - query.since > timedelta(hours=20)
    groups = found.groups.top(8)
    if groups:
        rows = [_group_row(g, zone) for g in groups]
        shown_note = f", the {len(groups)} biggest shown" if len(found.groups) > len(groups) else ""
        title_groups = f"*Error groups* ({len(found.groups):,}{shown_note})"
        head += bk.sections(rows, title=title_groups)[:3]
    if found.notes:
        head.append(bk.context(":warning: " + bk.escape(" · ".join(found.notes))))
    shown = [_line_text(line, zone, with_date) for line in found.lines]
    files: list[Upload] = []
    body: list[Block] = []
    if not shown:
        body.append(bk.section("No line of the window matches." if query.cursor is None else "No older lines match."))
    else:
        fits: list[str] = []
        size = 0
        for text in shown:
            if size + len(text) > SHOWN_CHARS:
                break
            fits.append(text)
            size += len(text) + 1
        body.append(bk.context(f"The newest {len(fits):,} of this page's {len(shown):,} line(s), newest first:"))
        body += _code(fits)
        if len(fits) < len(shown):
            stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
            files.append(Upload(f"logs-{service}-{name}-{stamp}.txt", f"Logs of {where}", "\n".join(shown).encode()))
            body.append(bk.context(f":thread: All {len(shown):,} lines of this page are in the thread, as a file."))
    if found.page.console_url:
        body.append(bk.context(f"<{found.page.console_url}|Open the same query in the console>"))
    if found.page.cursor is not None:
        body.append(_next_button(service, name, query, found.page.cursor))
    text = f"{title}: {found.matched:,} matched of {found.scanned:,} scanned"
    return Reply(text, head + body, files=files, detail=f"{where}: {len(found.lines)} lines")


def _group_row(group: ErrorGroup, zone: tzinfo) -> str:
    shape = clip_token(group.key, 120)  # escaped, backticks made quotes
    seen = f"first {_when(group.first_seen, zone, True)}, last {_when(group.last_seen, zone, True)}"
    return f"*{group.count:,} x* `{shape}` · {seen}\n      e.g. _{bk.escape(bk.clip(group.example, 200))}_"


def _next_button(service: str, component: str, query: LogQuery, cursor: str) -> Block:
    state = {
        "s": service, "c": component, "f": query.since.isoformat(timespec="seconds"),
        "t": query.until.isoformat(timespec="seconds"), "e": query.errors, "g": query.grep, "l": query.limit,
        "st": query.status, "k": _keep_cursor(cursor),
    }  # fmt: skip
    # At most ~700 characters (a 200-character grep, a 180-character cursor): within Slack's 2,000.
    value = json.dumps(state, separators=(",", ":"))
    button = {"type": "button", "action_id": NEXT_PAGE, "text": {"type": "plain_text", "text": "Next page"},
              "value": value}  # fmt: skip
    return {"type": "actions", "block_id": "logs_next", "elements": [button]}


async def next_page_command(deps: Deps, action: Mapping[str, Any]) -> str:
    """The command a Next page click asks for: the same query from the page's cursor, as the clicker
    (whose read permission is checked again)."""
    try:
        state = json.loads(str(action.get("value", ""))[:2000])
        service, component, cursor = str(state["s"]), str(state["c"]), str(state["k"])
        since, until, limit = str(state["f"]), str(state["t"]), int(state["l"])
    except (ValueError, KeyError, TypeError):
        raise CommandError("That is not a page opsbot offered.") from None
    words = ["logs", service, component, "--from", since, "--to", until, "--limit", str(limit), "--cursor", cursor]
    if state.get("e"):
        words.append("--errors")
    if state.get("g"):
        words += ["--grep", str(state["g"])]
    if state.get("st"):
        words += ["--status", str(state["st"])]
    return " ".join(shlex.quote(w) for w in words)


CLICK_COMMANDS[NEXT_PAGE] = next_page_command


# -- /ops traffic --------------------------------------------------------------------------------------


@subcommand(
    "traffic",
    help="Requests, status classes, top paths and client IPs from nginx access logs (read permission)",
    usage="<service> [component] [--since 1h | --from T --to T]",
    risk=Risk.READ,
    args=TrafficArgs,
)
async def traffic(ctx: OpsContext, args: TrafficArgs) -> Reply:
    deadline = time.monotonic() + DEADLINE - RENDER_MARGIN
    inventory = ctx.deps.inventory
    service = resolve_service(inventory, args.service)
    await check_read(ctx.deps.roles, ctx.user_id, service, ctx.roles, "logs")
    name, spec = log_component(inventory, service, args.component, nginx=True)
    zone = ZoneInfo(inventory.timezone)
    since, until = parse_log_window(args.since, getattr(args, "from"), args.to, zone, datetime.now(UTC))
    query = LogQuery(since, until, limit=MAX_LIMIT)
    try:
        async with _backend(ctx.deps, spec) as backend:
            summary, complete = await read_traffic(backend, spec, query, ctx.deps.redactor, deadline=deadline)
    except LogError as exc:
        raise CommandError(ctx.deps.redactor.redact(exc.message), outcome="error") from None
    return render_traffic(f"{service}/{name}", query, summary, complete, zone)


def _top(pairs: list[tuple[str, int]], total: int) -> list[str]:
    return [f"`{bk.escape(clip_token(key, 80))}` {n:,} ({100 * n / max(total, 1):.1f} %)" for key, n in pairs]


def render_traffic(where: str, query: LogQuery, summary: TrafficSummary, complete: bool, zone: tzinfo) -> Reply:
    """Requests and status classes, then top paths, client IPs and IPs with most 4xx."""
    total = summary.requests
    classes = " · ".join(
        f"{summary.statuses[k]:,} {k}" for k in ("2xx", "3xx", "4xx", "5xx", "1xx") if summary.statuses[k]
    )
    scope = "" if complete else " (stopped at the time budget: the newest part of the window)"
    title = f"Traffic of {where}"
    blocks = [
        bk.header(title),
        bk.context(f"{_window_words(query, zone)} · {total:,} requests{scope}" + (f" · {classes}" if classes else "")),
    ]
    if total == 0:
        blocks.append(bk.section("No request in the window."))
    else:
        blocks += bk.sections(_top(summary.paths.top(10), total), title="*Top paths*")
        blocks += bk.sections(_top(summary.ips.top(10), total), title="*Top client IPs*")
        worst = summary.ips_4xx.top(10)
        if worst:
            blocks += bk.sections(_top(worst, summary.statuses["4xx"]), title="*IPs with most 4xx answers*")
    if summary.unparsed:
        blocks.append(bk.context(f"{summary.unparsed:,} line(s) were not nginx `combined` lines and are not counted."))
    return Reply(f"{title}: {total:,} requests ({classes or 'none'})", blocks, detail=f"{where}: {total} requests")


__all__ = ["log_component", "next_page_command", "parse_log_window", "render_logs", "render_traffic"]
