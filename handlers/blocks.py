"""Block Kit building, Slack's size limits, and rendering blocks as plain text for the console."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from handlers.context import Block, Reply
from services.health import Status
from services.text import escape as escape  # re-exported: handlers escape outside text with bk.escape

MAX_BLOCKS = 50
MAX_SECTION_TEXT = 3000
MAX_HEADER_TEXT = 150
MAX_CONTEXT_TEXT = 2000
MAX_FALLBACK_TEXT = 3000

STATUS_EMOJI = {
    Status.HEALTHY: ":large_green_circle:",
    Status.WARNING: ":large_yellow_circle:",
    Status.CRITICAL: ":red_circle:",
}
WAKING_EMOJI = ":hourglass_flowing_sand:"


def header(text: str) -> Block:
    return {"type": "header", "text": {"type": "plain_text", "text": clip(text, MAX_HEADER_TEXT), "emoji": True}}


def section(text: str) -> Block:
    return {"type": "section", "text": {"type": "mrkdwn", "text": clip(text, MAX_SECTION_TEXT)}}


def context(text: str) -> Block:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": clip(text, MAX_CONTEXT_TEXT)}]}


def divider() -> Block:
    return {"type": "divider"}


def clip(text: str, limit: int) -> str:
    """Shorten text to ``limit`` characters, saying how much was cut (never cut silently)."""
    if len(text) <= limit:
        return text
    note = f"… ({len(text) - limit + 40} more characters)"
    return text[: limit - len(note)] + note


def sections(lines: Iterable[str], *, title: str | None = None) -> list[Block]:
    """Pack lines into as few sections as fit Slack's 3,000-character limit, splitting at lines."""
    blocks: list[Block] = []
    current: list[str] = [title] if title else []
    size = len(title) + 1 if title else 0
    for line in lines:
        line = clip(line, MAX_SECTION_TEXT - 200)
        if current and size + len(line) + 1 > MAX_SECTION_TEXT:
            blocks.append(section("\n".join(current)))
            current = [f"{title} (continued)"] if title else []
            size = len(current[0]) + 1 if current else 0
        current.append(line)
        size += len(line) + 1
    if current:
        blocks.append(section("\n".join(current)))
    return blocks


@dataclass(frozen=True)
class OutMessage:
    """One Slack message to send; ``in_thread`` messages are replies to the first one."""

    text: str
    blocks: list[Block]
    in_thread: bool = False


def messages_for(reply: Reply) -> list[OutMessage]:
    """Split a reply into messages within Slack's limits; the first carries a summary when needed."""
    fallback = clip(reply.text, MAX_FALLBACK_TEXT)
    if len(reply.blocks) <= MAX_BLOCKS:
        return [OutMessage(fallback, reply.blocks)]
    chunks = [reply.blocks[i : i + MAX_BLOCKS] for i in range(0, len(reply.blocks), MAX_BLOCKS)]
    head = list(reply.summary or reply.blocks[:5])[: MAX_BLOCKS - 1]
    head.append(context(f":thread: The full report continues in the thread ({len(chunks)} messages)."))
    out = [OutMessage(fallback, head)]
    for number, chunk in enumerate(chunks, start=1):
        out.append(OutMessage(f"{clip(reply.text, 200)} ({number}/{len(chunks)})", chunk, in_thread=True))
    return out


def _text_of(obj: Any) -> str:
    if isinstance(obj, dict):
        return str(obj.get("text", ""))
    return ""


_CONSOLE_EMOJI = {
    ":large_green_circle:": "🟢",
    ":large_yellow_circle:": "🟡",
    ":red_circle:": "🔴",
    ":hourglass_flowing_sand:": "⏳",
    ":warning:": "⚠️ ",
    ":thread:": "🧵",
    ":white_check_mark:": "✅",
    ":x:": "❌",
    ":rotating_light:": "🚨",
    ":hourglass:": "⌛",
}
_MRKDWN_BOLD = re.compile(r"(?<![\w*])\*(\S(?:[^*\n]*\S)?)\*(?![\w*])")


def plain(text: str) -> str:
    """mrkdwn to terminal text: emoji shortcodes to symbols, *bold* to plain, entities unescaped."""
    for code, symbol in _CONSOLE_EMOJI.items():
        text = text.replace(code, symbol)
    text = _MRKDWN_BOLD.sub(r"\1", text)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def render_text(blocks: list[Block]) -> str:
    """Block Kit as readable plain text for the console; buttons become numbered choices."""
    lines: list[str] = []
    choice = 0
    for block in blocks:
        kind = block.get("type")
        if kind == "header":
            title = _text_of(block.get("text"))
            lines += [title, "=" * min(len(title), 72)]
        elif kind == "section":
            lines.append(_text_of(block.get("text")))
            for field_ in block.get("fields", []):
                lines.append(f"  {_text_of(field_)}")
        elif kind == "context":
            lines.append("  ".join(_text_of(e) for e in block.get("elements", [])))
        elif kind == "divider":
            lines.append("-" * 40)
        elif kind == "actions":
            for element in block.get("elements", []):
                if element.get("type") == "button":
                    choice += 1
                    lines.append(f"  [{choice}] {_text_of(element.get('text'))}")
    return plain("\n".join(lines))
