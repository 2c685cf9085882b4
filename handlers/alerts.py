"""Alerts in Slack: the fired message (with a Silence menu) edited when it resolves, /ops alerts,
/ops silence and /ops unsilence."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from pydantic import Field
from slack_sdk.web.async_client import AsyncWebClient

from handlers import blocks as bk
from handlers.context import Block, Deps, OpsContext, Reply
from handlers.registry import CLICK_COMMANDS, CommandArgs, NoArgs, clip_token, subcommand
from services.access import Risk
from services.alerts.watch import Fired, state_from_json, watched
from services.errors import CommandError

log = structlog.get_logger(__name__)

SILENCE_PICK = "alert_silence"
SILENCE_CHOICES = ("1h", "4h", "24h")
MAX_SILENCE = timedelta(days=7)
KEY = r"^[a-z0-9][a-z0-9_-]{0,62}/[a-z0-9][a-z0-9_-]{0,62}/[A-Za-z][A-Za-z0-9_-]{0,63}$"
_DURATION = re.compile(r"^(\d{1,4})(m|h|d)$")


def parse_duration(text: str) -> timedelta:
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise CommandError(f"`{clip_token(text)}` is not a duration; say `30m`, `4h` or `2d`.")
    amount, unit = int(match[1]), match[2]
    delta = {"m": timedelta(minutes=amount), "h": timedelta(hours=amount), "d": timedelta(days=amount)}[unit]
    if not timedelta(minutes=1) <= delta <= MAX_SILENCE:
        raise CommandError("A silence lasts from 1 minute to 7 days.")
    return delta


def _when(moment: datetime | None) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC" if moment else "?"


def fired_blocks(alert: Fired) -> list[Block]:
    t = alert.transition
    again = " (still, after its silence ended)" if t.after_silence else ""
    emoji = ":rotating_light:" if alert.rule.severity == "critical" else ":warning:"
    return [
        bk.section(
            f"{emoji} *{alert.rule.alert_name}* on *{bk.escape(alert.service)}/{bk.escape(alert.component)}* "
            f"({alert.rule.severity}){again}\n{bk.escape(t.evidence)}"
        ),
        bk.context(f"Since {_when(t.since)} · alert `{alert.key}` · `/ops silence {alert.key} 1h`"),
        {
            "type": "actions",
            "block_id": f"alert:{alert.key}",  # at most 204 characters (KEY); Slack allows 255
            "elements": [
                {
                    "type": "static_select",
                    "action_id": SILENCE_PICK,
                    "placeholder": {"type": "plain_text", "text": "Silence for…"},
                    "options": [
                        {"text": {"type": "plain_text", "text": choice}, "value": choice} for choice in SILENCE_CHOICES
                    ],
                }
            ],
        },
    ]


def resolved_blocks(alert: Fired) -> list[Block]:
    t = alert.transition
    return [
        bk.section(
            f":white_check_mark: *Resolved:* {alert.rule.alert_name} on *{bk.escape(alert.service)}/"
            f"{bk.escape(alert.component)}* — {bk.escape(t.evidence)}"
        ),
        bk.context(f"Firing from {_when(t.fired_at or t.since)} to {_when(t.at)} · alert `{alert.key}`"),
    ]


class SlackAlerts:
    """Posts fired alerts to the ops channel and edits them when they resolve."""

    def __init__(self, client: AsyncWebClient, channel: str) -> None:
        self.client = client
        self.channel = channel

    async def fired(self, alert: Fired) -> tuple[str, str] | None:
        blocks = fired_blocks(alert)
        text = f"{alert.rule.alert_name} on {alert.service}/{alert.component}: {alert.transition.evidence}"
        response = await self.client.chat_postMessage(channel=self.channel, text=text, blocks=blocks)
        return str(response["channel"]), str(response["ts"])

    async def resolved(self, alert: Fired) -> None:
        blocks = resolved_blocks(alert)
        text = f"Resolved: {alert.rule.alert_name} on {alert.service}/{alert.component}"
        stored = alert.stored
        if stored is not None and stored.message_ts and stored.message_channel:
            await self.client.chat_update(channel=stored.message_channel, ts=stored.message_ts, text=text,
                                          blocks=blocks)  # fmt: skip
            return
        if alert.transition.announced:
            await self.client.chat_postMessage(channel=self.channel, text=text, blocks=blocks)


@subcommand("alerts", help="Alerts firing now, and silences in force", risk=Risk.READ, args=NoArgs)
async def alerts(ctx: OpsContext, args: NoArgs) -> Reply:
    now = datetime.now(UTC)
    stored = await ctx.deps.store.load_alerts()
    silences = await ctx.deps.store.active_silences(now)
    firing = []
    for key, alert in sorted(stored.items()):
        state = state_from_json(alert.state, key)
        if state.firing:
            firing.append(f":rotating_light: `{key}` since {_when(state.since)} — {bk.escape(state.evidence[:200])}")
        elif state.phase.value == "pending":
            firing.append(f":hourglass_flowing_sand: `{key}` pending since {_when(state.since)}")
    muted = [f":zzz: `{s.key}` until {_when(s.until)} by <@{s.by}>" for s in silences]
    blocks = [bk.header("Alerts"), *bk.sections(firing or ["Nothing is firing."])]
    if muted:
        blocks += bk.sections(muted, title="*Silenced*")
    text = f"{len(firing)} alert(s), {len(muted)} silence(s)"
    return Reply(text, blocks, ephemeral=True)


class SilenceArgs(CommandArgs):
    positional = ("alert", "duration")
    alert: str = Field(max_length=200, pattern=KEY)
    duration: str = Field(max_length=8)
    reason: str = Field("", max_length=200)


def _known(deps: Deps, key: str) -> None:
    # The rules the watcher holds each component to: its own, or the defaults its type gets.
    keys = {
        rule.key(w.target.service, w.target.component)
        for w in watched(deps.inventory, frozenset(deps.probes))
        for rule in w.rules
    }
    if deps.inventory.alerts.down_by_default:
        keys |= {f"{service}/{component}/ServiceDown" for service, component, _ in deps.inventory.components()}
    if key not in keys:
        raise CommandError(f"There is no alert `{key}`; `/ops alerts` shows those firing (service/component/Name).")


@subcommand(
    "silence",
    help="Silence an alert for a while (it still changes state; nothing is posted)",
    usage="<service/component/Alert> <30m|4h|2d> [--reason text]",
    risk=Risk.OPERATE,
    args=SilenceArgs,
)
async def silence(ctx: OpsContext, args: SilenceArgs) -> Reply:
    _known(ctx.deps, args.alert)
    until = datetime.now(UTC) + parse_duration(args.duration)
    await ctx.deps.store.add_silence(args.alert, until=until, by=ctx.user_id, reason=args.reason,
                                     at=datetime.now(UTC))  # fmt: skip
    text = f":zzz: `{args.alert}` is silenced until {_when(until)} by <@{ctx.user_id}>."
    return Reply(text, [bk.section(text)], detail=f"until {until.isoformat()}")


class UnsilenceArgs(CommandArgs):
    positional = ("alert",)
    alert: str = Field(max_length=200, pattern=KEY)


@subcommand("unsilence", help="End an alert's silence now", usage="<service/component/Alert>",
            risk=Risk.OPERATE, args=UnsilenceArgs)  # fmt: skip
async def unsilence(ctx: OpsContext, args: UnsilenceArgs) -> Reply:
    ended = await ctx.deps.store.end_silence(args.alert, at=datetime.now(UTC))
    if not ended:
        raise CommandError(f"`{args.alert}` is not silenced.")
    text = f"`{args.alert}` is no longer silenced."
    return Reply(text, [bk.section(text)])


async def silence_pick(deps: Deps, action: Mapping[str, Any]) -> str:
    """A choice in a fired alert's Silence menu: `/ops silence <key> <duration>` as the clicker (the
    menu's block_id names the alert, the option's value the duration)."""
    key = str(action.get("block_id", ""))[:260].removeprefix("alert:")
    duration = str((action.get("selected_option") or {}).get("value", ""))[:10]
    if not re.fullmatch(KEY, key) or duration not in SILENCE_CHOICES:
        raise CommandError("That is not a silence opsbot offered.")
    return f"silence {key} {duration}"


CLICK_COMMANDS[SILENCE_PICK] = silence_pick
