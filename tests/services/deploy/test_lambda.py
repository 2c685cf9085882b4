"""Lambda versions and alias rollback (runbook 002) against moto in server mode.

moto does not run the function (that would need Docker), but creating it, publishing versions and
moving aliases are plain API calls it serves. A real boto3 client is given to the provider where a
test must prove that no call (or no UpdateAlias) was made: botocore's ``before-parameter-build`` event records
every operation it is about to send.
"""

from __future__ import annotations

import io
import json
import os
import uuid
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse  # type: ignore[import-untyped]

from bot.logging import configure_logging
from services.deploy.aws_lambda import LambdaProvider
from services.deploy.base import DeployError
from services.redaction import Redactor
from tests.fixtures.aws import FAKE_REGION, FAKE_SECRET_ACCESS_KEY, aws_client
from tests.fixtures.servers import free_port


@dataclass
class Calls:
    """Operations a boto3 client sent, with their parameters."""

    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __call__(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        self.seen.append((model.name, params))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.seen]


@dataclass
class Function:
    name: str
    admin: Any  # a boto3 Lambda client for setting the scene and checking the outcome

    def alias_version(self) -> str:
        return str(self.admin.get_alias(FunctionName=self.name, Name="live")["FunctionVersion"])


@pytest.fixture
def function(moto_endpoint: str) -> Iterator[Function]:
    """A function with versions 1, 2, 3 published and alias ``live`` → 3."""
    iam = aws_client("iam", moto_endpoint)
    admin = aws_client("lambda", moto_endpoint)
    name = f"work-log-{uuid.uuid4().hex[:8]}"
    role = iam.create_role(RoleName=f"{name}-role", AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17"}))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("handler.py", "def handle(event, context):\n    return {'ok': True}\n")
    admin.create_function(
        FunctionName=name,
        Runtime="python3.12",
        Role=role["Role"]["Arn"],
        Handler="handler.handle",
        Code={"ZipFile": archive.getvalue()},
    )
    for number in (1, 2, 3):
        # moto, like AWS, publishes a new version only when code or configuration changed.
        admin.update_function_configuration(FunctionName=name, Environment={"Variables": {"BUILD": str(number)}})
        admin.publish_version(FunctionName=name, Description=f"release {number}")
    admin.create_alias(FunctionName=name, Name="live", FunctionVersion="3")
    try:
        yield Function(name, admin)
    finally:
        admin.delete_function(FunctionName=name)
        iam.delete_role(RoleName=f"{name}-role")
        admin.close()
        iam.close()


ProviderFactory = Callable[..., Awaitable[tuple[LambdaProvider, Calls]]]


@pytest.fixture
async def make_provider(moto_endpoint: str) -> AsyncIterator[ProviderFactory]:
    """``provider, calls = await make_provider(function_name)``: a provider on a recorded client."""
    made: list[tuple[LambdaProvider, Any]] = []

    async def make(name: str, alias: str = "live") -> tuple[LambdaProvider, Calls]:
        client = aws_client("lambda", moto_endpoint)
        calls = Calls()
        client.meta.events.register("before-parameter-build.lambda", calls)
        provider = LambdaProvider(name, alias, FAKE_REGION, endpoint_url=moto_endpoint, timeout=5.0, client=client)
        made.append((provider, client))
        return provider, calls

    yield make
    for provider, client in made:
        await provider.close()
        client.close()


class Notes:
    def __init__(self) -> None:
        self.lines: list[str] = []

    async def __call__(self, line: str) -> None:
        self.lines.append(line)


async def test_releases_are_newest_first_with_the_alias_version_live(
    function: Function, make_provider: ProviderFactory
) -> None:
    provider, calls = await make_provider(function.name)

    releases = await provider.releases()

    assert [r.id for r in releases] == ["3", "2", "1"]
    assert [r.live for r in releases] == [True, False, False]
    assert all(r.ready for r in releases)
    assert releases[0].description == "release 3"
    assert releases[0].status == "Active, alias live"
    assert releases[1].status == "Active"
    assert releases[0].created_at is not None and releases[0].created_at.tzinfo is not None
    assert releases[0].traffic is None
    assert await provider.live() == "3"
    assert "ListVersionsByFunction" in calls.names and "GetAlias" in calls.names
    assert provider.describe() == f"Lambda function {function.name} (alias live) in {FAKE_REGION}"
    assert [r.id for r in await provider.releases(limit=2)] == ["3", "2"]


async def test_rollback_moves_the_alias_with_its_revision_id(
    function: Function, make_provider: ProviderFactory
) -> None:
    provider, calls = await make_provider(function.name)
    notes = Notes()

    summary = await provider.rollback("2", expected_live="3", progress=notes)

    assert summary == f"alias live of {function.name} now points at version 2 (was 3)"
    assert function.alias_version() == "2"
    (update,) = [params for name, params in calls.seen if name == "UpdateAlias"]
    assert update["FunctionVersion"] == "2"
    assert update["RoutingConfig"] == {"AdditionalVersionWeights": {}}
    assert update["RevisionId"]  # optimistic concurrency: AWS refuses if the alias changed meanwhile
    assert notes.lines == [f"Pointing alias live of {function.name} at version 2 (was 3)."]
    releases = await provider.releases()
    assert [r.id for r in releases if r.live] == ["2"]


async def test_rollback_is_refused_when_the_alias_moved_since_the_plan(
    function: Function, make_provider: ProviderFactory
) -> None:
    provider, calls = await make_provider(function.name)
    plan = [r.id for r in await provider.releases() if r.live]
    assert plan == ["3"]
    function.admin.update_alias(FunctionName=function.name, Name="live", FunctionVersion="1")  # someone else

    with pytest.raises(DeployError, match=r"now points at version 1, not version 3 as planned") as caught:
        await provider.rollback("2", expected_live="3", progress=Notes())

    assert "nothing was changed" in caught.value.message
    assert function.alias_version() == "1"
    assert "UpdateAlias" not in calls.names


class AliasMovedMeanwhile:
    """AWS's RevisionId check, which moto skips: just before the provider's UpdateAlias goes out,
    someone else moves the alias (a real update in moto), so the RevisionId the provider read is
    stale and AWS answers 412 PreconditionFailedException. A ``before-call`` hook returns that answer
    the way botocore would have parsed it from AWS."""

    def __init__(self, function: Function, to_version: str) -> None:
        self.function, self.to_version = function, to_version
        self.sent_revisions: list[str] = []

    def __call__(self, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        before = self.function.admin.get_alias(FunctionName=self.function.name, Name="live")["RevisionId"]
        self.function.admin.update_alias(FunctionName=self.function.name, Name="live", FunctionVersion=self.to_version)
        body = json.loads(params["body"])
        self.sent_revisions.append(body.get("RevisionId", ""))
        assert body.get("RevisionId") == before, "the provider must send the RevisionId it read"
        message = (
            "The Revision Id provided does not match the latest Revision Id. "
            "Call the GetAlias API to retrieve the latest Revision Id"
        )
        parsed = {
            "Error": {"Code": "PreconditionFailedException", "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": 412, "HTTPHeaders": {}},
            "Type": "User",
            "message": message,
        }
        return AWSResponse(params["url"], 412, {}, None), parsed


async def test_rollback_is_refused_when_the_alias_moves_between_the_check_and_the_update(
    function: Function, make_provider: ProviderFactory, moto_endpoint: str
) -> None:
    client = aws_client("lambda", moto_endpoint)
    interloper = AliasMovedMeanwhile(function, to_version="1")
    client.meta.events.register("before-call.lambda.UpdateAlias", interloper)
    provider = LambdaProvider(
        function.name, "live", FAKE_REGION, endpoint_url=moto_endpoint, timeout=5.0, client=client
    )
    notes = Notes()
    try:
        with pytest.raises(DeployError) as caught:
            await provider.rollback("2", expected_live="3", progress=notes)
    finally:
        await provider.close()
        client.close()

    assert caught.value.message == (
        f"The alias live of {function.name} was changed by someone else while the rollback ran; nothing was changed."
    )
    assert len(interloper.sent_revisions) == 1 and interloper.sent_revisions[0]
    assert function.alias_version() == "1"  # the other change stands; ours was refused
    assert notes.lines == [f"Pointing alias live of {function.name} at version 2 (was 3)."]


async def test_unknown_version_is_refused_without_an_update(function: Function, make_provider: ProviderFactory) -> None:
    provider, calls = await make_provider(function.name)
    notes = Notes()

    with pytest.raises(DeployError) as caught:
        await provider.rollback("9", expected_live="3", progress=notes)

    assert caught.value.message == f"Function {function.name} has no version 9."
    assert "UpdateAlias" not in calls.names
    assert function.alias_version() == "3"
    assert notes.lines == []


@pytest.mark.parametrize("target", ["3; rm -rf /", "$LATEST", "-1", "0", "3 ", "", "live", "2:live", "0x3", "²"])
async def test_invalid_targets_are_refused_before_any_call(
    function: Function, make_provider: ProviderFactory, target: str
) -> None:
    provider, calls = await make_provider(function.name)

    with pytest.raises(DeployError, match=r"is not a published Lambda version"):
        await provider.rollback(target, expected_live="3", progress=Notes())

    assert calls.names == []
    assert function.alias_version() == "3"


async def test_routing_weights_are_shown_and_cleared_by_a_rollback(
    function: Function, make_provider: ProviderFactory
) -> None:
    function.admin.update_alias(
        FunctionName=function.name, Name="live", RoutingConfig={"AdditionalVersionWeights": {"2": 0.1}}
    )
    provider, _ = await make_provider(function.name)

    by_id = {r.id: r for r in await provider.releases()}

    assert by_id["3"].live and by_id["3"].traffic == 90 and "alias live (90 %)" in by_id["3"].status
    assert not by_id["2"].live and by_id["2"].traffic == 10 and "10 % via alias live" in by_id["2"].status
    # The same version with a canary weight is a legitimate target: all traffic back to 3.
    await provider.rollback("3", expected_live="3", progress=Notes())
    alias = function.admin.get_alias(FunctionName=function.name, Name="live")
    assert alias["FunctionVersion"] == "3"
    assert not (alias.get("RoutingConfig") or {}).get("AdditionalVersionWeights")


async def test_rollback_to_the_live_version_is_refused(function: Function, make_provider: ProviderFactory) -> None:
    provider, calls = await make_provider(function.name)
    with pytest.raises(DeployError, match=r"already points at version 3"):
        await provider.rollback("3", expected_live="3", progress=Notes())
    assert "UpdateAlias" not in calls.names


async def test_restart_is_refused(function: Function, make_provider: ProviderFactory) -> None:
    provider, calls = await make_provider(function.name)
    with pytest.raises(DeployError) as caught:
        await provider.restart(progress=Notes())
    assert caught.value.message == "A Lambda function has nothing to restart; deploy or roll back a version instead."
    assert calls.names == []


async def test_a_missing_alias_is_one_clear_sentence(function: Function, make_provider: ProviderFactory) -> None:
    provider, _ = await make_provider(function.name, alias="prod")
    with pytest.raises(DeployError) as caught:
        await provider.releases()
    assert caught.value.message == (
        f"Could not read the alias of Lambda function {function.name}: "
        f"the function or its alias prod does not exist in {FAKE_REGION}."
    )


@pytest.mark.parametrize(
    ("function_name", "alias", "region"),
    [
        ("fn; rm -rf /", "live", "us-east-1"),
        ("fn", "123", "us-east-1"),
        ("fn", "live", "mars"),
        ("", "live", "us-east-1"),
    ],
)
def test_names_are_checked_against_aws_patterns(function_name: str, alias: str, region: str) -> None:
    with pytest.raises(DeployError):
        LambdaProvider(function_name, alias, region)


async def test_unreachable_endpoint_is_a_deploy_error_without_the_secret_key(
    moto_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "DEBUG", Redactor())  # everything the bot logs, unredacted by a known secret
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_ACCESS_KEY)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    provider = LambdaProvider("work-log-api", "live", FAKE_REGION, endpoint_url=endpoint, timeout=1.0)
    try:
        with pytest.raises(DeployError) as caught:
            await provider.rollback("2", expected_live="3", progress=Notes())
    finally:
        await provider.close()

    message = caught.value.message
    assert message.startswith("Could not look up version 2 of Lambda function work-log-api: could not connect to")
    assert endpoint in message and "connection refused" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    captured = capsys.readouterr()
    for text in (message, repr(caught.value), captured.out, captured.err):
        assert secret not in text and FAKE_SECRET_ACCESS_KEY not in text
