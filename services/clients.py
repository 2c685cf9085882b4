"""Small pieces every platform client shares: AWS error codes, endpoints fit to show, bounded JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

BODY_LIMIT = 4 * 1024 * 1024  # bytes of an API answer read at most; a bigger one is refused


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
