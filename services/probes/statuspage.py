"""Providers' status pages (runbook 002): is Render, Anthropic, OpenAI or Notion having an incident?

One module, three page formats behind one reading (:class:`PageReading`):

- ``statuspage`` — Atlassian Statuspage, ``GET <page>/api/v2/summary.json`` (Render, Anthropic, Notion).
  Shape from Statuspage's public page API as documented on every such page's ``/api`` (e.g.
  confluence.status.atlassian.com/api) and in MongoDB's cloud-status reference of ``GET /summary.json``:
  ``status.indicator`` none/minor/major/critical, ``components[]`` with ``name`` and ``status``
  operational/degraded_performance/partial_outage/major_outage/under_maintenance, ``incidents[]``
  (unresolved) with ``name``, ``status``, ``impact``, ``shortlink``, ``components[]`` and
  ``incident_updates[]`` newest first.
- ``incidentio`` — an incident.io status page's widget API, ``GET <page>/api/v1/summary`` (OpenAI's page
  moved to incident.io). Shape from public clients of it, not from a reference: PostHog's front end
  (``incidentStatusLogic.ts``, reading posthogstatus.com/api/v1/summary), Materialize's console
  (``api/incident-io/types``), and tools polling https://status.openai.com/api/v1/summary:
  ``{page_title, page_url, ongoing_incidents[], in_progress_maintenances[], scheduled_maintenances[]}``,
  an incident ``{id, name, status investigating/identified/monitoring, url, last_update_at,
  last_update_message, current_worst_impact degraded_performance/partial_outage/full_outage,
  affected_components[{id, name, group_name, current_status}]}``. It lists only *affected* components,
  so a declared component that is not listed is operational.
- ``rss`` — the page's RSS 2.0 or Atom feed (``/history.rss``, ``/history.atom``, ``/feed.rss``), the
  fallback for any host: an item per incident (``title``, ``link``, ``pubDate``/``updated``,
  ``description``/``summary`` whose text says "Resolved" once it is). An item is taken as active when it
  is recent (:data:`FEED_ACTIVE_HOURS`) and its text does not say resolved or completed. Parsed with the
  standard library after refusing DTDs and entities and bounding the size (defusedxml is not a dependency).

Pages are polled at most every :data:`POLL_SECONDS` whoever asks (`/ops health`, the watcher, the
digest): one :class:`StatuspageProbe` is built per process and keeps one reading per page URL, and
concurrent callers share one fetch. Anything unreadable (HTML, malformed JSON or XML, 5xx, 429, a hang)
makes the component *unknown* with one plain line, never an exception.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from services.health import Check, ProbeResult, Status
from services.inventory import Component, StatuspageComponent
from services.probes._common import connect_budget, network_problem, short_error, since_ms

POLL_SECONDS = 120.0
"""A page is fetched at most this often (the issue: polled at most every 2 minutes)."""
MAX_RETRY_AFTER = 3600.0
"""A 429's Retry-After is honoured up to this many seconds."""
BODY_LIMIT = 2 * 1024 * 1024
"""Bytes of an answer read at most (a big Statuspage summary is a few hundred KiB)."""
MAX_PAGES = 64
"""Pages kept at most; the inventory names far fewer, so this only guards against a bug."""
FEED_ACTIVE_HOURS = 24.0
"""A feed item newer than this that does not say resolved is taken as an active incident."""
UPDATE_CHARS = 200
"""Characters of an incident's latest update shown."""
UNKNOWN = "unknown"

_COMPONENT_STATUS = {
    "operational": Status.HEALTHY,
    "degraded_performance": Status.WARNING,
    "partial_outage": Status.WARNING,
    "under_maintenance": Status.WARNING,
    "major_outage": Status.CRITICAL,
    "full_outage": Status.CRITICAL,  # incident.io's word for it
}
_INDICATOR_STATUS = {
    "none": Status.HEALTHY,
    "minor": Status.WARNING,
    "major": Status.WARNING,
    "maintenance": Status.WARNING,
    "critical": Status.CRITICAL,
}
# An incident's impact, in Statuspage's words and in incident.io's.
_IMPACT_STATUS = {**_INDICATOR_STATUS, **{k: v for k, v in _COMPONENT_STATUS.items() if k != "operational"}}
_RESOLVED = frozenset({"resolved", "postmortem", "completed"})
_IO_IMPACT_INDICATOR = {"degraded_performance": "minor", "partial_outage": "major", "full_outage": "critical"}
_INDICATOR_ORDER = ("none", "maintenance", "minor", "major", "critical")


class PageError(Exception):
    """The page answered something that is not the format's answer; the message is the plain line."""


@dataclass(frozen=True)
class PageComponent:
    """One component as the page reports it (``group`` is the group it sits in, if the page says)."""

    name: str
    status: str
    group: str = ""

    @property
    def severity(self) -> Status:
        return _COMPONENT_STATUS.get(self.status, Status.WARNING)


@dataclass(frozen=True)
class PageIncident:
    """One unresolved incident: its name, impact and status words, link, latest update, components."""

    name: str
    impact: str
    status: str
    link: str
    update: str = ""
    components: tuple[str, ...] = ()

    @property
    def severity(self) -> Status:
        return _IMPACT_STATUS.get(self.impact, Status.WARNING)

    def line(self) -> str:
        """``Elevated errors (major impact, investigating): We are looking into it. https://…``"""
        words = [w for w in (f"{_words(self.impact)} impact" if self.impact else "", _words(self.status)) if w]
        text = self.name + (f" ({', '.join(words)})" if words else "")
        if self.update:
            text += f": {self.update}"
        return f"{text} {self.link}" if self.link else text


@dataclass(frozen=True)
class PageReading:
    """What a page says now, whatever its format. ``complete`` is False when the page lists only the
    components an incident touches (incident.io), so an unlisted component is operational."""

    indicator: str
    description: str = ""
    components: tuple[PageComponent, ...] = ()
    incidents: tuple[PageIncident, ...] = ()
    complete: bool = True


@dataclass(frozen=True)
class PageFetch:
    """One fetch of a page: a reading, or the plain reason there is none; and until when it stands."""

    reading: PageReading | None
    problem: str
    fetched_at: float
    expires_at: float


# --- the formats ---------------------------------------------------------------------------------


def _words(word: str) -> str:
    return word.replace("_", " ")


def _text(value: object, limit: int = 300) -> str:
    """A string field as one short line of plain text (HTML tags and entities removed)."""
    if not isinstance(value, str):
        return ""
    plain = html.unescape(re.sub(r"<[^>]{0,2000}>", " ", value))
    plain = " ".join(plain.split())
    return plain if len(plain) <= limit else plain[: limit - 1].rstrip() + "…"


def _link(value: object, fallback: str) -> str:
    text = value.strip() if isinstance(value, str) else ""
    return text[:300] if urlsplit(text).scheme in ("http", "https") else fallback


def _objects(payload: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    items = payload.get(key)
    if items is None:
        return []
    if not isinstance(items, list):
        raise PageError(f"`{key}` is not a list")
    return [item for item in items if isinstance(item, dict)]


def parse_statuspage(payload: object, page_url: str) -> PageReading:
    """An Atlassian Statuspage ``/api/v2/summary.json``."""
    if not isinstance(payload, dict):
        raise PageError("answered JSON that is not an object")
    status = payload.get("status")
    indicator = status.get("indicator") if isinstance(status, dict) else None
    if not isinstance(indicator, str):
        raise PageError("answered JSON without `status.indicator` (is `format` right?)")
    groups = {
        c.get("id"): str(c.get("name", ""))
        for c in _objects(payload, "components")
        if c.get("group") is True and isinstance(c.get("id"), str)
    }
    components = tuple(
        PageComponent(str(c["name"])[:100], str(c.get("status", UNKNOWN)), groups.get(c.get("group_id"), ""))
        for c in _objects(payload, "components")
        if isinstance(c.get("name"), str)
    )
    incidents = []
    for item in _objects(payload, "incidents"):
        if str(item.get("status", "")) in _RESOLVED:
            continue
        updates = [u for u in item.get("incident_updates") or [] if isinstance(u, dict)]
        incidents.append(
            PageIncident(
                name=_text(item.get("name"), 150) or "an unnamed incident",
                impact=str(item.get("impact") or ""),
                status=str(item.get("status") or ""),
                link=_link(item.get("shortlink"), page_url),
                update=_text(updates[0].get("body"), UPDATE_CHARS) if updates else "",
                # Each component and the group it sits in, so a declared group matches its members' incidents.
                components=tuple(
                    name
                    for c in item.get("components") or []
                    if isinstance(c, dict) and isinstance(c.get("name"), str)
                    for name in (c["name"], groups.get(c.get("group_id"), ""))
                    if name
                ),
            )
        )
    description = _text(status.get("description"), 100) if isinstance(status, dict) else ""
    return PageReading(indicator, description, components, tuple(incidents))


def parse_incidentio(payload: object, page_url: str) -> PageReading:
    """An incident.io status page's ``/api/v1/summary`` (its widget API)."""
    if not isinstance(payload, dict) or "ongoing_incidents" not in payload:
        raise PageError("answered JSON without `ongoing_incidents` (is `format` right?)")
    affected: dict[str, PageComponent] = {}
    incidents: list[PageIncident] = []
    for item in _objects(payload, "ongoing_incidents"):
        names = []
        for c in item.get("affected_components") or []:
            if isinstance(c, dict) and isinstance(c.get("name"), str):
                component = PageComponent(c["name"][:100], str(c.get("current_status", UNKNOWN)),
                                          str(c.get("group_name") or ""))  # fmt: skip
                names += [n for n in (component.name, component.group) if n]
                known = affected.get(component.name)
                if known is None or component.severity > known.severity:
                    affected[component.name] = component
        incidents.append(
            PageIncident(
                name=_text(item.get("name"), 150) or "an unnamed incident",
                impact=str(item.get("current_worst_impact") or ""),
                status=str(item.get("status") or ""),
                link=_link(item.get("url"), page_url),
                update=_text(item.get("last_update_message"), UPDATE_CHARS),
                components=tuple(names),
            )
        )
    for item in _objects(payload, "in_progress_maintenances"):
        for c in item.get("affected_components") or []:
            if isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"] not in affected:
                affected[c["name"]] = PageComponent(
                    c["name"][:100], "under_maintenance", str(c.get("group_name") or "")
                )
    maintenance = bool(_objects(payload, "in_progress_maintenances"))
    indicator = max(
        [_IO_IMPACT_INDICATOR.get(i.impact, "minor") for i in incidents] + ["maintenance" if maintenance else "none"],
        key=_INDICATOR_ORDER.index,
    )
    description = "" if incidents else "maintenance in progress" if maintenance else "no ongoing incidents"
    return PageReading(indicator, description, tuple(affected.values()), tuple(incidents), complete=False)


_ATOM = "{http://www.w3.org/2005/Atom}"
_RESOLVED_WORDS = re.compile(r"\b(resolved|completed)\b", re.IGNORECASE)
_AFFECTED = re.compile(r"affected components?(.*)", re.IGNORECASE | re.DOTALL)
_LIST_ITEM = re.compile(r"<li>(.*?)</li>", re.IGNORECASE | re.DOTALL)


def parse_feed(body: bytes, page_url: str, now: datetime) -> PageReading:
    """An RSS 2.0 or Atom feed of a status page; recent items not marked resolved are active incidents."""
    head = body[:4096].lstrip().lower()
    if b"<!doctype html" in head or head.startswith(b"<html"):
        raise PageError("answered an HTML page, not a feed (is `format` right?)")
    if b"<!doctype" in body or b"<!entity" in body.lower():
        raise PageError("answered a feed that declares a DTD or entities, not read")
    try:
        root = ET.fromstring(body)  # noqa: S314 - no DTD, no entities (checked above), size bounded
    except ET.ParseError:
        raise PageError("answered a feed that is not well-formed XML") from None
    # (title, link, time, description) of each item, RSS 2.0 or Atom.
    entries: list[tuple[str | None, str | None, str | None, str | None]] = []
    if root.tag == "rss":
        for e in root.iter("item"):
            entries.append((e.findtext("title"), e.findtext("link"), e.findtext("pubDate"), e.findtext("description")))
    elif root.tag == f"{_ATOM}feed":
        for e in root.iter(f"{_ATOM}entry"):
            anchor = e.find(f"{_ATOM}link")
            when = e.findtext(f"{_ATOM}updated") or e.findtext(f"{_ATOM}published")
            text = e.findtext(f"{_ATOM}content") or e.findtext(f"{_ATOM}summary")
            href = anchor.get("href") if anchor is not None else None
            entries.append((e.findtext(f"{_ATOM}title"), href, when, text))
    else:
        raise PageError(f"answered XML that is not RSS or Atom (<{root.tag[:40]}>)")
    newest: dict[str, tuple[datetime, PageIncident]] = {}
    for title, link, when, description in entries:
        moment = _feed_time(when)
        name = _text(title, 150)
        if not name or moment is None or now - moment > timedelta(hours=FEED_ACTIVE_HOURS):
            continue
        raw = description or ""
        affected = _AFFECTED.search(raw)
        components = tuple(_text(m, 100) for m in _LIST_ITEM.findall(affected.group(1))) if affected else ()
        update = _text(_AFFECTED.sub("", raw), UPDATE_CHARS)
        resolved = bool(_RESOLVED_WORDS.search(update)) or bool(_RESOLVED_WORDS.search(name))
        incident = PageIncident(name, "", "resolved" if resolved else "", _link(link, page_url), update, components)
        if name not in newest or moment > newest[name][0]:  # an incident's newest item says where it stands
            newest[name] = (moment, incident)
    active = tuple(i for _, i in sorted(newest.values(), key=lambda p: p[0], reverse=True) if i.status != "resolved")
    indicator = "minor" if active else "none"
    description = "" if active else f"no incident in the feed's last {FEED_ACTIVE_HOURS:g} h"
    return PageReading(indicator, description, (), active, complete=False)


def _feed_time(text: str | None) -> datetime | None:
    if not text:
        return None
    text = text.strip()
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# --- judging a reading for one component ---------------------------------------------------------


def _matches(declared: Iterable[str], *names: str) -> bool:
    wanted = {d.casefold() for d in declared}
    return any(n.casefold() in wanted for n in names if n)


def judge(component: StatuspageComponent, fetch: PageFetch, now: float) -> ProbeResult:
    """The component's status from the page's reading: its declared components (or the page's overall
    indicator) and the unresolved incidents touching them."""
    age = max(0.0, now - fetch.fetched_at)
    facts: dict[str, str | int | float] = {"page": urlsplit(str(component.url)).netloc, "checked_s_ago": round(age)}
    reading = fetch.reading
    if reading is None:
        facts["provider_status"] = UNKNOWN
        return ProbeResult(Status.WARNING, f"{UNKNOWN}: {fetch.problem}", facts=facts)
    declared = component.components
    checks: list[Check] = []
    if declared:
        missing: list[str] = []
        for name in declared:
            found = [c for c in reading.components if _matches([name], c.name, c.group)]
            if found:
                worst = max(found, key=lambda c: c.severity)
                checks.append(Check(name, worst.severity, _words(worst.status)))
            elif reading.complete:
                missing.append(name)
            else:
                checks.append(Check(name, Status.HEALTHY, "operational"))
        if missing:
            known = ", ".join(sorted({c.name for c in reading.components})[:8]) or "none"
            facts["provider_status"] = UNKNOWN
            detail = f"{UNKNOWN}: the page has no component {', '.join(missing)} (it has: {known})"
            return ProbeResult(Status.WARNING, detail[:400], facts=facts)
        incidents = [i for i in reading.incidents if not i.components or _matches(declared, *i.components)]
        if not reading.complete and not reading.components:  # a feed: match the names in its text
            incidents = [i for i in incidents if i.components or _mentions(declared, i)]
        status = max([c.status for c in checks] + [i.severity for i in incidents])
        state = "; ".join(f"{c.name} {c.detail}" for c in checks)
    else:
        incidents = list(reading.incidents)
        status = max([_INDICATOR_STATUS.get(reading.indicator, Status.WARNING)] + [i.severity for i in incidents])
        state = reading.description or ("operational" if status is Status.HEALTHY else _words(reading.indicator))
    facts["provider_status"] = status.label
    facts["indicator"] = reading.indicator[:40]
    facts["incidents"] = len(incidents)
    if not incidents:
        return ProbeResult(status, state, facts=facts, checks=tuple(checks))
    first = incidents[0]
    more = f" (and {len(incidents) - 1} more)" if len(incidents) > 1 else ""
    facts |= {"incident": first.name, "incident_link": first.link, "incident_impact": first.impact or UNKNOWN}
    facts["incident_line"] = (first.line() + more)[:600]
    return ProbeResult(status, f"{first.line()}{more} · {state}"[:600], facts=facts, checks=tuple(checks))


def _mentions(declared: Iterable[str], incident: PageIncident) -> bool:
    text = f"{incident.name} {incident.update}".casefold()
    return any(re.search(rf"\b{re.escape(d.casefold())}\b", text) for d in declared)


# --- fetching, cached per page -------------------------------------------------------------------


@dataclass
class _Pages:
    """The readings kept, one per page URL, and the fetches under way."""

    kept: dict[str, PageFetch] = field(default_factory=dict)
    fetching: dict[str, asyncio.Task[PageFetch]] = field(default_factory=dict)


class StatuspageProbe:
    """Reads providers' status pages through a shared aiohttp session, each page at most every
    ``poll_seconds`` whoever asks; one instance serves `/ops health`, the watcher and the digest."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        poll_seconds: float = POLL_SECONDS,
        max_pages: int = MAX_PAGES,
        body_limit: int = BODY_LIMIT,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._session = session
        self._poll = poll_seconds
        self._max_pages = max_pages
        self._body_limit = body_limit
        self._clock = clock
        self._wall_clock = wall_clock
        self._pages = _Pages()

    @property
    def pages_kept(self) -> int:
        return len(self._pages.kept)

    async def probe(self, component: Component) -> ProbeResult:
        """The component's status from its page's reading (fetched now only if the kept one is stale)."""
        if not isinstance(component, StatuspageComponent):
            raise TypeError(f"StatuspageProbe cannot probe a {component.type} component")
        started = time.perf_counter()
        fetch = await self.read(component)
        result = judge(component, fetch, self._clock())
        return ProbeResult(result.status, result.detail, since_ms(started), result.facts, result.checks)

    async def read(self, component: StatuspageComponent) -> PageFetch:
        """The page's kept reading while fresh; else one fetch, shared by every caller meanwhile."""
        key = f"{component.format} {component.endpoint}"
        kept = self._pages.kept.get(key)
        if kept is not None and self._clock() < kept.expires_at:
            return kept
        task = self._pages.fetching.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(component), name=f"statuspage:{component.endpoint[:80]}")
            self._pages.fetching[key] = task
            task.add_done_callback(lambda done: self._keep(key, done))
        # Shielded: a caller cut off by its own deadline leaves the fetch to the others waiting on it
        # (it ends at the component's timeout anyway).
        return await asyncio.shield(task)

    def _keep(self, key: str, done: asyncio.Task[PageFetch]) -> None:
        if self._pages.fetching.get(key) is done:
            del self._pages.fetching[key]
        if done.cancelled() or done.exception() is not None:
            return
        self._pages.kept[key] = done.result()
        while len(self._pages.kept) > self._max_pages:
            oldest = min(self._pages.kept, key=lambda k: self._pages.kept[k].fetched_at)
            del self._pages.kept[oldest]

    async def _fetch(self, component: StatuspageComponent) -> PageFetch:
        started = self._clock()
        budget = connect_budget(component.timeout)
        try:
            async with asyncio.timeout(budget):
                reading = await self._get(component, budget)
        except _RateLimited as exc:
            return self._fetched(started, problem=str(exc), retry_after=exc.retry_after)
        except PageError as exc:
            return self._fetched(started, problem=str(exc))
        except TimeoutError:
            return self._fetched(started, problem=f"the status page gave no answer within {budget:g} s")
        except (aiohttp.ClientError, OSError, UnicodeError, ValueError) as exc:
            why = network_problem(exc) or short_error(exc)
            return self._fetched(started, problem=f"cannot reach the status page: {why}")
        return self._fetched(started, reading=reading)

    def _fetched(
        self, started: float, *, reading: PageReading | None = None, problem: str = "", retry_after: float | None = None
    ) -> PageFetch:
        wait = max(self._poll, min(retry_after or 0.0, MAX_RETRY_AFTER))
        return PageFetch(reading, problem, started, started + wait)

    async def _get(self, component: StatuspageComponent, budget: float) -> PageReading:
        feed = "application/rss+xml, application/atom+xml, application/xml"
        headers = {"Accept": feed if component.format == "rss" else "application/json",
                   "User-Agent": "opsbot (status page check)"}  # fmt: skip
        timeout = aiohttp.ClientTimeout(total=budget)
        page_url = str(component.url)
        async with self._session.get(component.endpoint, headers=headers, timeout=timeout) as response:
            if response.status == 429:
                retry = _retry_after(response.headers.get("Retry-After"), self._wall_clock())
                wait = f"; next try in {_seconds(max(self._poll, min(retry or 0.0, MAX_RETRY_AFTER)))}"
                raise _RateLimited("the status page is rate-limiting requests (429)" + wait, retry)
            if response.status != 200:
                raise PageError(f"the status page answered {response.status} {response.reason or ''}".rstrip())
            body = await response.content.read(self._body_limit + 1)
            media = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if len(body) > self._body_limit:
            raise PageError(f"the status page's answer is over {self._body_limit // 1024} KiB, not read")
        if component.format == "rss":
            try:
                return parse_feed(body, page_url, self._wall_clock())
            except PageError as exc:
                raise PageError(f"the status page {exc}") from None
        if not body.strip():
            raise PageError("the status page answered an empty body, not JSON")
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            if "html" in media or body.lstrip()[:1] == b"<":
                what = media or "HTML"
                raise PageError(f"the status page answered {what}, not JSON (is `url` or `format` wrong?)") from None
            raise PageError("the status page answered malformed JSON") from None
        parse = parse_statuspage if component.format == "statuspage" else parse_incidentio
        try:
            return parse(payload, page_url)
        except PageError as exc:
            raise PageError(f"the status page {exc}") from None


class _RateLimited(PageError):
    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds a Retry-After header asks for (a number of seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - now).total_seconds())


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.0f} min"
