"""Providers' status pages (runbook 002) against a loopback server answering in the providers' shapes:
Atlassian Statuspage summary.json (Render, Anthropic, Notion), incident.io's summary (OpenAI), RSS and
Atom feeds, and the bad answers (HTML, malformed JSON, a DTD, 500, 429, a hang). Then the page cache,
`/ops health` through the real router and registry, and the watcher posting an incident's start and end.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import TypeAdapter

from handlers.commands import load_registry
from handlers.context import Deps, Reply
from handlers.router import Router
from services.access import RoleResolver
from services.alerts.rules import AlertRule, Observation, ProviderIncidentRule, Verdict, check
from services.alerts.watch import Fired, Watcher, watched
from services.approvals import ApprovalEngine
from services.errors import InventoryError
from services.health import Status
from services.inventory import LoadedInventory, StatuspageComponent, parse_inventory
from services.locks import LocalLocks
from services.probes import PROBED_TYPES, build_health_probes
from services.probes.statuspage import StatuspageProbe
from services.redaction import Redactor
from services.state import StateStore, open_state_store
from tests.fixtures.servers import free_port
from tests.fixtures.slack_checks import check_blocks
from tests.fixtures.wait import wait_until

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)

# --- recorded shapes -------------------------------------------------------------------------------
# Field for field as Statuspage's /api/v2/summary.json answers (see services/probes/statuspage.py for
# the sources), trimmed to a few components.


def _component(name: str, status: str = "operational", **extra: Any) -> dict[str, Any]:
    return {
        "id": f"id-{name.lower().replace(' ', '-')}",
        "name": name,
        "status": status,
        "created_at": "2019-04-24T17:21:49.471Z",
        "updated_at": "2026-03-02T11:50:02.101Z",
        "position": 1,
        "description": None,
        "showcase": True,
        "start_date": None,
        "group_id": None,
        "page_id": "abc123page",
        "group": False,
        "only_show_if_degraded": False,
        **extra,
    }


def _incident(
    name: str, *, impact: str, status: str = "investigating", body: str = "", components: tuple[str, ...] = ()
) -> dict[str, Any]:
    return {
        "id": "p31zjtct2jer",
        "name": name,
        "status": status,
        "created_at": "2026-03-02T11:40:11.000Z",
        "updated_at": "2026-03-02T11:52:03.000Z",
        "monitoring_at": None,
        "resolved_at": None,
        "impact": impact,
        "shortlink": "https://stspg.io/p31zjtct2jer",
        "started_at": "2026-03-02T11:40:11.000Z",
        "page_id": "abc123page",
        "incident_updates": [
            {"id": "u2", "status": status, "body": body, "created_at": "2026-03-02T11:52:03.000Z"},
            {"id": "u1", "status": "investigating", "body": "First look.", "created_at": "2026-03-02T11:40:11.000Z"},
        ],
        "components": [_component(c, "degraded_performance") for c in components],
    }


def summary(
    indicator: str = "none",
    description: str = "All Systems Operational",
    components: list[dict[str, Any]] | None = None,
    incidents: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "page": {
            "id": "abc123page",
            "name": "Provider",
            "url": "https://status.example.com",
            "time_zone": "Etc/UTC",
            "updated_at": "2026-03-02T11:52:03.101Z",
        },
        "components": components if components is not None else [_component("API"), _component("Dashboard")],
        "incidents": incidents or [],
        "scheduled_maintenances": [],
        "status": {"indicator": indicator, "description": description},
    }


RENDER_ALL_CLEAR = summary(components=[_component("Web Services"), _component("Static Sites"), _component("Builds")])
ANTHROPIC_MINOR = summary(
    "minor",
    "Minor Service Outage",
    [_component("claude.ai"), _component("Claude API (api.anthropic.com)", "degraded_performance")],
    [
        _incident(
            "Elevated errors on Claude Opus",
            impact="minor",
            body="We are investigating elevated error rates. " + "More detail follows. " * 30,
            components=("Claude API (api.anthropic.com)",),
        )
    ],
)
NOTION_MAJOR_API = summary(
    "critical",
    "Major System Outage",
    [_component("API", "major_outage"), _component("Web app")],
    [
        _incident(
            "Notion API unavailable",
            impact="critical",
            status="identified",
            body="A fix is being rolled out.",
            components=("API",),
        )
    ],
)
DASHBOARD_ONLY = summary(
    "minor",
    "Partially Degraded Service",
    [_component("API"), _component("Dashboard", "partial_outage")],
    [_incident("Dashboard slow to load", impact="minor", components=("Dashboard",))],
)

# incident.io's /api/v1/summary (the widget API), as its public clients read it.
OPENAI_CLEAR = {
    "page_title": "OpenAI",
    "page_url": "https://status.openai.com",
    "ongoing_incidents": [],
    "in_progress_maintenances": [],
    "scheduled_maintenances": [],
}


def openai_incident(impact: str = "partial_outage", component: str = "Chat Completions") -> dict[str, Any]:
    return {
        **OPENAI_CLEAR,
        "ongoing_incidents": [
            {
                "id": "01JMYB4A2Y0QX4Z3C9Q0W8E6RT",
                "name": "Elevated error rates for Chat Completions",
                "status": "identified",
                "url": "https://status.openai.com/incidents/01JMYB4A2Y0QX4Z3C9Q0W8E6RT",
                "last_update_at": "2026-03-02T11:55:00.000Z",
                "last_update_message": "We have identified the cause and are applying a mitigation.",
                "current_worst_impact": impact,
                "affected_components": [
                    {
                        "id": "01JMXBRMFE6N2NNT7DG6XZQ6PW",
                        "name": component,
                        "group_name": "API",
                        "current_status": impact,
                    },
                ],
            }
        ],
    }


def rss(*items: tuple[str, datetime, str]) -> bytes:
    entries = "".join(
        f"<item><title>{title}</title><link>https://status.openai.com/incidents/{i}</link>"
        f"<guid>https://status.openai.com/incidents/{i}</guid><pubDate>{format_datetime(when)}</pubDate>"
        f"<description><![CDATA[{text}]]></description></item>"
        for i, (title, when, text) in enumerate(items)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><rss version="2.0"><channel><title>OpenAI status</title>'
        f"<link>https://status.openai.com</link><description>Status</description>{entries}</channel></rss>"
    ).encode()


# --- the loopback status pages ---------------------------------------------------------------------


@dataclass
class Answer:
    body: bytes = b""
    status: int = 200
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False


@dataclass
class Pages:
    """A loopback server answering each path as told, counting requests; ``gate`` holds answers back."""

    url: str = ""
    answers: dict[str, Answer] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    gate: asyncio.Event | None = None

    def json(self, path: str, payload: object, **knobs: Any) -> None:
        self.answers[path] = Answer(json.dumps(payload).encode(), **knobs)

    def raw(self, path: str, body: bytes, content_type: str, **knobs: Any) -> None:
        self.answers[path] = Answer(body, content_type=content_type, **knobs)

    def count(self, path: str) -> int:
        return self.requests.count(path)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        answer = self.answers.get(request.path)
        if answer is None:
            return web.Response(status=404, text="Not Found")
        if answer.hang:
            await asyncio.Event().wait()
        if self.gate is not None:
            await self.gate.wait()
        return web.Response(
            body=answer.body, status=answer.status, content_type=answer.content_type, headers=answer.headers
        )


@pytest.fixture
async def pages() -> AsyncIterator[Pages]:
    fake = Pages()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.url = f"http://127.0.0.1:{port}"
    yield fake
    if fake.gate is not None:
        fake.gate.set()
    await runner.cleanup()


class Clock:
    """The probe's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def page(pages: Pages, prefix: str, **fields: Any) -> StatuspageComponent:
    """A statuspage component whose page is ``<server>/<prefix>``."""
    return StatuspageComponent.model_validate({"type": "statuspage", "url": f"{pages.url}/{prefix}", **fields})


def probe_of(http: aiohttp.ClientSession, clock: Clock | None = None, **knobs: Any) -> StatuspageProbe:
    return StatuspageProbe(http, clock=clock or Clock(), wall_clock=lambda: NOW, **knobs)


# --- Atlassian Statuspage --------------------------------------------------------------------------


async def test_an_all_clear_page_is_healthy_with_the_pages_own_words(
    pages: Pages, http_session: aiohttp.ClientSession
) -> None:
    pages.json("/render/api/v2/summary.json", RENDER_ALL_CLEAR)

    result = await probe_of(http_session).probe(page(pages, "render"))

    assert result.status is Status.HEALTHY
    assert result.detail == "All Systems Operational"
    assert result.facts["provider_status"] == "healthy"
    assert result.facts["incidents"] == 0
    assert "incident_line" not in result.facts


async def test_a_minor_incident_is_a_warning_naming_the_incident_its_impact_update_and_link(
    pages: Pages, http_session: aiohttp.ClientSession
) -> None:
    pages.json("/anthropic/api/v2/summary.json", ANTHROPIC_MINOR)

    result = await probe_of(http_session).probe(page(pages, "anthropic"))

    assert result.status is Status.WARNING
    assert result.detail.startswith(
        "Elevated errors on Claude Opus (minor impact, investigating): We are investigating elevated error rates."
    )
    assert "https://stspg.io/p31zjtct2jer" in result.detail
    assert result.detail.endswith("· Minor Service Outage")
    update = result.facts["incident_line"]
    assert isinstance(update, str) and "…" in update  # the long update is clipped
    assert len(update) < 400
    assert result.facts["incident_link"] == "https://stspg.io/p31zjtct2jer"
    assert result.facts["incident_impact"] == "minor"


async def test_a_major_outage_of_a_declared_component_is_critical(
    pages: Pages, http_session: aiohttp.ClientSession
) -> None:
    pages.json("/notion/api/v2/summary.json", NOTION_MAJOR_API)

    result = await probe_of(http_session).probe(page(pages, "notion", components=["api"]))

    assert result.status is Status.CRITICAL
    assert [(c.name, c.status, c.detail) for c in result.checks] == [("api", Status.CRITICAL, "major outage")]
    assert result.detail.startswith("Notion API unavailable (critical impact, identified): A fix is being rolled out.")
    assert result.detail.endswith("· api major outage")


async def test_a_degraded_component_that_is_not_declared_is_ignored(
    pages: Pages, http_session: aiohttp.ClientSession
) -> None:
    pages.json("/p/api/v2/summary.json", DASHBOARD_ONLY)

    declared = await probe_of(http_session).probe(page(pages, "p", components=["API"]))
    whole = await probe_of(http_session).probe(page(pages, "p"))

    assert (declared.status, declared.detail, declared.facts["incidents"]) == (Status.HEALTHY, "API operational", 0)
    assert whole.status is Status.WARNING  # the page's own indicator, when nothing is declared
    assert whole.facts["incident"] == "Dashboard slow to load"


async def test_a_declared_component_the_page_does_not_have_is_unknown_and_says_what_it_has(
    pages: Pages, http_session: aiohttp.ClientSession
) -> None:
    pages.json("/render/api/v2/summary.json", RENDER_ALL_CLEAR)

    result = await probe_of(http_session).probe(page(pages, "render", components=["Postgres"]))

    assert result.facts["provider_status"] == "unknown"
    assert result.detail == "unknown: the page has no component Postgres (it has: Builds, Static Sites, Web Services)"


# --- incident.io and feeds -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("impact", "status"), [("degraded_performance", Status.WARNING), ("partial_outage", Status.WARNING),
                           ("full_outage", Status.CRITICAL)],
)  # fmt: skip
async def test_an_incident_io_page_maps_the_worst_impact_of_the_components_that_matter(
    pages: Pages, http_session: aiohttp.ClientSession, impact: str, status: Status
) -> None:
    pages.json("/openai/api/v1/summary", openai_incident(impact))

    result = await probe_of(http_session).probe(page(pages, "openai", format="incidentio", components=["API"]))

    assert result.status is status
    assert result.facts["incident"] == "Elevated error rates for Chat Completions"
    assert result.facts["incident_link"] == "https://status.openai.com/incidents/01JMYB4A2Y0QX4Z3C9Q0W8E6RT"
    assert f"({impact.replace('_', ' ')} impact, identified): We have identified the cause" in result.detail


async def test_an_incident_io_page_without_incidents_on_the_declared_parts_is_healthy(
    pages: Pages, http_session: aiohttp.ClientSession
) -> None:
    pages.json("/clear/api/v1/summary", OPENAI_CLEAR)
    sora = openai_incident("full_outage", component="Sora")
    sora["ongoing_incidents"][0]["affected_components"][0]["group_name"] = "Sora"
    pages.json("/sora/api/v1/summary", sora)
    probe = probe_of(http_session)

    clear = await probe.probe(page(pages, "clear", format="incidentio", components=["API"]))
    elsewhere = await probe.probe(page(pages, "sora", format="incidentio", components=["API"]))
    overall = await probe.probe(page(pages, "clear", format="incidentio"))

    assert (clear.status, clear.detail) == (Status.HEALTHY, "API operational")
    assert (elsewhere.status, elsewhere.detail) == (Status.HEALTHY, "API operational")
    assert (overall.status, overall.detail) == (Status.HEALTHY, "no ongoing incidents")


async def test_an_rss_feed_shows_a_recent_unresolved_item_and_forgets_resolved_ones(
    pages: Pages, http_session: aiohttp.ClientSession
) -> None:
    pages.raw(
        "/feed/history.rss",
        rss(
            (
                "Increased latency in the API",
                NOW - timedelta(minutes=20),
                "<p><strong>Investigating</strong> - We are looking into slow API answers.</p>"
                "<b>Affected components</b><ul><li>API (Degraded performance)</li></ul>",
            ),
            ("Login failures", NOW - timedelta(hours=2), "<p><strong>Resolved</strong> - All fixed.</p>"),
            ("Login failures", NOW - timedelta(hours=3), "<p><strong>Investigating</strong> - Looking.</p>"),
            ("Old outage", NOW - timedelta(days=3), "<p>Investigating</p>"),
        ),
        "application/rss+xml",
    )
    pages.raw("/calm/history.rss", rss(("Login failures", NOW - timedelta(hours=2), "Resolved - fixed.")),
              "application/rss+xml")  # fmt: skip
    probe = probe_of(http_session)

    active = await probe.probe(page(pages, "feed", format="rss"))
    calm = await probe.probe(page(pages, "calm", format="rss"))

    assert active.status is Status.WARNING
    assert active.facts["incidents"] == 1
    assert active.facts["incident"] == "Increased latency in the API"
    assert active.facts["incident_link"] == "https://status.openai.com/incidents/0"
    assert "We are looking into slow API answers." in active.detail
    assert "Affected components" not in active.detail
    assert (calm.status, calm.detail) == (Status.HEALTHY, "no incident in the feed's last 24 h")


async def test_an_atom_feed_is_read_too(pages: Pages, http_session: aiohttp.ClientSession) -> None:
    atom = (
        '<?xml version="1.0" encoding="UTF-8"?><feed xmlns="http://www.w3.org/2005/Atom"><title>Status</title>'
        '<entry><title>Webhooks delayed</title><link rel="alternate" href="https://status.example.com/i/9"/>'
        f"<updated>{(NOW - timedelta(minutes=5)).isoformat()}</updated>"
        '<content type="html">&lt;p&gt;Identified - queue backlog&lt;/p&gt;</content></entry></feed>'
    )
    pages.raw("/atom/history.atom", atom.encode(), "application/atom+xml")

    result = await probe_of(http_session).probe(page(pages, "atom", format="rss", path="/history.atom"))

    assert result.status is Status.WARNING
    assert (
        result.facts["incident_line"] == "Webhooks delayed: Identified - queue backlog https://status.example.com/i/9"
    )


# --- bad answers: unknown, one plain line, never an exception --------------------------------------


@pytest.mark.parametrize(
    ("answer", "fmt", "line"),
    [
        (Answer(b"<!DOCTYPE html><html><body>Status</body></html>", content_type="text/html"), "statuspage",
         "unknown: the status page answered text/html, not JSON (is `url` or `format` wrong?)"),
        (Answer(b'{"status": {"indicator": "none"', content_type="application/json"), "statuspage",
         "unknown: the status page answered malformed JSON"),
        (Answer(b'{"page": {}}'), "statuspage",
         "unknown: the status page answered JSON without `status.indicator` (is `format` right?)"),
        (Answer(json.dumps(OPENAI_CLEAR).encode()), "statuspage",
         "unknown: the status page answered JSON without `status.indicator` (is `format` right?)"),
        (Answer(json.dumps(RENDER_ALL_CLEAR).encode()), "incidentio",
         "unknown: the status page answered JSON without `ongoing_incidents` (is `format` right?)"),
        (Answer(b""), "statuspage", "unknown: the status page answered an empty body, not JSON"),
        (Answer(b"<html>oops</html>", status=500, content_type="text/html"), "statuspage",
         "unknown: the status page answered 500 Internal Server Error"),
        (Answer(b"<!DOCTYPE html><html>x</html>", content_type="text/html"), "rss",
         "unknown: the status page answered an HTML page, not a feed (is `format` right?)"),
        (Answer(b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;">]><rss>&b;</rss>',
                content_type="application/xml"), "rss",
         "unknown: the status page answered a feed that declares a DTD or entities, not read"),
        (Answer(b"<rss><channel><item>", content_type="application/rss+xml"), "rss",
         "unknown: the status page answered a feed that is not well-formed XML"),
    ],
)  # fmt: skip
async def test_a_bad_answer_makes_the_component_unknown_with_one_plain_line(
    pages: Pages, http_session: aiohttp.ClientSession, answer: Answer, fmt: str, line: str
) -> None:
    spec = page(pages, "bad", format=fmt)
    pages.answers[spec.endpoint.removeprefix(pages.url)] = answer

    result = await probe_of(http_session).probe(spec)

    assert (result.detail, result.facts["provider_status"]) == (line, "unknown")
    assert result.status is Status.WARNING  # kept out of the counted status: ComponentHealth.counted


async def test_an_oversized_answer_is_not_read(pages: Pages, http_session: aiohttp.ClientSession) -> None:
    pages.raw("/big/api/v2/summary.json", b"[" + b"0," * 40_000 + b"0]", "application/json")

    result = await probe_of(http_session, body_limit=64 * 1024).probe(page(pages, "big"))

    assert result.detail == "unknown: the status page's answer is over 64 KiB, not read"


async def test_a_429_is_unknown_and_its_retry_after_is_honoured(
    pages: Pages, http_session: aiohttp.ClientSession
) -> None:
    pages.json("/busy/api/v2/summary.json", {"error": "rate limited"}, status=429, headers={"Retry-After": "600"})
    clock = Clock()
    probe = probe_of(http_session, clock)
    spec = page(pages, "busy")

    first = await probe.probe(spec)
    clock.now += 300  # past the 2-minute poll, within Retry-After
    second = await probe.probe(spec)
    requests_by_then = pages.count("/busy/api/v2/summary.json")
    clock.now += 301
    pages.json("/busy/api/v2/summary.json", RENDER_ALL_CLEAR)
    third = await probe.probe(spec)

    assert first.detail == "unknown: the status page is rate-limiting requests (429); next try in 10 min"
    assert second.detail == first.detail
    assert requests_by_then == 1
    assert (third.status, pages.count("/busy/api/v2/summary.json")) == (Status.HEALTHY, 2)


async def test_a_hanging_page_is_unknown_within_the_components_timeout(
    pages: Pages, http_session: aiohttp.ClientSession
) -> None:
    pages.json("/hang/api/v2/summary.json", RENDER_ALL_CLEAR, hang=True)

    started = time.perf_counter()
    result = await probe_of(http_session).probe(page(pages, "hang", timeout=1))
    elapsed = time.perf_counter() - started

    assert result.detail == "unknown: the status page gave no answer within 0.8 s"
    assert elapsed < 1.0  # its own budget, inside the timeout /ops health and the watcher give it


async def test_a_refused_connection_is_unknown(http_session: aiohttp.ClientSession) -> None:
    spec = StatuspageComponent.model_validate({"type": "statuspage", "url": f"http://127.0.0.1:{free_port()}"})

    result = await probe_of(http_session).probe(spec)

    assert result.detail == "unknown: cannot reach the status page: connection refused"


# --- the cache: at most every 2 minutes, one fetch in flight, bounded -----------------------------


async def test_two_checks_within_two_minutes_make_one_request(
    pages: Pages, http_session: aiohttp.ClientSession
) -> None:
    pages.json("/render/api/v2/summary.json", RENDER_ALL_CLEAR)
    clock = Clock()
    probe = probe_of(http_session, clock)
    api_only = page(pages, "render", components=["Web Services"])
    whole = page(pages, "render")

    await probe.probe(api_only)
    clock.now += 119
    again = await probe.probe(whole)  # another component of the same page shares the reading
    count_within = pages.count("/render/api/v2/summary.json")
    clock.now += 2
    await probe.probe(api_only)

    assert count_within == 1
    assert again.facts["checked_s_ago"] == 119
    assert pages.count("/render/api/v2/summary.json") == 2


async def test_concurrent_checks_share_one_fetch(pages: Pages, http_session: aiohttp.ClientSession) -> None:
    pages.json("/anthropic/api/v2/summary.json", ANTHROPIC_MINOR)
    pages.gate = asyncio.Event()
    probe = probe_of(http_session)
    spec = page(pages, "anthropic")

    checks = [asyncio.create_task(probe.probe(spec)) for _ in range(5)]
    await wait_until(lambda: pages.requests, "the page is asked once")
    pages.gate.set()
    results = await asyncio.gather(*checks)

    assert pages.count("/anthropic/api/v2/summary.json") == 1
    assert {r.facts["incident"] for r in results} == {"Elevated errors on Claude Opus"}


async def test_a_caller_cut_off_leaves_the_shared_fetch_to_the_others(
    pages: Pages, http_session: aiohttp.ClientSession
) -> None:
    pages.json("/render/api/v2/summary.json", RENDER_ALL_CLEAR)
    pages.gate = asyncio.Event()
    probe = probe_of(http_session)
    spec = page(pages, "render")

    impatient = asyncio.create_task(probe.probe(spec))
    patient = asyncio.create_task(probe.probe(spec))
    await wait_until(lambda: pages.requests, "the page is asked")
    impatient.cancel()
    pages.gate.set()
    result = await patient

    assert impatient.cancelled()
    assert result.status is Status.HEALTHY
    assert pages.count("/render/api/v2/summary.json") == 1


async def test_the_cache_keeps_one_reading_per_page_and_no_more_than_its_bound(
    pages: Pages, http_session: aiohttp.ClientSession
) -> None:
    for name in ("a", "b", "c"):
        pages.json(f"/{name}/api/v2/summary.json", RENDER_ALL_CLEAR)
    clock = Clock()
    probe = probe_of(http_session, clock, max_pages=2)

    for _ in range(3):
        await probe.probe(page(pages, "a"))
    one_page = probe.pages_kept
    for name in ("a", "b", "c"):
        clock.now += 1
        await probe.probe(page(pages, name))

    assert one_page == 1
    assert probe.pages_kept == 2


# --- the inventory ---------------------------------------------------------------------------------


def test_a_statuspage_component_loads_with_its_defaults() -> None:
    loaded = parse_inventory(
        "services: {worklog: {components: {openai: {type: statuspage, url: 'https://status.openai.com', "
        "format: incidentio, components: [API]}, render: {type: statuspage, url: 'https://status.render.com/'}}}}",
        "t",
        env={},
    )
    openai = loaded.inventory.services["worklog"].components["openai"]
    render = loaded.inventory.services["worklog"].components["render"]

    assert isinstance(openai, StatuspageComponent) and isinstance(render, StatuspageComponent)
    assert (openai.endpoint, openai.components, openai.affects) == (
        "https://status.openai.com/api/v1/summary",
        ["API"],
        False,
    )
    assert (render.endpoint, render.format, render.timeout) == (
        "https://status.render.com/api/v2/summary.json",
        "statuspage",
        5.0,
    )


@pytest.mark.parametrize(
    ("component", "problem"),
    [
        ("{type: statuspage, url: 'https://s.example.com', format: atom}",
         "services.w.components.p.format: Input should be 'statuspage', 'incidentio' or 'rss'"),
        ("{type: statuspage, url: 'https://s.example.com', components: [API, api]}",
         "services.w.components.p.components: 'API' is listed twice"),
        ("{type: statuspage, url: 'https://s.example.com', path: feed.rss}",
         "services.w.components.p.path: must be a path starting with /"),
        ("{type: statuspage, url: 'status.example.com'}",
         "services.w.components.p.url: Input should be a valid URL, relative URL without a base"),
        ("{type: sqlite, path: /tmp/x.db, alerts: [{kind: provider_incident}]}",
         "services.w.components.p.alerts.0: a provider_incident rule reads a provider's status page, so it "
         "belongs on a statuspage component, not on a sqlite component"),
    ],
)  # fmt: skip
def test_a_bad_statuspage_declaration_is_refused_by_path(component: str, problem: str) -> None:
    with pytest.raises(InventoryError) as caught:
        parse_inventory(f"services: {{w: {{components: {{p: {component}}}}}}}", "t", env={})

    assert caught.value.problems == [problem]


# --- /ops health through the router ----------------------------------------------------------------


def _health_inventory(pages: Pages, db: Path, *, affects: bool = False) -> LoadedInventory:
    return parse_inventory(
        f"""
roles:
  viewer: [U0VIEWER]
services:
  worklog:
    components:
      db: {{type: sqlite, path: "{db}"}}
      render: {{type: statuspage, url: "{pages.url}/render", timeout: 2}}
      anthropic: {{type: statuspage, url: "{pages.url}/anthropic", affects: {str(affects).lower()}, timeout: 2}}
      openai: {{type: statuspage, url: "{pages.url}/openai", format: incidentio, components: [API],
                affects: true, timeout: 2}}
""",
        "t",
        env={},
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    store = await open_state_store(None, default_path=tmp_path / "state.sqlite3")
    yield store
    await store.close()


@pytest.fixture
def worklog_db(tmp_path: Path) -> Path:
    path = tmp_path / "worklog.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    return path


async def _health(loaded: LoadedInventory, store: StateStore, http: aiohttp.ClientSession) -> Reply:
    roles = RoleResolver(loaded.inventory.roles)
    redactor = Redactor(loaded.secrets)
    deps = Deps(
        loaded=loaded,
        store=store,
        probes=build_health_probes(http, types={spec.type for _, _, spec in loaded.inventory.components()}),
        redactor=redactor,
        roles=roles,
        approvals=ApprovalEngine(store, LocalLocks(), roles, loaded.inventory.approvals, redactor),
    )
    return await Router(load_registry()).dispatch(
        user_id="U0VIEWER", channel_id="C0OPS", text="health worklog", deps=deps, request_id="req-sp"
    )


async def test_ops_health_shows_third_parties_apart_and_keeps_them_out_of_the_status(
    pages: Pages, http_session: aiohttp.ClientSession, store: StateStore, worklog_db: Path
) -> None:
    pages.json("/render/api/v2/summary.json", RENDER_ALL_CLEAR)
    pages.json("/anthropic/api/v2/summary.json", ANTHROPIC_MINOR)
    pages.raw("/openai/api/v1/summary", b"<!DOCTYPE html><html>Just a moment...</html>", "text/html")

    reply = await _health(_health_inventory(pages, worklog_db), store, http_session)

    assert reply.status is Status.HEALTHY  # an Anthropic incident is not an outage of worklog's own
    assert check_blocks(reply.blocks, 50) is None
    text = json.dumps(reply.blocks)
    assert "_Third parties:_" in text
    assert "Elevated errors on Claude Opus (minor impact, investigating)" in text
    assert ":grey_question: *openai* (statuspage)" in text  # unreadable: unknown, and not counted though `affects`
    assert "1 component(s) in 1 service(s): 1 healthy · 3 third parties: 1 with trouble, 1 unknown" in reply.text
    assert "WARNING  worklog/anthropic (third party, not counted): Elevated errors on Claude Opus" in reply.text
    summary = json.dumps(reply.summary)
    assert "Every component answered healthy." in summary and "Third parties (not counted)" in summary


async def test_a_third_party_declared_to_affect_the_service_counts_in_its_status(
    pages: Pages, http_session: aiohttp.ClientSession, store: StateStore, worklog_db: Path
) -> None:
    pages.json("/render/api/v2/summary.json", RENDER_ALL_CLEAR)
    pages.json("/anthropic/api/v2/summary.json", ANTHROPIC_MINOR)
    pages.json("/openai/api/v1/summary", OPENAI_CLEAR)

    reply = await _health(_health_inventory(pages, worklog_db, affects=True), store, http_session)

    assert reply.status is Status.WARNING
    assert "counts in the service's status" in json.dumps(reply.blocks)
    assert "Problems first" in json.dumps(reply.summary)


# --- the ProviderIncident rule and the watcher ----------------------------------------------------

RULES: TypeAdapter[AlertRule] = TypeAdapter(AlertRule)


def test_the_rule_fires_on_an_incident_and_holds_while_the_page_is_unreadable() -> None:
    rule = RULES.validate_python({"kind": "provider_incident"})

    breach = check(rule, Observation(reachable=True, detail="x", provider_incident="Outage (major impact) https://i"))
    clear = check(rule, Observation(reachable=True, detail="API operational", provider_incident=""))
    unread = check(
        rule, Observation(reachable=True, detail="unknown: the status page answered 500", provider_incident=None)
    )

    assert isinstance(rule, ProviderIncidentRule)
    assert (rule.alert_name, rule.for_minutes, rule.severity) == ("ProviderIncident", 0, "warning")
    assert (breach.verdict, breach.evidence) == (Verdict.BREACH, "Outage (major impact) https://i")
    assert (clear.verdict, clear.evidence) == (Verdict.OK, "no active incident (API operational)")
    assert (unread.verdict, unread.evidence) == (
        Verdict.UNKNOWN, "cannot read the status page: unknown: the status page answered 500")  # fmt: skip


def test_a_statuspage_component_is_watched_for_incidents_not_for_being_down() -> None:
    loaded = parse_inventory(
        "services: {w: {components: {openai: {type: statuspage, url: 'https://status.openai.com'}, "
        "own: {type: statuspage, url: 'https://status.render.com', "
        "alerts: [{kind: provider_incident, for_minutes: 5}]}, "
        "db: {type: sqlite, path: /tmp/w.db}}}}",
        "t",
        env={},
    )

    found = {w.target.component: [type(r).__name__ for r in w.rules] for w in watched(loaded.inventory, PROBED_TYPES)}

    assert found == {"openai": ["ProviderIncidentRule"], "own": ["ProviderIncidentRule"], "db": ["DownRule"]}


class Notifier:
    """Records what the watcher tells the ops channel: each fired post and each resolved edit."""

    def __init__(self) -> None:
        self.posts: list[Fired] = []
        self.edits: list[Fired] = []

    async def fired(self, alert: Fired) -> tuple[str, str] | None:
        self.posts.append(alert)
        return "C0OPS", f"ts-{len(self.posts)}"

    async def resolved(self, alert: Fired) -> None:
        self.edits.append(alert)


async def test_an_incident_starting_and_ending_posts_one_message_each(
    pages: Pages, http_session: aiohttp.ClientSession, store: StateStore
) -> None:
    loaded = parse_inventory(
        f"services: {{worklog: {{components: {{openai: {{type: statuspage, url: '{pages.url}/openai', "
        "format: incidentio, components: [API], timeout: 2}}}}",
        "t",
        env={},
    )
    posted = Notifier()
    now, clock = [NOW], Clock()
    probe = probe_of(http_session, clock)
    watcher = Watcher(
        store, loaded.inventory, lambda _t: probe, http_session, Redactor(), probed_types=PROBED_TYPES,
        notifier=posted, clock=lambda: now[0],
    )  # fmt: skip

    async def round_after(minutes: int) -> list[Fired]:
        now[0] += timedelta(minutes=minutes)
        clock.now += minutes * 60
        return await watcher.round()

    pages.json("/openai/api/v1/summary", OPENAI_CLEAR)
    calm = await watcher.round()
    pages.json("/openai/api/v1/summary", openai_incident("partial_outage"))
    started = await round_after(3)
    still = await round_after(3)
    pages.raw("/openai/api/v1/summary", b"<html>502 Bad Gateway</html>", "text/html", status=502)
    unreadable = await round_after(3)
    pages.json("/openai/api/v1/summary", OPENAI_CLEAR)
    ended = await round_after(3)
    after = await round_after(3)

    assert (calm, still, unreadable, after) == ([], [], [], [])
    assert [f.key for f in started] == ["worklog/openai/ProviderIncident"]
    assert started[0].transition.evidence.startswith(
        "Elevated error rates for Chat Completions (partial outage impact, identified): We have identified the cause"
    )
    assert started[0].transition.evidence.endswith("https://status.openai.com/incidents/01JMYB4A2Y0QX4Z3C9Q0W8E6RT")
    assert [(f.key, f.transition.kind.value) for f in ended] == [("worklog/openai/ProviderIncident", "resolved")]
    assert ended[0].transition.evidence == "no active incident (API operational)"
    assert [f.transition.kind.value for f in posted.posts + posted.edits] == ["fired", "resolved"]
    assert pages.count("/openai/api/v1/summary") == 6
