"""Render deploys, rollback and redeploy (runbook 002) against a fake of Render's REST API on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from bot.logging import configure_logging
from services.deploy.base import DeployError
from services.deploy.render import RenderProvider
from services.redaction import Redactor
from tests.fixtures.render import OTHER_SERVICE, SERVICE, FakeRender, start_fake


@pytest.fixture
async def render_fake() -> AsyncIterator[FakeRender]:
    fake = await start_fake()
    yield fake
    await fake.close()


@dataclass(frozen=True)
class History:
    """SERVICE's deploys, oldest first: first (went live, since replaced), broken (build failed),
    previous (went live, since replaced), current (live); and one live deploy of OTHER_SERVICE."""

    first: str
    broken: str
    previous: str
    current: str
    other: str


@pytest.fixture
def history(render_fake: FakeRender) -> History:
    fake = render_fake
    first = fake.add_deploy(SERVICE, status="live", commit="a1" * 20, message="Add work log export")
    broken = fake.add_deploy(SERVICE, status="build_failed", commit="b2" * 20, message="Try new parser")
    previous = fake.add_deploy(SERVICE, status="live", commit="c3" * 20, message="Fix Notion rate limit\n\nBack off")
    current = fake.add_deploy(SERVICE, status="live", commit="d4" * 20, message="Switch LLM provider")
    other = fake.add_deploy(OTHER_SERVICE, status="live", commit="e5" * 20, message="Worker tweak")
    return History(first, broken, previous, current, other)


def provider(fake: FakeRender, session: aiohttp.ClientSession, **options: Any) -> RenderProvider:
    api_key = options.pop("api_key", fake.api_key)
    service = options.pop("service", SERVICE)
    options.setdefault("timeout", 2.0)
    options.setdefault("poll_every", 0.01)
    options.setdefault("deploy_timeout", 5.0)
    return RenderProvider(session, service, api_key, api_url=fake.url, **options)


class Notes:
    def __init__(self) -> None:
        self.lines: list[str] = []

    async def __call__(self, line: str) -> None:
        self.lines.append(line)


async def test_releases_are_newest_first_with_the_live_deploy_marked(
    render_fake: FakeRender, history: History, http_session: aiohttp.ClientSession
) -> None:
    releases = await provider(render_fake, http_session).releases()

    assert [r.id for r in releases] == [history.current, history.previous, history.broken, history.first]
    assert [r.live for r in releases] == [True, False, False, False]
    assert [r.ready for r in releases] == [True, True, False, True]
    assert [r.status for r in releases] == ["live", "deactivated", "build_failed", "deactivated"]
    assert releases[0].description == 'commit d4d4d4d "Switch LLM provider"'
    assert releases[1].description == 'commit c3c3c3c "Fix Notion rate limit"'
    assert releases[0].created_at is not None and releases[0].created_at.tzinfo is not None
    (call,) = render_fake.requests
    assert (call.method, call.path, call.query) == ("GET", f"/v1/services/{SERVICE}/deploys", {"limit": "10"})
    assert call.authorization == f"Bearer {render_fake.api_key}"


async def test_releases_respect_the_limit(
    render_fake: FakeRender, history: History, http_session: aiohttp.ClientSession
) -> None:
    releases = await provider(render_fake, http_session).releases(limit=2)
    assert [r.id for r in releases] == [history.current, history.previous]
    assert render_fake.requests[-1].query == {"limit": "2"}


async def test_rollback_waits_until_the_new_deploy_is_live(
    render_fake: FakeRender, history: History, http_session: aiohttp.ClientSession
) -> None:
    notes = Notes()

    summary = await provider(render_fake, http_session).rollback(
        history.previous, expected_live=history.current, progress=notes
    )

    (post,) = render_fake.posts()
    assert post.path == f"/v1/services/{SERVICE}/rollback"
    assert post.body == {"deployId": history.previous}
    new = render_fake.live(SERVICE)
    assert new not in (None, history.current, history.previous)
    assert render_fake.deploy(SERVICE, history.current)["status"] == "deactivated"
    assert render_fake.deploy(SERVICE, str(new))["trigger"] == "rollback"
    assert render_fake.deploy(SERVICE, str(new))["commit"]["id"] == "c3" * 20
    assert summary.startswith(f"Render service {SERVICE} is live on deploy {new}, a rollback to {history.previous} ")
    assert summary.endswith(f"(was {history.current})")
    assert 'commit c3c3c3c "Fix Notion rate limit"' in summary
    # One note before starting, then exactly one per status change of the new deploy.
    assert notes.lines[0] == (
        f'Rolling Render service {SERVICE} back to deploy {history.previous} (commit c3c3c3c "Fix Notion rate limit").'
    )
    assert notes.lines[1:] == [
        f"Rollback deploy {new} of {SERVICE}: {s}" for s in ("created", "update_in_progress", "live")
    ]


async def test_a_wrong_api_key_is_a_clear_error_and_never_shown(
    render_fake: FakeRender, history: History, http_session: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "DEBUG", Redactor())  # no redactor help: the provider itself must not log it
    wrong = "rnd_WrongSecretKey987654321zyx"
    render = provider(render_fake, http_session, api_key=wrong)

    attempts = (
        lambda: render.releases(),
        lambda: render.rollback(history.previous, expected_live=history.current, progress=Notes()),
    )
    for attempt in attempts:
        with pytest.raises(DeployError) as caught:
            await attempt()
        assert caught.value.message == f"Render refused the API key for service {SERVICE}."
        assert wrong not in repr(caught.value) and caught.value.__cause__ is None

    assert render_fake.posts() == []
    assert all(r.authorization == f"Bearer {wrong}" for r in render_fake.requests)  # only ever in the header
    assert all(wrong not in r.path and wrong not in str(r.query) for r in render_fake.requests)
    assert wrong not in repr(render)
    captured = capsys.readouterr()
    assert "render_refused" in captured.err  # the failure was logged ...
    assert wrong not in captured.out + captured.err  # ... without the key


async def test_an_unknown_deploy_or_another_services_deploy_is_refused_without_a_post(
    render_fake: FakeRender, history: History, http_session: aiohttp.ClientSession
) -> None:
    render = provider(render_fake, http_session)
    for target in ("dep-d999nothere", history.other):
        with pytest.raises(DeployError) as caught:
            await render.rollback(target, expected_live=history.current, progress=Notes())
        assert caught.value.message == f"Render has no deploy {target} on service {SERVICE}."
    assert render_fake.posts() == []
    assert render_fake.live(SERVICE) == history.current


async def test_a_deploy_that_never_went_live_is_refused(
    render_fake: FakeRender, history: History, http_session: aiohttp.ClientSession
) -> None:
    with pytest.raises(DeployError, match=r"never went live \(build_failed\)"):
        await provider(render_fake, http_session).rollback(
            history.broken, expected_live=history.current, progress=Notes()
        )
    assert render_fake.posts() == []


async def test_rollback_is_refused_when_the_live_deploy_changed_since_the_plan(
    render_fake: FakeRender, history: History, http_session: aiohttp.ClientSession
) -> None:
    render = provider(render_fake, http_session)
    assert [r.id for r in await render.releases() if r.live] == [history.current]  # what the plan saw
    newer = render_fake.add_deploy(SERVICE, status="live", message="Hotfix pushed meanwhile")

    with pytest.raises(DeployError) as caught:
        await render.rollback(history.previous, expected_live=history.current, progress=Notes())

    assert caught.value.message == (
        f"The live deploy of Render service {SERVICE} is now {newer}, not {history.current} as planned: "
        "it changed since the plan was made, so nothing was changed."
    )
    assert render_fake.posts() == []
    assert render_fake.live(SERVICE) == newer


async def test_rollback_is_refused_while_another_deploy_is_in_progress(
    render_fake: FakeRender, history: History, http_session: aiohttp.ClientSession
) -> None:
    building = render_fake.add_deploy(SERVICE, status="build_in_progress", message="Auto-deploy of a push")
    with pytest.raises(DeployError, match=rf"^Deploy {building} of Render service {SERVICE} is in progress"):
        await provider(render_fake, http_session).rollback(
            history.previous, expected_live=history.current, progress=Notes()
        )
    assert render_fake.posts() == []


async def test_a_failed_rollback_deploy_names_its_status(
    render_fake: FakeRender, history: History, http_session: aiohttp.ClientSession
) -> None:
    render_fake.fail_next_deploy = "update_failed"
    notes = Notes()

    with pytest.raises(DeployError) as caught:
        await provider(render_fake, http_session).rollback(
            history.previous, expected_live=history.current, progress=notes
        )

    assert len(render_fake.posts()) == 1
    new = render_fake.services[SERVICE][-1]["id"]
    assert caught.value.message == (
        f"The rollback deploy {new} of Render service {SERVICE} ended update_failed; "
        "see its logs in the Render dashboard."
    )
    assert render_fake.live(SERVICE) == history.current  # Render keeps the old deploy serving
    assert notes.lines[-1] == f"Rollback deploy {new} of {SERVICE}: update_failed"


async def test_redeploy_rebuilds_the_live_commit_and_waits(
    render_fake: FakeRender, history: History, http_session: aiohttp.ClientSession
) -> None:
    notes = Notes()

    summary = await provider(render_fake, http_session).restart(progress=notes)

    (post,) = render_fake.posts()
    assert post.path == f"/v1/services/{SERVICE}/deploys"
    assert post.body == {"clearCache": "do_not_clear", "commitId": "d4" * 20}
    new = render_fake.live(SERVICE)
    assert new not in (None, history.current)
    assert render_fake.deploy(SERVICE, str(new))["commit"]["id"] == "d4" * 20
    assert summary.startswith(f"Render service {SERVICE} redeployed: deploy {new} (commit d4d4d4d ")
    assert summary.endswith(f"(was {history.current})")
    statuses = [line.rsplit(": ", 1)[1] for line in notes.lines[1:]]
    assert statuses == ["created", "build_in_progress", "update_in_progress", "live"]


async def test_a_queued_redeploy_without_an_answer_body_is_still_followed(
    render_fake: FakeRender, history: History, http_session: aiohttp.ClientSession
) -> None:
    render_fake.queue_answer = True  # 202, no body
    summary = await provider(render_fake, http_session).restart(progress=Notes())
    new = render_fake.live(SERVICE)
    assert new != history.current and f"deploy {new} " in summary


async def test_a_stalled_deploy_times_out(
    render_fake: FakeRender, history: History, http_session: aiohttp.ClientSession
) -> None:
    render_fake.stall = True
    with pytest.raises(DeployError) as caught:
        await provider(render_fake, http_session, deploy_timeout=0.3).rollback(
            history.previous, expected_live=history.current, progress=Notes()
        )
    new = render_fake.services[SERVICE][-1]["id"]
    assert caught.value.message == (
        f"The rollback deploy {new} of Render service {SERVICE} was not live within 0.3 s "
        "(last status update_in_progress); it may still finish on Render."
    )


async def test_a_hanging_api_is_a_timeout_error(
    render_fake: FakeRender, history: History, http_session: aiohttp.ClientSession
) -> None:
    render_fake.hang = True
    with pytest.raises(DeployError) as caught:
        await provider(render_fake, http_session, timeout=0.3).rollback(
            history.previous, expected_live=history.current, progress=Notes()
        )
    assert caught.value.message == f"Render's API did not answer within 0.3 s (read deploy {history.previous})."
    assert render_fake.posts() == []


async def test_a_500_is_retried_once_for_reads(
    render_fake: FakeRender, history: History, http_session: aiohttp.ClientSession
) -> None:
    render_fake.fail_next = [500]
    releases = await provider(render_fake, http_session).releases()
    assert releases[0].id == history.current
    assert len(render_fake.requests) == 2

    render_fake.fail_next = [503, 503]
    with pytest.raises(DeployError) as caught:
        await provider(render_fake, http_session).releases()
    assert caught.value.message == "Render's API failed (503) to list deploys; try again later."


async def test_a_short_outage_while_waiting_is_polled_through(
    render_fake: FakeRender, history: History, http_session: aiohttp.ClientSession
) -> None:
    notes = Notes()

    async def outage_after_start(line: str) -> None:
        await notes(line)
        if line.endswith(": created"):
            render_fake.fail_next = [502, 502]  # one whole poll (both attempts) fails

    await provider(render_fake, http_session).rollback(
        history.previous, expected_live=history.current, progress=outage_after_start
    )
    assert notes.lines[-1].endswith(": live")
    assert render_fake.fail_next == []


async def test_unreachable_api_is_one_sentence(http_session: aiohttp.ClientSession) -> None:
    from tests.fixtures.servers import free_port

    render = RenderProvider(
        http_session, SERVICE, "rnd_NobodyListens0123", api_url=f"http://127.0.0.1:{free_port()}/v1", timeout=2.0
    )
    with pytest.raises(DeployError) as caught:
        await render.releases()
    assert caught.value.message == "Could not reach Render's API to list deploys (connection refused)."


@pytest.mark.parametrize(
    "target",
    [
        "dep-abc/../../srv-other",
        "dep-ABC123",
        "dep-1;rm -rf /",
        "dep-1?limit=100",
        "dep-1\r\nX-Injected: 1",
        "../rollback",
        "",
        "dep-",
        "srv-d0abc123shopapi",
        "dep-1 ",
    ],
)
async def test_injection_attempts_in_ids_are_refused_before_any_request(
    render_fake: FakeRender, history: History, http_session: aiohttp.ClientSession, target: str
) -> None:
    render = provider(render_fake, http_session)
    with pytest.raises(DeployError, match=r"is not a Render deploy id"):
        await render.rollback(target, expected_live=history.current, progress=Notes())
    with pytest.raises(DeployError, match=r"is not a Render live deploy id"):
        await render.rollback(history.previous, expected_live=target, progress=Notes())
    assert render_fake.requests == []


@pytest.mark.parametrize(
    ("service", "api_key", "api_url"),
    [
        ("srv-abc/../../owners", "rnd_GoodEnoughKey123", "https://api.render.com/v1"),
        ("SRV-ABC", "rnd_GoodEnoughKey123", "https://api.render.com/v1"),
        ("srv-abc123", "rnd_Key with space", "https://api.render.com/v1"),
        ("srv-abc123", "rnd_Key\r\nX-Evil: 1", "https://api.render.com/v1"),
        ("srv-abc123", "", "https://api.render.com/v1"),
        ("srv-abc123", "rnd_GoodEnoughKey123", "http://api.render.com/v1"),  # the key would travel in clear
        ("srv-abc123", "rnd_GoodEnoughKey123", "https://user:pw@api.render.com/v1"),
    ],
)
async def test_bad_settings_are_refused_without_quoting_the_key(
    http_session: aiohttp.ClientSession, service: str, api_key: str, api_url: str
) -> None:
    with pytest.raises(DeployError) as caught:
        RenderProvider(http_session, service, api_key, api_url=api_url)
    if api_key:
        assert api_key not in caught.value.message
