"""Cloud SQL managed backups through the Cloud SQL Admin API (runbook 000): list, create, restore.

Cloud SQL keeps these backups itself, so nothing streams through the bot: it asks the API for a
backup run or a restore and waits for the long-running operation. Plain REST (sqladmin v1) over
the bot's shared aiohttp session keeps this to one small module with its own timeouts, and lets
the tests point it at a fake on loopback.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import aiohttp
import structlog

from services.backup.base import BackupError
from services.clients import read_json
from services.failures import network_problem
from services.redaction import Redactor

log = structlog.get_logger(__name__)

SCOPE = "https://www.googleapis.com/auth/sqlservice.admin"
API_URL = "https://sqladmin.googleapis.com"

# Project ids are lowercase letters, digits and hyphens, optionally domain-scoped
# ("example.com:my-project"); instance names are lowercase letters, digits and hyphens.
_PROJECT = re.compile(r"(?:[a-z0-9][a-z0-9.-]{0,61}[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
_INSTANCE = re.compile(r"[a-z][a-z0-9-]{0,97}")
_BACKUP_RUN_ID = re.compile(r"[0-9]{1,19}")  # int64, sent as a string in JSON
_OPERATION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_INT64_MAX = 2**63 - 1

Progress = Callable[[str], Awaitable[None]]


class TokenProvider(Protocol):
    """Gives an OAuth access token for the Cloud SQL Admin API."""

    async def token(self) -> str: ...


class StaticToken:
    """A token given as is (from the environment, or a test)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self) -> str:
        return self._token

    def __repr__(self) -> str:
        return "StaticToken(***)"


class GoogleDefaultToken:
    """Application Default Credentials (the Cloud Run service account, GOOGLE_APPLICATION_CREDENTIALS),
    refreshed in a thread because google-auth is blocking, and reused until shortly before expiry."""

    def __init__(self, *, timeout: float = 30.0, margin: float = 300.0) -> None:
        self._timeout = timeout
        self._margin = timedelta(seconds=margin)
        self._credentials: Any = None
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        async with self._lock:
            if not self._fresh():
                try:
                    await asyncio.wait_for(asyncio.to_thread(self._refresh), self._timeout)
                except TimeoutError:
                    raise BackupError(f"could not get a Google access token within {self._timeout:g} s") from None
                except Exception as exc:
                    # google-auth's messages may quote credential files; name the kind only.
                    log.warning("google_token_failed", error=type(exc).__name__)
                    raise BackupError(
                        f"could not get a Google access token for Cloud SQL ({type(exc).__name__})"
                    ) from None
            return str(self._credentials.token)

    def _fresh(self) -> bool:
        credentials = self._credentials
        if credentials is None or not credentials.token:
            return False
        expiry: datetime | None = credentials.expiry  # naive UTC, as google-auth keeps it
        if expiry is None:
            return True
        return expiry - self._margin > datetime.now(UTC).replace(tzinfo=None)

    def _refresh(self) -> None:
        import google.auth
        import google.auth.transport.requests

        if self._credentials is None:
            self._credentials, _ = google.auth.default(scopes=[SCOPE])
        request = google.auth.transport.requests.Request()
        try:
            self._credentials.refresh(request)
        finally:
            request.session.close()


@dataclass(frozen=True)
class BackupRun:
    """One backup run of a Cloud SQL instance, as the Admin API reports it."""

    id: str
    status: str  # SUCCESSFUL, RUNNING, ENQUEUED, FAILED, SKIPPED, DELETED, …
    type: str  # ON_DEMAND, AUTOMATED, FINAL
    start_time: datetime | None = None
    end_time: datetime | None = None
    enqueued_time: datetime | None = None
    description: str = ""
    location: str = ""
    error: str | None = None

    @classmethod
    def from_api(cls, item: Mapping[str, Any]) -> BackupRun:
        """Parse the API's ``BackupRun`` JSON (ids are int64 sent as strings)."""
        error = item.get("error")
        message = None
        if isinstance(error, Mapping):
            message = str(error.get("message") or error.get("code") or "") or None
        return cls(
            id=str(item.get("id", "")),
            status=str(item.get("status", "SQL_BACKUP_RUN_STATUS_UNSPECIFIED")),
            type=str(item.get("type", "")),
            start_time=_timestamp(item.get("startTime")),
            end_time=_timestamp(item.get("endTime")),
            enqueued_time=_timestamp(item.get("enqueuedTime")),
            description=str(item.get("description", "")),
            location=str(item.get("location", "")),
            error=message,
        )

    @property
    def started(self) -> datetime | None:
        """When the run began: its start, or when it was queued if it has not started."""
        return self.start_time or self.enqueued_time


def _timestamp(value: object) -> datetime | None:
    """An RFC 3339 timestamp ("2012-11-15T16:19:00.094Z") as an aware datetime, or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _validate_backup_run_id(value: str) -> str:
    text = str(value).strip()
    if not _BACKUP_RUN_ID.fullmatch(text) or int(text) > _INT64_MAX:
        raise BackupError(f"{str(value)[:40]!r} is not a Cloud SQL backup run id (a number such as 1700000000000)")
    return text


def _google_message(payload: object) -> str:
    """The message of Google's error JSON ``{"error": {"code", "message", "errors": [...]}}``."""
    if isinstance(payload, Mapping):
        error = payload.get("error")
        if isinstance(error, Mapping) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return ""


def _operation_errors(operation: Mapping[str, Any]) -> str | None:
    """The messages of a finished operation's ``error.errors[]``, or None when it succeeded."""
    error = operation.get("error")
    if not isinstance(error, Mapping):
        return None
    items = error.get("errors")
    if not isinstance(items, list) or not items:
        return None
    texts = []
    for item in items:
        if isinstance(item, Mapping):
            texts.append(str(item.get("message") or item.get("code") or "unknown error"))
    return "; ".join(texts) or "unknown error"


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.0f} min"


class CloudSqlAdmin:
    """The managed backups of one Cloud SQL instance, through the Cloud SQL Admin API v1."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        project: str,
        instance: str,
        *,
        tokens: TokenProvider,
        api_url: str = API_URL,
        timeout: float = 30.0,
        poll_every: float = 2.0,
        operation_timeout: float = 1800.0,
    ) -> None:
        if not _PROJECT.fullmatch(project):
            raise BackupError(f"{project[:80]!r} is not a Google Cloud project id")
        if not _INSTANCE.fullmatch(instance):
            raise BackupError(f"{instance[:80]!r} is not a Cloud SQL instance name")
        self._session = session
        self.project = project
        self.instance = instance
        self._tokens = tokens
        self._api_url = api_url.rstrip("/")
        self._timeout = timeout
        self._client_timeout = aiohttp.ClientTimeout(total=timeout)
        self._poll_every = poll_every
        self._operation_timeout = operation_timeout

    def describe(self) -> str:
        return f"Cloud SQL instance {self.project}:{self.instance}"

    @property
    def _instance_path(self) -> str:
        return f"/v1/projects/{self.project}/instances/{self.instance}"

    async def list_backups(self, limit: int = 20) -> list[BackupRun]:
        """The most recent backup runs, newest first."""
        if not 1 <= limit <= 1000:
            raise BackupError("ask for between 1 and 1000 backup runs")
        payload = await self._call(
            "GET",
            f"{self._instance_path}/backupRuns",
            params={"maxResults": str(limit)},
            not_found=f"{self.describe()} was not found",
        )
        items = payload.get("items") or []
        runs = [BackupRun.from_api(item) for item in items if isinstance(item, Mapping)]
        # The API promises reverse chronological order; sorting again costs nothing and keeps
        # "newest first" true whatever the server does.
        oldest = datetime.min.replace(tzinfo=UTC)
        runs.sort(key=lambda run: run.started or oldest, reverse=True)
        return runs[:limit]

    async def get_backup(self, backup_run_id: str) -> BackupRun:
        """One backup run of this instance."""
        run_id = _validate_backup_run_id(backup_run_id)
        payload = await self._call(
            "GET",
            f"{self._instance_path}/backupRuns/{run_id}",
            not_found=f"backup run {run_id} was not found on {self.describe()}",
        )
        return BackupRun.from_api(payload)

    async def create_backup(self, description: str, *, progress: Progress | None = None) -> BackupRun:
        """Take an on-demand backup, wait for it to finish and return its run."""
        if len(description) > 500:
            raise BackupError("a backup description is at most 500 characters")
        started: Mapping[str, Any] = await self._call(
            "POST",
            f"{self._instance_path}/backupRuns",
            body={"description": description},
            not_found=f"{self.describe()} was not found",
        )
        operation = await self._wait(started, "on-demand backup", progress)
        context = operation.get("backupContext")
        backup_id = context.get("backupId") if isinstance(context, Mapping) else None
        if backup_id is not None and _BACKUP_RUN_ID.fullmatch(str(backup_id)):
            return await self.get_backup(str(backup_id))
        # Older answers carry no backupContext: the newest on-demand run with our description is ours.
        for run in await self.list_backups(limit=10):
            if run.type == "ON_DEMAND" and run.description == description:
                return run
        raise BackupError(f"the backup finished but its run was not found on {self.describe()}")

    async def restore(self, backup_run_id: str, *, progress: Progress | None = None) -> str:
        """Overwrite the instance's data with a backup run of its own; return a one-line summary.

        The run is looked up first, so a mistyped id or an unfinished run is refused before the
        destructive call is made.
        """
        run = await self.get_backup(backup_run_id)
        if run.status != "SUCCESSFUL":
            raise BackupError(f"backup run {run.id} is {run.status}; only a SUCCESSFUL run can be restored")
        started = asyncio.get_running_loop().time()
        operation = await self._call(
            "POST",
            f"{self._instance_path}/restoreBackup",
            body={
                "restoreBackupContext": {"backupRunId": run.id, "project": self.project, "instanceId": self.instance}
            },
            not_found=f"backup run {run.id} was not found on {self.describe()}",
        )
        await self._wait(operation, f"restore of backup run {run.id}", progress)
        took = asyncio.get_running_loop().time() - started
        taken = f" taken {run.started:%Y-%m-%d %H:%M} UTC" if run.started else ""
        log.info("cloudsql_restored", project=self.project, instance=self.instance, backup_run=run.id)
        return f"restored {self.describe()} from backup run {run.id}{taken} in {_seconds(took)}"

    async def _wait(self, operation: Mapping[str, Any], what: str, progress: Progress | None) -> Mapping[str, Any]:
        """Poll an operation until DONE; raise BackupError with the API's message if it failed."""
        name = str(operation.get("name", ""))
        if not _OPERATION.fullmatch(name):
            raise BackupError(f"the Cloud SQL Admin API started the {what} but gave no usable operation name")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._operation_timeout
        reported = ""
        while True:
            status = str(operation.get("status", "SQL_OPERATION_STATUS_UNSPECIFIED"))
            if progress is not None and status != reported:
                await progress(f"{what} on {self.describe()}: {status.lower()}")
            reported = status
            if status == "DONE":
                break
            if loop.time() + self._poll_every > deadline:
                raise BackupError(
                    f"the {what} did not finish within {_seconds(self._operation_timeout)}; "
                    f"Cloud SQL operation {name} may still be running"
                )
            await asyncio.sleep(self._poll_every)
            operation = await self._call(
                "GET",
                f"/v1/projects/{self.project}/operations/{name}",
                not_found=f"Cloud SQL operation {name} was not found",
            )
        failure = _operation_errors(operation)
        if failure is not None:
            raise BackupError(f"the {what} failed on {self.describe()}: {failure[:300]}")
        return operation

    async def _call(
        self,
        method: str,
        path: str,
        *,
        not_found: str,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One API request: JSON in and out, one retry on 429/5xx, every failure one sentence."""
        # A POST that failed with 500 may have been carried out; repeat only what Google marks as
        # not processed (429, 503), while reads are always safe to repeat.
        retryable = {429, 500, 502, 503, 504} if method == "GET" else {429, 503}
        for attempt in (1, 2):
            token = await self._tokens.token()
            headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
            try:
                async with self._session.request(
                    method,
                    self._api_url + path,
                    params=params,
                    json=body,
                    headers=headers,
                    timeout=self._client_timeout,
                    allow_redirects=False,
                ) as response:
                    status = response.status
                    payload = await read_json(
                        response, lambda mib: BackupError(f"the Cloud SQL Admin API answered more than {mib} MiB")
                    )
            except TimeoutError:
                raise BackupError(f"the Cloud SQL Admin API did not answer within {self._timeout:g} s") from None
            except (aiohttp.ClientError, OSError) as exc:
                reason = network_problem(exc) or type(exc).__name__
                raise BackupError(f"could not reach the Cloud SQL Admin API ({reason})") from None
            if status < 300:
                if not isinstance(payload, dict):
                    raise BackupError("the Cloud SQL Admin API answered something that is not a JSON object")
                return payload
            if status in retryable and attempt == 1:
                log.info("cloudsql_retry", status=status, path=path)
                await asyncio.sleep(min(self._poll_every, 1.0))
                continue
            message = Redactor([token]).redact(_google_message(payload))[:300]
            raise self._http_error(status, message, not_found)
        raise AssertionError("unreachable")  # pragma: no cover

    def _http_error(self, status: int, message: str, not_found: str) -> BackupError:
        where = f"{self.project}:{self.instance}"
        if status in (401, 403):
            return BackupError(f"the bot's Google credentials may not manage Cloud SQL instance {where}")
        if status == 404:
            return BackupError(not_found)
        if status == 409:
            return BackupError(f"another operation is in progress on Cloud SQL instance {where}; try again later")
        if status == 429:
            return BackupError("the Cloud SQL Admin API is rate-limiting the bot; try again in a minute")
        if status >= 500:
            return BackupError(f"the Cloud SQL Admin API failed ({status}) twice; try again later")
        detail = f": {message}" if message else ""
        return BackupError(f"the Cloud SQL Admin API refused the request ({status}){detail}")
