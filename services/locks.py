"""Per-service locks that keep two destructive runs off the same service, in one process or across replicas."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.errors import CommandError, StartupError
from services.failures import network_problem, short_error
from services.redaction import Redactor

log = structlog.get_logger(__name__)

NOT_ANSWERING = "The lock service (Redis) is not answering, so nothing was started."
# What a Redis call can raise when the server is down, slow or refuses us.
_REDIS_FAILURES = (RedisError, OSError, TimeoutError)

# SET NX and, when it fails, the current holder, in one atomic step (a GET after a failed SET could
# find the key already expired). 1 means taken; anything else is the holder's value.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
return redis.call('GET', KEYS[1])
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class ServiceLocks(Protocol):
    """One lock per key (a service); never waits: a taken lock is refused at once, naming its holder."""

    kind: str

    async def acquire(self, key: str, holder: str) -> str | None:
        """Take the lock for ``key`` as ``holder``: None on success, else the current holder."""
        ...

    async def release(self, key: str, holder: str) -> bool:
        """Release ``key`` only if ``holder`` holds it; True if it was released."""
        ...

    async def holder(self, key: str) -> str | None:
        """Who holds ``key`` now, or None."""
        ...

    async def lease(self, key: str, holder: str, ttl: float) -> bool:
        """Take ``key`` for ``ttl`` seconds, never renewed nor released (one round of a periodic job
        that one replica should do): True if this caller got it."""
        ...

    async def close(self) -> None:
        """Release what this instance still holds and free its resources."""
        ...


class LocalLocks:
    """Locks for a single replica: a dict, safe for concurrent coroutines (no await between check and set)."""

    kind = "local"

    def __init__(self) -> None:
        self._holders: dict[str, str] = {}
        self._leases: dict[str, float] = {}

    async def acquire(self, key: str, holder: str) -> str | None:
        """Take the lock for ``key`` as ``holder``: None on success, else the current holder (not re-entrant)."""
        current = self._holders.get(key)
        if current is not None:
            return current
        self._holders[key] = holder
        return None

    async def release(self, key: str, holder: str) -> bool:
        """Release ``key`` only if ``holder`` holds it; True if it was released."""
        if self._holders.get(key) != holder:
            return False
        del self._holders[key]
        return True

    async def holder(self, key: str) -> str | None:
        """Who holds ``key`` now, or None."""
        return self._holders.get(key)

    async def lease(self, key: str, holder: str, ttl: float) -> bool:
        """Take ``key`` for ``ttl`` seconds; True if nobody holds it."""
        now = time.monotonic()
        self._leases = {k: until for k, until in self._leases.items() if until > now}
        if key in self._leases:
            return False
        self._leases[key] = now + ttl
        return True

    async def close(self) -> None:
        """Drop every lock: the process is going away with them."""
        self._holders.clear()


@dataclass
class _Held:
    holder: str
    renewal: asyncio.Task[None]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _redactor_for(client: aioredis.Redis) -> Redactor:
    """Masks the client's password in whatever a Redis error says."""
    password = client.connection_pool.connection_kwargs.get("password")
    return Redactor([password] if isinstance(password, str) else [])


class RedisLocks:
    """Locks shared by several replicas through one Redis: ``SET NX PX``, renewed while held.

    A held lock's expiry is pushed back every ``renew_every`` seconds (default ``ttl / 3``), so a long
    run keeps it while a crashed replica's lock lapses within ``ttl``. Every call is bounded by the
    client's socket timeout (``open_locks`` sets one).
    """

    kind = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "opsbot:lock:",
        ttl: float = 30.0,
        renew_every: float | None = None,
        owns_client: bool = False,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"lock ttl must be positive, not {ttl!r}")
        renew_every = ttl / 3 if renew_every is None else renew_every
        if not 0 < renew_every < ttl:
            raise ValueError(f"renew_every must be between 0 and the ttl ({ttl:g} s), not {renew_every!r}")
        self._client = client
        self._prefix = prefix
        self._ttl_ms = max(1, round(ttl * 1000))
        self._renew_every = renew_every
        self._owns_client = owns_client
        self._redactor = _redactor_for(client)
        self._held: dict[str, _Held] = {}
        self._closed = False
        self._acquire_script = client.register_script(_ACQUIRE)
        self._renew_script = client.register_script(_RENEW)
        self._release_script = client.register_script(_RELEASE)

    def _reason(self, exc: BaseException) -> str:
        return network_problem(exc) or short_error(exc, self._redactor)

    async def acquire(self, key: str, holder: str) -> str | None:
        """Take the lock for ``key`` as ``holder``: None on success, else the current holder (not re-entrant).

        Fails closed: if Redis does not answer, raises ``CommandError`` rather than run unlocked.
        """
        if self._closed:
            raise RuntimeError("RedisLocks is closed")
        try:
            answer = await self._acquire_script(keys=[self._prefix + key], args=[holder, self._ttl_ms])
        except _REDIS_FAILURES as exc:
            log.warning("lock_service_unavailable", action="acquire", key=key, reason=self._reason(exc))
            raise CommandError(NOT_ANSWERING) from exc
        if answer != 1:
            return _text(answer) if answer is not None else "someone else"
        previous = self._held.pop(key, None)
        if previous is not None:  # an earlier hold that was lost before its renewal noticed
            previous.renewal.cancel()
        renewal = asyncio.create_task(self._renew(key, holder), name=f"opsbot-lock-renewal:{key}")
        self._held[key] = _Held(holder, renewal)
        return None

    async def _renew(self, key: str, holder: str) -> None:
        """Push the expiry back until released, or until the lock turns out to be someone else's."""
        try:
            while True:
                await asyncio.sleep(self._renew_every)
                try:
                    ours = await self._renew_script(keys=[self._prefix + key], args=[holder, self._ttl_ms])
                except _REDIS_FAILURES as exc:
                    # Keep trying: the lock lasts until its ttl, and the compare step stops us extending
                    # a lock that another replica took in the meantime.
                    log.warning("lock_renewal_failed", key=key, holder=holder, reason=self._reason(exc))
                    continue
                if ours != 1:
                    log.warning("lock_lost", key=key, holder=holder, detail="expired or taken before renewal")
                    return
        finally:
            current = self._held.get(key)
            if current is not None and current.renewal is asyncio.current_task():
                del self._held[key]

    async def release(self, key: str, holder: str) -> bool:
        """Release ``key`` only if ``holder`` holds it (compare-and-delete); True if it was released.

        Never raises for Redis trouble (it runs in ``finally`` blocks): the renewal stops, so the lock
        lapses within the ttl anyway, and a warning is logged.
        """
        held = self._held.get(key)
        if held is not None and held.holder == holder:
            del self._held[key]
            held.renewal.cancel()
        try:
            deleted = await self._release_script(keys=[self._prefix + key], args=[holder])
        except _REDIS_FAILURES as exc:
            log.warning("lock_service_unavailable", action="release", key=key, reason=self._reason(exc))
            return False
        return bool(deleted == 1)

    async def holder(self, key: str) -> str | None:
        """Who holds ``key`` now, or None; ``CommandError`` if Redis does not answer."""
        try:
            value = await self._client.get(self._prefix + key)
        except _REDIS_FAILURES as exc:
            log.warning("lock_service_unavailable", action="holder", key=key, reason=self._reason(exc))
            raise CommandError("The lock service (Redis) is not answering.") from exc
        return None if value is None else _text(value)

    async def lease(self, key: str, holder: str, ttl: float) -> bool:
        """``SET NX PX`` without renewal: True for the one replica that took ``key``."""
        try:
            taken = await self._client.set(self._prefix + "lease:" + key, holder, nx=True, px=max(1, round(ttl * 1000)))
        except (RedisError, OSError) as exc:
            raise CommandError(NOT_ANSWERING) from exc
        return bool(taken)

    async def close(self) -> None:
        """Stop renewing, release every lock still held, and close the client if ``open_locks`` made it.

        Close this after the runs that hold locks have stopped: a released lock lets another replica start.
        """
        if self._closed:
            return
        self._closed = True
        held, self._held = self._held, {}
        for entry in held.values():
            entry.renewal.cancel()
        for key, entry in held.items():
            try:
                await self._release_script(keys=[self._prefix + key], args=[entry.holder])
            except _REDIS_FAILURES as exc:
                log.warning("lock_service_unavailable", action="close", key=key, reason=self._reason(exc))
        for entry in held.values():
            with contextlib.suppress(asyncio.CancelledError):
                await entry.renewal
        if self._owns_client:
            await self._client.aclose()


def _where(url: str) -> str:
    """The Redis server a URL points at, for messages: never its credentials."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return f"socket {parts.path}"
        return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
    except ValueError:
        return "the configured URL"


def _startup_problem(exc: BaseException, timeout: float, redactor: Redactor) -> str:
    if isinstance(exc, AuthenticationError):
        return "cannot log in: wrong password or user"
    if isinstance(exc, ResponseError) and "NOAUTH" in str(exc):
        return "cannot log in: the server wants a password and none was given"
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return f"no answer within {timeout:g} s"
    return network_problem(exc) or short_error(exc, redactor)


# `timeout` is the client's socket timeout for every later call too, not a deadline for this one.
async def open_locks(redis_url: str | None, *, ttl: float = 30.0, timeout: float = 5.0) -> ServiceLocks:  # noqa: ASYNC109
    """In-process locks without a URL; otherwise Redis locks, checked with one PING (``StartupError`` if down)."""
    if not redis_url:
        return LocalLocks()
    try:
        password = urlsplit(redis_url).password
    except ValueError:
        password = None
    redactor = Redactor([password] if password else [])
    try:
        client = aioredis.from_url(
            redis_url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # Once, on a connection error only: a pooled connection gone stale when Redis restarted is
            # reopened, while a call to a Redis that is down stays bounded by one timeout (redis-py's
            # default is ten retries, on timeouts too, which would hold a click for a minute).
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1, supported_errors=(RedisConnectionError,)),
        )
    except ValueError as exc:
        # The message may quote the URL, password and all: keep only the class.
        raise StartupError(f"The lock service's Redis URL is not valid ({type(exc).__name__}).") from None
    try:
        await client.ping()
    except _REDIS_FAILURES as exc:
        await client.aclose()
        reason = _startup_problem(exc, timeout, redactor)
        raise StartupError(f"Cannot reach the lock service (Redis at {_where(redis_url)}): {reason}.") from None
    return RedisLocks(client, ttl=ttl, owns_client=True)
