"""A seeded fuzz of hostile `/ops` text over signed requests to the real Bolt app.

Every input is something opsbot must refuse: an unknown verb, a known verb with a hostile argument
(Slack mentions and links, shell metacharacters, path traversal, huge numbers, control and
bidirectional characters), or the wrong number of arguments. Each must get exactly one ephemeral
line that shows the user's text escaped (``<!channel>`` must not ping a channel) and no raw
validation internals (regexes), with no channel post, no approval and nothing run.
"""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from handlers.registry import MAX_TOKEN, registry
from services.errors import OUTCOMES
from services.state import ApprovalState, AuditEvent
from tests.fixtures.slack import FakeSlack
from tests.fixtures.wait import wait_until
from tests.scenario.harness import Bot, inventory, running_bot

ADMIN = "U0ADMIN1"
SEED = 20261202
CASES = 400

HOSTILE = [
    "<!channel>",
    "<!here>",
    "<!everyone>",
    "<@U0ADMIN1>",
    "<#C0OPS|ops>",
    "<https://evil.example/|click here>",
    "<mailto:x@evil.example|mail>",
    "a&b<c>d",
    "&amp;lt;",
    "; rm -rf /",
    "$(reboot)",
    "`id`",
    "| cat /etc/passwd",
    "&& shutdown -h now",
    "../../etc/passwd",
    "..\\..\\windows\\system32",
    "%2e%2e%2f%2e%2e%2f",
    "/dev/zero",
    "\u202eevil\u202c",
    "\u200b",
    "🔥" * 12,
    "9" * 40,
    "-1",
    "1e308",
    "NaN",
    "0x7fffffff",
    "*bold* _it_ ~strike~",
    "${HOME}",
    "{{7*7}}",
    "%s%s%n",
    "' OR 1=1 --",
    "DROP TABLE jobs;",
    "x" * (MAX_TOKEN + 1),
    "--",
    "--limit=-5",
    "--user=<!channel>",
    "shop/db/<!here>",
]
# Ways Slack can deliver text the tokenizer refuses outright.
UNREADABLE = ["\x00", "\x07bell", "\x1b[31mred", 'unclosed "quote', "it's"]
NO_ARGS = {"alerts", "approvals", "schedules"}
# What must never reach the channel raw: Slack would act on it (ping, link, mention).
RAW = re.compile(r"<[!@#]|<https?:|<mailto:")
UNESCAPED = re.compile(r"[<>]|&(?!amp;|lt;|gt;)")


def hostile_texts(seed: int, count: int) -> list[str]:
    """Deterministic hostile command texts: unknown verbs, hostile arguments, wrong arity."""
    rng = random.Random(seed)
    verbs = sorted(c.verb for c in registry if c.verb != "help")  # help ignores what follows it
    out: list[str] = []
    while len(out) < count:
        kind = rng.randrange(5)
        token = rng.choice(HOSTILE)
        quoted = f'"{token}"' if any(ch in token for ch in " '\"") else token
        if kind == 0:  # an unknown verb
            out.append(quoted)
        elif kind == 1:  # a verb, then a hostile first argument
            verb = rng.choice(verbs)
            out.append(f"{verb} {quoted}")
        elif kind == 2:  # a real service, then hostile arguments
            verb = rng.choice([v for v in verbs if v not in NO_ARGS and v not in ("audit", "health", "deploys")])
            out.append(f"{verb} shop {quoted} {rng.choice(HOSTILE)!r}")
        elif kind == 3:  # far too many arguments
            verb = rng.choice(verbs)
            out.append(verb + " x" * rng.randrange(4, 9))
        else:  # text the tokenizer refuses
            out.append(f"{rng.choice(verbs)} {rng.choice(UNREADABLE)}")
    return out


def fuzz_inventory(db: Path, backups: Path) -> str:
    return f"""
roles:
  admin: [{ADMIN}]
services:
  shop:
    components:
      db: {{type: sqlite, path: "{db}"}}
backups:
  destinations:
    local: {{type: directory, path: "{backups}"}}
"""


@pytest.fixture
async def bot(fake_slack: FakeSlack, tmp_path: Path) -> AsyncIterator[Bot]:
    db = tmp_path / "shop.sqlite3"
    db.touch()
    async with running_bot(fake_slack, tmp_path, inventory(fuzz_inventory(db, tmp_path / "backups"))) as running:
        yield running


def test_the_fuzz_is_deterministic_and_varied() -> None:
    texts = hostile_texts(SEED, CASES)
    assert texts == hostile_texts(SEED, CASES)
    assert len(set(texts)) > CASES // 2
    assert sum(RAW.search(t) is not None for t in texts) > 30


async def test_hostile_text_gets_one_escaped_ephemeral_line_and_runs_nothing(bot: Bot, fake_slack: FakeSlack) -> None:
    texts = hostile_texts(SEED, CASES)
    store = bot.container.store
    for start in range(0, len(texts), 25):  # bursts of 25 concurrent requests
        batch = list(enumerate(texts[start : start + 25], start))
        for i, text in batch:
            body = fake_slack.slash_body(text, user_id=ADMIN, response_url=fake_slack.response_url(f"fuzz{i}"))
            assert (await bot.post(body)).status == 200, text
        for i, _ in batch:
            await fake_slack.wait_for(f"response_url/fuzz{i}", timeout=20)
    await wait_until(lambda: bot.container.deps.running.count == 0, "every command finishes", timeout=30)

    async def commands_audited() -> list[AuditEvent] | None:
        # approve/deny of a bad id is also audited by the approval engine, as "approval approve refused"
        events = [e for e in await store.audit_events(limit=CASES * 3) if not e.command.startswith("approval ")]
        return events if len(events) >= CASES else None

    audited = await wait_until(commands_audited, f"{CASES} commands audited", timeout=30)

    problems: list[str] = []
    for i, text in enumerate(texts):
        answers = fake_slack.calls_to(f"response_url/fuzz{i}")
        if len(answers) != 1:
            problems.append(f"{text!r}: {len(answers)} answers: {[a.params.get('text') for a in answers]}")
            continue
        params = answers[0].params
        said = str(params.get("text", ""))
        blocks = answers[0].json_param("blocks") or []
        shown = [b.get("text", {}).get("text", "") for b in blocks]
        if params.get("response_type") != "ephemeral" or len(blocks) > 1 or any(said not in t for t in shown):
            problems.append(f"{text!r}: not one ephemeral line: {params}")
        # Our own usage lines name arguments as <service>; what comes before is about the user's text.
        if RAW.search(said) or UNESCAPED.search(said.split("Usage:")[0]):
            problems.append(f"{text!r}: shown unescaped: {said!r}")
        if "pattern" in said or "^" in said or "failed (ref" in said or "Traceback" in said:
            problems.append(f"{text!r}: internals shown: {said!r}")
        if "\n" in said.strip():
            problems.append(f"{text!r}: more than one line: {said!r}")
    assert not problems, "\n".join(problems[:40])
    assert fake_slack.calls_to("chat.postMessage") == []
    assert fake_slack.calls_to("chat.update") == []
    assert await store.list_approvals(list(ApprovalState)) == []
    assert await store.list_backups() == []
    assert len(audited) == CASES and len({e.request_id for e in audited}) == CASES
    assert {e.outcome for e in audited} <= {"rejected", "denied"} < set(OUTCOMES), {e.outcome for e in audited}


async def test_verifying_an_unknown_backup_is_one_line_with_nothing_before_it(bot: Bot, fake_slack: FakeSlack) -> None:
    body = fake_slack.slash_body("backup verify nosuchbackup", user_id=ADMIN)
    assert (await bot.post(body)).status == 200
    [answer] = await fake_slack.wait_for("response_url/default")
    await wait_until(lambda: bot.container.deps.running.count == 0, "the command finishes")
    assert fake_slack.calls_to("response_url/default") == [answer]
    assert answer.params["text"].startswith("There is no backup `nosuchbackup`")
    assert fake_slack.calls_to("chat.postMessage") == []
