"""Cloud Run Jobs (runbook 000's migrate job) through the real google-cloud-run async clients, against a
grpc.aio fake of the Jobs, Executions and Operations APIs on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest

from services.deploy.base import DeployError
from services.deploy.cloudrun_jobs import CloudRunJob, JobOverrides
from tests.fixtures.cloudrun import start_cloudrun_fake
from tests.fixtures.cloudrun_jobs import FakeCloudRunJobs, start_cloudrun_jobs_fake

JOB = "shop-migrate"


class Notes:
    """A progress callback that keeps what it was told."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    async def __call__(self, line: str) -> None:
        self.lines.append(line)


@pytest.fixture
async def fake() -> AsyncIterator[FakeCloudRunJobs]:
    server = await start_cloudrun_jobs_fake(jobs=(JOB, "shop-create-admin"))
    yield server
    await server.close()


@pytest.fixture
async def job(fake: FakeCloudRunJobs) -> AsyncIterator[Callable[..., CloudRunJob]]:
    made: list[CloudRunJob] = []

    def make(name: str = JOB, **options: Any) -> CloudRunJob:
        options.setdefault("timeout", 5.0)
        options.setdefault("poll_every", 0.01)
        options.setdefault("channel_factory", fake.channel)
        made.append(CloudRunJob(fake.project, fake.region, name, **options))
        return made[-1]

    yield make
    for item in made:
        await item.close()


async def test_run_follows_the_execution_named_in_the_operation_metadata_and_reports_task_counts(
    fake: FakeCloudRunJobs, job: Callable[..., CloudRunJob]
) -> None:
    fake.polls_to_finish, fake.task_count = 3, 2
    notes = Notes()
    result = await job().run(timeout=10, progress=notes)
    assert result.outcome == "succeeded" and result.finished
    assert (result.succeeded, result.failed, result.running, result.task_count) == (2, 0, 0, 2)
    assert result.duration() == 30  # three reads after the start, ten simulated seconds each
    [run] = fake.calls("RunJob")
    assert run.name == f"projects/demo-project/locations/asia-northeast3/jobs/{JOB}"
    assert not run.overrides.container_overrides  # a plain execution, as `gcloud run jobs execute`
    assert fake.calls("GetOperation") == []  # the operation is not waited on: the execution is read
    assert {r.name.rsplit("/", 1)[-1] for r in fake.calls("GetExecution")} == {result.name}
    assert notes.lines[0] == f"Started execution `{result.name}` of Cloud Run job {JOB}."
    assert any("2 running, 0 succeeded, 0 failed, 0 cancelled of 2 task(s)" in line for line in notes.lines)
    assert result.name.startswith(f"{JOB}-")


async def test_a_failed_task_ends_the_execution_failed_with_the_task_error(
    fake: FakeCloudRunJobs, job: Callable[..., CloudRunJob]
) -> None:
    fake.fail_with = "The container exited with an exit code of 1."
    result = await job().run(timeout=10, progress=Notes())
    assert result.outcome == "failed" and result.failed == 1 and result.succeeded == 0
    assert "exit code of 1" in result.reason


async def test_an_execution_that_hangs_times_out_and_is_left_running(
    fake: FakeCloudRunJobs, job: Callable[..., CloudRunJob]
) -> None:
    fake.hang = True
    with pytest.raises(DeployError) as caught:
        await job(poll_every=0.05).run(timeout=0.3, progress=Notes())
    [name] = fake.executions
    assert caught.value.message.startswith(f"Execution `{name}` of Cloud Run job {JOB} did not finish within 0 s")
    assert "may still be running" in caught.value.message
    assert f"/run/jobs/executions/details/asia-northeast3/{name}/logs?project=demo-project" in caught.value.message
    assert fake.calls("DeleteExecution") == []  # nothing cancelled or deleted behind anyone's back


async def test_a_running_execution_refuses_a_second_one_naming_it(
    fake: FakeCloudRunJobs, job: Callable[..., CloudRunJob]
) -> None:
    fake.add_execution(JOB, outcome="succeeded", ago=timedelta(days=2))
    running = fake.add_execution(JOB, outcome="running", ago=timedelta(minutes=5))
    with pytest.raises(DeployError, match=rf"Execution `{running}` of Cloud Run job {JOB} is still running since"):
        await job().run(timeout=10, progress=Notes())
    assert fake.calls("RunJob") == []


async def test_executions_are_listed_newest_first_across_pages(
    fake: FakeCloudRunJobs, job: Callable[..., CloudRunJob]
) -> None:
    names = [
        fake.add_execution(JOB, outcome=outcome, took=60 + days, ago=timedelta(days=days))
        for days, outcome in [(5, "succeeded"), (4, "failed"), (3, "cancelled"), (2, "succeeded"), (1, "running")]
    ]
    fake.add_execution("shop-create-admin")  # another job's execution is not listed
    listed = await job().executions(limit=10)
    assert [e.name for e in listed] == names[::-1]
    assert [e.outcome for e in listed] == ["running", "succeeded", "cancelled", "failed", "succeeded"]
    assert listed[1].duration() == 62
    assert len(fake.calls("ListExecutions")) == 2  # five executions at three a page
    assert [e.name for e in await job().executions(limit=2)] == names[:2:-1]
    assert [e.name for e in await job().running()] == [names[-1]]


async def test_overrides_and_delete_for_a_one_off_execution(
    fake: FakeCloudRunJobs, job: Callable[..., CloudRunJob]
) -> None:
    secret = "one-time-Pa55word"
    client = job("shop-create-admin")
    overrides = JobOverrides(args=("create-admin", "20231234"), env={"ADMIN_PASSWORD": secret}, task_count=1)
    assert secret not in repr(overrides)
    started = await client.start(overrides)
    [run] = fake.calls("RunJob")
    [container] = run.overrides.container_overrides
    assert list(container.args) == ["create-admin", "20231234"]
    assert {e.name: e.value for e in container.env} == {"ADMIN_PASSWORD": secret}
    stored = fake.executions[started.name].template.containers[0]
    assert any(e.value == secret for e in stored.env)  # readable in the execution until it is deleted
    with pytest.raises(DeployError, match="Cloud Run refused to delete an execution of job shop-create-admin"):
        await client.delete_execution(started.name)  # still running
    done = await client.follow(started.name, timeout=10, progress=Notes())
    assert done.outcome == "succeeded"
    await client.delete_execution(started.name)
    assert started.name not in fake.executions
    with pytest.raises(DeployError, match=f"There is no execution `{started.name}` of Cloud Run job"):
        await client.delete_execution(started.name)


async def test_bad_env_names_and_foreign_execution_names_are_refused_before_any_call(
    fake: FakeCloudRunJobs, job: Callable[..., CloudRunJob]
) -> None:
    with pytest.raises(DeployError, match="is not an environment variable name"):
        await job().start(JobOverrides(env={"BAD NAME": "x"}), refuse_running=False)
    with pytest.raises(DeployError, match="is not an execution of Cloud Run job shop-migrate"):
        await job().execution("other-job-abc12")
    assert [r.method for r in fake.requests] == []


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("GetJob", "may not read Cloud Run job shop-migrate (it needs run.jobs.get)"),
        ("RunJob", "may not execute Cloud Run job shop-migrate (it needs run.jobs.run)"),
        ("ListExecutions", "may not list the executions of Cloud Run job shop-migrate (it needs run.executions.list)"),
    ],
)
async def test_permission_denied_is_one_sentence_naming_the_permission(
    fake: FakeCloudRunJobs, job: Callable[..., CloudRunJob], method: str, expected: str
) -> None:
    fake.denied.add(method)
    with pytest.raises(DeployError) as caught:
        if method == "GetJob":
            await job().check()
        else:
            await job().run(timeout=5, progress=Notes())
    assert caught.value.message == f"The bot's Google credentials {expected}."
    assert fake.executions == {}


async def test_permission_lost_while_following_says_the_execution_may_still_run(
    fake: FakeCloudRunJobs, job: Callable[..., CloudRunJob]
) -> None:
    fake.denied.add("GetExecution")
    with pytest.raises(DeployError) as caught:
        await job().run(timeout=5, progress=Notes())
    [name] = fake.executions
    assert caught.value.message == (
        f"The bot's Google credentials may not read the executions of Cloud Run job {JOB} "
        f"(it needs run.executions.get); execution `{name}` may still be running."
    )


async def test_a_job_that_does_not_exist(fake: FakeCloudRunJobs, job: Callable[..., CloudRunJob]) -> None:
    with pytest.raises(
        DeployError, match=r"^There is no Cloud Run job nope-migrate in asia-northeast3 \(demo-project\)\.$"
    ):
        await job("nope-migrate").check()
    with pytest.raises(DeployError, match="There is no Cloud Run job nope-migrate"):
        await job("nope-migrate").run(timeout=5, progress=Notes())
    assert fake.executions == {}


async def test_an_unavailable_api_is_one_sentence(fake: FakeCloudRunJobs, job: Callable[..., CloudRunJob]) -> None:
    fake.fail_next.append(("ListExecutions", grpc.StatusCode.UNAVAILABLE, "connection reset"))
    with pytest.raises(DeployError, match=r"^Could not reach the Cloud Run Admin API for job shop-migrate"):
        await job().executions()


async def test_services_and_jobs_share_one_address_and_their_operations() -> None:
    services = await start_cloudrun_fake(services=("shop",), polls_to_done=1)
    jobs = await start_cloudrun_jobs_fake(jobs=(JOB,), services=services)
    try:
        from services.deploy.cloudrun import CloudRunProvider

        async with CloudRunProvider(
            services.project, services.region, "shop", timeout=5, poll_every=0.01, channel_factory=jobs.channel
        ) as provider:
            message = await provider.restart(progress=Notes())
        assert "restarted" in message
        async with CloudRunJob(jobs.project, jobs.region, JOB, poll_every=0.01, channel_factory=jobs.channel) as job:
            assert (await job.run(timeout=5, progress=Notes())).outcome == "succeeded"
    finally:
        await jobs.close()
        await services.close()


def test_bad_names_fail_at_construction() -> None:
    with pytest.raises(DeployError, match="is not a Cloud Run job name"):
        CloudRunJob("demo-project", "asia-northeast3", "Bad_Job")
    with pytest.raises(DeployError, match="is not a Cloud Run region"):
        CloudRunJob("demo-project", "mars", "job")


def test_the_inventory_declares_a_migrate_job_by_name_or_in_full() -> None:
    from services.inventory import CloudRunComponent, parse_inventory

    loaded = parse_inventory(
        """
services:
  vcbl:
    components:
      run: {type: cloudrun, project: vcbl-prod, region: asia-northeast3, service: vcbl-chatbot,
            migrate_job: vcbl-chatbot-migrate}
  other:
    components:
      run: {type: cloudrun, project: vcbl-prod, region: asia-northeast3, service: other,
            migrate_job: {job: other-migrate, project: jobs-prod, region: us-central1, timeout: 600}}
""",
        "test inventory",
        env={},
    )
    plain, full = (loaded.inventory.services[s].components["run"] for s in ("vcbl", "other"))
    assert isinstance(plain, CloudRunComponent) and isinstance(full, CloudRunComponent)
    assert plain.migrate_job is not None and full.migrate_job is not None
    assert (plain.migrate_job.job, plain.migrate_job.project, plain.migrate_job.timeout) == (
        "vcbl-chatbot-migrate",
        None,
        1800.0,
    )
    assert (full.migrate_job.project, full.migrate_job.region, full.migrate_job.timeout) == (
        "jobs-prod",
        "us-central1",
        600.0,
    )


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ("Bad_Job", "services.vcbl.components.run.migrate_job.job"),
        ("{job: ok-job, timeout: 0}", "services.vcbl.components.run.migrate_job.timeout"),
        ("{job: ok-job, image: x}", "services.vcbl.components.run.migrate_job.image"),
    ],
)
def test_a_bad_migrate_job_is_refused_by_path(value: str, where: str) -> None:
    from services.errors import InventoryError
    from services.inventory import parse_inventory

    text = f"""
services:
  vcbl:
    components:
      run: {{type: cloudrun, project: vcbl-prod, region: asia-northeast3, service: vcbl, migrate_job: {value}}}
"""
    with pytest.raises(InventoryError) as caught:
        parse_inventory(text, "test inventory", env={})
    assert any(problem.startswith(where) for problem in caught.value.problems), caught.value.problems


async def test_a_refused_execution_with_overrides_never_quotes_the_api_which_may_echo_them(
    fake: FakeCloudRunJobs, job: Callable[..., CloudRunJob]
) -> None:
    secret = "one-time-Pa55word"
    fake.fail_next.append(("RunJob", grpc.StatusCode.INVALID_ARGUMENT, f"env ADMIN_PASSWORD={secret} is invalid"))
    with pytest.raises(DeployError) as caught:
        await job("shop-create-admin").start(JobOverrides(env={"ADMIN_PASSWORD": secret}))
    assert caught.value.message == "Cloud Run refused to execute job shop-create-admin"
    fake.fail_next.append(("RunJob", grpc.StatusCode.INVALID_ARGUMENT, "task_count must be positive"))
    with pytest.raises(DeployError, match="refused to execute job shop-migrate: task_count must be positive"):
        await job().start()  # without overrides, Cloud Run's reason is worth showing


async def test_an_operation_that_names_its_execution_late_is_read_again_until_it_does(
    fake: FakeCloudRunJobs, job: Callable[..., CloudRunJob]
) -> None:
    fake.unnamed_polls = 2
    result = await job().run(timeout=10, progress=Notes())
    assert result.outcome == "succeeded"
    assert len(fake.calls("GetOperation")) == 2 and list(fake.executions) == [result.name]


async def test_an_operation_that_never_names_its_execution_is_one_sentence(
    fake: FakeCloudRunJobs, job: Callable[..., CloudRunJob]
) -> None:
    fake.unnamed_polls = 10_000
    with pytest.raises(DeployError, match=r"^Cloud Run accepted the execution of job shop-migrate but did not name it"):
        await job(timeout=0.3, poll_every=0.05).run(timeout=10, progress=Notes())
    assert len(fake.calls("RunJob")) == 1  # executed once, never again
