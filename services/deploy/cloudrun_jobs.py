"""Cloud Run Jobs (runbook 000): execute a job, follow its execution, list and delete executions.

``gcloud run jobs execute vcbl-chatbot-migrate --wait`` as an API: RunJob answers a long-running
operation at once, whose metadata is the new Execution. The operation only finishes with the
execution, so it is not waited on blindly: the execution named in its metadata is read again every
few seconds (GetExecution) within a timeout, and its task counts (running, succeeded, failed,
cancelled) are reported as progress. The same client runs a job with per-execution overrides
(container args and env: a one-time value passed to the app's own job) and deletes an execution
afterwards, since overrides stay readable in it.

It talks to the Cloud Run Admin API v2 through google-cloud-run's async clients (gRPC only); the
channel is injectable so the tests run the real clients against a grpc.aio fake.

Permissions: run.jobs.get (read the job), run.executions.list / run.executions.get (follow and list
executions), run.jobs.run (execute), run.jobs.runWithOverrides (execute with overrides),
run.executions.delete (delete an execution). Roles: roles/run.viewer reads; roles/run.invoker or
roles/run.developer executes.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, TypeVar

import grpc
import structlog
from google.api_core import exceptions as api_exceptions
from google.cloud import run_v2
from google.cloud.run_v2.services.executions.transports.grpc_asyncio import ExecutionsGrpcAsyncIOTransport
from google.cloud.run_v2.services.jobs.transports.grpc_asyncio import JobsGrpcAsyncIOTransport
from google.protobuf import duration_pb2  # type: ignore[import-untyped]  # no stubs installed

from services.deploy.base import DeployError, Progress
from services.failures import network_problem

log = structlog.get_logger(__name__)

T = TypeVar("T")
ChannelFactory = Callable[[], grpc.aio.Channel]
Outcome = Literal["running", "succeeded", "failed", "cancelled"]

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
MAX_EXECUTIONS_READ = 200
"""Executions read at most when looking for running ones and the newest (Cloud Run keeps up to 1000)."""
LOGS_LINK = "https://console.cloud.google.com/run/jobs/executions/details/{region}/{execution}/logs?project={project}"

_PROJECT = re.compile(r"(?:[a-z0-9][a-z0-9.-]{0,61}[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
_REGION = re.compile(r"[a-z]{2,}-[a-z]+[0-9]{1,2}")
_JOB = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
_EXECUTION = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_State = run_v2.Condition.State


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _seconds(value: float) -> str:
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def _time(execution: run_v2.Execution, name: str) -> datetime | None:
    raw = run_v2.Execution.pb(execution)
    if not raw.HasField(name):
        return None
    moment: datetime = getattr(raw, name).ToDatetime(tzinfo=UTC)
    return moment


@dataclass(frozen=True)
class JobOverrides:
    """What one execution changes of the job's template. Values are secret-safe: never logged, never in
    a repr or an error (only the names of the env vars are)."""

    args: tuple[str, ...] | None = field(default=None, repr=False)
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    container: str = ""
    """The container overridden (empty: the job's only container)."""
    task_count: int | None = None
    timeout_seconds: int | None = None

    def request(self) -> run_v2.RunJobRequest.Overrides:
        for name in self.env:
            if not _ENV_NAME.fullmatch(name):
                raise DeployError(f"{name[:40]!r} is not an environment variable name")
        if self.task_count is not None and not 1 <= self.task_count <= 10000:
            raise DeployError("an execution has from 1 to 10000 tasks")
        if self.timeout_seconds is not None and not 1 <= self.timeout_seconds <= 7 * 86400:
            raise DeployError("a task timeout goes from 1 s to 7 days")
        container = run_v2.RunJobRequest.Overrides.ContainerOverride(
            name=self.container,
            env=[run_v2.EnvVar(name=name, value=value) for name, value in self.env.items()],
        )
        if self.args is not None:
            container.args = list(self.args)
            container.clear_args = not self.args
        overrides = run_v2.RunJobRequest.Overrides(container_overrides=[container])
        if self.task_count is not None:
            overrides.task_count = self.task_count
        if self.timeout_seconds is not None:
            overrides.timeout = duration_pb2.Duration(seconds=self.timeout_seconds)
        return overrides


@dataclass(frozen=True)
class JobExecution:
    """One execution of a Cloud Run job, as Cloud Run reports it now."""

    name: str
    job: str
    created_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    task_count: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    retried: int
    outcome: Outcome
    reason: str = ""

    @property
    def finished(self) -> bool:
        return self.completed_at is not None

    def duration(self, now: datetime | None = None) -> float | None:
        """Seconds from start (or creation) to completion, or to ``now`` while it runs."""
        begin = self.started_at or self.created_at
        end = self.completed_at or now
        if begin is None or end is None:
            return None
        return max((end - begin).total_seconds(), 0.0)

    def took(self, now: datetime | None = None) -> str:
        seconds = self.duration(now)
        return "?" if seconds is None else _seconds(seconds)

    def tasks(self) -> str:
        """``1 running, 0 succeeded, 0 failed, 0 cancelled of 1 task(s)`` (retries when there were some)."""
        retried = f", {self.retried} retried" if self.retried else ""
        return (
            f"{self.running} running, {self.succeeded} succeeded, {self.failed} failed, "
            f"{self.cancelled} cancelled of {self.task_count} task(s){retried}"
        )

    @classmethod
    def of(cls, execution: run_v2.Execution) -> JobExecution:
        outcome, reason = _outcome(execution)
        return cls(
            name=_short(execution.name),
            job=_short(execution.job),
            created_at=_time(execution, "create_time"),
            started_at=_time(execution, "start_time"),
            completed_at=_time(execution, "completion_time"),
            task_count=execution.task_count,
            running=execution.running_count,
            succeeded=execution.succeeded_count,
            failed=execution.failed_count,
            cancelled=execution.cancelled_count,
            retried=execution.retried_count,
            outcome=outcome,
            reason=reason,
        )


def _outcome(execution: run_v2.Execution) -> tuple[Outcome, str]:
    """What became of the execution: its Completed condition, else its task counts."""
    raw = run_v2.Execution.pb(execution)
    if not raw.HasField("completion_time"):
        return "running", ""
    completed = next((c for c in execution.conditions if c.type_ == "Completed"), None)
    reason = " ".join(completed.message.split())[:300] if completed is not None else ""
    if execution.cancelled_count and not execution.failed_count:
        return "cancelled", reason
    if completed is not None and completed.state == _State.CONDITION_SUCCEEDED:
        return "succeeded", reason
    if completed is None and execution.succeeded_count >= execution.task_count and not execution.failed_count:
        return "succeeded", reason
    return "failed", reason


class CloudRunJob:
    """One Cloud Run job and its executions, through the Cloud Run Admin API v2."""

    def __init__(
        self,
        project: str,
        region: str,
        job: str,
        *,
        timeout: float = 30.0,
        poll_every: float = 5.0,
        channel_factory: ChannelFactory | None = None,
    ) -> None:
        if not _PROJECT.fullmatch(project):
            raise DeployError(f"{project[:80]!r} is not a Google Cloud project id")
        if not _REGION.fullmatch(region):
            raise DeployError(f"{region[:80]!r} is not a Cloud Run region such as asia-northeast3")
        if not _JOB.fullmatch(job):
            raise DeployError(f"{job[:80]!r} is not a Cloud Run job name")
        self.project = project
        self.region = region
        self.job = job
        self._timeout = timeout
        self._poll_every = poll_every
        self._channel_factory = channel_factory
        self._jobs: run_v2.JobsAsyncClient | None = None
        self._executions: run_v2.ExecutionsAsyncClient | None = None
        self._lock = asyncio.Lock()

    def describe(self) -> str:
        return f"Cloud Run job {self.job} in {self.region} ({self.project})"

    @property
    def path(self) -> str:
        return f"projects/{self.project}/locations/{self.region}/jobs/{self.job}"

    def logs_link(self, execution: str) -> str:
        """The Cloud Console page with the execution's logs."""
        return LOGS_LINK.format(region=self.region, execution=execution, project=self.project)

    # --- reading -------------------------------------------------------------------------------

    async def check(self) -> str:
        """The job's image, once the job is found and the bot may read it; else one DeployError sentence."""
        jobs, _ = await self._clients()
        request = run_v2.GetJobRequest(name=self.path)
        job = await self._call(jobs.get_job(request=request, timeout=self._timeout), "read", "run.jobs.get")
        containers = job.template.template.containers
        return str(containers[0].image) if containers else ""

    async def executions(self, limit: int = 10) -> list[JobExecution]:
        """The newest ``limit`` executions of the job, newest first."""
        if not 1 <= limit <= 100:
            raise DeployError("ask for between 1 and 100 executions")
        return (await self._list_executions())[:limit]

    async def running(self) -> list[JobExecution]:
        """Executions of the job that have not completed, newest first."""
        return [execution for execution in await self._list_executions() if not execution.finished]

    async def execution(self, name: str) -> JobExecution:
        """One execution of this job, as it is now."""
        return JobExecution.of(await self._get_execution(self._execution_name(name)))

    # --- changing ------------------------------------------------------------------------------

    async def start(self, overrides: JobOverrides | None = None, *, refuse_running: bool = True) -> JobExecution:
        """Execute the job (once no execution of it is running) and return the new execution, without
        waiting for it; its name comes from the operation's metadata."""
        if refuse_running and (running := await self.running()):
            raise DeployError(self.already_running(running[0]))
        request = run_v2.RunJobRequest(name=self.path)
        permission = "run.jobs.run"
        if overrides is not None:
            request.overrides = overrides.request()
            permission = "run.jobs.runWithOverrides"
        jobs, _ = await self._clients()
        operation: Any = await self._call(  # an untyped google.api_core AsyncOperation
            jobs.run_job(request=request, timeout=self._timeout), "execute", permission, quiet=overrides is not None
        )
        execution = await self._started(operation)
        log.info("cloudrun_job_started", project=self.project, job=self.job, execution=execution.name,
                 overrides=sorted(overrides.env) if overrides is not None else None)  # fmt: skip
        return execution

    def already_running(self, execution: JobExecution) -> str:
        started = execution.started_at or execution.created_at
        when = f" since {started:%Y-%m-%d %H:%M} UTC" if started else ""
        return (
            f"Execution `{execution.name}` of Cloud Run job {self.job} is still running{when} "
            f"({execution.tasks()}); wait for it to finish."
        )

    async def follow(self, name: str, *, timeout: float, progress: Progress) -> JobExecution:  # noqa: ASYNC109
        """Read the execution every few seconds until it completes, reporting its task counts; within
        ``timeout`` seconds, else DeployError (the execution is left running, never cancelled)."""
        name = self._execution_name(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            execution = JobExecution.of(await self._get_execution(name, following=True))
            if execution.finished:
                return execution
            counts = execution.tasks()
            # Every read is a note; whoever shows them decides how often (Slack edits are throttled).
            await progress(f"`{name}`: {counts} ({execution.took(datetime.now(UTC))} so far)…")
            if loop.time() + self._poll_every > deadline:
                raise DeployError(
                    f"Execution `{name}` of Cloud Run job {self.job} did not finish within {_seconds(timeout)} "
                    f"({counts}); it may still be running: {self.logs_link(name)}"
                )
            await asyncio.sleep(self._poll_every)

    async def run(
        self,
        *,
        timeout: float,  # noqa: ASYNC109
        progress: Progress,
        overrides: JobOverrides | None = None,
    ) -> JobExecution:
        """Execute the job and follow the execution until it completes (or the timeout)."""
        started = await self.start(overrides)
        await progress(f"Started execution `{started.name}` of Cloud Run job {self.job}.")
        return await self.follow(started.name, timeout=timeout, progress=progress)

    async def delete_execution(self, name: str) -> None:
        """Delete a finished execution (its overrides stay readable in it until then)."""
        name = self._execution_name(name)
        _, executions = await self._clients()
        request = run_v2.DeleteExecutionRequest(name=f"{self.path}/executions/{name}")
        operation: Any = await self._call(
            executions.delete_execution(request=request, timeout=self._timeout),
            "delete an execution of", "run.executions.delete",
            not_found=f"There is no execution `{name}` of Cloud Run job {self.job}.",
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        while not await self._call(operation.done(), "delete an execution of", "run.executions.delete"):
            if loop.time() + self._poll_every > deadline:
                raise DeployError(
                    f"Cloud Run did not finish deleting execution `{name}` of job {self.job} "
                    f"within {_seconds(self._timeout)}."
                )
            await asyncio.sleep(self._poll_every)
        raw = operation.operation
        if raw.HasField("error") and raw.error.code:
            reason = " ".join(raw.error.message.split())[:200]
            raise DeployError(f"Cloud Run could not delete execution `{name}` of job {self.job}: {reason}")
        log.info("cloudrun_execution_deleted", project=self.project, job=self.job, execution=name)

    # --- the API -------------------------------------------------------------------------------

    def _execution_name(self, name: str) -> str:
        short = _short(str(name))
        if not _EXECUTION.fullmatch(short) or not short.startswith(f"{self.job}-"):
            raise DeployError(f"{short[:70]!r} is not an execution of Cloud Run job {self.job}")
        return short

    async def _started(self, operation: Any) -> JobExecution:
        """The execution an operation started: its metadata, read again until it names one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        while True:
            raw = operation.operation
            if raw.done and raw.HasField("error") and raw.error.code:
                reason = " ".join(raw.error.message.split())[:300] or "no reason given"
                log.warning("cloudrun_job_not_started", job=self.job, code=raw.error.code)
                raise DeployError(f"Cloud Run could not execute job {self.job}: {reason}")
            metadata = operation.metadata
            if metadata is not None and metadata.name:
                return JobExecution.of(metadata)
            if loop.time() + self._poll_every > deadline:
                raise DeployError(
                    f"Cloud Run accepted the execution of job {self.job} but did not name it within "
                    f"{_seconds(self._timeout)}; check its executions before running it again."
                )
            await asyncio.sleep(self._poll_every)
            await self._call(operation.done(), "follow the execution of", "run.operations.get")

    async def _get_execution(self, name: str, *, following: bool = False) -> run_v2.Execution:
        _, executions = await self._clients()
        request = run_v2.GetExecutionRequest(name=f"{self.path}/executions/{name}")
        lost = f"Execution `{name}` of Cloud Run job {self.job} is gone (deleted while it ran?)."
        return await self._call(
            executions.get_execution(request=request, timeout=self._timeout),
            "read the executions of", "run.executions.get",
            not_found=lost if following else f"There is no execution `{name}` of Cloud Run job {self.job}.",
            running=name if following else None,
        )  # fmt: skip

    async def _list_executions(self) -> list[JobExecution]:
        _, executions = await self._clients()
        request = run_v2.ListExecutionsRequest(parent=self.path, page_size=100)

        async def collect() -> list[run_v2.Execution]:
            pager = await executions.list_executions(request=request, timeout=self._timeout)
            found: list[run_v2.Execution] = []
            async for execution in pager:
                found.append(execution)
                if len(found) >= MAX_EXECUTIONS_READ:
                    break
            return found

        listed = await self._call(collect(), "list the executions of", "run.executions.list")
        oldest = datetime.min.replace(tzinfo=UTC)
        found = [JobExecution.of(execution) for execution in listed]
        found.sort(key=lambda execution: execution.created_at or oldest, reverse=True)
        return found

    async def _call(
        self,
        call: Awaitable[T],
        doing: str,
        permission: str,
        *,
        not_found: str | None = None,
        running: str | None = None,
        quiet: bool = False,
    ) -> T:
        """Await one API call within the timeout; every failure becomes one plain DeployError. While
        following ``running``, the sentence says the execution may still be running. ``quiet``: the
        API's own words are left out (a refusal of overrides may quote their values)."""
        still = f"; execution `{running}` may still be running" if running else ""
        try:
            return await asyncio.wait_for(call, self._timeout)
        except TimeoutError:
            raise DeployError(
                f"The Cloud Run Admin API did not answer within {_seconds(self._timeout)} for job {self.job}{still}."
            ) from None
        except api_exceptions.GoogleAPIError as exc:
            raise self._api_error(exc, doing, permission, not_found, still, quiet=quiet) from None

    def _api_error(
        self,
        exc: api_exceptions.GoogleAPIError,
        doing: str,
        permission: str,
        not_found: str | None,
        still: str,
        *,
        quiet: bool = False,
    ) -> DeployError:
        job = self.job
        code = getattr(exc, "grpc_status_code", None)
        log.warning("cloudrun_jobs_api_error", job=job, error=type(exc).__name__, code=str(code))
        message = "" if quiet else " ".join(str(getattr(exc, "message", "")).split())[:200]
        if isinstance(exc, api_exceptions.NotFound):
            return DeployError(not_found or f"There is no Cloud Run job {job} in {self.region} ({self.project}).")
        if isinstance(exc, api_exceptions.PermissionDenied | api_exceptions.Unauthenticated):
            return DeployError(
                f"The bot's Google credentials may not {doing} Cloud Run job {job} (it needs {permission}){still}."
            )
        if isinstance(exc, api_exceptions.DeadlineExceeded):
            return DeployError(
                f"The Cloud Run Admin API did not answer within {_seconds(self._timeout)} for job {job}{still}."
            )
        if isinstance(exc, api_exceptions.ServiceUnavailable | api_exceptions.RetryError):
            reason = network_problem(exc) or "unavailable"
            return DeployError(f"Could not reach the Cloud Run Admin API for job {job} ({reason}){still}.")
        if isinstance(exc, api_exceptions.ResourceExhausted):
            return DeployError(f"The Cloud Run Admin API is rate-limiting the bot (job {job}){still}.")
        if isinstance(
            exc, api_exceptions.FailedPrecondition | api_exceptions.InvalidArgument | api_exceptions.AlreadyExists
        ):
            detail = f": {message}" if message else ""
            return DeployError(f"Cloud Run refused to {doing} job {job}{detail}")
        return DeployError(f"The Cloud Run Admin API failed ({type(exc).__name__}) for job {job}{still}.")

    async def _clients(self) -> tuple[run_v2.JobsAsyncClient, run_v2.ExecutionsAsyncClient]:
        """The two API clients, made on first use (default credentials unless a channel is given)."""
        async with self._lock:
            if self._jobs is None or self._executions is None:
                if self._channel_factory is not None:
                    jobs = run_v2.JobsAsyncClient(transport=JobsGrpcAsyncIOTransport(channel=self._channel_factory()))
                    executions = run_v2.ExecutionsAsyncClient(
                        transport=ExecutionsGrpcAsyncIOTransport(channel=self._channel_factory())
                    )
                else:
                    credentials = await self._default_credentials()
                    jobs = run_v2.JobsAsyncClient(credentials=credentials)
                    executions = run_v2.ExecutionsAsyncClient(credentials=credentials)
                self._jobs, self._executions = jobs, executions
            return self._jobs, self._executions

    async def _default_credentials(self) -> Any:
        """Application Default Credentials, looked up in a thread (google-auth blocks). Its messages may
        quote credential files, so only the kind of failure is told."""
        import google.auth
        import google.auth.exceptions

        try:
            credentials, _ = await asyncio.wait_for(
                asyncio.to_thread(google.auth.default, scopes=[SCOPE]), self._timeout
            )
        except TimeoutError:
            raise DeployError(
                f"Could not find Google credentials for Cloud Run job {self.job} within {_seconds(self._timeout)}."
            ) from None
        except google.auth.exceptions.GoogleAuthError as exc:
            log.warning("google_credentials_failed", error=type(exc).__name__)
            raise DeployError(
                f"The bot has no usable Google credentials for Cloud Run job {self.job} ({type(exc).__name__})."
            ) from None
        return credentials

    async def close(self) -> None:
        """Close both clients' channels (they are made again if used afterwards)."""
        async with self._lock:
            clients: list[Any] = [client for client in (self._jobs, self._executions) if client is not None]
            self._jobs = self._executions = None
        for client in clients:
            await client.transport.close()

    async def __aenter__(self) -> CloudRunJob:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
