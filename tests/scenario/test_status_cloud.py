"""`/ops status` on the cloud components end to end: cloudrun and cloudsql figures from the Cloud Monitoring
gRPC fake (reached through ``OPSBOT_MONITORING_ENDPOINT``), lambda figures from moto's CloudWatch (reached
through the component's ``endpoint_url``), through signed Slack requests and through `opsbot run`."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from bot.settings import Settings
from services.figures.cloud_monitoring import (
    CPU_UTILIZATIONS,
    REQUEST_COUNT,
    SQL_CPU,
    SQL_DISK_QUOTA,
    SQL_DISK_USED,
    SQL_POSTGRES_BACKENDS,
)
from tests.bot.test_cli import opsbot
from tests.fixtures.aws import FAKE_SECRET_ACCESS_KEY, aws_client
from tests.fixtures.monitoring import FakeMonitoring, linear, start_monitoring_fake
from tests.fixtures.slack import FakeSlack
from tests.scenario.harness import inventory, running_bot

VIEWER = "U0VIEWER"
PROJECT = "demo-project"
REGION = "asia-northeast3"
GIB = 2**30


@pytest.fixture
async def monitoring() -> AsyncIterator[FakeMonitoring]:
    fake = await start_monitoring_fake(project=PROJECT)
    yield fake
    await fake.close()


@pytest.fixture
def cloudwatch(moto_endpoint: str) -> Iterator[Any]:
    client = aws_client("cloudwatch", moto_endpoint)
    yield client
    client.close()


def last_hour() -> list[datetime]:
    """The end times of one point a minute over the hour before now (30 s off the minute)."""
    now = datetime.now(UTC)
    return [now - timedelta(minutes=k, seconds=30) for k in range(60)]


def cpu_histogram(bucket: int, count: int) -> Any:
    counts = [0] * 12  # underflow, ten buckets of 0.1, overflow
    counts[bucket] = count
    return linear(counts, offset=0.0, width=0.1)


def busy_web(fake: FakeMonitoring) -> None:
    """Cloud Run `web`: 900 x 2xx and 100 x 5xx this hour (10 %); CPU samples all in [0.8, 0.9)."""
    revision = {"service_name": "web", "revision_name": "web-00007-abc", "location": REGION, "project_id": PROJECT}
    ends = last_hour()
    fake.add(REQUEST_COUNT, revision, [(end, 15) for end in ends], labels={"response_code_class": "2xx"})
    fake.add(REQUEST_COUNT, revision, [(end, 5) for end in ends[:20]], labels={"response_code_class": "5xx"})
    fake.add(CPU_UTILIZATIONS, revision, [(end, cpu_histogram(9, 5)) for end in ends[:20]])


def full_database(fake: FakeMonitoring) -> None:
    """Cloud SQL `main-db`: 12 backends, CPU at half, 9 GiB used of 10 GiB (90 %: critical, runbook 001)."""
    database = {"database_id": f"{PROJECT}:main-db", "region": REGION, "project_id": PROJECT}
    ends = last_hour()
    fake.add(SQL_POSTGRES_BACKENDS, database, [(end, 12) for end in ends])
    fake.add(SQL_CPU, database, [(end, 0.5) for end in ends])
    fake.add(SQL_DISK_USED, database, [(end, 9 * GIB) for end in ends])
    fake.add(SQL_DISK_QUOTA, database, [(end, 10 * GIB) for end in ends])


def busy_function(client: Any, name: str) -> None:
    """Lambda `name:live`: 200 invocations and 30 errors (15 %) in the hour, 7 concurrent at peak."""
    now = datetime.now(UTC)
    alias = [{"Name": "FunctionName", "Value": name}, {"Name": "Resource", "Value": f"{name}:live"}]
    data = [
        ("Invocations", alias, now - timedelta(minutes=5), 120.0),
        ("Invocations", alias, now - timedelta(minutes=25), 80.0),
        ("Errors", alias, now - timedelta(minutes=5), 30.0),
        ("ConcurrentExecutions", [{"Name": "FunctionName", "Value": name}], now - timedelta(minutes=10), 7.0),
    ]
    client.put_metric_data(
        Namespace="AWS/Lambda",
        MetricData=[
            {"MetricName": metric, "Dimensions": dims, "Timestamp": at, "Value": value, "Unit": "Count"}
            for metric, dims, at, value in data
        ],
    )


def inventory_text(function: str, moto_endpoint: str) -> str:
    return f"""
roles: {{viewer: [{VIEWER}]}}
services:
  web:
    components:
      run: {{type: cloudrun, project: {PROJECT}, region: {REGION}, service: web, timeout: 5}}
      db: {{type: cloudsql, project: {PROJECT}, instance: main-db, timeout: 5}}
  queue-fn:
    components:
      fn: {{type: lambda, function: {function}, alias: live, region: us-east-1, endpoint_url: "{moto_endpoint}",
            timeout: 10}}
"""


def posted_text(call: Any) -> str:
    return json.dumps(call.json_param("blocks"), ensure_ascii=False) + str(call.params.get("text", ""))


async def test_status_of_cloud_run_cloud_sql_and_lambda_through_signed_slack_requests(
    fake_slack: FakeSlack, tmp_path: Path, monitoring: FakeMonitoring, moto_endpoint: str, cloudwatch: Any
) -> None:
    busy_web(monitoring)
    full_database(monitoring)
    function = f"worker-{uuid.uuid4().hex[:8]}"
    busy_function(cloudwatch, function)
    loaded = inventory(inventory_text(function, moto_endpoint))
    async with running_bot(
        fake_slack, tmp_path / "state", loaded, OPSBOT_MONITORING_ENDPOINT=monitoring.address
    ) as bot:
        answer = await bot.command("status web", user=VIEWER)
        assert answer.status == 200 and answer.body == ""
        [post] = await fake_slack.wait_for("chat.postMessage", timeout=20)
        web = posted_text(post)
        assert "Status of web over the last 1h: critical" in web
        # Cloud Run: 100 of 1,000 answered 5xx; the CPU p95 is 15 % into [0.8, 0.9) of the 100 samples.
        assert "*5xx rate 10.0 %* (warning > 5.0 %)" in web
        assert "*CPU p95 89.5 %* (warning > 80.0 %)" in web
        assert "requests 1,000" in web
        # Cloud SQL: 9 of 10 GiB used is critical at exactly 90 % (runbook 001: ≥ 90 %).
        assert "*disk used 90.0 %* (critical ≥ 90.0 %)" in web
        assert "connections (peak) 12" in web and "CPU p95 50.0 %" in web
        # Every query went to the fake and asked for this project's resources only.
        assert monitoring.requests and all(r.name == f"projects/{PROJECT}" for r in monitoring.requests)
        assert any('resource.labels.service_name = "web"' in r.filter for r in monitoring.requests)
        assert any(f'resource.labels.database_id = "{PROJECT}:main-db"' in r.filter for r in monitoring.requests)

        await bot.command("status queue-fn", user=VIEWER)
        posts = await fake_slack.wait_for("chat.postMessage", count=2, timeout=20)
        fns = posted_text(posts[-1])
        assert "Status of queue-fn over the last 1h: warning" in fns
        assert "*error rate 15.0 %* (warning > 5.0 %)" in fns
        assert "invocations 200" in fns and "concurrent executions (peak, whole function) 7" in fns
        for text in (web, fns):
            assert FAKE_SECRET_ACCESS_KEY not in text and "Traceback" not in text


async def test_monitoring_errors_are_named_plainly_through_slack(
    fake_slack: FakeSlack, tmp_path: Path, monitoring: FakeMonitoring, moto_endpoint: str
) -> None:
    import grpc

    monitoring.fail_next = [(grpc.StatusCode.PERMISSION_DENIED, "Permission monitoring.timeSeries.list denied")] * 40
    loaded = inventory(inventory_text("idle-fn", moto_endpoint))
    async with running_bot(
        fake_slack, tmp_path / "state", loaded, OPSBOT_MONITORING_ENDPOINT=monitoring.address
    ) as bot:
        await bot.command("status web", user=VIEWER)
        [post] = await fake_slack.wait_for("chat.postMessage", timeout=20)
        text = posted_text(post)
        assert "Cloud Monitoring refused: permission denied (monitoring.timeSeries.list on project demo-project" in text
        assert "*run* (cloudrun) · unknown" in text and "*db* (cloudsql) · unknown" in text


async def test_status_of_cloud_components_in_opsbot_run(
    tmp_path: Path, monitoring: FakeMonitoring, moto_endpoint: str, cloudwatch: Any
) -> None:
    busy_web(monitoring)
    full_database(monitoring)
    function = f"cli-{uuid.uuid4().hex[:8]}"
    busy_function(cloudwatch, function)
    config = tmp_path / "opsbot.yaml"
    config.write_text(inventory_text(function, moto_endpoint).replace(f"[{VIEWER}]", '["*"]'), encoding="utf-8")
    env = {
        "OPSBOT_CONFIG": str(config),
        "OPSBOT_STATE_DIR": str(tmp_path / "state"),
        "OPSBOT_MONITORING_ENDPOINT": monitoring.address,
    }
    code, out, err = await opsbot("run", "status all", env=env)
    assert "Status of all services over the last 1h: critical" in out, out + err
    assert code != 0  # critical, like `health`
    assert "db (cloudsql) · disk used 90.0 % (critical ≥ 90.0 %) · connections (peak) 12" in out, out
    assert "run (cloudrun) · 5xx rate 10.0 % (warning > 5.0 %) · CPU p95 89.5 % (warning > 80.0 %)" in out
    assert "fn (lambda) · error rate 15.0 % (warning > 5.0 %) · invocations 200" in out
    assert FAKE_SECRET_ACCESS_KEY not in out + err and "Traceback" not in out + err


def test_the_monitoring_endpoint_must_be_host_and_port() -> None:
    assert Settings(OPSBOT_MONITORING_ENDPOINT="127.0.0.1:8085").monitoring_endpoint == "127.0.0.1:8085"
    assert Settings(OPSBOT_MONITORING_ENDPOINT=" ").monitoring_endpoint is None
    with pytest.raises(ValidationError, match="host:port"):
        Settings(OPSBOT_MONITORING_ENDPOINT="https://monitoring.googleapis.com/v3")
