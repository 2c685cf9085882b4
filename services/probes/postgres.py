"""Health of a PostgreSQL database: can we log in, which version, how big, how many connections."""

from __future__ import annotations

import time
from typing import Any

import asyncpg  # asyncpg ships no type information

from services.health import ProbeResult, Status
from services.inventory import Component, PostgresComponent
from services.probes._common import (
    connect_budget,
    human_bytes,
    network_problem,
    plural,
    scrubber,
    short_error,
    since_ms,
)
from services.redaction import Redactor

_FACTS_SQL = """
select current_setting('server_version') as version,
       pg_database_size(current_database()) as size_bytes,
       (select count(*) from pg_stat_activity where datname = current_database()) as connections,
       current_setting('max_connections')::int as max_connections,
       current_database() as database
"""


def login_problem(exc: BaseException, timeout: float, redactor: Redactor) -> str:
    """A sentence for the on-call reader saying why we could not connect. Never the password."""
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return f"cannot log in: {redactor.redact(str(exc))}"
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return f"cannot log in: {redactor.redact(str(exc))}"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"database not found: {redactor.redact(str(exc))}"
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return "too many connections: the server refuses new ones"
    if isinstance(exc, asyncpg.CannotConnectNowError):
        return "the server is starting up or shutting down"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, asyncpg.PostgresError):
        return f"PostgreSQL refused the connection: {redactor.redact(str(exc))}"
    if isinstance(exc, asyncpg.ClientConfigurationError | ValueError):
        # The DSN itself is wrong; its text may hold the password, so only the class is kept.
        return f"the connection string is not valid ({type(exc).__name__})"
    return network_problem(exc) or short_error(exc, redactor)


class PostgresProbe:
    """Connects with the component's DSN and reads version, size and connection count."""

    async def probe(self, component: Component) -> ProbeResult:
        """Log in, run one query, report what the server says about itself."""
        if not isinstance(component, PostgresComponent):
            raise TypeError(f"PostgresProbe cannot probe a {component.type} component")
        started = time.perf_counter()
        dsn = component.dsn.get_secret_value()
        redactor = scrubber(dsn)
        budget = connect_budget(component.timeout)
        try:
            conn: Any = await asyncpg.connect(dsn, timeout=budget)
        except Exception as exc:
            return ProbeResult(Status.CRITICAL, login_problem(exc, budget, redactor), since_ms(started))
        try:
            row = await conn.fetchrow(_FACTS_SQL, timeout=budget)
        except Exception as exc:
            conn.terminate()
            problem = network_problem(exc) or short_error(exc, redactor)
            return ProbeResult(Status.CRITICAL, f"logged in, but the check query failed: {problem}", since_ms(started))
        except BaseException:
            conn.terminate()  # cancelled: don't wait for a polite goodbye
            raise
        await conn.close(timeout=budget)
        latency = since_ms(started)
        version = str(row["version"]).split()[0]
        size = int(row["size_bytes"])
        connections = int(row["connections"])
        facts: dict[str, str | int | float] = {
            "version": version,
            "database": str(row["database"]),
            "size_bytes": size,
            "size": human_bytes(size),
            "connections": connections,
            "max_connections": int(row["max_connections"]),
        }
        detail = f"PostgreSQL {version} · {human_bytes(size)} · {plural(connections, 'connection')}"
        return ProbeResult(Status.HEALTHY, detail, latency, facts)
