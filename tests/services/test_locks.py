"""Per-service locks: one winner among concurrent runs and replicas, renewal while held, expiry after a crash."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from services.errors import CommandError, StartupError
from services.locks import NOT_ANSWERING, LocalLocks, RedisLocks, ServiceLocks, open_locks
from tests.fixtures.servers import free_port, redis_process

PREFIX = "opsbot:lock:"
ReplicaFactory = Callable[..., RedisLocks]


@pytest.fixture(params=["local", "redis"])
async def locks(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[ServiceLocks]:
    """Each kind in turn; the Redis one on a client it does not own (as a caller passing its own would)."""
    client = aioredis.from_url(redis_url)
    made: ServiceLocks = LocalLocks() if request.param == "local" else RedisLocks(client)
    yield made
    await made.close()
    await client.aclose()


@pytest.fixture
async def replica(redis_url: str) -> AsyncIterator[ReplicaFactory]:
    """``replica(ttl=0.3)``: a RedisLocks on its own client, as another bot replica would have."""
    made: list[RedisLocks] = []

    def start(ttl: float = 30.0) -> RedisLocks:
        made.append(RedisLocks(aioredis.from_url(redis_url), ttl=ttl, owns_client=True))
        return made[-1]

    yield start
    for one in made:
        await one.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def test_acquire_refuse_naming_the_holder_release_and_take_again(locks: ServiceLocks) -> None:
    assert await locks.holder("shop") is None
    assert await locks.acquire("shop", "rollback by U1") is None
    assert await locks.holder("shop") == "rollback by U1"
    assert await locks.acquire("shop", "restart by U2") == "rollback by U1"
    assert await locks.acquire("shop", "rollback by U1") == "rollback by U1"  # not re-entrant
    assert await locks.acquire("billing", "restart by U2") is None  # another service is its own lock
    assert await locks.release("shop", "rollback by U1") is True
    assert await locks.holder("shop") is None
    assert await locks.acquire("shop", "restart by U2") is None
    assert await locks.holder("shop") == "restart by U2"
    assert await locks.holder("billing") == "restart by U2"


async def test_release_by_someone_else_does_nothing(locks: ServiceLocks) -> None:
    assert await locks.acquire("shop", "run-a") is None
    assert await locks.release("shop", "run-b") is False
    assert await locks.release("nothing-here", "run-a") is False
    assert await locks.holder("shop") == "run-a"
    assert await locks.acquire("shop", "run-b") == "run-a"
    assert await locks.release("shop", "run-a") is True
    assert await locks.release("shop", "run-a") is False  # already gone


async def test_fifty_concurrent_acquires_have_exactly_one_winner(locks: ServiceLocks) -> None:
    holders = [f"run-{i}" for i in range(50)]
    answers = await asyncio.gather(*(locks.acquire("shop", h) for h in holders))
    winners = [h for h, answer in zip(holders, answers, strict=True) if answer is None]
    assert len(winners) == 1
    assert {answer for answer in answers if answer is not None} == {winners[0]}
    assert await locks.holder("shop") == winners[0]


async def test_two_replicas_competing_have_exactly_one_winner(replica: ReplicaFactory) -> None:
    first, second = replica(), replica()
    attempts = [(lock, f"{name}-run-{i}") for i in range(25) for name, lock in (("a", first), ("b", second))]
    answers = await asyncio.gather(*(lock.acquire("shop", h) for lock, h in attempts))
    winners = [h for (_, h), answer in zip(attempts, answers, strict=True) if answer is None]
    assert len(winners) == 1
    assert set(answers) == {None, winners[0]}
    assert await first.holder("shop") == await second.holder("shop") == winners[0]


async def test_a_held_lock_is_renewed_past_its_ttl(replica: ReplicaFactory, raw: aioredis.Redis) -> None:
    long_run, other = replica(ttl=0.3), replica(ttl=0.3)
    assert await long_run.acquire("shop", "long rollback") is None
    await asyncio.sleep(0.8)  # more than twice the ttl
    assert await other.acquire("shop", "restart") == "long rollback"
    assert 0 < await raw.pttl(PREFIX + "shop") <= 300
    assert await long_run.release("shop", "long rollback") is True
    await asyncio.sleep(0.25)  # the cancelled renewal must not bring the key back
    assert await raw.exists(PREFIX + "shop") == 0
    assert await other.acquire("shop", "restart") is None


async def test_a_crashed_replicas_lock_lapses_after_its_ttl(replica: ReplicaFactory, raw: aioredis.Redis) -> None:
    # A replica that took the lock and died: the key is there with its ttl, and nobody renews it.
    assert await raw.set(PREFIX + "shop", "rollback on replica 1", nx=True, px=300)
    survivor = replica(ttl=0.3)
    assert await survivor.acquire("shop", "restart on replica 2") == "rollback on replica 1"
    await asyncio.sleep(0.4)
    assert await survivor.holder("shop") is None
    assert await survivor.acquire("shop", "restart on replica 2") is None


async def test_a_replica_that_stops_renewing_loses_the_lock(replica: ReplicaFactory) -> None:
    frozen, survivor = replica(ttl=0.3), replica(ttl=0.3)
    assert await frozen.acquire("shop", "rollback on replica 1") is None
    # Simulate a hung replica: its renewals stop, its key stays (no release).
    renewals = [t for t in asyncio.all_tasks() if t.get_name() == "opsbot-lock-renewal:shop"]
    assert len(renewals) == 1
    renewals[0].cancel()
    await asyncio.sleep(0.4)
    assert await survivor.acquire("shop", "restart on replica 2") is None
    # The hung replica's late release must not free the survivor's lock.
    assert await frozen.release("shop", "rollback on replica 1") is False
    assert await survivor.holder("shop") == "restart on replica 2"


async def test_renewal_stops_with_a_warning_when_the_lock_is_no_longer_ours(
    replica: ReplicaFactory, raw: aioredis.Redis
) -> None:
    mine = replica(ttl=0.3)
    assert await mine.acquire("shop", "rollback") is None
    with capture_logs() as logs:
        await raw.set(PREFIX + "shop", "intruder", px=250)  # e.g. our key lapsed and another replica took it
        await asyncio.sleep(0.2)
    lost = [e for e in logs if e["event"] == "lock_lost"]
    assert lost and lost[0]["key"] == "shop" and lost[0]["log_level"] == "warning"
    assert await raw.get(PREFIX + "shop") == "intruder"
    await asyncio.sleep(0.15)  # the intruder's key lapses; our stopped renewal must not revive anything
    assert await raw.exists(PREFIX + "shop") == 0
    assert await mine.acquire("shop", "rollback again") is None


async def test_close_releases_what_this_instance_holds(locks: ServiceLocks, replica: ReplicaFactory) -> None:
    other = replica()
    assert await locks.acquire("shop", "run-a") is None
    assert await locks.acquire("billing", "run-b") is None
    assert await other.acquire("search", "run-c") is None
    await locks.close()
    assert await other.holder("search") == "run-c"
    if isinstance(locks, RedisLocks):
        assert await other.holder("shop") is None
        assert await other.holder("billing") is None
        assert await other.acquire("shop", "run-d") is None
    else:
        assert await locks.holder("shop") is None
        assert await locks.holder("billing") is None


async def test_open_locks_without_a_url_is_in_process() -> None:
    for url in (None, ""):
        opened = await open_locks(url)
        assert isinstance(opened, LocalLocks) and opened.kind == "local"
        await opened.close()


async def test_open_locks_with_a_url_shares_locks_through_redis(redis_url: str, raw: aioredis.Redis) -> None:
    opened = await open_locks(redis_url, ttl=5)
    assert isinstance(opened, RedisLocks) and opened.kind == "redis"
    assert await opened.acquire("shop", "rollback") is None
    assert await raw.get(PREFIX + "shop") == "rollback"
    assert 4000 < await raw.pttl(PREFIX + "shop") <= 5000
    await opened.close()
    assert await raw.exists(PREFIX + "shop") == 0
    with pytest.raises(RuntimeError, match="closed"):
        await opened.acquire("shop", "late")


async def test_open_locks_on_a_closed_port_fails_fast_without_the_password() -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    with pytest.raises(StartupError) as caught:
        await open_locks(url, timeout=1)
    assert time.monotonic() - started < 1.5
    message = str(caught.value)
    assert "s3cret-pw" not in message
    assert message.startswith("Cannot reach the lock service (Redis at 127.0.0.1:")
    assert "connection refused" in message


async def test_open_locks_on_a_silent_server_gives_up_after_the_timeout() -> None:
    connections: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(StartupError, match=r"no answer within 0\.3 s"):
            await open_locks(f"redis://:s3cret-pw@127.0.0.1:{port}/0", timeout=0.3)
        assert time.monotonic() - started < 1.0
        assert connections  # it did connect: the timeout is on the answer
    finally:
        server.close()
        await server.wait_closed()


async def test_open_locks_with_a_bad_url_does_not_echo_it() -> None:
    with pytest.raises(StartupError) as caught:
        await open_locks("http://:s3cret-pw@127.0.0.1/0")
    assert "s3cret-pw" not in str(caught.value)
    assert "not valid" in str(caught.value)


async def test_without_redis_a_run_is_refused_not_started_unlocked() -> None:
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1, socket_connect_timeout=1)
    down = RedisLocks(client, owns_client=True)
    try:
        with pytest.raises(CommandError) as caught:
            await down.acquire("shop", "rollback")
        assert caught.value.message == NOT_ANSWERING
        with pytest.raises(CommandError):
            await down.holder("shop")
        assert await down.release("shop", "rollback") is False  # in a finally block: never raises
    finally:
        await down.close()


@pytest.mark.parametrize(("ttl", "renew_every"), [(0, None), (-1, None), (1, 1), (1, 0), (1, 2)])
async def test_nonsense_timings_are_refused(redis_url: str, ttl: float, renew_every: float | None) -> None:
    client = aioredis.from_url(redis_url)
    try:
        with pytest.raises(ValueError, match=r"ttl|renew_every"):
            RedisLocks(client, ttl=ttl, renew_every=renew_every)
    finally:
        await client.aclose()


async def test_a_lease_goes_to_one_caller_and_lapses_after_its_ttl(locks: ServiceLocks) -> None:
    taken = await asyncio.gather(*(locks.lease("alerts-round:1", f"r{i}", 0.3) for i in range(20)))
    assert taken.count(True) == 1
    assert await locks.lease("alerts-round:2", "r1", 0.3)  # another round
    await asyncio.sleep(0.4)
    assert await locks.lease("alerts-round:1", "r2", 0.3)  # lapsed: free again


async def test_redis_down_costs_one_timeout_and_the_first_call_after_it_is_back_succeeds() -> None:
    """A Redis restart leaves the pool's connection stale: the next call reconnects once instead of
    failing; while Redis is down a call fails within its timeout (no minute of retries)."""
    with redis_process() as url:  # the server stops at the end of this block, the client's connection open
        port = int(url.rsplit(":", 1)[1])
        locks = await open_locks(f"{url}/0", timeout=1)
        assert await locks.acquire("shop", "a") is None
        assert await locks.release("shop", "a") is True
    try:
        started = time.monotonic()
        with pytest.raises(CommandError, match="not answering"):
            await locks.acquire("shop", "b")
        assert time.monotonic() - started < 3
        with redis_process(port):
            assert await locks.acquire("shop", "c") is None  # not refused on the stale pooled connection
            assert await locks.holder("shop") == "c"
            assert await locks.release("shop", "c") is True
    finally:
        await locks.close()


async def test_a_redis_restart_between_two_calls_does_not_refuse_the_next_one() -> None:
    with redis_process() as url:
        port = int(url.rsplit(":", 1)[1])
        locks = await open_locks(f"{url}/0", timeout=1)
        assert await locks.acquire("shop", "a") is None
        assert await locks.release("shop", "a") is True
    try:
        with redis_process(port):  # back, while the client still holds its old connection
            assert await locks.acquire("shop", "c") is None
            assert await locks.release("shop", "c") is True
    finally:
        await locks.close()
