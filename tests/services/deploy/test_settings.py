"""Emergency settings against the platforms' fakes: the Cloud Run gRPC fake (real google-cloud-run
client), moto in server mode (real boto3) and the Render loopback fake (real HTTP)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from botocore.awsrequest import AWSResponse  # type: ignore[import-untyped]
from google.cloud import run_v2

from services.deploy.aws_lambda import LambdaProvider
from services.deploy.base import DeployError
from services.deploy.cloudrun import CloudRunProvider
from services.deploy.render import RenderProvider
from services.deploy.settings import (
    CloudRunSettings,
    LambdaSettings,
    LiveSettings,
    RenderSettings,
    check_value,
    split_assignment,
)
from services.errors import CommandError
from services.inventory import EnvSetting
from tests.fixtures.aws import FAKE_REGION, aws_client
from tests.fixtures.cloudrun import FakeCloudRun, start_cloudrun_fake
from tests.fixtures.render import API_KEY, SERVICE, FakeRender, start_fake
from tests.services.deploy.test_lambda import Calls, Function, Notes
from tests.services.deploy.test_lambda import function as function

# --- validation ------------------------------------------------------------------------------------


def test_values_are_checked_against_the_declared_pattern_or_choices_as_a_whole() -> None:
    limit = EnvSetting(pattern=r"[0-9]{1,6}")
    assert check_value("DAILY_TOKEN_LIMIT", limit, "10000") == "10000"
    for bad in ("10000x", "x10000", "1234567", ""):
        with pytest.raises(CommandError) as caught:
            check_value("DAILY_TOKEN_LIMIT", limit, bad)
        assert "does not match its declared pattern" in caught.value.message
    provider = EnvSetting(choices=["claude", "openai", "gemini"])
    assert check_value("LLM_PROVIDER", provider, "openai") == "openai"
    with pytest.raises(CommandError) as caught:
        check_value("LLM_PROVIDER", provider, "OpenAI")
    assert caught.value.message == "`LLM_PROVIDER` must be one of claude, openai, gemini; nothing was changed."


def test_an_assignment_is_parsed_and_a_refusal_never_quotes_it() -> None:
    assert split_assignment("LLM_PROVIDER=openai") == ("LLM_PROVIDER", "openai")
    assert split_assignment("A=b=c") == ("A", "b=c")
    for text in ("sk-live-very-secret", "not a name=sk-live-very-secret"):
        with pytest.raises(CommandError) as caught:
            split_assignment(text)
        assert "sk-live" not in caught.value.message


# --- Cloud Run -------------------------------------------------------------------------------------


@pytest.fixture
async def cloudrun() -> AsyncIterator[tuple[FakeCloudRun, CloudRunProvider]]:
    fake = await start_cloudrun_fake(services=("vcbl-chatbot",))
    container = fake.services["vcbl-chatbot"].template.containers[0]
    container.env.append(run_v2.EnvVar(name="DAILY_TOKEN_LIMIT", value="50000"))
    container.env.append(
        run_v2.EnvVar(
            name="OPENAI_API_KEY",
            value_source=run_v2.EnvVarSource(secret_key_ref=run_v2.SecretKeySelector(secret="openai", version="1")),
        )
    )
    fake.deploy("vcbl-chatbot")  # a revision with that env serves
    provider = CloudRunProvider(
        fake.project, fake.region, "vcbl-chatbot", timeout=5, poll_every=0.01, channel_factory=fake.channel
    )
    try:
        yield fake, provider
    finally:
        await provider.close()
        await fake.close()


def _env(fake: FakeCloudRun, service: str = "vcbl-chatbot") -> dict[str, str]:
    return {e.name: e.value for e in fake.services[service].template.containers[0].env}


async def test_cloud_run_reads_only_the_keys_asked_for(cloudrun: tuple[FakeCloudRun, CloudRunProvider]) -> None:
    fake, provider = cloudrun
    view = await CloudRunSettings(provider).read(["DAILY_TOKEN_LIMIT", "LLM_PROVIDER"])
    assert view.values == {"DAILY_TOKEN_LIMIT": "50000", "LLM_PROVIDER": None}
    assert view.version == fake.services["vcbl-chatbot"].etag
    assert view.where.startswith("revision vcbl-chatbot-")


async def test_cloud_run_change_is_a_new_revision_with_the_etag_read_at_plan_time(
    cloudrun: tuple[FakeCloudRun, CloudRunProvider],
) -> None:
    fake, provider = cloudrun
    store = CloudRunSettings(provider)
    before = fake.revisions_of("vcbl-chatbot")[-1]
    planned = await store.read(["DAILY_TOKEN_LIMIT"])
    notes = Notes()
    change = await store.write("DAILY_TOKEN_LIMIT", "10000", planned=planned, progress=notes)
    assert change.before == before and change.after == fake.revisions_of("vcbl-chatbot")[-1] != before
    assert fake.shares("vcbl-chatbot") == {change.after: 100}
    assert _env(fake)["DAILY_TOKEN_LIMIT"] == "10000" and _env(fake)["APP_ENV"] == "production"
    secret = next(e for e in fake.services["vcbl-chatbot"].template.containers[0].env if e.name == "OPENAI_API_KEY")
    assert secret.value_source.secret_key_ref.secret == "openai"  # the secret reference kept as it was
    (update,) = fake.calls("UpdateService")
    assert update.service.etag == planned.version
    assert list(update.update_mask.paths) == ["template", "traffic"]


async def test_cloud_run_changed_since_the_plan_is_refused_and_nothing_is_written(
    cloudrun: tuple[FakeCloudRun, CloudRunProvider],
) -> None:
    fake, provider = cloudrun
    store = CloudRunSettings(provider)
    planned = await store.read(["DAILY_TOKEN_LIMIT"])
    fake.deploy("vcbl-chatbot", image="asia-docker.pkg.dev/demo-project/apps/shop:v2")  # someone deploys
    with pytest.raises(DeployError) as caught:
        await store.write("DAILY_TOKEN_LIMIT", "10000", planned=planned, progress=Notes())
    assert "changed since the plan" in caught.value.message
    assert fake.calls("UpdateService") == []
    assert _env(fake)["DAILY_TOKEN_LIMIT"] == "50000"


async def test_cloud_run_refusing_a_stale_etag_is_one_sentence(cloudrun: tuple[FakeCloudRun, CloudRunProvider]) -> None:
    fake, provider = cloudrun
    store = CloudRunSettings(provider)
    planned = await store.read(["DAILY_TOKEN_LIMIT"])
    fake.fail_next.append(("UpdateService", grpc.StatusCode.ABORTED, "The resource has been modified"))
    with pytest.raises(DeployError) as caught:
        await store.write("DAILY_TOKEN_LIMIT", "10000", planned=planned, progress=Notes())
    assert caught.value.message == "Cloud Run service vcbl-chatbot was changed by someone else meanwhile; plan again."
    assert _env(fake)["DAILY_TOKEN_LIMIT"] == "50000"


async def test_cloud_run_refuses_a_key_set_from_a_secret(cloudrun: tuple[FakeCloudRun, CloudRunProvider]) -> None:
    fake, provider = cloudrun
    store = CloudRunSettings(provider)
    view = await store.read(["OPENAI_API_KEY"])
    assert view.values == {"OPENAI_API_KEY": None} and view.from_secret == {"OPENAI_API_KEY"}
    with pytest.raises(DeployError) as caught:
        await store.write("OPENAI_API_KEY", "sk-x", planned=view, progress=Notes())
    assert "comes from a secret" in caught.value.message and "sk-x" not in caught.value.message
    assert fake.calls("UpdateService") == []


# --- Lambda ----------------------------------------------------------------------------------------


@pytest.fixture
async def lam(function: Function, moto_endpoint: str) -> AsyncIterator[tuple[Function, LambdaProvider, Calls, Any]]:
    client = aws_client("lambda", moto_endpoint)
    calls = Calls()
    client.meta.events.register("before-parameter-build.lambda", calls)
    provider = LambdaProvider(function.name, "live", FAKE_REGION, endpoint_url=moto_endpoint, timeout=5, client=client)
    try:
        yield function, provider, calls, client
    finally:
        await provider.close()
        client.close()


def _variables(function: Function, qualifier: str) -> dict[str, str]:
    config = function.admin.get_function_configuration(FunctionName=function.name, Qualifier=qualifier)
    return dict(config.get("Environment", {}).get("Variables", {}))


async def test_lambda_reads_the_environment_of_the_version_the_alias_serves(
    lam: tuple[Function, LambdaProvider, Calls, Any],
) -> None:
    function, provider, _, _ = lam
    function.admin.update_function_configuration(FunctionName=function.name, Environment={"Variables": {"BUILD": "9"}})
    view = await LambdaSettings(provider).read(["BUILD", "LLM_PROVIDER"])
    assert view.values == {"BUILD": "3", "LLM_PROVIDER": None}  # version 3, not $LATEST
    assert view.version == "3" and view.where == "version 3"


async def test_lambda_change_updates_latest_publishes_and_moves_the_alias(
    lam: tuple[Function, LambdaProvider, Calls, Any],
) -> None:
    function, provider, calls, _ = lam
    store = LambdaSettings(provider, poll_every=0.01)
    planned = await store.read(["LLM_PROVIDER"])
    change = await store.write("LLM_PROVIDER", "openai", planned=planned, progress=Notes())
    assert (change.before, change.after) == ("3", "4")
    assert function.alias_version() == "4"
    assert _variables(function, "4") == {"BUILD": "3", "LLM_PROVIDER": "openai"}  # every other variable kept
    assert _variables(function, "3") == {"BUILD": "3"}  # the old version is there to roll back to
    writes = [name for name in calls.names if not name.startswith("Get")]
    assert writes == ["UpdateFunctionConfiguration", "PublishVersion", "UpdateAlias"]
    alias_update = dict(calls.seen)["UpdateAlias"]
    assert alias_update["FunctionVersion"] == "4" and alias_update["RevisionId"]


async def test_lambda_alias_moved_since_the_plan_is_refused_before_any_write(
    lam: tuple[Function, LambdaProvider, Calls, Any],
) -> None:
    function, provider, calls, _ = lam
    store = LambdaSettings(provider)
    planned = await store.read(["LLM_PROVIDER"])
    function.admin.update_alias(FunctionName=function.name, Name="live", FunctionVersion="2")
    with pytest.raises(DeployError) as caught:
        await store.write("LLM_PROVIDER", "openai", planned=planned, progress=Notes())
    assert "now points at version 2, not 3 as planned" in caught.value.message
    assert "UpdateFunctionConfiguration" not in calls.names and function.alias_version() == "2"


async def test_lambda_unpublished_changes_on_latest_are_not_shipped(
    lam: tuple[Function, LambdaProvider, Calls, Any],
) -> None:
    function, provider, calls, _ = lam
    store = LambdaSettings(provider)
    planned = await store.read(["LLM_PROVIDER"])
    function.admin.update_function_configuration(FunctionName=function.name, Environment={"Variables": {"BUILD": "4"}})
    with pytest.raises(DeployError) as caught:
        await store.write("LLM_PROVIDER", "openai", planned=planned, progress=Notes())
    assert "unpublished changes" in caught.value.message
    assert "UpdateFunctionConfiguration" not in calls.names and function.alias_version() == "3"


async def test_lambda_stale_revision_id_is_refused_and_nothing_is_published(
    lam: tuple[Function, LambdaProvider, Calls, Any],
) -> None:
    """AWS's RevisionId check (moto skips it): the update is answered 412 PreconditionFailed."""
    function, provider, calls, client = lam

    def refuse(params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        assert "Environment" in json.loads(params["body"])
        message = "The Revision Id provided does not match the latest Revision Id."
        parsed = {
            "Error": {"Code": "PreconditionFailedException", "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": 412, "HTTPHeaders": {}},
        }
        return AWSResponse(params["url"], 412, {}, None), parsed

    client.meta.events.register("before-call.lambda.UpdateFunctionConfiguration", refuse)
    store = LambdaSettings(provider)
    planned = await store.read(["LLM_PROVIDER"])
    with pytest.raises(DeployError) as caught:
        await store.write("LLM_PROVIDER", "openai", planned=planned, progress=Notes())
    assert "changed by someone else meanwhile; nothing was changed" in caught.value.message
    assert "PublishVersion" not in calls.names and function.alias_version() == "3"


# --- Render ----------------------------------------------------------------------------------------


@pytest.fixture
async def render() -> AsyncIterator[tuple[FakeRender, RenderProvider]]:
    fake = await start_fake()
    fake.add_deploy(SERVICE, status="live", message="First")
    fake.env_vars[SERVICE] = {"LLM_PROVIDER": "claude", "NOTION_API_KEY": "secret_notion_value"}
    fake.env_vars[SERVICE].update({f"FILLER_{n:03d}": str(n) for n in range(120)})  # a second page
    async with aiohttp.ClientSession() as session:
        yield fake, RenderProvider(session, SERVICE, API_KEY, api_url=fake.url, poll_every=0.01, deploy_timeout=10)
    await fake.close()


async def test_render_reads_declared_keys_across_pages(render: tuple[FakeRender, RenderProvider]) -> None:
    fake, provider = render
    view = await RenderSettings(provider).read(["LLM_PROVIDER", "FILLER_110", "DAILY_TOKEN_LIMIT"])
    assert view.values == {"LLM_PROVIDER": "claude", "FILLER_110": "110", "DAILY_TOKEN_LIMIT": None}
    assert "NOTION_API_KEY" not in view.values
    assert sum(1 for r in fake.requests if r.path.endswith("/env-vars")) == 2


async def test_render_change_sets_the_env_var_then_redeploys_the_live_commit(
    render: tuple[FakeRender, RenderProvider],
) -> None:
    fake, provider = render
    store = RenderSettings(provider)
    live = fake.live(SERVICE)
    planned = await store.read(["LLM_PROVIDER"])
    change = await store.write("LLM_PROVIDER", "openai", planned=planned, progress=Notes())
    assert fake.env_vars[SERVICE]["LLM_PROVIDER"] == "openai"
    writes = [(r.method, r.path, r.body) for r in fake.requests if r.method in ("PUT", "POST")]
    assert writes[0] == ("PUT", f"/v1/services/{SERVICE}/env-vars/LLM_PROVIDER", {"value": "openai"})
    assert writes[1][:2] == ("POST", f"/v1/services/{SERVICE}/deploys")
    assert writes[1][2]["commitId"] == fake.deploy(SERVICE, live or "")["commit"]["id"]
    assert fake.live(SERVICE) != live and "redeployed" in change.summary


async def test_render_value_changed_since_the_plan_is_refused(render: tuple[FakeRender, RenderProvider]) -> None:
    fake, provider = render
    store = RenderSettings(provider)
    planned = await store.read(["LLM_PROVIDER"])
    fake.env_vars[SERVICE]["LLM_PROVIDER"] = "gemini"
    with pytest.raises(DeployError) as caught:
        await store.write("LLM_PROVIDER", "openai", planned=planned, progress=Notes())
    assert "changed since the plan" in caught.value.message
    assert [r for r in fake.requests if r.method in ("PUT", "POST")] == []


async def test_render_deploy_in_progress_is_refused_before_the_env_var_is_set(
    render: tuple[FakeRender, RenderProvider],
) -> None:
    fake, provider = render
    fake.add_deploy(SERVICE, status="build_in_progress")
    store = RenderSettings(provider)
    planned = LiveSettings({"LLM_PROVIDER": "claude"}, "", "")
    with pytest.raises(DeployError) as caught:
        await store.write("LLM_PROVIDER", "openai", planned=planned, progress=Notes())
    assert "in progress" in caught.value.message
    assert [r for r in fake.requests if r.method == "PUT"] == [] and fake.env_vars[SERVICE]["LLM_PROVIDER"] == "claude"
