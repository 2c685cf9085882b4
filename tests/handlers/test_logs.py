"""/ops logs and /ops traffic through the router: read permission, bad input (nothing read), planted
secrets masked, error groups, the Next page button, a page too big for a message going into a file."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from handlers.commands import load_registry
from handlers.context import Deps, Reply
from handlers.logs import NEXT_PAGE, next_page_command
from handlers.router import Router
from services.access import RoleResolver
from services.approvals import ApprovalEngine
from services.inventory import Component
from services.locks import LocalLocks
from services.logs.base import LogPage, LogQuery
from services.logs.logfile import LogfileBackend
from services.logs.registry import LOG_BACKENDS, LogDeps
from services.redaction import Redactor
from services.state import StateStore, open_state_store
from tests.fixtures.slack_checks import MESSAGE_BLOCKS, check_blocks

VIEWER, READER, OPERATOR, GROUPED, ADMIN = "U0VIEW", "U0READER", "U0OPER", "U0GROUPED", "U0ADMIN"
DB_PASSWORD = "inventory-Secret-91"
PLANTED = {
    "password": "hunter2-Planted",
    "bearer": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib2IifQ.c2lnbmF0dXJlLXBsYW50ZWQ",
    "aws": "AKIAIOSFODNN7PLANTED",
    "dsn": "dsn-Pass-Planted",
    "token": "tok_9f8e7d6c5b4a3210",
    "inventory": DB_PASSWORD,
}


def inventory_text(log_dir: Path) -> str:
    return f"""
timezone: Asia/Seoul
roles:
  viewer: [{VIEWER}, {READER}, {GROUPED}]
  operator: [{OPERATOR}]
  admin: [{ADMIN}]
  read:
    shop: [{READER}, S0LOGREAD]
services:
  shop:
    components:
      app: {{type: logfile, path: "{log_dir}/app.log"}}
      access: {{type: logfile, path: "{log_dir}/access.log", format: nginx_combined}}
      db: {{type: postgres, dsn: "postgresql://app:${{DB_PW}}@db/app"}}
  blog:
    components:
      app: {{type: logfile, path: "{log_dir}/blog.log"}}
"""


class SpyBackend:
    """The real logfile backend, counting its reads: a refused command must read nothing."""

    def __init__(self) -> None:
        self.reads: list[LogQuery] = []
        self.real = LogfileBackend()

    async def read(self, component: Component, query: LogQuery, *, timeout: float) -> LogPage:  # noqa: ASYNC109
        self.reads.append(query)
        return await self.real.read(component, query, timeout=timeout)


def line(at: datetime, level: str, message: str) -> str:
    return json.dumps({"timestamp": at.isoformat(), "level": level, "message": message}) + "\n"


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    now = datetime.now(UTC)
    lines = [line(now - timedelta(minutes=50 - i), "info", f"request {i} served in {i * 3} ms") for i in range(40)]
    lines += [line(now - timedelta(minutes=9 - i % 9), "error", f"user {1000 + i} not found in 'shard-{i}'")
              for i in range(6)]  # fmt: skip
    lines += [
        line(now - timedelta(minutes=3), "error", f"login failed password={PLANTED['password']} for bob"),
        line(now - timedelta(minutes=3), "warning", f"Authorization: Bearer {PLANTED['bearer']}"),
        line(now - timedelta(minutes=2), "error", f"boto3 used {PLANTED['aws']} <!channel> `x`"),
        line(now - timedelta(minutes=2), "error", f"db postgres://app:{PLANTED['dsn']}@db:5432/app refused"),
        line(now - timedelta(minutes=1), "info", f"callback ?token={PLANTED['token']}&x=1"),
        line(now - timedelta(minutes=1), "error", f"connect with {DB_PASSWORD} failed"),
    ]
    lines.sort(key=lambda text: json.loads(text)["timestamp"])
    directory = tmp_path / "log"
    directory.mkdir()
    (directory / "app.log").write_text("".join(lines))
    stamp = (now - timedelta(minutes=5)).strftime("%d/%b/%Y:%H:%M:%S +0000")
    access = [f'10.0.0.{i % 3} - - [{stamp}] "GET /item/{i % 4}?sig=abc HTTP/1.1" {code} 10 "-" "ua"\n'
              for i, code in enumerate([200] * 10 + [404] * 5 + [500] * 2 + [403])]  # fmt: skip
    access += ["203.0.113.9 - - [" + stamp + '] "GET /wp-login.php HTTP/1.1" 404 0 "-" "scanner"\n'] * 7
    (directory / "access.log").write_text("".join(access))
    (directory / "blog.log").write_text(line(now, "info", "blog ok"))
    return directory


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    store = await open_state_store(None, default_path=tmp_path / "state.sqlite3")
    yield store
    await store.close()


class Groups:
    def __init__(self) -> None:
        self.down = False

    async def __call__(self, group: str) -> frozenset[str]:
        if self.down:
            raise ConnectionError("slack is down")
        return frozenset({GROUPED}) if group == "S0LOGREAD" else frozenset()


@pytest.fixture
def groups() -> Groups:
    return Groups()


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> SpyBackend:
    backend = SpyBackend()

    def build(deps: LogDeps) -> SpyBackend:
        return backend

    monkeypatch.setitem(LOG_BACKENDS, "logfile", build)
    return backend


@pytest.fixture
def deps(store: StateStore, log_dir: Path, groups: Groups) -> Deps:
    from services.inventory import parse_inventory

    loaded = parse_inventory(inventory_text(log_dir), "t", {"DB_PW": DB_PASSWORD})
    redactor = Redactor(loaded.secrets)
    roles = RoleResolver(loaded.inventory.roles, groups)
    return Deps(loaded=loaded, store=store, probes={}, redactor=redactor, roles=roles,
                approvals=ApprovalEngine(store, LocalLocks(), roles, loaded.inventory.approvals, redactor))  # fmt: skip


async def run(deps: Deps, user: str, text: str) -> Reply:
    return await Router(load_registry()).dispatch(user_id=user, channel_id="C0OPS", text=text, deps=deps)


def everything(reply: Reply) -> str:
    return reply.text + json.dumps(reply.blocks) + "".join(f.content.decode() for f in reply.files)


def refusal(reply: Reply) -> str:
    assert reply.ephemeral and reply.outcome in ("rejected", "denied", "error"), reply.text
    return reply.text


async def test_errors_of_the_last_hour_with_groups_and_masked_secrets(deps: Deps, spy: SpyBackend) -> None:
    reply = await run(deps, READER, "logs shop app --errors --since 1h")
    assert reply.outcome == "ok" and not reply.ephemeral, reply.text
    text = everything(reply)
    for name, secret in PLANTED.items():
        assert secret not in text, f"the planted {name} secret reached the reply"
    assert "password=***" in text and "postgres://app:***@db" in text
    assert "&lt;!channel&gt;" in text and "<!channel>" not in text
    assert '6 x* `user &lt;n&gt; not found in \\"&lt;v&gt;\\"`' in text  # six messages, one shape
    assert "10 matched" in reply.text
    assert check_blocks(reply.blocks, MESSAGE_BLOCKS) is None
    assert len(spy.reads) == 1 and spy.reads[0].errors


async def test_a_bearer_token_in_a_warning_is_masked(deps: Deps, spy: SpyBackend) -> None:
    reply = await run(deps, READER, "logs shop app --grep authorization")
    text = everything(reply)
    assert "Authorization: Bearer ***" in text and PLANTED["bearer"] not in text and "1 matched" in reply.text


async def test_the_newest_lines_come_first_in_the_inventorys_zone(deps: Deps, spy: SpyBackend) -> None:
    reply = await run(deps, READER, "logs shop --limit 3")
    code = [b["text"]["text"] for b in reply.blocks if b.get("type") == "section" and "```" in b["text"]["text"]]
    assert len(code) == 1
    rows = code[0].strip("`").splitlines()
    assert len(rows) == 3 and "connect with ***" in rows[0] and "token=***" in rows[1]
    newest = datetime.now(UTC) - timedelta(minutes=1)
    seoul = newest.astimezone(datetime.now(UTC).astimezone().tzinfo).strftime("%H:%M")
    assert rows[0][:5] == (newest + timedelta(hours=9)).strftime("%H:%M") or seoul  # Asia/Seoul is UTC+9
    assert (newest + timedelta(hours=9)).strftime("%H:%M") == rows[0][:5]


async def test_next_page_goes_on_where_the_page_ended(deps: Deps, spy: SpyBackend) -> None:
    first = await run(deps, READER, "logs shop app --limit 4")
    [actions] = [b for b in first.blocks if b.get("type") == "actions"]
    button = actions["elements"][0]
    assert button["action_id"] == NEXT_PAGE and len(button["value"]) <= 2000
    text = await next_page_command(deps, {"action_id": NEXT_PAGE, "value": button["value"]})
    second = await run(deps, READER, text)
    assert second.outcome == "ok", second.text

    def rows(reply: Reply) -> list[str]:
        return [r for b in reply.blocks if b.get("type") == "section" and "```" in b["text"]["text"]
                for r in b["text"]["text"].strip("`").splitlines()]  # fmt: skip

    assert len(rows(first)) == 4 and len(rows(second)) == 4
    assert not set(rows(first)) & set(rows(second))
    assert "login failed password=***" in "\n".join(rows(second))
    # The clicker's own permission counts: a viewer not listed for shop cannot page on.
    assert "Reading the logs of `shop`" in refusal(await run(deps, VIEWER, text))


async def test_a_page_bigger_than_a_message_goes_into_a_file(deps: Deps, spy: SpyBackend, log_dir: Path) -> None:
    now = datetime.now(UTC)
    with (log_dir / "app.log").open("a") as handle:
        for i in range(600):
            handle.write(line(now, "info", f"bulk line {i} " + "y" * 150 + f" secret_key={PLANTED['token']}"))
    reply = await run(deps, READER, "logs shop app --limit 1000")
    assert len(reply.files) == 1
    content = reply.files[0].content.decode()
    assert content.count("\n") + 1 == 652 and PLANTED["token"] not in content and "secret_key=***" in content
    assert check_blocks(reply.blocks, MESSAGE_BLOCKS) is None
    assert "in the thread, as a file" in json.dumps(reply.blocks)


async def test_traffic_counts_statuses_paths_and_suspicious_ips(deps: Deps, spy: SpyBackend) -> None:
    reply = await run(deps, READER, "traffic shop --since 1h")
    text = everything(reply)
    assert "25 requests" in text and "10 2xx" in text and "13 4xx" in text and "2 5xx" in text
    worst = next(b["text"]["text"] for b in reply.blocks if "IPs with most 4xx" in b.get("text", {}).get("text", ""))
    assert worst.splitlines()[1].startswith("`203.0.113.9` 7 ")
    assert "`/wp-login.php` 7" in text and "sig=abc" not in text
    assert check_blocks(reply.blocks, MESSAGE_BLOCKS) is None


async def test_status_filter_on_an_access_log(deps: Deps, spy: SpyBackend) -> None:
    reply = await run(deps, READER, "logs shop access --status 5xx")
    assert "2 matched" in reply.text
    bad = refusal(await run(deps, READER, "logs shop access --status 6xx"))
    assert "--status" in bad


@pytest.mark.parametrize(
    ("user", "text", "expected"),
    [
        (VIEWER, "logs shop", "Reading the logs of `shop` is not given to you"),
        (VIEWER, "traffic shop", "Reading the logs of `shop` is not given to you"),
        (READER, "logs blog", "Reading the logs of `blog` needs the operator role"),
        (OPERATOR, "logs shop", "Reading the logs of `shop` is not given to you in the inventory's roles.read"),
        ("U0STRANGER", "logs shop", "needs the viewer role"),
    ],
)
async def test_read_permission_refusals_read_nothing(
    deps: Deps, spy: SpyBackend, user: str, text: str, expected: str
) -> None:
    assert expected in refusal(await run(deps, user, text))
    assert spy.reads == []


async def test_read_permission_through_a_user_group_fails_closed(deps: Deps, spy: SpyBackend, groups: Groups) -> None:
    assert (await run(deps, GROUPED, "logs shop --limit 1")).outcome == "ok"
    groups.down = True
    deps.roles._cache.clear()  # the group's members are read again, and cannot be
    before = len(spy.reads)
    assert "could not check your Slack user groups" in refusal(await run(deps, GROUPED, "logs shop --limit 1"))
    assert len(spy.reads) == before
    # Admins and listed users do not need the group.
    assert (await run(deps, ADMIN, "logs shop --limit 1")).outcome == "ok"
    assert (await run(deps, READER, "logs shop --limit 1")).outcome == "ok"
    # A service without readers of its own: operators and up.
    assert (await run(deps, OPERATOR, "logs blog")).outcome == "ok"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("logs shop --since 8d", "longer than the 7 days"),
        ("logs shop --from 2026-01-01T00:00 --to 2026-01-09T00:00", "longer than the 7 days"),
        ("logs shop --from 2999-01-01T00:00", "in the future"),
        ("logs shop --from 2026-01-02T00:00 --to 2026-01-01T00:00", "must be after"),
        ("logs shop --since 1h --from 2026-01-01T00:00", "not both"),
        ("logs shop --since yesterday", "is not a length"),
        ("logs shop --from noon", "is not a time"),
        ("logs shop --limit 1001", "at most 1,000 lines"),
        ("logs shop db", "is a postgres component; opsbot cannot read logs"),
        ("logs shop cache", "has no component called `cache`"),
        ("logs shop app --cursor ../../etc/passwd@0", "not one opsbot gave"),
        ("logs shop app --cursor passwd@0", "is not one of this component's log files"),
        ("logs shop app --cursor @nokey", "no longer kept"),
        ("traffic shop app --since 9d", "longer than the 7 days"),
        ("logs nowhere", "There is no service called `nowhere`"),
    ],
)
async def test_bad_input_is_one_sentence_and_reads_nothing(
    deps: Deps, spy: SpyBackend, text: str, expected: str
) -> None:
    answer = refusal(await run(deps, READER, text))
    assert expected in answer
    assert answer.count("\n") == 0
    assert all(q.cursor is None or "passwd" in q.cursor for q in spy.reads)
    if "--cursor" not in text:
        assert spy.reads == []


async def test_a_tampered_cursor_reads_no_file(deps: Deps, spy: SpyBackend, tmp_path: Path) -> None:
    (tmp_path / "log" / "passwd").write_text(line(datetime.now(UTC), "error", "must not be read"))
    reply = await run(deps, READER, "logs shop app --cursor passwd@1000")
    assert "must not be read" not in everything(reply) and reply.ephemeral


async def test_a_button_value_opsbot_did_not_make_is_refused(deps: Deps) -> None:
    from services.errors import CommandError

    for value in ("", "not json", json.dumps({"s": "shop"})):
        with pytest.raises(CommandError, match="not a page opsbot offered"):
            await next_page_command(deps, {"value": value})


def test_next_page_button_value_stays_within_slacks_limits() -> None:
    from handlers.logs import PAGE_CURSORS, _next_button

    since = datetime(2026, 12, 1, tzinfo=UTC)
    query = LogQuery(since, since + timedelta(hours=1), grep="g" * 200, limit=1000)
    block = _next_button("shop", "app", query, "c" * 5000)
    value = block["elements"][0]["value"]
    assert len(value) <= 2000 and json.loads(value)["k"].startswith("@")
    assert PAGE_CURSORS[json.loads(value)["k"][1:]] == "c" * 5000
    assert check_blocks([block], MESSAGE_BLOCKS) is None
