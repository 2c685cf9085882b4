"""AWS Lambda releases (runbook 002): published versions, and an alias moved between them.

A Lambda "release" is a published version; what serves traffic is whatever version an alias (say
``live``) points at. Rolling back is pointing the alias at an earlier version: immediate, no build.
The update carries the alias's RevisionId, so a concurrent change by someone else makes AWS refuse
it instead of being silently overwritten. boto3 is blocking, so every call runs in a small executor
of this provider's own.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import boto3  # type: ignore[import-untyped]  # boto3 and botocore ship no type information
import structlog
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from services.clients import AWS_BAD_CREDENTIALS, AWS_DENIED, ThreadedClient, aws_error_code, public_endpoint
from services.deploy.base import DeployError, Progress, Release
from services.failures import network_problem

log = structlog.get_logger(__name__)

# AWS's own patterns, narrowed: a plain function name or an unqualified function ARN; an alias name
# that is not all digits (that would be a version); a published version number.
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_FUNCTION_ARN = re.compile(r"arn:aws[a-z-]*:lambda:[a-z]{2}(?:-[a-z]+)+-[0-9]:[0-9]{12}:function:[A-Za-z0-9_-]{1,64}")
_ALIAS = re.compile(r"(?![0-9]+$)[A-Za-z0-9_-]{1,128}")
_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-[0-9]")
_VERSION = re.compile(r"[1-9][0-9]{0,18}")
_MAX_VERSIONS = 10_000  # pages are read to the end (oldest first); this bounds a runaway listing

_T = TypeVar("_T")


def _timestamp(value: object) -> datetime | None:
    """Lambda's LastModified ("2024-05-01T10:00:00.000+0000"; moto adds nanoseconds) as aware UTC."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str) or not value:
        return None
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:?\d\d)?", value.strip())
    if match is None:
        return None
    base, fraction, zone = match.groups()
    text = base + (f".{(fraction or '0')[:6].ljust(6, '0')}")
    if zone in (None, "Z"):
        text += "+00:00"
    else:
        text += zone if ":" in zone else f"{zone[:3]}:{zone[3:]}"
    try:
        return datetime.fromisoformat(text).astimezone(UTC)
    except ValueError:
        return None


def check_version(value: str) -> str:
    """A published version number ("7"), refused before any call otherwise."""
    text = str(value)
    if not _VERSION.fullmatch(text):
        shown = text[:40]
        raise DeployError(f"{shown!r} is not a published Lambda version (a positive number such as 3).")
    return text


def _weights(alias: Mapping[str, Any]) -> dict[str, float]:
    """The alias's additional version weights ({"4": 0.1}), empty when it sends all traffic to one version."""
    routing = alias.get("RoutingConfig")
    if not isinstance(routing, Mapping):
        return {}
    weights = routing.get("AdditionalVersionWeights")
    if not isinstance(weights, Mapping):
        return {}
    found: dict[str, float] = {}
    for version, weight in weights.items():
        with contextlib.suppress(TypeError, ValueError):
            found[str(version)] = float(weight)
    return found


class LambdaProvider:
    """The published versions of one Lambda function and the alias that decides which one serves."""

    kind = "lambda"

    def __init__(
        self,
        function: str,
        alias: str,
        region: str,
        *,
        endpoint_url: str | None = None,
        timeout: float = 30.0,
        client: Any = None,
    ) -> None:
        if not (_FUNCTION_NAME.fullmatch(function) or _FUNCTION_ARN.fullmatch(function)):
            raise DeployError(f"{function[:80]!r} is not a Lambda function name (letters, digits, - and _).")
        if not _ALIAS.fullmatch(alias):
            raise DeployError(f"{alias[:80]!r} is not a Lambda alias name (letters, digits, - and _, not only digits).")
        if not _REGION.fullmatch(region):
            raise DeployError(f"{region[:40]!r} is not an AWS region (such as us-east-1).")
        self.function = function
        self.alias = alias
        self.region = region
        self._name = function.rsplit(":", 1)[-1]  # for messages: the ARN's account id adds nothing
        self._endpoint_url = endpoint_url
        self._endpoint = public_endpoint(endpoint_url)
        self._timeout = timeout
        # Two threads: a listing must not wait behind a slow get_alias, and nothing here needs more.
        self._boto = ThreadedClient(self._make_client, threads=2, name=f"lambda-{self._name[:20]}", client=client)

    def describe(self) -> str:
        return f"Lambda function {self._name} (alias {self.alias}) in {self.region}"

    def __repr__(self) -> str:
        return f"LambdaProvider({self._name!r}, alias={self.alias!r}, region={self.region!r})"

    # -- plumbing ---------------------------------------------------------------------------

    def _make_client(self) -> Any:
        config = Config(
            connect_timeout=self._timeout,
            read_timeout=self._timeout,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        # A session of its own: boto3's default session is not safe to share between threads.
        session = boto3.session.Session()
        return session.client("lambda", region_name=self.region, endpoint_url=self._endpoint_url, config=config)

    async def _get_client(self) -> Any:
        if self._boto.closed:
            raise RuntimeError(f"the provider for {self.describe()} is closed")
        try:
            return await self._boto.get()
        except ValueError:
            raise DeployError(f"The Lambda endpoint of {self._name} is not a valid URL.") from None
        except BotoCoreError as exc:
            raise self._failure(exc, "connect to AWS Lambda") from None

    async def _run(self, action: str, func: Callable[[Any], _T]) -> _T:
        """Run one blocking boto3 call in the executor; botocore errors become one DeployError."""
        client = await self._get_client()
        try:
            return await self._boto.call(lambda: func(client))
        except (ClientError, BotoCoreError) as exc:
            # ``from None``: botocore's text may carry endpoint URLs or request ids, never shown.
            raise self._failure(exc, action) from None

    def _failure(self, exc: BaseException, action: str) -> DeployError:
        log.info("lambda_call_failed", function=self._name, action=action, error=type(exc).__name__)
        return DeployError(f"Could not {action} of Lambda function {self._name}: {self._reason(exc)}.")

    def _reason(self, exc: BaseException) -> str:
        """A plain phrase for a botocore error; never its raw text."""
        where = self._endpoint or f"AWS Lambda in {self.region}"
        if isinstance(exc, ClientError):
            code = aws_error_code(exc)
            if code == "ResourceNotFoundException":
                return f"the function or its alias {self.alias} does not exist in {self.region}"
            if code in AWS_DENIED:
                return "access denied (check the bot's IAM permissions on the function)"
            if code in AWS_BAD_CREDENTIALS:
                return f"AWS refused the bot's credentials ({code})"
            if code in ("TooManyRequestsException", "ThrottlingException"):
                return "AWS is rate-limiting the bot; try again in a minute"
            if code == "ResourceConflictException":
                return "another update of the function is in progress; try again shortly"
            if code == "ServiceException":
                return "AWS Lambda failed; try again later"
            return f"AWS answered {code or 'an unknown error'}"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return "no usable AWS credentials were found (environment, profile or instance role)"
        if isinstance(exc, NoRegionError):
            return "no AWS region is set"
        if isinstance(exc, ConnectTimeoutError):
            return f"connecting to {where} timed out after {self._timeout:g} s"
        if isinstance(exc, ReadTimeoutError):
            return f"{where} did not answer within {self._timeout:g} s"
        if isinstance(exc, EndpointConnectionError):
            problem = network_problem(exc)
            return f"could not connect to {where}" + (f" ({problem})" if problem else "")
        problem = network_problem(exc)
        return f"{problem} talking to {where}" if problem else f"{type(exc).__name__} talking to {where}"

    async def _get_alias(self) -> dict[str, Any]:
        alias = await self._run("read the alias", lambda c: c.get_alias(FunctionName=self.function, Name=self.alias))
        return dict(alias)

    # -- the ReleaseProvider protocol -------------------------------------------------------------

    async def live(self) -> str:
        """The version the alias points at now."""
        return str((await self._get_alias()).get("FunctionVersion", ""))

    async def releases(self, limit: int = 10) -> list[Release]:
        """Published versions ($LATEST left out), newest first; the alias's version marked live."""
        if not 1 <= limit <= 1000:
            raise DeployError("Ask for between 1 and 1000 Lambda versions.")

        def listing(client: Any) -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = []
            paginator = client.get_paginator("list_versions_by_function")
            for page in paginator.paginate(FunctionName=self.function, PaginationConfig={"PageSize": 50}):
                for item in page.get("Versions", []):
                    if _VERSION.fullmatch(str(item.get("Version", ""))):
                        found.append(dict(item))
                if len(found) >= _MAX_VERSIONS:
                    break
            return found

        versions = await self._run("list the versions", listing)
        alias = await self._get_alias()
        current = str(alias.get("FunctionVersion", ""))
        weights = _weights(alias)
        versions.sort(key=lambda item: int(str(item["Version"])), reverse=True)
        return [self._release(item, current, weights) for item in versions[:limit]]

    def _release(self, item: Mapping[str, Any], current: str, weights: dict[str, float]) -> Release:
        version = str(item["Version"])
        state = str(item.get("State") or "Active")  # versions published before states existed have none
        update = str(item.get("LastUpdateStatus") or "")
        status = state if update in ("", "Successful") else f"{state}, last update {update}"
        traffic: int | None = None
        if weights:
            if version == current:
                traffic = round(100 * (1 - sum(weights.values())))
                status += f", alias {self.alias} ({traffic} %)"
            elif version in weights:
                traffic = round(100 * weights[version])
                status += f", {traffic} % via alias {self.alias}"
        elif version == current:
            status += f", alias {self.alias}"
        description = str(item.get("Description") or "").strip()
        if not description:
            sha = str(item.get("CodeSha256") or "")
            description = f"code {sha[:12]}" if sha else ""
        return Release(
            id=version,
            created_at=_timestamp(item.get("LastModified")),
            description=description,
            live=version == current,
            ready=state == "Active" and update != "Failed",
            traffic=traffic,
            status=status,
        )

    async def rollback(self, target: str, *, expected_live: str, progress: Progress) -> str:
        """Point the alias at ``target`` (an earlier published version), if it still points at
        ``expected_live``; the RevisionId makes AWS refuse the update if the alias moved meanwhile."""
        version = check_version(target)
        planned = str(expected_live)[:40]

        def lookup(client: Any) -> dict[str, Any] | None:
            try:
                return dict(client.get_function(FunctionName=self.function, Qualifier=version))
            except ClientError as exc:
                if aws_error_code(exc) == "ResourceNotFoundException":
                    return None
                raise

        found = await self._run(f"look up version {version}", lookup)
        if found is None:
            raise DeployError(f"Function {self._name} has no version {version}.")
        config = found.get("Configuration") or {}
        state = str(config.get("State") or "Active")
        update = str(config.get("LastUpdateStatus") or "")
        if state != "Active" or update == "Failed":
            shown = state if update in ("", "Successful") else f"{state}, last update {update}"
            raise DeployError(f"Version {version} of {self._name} is not ready ({shown}); nothing was changed.")

        alias = await self._get_alias()
        current = str(alias.get("FunctionVersion", ""))
        if current != planned:
            raise DeployError(
                f"The alias {self.alias} of {self._name} now points at version {current}, not version {planned} "
                "as planned: it changed since the plan was made, so nothing was changed."
            )
        if current == version and not _weights(alias):
            raise DeployError(f"The alias {self.alias} of {self._name} already points at version {version}.")

        revision = str(alias.get("RevisionId") or "")
        await progress(f"Pointing alias {self.alias} of {self._name} at version {version} (was {current}).")

        def move(client: Any) -> dict[str, Any]:
            options: dict[str, Any] = {
                "FunctionName": self.function,
                "Name": self.alias,
                "FunctionVersion": version,
                "RoutingConfig": {"AdditionalVersionWeights": {}},
            }
            if revision:
                options["RevisionId"] = revision
            try:
                return dict(client.update_alias(**options))
            except ClientError as exc:
                if aws_error_code(exc) == "PreconditionFailedException":
                    raise _Drifted from None
                raise

        try:
            updated = await self._run(f"move the alias {self.alias}", move)
        except _Drifted:
            raise DeployError(
                f"The alias {self.alias} of {self._name} was changed by someone else while the rollback ran; "
                "nothing was changed."
            ) from None
        now = str(updated.get("FunctionVersion", ""))
        if now != version:
            raise DeployError(f"AWS kept the alias {self.alias} of {self._name} at version {now}, not {version}.")
        log.info("lambda_alias_moved", function=self._name, alias=self.alias, version=version, previous=current)
        return f"alias {self.alias} of {self._name} now points at version {version} (was {current})"

    async def restart(self, *, progress: Progress) -> str:
        """Lambda has no running instance to restart."""
        raise DeployError("A Lambda function has nothing to restart; deploy or roll back a version instead.")

    async def close(self) -> None:
        """Close the client we made (its connection pool) and stop the executor."""
        await self._boto.close()


class _Drifted(Exception):
    """update_alias was refused because the alias's RevisionId changed (inside the executor)."""
