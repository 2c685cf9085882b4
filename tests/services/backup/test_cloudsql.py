"""Cloud SQL managed backups (runbook 000) against a fake Cloud SQL Admin API on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.backup.base import BackupError
from services.backup.cloudsql import BackupRun, CloudSqlAdmin, GoogleDefaultToken, StaticToken
from tests.fixtures.cloudsql import T0, FakeCloudSql, start_fake
from tests.fixtures.servers import free_port


@pytest.fixture
async def cloudsql_fake() -> AsyncIterator[FakeCloudSql]:
    fake = await start_fake()
    yield fake
    await fake.close()


def admin(fake: FakeCloudSql, session: aiohttp.ClientSession, **options: Any) -> CloudSqlAdmin:
    options.setdefault("tokens", StaticToken(fake.token))
    options.setdefault("poll_every", 0.01)
    options.setdefault("timeout", 5.0)
    return CloudSqlAdmin(session, fake.project, "main-db", api_url=fake.url, **options)


def api_calls(fake: FakeCloudSql, method: str, suffix: str) -> list[Any]:
    return [r for r in fake.requests if r.method == method and r.path.endswith(suffix)]


async def test_list_is_newest_first_with_parsed_times(
    cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession
) -> None:
    middle = cloudsql_fake.add_run("main-db", started=T0 + timedelta(days=1))
    oldest = cloudsql_fake.add_run("main-db", started=T0)
    newest = cloudsql_fake.add_run(
        "main-db", started=T0 + timedelta(days=2), type="ON_DEMAND", description="before migration"
    )
    failed = cloudsql_fake.add_run("main-db", started=T0 - timedelta(days=1), status="FAILED", error="disk full")
    cloudsql_fake.add_run("other-db", started=T0 + timedelta(days=3))

    runs = await admin(cloudsql_fake, http_session).list_backups(limit=10)

    assert [run.id for run in runs] == [newest, middle, oldest, failed]
    first = runs[0]
    assert first == BackupRun(
        id=newest,
        status="SUCCESSFUL",
        type="ON_DEMAND",
        start_time=T0 + timedelta(days=2),
        end_time=T0 + timedelta(days=2, minutes=2),
        enqueued_time=T0 + timedelta(days=2, seconds=-5),
        description="before migration",
        location="us",
    )
    assert first.start_time is not None and first.start_time.tzinfo is not None
    assert runs[-1].status == "FAILED" and runs[-1].error == "disk full"
    (call,) = cloudsql_fake.requests
    assert call.path == "/v1/projects/demo-project/instances/main-db/backupRuns"
    assert call.query == {"maxResults": "10"}
    assert call.authorization == f"Bearer {cloudsql_fake.token}"


async def test_list_respects_the_limit(cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession) -> None:
    ids = [cloudsql_fake.add_run("main-db", started=T0 + timedelta(hours=h)) for h in range(5)]
    runs = await admin(cloudsql_fake, http_session).list_backups(limit=2)
    assert [run.id for run in runs] == [ids[4], ids[3]]


async def test_create_backup_polls_the_operation_to_done(
    cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession
) -> None:
    cloudsql_fake.polls_to_done = 3
    seen: list[str] = []

    async def progress(line: str) -> None:
        seen.append(line)

    run = await admin(cloudsql_fake, http_session).create_backup("before release 1.4", progress=progress)

    assert run.type == "ON_DEMAND" and run.status == "SUCCESSFUL"
    assert run.description == "before release 1.4"
    assert run.id in cloudsql_fake.backup_runs
    assert run.end_time is not None
    (insert,) = api_calls(cloudsql_fake, "POST", "/instances/main-db/backupRuns")
    assert insert.body == {"description": "before release 1.4"}
    polls = [r for r in cloudsql_fake.requests if "/operations/" in r.path]
    assert len(polls) == 3
    assert [line.rsplit(": ", 1)[1] for line in seen] == ["pending", "running", "done"]


async def test_create_backup_without_backup_context_finds_the_run_by_listing(
    cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession
) -> None:
    cloudsql_fake.backup_context = False
    cloudsql_fake.add_run("main-db", started=T0)
    run = await admin(cloudsql_fake, http_session).create_backup("nightly check")
    assert run.description == "nightly check" and run.status == "SUCCESSFUL"
    assert cloudsql_fake.backup_runs[run.id]["type"] == "ON_DEMAND"


async def test_restore_waits_for_the_operation_and_reports_progress(
    cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession
) -> None:
    run_id = cloudsql_fake.add_run("main-db", started=T0)
    seen: list[str] = []

    async def progress(line: str) -> None:
        seen.append(line)

    summary = await admin(cloudsql_fake, http_session).restore(run_id, progress=progress)

    assert cloudsql_fake.instances["main-db"]["restored_from"] == [run_id]
    assert summary.startswith(f"restored Cloud SQL instance demo-project:main-db from backup run {run_id}")
    assert "2025-03-01 03:00 UTC" in summary
    (call,) = api_calls(cloudsql_fake, "POST", "/instances/main-db/restoreBackup")
    assert call.body == {
        "restoreBackupContext": {"backupRunId": run_id, "project": "demo-project", "instanceId": "main-db"}
    }
    assert len(seen) == 3 and seen[-1].endswith("done")
    assert all(f"restore of backup run {run_id}" in line for line in seen)


async def test_wrong_token_is_a_clear_error_without_the_token(
    cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "ya29.wrong-secret-token-987654"
    with pytest.raises(BackupError) as caught:
        await admin(cloudsql_fake, http_session, tokens=StaticToken(wrong)).list_backups()
    message = caught.value.message
    assert message == "the bot's Google credentials may not manage Cloud SQL instance demo-project:main-db"
    assert wrong not in repr(caught.value) and wrong not in str(caught.value.__cause__)
    captured = capsys.readouterr()
    assert wrong not in captured.out + captured.err
    assert repr(StaticToken(wrong)) == "StaticToken(***)"


async def test_unknown_backup_id_is_refused_before_the_restore(
    cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession
) -> None:
    with pytest.raises(BackupError, match=r"^backup run 123 was not found on Cloud SQL instance demo-project:main-db$"):
        await admin(cloudsql_fake, http_session).restore("123")
    assert not api_calls(cloudsql_fake, "POST", "/restoreBackup")
    assert cloudsql_fake.instances["main-db"]["restored_from"] == []


async def test_a_run_of_another_instance_is_not_found(
    cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession
) -> None:
    foreign = cloudsql_fake.add_run("other-db", started=T0)
    with pytest.raises(BackupError, match=f"backup run {foreign} was not found"):
        await admin(cloudsql_fake, http_session).restore(foreign)
    assert cloudsql_fake.instances["main-db"]["restored_from"] == []


async def test_restore_refuses_a_run_that_did_not_succeed(
    cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession
) -> None:
    failed = cloudsql_fake.add_run("main-db", started=T0, status="FAILED", error="disk full")
    with pytest.raises(BackupError, match=f"backup run {failed} is FAILED"):
        await admin(cloudsql_fake, http_session).restore(failed)
    assert not api_calls(cloudsql_fake, "POST", "/restoreBackup")


async def test_fake_answers_restore_of_an_unknown_id_with_google_404(
    cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession
) -> None:
    """The fake itself: restoreBackup of an unknown run is Google's 404 error JSON."""
    url = f"{cloudsql_fake.url}/v1/projects/demo-project/instances/main-db/restoreBackup"
    body = {"restoreBackupContext": {"backupRunId": "42", "project": "demo-project", "instanceId": "main-db"}}
    headers = {"Authorization": f"Bearer {cloudsql_fake.token}"}
    async with http_session.post(url, json=body, headers=headers) as response:
        assert response.status == 404
        payload = await response.json()
    assert payload["error"]["code"] == 404
    assert payload["error"]["message"] == "The backup run does not exist."
    assert payload["error"]["errors"][0]["reason"] == "backupRunDoesNotExist"


@pytest.mark.parametrize("bad", ["1; drop", "", "-1", "12a", "../1", "9" * 20, "9223372036854775808"])
async def test_invalid_backup_id_is_refused_before_any_request(
    cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession, bad: str
) -> None:
    client = admin(cloudsql_fake, http_session)
    with pytest.raises(BackupError, match="is not a Cloud SQL backup run id"):
        await client.restore(bad)
    with pytest.raises(BackupError, match="is not a Cloud SQL backup run id"):
        await client.get_backup(bad)
    assert cloudsql_fake.requests == []


@pytest.mark.parametrize(
    ("project", "instance"),
    [("demo-project/../x", "main-db"), ("demo-project", "main db"), ("Demo", "main-db"), ("demo-project", "a/b")],
)
async def test_invalid_project_or_instance_is_refused(
    http_session: aiohttp.ClientSession, project: str, instance: str
) -> None:
    with pytest.raises(BackupError, match="is not a"):
        CloudSqlAdmin(http_session, project, instance, tokens=StaticToken("t"))


async def test_domain_scoped_project_is_accepted(http_session: aiohttp.ClientSession) -> None:
    client = CloudSqlAdmin(http_session, "example.com:ops-project", "db-1", tokens=StaticToken("t"))
    assert client.describe() == "Cloud SQL instance example.com:ops-project:db-1"


async def test_hung_api_times_out_within_the_configured_time(
    cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession
) -> None:
    cloudsql_fake.hang = True
    started = time.monotonic()
    with pytest.raises(BackupError, match=r"did not answer within 0.3 s"):
        await admin(cloudsql_fake, http_session, timeout=0.3).list_backups()
    assert time.monotonic() - started < 2.0


async def test_unreachable_api_is_one_sentence(http_session: aiohttp.ClientSession) -> None:
    client = CloudSqlAdmin(
        http_session, "demo-project", "main-db", tokens=StaticToken("t"), api_url=f"http://127.0.0.1:{free_port()}"
    )
    with pytest.raises(BackupError, match=r"^could not reach the Cloud SQL Admin API \(connection refused\)$"):
        await client.list_backups()


async def test_server_error_is_retried_once(
    cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = cloudsql_fake.add_run("main-db", started=T0)
    cloudsql_fake.fail_next = [(503, "The service is currently unavailable.")]
    runs = await admin(cloudsql_fake, http_session).list_backups()
    assert [run.id for run in runs] == [run_id]
    assert len(cloudsql_fake.requests) == 2
    logged = capsys.readouterr().err
    assert "cloudsql_retry" in logged and cloudsql_fake.token not in logged


async def test_server_error_twice_gives_up(cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession) -> None:
    cloudsql_fake.fail_next = [(500, "Internal error."), (500, "Internal error.")]
    with pytest.raises(BackupError, match=r"failed \(500\) twice"):
        await admin(cloudsql_fake, http_session).list_backups()
    assert len(cloudsql_fake.requests) == 2


async def test_a_create_that_failed_with_500_is_not_repeated(
    cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession
) -> None:
    """The first POST may have started a backup; repeating it could start a second one."""
    cloudsql_fake.fail_next = [(500, "Internal error.")]
    with pytest.raises(BackupError, match=r"failed \(500\)"):
        await admin(cloudsql_fake, http_session).create_backup("x")
    assert len(cloudsql_fake.requests) == 1


async def test_operation_in_progress_is_named(cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession) -> None:
    run_id = cloudsql_fake.add_run("main-db", started=T0)
    cloudsql_fake.polls_to_done = 1000
    client = admin(cloudsql_fake, http_session, operation_timeout=0.05)
    with pytest.raises(BackupError, match="may still be running"):
        await client.create_backup("slow one")
    with pytest.raises(
        BackupError, match=r"^another operation is in progress on Cloud SQL instance demo-project:main-db"
    ):
        await client.restore(run_id)
    assert cloudsql_fake.instances["main-db"]["restored_from"] == []


async def test_operation_error_carries_the_api_message(
    cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession
) -> None:
    cloudsql_fake.fail_operation = "Backup failed because the instance ran out of disk."
    with pytest.raises(BackupError) as caught:
        await admin(cloudsql_fake, http_session).create_backup("doomed")
    assert caught.value.message == (
        "the on-demand backup failed on Cloud SQL instance demo-project:main-db: "
        "Backup failed because the instance ran out of disk."
    )
    (run,) = cloudsql_fake.backup_runs.values()
    assert run["status"] == "FAILED"


async def test_unknown_instance_is_named(cloudsql_fake: FakeCloudSql, http_session: aiohttp.ClientSession) -> None:
    client = CloudSqlAdmin(
        http_session,
        cloudsql_fake.project,
        "gone-db",
        tokens=StaticToken(cloudsql_fake.token),
        api_url=cloudsql_fake.url,
    )
    with pytest.raises(BackupError, match=r"^Cloud SQL instance demo-project:gone-db was not found$"):
        await client.list_backups()


def _service_account_file(tmp_path: Path, token_uri: str) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "demo-project",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": "opsbot@demo-project.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(info))
    return path


async def test_google_default_token_is_fetched_once_and_reused(
    cloudsql_fake: FakeCloudSql,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Application Default Credentials from a service-account file whose token endpoint is the fake."""
    monkeypatch.setenv(
        "GOOGLE_APPLICATION_CREDENTIALS", str(_service_account_file(tmp_path, f"{cloudsql_fake.url}/token"))
    )
    tokens = GoogleDefaultToken()
    client = admin(cloudsql_fake, http_session, tokens=tokens)
    assert await client.list_backups() == []
    assert await client.list_backups() == []
    assert await tokens.token() == cloudsql_fake.token
    assert cloudsql_fake.token_grants == 1


async def test_google_default_token_failure_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(BackupError, match=r"^could not get a Google access token for Cloud SQL \(\w+\)$"):
        await GoogleDefaultToken().token()


async def test_run_times_are_aware_even_with_nanoseconds() -> None:
    run = BackupRun.from_api(
        {"id": "1", "status": "SUCCESSFUL", "type": "AUTOMATED", "startTime": "2025-03-01T03:00:00.123456789Z"}
    )
    assert run.start_time == datetime(2025, 3, 1, 3, 0, 0, 123456, tzinfo=UTC)
    assert run.end_time is None
