"""/ops schedules: what runs when (local and UTC), and how the last run went."""

from __future__ import annotations

from datetime import UTC, datetime

from handlers import blocks as bk
from handlers.context import OpsContext, Reply
from handlers.registry import NoArgs, subcommand
from services.access import Risk
from services.schedules import next_fire, zone
from services.state import ScheduleRun

# A scheduled run still without a result this long after it started is reported as probably lost.
LOST_AFTER_MINUTES = 60


def _local(moment: datetime, tz: str) -> str:
    return f"{moment.astimezone(zone(tz)):%a %Y-%m-%d %H:%M} {tz}"


def _outcome(run: ScheduleRun, now: datetime) -> str:
    """How the run went; a run without a result for long is said to be probably lost, not "running"."""
    if run.finished_at is not None:
        return run.outcome or "ok"
    minutes = int((now - run.started_at).total_seconds() // 60)
    if minutes < LOST_AFTER_MINUTES:
        return f"running (started {minutes} min ago on {run.holder})"
    return (
        f"no result {minutes // 60} h {minutes % 60} min after it started on {run.holder}: "
        "that replica probably stopped during the run; check what the command does before running it by hand"
    )


@subcommand(
    "schedules",
    help="The inventory's schedules: what runs when, the last and next run, the last outcome",
    risk=Risk.READ,
    args=NoArgs,
)
async def schedules(ctx: OpsContext, args: NoArgs) -> Reply:
    inventory = ctx.deps.inventory
    if not inventory.schedules:
        text = "No schedules in the inventory (`schedules:` — digests, backups, checks, keep-alive pings)."
        return Reply(text, [bk.section(text)], ephemeral=True)
    now = datetime.now(UTC)
    last = await ctx.deps.store.last_schedule_runs()
    lines = []
    for spec in inventory.schedules:
        tz = spec.timezone or inventory.timezone
        state = "" if spec.enabled else " · *disabled*"
        upcoming = f"next {_local(next_fire(spec, now, inventory.timezone), tz)}" if spec.enabled else "never"
        run = last.get(spec.name)
        if run is None:
            previous = "never run yet"
        else:
            previous = f"last {_local(run.fire_at, tz)}: {bk.escape(_outcome(run, now)[:150])}"
        lines.append(
            f"*{bk.escape(spec.name)}* · `{bk.escape(spec.when)}` → `/ops {bk.escape(spec.command)}`{state}\n"
            f"      {upcoming} · {previous}"
        )
    blocks = [bk.header("Schedules"), *bk.sections(lines)]
    blocks.append(bk.context(f"Times in each schedule's zone (default {inventory.timezone}); runs are audited."))
    return Reply(f"{len(inventory.schedules)} schedule(s)", blocks, ephemeral=True)
