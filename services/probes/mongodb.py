"""Health of a MongoDB: ping, server version, document counts of the collections we watch."""

from __future__ import annotations

import time
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.errors import (
    ConfigurationError,
    ConnectionFailure,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)

from services.health import ProbeResult, Status
from services.inventory import Component, MongoComponent
from services.probes._common import connect_budget, network_problem, scrubber, short_error, since_ms
from services.redaction import Redactor


def _problem(exc: BaseException, timeout: float, redactor: Redactor) -> str:
    """Why MongoDB did not answer, as a sentence without the URI's password."""
    if isinstance(exc, OperationFailure) and exc.code in (13, 18):
        return "cannot log in: authentication failed" if exc.code == 18 else "not authorised to run the check"
    if isinstance(exc, ConfigurationError):
        # Raised for a bad URI, whose text may hold the password: keep only the class.
        return f"the MongoDB URI is not valid ({type(exc).__name__})"
    if isinstance(exc, ServerSelectionTimeoutError):
        # Its message lists every server tried and why; "connection refused" is the usual one.
        found = network_problem(exc)
        return found if found and found != "timed out" else f"no server answered within {timeout:g} s"
    if isinstance(exc, ConnectionFailure):
        return network_problem(exc) or short_error(exc, redactor)
    return short_error(exc, redactor)


class MongoProbe:
    """Pings MongoDB with pymongo's async client and counts documents of configured collections."""

    async def probe(self, component: Component) -> ProbeResult:
        """One short-lived client per probe, always closed."""
        if not isinstance(component, MongoComponent):
            raise TypeError(f"MongoProbe cannot probe a {component.type} component")
        started = time.perf_counter()
        uri = component.uri.get_secret_value()
        redactor = scrubber(uri)
        budget = connect_budget(component.timeout)
        # Server selection retries until its timeout and then overshoots it by up to one
        # heartbeat (0.5 s), so it gets a smaller share than the other phases.
        selection = max(0.1, min(component.timeout * 0.5, component.timeout - 0.7))
        try:
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
                uri,
                serverSelectionTimeoutMS=int(selection * 1000),
                connectTimeoutMS=int(budget * 1000),
                socketTimeoutMS=int(budget * 1000),
                appname="opsbot-health",
            )
        except (PyMongoError, ValueError, TypeError) as exc:
            return ProbeResult(Status.CRITICAL, _problem(exc, selection, redactor), since_ms(started))
        try:
            await client.admin.command("ping")
            version = str((await client.admin.command("buildInfo")).get("version", "?"))
            database = client[component.database]
            counts: dict[str, int] = {}
            for name in component.collections:
                counts[name] = await database[name].estimated_document_count()
        except PyMongoError as exc:
            return ProbeResult(Status.CRITICAL, _problem(exc, selection, redactor), since_ms(started))
        finally:
            await client.close()
        latency = since_ms(started)
        facts: dict[str, str | int | float] = {"version": version, "database": component.database}
        facts.update({f"count.{name}": count for name, count in counts.items()})
        counted = [f"{name} {count:,}" for name, count in counts.items()]
        detail = " · ".join([f"MongoDB {version}", *counted]) if counted else f"MongoDB {version} · ping ok"
        return ProbeResult(Status.HEALTHY, detail, latency, facts)
