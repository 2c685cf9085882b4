"""Small pieces every platform client shares: AWS error codes, endpoints fit to show, bounded JSON."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import structlog

log = structlog.get_logger(__name__)

BODY_LIMIT = 4 * 1024 * 1024  # bytes of an API answer read at most; a bigger one is refused
_T = TypeVar("_T")


class ThreadedClient:
    """A blocking SDK client (boto3's) made on first use and called on a thread pool of its own, so
    its calls never queue behind the event loop's default executor. A client given from outside
    (tests) is used as is and not closed."""

    def __init__(self, make: Callable[[], Any], *, threads: int, name: str, client: Any = None) -> None:
        self._make = make
        self._client = client
        self._owns_client = client is None
        self._lock = asyncio.Lock()
        self.name = name
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self.closed = False

    async def get(self) -> Any:
        """The client, made (in the pool: boto3 reads files) the first time; RuntimeError once closed."""
        if self.closed:
            raise RuntimeError(f"{self.name} is closed")
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    self._client = await asyncio.get_running_loop().run_in_executor(self.executor, self._make)
        return self._client

    async def call(self, func: Callable[[], _T]) -> _T:
        """Run one blocking call in the pool."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, func)

    async def close(self) -> None:
        """Close the client we made (its connection pool) and stop the threads; only once."""
        if self.closed:
            return
        self.closed = True
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            with contextlib.suppress(Exception):
                await self.call(client.close)
        self.executor.shutdown(wait=False, cancel_futures=True)


# Error codes of AWS APIs (Lambda, CloudWatch) that mean the bot's credentials are not allowed or not valid.
AWS_DENIED = frozenset({"AccessDenied", "AccessDeniedException", "403"})
AWS_BAD_CREDENTIALS = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
    }
)


def aws_error_code(exc: Any) -> str:
    """The error code of a botocore ClientError ("NoSuchBucket"), or its HTTP status."""
    error = exc.response.get("Error") or {}
    code = str(error.get("Code") or "")
    return code or str((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or "")


def public_endpoint(endpoint_url: str | None) -> str | None:
    """``scheme://host:port`` of an endpoint URL: no user, password, path or query in messages."""
    if not endpoint_url:
        return None
    parts = urlsplit(endpoint_url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}" if parts.scheme else f"{host}{port}"


async def read_json(response: aiohttp.ClientResponse, too_big: Callable[[int], Exception]) -> object:
    """The answer's JSON (None when empty or not JSON), read in bounded chunks; an answer over
    BODY_LIMIT raises ``too_big(limit in MiB)``."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > BODY_LIMIT:
            raise too_big(BODY_LIMIT // 1024 // 1024)
        chunks.append(chunk)
    if not chunks:
        return None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        return None


async def close_each(things: Iterable[object], *, what: str) -> None:
    """Close each object that has an async ``close()`` (clients, channels, threads), once each even when
    it serves several keys, logging (not raising) a close that fails."""
    seen: set[int] = set()
    for thing in things:
        close = getattr(thing, "close", None)
        if id(thing) in seen or close is None:
            continue
        seen.add(id(thing))
        try:
            await close()
        except Exception:
            log.warning(f"{what}_close_failed", kind=type(thing).__name__, exc_info=True)


def aws_transport_problem(exc: BaseException, *, service: str, where: str, reading: str, limit: float) -> str:
    """One sentence for a boto3 failure that is not an AWS error answer: no credentials or region, a
    timeout, no connection (``where``: what was read, "Lambda function x"; ``reading``: the same with the
    service, "CloudWatch for Lambda function x")."""
    from botocore.exceptions import (  # type: ignore[import-untyped]
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    from services.failures import network_problem

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return f"No usable AWS credentials were found (environment, profile or instance role) to read {reading}."
    if isinstance(exc, NoRegionError):
        return f"No AWS region is set to read {reading}."
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError):
        return f"{service} did not answer within {limit:g} s for {where}."
    problem = network_problem(exc)
    if isinstance(exc, EndpointConnectionError):
        return f"Could not connect to {service} for {where}" + (f" ({problem})." if problem else ".")
    return f"{problem or type(exc).__name__} talking to {service} for {where}."
