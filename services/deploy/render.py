"""Render web services (runbook 002): list deploys, roll back to one, redeploy the live commit.

Render's public REST API (``https://api.render.com/v1``, a Bearer API key) does what the dashboard's
"Rollback to this version" and "Manual Deploy" buttons do. Both start a new deploy, which this
module follows until it is live, has failed, or ``deploy_timeout`` passes. The API key travels only
in the Authorization header: never in a URL, a message or a log line.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from services.clients import read_json
from services.deploy.base import DeployError, Progress, Release
from services.failures import network_problem
from services.redaction import Redactor

log = structlog.get_logger(__name__)

API_URL = "https://api.render.com/v1"

_SERVICE_ID = re.compile(r"srv-[a-z0-9]{1,64}")
_DEPLOY_ID = re.compile(r"dep-[a-z0-9]{1,64}")
_COMMIT = re.compile(r"[0-9a-f]{7,64}")
_API_KEY = re.compile(r"[\x21-\x7e]{8,512}")  # visible ASCII only: anything else could split the header
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}

WENT_LIVE = frozenset({"live", "deactivated"})
"""A deploy in one of these states was live at some point: a valid rollback target."""
FAILED = frozenset({"build_failed", "update_failed", "pre_deploy_failed", "canceled", "deactivated"})
"""A new deploy that reaches one of these never went live (deactivated: superseded before it did)."""
IN_PROGRESS = frozenset({"created", "queued", "build_in_progress", "update_in_progress", "pre_deploy_in_progress"})

_RETRYABLE = frozenset({429, 500, 502, 503, 504})
_LIVE_SEARCH_PAGES = 5
_LIVE_SEARCH_PAGE_SIZE = 20


class _Transient(DeployError):
    """A failure worth polling through (timeout, 429, 5xx, network), as opposed to a refusal."""


@dataclass(frozen=True)
class Deploy:
    """One deploy of a Render service, as the API reports it."""

    id: str
    status: str
    commit_id: str = ""
    commit_message: str = ""
    image: str = ""
    trigger: str = ""
    created_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def from_api(cls, item: Mapping[str, Any]) -> Deploy:
        """Parse a ``deploy`` object (``commit`` for Git services, ``image`` for image-backed ones)."""
        commit = item.get("commit")
        commit_id = commit_message = ""
        if isinstance(commit, Mapping):
            commit_id = str(commit.get("id") or "")
            commit_message = str(commit.get("message") or "")
        image = item.get("image")
        image_ref = str(image.get("ref") or "") if isinstance(image, Mapping) else ""
        return cls(
            id=str(item.get("id") or ""),
            status=str(item.get("status") or "unknown"),
            commit_id=commit_id,
            commit_message=commit_message,
            image=image_ref,
            trigger=str(item.get("trigger") or ""),
            created_at=_timestamp(item.get("createdAt")),
            finished_at=_timestamp(item.get("finishedAt")),
        )

    @property
    def label(self) -> str:
        """What the deploy runs, short: ``commit 1a2b3c4 "Fix login"`` or the image reference."""
        if self.commit_id:
            first_line = self.commit_message.strip().splitlines()[0] if self.commit_message.strip() else ""
            if len(first_line) > 72:
                first_line = first_line[:71] + "…"
            return f'commit {self.commit_id[:7]} "{first_line}"' if first_line else f"commit {self.commit_id[:7]}"
        return f"image {self.image}" if self.image else "no commit or image recorded"


def _timestamp(value: object) -> datetime | None:
    """An RFC 3339 timestamp ("2024-05-01T10:00:00.123Z") as an aware datetime, or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def check_deploy_id(value: str, *, what: str = "deploy") -> str:
    """A Render deploy id ("dep-…"), refused before any call otherwise."""
    text = str(value)
    if not _DEPLOY_ID.fullmatch(text):
        raise DeployError(f"{text[:40]!r} is not a Render {what} id (dep- followed by lowercase letters and digits).")
    return text


def _seconds(value: float) -> str:
    if value < 10:
        return f"{value:.1f} s"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.0f} min"


def _render_message(payload: object) -> str:
    """The ``message`` of Render's error JSON ``{"id": ..., "message": ...}``, on one line."""
    if isinstance(payload, Mapping) and payload.get("message"):
        return " ".join(str(payload["message"]).split())
    return ""


class RenderProvider:
    """The deploys of one Render service, through Render's public REST API."""

    kind = "render"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        service_id: str,
        api_key: str,
        *,
        api_url: str = API_URL,
        timeout: float = 30.0,
        poll_every: float = 5.0,
        deploy_timeout: float = 900.0,
    ) -> None:
        if not _SERVICE_ID.fullmatch(service_id):
            raise DeployError(f"{service_id[:80]!r} is not a Render service id (srv- followed by letters and digits).")
        if not _API_KEY.fullmatch(api_key):
            # Never quote the value: it is (meant to be) the key.
            raise DeployError(f"The Render API key for service {service_id} is empty or has spaces or odd characters.")
        parts = urlsplit(api_url)
        secure = parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK)
        if not secure or not parts.hostname or parts.query or parts.fragment or parts.username:
            raise DeployError("The Render API URL must be https:// (plain http only on loopback, for tests).")
        self._session = session
        self.service_id = service_id
        self._api_key = api_key
        self._redactor = Redactor([api_key])
        self._api_url = api_url.rstrip("/")
        self._timeout = timeout
        self._client_timeout = aiohttp.ClientTimeout(total=timeout)
        self._poll_every = poll_every
        self._deploy_timeout = deploy_timeout

    def describe(self) -> str:
        return f"Render service {self.service_id}"

    def __repr__(self) -> str:
        return f"RenderProvider({self.service_id!r}, api_key=***)"

    async def close(self) -> None:
        """Nothing of its own to close: the HTTP session belongs to the caller."""

    # -- the API ----------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        not_found: str,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> object:
        """One API request. GETs are retried once on 429/5xx; a POST never is (it may have acted)."""
        headers = {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"}
        attempts = 2 if method == "GET" else 1
        for attempt in range(1, attempts + 1):
            try:
                async with self._session.request(
                    method,
                    self._api_url + path,
                    params=params,
                    json=body,
                    headers=headers,
                    timeout=self._client_timeout,
                    allow_redirects=False,  # a redirect must not carry the key anywhere else
                ) as response:
                    status = response.status
                    payload = await read_json(
                        response, lambda mib: DeployError(f"Render's API answered more than {mib} MiB.")
                    )
            except TimeoutError:
                raise _Transient(f"Render's API did not answer within {self._timeout:g} s ({what}).") from None
            except (aiohttp.ClientError, OSError) as exc:
                reason = network_problem(exc) or type(exc).__name__
                raise _Transient(f"Could not reach Render's API to {what} ({reason}).") from None
            if status < 300:
                return payload
            if status in _RETRYABLE and attempt < attempts:
                log.info("render_retry", service=self.service_id, status=status, path=path)
                await asyncio.sleep(min(self._poll_every, 1.0))
                continue
            raise self._http_error(status, payload, what=what, not_found=not_found)
        raise AssertionError("unreachable")  # pragma: no cover

    def _http_error(self, status: int, payload: object, *, what: str, not_found: str) -> DeployError:
        log.info("render_refused", service=self.service_id, status=status, action=what)
        if status in (401, 403):
            return DeployError(f"Render refused the API key for service {self.service_id}.")
        if status == 404:
            return DeployError(not_found)
        if status == 429:
            return _Transient("Render's API is rate-limiting the bot; try again in a minute.")
        if status >= 500:
            return _Transient(f"Render's API failed ({status}) to {what}; try again later.")
        message = self._redactor.redact(_render_message(payload))[:200]
        detail = f": {message}" if message else ""
        return DeployError(f"Render refused to {what} ({status}){detail}.")

    @property
    def _service_path(self) -> str:
        return f"/services/{self.service_id}"

    async def _page(self, limit: int, cursor: str | None = None) -> list[tuple[Deploy, str]]:
        """One page of deploys with their cursors, as the API orders them (newest first)."""
        params = {"limit": str(limit)}
        if cursor:
            params["cursor"] = cursor
        payload = await self._call(
            "GET",
            f"{self._service_path}/deploys",
            params=params,
            what="list deploys",
            not_found=f"Render has no service {self.service_id} (or the API key cannot see it).",
        )
        if not isinstance(payload, list):
            raise DeployError("Render's API answered the deploy list with something that is not a list.")
        page: list[tuple[Deploy, str]] = []
        for entry in payload:
            if isinstance(entry, Mapping) and isinstance(entry.get("deploy"), Mapping):
                deploy = Deploy.from_api(entry["deploy"])
                if _DEPLOY_ID.fullmatch(deploy.id):
                    page.append((deploy, str(entry.get("cursor") or "")))
        return page

    async def get_deploy(self, deploy_id: str) -> Deploy:
        """One deploy of this service (a deploy of another service is "not found")."""
        checked = check_deploy_id(deploy_id)
        payload = await self._call(
            "GET",
            f"{self._service_path}/deploys/{checked}",
            what=f"read deploy {checked}",
            not_found=f"Render has no deploy {checked} on service {self.service_id}.",
        )
        if not isinstance(payload, Mapping):
            raise DeployError(f"Render's API answered deploy {checked} with something that is not a deploy.")
        deploy = Deploy.from_api(payload)
        if deploy.id != checked:
            raise DeployError(f"Render's API answered with deploy {deploy.id[:40]!r} when asked for {checked}.")
        return deploy

    async def deploys(self, limit: int = 10) -> list[Deploy]:
        """The service's most recent deploys, newest first."""
        if not 1 <= limit <= 100:
            raise DeployError("Ask for between 1 and 100 Render deploys.")
        found = [deploy for deploy, _ in await self._page(limit)]
        oldest = datetime.min.replace(tzinfo=UTC)
        found.sort(key=lambda deploy: deploy.created_at or oldest, reverse=True)  # stable: API order on ties
        return found[:limit]

    async def _live_state(self) -> tuple[Deploy | None, list[Deploy], set[str]]:
        """The live deploy, the deploys in progress that are newer than it, and every id seen."""
        busy: list[Deploy] = []
        seen: set[str] = set()
        cursor: str | None = None
        for _ in range(_LIVE_SEARCH_PAGES):
            page = await self._page(_LIVE_SEARCH_PAGE_SIZE, cursor)
            for deploy, _cursor in page:
                seen.add(deploy.id)
                if deploy.status == "live":
                    return deploy, busy, seen
                if deploy.status in IN_PROGRESS:
                    busy.append(deploy)
            if len(page) < _LIVE_SEARCH_PAGE_SIZE or not page[-1][1]:
                break
            cursor = page[-1][1]
        return None, busy, seen

    # -- the ReleaseProvider protocol -------------------------------------------------------------

    async def live(self) -> str:
        """The id of the live deploy, or "" when none is live."""
        live, _, _ = await self._live_state()
        return live.id if live else ""

    async def releases(self, limit: int = 10) -> list[Release]:
        """Recent deploys, newest first; the live one marked, those that were live before ready."""
        return [
            Release(
                id=deploy.id,
                created_at=deploy.created_at,
                description=deploy.label,
                live=deploy.status == "live",
                ready=deploy.status in WENT_LIVE,
                status=deploy.status,
            )
            for deploy in await self.deploys(limit)
        ]

    async def rollback(self, target: str, *, expected_live: str, progress: Progress) -> str:
        """Start a rollback deploy of ``target`` (a deploy of this service that was live before), if
        ``expected_live`` is still the live deploy and nothing else is deploying; wait until it is live."""
        wanted = check_deploy_id(target)
        planned = check_deploy_id(expected_live, what="live deploy")
        deploy = await self.get_deploy(wanted)
        if deploy.status not in WENT_LIVE:
            raise DeployError(
                f"Deploy {wanted} of service {self.service_id} never went live ({deploy.status}); "
                "only a deploy that was live before can be rolled back to."
            )
        live, known = await self._check_settled(planned)
        if live.id == wanted:
            raise DeployError(f"Deploy {wanted} is already the live deploy of service {self.service_id}.")

        await progress(f"Rolling Render service {self.service_id} back to deploy {wanted} ({deploy.label}).")
        loop = asyncio.get_running_loop()
        started = loop.time()
        payload = await self._call(
            "POST",
            f"{self._service_path}/rollback",
            body={"deployId": wanted},
            what=f"roll back to deploy {wanted}",
            not_found=f"Render has no deploy {wanted} on service {self.service_id}.",
        )
        new = await self._started(payload, known, "rollback")
        log.info("render_rollback_started", service=self.service_id, target=wanted, deploy=new.id)
        final = await self._wait(new, "rollback", progress)
        took = _seconds(loop.time() - started)
        log.info("render_rollback_live", service=self.service_id, target=wanted, deploy=final.id)
        return (
            f"Render service {self.service_id} is live on deploy {final.id}, a rollback to {wanted} "
            f"({deploy.label}), after {took} (was {live.id})"
        )

    async def restart(self, *, progress: Progress) -> str:
        """Redeploy the live deploy's commit (Render's "Manual Deploy"), build cache kept; wait until live.
        An image-backed service redeploys the image its settings name."""
        live, known = await self._check_settled(None)
        body: dict[str, str] = {"clearCache": "do_not_clear"}
        if _COMMIT.fullmatch(live.commit_id):
            body["commitId"] = live.commit_id
        await progress(f"Redeploying Render service {self.service_id} ({live.label}, now live as {live.id}).")
        loop = asyncio.get_running_loop()
        started = loop.time()
        payload = await self._call(
            "POST",
            f"{self._service_path}/deploys",
            body=body,
            what="start a deploy",
            not_found=f"Render has no service {self.service_id} (or the API key cannot see it).",
        )
        new = await self._started(payload, known, "redeploy")
        log.info("render_redeploy_started", service=self.service_id, deploy=new.id)
        final = await self._wait(new, "redeploy", progress)
        took = _seconds(loop.time() - started)
        return (
            f"Render service {self.service_id} redeployed: deploy {final.id} ({final.label}) "
            f"is live after {took} (was {live.id})"
        )

    # -- helpers ----------------------------------------------------------------------------------

    async def _check_settled(self, planned: str | None) -> tuple[Deploy, set[str]]:
        """The live deploy and the ids of the deploys listed up to it; refuses if the live deploy is not
        ``planned`` or if another deploy is under way."""
        live, busy, seen = await self._live_state()
        if live is None:
            raise DeployError(f"Render shows no live deploy of service {self.service_id}; nothing was changed.")
        if planned is not None and live.id != planned:
            raise DeployError(
                f"The live deploy of Render service {self.service_id} is now {live.id}, not {planned} as planned: "
                "it changed since the plan was made, so nothing was changed."
            )
        if busy:
            raise DeployError(
                f"Deploy {busy[0].id} of Render service {self.service_id} is in progress ({busy[0].status}); "
                "wait for it to finish, then try again."
            )
        return live, seen

    async def _started(self, payload: object, known: set[str], what: str) -> Deploy:
        """The deploy a POST started: from its answer, or (Render may answer 202 with no body when it
        queues one) the newest deploy that was not there before."""
        if isinstance(payload, Mapping):
            inner = payload.get("deploy")
            deploy = Deploy.from_api(inner if isinstance(inner, Mapping) else payload)
            if _DEPLOY_ID.fullmatch(deploy.id):
                return deploy
        for deploy, _ in await self._page(5):
            if deploy.id not in known:
                return deploy
        raise DeployError(
            f"Render accepted the {what} of service {self.service_id} but did not say which deploy it started; "
            "follow it in the Render dashboard."
        )

    async def _wait(self, deploy: Deploy, what: str, progress: Progress) -> Deploy:
        """Poll the deploy until live (returned), failed or ``deploy_timeout`` (DeployError); one progress
        note per status change. A short API outage while waiting is polled through."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._deploy_timeout
        reported = ""
        failures = 0
        while True:
            if deploy.status != reported:
                reported = deploy.status
                await progress(f"{what.capitalize()} deploy {deploy.id} of {self.service_id}: {deploy.status}")
            if deploy.status == "live":
                return deploy
            if deploy.status in FAILED:
                raise DeployError(
                    f"The {what} deploy {deploy.id} of Render service {self.service_id} ended {deploy.status}; "
                    "see its logs in the Render dashboard."
                )
            if loop.time() + self._poll_every > deadline:
                raise DeployError(
                    f"The {what} deploy {deploy.id} of Render service {self.service_id} was not live within "
                    f"{_seconds(self._deploy_timeout)} (last status {deploy.status}); it may still finish on Render."
                )
            await asyncio.sleep(self._poll_every)
            try:
                deploy = await self.get_deploy(deploy.id)
                failures = 0
            except _Transient as exc:
                failures += 1
                log.info("render_poll_failed", service=self.service_id, deploy=deploy.id, failures=failures)
                if failures >= 3:
                    raise DeployError(
                        f"{exc.message.rstrip('.')}; the {what} deploy {deploy.id} may still be in progress."
                    ) from None
