"""Slack's limits: 50 blocks a message, 3,000 characters a section; nothing is cut silently."""

from __future__ import annotations

from handlers import blocks as bk
from handlers.context import Reply


def test_sections_split_at_lines_within_the_limit() -> None:
    lines = [f"line {i} " + "x" * 90 for i in range(100)]
    sections = bk.sections(lines, title="*svc*")
    assert len(sections) > 1
    texts = [s["text"]["text"] for s in sections]
    assert all(len(t) <= 3000 for t in texts)
    assert texts[1].startswith("*svc* (continued)")
    assert sum(t.count("line ") for t in texts) == 100


def test_clip_says_how_much_was_cut() -> None:
    clipped = bk.clip("a" * 5000, 3000)
    assert len(clipped) <= 3000 and "more characters" in clipped


def test_long_reply_gets_a_summary_first_and_the_rest_in_the_thread() -> None:
    body = [bk.section(f"item {i}") for i in range(120)]
    summary = [bk.header("Summary"), bk.section("3 problems")]
    messages = bk.messages_for(Reply("report", body, summary=summary))
    assert len(messages) == 1 + 3
    assert messages[0].blocks[:2] == summary and not messages[0].in_thread
    assert "continues in the thread (3 messages)" in messages[0].blocks[-1]["elements"][0]["text"]
    assert all(m.in_thread and len(m.blocks) <= 50 for m in messages[1:])
    assert sum(len(m.blocks) for m in messages[1:]) == 120


def test_short_reply_is_one_message() -> None:
    assert len(bk.messages_for(Reply("x", [bk.section("y")]))) == 1


def test_render_text_for_the_console() -> None:
    blocks = [
        bk.header("Title"),
        bk.section(":red_circle: *db* is &lt;down&gt;"),
        {"type": "actions", "elements": [{"type": "button", "text": {"type": "plain_text", "text": "Approve"}}]},
    ]
    text = bk.render_text(blocks)
    assert "🔴 db is <down>" in text
    assert "[1] Approve" in text
