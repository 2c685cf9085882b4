"""Health of a Redis server: PING, memory used against maxmemory, connected clients."""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from services.health import ProbeResult, Status
from services.inventory import Component, RedisComponent
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


def redis_problem(exc: BaseException, timeout: float, redactor: Redactor | None) -> str:
    """Why Redis did not answer, as a sentence without the URL's password."""
    if isinstance(exc, AuthenticationError):
        return "cannot log in: wrong password or user"
    if isinstance(exc, ResponseError) and "NOAUTH" in str(exc):
        return "cannot log in: the server wants a password and none was given"
    if isinstance(exc, TimeoutError | RedisTimeout):  # redis-py's own is not the built-in one
        return f"no answer within {timeout:g} s"
    found = network_problem(exc)
    if found is not None:
        return found
    if isinstance(exc, RedisError):
        return f"Redis error: {short_error(exc, redactor)}"
    return short_error(exc, redactor)


class RedisProbe:
    """PINGs Redis and reads INFO memory and INFO clients."""

    async def probe(self, component: Component) -> ProbeResult:
        """One short-lived client per probe, always closed."""
        if not isinstance(component, RedisComponent):
            raise TypeError(f"RedisProbe cannot probe a {component.type} component")
        started = time.perf_counter()
        url = component.url.get_secret_value()
        redactor = scrubber(url)
        budget = connect_budget(component.timeout)
        try:
            client = aioredis.from_url(url, socket_timeout=budget, socket_connect_timeout=budget)
        except ValueError as exc:
            # The URL itself is wrong; its text may hold the password, so only the class is kept.
            return ProbeResult(Status.CRITICAL, f"the Redis URL is not valid ({type(exc).__name__})", since_ms(started))
        try:
            await client.ping()
            info = await client.info()  # default sections: server, clients, memory among them
        except (RedisError, OSError, TimeoutError) as exc:
            return ProbeResult(Status.CRITICAL, redis_problem(exc, budget, redactor), since_ms(started))
        finally:
            await client.aclose()
        latency = since_ms(started)

        used = int(info.get("used_memory", 0))
        limit = int(info.get("maxmemory", 0))
        connected = int(info.get("connected_clients", 0))
        version = str(info.get("redis_version", "")) or "?"
        facts: dict[str, str | int | float] = {
            "used_memory_bytes": used,
            "maxmemory_bytes": limit,
            "connected_clients": connected,
        }
        facts["version"] = version
        status = Status.HEALTHY
        if limit > 0:
            pct = used / limit * 100
            facts["memory_used_pct"] = round(pct, 1)
            memory_text = f"memory {human_bytes(used)} of {human_bytes(limit)} ({pct:.0f} %)"
            if pct >= component.memory_critical_pct:
                status = Status.CRITICAL
                memory_text += f", at or over {component.memory_critical_pct:g} %"
            elif pct >= component.memory_warning_pct:
                status = Status.WARNING
                memory_text += f", at or over {component.memory_warning_pct:g} %"
        else:
            memory_text = f"memory {human_bytes(used)}, no maxmemory set"
        detail = f"Redis {version} · {memory_text} · {plural(connected, 'client')}"
        return ProbeResult(status, detail, latency, facts)
