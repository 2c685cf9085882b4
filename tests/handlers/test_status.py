"""`/ops status` through the router, through signed Slack requests, and through `opsbot run`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.sample_app import SampleAppState, start_sample_app
from handlers.commands import load_registry
from handlers.context import Deps, Reply
from handlers.router import Router
from handlers.status import trend
from services.access import RoleResolver
from services.approvals import ApprovalEngine
from services.figures.base import Measurement
from services.inventory import parse_inventory
from services.locks import LocalLocks
from services.redaction import Redactor
from services.state import StateStore, open_state_store
from tests.bot.test_cli import opsbot
from tests.fixtures.fake_docker import FakeDocker, fake_docker_fixture  # noqa: F401
from tests.fixtures.slack import FakeSlack
from tests.scenario.harness import inventory, running_bot

VIEWER = "U0VIEWER"
STRANGER = "U0NOBODY"


@pytest.fixture
async def app() -> AsyncIterator[tuple[SampleAppState, str]]:
    state = SampleAppState()
    runner, url = await start_sample_app(state)
    yield state, url
    await runner.cleanup()


def inventory_text(url: str, uploads: Path, fake: FakeDocker, project: Path) -> str:
    return f"""
roles: {{viewer: [{VIEWER}]}}
services:
  shop:
    components:
      api: {{type: http, url: "{url}", metrics: /metrics, timeout: 2}}
      box:
        type: host
        mounts: ["{uploads}"]
        directories: ["{uploads}"]
        thresholds: {{memory_used_pct: {{warning: 100}}, disk_used_pct: {{warning: 100}}}}
      run: {{type: cloudrun, project: my-proj, region: asia-northeast3, service: vcbl}}
  vcc:
    components:
      stack: {{type: compose, project_dir: "{project}", project_name: vcc, docker: "{fake.path}", timeout: 5}}
"""


@pytest.fixture
def world(tmp_path: Path, fake_docker: FakeDocker) -> tuple[Path, Path]:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "a.png").write_bytes(b"x" * 10_000)
    project = tmp_path / "vcc"
    project.mkdir()
    fake_docker.set_stats("web", cpu_pct=93.0, used="512MiB", limit="1GiB", memory_pct=50.0, restarts=2)
    fake_docker.set_stats("worker", cpu_pct=1.0, used="64MiB", limit="1GiB", memory_pct=6.3)
    return uploads, project


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    store = await open_state_store(None, default_path=tmp_path / "state.sqlite3")
    yield store
    await store.close()


def deps_for(text: str, store: StateStore) -> Deps:
    loaded = parse_inventory(text, "t", env={})
    redactor = Redactor(loaded.secrets)
    roles = RoleResolver(loaded.inventory.roles)
    return Deps(
        loaded=loaded, store=store, probes={}, redactor=redactor, roles=roles,
        approvals=ApprovalEngine(store, LocalLocks(), roles, loaded.inventory.approvals, redactor),
    )  # fmt: skip


async def run(deps: Deps, text: str, user: str = VIEWER) -> Reply:
    return await Router(load_registry()).dispatch(user_id=user, channel_id="C0OPS", text=text, deps=deps)


async def test_status_all_is_one_group_per_service_worst_first(
    app: tuple[SampleAppState, str], world: tuple[Path, Path], fake_docker: FakeDocker, store: StateStore
) -> None:
    uploads, project = world
    deps = deps_for(inventory_text(app[1], uploads, fake_docker, project), store)
    reply = await run(deps, "status all --window 30m")
    assert reply.outcome == "ok" and reply.status is not None and reply.status.label == "warning"
    text = json.dumps(reply.blocks, ensure_ascii=False)
    assert "Status of all services over the last 30m: warning" in text
    assert text.index("*vcc*") < text.index("*shop*")  # the service with a warning comes first
    assert "*web CPU 93.0 %* (warning > 80.0 %)" in text
    assert "web restarts 2" in text
    assert f"size of {uploads}" in text and "2 entries" not in text  # one file: "1 entries"
    # No Google credentials here (and no metadata server is asked): one plain line, the rest still read.
    assert "*run* (cloudrun) · unknown: The bot has no usable Google credentials to read Cloud Monitoring" in text
    assert "requests unknown (only in the watcher's history)" in text
    assert "requests since start" in text
    assert "WARNING  vcc/stack: web CPU 93.0 % (warning > 80.0 %)" in reply.text


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        (
            "status shop --window 8d",
            "A window of 8d is longer than the 7 days `/ops status` looks back; use 7d or less.",
        ),
        ("status nosuch", "There is no service called `nosuch`."),
        ("status shop --window 5", "`--window 5` is not a length"),
        ("status shop --window", "`--window` needs a value."),
    ],
)
async def test_bad_input_is_one_plain_sentence(
    text: str, answer: str, app: tuple[SampleAppState, str], world: tuple[Path, Path], fake_docker: FakeDocker,
    store: StateStore,
) -> None:  # fmt: skip
    uploads, project = world
    deps = deps_for(inventory_text(app[1], uploads, fake_docker, project), store)
    reply = await run(deps, text)
    assert reply.ephemeral and reply.text.startswith(answer), reply.text
    assert "Traceback" not in reply.text and fake_docker.calls() == []


async def test_status_needs_a_known_user(
    app: tuple[SampleAppState, str], world: tuple[Path, Path], fake_docker: FakeDocker, store: StateStore
) -> None:
    uploads, project = world
    reply = await run(deps_for(inventory_text(app[1], uploads, fake_docker, project), store), "status all", STRANGER)
    assert reply.outcome == "denied" and fake_docker.calls() == []


def test_trend_shows_the_change_against_the_window_before() -> None:
    assert trend(Measurement("cpu_pct", "CPU", 62.5, "%", previous=50.0)) == "↑ 12.5 pts"
    assert trend(Measurement("latency_p95_ms", "p95", 800, "ms", previous=1300)) == "↓ 500 ms"
    assert trend(Measurement("requests", "requests", 10, "count", previous=10)) == "→ same as before"
    assert trend(Measurement("requests", "requests", 10, "count")) == ""


async def test_status_through_signed_slack_requests(
    fake_slack: FakeSlack, tmp_path: Path, app: tuple[SampleAppState, str], world: tuple[Path, Path],
    fake_docker: FakeDocker,
) -> None:  # fmt: skip
    uploads, project = world
    loaded = inventory(inventory_text(app[1], uploads, fake_docker, project))
    async with running_bot(fake_slack, tmp_path / "state", loaded) as bot:
        answer = await bot.command("status vcc", user=VIEWER)
        assert answer.status == 200 and answer.body == ""
        [post] = await fake_slack.wait_for("chat.postMessage")
        blocks = json.dumps(post.json_param("blocks"), ensure_ascii=False)
        assert "Status of vcc over the last 1h: warning" in blocks and "web CPU 93.0 %" in blocks
        await bot.command("status vcc --window 30d", user=VIEWER)
        [refusal] = await fake_slack.wait_for("response_url/default")
        assert "longer than the 7 days" in json.dumps(refusal.params)
        events = await bot.container.store.audit_events()
        assert sorted((e.command, e.outcome) for e in events) == [("status", "ok"), ("status", "rejected")]


async def test_status_in_opsbot_run(tmp_path: Path, app: tuple[SampleAppState, str]) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    config = tmp_path / "opsbot.yaml"
    config.write_text(
        f"""
roles: {{viewer: ["*"]}}
services:
  shop:
    components:
      api: {{type: http, url: "{app[1]}", metrics: /metrics, timeout: 2}}
      box: {{type: host, mounts: ["{uploads}"], directories: ["{uploads}"], thresholds: {{memory_used_pct: {{warning: 100}}, disk_used_pct: {{warning: 100}}}}}}
""",  # noqa: E501
        encoding="utf-8",
    )
    env = {"OPSBOT_CONFIG": str(config), "OPSBOT_STATE_DIR": str(tmp_path / "state")}
    code, out, err = await opsbot("run", "status shop", env=env)
    assert code == 0, out + err
    assert "Status of shop over the last 1h: healthy" in out and "only in the watcher's history" in out
    code, out, _ = await opsbot("run", "status shop --window 9d", env=env)
    assert code != 0 and "longer than the 7 days" in out and "Traceback" not in out
