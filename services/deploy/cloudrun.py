"""Cloud Run releases (runbook 000): revisions, rollback by traffic, restart and scaling.

Cloud Run keeps every revision it ever created, so a rollback is a traffic change — 100 % to an
earlier, still-ready revision — and nothing is rebuilt. A restart or a scaling change writes the
service's revision template, so Cloud Run creates a new revision with the same spec (plus the
change) and traffic follows it. Every write is an UpdateService long-running operation, waited for
within ``operation_timeout``.

It talks to the Cloud Run Admin API v2 through google-cloud-run's async clients, which speak gRPC
only; the channel is injectable so the tests run the real clients against a grpc.aio fake.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import grpc
import structlog
from google.api_core import exceptions as api_exceptions
from google.cloud import run_v2
from google.cloud.run_v2.services.revisions.transports.grpc_asyncio import RevisionsGrpcAsyncIOTransport
from google.cloud.run_v2.services.services.transports.grpc_asyncio import ServicesGrpcAsyncIOTransport
from google.protobuf import field_mask_pb2  # type: ignore[import-untyped]  # no stubs installed

from services.deploy.base import DeployError, Progress, Release
from services.failures import network_problem

log = structlog.get_logger(__name__)

T = TypeVar("T")

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
MAX_REVISIONS_READ = 1000
"""Revisions read at most to find the newest; Cloud Run keeps up to 1000 per service."""
RESTARTED_AT = "opsbot/restarted-at"
"""Template annotation a restart changes, so Cloud Run makes a new revision with the same spec."""

# Project ids: lowercase letters, digits, hyphens, optionally domain-scoped ("example.com:proj").
_PROJECT = re.compile(r"(?:[a-z0-9][a-z0-9.-]{0,61}[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
_REGION = re.compile(r"[a-z]{2,}-[a-z]+[0-9]{1,2}")
_SERVICE = re.compile(r"[a-z](?:[-a-z0-9]{0,47}[a-z0-9])?")
_REVISION = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
_CPU = re.compile(r"(?P<milli>[1-9][0-9]{0,4})m|(?P<cores>(?:0|[1-9][0-9]?)(?:\.[0-9]{1,3})?)")
_MEMORY = re.compile(r"(?P<amount>[1-9][0-9]{0,5})(?P<unit>Mi|Gi|M|G)")
_MEMORY_UNITS = {"Mi": 2**20, "Gi": 2**30, "M": 10**6, "G": 10**9}
_MAX_CPU = 8.0
_MEMORY_RANGE = (128 * 2**20, 32 * 2**30)
_MAX_INSTANCES = 1000

_LATEST = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST
_BY_REVISION = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
_State = run_v2.Condition.State

ChannelFactory = Callable[[], grpc.aio.Channel]


class Scaling(NamedTuple):
    """A service's instance limits and size, as its revision template sets them."""

    min_instances: int
    max_instances: int | None  # None: not set, Cloud Run's default applies
    cpu: str | None
    memory: str | None


def _short(name: str) -> str:
    """``projects/p/locations/r/services/s/revisions/x`` → ``x`` (a short name stays as it is)."""
    return name.rsplit("/", 1)[-1]


def _readiness(revision: run_v2.Revision) -> tuple[bool, str]:
    """Whether Cloud Run can send traffic to the revision (its Ready condition), and a word for it."""
    ready = next((condition for condition in revision.conditions if condition.type_ == "Ready"), None)
    if ready is None:
        return False, "deploying" if revision.reconciling else "unknown"
    if ready.state == _State.CONDITION_SUCCEEDED:
        return True, "ready"
    if ready.state == _State.CONDITION_FAILED:
        reason = " ".join(ready.message.split())[:120]
        return False, f"failed: {reason}" if reason else "failed"
    if ready.state in (_State.CONDITION_PENDING, _State.CONDITION_RECONCILING) or revision.reconciling:
        return False, "deploying"
    return False, "unknown"


def _created(revision: run_v2.Revision) -> datetime | None:
    raw = run_v2.Revision.pb(revision)
    if not raw.HasField("create_time"):
        return None
    created: datetime = raw.create_time.ToDatetime(tzinfo=UTC)
    return created


def _traffic_shares(service: run_v2.Service) -> dict[str, int]:
    """Percent of traffic per revision short name: what is serving (traffic_statuses) if Cloud Run
    reports it, else what is asked for; LATEST resolves to the latest ready revision."""
    latest = _short(service.latest_ready_revision)
    entries: list[Any] = list(service.traffic_statuses) or list(service.traffic)
    if not entries:
        # No traffic spec means 100 % to the latest ready revision.
        return {latest: 100} if latest else {}
    shares: dict[str, int] = {}
    for entry in entries:
        name = entry.revision or (latest if entry.type_ == _LATEST else "")
        if name and entry.percent > 0:
            shares[name] = shares.get(name, 0) + int(entry.percent)
    return shares


def _live(shares: dict[str, int]) -> str | None:
    """The revision with the largest share (the first one listed on a tie), or None."""
    if not shares:
        return None
    return max(shares.items(), key=lambda item: item[1])[0]


def _split(shares: dict[str, int]) -> str:
    """``rev-a`` when it has everything, else ``rev-a 90 %, rev-b 10 %``."""
    if not shares:
        return "no revision"
    if len(shares) == 1 and next(iter(shares.values())) == 100:
        return next(iter(shares))
    return ", ".join(f"{name} {percent} %" for name, percent in shares.items())


def _all_traffic_to(name: str, current: Any) -> list[run_v2.TrafficTarget]:
    """100 % to revision ``name``; tagged targets stay at 0 % so their tag URLs keep working, as
    ``gcloud run services update-traffic --to-revisions`` keeps them."""
    target = run_v2.TrafficTarget(type_=_BY_REVISION, revision=name, percent=100)
    tagged: list[run_v2.TrafficTarget] = []
    for entry in current:
        if not entry.tag:
            continue
        if entry.type_ == _BY_REVISION and entry.revision == name and not target.tag:
            target.tag = entry.tag
        else:
            tagged.append(run_v2.TrafficTarget(type_=entry.type_, revision=entry.revision, tag=entry.tag, percent=0))
    return [target, *tagged]


def _scaling(service: run_v2.Service) -> Scaling:
    template = service.template
    limits: dict[str, str] = {}
    if template.containers:
        limits = dict(template.containers[0].resources.limits)
    maximum = template.scaling.max_instance_count
    return Scaling(
        min_instances=template.scaling.min_instance_count,
        max_instances=maximum or None,
        cpu=limits.get("cpu"),
        memory=limits.get("memory"),
    )


def _changes(before: Scaling, after: Scaling) -> str:
    """``min 1 → 2, max 10 → 20`` (cpu and memory only when they change)."""

    def shown(value: object) -> str:
        return "default" if value is None else str(value)

    parts = [
        f"min {before.min_instances} → {after.min_instances}",
        f"max {shown(before.max_instances)} → {shown(after.max_instances)}",
    ]
    if after.cpu != before.cpu:
        parts.append(f"cpu {shown(before.cpu)} → {after.cpu}")
    if after.memory != before.memory:
        parts.append(f"memory {shown(before.memory)} → {after.memory}")
    return ", ".join(parts)


def _validate_cpu(value: str) -> str:
    match = _CPU.fullmatch(value)
    cores = 0.0
    if match is not None:
        cores = int(match["milli"]) / 1000 if match["milli"] else float(match["cores"])
    if not 0 < cores <= _MAX_CPU:
        raise DeployError(f"{value[:40]!r} is not a Cloud Run CPU limit (say 1, 2, 4 or 1000m)")
    return value


def _validate_memory(value: str) -> str:
    match = _MEMORY.fullmatch(value)
    size = int(match["amount"]) * _MEMORY_UNITS[match["unit"]] if match is not None else 0
    low, high = _MEMORY_RANGE
    if not low <= size <= high:
        raise DeployError(f"{value[:40]!r} is not a Cloud Run memory limit (say 512Mi or 2Gi, from 128Mi to 32Gi)")
    return value


def _seconds(value: float) -> str:
    return f"{value:g} s" if value < 120 else f"{value / 60:.0f} min"


class CloudRunProvider:
    """The revisions of one Cloud Run service, through the Cloud Run Admin API v2."""

    kind = "cloudrun"

    def __init__(
        self,
        project: str,
        region: str,
        service: str,
        *,
        timeout: float = 30.0,
        operation_timeout: float = 600.0,
        poll_every: float = 2.0,
        channel_factory: ChannelFactory | None = None,
    ) -> None:
        if not _PROJECT.fullmatch(project):
            raise DeployError(f"{project[:80]!r} is not a Google Cloud project id")
        if not _REGION.fullmatch(region):
            raise DeployError(f"{region[:80]!r} is not a Cloud Run region such as asia-northeast3")
        if not _SERVICE.fullmatch(service):
            raise DeployError(f"{service[:80]!r} is not a Cloud Run service name")
        self.project = project
        self.region = region
        self.service = service
        self._timeout = timeout
        self._operation_timeout = operation_timeout
        self._poll_every = poll_every
        self._channel_factory = channel_factory
        self._services: run_v2.ServicesAsyncClient | None = None
        self._revisions: run_v2.RevisionsAsyncClient | None = None
        self._lock = asyncio.Lock()

    def describe(self) -> str:
        return f"Cloud Run service {self.service} in {self.region} ({self.project})"

    @property
    def _service_path(self) -> str:
        return f"projects/{self.project}/locations/{self.region}/services/{self.service}"

    # --- reading -------------------------------------------------------------------------------

    async def releases(self, limit: int = 10) -> list[Release]:
        """The newest revisions first, with their traffic share, image and readiness.

        The revisions serving traffic are always among them, even when older than the newest
        ``limit``: a rollback plan needs to show what is live.
        """
        if not 1 <= limit <= 100:
            raise DeployError("ask for between 1 and 100 revisions")
        shares = _traffic_shares(await self._get_service())
        revisions = await self._list_revisions()
        oldest = datetime.min.replace(tzinfo=UTC)
        revisions.sort(key=lambda revision: _created(revision) or oldest, reverse=True)
        live = [revision for revision in revisions if shares.get(_short(revision.name), 0) > 0]
        rest = [revision for revision in revisions if shares.get(_short(revision.name), 0) == 0]
        chosen = {id(revision) for revision in live[:limit] + rest[: max(limit - len(live), 0)]}
        return [self._release(revision, shares) for revision in revisions if id(revision) in chosen]

    async def live(self) -> str | None:
        """The revision carrying all traffic (or the largest share); None when nothing serves yet."""
        return _live(_traffic_shares(await self._get_service()))

    async def scaling(self) -> Scaling:
        """The current instance limits, CPU and memory, for a scaling plan."""
        return _scaling(await self._get_service())

    def _release(self, revision: run_v2.Revision, shares: dict[str, int]) -> Release:
        name = _short(revision.name)
        ready, status = _readiness(revision)
        percent = shares.get(name, 0)
        return Release(
            id=name,
            created_at=_created(revision),
            description=revision.containers[0].image if revision.containers else "",
            live=percent > 0,
            ready=ready,
            traffic=percent,
            status=status,
        )

    # --- changing ------------------------------------------------------------------------------

    async def rollback(self, target: str, *, expected_live: str, progress: Progress) -> str:
        """Send 100 % of traffic to ``target``, an earlier ready revision of this service."""
        name = self._revision_name(target)
        revision = await self._get_revision(name)
        owner = _short(revision.service)
        if owner and owner != self.service:
            raise DeployError(f"Revision `{name}` belongs to Cloud Run service {owner}, not {self.service}.")
        ready, status = _readiness(revision)
        if not ready:
            raise DeployError(
                f"Revision `{name}` of service {self.service} is not ready ({status}), so it cannot serve."
            )
        service = await self._get_service()
        shares = _traffic_shares(service)
        live = _live(shares)
        if live != expected_live:
            raise DeployError(
                f"Cloud Run service {self.service} changed since the plan: live is now {live or 'no revision'}, "
                f"the plan saw {expected_live}."
            )
        if shares == {name: 100}:
            return f"Cloud Run service {self.service} already sends 100 % of traffic to {name}; nothing changed"
        before = _split(shares)
        await progress(f"Routing 100 % of {self.service}'s traffic to {name} (now {before})…")
        service.traffic = _all_traffic_to(name, service.traffic)
        result = await self._update(service, ["traffic"], what="traffic change", progress=progress)
        now = _traffic_shares(result) if result.traffic_statuses else {name: 100}
        if _live(now) != name:
            raise DeployError(
                f"The traffic change of Cloud Run service {self.service} finished, "
                f"but {_split(now)} serves, not {name}."
            )
        log.info("cloudrun_rolled_back", project=self.project, service=self.service, revision=name, was=live)
        return f"Cloud Run service {self.service} now sends 100 % of traffic to {name} (was {before})"

    async def restart(self, *, progress: Progress) -> str:
        """A new revision with the live revision's spec, taking all traffic (fresh instances)."""
        service = await self._get_service()
        live = self._template_is_live(service, "restart")
        template = service.template
        template.revision = ""  # let Cloud Run name the new revision
        template.annotations[RESTARTED_AT] = datetime.now(UTC).isoformat(timespec="milliseconds")
        service.traffic = [run_v2.TrafficTarget(type_=_LATEST, percent=100)]
        await progress(f"Creating a new revision of {self.service} with the spec of {live}…")
        result = await self._update(service, ["template", "traffic"], what="restart", progress=progress)
        new = self._new_revision(result, live, "restart")
        log.info("cloudrun_restarted", project=self.project, service=self.service, revision=new, was=live)
        return (
            f"Cloud Run service {self.service} restarted: "
            f"new revision {new} (same spec as {live}) serves 100 % of traffic"
        )

    async def scale(
        self,
        min_instances: int,
        max_instances: int,
        *,
        cpu: str | None = None,
        memory: str | None = None,
        progress: Progress,
    ) -> str:
        """Set min/max instances (and CPU/memory) in the template; Cloud Run rolls out a new revision."""
        for value in (min_instances, max_instances):
            if isinstance(value, bool) or not isinstance(value, int):
                raise DeployError("instance counts are whole numbers")
        if not 0 <= min_instances <= _MAX_INSTANCES or not 1 <= max_instances <= _MAX_INSTANCES:
            raise DeployError(f"instance counts go from 0 to {_MAX_INSTANCES} (max at least 1)")
        if min_instances > max_instances:
            raise DeployError(f"min instances ({min_instances}) cannot be more than max instances ({max_instances})")
        if cpu is not None:
            _validate_cpu(cpu)
        if memory is not None:
            _validate_memory(memory)
        service = await self._get_service()
        live = self._template_is_live(service, "scaling change")
        template = service.template
        if not template.containers:
            raise DeployError(f"Cloud Run service {self.service} has no container in its template to size.")
        before = _scaling(service)
        after = Scaling(min_instances, max_instances, cpu or before.cpu, memory or before.memory)
        if after == before:
            return f"Cloud Run service {self.service} already runs with {_changes(before, after)}; nothing changed"
        template.scaling = run_v2.RevisionScaling(min_instance_count=min_instances, max_instance_count=max_instances)
        if cpu is not None or memory is not None:
            container = template.containers[0]
            if "resources" not in container:
                # Setting resources turns CPU-only-during-requests off unless cpu_idle says so.
                container.resources = run_v2.ResourceRequirements(cpu_idle=True)
            if cpu is not None:
                container.resources.limits["cpu"] = cpu
            if memory is not None:
                container.resources.limits["memory"] = memory
        template.revision = ""
        service.traffic = [run_v2.TrafficTarget(type_=_LATEST, percent=100)]
        changes = _changes(before, after)
        await progress(f"Scaling {self.service}: {changes}…")
        result = await self._update(service, ["template", "traffic"], what="scaling change", progress=progress)
        new = self._new_revision(result, live, "scaling change")
        log.info("cloudrun_scaled", project=self.project, service=self.service, revision=new, changes=changes)
        return f"Cloud Run service {self.service} scaled: {changes}; new revision {new} serves 100 % of traffic"

    def _revision_name(self, target: str) -> str:
        """A revision short name of this service, or DeployError; checked before any call."""
        text = str(target)
        if not _REVISION.fullmatch(text):
            raise DeployError(
                f"{text[:70]!r} is not a Cloud Run revision name (lowercase letters, digits and hyphens, "
                "at most 63 characters)"
            )
        if not text.startswith(f"{self.service}-"):
            raise DeployError(
                f"`{text}` is not a revision of Cloud Run service {self.service} (its names start {self.service}-)"
            )
        return text

    def _template_is_live(self, service: run_v2.Service, what: str) -> str:
        """The live revision, if the template describes it and it has all traffic; else DeployError.

        After a rollback the template still holds the newer (bad) spec: writing it would deploy that
        spec again, so a restart or scaling change is refused until the service is rolled forward.
        """
        shares = _traffic_shares(service)
        live = _live(shares)
        if live is None:
            raise DeployError(
                f"Cloud Run service {self.service} serves no revision yet, so there is nothing to {what}."
            )
        if shares[live] != 100:
            raise DeployError(
                f"Traffic of Cloud Run service {self.service} is split ({_split(shares)}); a {what} would move all "
                "of it to one new revision, so settle the split first."
            )
        created = _short(service.latest_created_revision)
        if created and created != live:
            raise DeployError(
                f"Cloud Run service {self.service} serves {live}, but its template is that of {created} (after a "
                f"rollback or a failed deploy); a {what} would deploy {created}'s spec, so roll forward first."
            )
        return live

    def _new_revision(self, result: run_v2.Service, was: str, what: str) -> str:
        new = _live(_traffic_shares(result)) or _short(result.latest_ready_revision)
        if not new or new == was:
            raise DeployError(
                f"The {what} of Cloud Run service {self.service} finished without a new revision serving."
            )
        return new

    # --- the API -------------------------------------------------------------------------------

    async def _get_service(self) -> run_v2.Service:
        services, _ = await self._clients()
        request = run_v2.GetServiceRequest(name=self._service_path)
        return await self._call(services.get_service(request=request, timeout=self._timeout), "read")

    async def _get_revision(self, name: str) -> run_v2.Revision:
        _, revisions = await self._clients()
        request = run_v2.GetRevisionRequest(name=f"{self._service_path}/revisions/{name}")
        return await self._call(
            revisions.get_revision(request=request, timeout=self._timeout),
            "read",
            not_found=f"There is no revision `{name}` of service {self.service}.",
        )

    async def _list_revisions(self) -> list[run_v2.Revision]:
        _, revisions = await self._clients()
        request = run_v2.ListRevisionsRequest(parent=self._service_path, page_size=100)

        async def collect() -> list[run_v2.Revision]:
            pager = await revisions.list_revisions(request=request, timeout=self._timeout)
            found: list[run_v2.Revision] = []
            async for revision in pager:
                found.append(revision)
                if len(found) >= MAX_REVISIONS_READ:
                    break
            return found

        return await self._call(collect(), "list the revisions of")

    async def _update(
        self, service: run_v2.Service, paths: list[str], *, what: str, progress: Progress
    ) -> run_v2.Service:
        """UpdateService with ``paths`` as the mask (and the etag read, so a concurrent change fails),
        then wait for its operation."""
        services, _ = await self._clients()
        request = run_v2.UpdateServiceRequest(service=service, update_mask=field_mask_pb2.FieldMask(paths=paths))
        operation: Any = await self._call(  # an untyped google.api_core AsyncOperation
            services.update_service(request=request, timeout=self._timeout), "update"
        )
        return await self._wait(operation, what, progress)

    async def _wait(self, operation: Any, what: str, progress: Progress) -> run_v2.Service:
        """Poll the long-running operation until done, within the operation timeout."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self._operation_timeout
        noted = started
        lost = f"Cloud Run lost track of the {what} of service {self.service}; check the service before retrying."
        while not await self._call(operation.done(), "follow the update of", not_found=lost):
            now = loop.time()
            if now + self._poll_every > deadline:
                raise DeployError(
                    f"The {what} of Cloud Run service {self.service} did not finish within "
                    f"{_seconds(self._operation_timeout)}; Cloud Run may still be working on it."
                )
            if now - noted >= 15:
                noted = now
                await progress(f"Cloud Run is still working on the {what} ({now - started:.0f} s)…")
            await asyncio.sleep(self._poll_every)
        try:
            result: run_v2.Service = await operation.result(timeout=self._timeout)
        except api_exceptions.GoogleAPICallError as exc:
            reason = " ".join(str(exc.message).split())[:300] or type(exc).__name__
            log.warning("cloudrun_operation_failed", service=self.service, what=what, error=reason)
            raise DeployError(f"The {what} of Cloud Run service {self.service} failed: {reason}") from None
        await progress(f"Cloud Run finished the {what} in {loop.time() - started:.0f} s.")
        return result

    async def _call(self, call: Awaitable[T], doing: str, *, not_found: str | None = None) -> T:
        """Await one API call within the timeout; every failure becomes one plain DeployError."""
        try:
            return await asyncio.wait_for(call, self._timeout)
        except TimeoutError:
            raise DeployError(
                f"The Cloud Run Admin API did not answer within {_seconds(self._timeout)} for service {self.service}."
            ) from None
        except api_exceptions.GoogleAPIError as exc:
            raise self._api_error(exc, doing, not_found) from None

    def _api_error(self, exc: api_exceptions.GoogleAPIError, doing: str, not_found: str | None) -> DeployError:
        name = self.service
        code = getattr(exc, "grpc_status_code", None)
        log.warning("cloudrun_api_error", service=name, error=type(exc).__name__, code=str(code))
        message = " ".join(str(getattr(exc, "message", "")).split())[:200]
        if isinstance(exc, api_exceptions.NotFound):
            return DeployError(not_found or f"There is no Cloud Run service {name} in {self.region} ({self.project}).")
        if isinstance(exc, api_exceptions.PermissionDenied | api_exceptions.Unauthenticated):
            return DeployError(f"The bot's Google credentials may not {doing} Cloud Run service {name}.")
        if isinstance(exc, api_exceptions.DeadlineExceeded):
            return DeployError(
                f"The Cloud Run Admin API did not answer within {_seconds(self._timeout)} for service {name}."
            )
        if isinstance(exc, api_exceptions.ServiceUnavailable | api_exceptions.RetryError):
            reason = network_problem(exc) or "unavailable"
            return DeployError(
                f"Could not reach the Cloud Run Admin API for service {name} ({reason}); try again later."
            )
        if isinstance(exc, api_exceptions.Aborted):
            return DeployError(f"Cloud Run service {name} was changed by someone else meanwhile; plan again.")
        if isinstance(exc, api_exceptions.ResourceExhausted):
            return DeployError(
                f"The Cloud Run Admin API is rate-limiting the bot (service {name}); try again in a minute."
            )
        if isinstance(
            exc, api_exceptions.FailedPrecondition | api_exceptions.InvalidArgument | api_exceptions.AlreadyExists
        ):
            detail = f": {message}" if message else ""
            return DeployError(f"Cloud Run refused to {doing} service {name}{detail}")
        return DeployError(f"The Cloud Run Admin API failed ({type(exc).__name__}) for service {name}.")

    async def _clients(self) -> tuple[run_v2.ServicesAsyncClient, run_v2.RevisionsAsyncClient]:
        """The two API clients, made on first use (default credentials unless a channel is given)."""
        async with self._lock:
            if self._services is None or self._revisions is None:
                if self._channel_factory is not None:
                    services = run_v2.ServicesAsyncClient(
                        transport=ServicesGrpcAsyncIOTransport(channel=self._channel_factory())
                    )
                    revisions = run_v2.RevisionsAsyncClient(
                        transport=RevisionsGrpcAsyncIOTransport(channel=self._channel_factory())
                    )
                else:
                    credentials = await self._default_credentials()
                    services = run_v2.ServicesAsyncClient(credentials=credentials)
                    revisions = run_v2.RevisionsAsyncClient(credentials=credentials)
                self._services, self._revisions = services, revisions
            return self._services, self._revisions

    async def _default_credentials(self) -> Any:
        """Application Default Credentials, looked up in a thread: google-auth blocks (file, metadata
        server). Its messages may quote credential files, so only the kind of failure is told."""
        import google.auth
        import google.auth.exceptions

        try:
            credentials, _ = await asyncio.wait_for(
                asyncio.to_thread(google.auth.default, scopes=[SCOPE]), self._timeout
            )
        except TimeoutError:
            raise DeployError(
                f"Could not find Google credentials for Cloud Run service {self.service} "
                f"within {_seconds(self._timeout)}."
            ) from None
        except google.auth.exceptions.GoogleAuthError as exc:
            log.warning("google_credentials_failed", error=type(exc).__name__)
            raise DeployError(
                f"The bot has no usable Google credentials for Cloud Run service {self.service} ({type(exc).__name__})."
            ) from None
        return credentials

    async def close(self) -> None:
        """Close both clients' channels (the clients are made again if used afterwards)."""
        async with self._lock:
            clients: list[Any] = [client for client in (self._services, self._revisions) if client is not None]
            self._services = self._revisions = None
        for client in clients:
            await client.transport.close()

    async def __aenter__(self) -> CloudRunProvider:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
