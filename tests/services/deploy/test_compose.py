"""docker compose control against a fake ``docker`` that records its argv, and runbook 003's
safe-stop / safe-start against a real PostgreSQL jobs table."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.deploy.base import DeployError
from services.deploy.compose import STOPPED_MESSAGE, ComposeProject, ServiceState, parse_ps
from services.inventory import ComposeComponent, JobsTable
from services.jobs import JobsClient
from tests.fixtures.fake_docker import FakeDocker, fake_docker_fixture, process_gone  # noqa: F401
from tests.fixtures.servers import free_port
from tests.fixtures.servers import run_sql as run
from tests.fixtures.wait import wait_until

JOBS_DDL = """
create table jobs (
    id bigint primary key,
    status text not null,
    started_at timestamptz,
    error_message text
)
"""

# Real `docker compose ps --all --format json` output, abridged: compose 2.20 (one array, no
# Status) and compose 2.26 (one object per line).
PS_ARRAY_2_20 = (
    '[{"ID":"1f0e2d","Name":"shop-db-1","Command":"docker-entrypoint.sh postgres","Project":"shop",'
    '"Service":"db","State":"running","Health":"healthy","ExitCode":0,"Publishers":[]},'
    '{"ID":"9a8b7c","Name":"shop-worker-1","Command":"python -m worker","Project":"shop",'
    '"Service":"worker","State":"exited","Health":"","ExitCode":137,"Publishers":null}]\n'
)
PS_LINES_2_26 = (
    '{"Command":"\\"docker-entrypoint.s…\\"","CreatedAt":"2024-05-02 12:21:53 +0400 +04","ExitCode":0,'
    '"Health":"","ID":"d2763e024a10","Image":"redis:latest","Name":"shop-redis-1","Names":"shop-redis-1",'
    '"Project":"shop","Publishers":[],"RunningFor":"2 hours ago","Service":"redis","State":"paused",'
    '"Status":"Up 2 hours (Paused)"}\n'
    '{"Command":"\\"gunicorn app\\"","ExitCode":0,"Health":"starting","ID":"77aa","Image":"shop:1.4",'
    '"Name":"shop-web-1","Project":"shop","Service":"web","State":"running",'
    '"Status":"Up 5 seconds (health: starting)"}\n'
)

Notes = list[tuple[str, list[str]]]


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    path = tmp_path / "shop"
    path.mkdir()
    (path / "compose.yaml").write_text("services: {}\n", encoding="utf-8")
    return path


def project(fake: FakeDocker, directory: Path, **options: Any) -> ComposeProject:
    options.setdefault("project_name", "shop")
    options.setdefault("timeout", 10.0)
    return ComposeProject(directory, docker=str(fake.path), **options)


def head(directory: Path, name: str | None = "shop") -> list[str]:
    return ["compose", "--project-directory", str(directory), *(["-p", name] if name else [])]


def recorder(fake: FakeDocker) -> tuple[Notes, Callable[[str], Awaitable[None]]]:
    """A progress callback that keeps each note with the compose commands run before it."""
    notes: Notes = []

    async def progress(note: str) -> None:
        notes.append((note, fake.commands()))

    return notes, progress


# -- ps ------------------------------------------------------------------------------------------------


def test_parse_ps_reads_the_array_of_compose_before_2_21() -> None:
    assert parse_ps(PS_ARRAY_2_20) == [
        ServiceState("db", "shop-db-1", "running", "running", "healthy", 0),
        ServiceState("worker", "shop-worker-1", "exited", "exited (137)", "", 137),
    ]


def test_parse_ps_reads_one_object_per_line_of_compose_2_21_and_later() -> None:
    assert parse_ps(PS_LINES_2_26) == [
        ServiceState("redis", "shop-redis-1", "paused", "Up 2 hours (Paused)", "", 0),
        ServiceState("web", "shop-web-1", "running", "Up 5 seconds (health: starting)", "starting", 0),
    ]


def test_parse_ps_reads_a_single_object_and_nothing() -> None:
    single = PS_LINES_2_26.splitlines()[1]
    assert [s.service for s in parse_ps(single)] == ["web"]
    assert parse_ps("") == [] and parse_ps("[]\n") == [] and parse_ps("\n\n") == []


@pytest.mark.parametrize("text", ["NAME  IMAGE  STATUS\nweb  shop  Up", '["web"]', '{"State": "running"}\nnot json'])
def test_parse_ps_refuses_what_is_not_a_list_of_containers(text: str) -> None:
    with pytest.raises(DeployError, match="docker compose ps"):
        parse_ps(text)


@pytest.mark.parametrize("ps_format", ["lines", "array"])
async def test_ps_runs_compose_ps_and_reads_both_formats(
    fake_docker: FakeDocker, project_dir: Path, ps_format: str
) -> None:
    fake_docker.set_services(
        {"web": ("running", "healthy"), "worker": "exited", "cache": "paused"}, ps_format=ps_format
    )
    states = await project(fake_docker, project_dir).ps()

    assert fake_docker.calls() == [[*head(project_dir), "ps", "--all", "--format", "json"]]
    assert [(s.service, s.name, s.state, s.health) for s in states] == [
        ("cache", "shop-cache-1", "paused", ""),
        ("web", "shop-web-1", "running", "healthy"),
        ("worker", "shop-worker-1", "exited", ""),
    ]
    expected_status = "Up 2 seconds (Paused)" if ps_format == "lines" else "paused"
    assert states[0].status == expected_status


async def test_ps_of_real_outputs(fake_docker: FakeDocker, project_dir: Path) -> None:
    compose = project(fake_docker, project_dir)
    fake_docker.set_ps_output(PS_ARRAY_2_20)
    assert [s.describe() for s in await compose.ps()] == ["db running (healthy)", "worker exited (137)"]
    fake_docker.set_ps_output(PS_LINES_2_26)
    assert [s.describe() for s in await compose.ps()] == ["redis paused", "web running (starting)"]


async def test_ps_without_project_name_lets_compose_use_the_directory(
    fake_docker: FakeDocker, project_dir: Path
) -> None:
    compose = project(fake_docker, project_dir, project_name=None)
    states = await compose.ps()
    assert fake_docker.calls() == [[*head(project_dir, None), "ps", "--all", "--format", "json"]]
    assert [s.name for s in states] == ["shop-web-1", "shop-worker-1"]  # the fake names them like compose
    assert compose.label == "shop"
    assert compose.describe() == f"compose project shop in {project_dir}"


# -- lifecycle argv ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected_state"),
    [("restart", "running"), ("pause", "paused"), ("unpause", "running"), ("stop", "exited"), ("start", "running")],
)
async def test_one_service_gets_exactly_its_argv(
    fake_docker: FakeDocker, project_dir: Path, command: str, expected_state: str
) -> None:
    fake_docker.set_services({"web": "exited" if command == "start" else "running", "worker": "running"})
    compose = project(fake_docker, project_dir, services=["web", "worker"])
    notes, progress = recorder(fake_docker)

    summary = await getattr(compose, command)("web", progress=progress)

    assert fake_docker.calls() == [
        [*head(project_dir), command, "web"],
        [*head(project_dir), "ps", "--all", "--format", "json"],
    ]
    assert fake_docker.states() == {"web": expected_state, "worker": "running"}
    assert summary.endswith(f"web of compose project shop; now web {expected_state}.")
    assert len(notes) == 1 and notes[0][1] == []  # said before anything ran
    assert "web of compose project shop" in notes[0][0]


@pytest.mark.parametrize("command", ["restart", "pause", "unpause", "stop", "start"])
async def test_all_services_get_no_service_argument(fake_docker: FakeDocker, project_dir: Path, command: str) -> None:
    summary = await getattr(project(fake_docker, project_dir), command)()
    assert fake_docker.calls() == [
        [*head(project_dir), command],
        [*head(project_dir), "ps", "--all", "--format", "json"],
    ]
    assert "all services of compose project shop; now web " in summary
    assert ", worker " in summary


async def test_restart_summary_shows_the_state_afterwards(fake_docker: FakeDocker, project_dir: Path) -> None:
    fake_docker.set_services({"web": ("exited", ""), "worker": ("running", "healthy")})
    assert await project(fake_docker, project_dir).restart() == (
        "Restarted all services of compose project shop; now web running, worker running (healthy)."
    )


async def test_a_failed_look_afterwards_does_not_turn_success_into_failure(
    fake_docker: FakeDocker, project_dir: Path
) -> None:
    fake_docker.fail_next(0, "")  # stop succeeds (exit 0, no output): the queue holds one entry per call
    fake_docker.fail_next(1, "Cannot connect to the Docker daemon at unix:///var/run/docker.sock.\n")
    summary = await project(fake_docker, project_dir).stop()
    assert summary.startswith("Stopped all services of compose project shop; could not read the state afterwards:")
    assert "Cannot connect to the Docker daemon" in summary
    assert fake_docker.commands() == ["stop", "ps"]


# -- refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["web; rm -rf /", "$(id)", "-v", "--help", "`id`", "web\nworker", "", " web", "web/../x", "we b"]
)
@pytest.mark.parametrize("command", ["restart", "stop", "start", "pause", "unpause"])
async def test_injection_in_a_service_name_is_refused_before_any_call(
    fake_docker: FakeDocker, project_dir: Path, name: str, command: str
) -> None:
    notes, progress = recorder(fake_docker)
    with pytest.raises(DeployError, match="not a valid compose service name") as caught:
        await getattr(project(fake_docker, project_dir), command)(name, progress=progress)
    assert fake_docker.calls() == []
    assert notes == []
    assert "\n" not in caught.value.message


async def test_a_service_not_in_the_inventory_is_refused(fake_docker: FakeDocker, project_dir: Path) -> None:
    compose = project(fake_docker, project_dir, services=["web", "worker"])
    with pytest.raises(DeployError, match=r"`db` is not a service of shop in the inventory \(web, worker\)"):
        await compose.restart("db")
    assert fake_docker.calls() == []


async def test_without_an_inventory_list_compose_itself_judges_the_name(
    fake_docker: FakeDocker, project_dir: Path
) -> None:
    with pytest.raises(DeployError) as caught:
        await project(fake_docker, project_dir).stop("db")
    assert caught.value.message == "`docker compose stop db` failed: no such service: db"
    assert fake_docker.commands() == ["stop"]


@pytest.mark.parametrize("name", ["Shop", "-p", "shop;id", "", "_shop", "shop name"])
def test_an_invalid_project_name_is_refused(project_dir: Path, name: str) -> None:
    with pytest.raises(DeployError, match="compose project name"):
        ComposeProject(project_dir, project_name=name)


async def test_a_project_from_the_inventory(fake_docker: FakeDocker, project_dir: Path) -> None:
    spec = ComposeComponent(type="compose", project_dir=project_dir, project_name="shop", services=["web"])
    compose = ComposeProject.for_component(spec, docker=str(fake_docker.path))
    await compose.pause("web")
    with pytest.raises(DeployError, match="not a service of shop"):
        await compose.pause("worker")
    assert fake_docker.calls()[0] == [*head(project_dir), "pause", "web"]
    assert fake_docker.commands() == ["pause", "ps"]


def test_an_invalid_service_in_the_inventory_is_refused(project_dir: Path) -> None:
    with pytest.raises(DeployError, match="`-v`, which is not a valid compose service name"):
        ComposeProject(project_dir, services=["web", "-v"])


async def test_a_missing_project_directory_is_refused(fake_docker: FakeDocker, tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="does not exist on the bot's host"):
        await project(fake_docker, tmp_path / "nowhere").ps()
    assert fake_docker.calls() == []


# -- docker itself -------------------------------------------------------------------------------------


async def test_a_failing_docker_gives_its_error_line(fake_docker: FakeDocker, project_dir: Path) -> None:
    fake_docker.fail_next(
        1,
        " Container shop-web-1  Restarting\n"
        " Container shop-web-1  \x1b[31mError\x1b[0m\n"
        "Error response from daemon: Cannot restart container 77aa: driver failed programming external "
        "connectivity: Bind for 0.0.0.0:80 failed: port is already allocated\n",
    )
    with pytest.raises(DeployError) as caught:
        await project(fake_docker, project_dir).restart("web")
    message = caught.value.message
    assert message.startswith("`docker compose restart web` failed: Error response from daemon: Cannot restart")
    assert "port is already allocated" in message
    assert "\n" not in message and "\x1b" not in message
    assert fake_docker.commands() == ["restart"]  # no ps after a failure


async def test_a_failing_docker_without_words(fake_docker: FakeDocker, project_dir: Path) -> None:
    fake_docker.fail_next(3, "")
    with pytest.raises(DeployError, match=r"^`docker compose pause` failed: exit code 3$"):
        await project(fake_docker, project_dir).pause()


async def test_a_long_error_is_cut(fake_docker: FakeDocker, project_dir: Path) -> None:
    fake_docker.fail_next(1, "error: " + "x" * 5000 + "\n")
    with pytest.raises(DeployError) as caught:
        await project(fake_docker, project_dir).stop()
    assert len(caught.value.message) < 400
    assert caught.value.message.endswith("…")


async def test_a_hanging_docker_is_killed_with_its_children(fake_docker: FakeDocker, project_dir: Path) -> None:
    fake_docker.hang_next()
    started = time.monotonic()
    with pytest.raises(DeployError) as caught:
        await project(fake_docker, project_dir, timeout=1.0).stop("web")
    elapsed = time.monotonic() - started
    assert caught.value.message == "`docker compose stop web` did not finish within 1 s; stopped it."
    assert 1.0 <= elapsed < 8
    hung = fake_docker.hung()
    assert process_gone(hung.docker)
    await wait_until_gone(hung.plugin)  # the grandchild died with the process group
    assert fake_docker.commands() == ["stop"]


async def test_a_cancelled_call_kills_docker(fake_docker: FakeDocker, project_dir: Path) -> None:
    fake_docker.hang_next()
    task = asyncio.create_task(project(fake_docker, project_dir, timeout=60).restart())
    hung = await asyncio.to_thread(fake_docker.hung)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert process_gone(hung.docker)
    await wait_until_gone(hung.plugin)


async def wait_until_gone(pid: int) -> None:
    await wait_until(lambda: process_gone(pid), f"process {pid} ends", timeout=5)


async def test_a_missing_docker_binary(project_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DeployError, match=r"^docker is not installed on the bot's host$"):
        await ComposeProject(project_dir, docker=str(tmp_path / "no" / "docker")).ps()
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(DeployError, match=r"^docker is not installed on the bot's host$"):
        await ComposeProject(project_dir).stop()


async def test_docker_is_found_on_path_and_gets_no_secrets_of_the_bot(
    fake_docker: FakeDocker, project_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{fake_docker.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("OPSBOT_SLACK_BOT_TOKEN", "xoxb-very-secret")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:hunter2@db/app")
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/user/1000/docker.sock")
    monkeypatch.setenv("COMPOSE_FILE", "compose.yaml:compose.prod.yaml")

    await ComposeProject(project_dir, project_name="shop").restart("web")

    assert fake_docker.calls()[0] == [*head(project_dir), "restart", "web"]
    seen = fake_docker.environments()[0]
    env = seen["env"]
    assert "OPSBOT_SLACK_BOT_TOKEN" not in env and "DATABASE_URL" not in env
    assert not any("hunter2" in v or "xoxb" in v for v in env.values())
    assert env["DOCKER_HOST"] == "unix:///run/user/1000/docker.sock"
    assert env["COMPOSE_FILE"] == "compose.yaml:compose.prod.yaml"
    assert env["LC_ALL"] == "C"
    assert seen["cwd"] == str(project_dir)


async def test_a_huge_ps_output_is_refused(fake_docker: FakeDocker, project_dir: Path) -> None:
    row = json.dumps({"Service": "web", "Name": "x" * 1000, "State": "running"})
    fake_docker.set_ps_output((row + "\n") * 5000)  # about 5 MB
    with pytest.raises(DeployError, match="printed more than 4 MiB"):
        await project(fake_docker, project_dir).ps()


# -- the jobs table: new JobsClient methods ----------------------------------------------------------------


async def jobs_state(dsn: str) -> dict[int, tuple[str, bool, str | None]]:
    """id → (status, has started_at, error_message)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch("select id, status, started_at, error_message from jobs order by id")
    finally:
        await conn.close()
    return {r["id"]: (r["status"], r["started_at"] is not None, r["error_message"]) for r in rows}


def jobs_client(dsn: str, **spec: Any) -> JobsClient:
    return JobsClient(dsn, JobsTable(**spec), timeout=5.0)


@pytest.fixture
async def jobs_dsn(pg_dsn: str) -> str:
    await run(
        pg_dsn,
        JOBS_DDL,
        """insert into jobs values
            (1, 'processing', now() - interval '5 minutes', null),
            (2, 'processing', now() - interval '1 minute', 'earlier try failed'),
            (3, 'pending', null, null),
            (4, 'completed', now() - interval '2 hours', null)""",
    )
    return pg_dsn


async def test_processing_count_counts_every_job_in_processing(jobs_dsn: str) -> None:
    client = jobs_client(jobs_dsn)
    assert await client.processing_count() == 2
    await run(jobs_dsn, "update jobs set status = 'completed' where id = 1")
    assert await client.processing_count() == 1
    assert await jobs_client(jobs_dsn, processing_value="pending", pending_value="queued").processing_count() == 1


async def test_reset_processing_resets_recent_jobs_too_in_one_statement(jobs_dsn: str) -> None:
    reset = await jobs_client(jobs_dsn).reset_processing(STOPPED_MESSAGE)
    assert reset == ["1", "2"]
    assert await jobs_state(jobs_dsn) == {
        1: ("pending", False, STOPPED_MESSAGE),
        2: ("pending", False, STOPPED_MESSAGE),
        3: ("pending", False, None),
        4: ("completed", True, None),
    }
    assert await jobs_client(jobs_dsn).reset_processing(STOPPED_MESSAGE) == []


async def test_reset_processing_without_an_error_column_and_with_a_short_one(pg_dsn: str) -> None:
    await run(
        pg_dsn,
        "create table q (job_id text primary key, state text, began timestamp, note varchar(10))",
        "insert into q values ('b', 'busy', now(), null), ('a', 'busy', now(), null), ('c', 'idle', null, null)",
    )
    spec = {"table": "q", "id_column": "job_id", "status_column": "state", "started_column": "began"}
    client = jobs_client(pg_dsn, **spec, processing_value="busy", pending_value="idle", error_column="note")
    assert await client.reset_processing(STOPPED_MESSAGE) == ["a", "b"]
    conn = await asyncpg.connect(pg_dsn, timeout=10)
    try:
        rows = await conn.fetch("select job_id, state, began, note from q order by job_id")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [
        ("a", "idle", None, STOPPED_MESSAGE[:10]),
        ("b", "idle", None, STOPPED_MESSAGE[:10]),
        ("c", "idle", None, None),
    ]
    await run(pg_dsn, "update q set state = 'busy'")
    no_error = jobs_client(pg_dsn, **spec, processing_value="busy", pending_value="idle", error_column=None)
    assert await no_error.reset_processing(STOPPED_MESSAGE) == ["a", "b", "c"]


# -- safe-stop / safe-start ------------------------------------------------------------------------------


async def test_safe_stop_waits_for_the_grace_period_then_resets_and_stops(
    fake_docker: FakeDocker, project_dir: Path, jobs_dsn: str
) -> None:
    notes, record = recorder(fake_docker)
    finishing: list[asyncio.Task[None]] = []

    async def finish_job_1() -> None:
        await asyncio.sleep(0.2)
        await run(jobs_dsn, "update jobs set status = 'completed' where id = 1")

    async def progress(note: str) -> None:
        await record(note)
        if "still processing" in note and not finishing:
            finishing.append(asyncio.create_task(finish_job_1()))

    started = time.monotonic()
    summary = await project(fake_docker, project_dir).safe_stop(
        jobs_client(jobs_dsn), grace=1.5, poll_every=0.05, progress=progress
    )
    elapsed = time.monotonic() - started
    await finishing[0]

    assert elapsed >= 1.5
    assert await jobs_state(jobs_dsn) == {
        1: ("completed", True, None),
        2: ("pending", False, STOPPED_MESSAGE),
        3: ("pending", False, None),
        4: ("completed", True, None),
    }
    assert fake_docker.calls() == [
        [*head(project_dir), "stop"],
        [*head(project_dir), "ps", "--all", "--format", "json"],
    ]
    assert fake_docker.states() == {"web": "exited", "worker": "exited"}
    said = [note for note, _ in notes]
    assert said[0] == "2 job(s) still processing, waiting up to 2 s"
    assert said[1].startswith("1 job(s) still processing, waiting up to ")
    reset_note = next(i for i, (note, _) in enumerate(notes) if note.startswith("Reset 1 job(s)"))
    assert notes[reset_note] == ("Reset 1 job(s) in `jobs` to pending: 2", [])  # reset before any stop
    assert notes[reset_note + 1][0].startswith("Stopping all services")
    assert summary == (
        "Stopped all services of compose project shop; now web exited, worker exited. "
        "1 of 2 job(s) in processing finished within the 1.5 s grace period. "
        "Reset 1 job(s) to pending: 2."
    )


async def test_safe_stop_does_not_wait_once_every_job_is_done(
    fake_docker: FakeDocker, project_dir: Path, jobs_dsn: str
) -> None:
    async def finish_all() -> None:
        await asyncio.sleep(0.2)
        await run(jobs_dsn, "update jobs set status = 'completed' where status = 'processing'")

    finishing = asyncio.create_task(finish_all())
    started = time.monotonic()
    summary = await project(fake_docker, project_dir).safe_stop(jobs_client(jobs_dsn), grace=30, poll_every=0.05)
    await finishing
    assert time.monotonic() - started < 10
    assert "2 of 2 job(s) in processing finished within the 30 s grace period." in summary
    assert "Reset" not in summary
    assert fake_docker.commands() == ["stop", "ps"]


async def test_safe_stop_with_no_job_processing_and_no_grace(
    fake_docker: FakeDocker, project_dir: Path, pg_dsn: str
) -> None:
    await run(pg_dsn, JOBS_DDL, "insert into jobs values (1, 'pending', null, null)")
    notes, progress = recorder(fake_docker)
    summary = await project(fake_docker, project_dir).safe_stop(jobs_client(pg_dsn), grace=0, progress=progress)
    assert summary.endswith("No job was processing in `jobs`.")
    assert [note for note, _ in notes] == ["Stopping all services of compose project shop…"]
    assert fake_docker.commands() == ["stop", "ps"]


async def test_safe_stop_resets_a_job_picked_up_while_stopping(
    fake_docker: FakeDocker, project_dir: Path, jobs_dsn: str
) -> None:
    _, record = recorder(fake_docker)

    async def progress(note: str) -> None:
        await record(note)
        if note.startswith("Stopping"):  # a worker grabs the pending job 3 before it is stopped
            await run(jobs_dsn, "update jobs set status = 'processing', started_at = now() where id = 3")

    summary = await project(fake_docker, project_dir).safe_stop(jobs_client(jobs_dsn), grace=0, progress=progress)
    assert "Reset 2 job(s) to pending: 1, 2." in summary
    assert summary.endswith("Reset 1 job(s) picked up during the stop: 3.")
    assert {job: state[0] for job, state in (await jobs_state(jobs_dsn)).items()} == {
        1: "pending",
        2: "pending",
        3: "pending",
        4: "completed",
    }


async def test_safe_stop_says_what_it_reset_when_the_stop_fails(
    fake_docker: FakeDocker, project_dir: Path, jobs_dsn: str
) -> None:
    fake_docker.fail_next(1, "Error response from daemon: permission denied\n")
    with pytest.raises(DeployError) as caught:
        await project(fake_docker, project_dir).safe_stop(jobs_client(jobs_dsn), grace=0)
    assert caught.value.message == (
        "Reset 2 job(s) to pending (1, 2), but the stop failed: "
        "`docker compose stop` failed: Error response from daemon: permission denied"
    )
    assert (await jobs_state(jobs_dsn))[1][0] == "pending"


async def test_safe_stop_stops_nothing_when_the_jobs_table_cannot_be_read(
    fake_docker: FakeDocker, project_dir: Path
) -> None:
    dead = JobsClient(f"postgresql://postgres@127.0.0.1:{free_port()}/x", JobsTable(), timeout=2.0)
    with pytest.raises(DeployError) as caught:
        await project(fake_docker, project_dir).safe_stop(dead, grace=5)
    assert caught.value.message.startswith(f"Did not stop compose project shop in {project_dir}: Cannot connect")
    assert "connection refused" in caught.value.message
    assert fake_docker.calls() == []


async def test_safe_stop_and_start_without_a_jobs_table(fake_docker: FakeDocker, project_dir: Path) -> None:
    compose = project(fake_docker, project_dir)
    stopped = await compose.safe_stop(None, grace=60)
    started = await compose.safe_start(None)
    assert stopped == "Stopped all services of compose project shop; now web exited, worker exited."
    assert started == "Started all services of compose project shop; now web running, worker running."
    assert fake_docker.commands() == ["stop", "ps", "start", "ps"]


async def test_safe_start_starts_then_resets_only_jobs_stuck_over_the_threshold(
    fake_docker: FakeDocker, project_dir: Path, pg_dsn: str
) -> None:
    await run(
        pg_dsn,
        JOBS_DDL,
        """insert into jobs values
            (1, 'processing', now() - interval '3 hours', null),
            (2, 'processing', now() - interval '61 minutes', null),
            (3, 'processing', now() - interval '59 minutes', null),
            (4, 'pending', null, null),
            (5, 'completed', now() - interval '5 hours', null)""",
    )
    fake_docker.set_services({"web": "exited", "worker": "exited"})
    notes, progress = recorder(fake_docker)

    summary = await project(fake_docker, project_dir).safe_start(jobs_client(pg_dsn), progress=progress)

    assert fake_docker.calls() == [
        [*head(project_dir), "start"],
        [*head(project_dir), "ps", "--all", "--format", "json"],
    ]
    state = await jobs_state(pg_dsn)
    assert state[1] == ("pending", False, "Reset by opsbot at start: stuck in processing for over 60 min")
    assert state[2][:2] == ("pending", False)
    assert state[3] == ("processing", True, None)
    assert state[4] == ("pending", False, None) and state[5] == ("completed", True, None)
    assert summary == (
        "Started all services of compose project shop; now web running, worker running. "
        "Reset 2 job(s) stuck for over 60 min to pending: 1, 2."
    )
    assert [note for note, _ in notes] == ["Starting all services of compose project shop…"]


async def test_safe_start_with_nothing_stuck(fake_docker: FakeDocker, project_dir: Path, jobs_dsn: str) -> None:
    summary = await project(fake_docker, project_dir).safe_start(jobs_client(jobs_dsn, stuck_after_minutes=30))
    assert summary.endswith("No job was stuck in processing for over 30 min.")
    assert (await jobs_state(jobs_dsn))[1][0] == "processing"


async def test_safe_start_reports_a_failed_start_and_touches_no_job(
    fake_docker: FakeDocker, project_dir: Path, pg_dsn: str
) -> None:
    await run(pg_dsn, JOBS_DDL, "insert into jobs values (1, 'processing', now() - interval '3 hours', null)")
    fake_docker.fail_next(1, 'service "web" has no container to start\n')
    with pytest.raises(DeployError, match='failed: service "web" has no container to start'):
        await project(fake_docker, project_dir).safe_start(jobs_client(pg_dsn))
    assert (await jobs_state(pg_dsn))[1][0] == "processing"
