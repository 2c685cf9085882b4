"""Health of Qdrant collections: each configured collection's status colour and point count."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from qdrant_client import AsyncQdrantClient
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
from qdrant_client.models import CollectionStatus

from services.health import Check, ProbeResult, Status
from services.inventory import Component, QdrantComponent
from services.probes._common import connect_budget, network_problem, scrubber, short_error, since_ms, worst
from services.redaction import Redactor

QdrantClientFactory = Callable[[QdrantComponent], AsyncQdrantClient]

# grey means "optimisation pending until the next update" (e.g. after a restart): the
# collection serves reads and writes, so it is worth a look but nobody needs waking.
COLOUR_STATUS = {
    CollectionStatus.GREEN: Status.HEALTHY,
    CollectionStatus.YELLOW: Status.WARNING,
    CollectionStatus.GREY: Status.WARNING,
    CollectionStatus.RED: Status.CRITICAL,
}


def default_qdrant_client(component: QdrantComponent) -> AsyncQdrantClient:
    """A client for the component: remote by URL (API key if set) or embedded by path."""
    if component.path is not None:
        return AsyncQdrantClient(path=str(component.path))
    return AsyncQdrantClient(
        url=component.url,
        api_key=component.api_key.get_secret_value() if component.api_key else None,
        timeout=max(1, math.floor(component.timeout)),
        # The compatibility check runs a blocking request in a thread for every new client.
        check_compatibility=False,
    )


def missing_collection(exc: Exception) -> bool:
    """Whether get_collection failed because the collection does not exist."""
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code == 404
    # Local mode raises ValueError("Collection NAME not found").
    return isinstance(exc, ValueError) and "not found" in str(exc)


def qdrant_problem(exc: Exception, timeout: float, redactor: Redactor) -> str:
    if isinstance(exc, UnexpectedResponse):
        if exc.status_code in (401, 403):
            return "cannot log in: the API key was refused"
        return f"Qdrant answered {exc.status_code} {exc.reason_phrase}".strip()
    source = exc.source if isinstance(exc, ResponseHandlingException) else exc
    found = network_problem(source)
    if found == "timed out":
        return f"no answer within {timeout:g} s"
    return found or short_error(source, redactor)


class QdrantProbe:
    """Reads each configured collection's info. ``client_factory`` makes the client to use.

    Clients made by the default factory are closed after each probe; a client handed out by an
    injected factory belongs to whoever made it and is left open.
    """

    def __init__(self, client_factory: QdrantClientFactory | None = None) -> None:
        self._factory = client_factory
        self._owns_clients = client_factory is None

    async def probe(self, component: Component) -> ProbeResult:
        """One get_collection per configured collection."""
        if not isinstance(component, QdrantComponent):
            raise TypeError(f"QdrantProbe cannot probe a {component.type} component")
        started = time.perf_counter()
        redactor = scrubber(component.api_key.get_secret_value() if component.api_key else "")
        try:
            client = (self._factory or default_qdrant_client)(component)
        except (ValueError, RuntimeError, OSError) as exc:
            # e.g. local-mode storage already locked by another process.
            return ProbeResult(Status.CRITICAL, f"cannot open Qdrant: {short_error(exc, redactor)}", since_ms(started))
        checks: list[Check] = []
        facts: dict[str, str | int | float] = {}
        try:
            # One budget for all collections, a little under the component's timeout: the client's
            # timeout is per request and whole seconds, so N slow collections would take N times it
            # and the probe would be cut off by the caller without its own reason.
            async with asyncio.timeout(connect_budget(component.timeout)):
                for name in component.collections:
                    check, state, points = await self._collection(client, name, component, redactor)
                    checks.append(check)
                    facts[f"status.{name}"] = state
                    if points is not None:
                        facts[f"points.{name}"] = points
        except TimeoutError:
            silent = f"unreachable: no answer within {component.timeout:g} s"
            for name in component.collections[len(checks) :]:
                checks.append(Check(name, Status.CRITICAL, silent))
                facts[f"status.{name}"] = "error"
        finally:
            if self._owns_clients:
                await client.close()
        latency = since_ms(started)
        status = worst(check.status for check in checks)
        unreachable = {c.detail for c in checks if c.detail.startswith("unreachable: ")}
        if len(unreachable) == 1 and all(c.detail in unreachable for c in checks):
            detail = unreachable.pop().removeprefix("unreachable: ")
        else:
            detail = " · ".join(f"{c.name} {c.detail}" for c in sorted(checks, key=lambda c: -c.status))
        return ProbeResult(status, detail, latency, facts, tuple(checks))

    async def _collection(
        self, client: AsyncQdrantClient, name: str, component: QdrantComponent, redactor: Redactor
    ) -> tuple[Check, str, int | None]:
        """The collection's Check, its state word (colour, missing, error) and point count."""
        try:
            info = await client.get_collection(name)
        except Exception as exc:  # the client raises a different type per transport
            if missing_collection(exc):
                return Check(name, Status.CRITICAL, "missing"), "missing", None
            return (
                Check(name, Status.CRITICAL, f"unreachable: {qdrant_problem(exc, component.timeout, redactor)}"),
                "error",
                None,
            )
        colour = CollectionStatus(info.status)
        points = info.points_count or 0
        status = COLOUR_STATUS.get(colour, Status.CRITICAL)
        return Check(name, status, f"{colour.value} · {points:,} points"), colour.value, points
