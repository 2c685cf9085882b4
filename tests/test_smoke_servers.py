import asyncpg
import pytest
import redis.asyncio as aioredis
from pymongo import AsyncMongoClient

from tests.fixtures.servers import PostgresServer


async def test_servers_answer(pg_dsn: str, redis_url: str, mongo_uri: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    assert await conn.fetchval("select 1") == 1
    await conn.close()
    r = aioredis.from_url(redis_url)
    assert await r.ping()
    await r.aclose()
    m: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_uri)
    assert (await m.admin.command("ping"))["ok"] == 1
    await m.close()


async def test_the_scram_role_gets_in_only_with_its_password(postgres_server: PostgresServer) -> None:
    """The SCRAM role's password is really checked (the superuser's trust does not cover it)."""
    role = postgres_server.scram_role()
    dsn = await postgres_server.database_with("create table t (x int)", scram=True)
    database = dsn.rsplit("/", 1)[1]

    for good in (dsn, postgres_server.scram_dsn(database, in_query=True)):
        conn = await asyncpg.connect(good, timeout=10)
        try:
            assert await conn.fetchval("select current_user") == role.name
            assert await conn.fetchval("select count(*) from t") == 0  # owns what it made
        finally:
            await conn.close()
    wrong = postgres_server.scram_dsn(database, password="not-" + role.password)
    with pytest.raises(asyncpg.InvalidPasswordError, match=f'password authentication failed for user "{role.name}"'):
        await asyncpg.connect(wrong, timeout=10)
    no_password = f"postgresql://{role.name}@{postgres_server.host}:{postgres_server.port}/{database}"
    with pytest.raises(asyncpg.InvalidPasswordError):  # asked for one, and a trust rule would not have asked
        await asyncpg.connect(no_password, timeout=10)

    admin = await asyncpg.connect(postgres_server.dsn(), timeout=10)
    try:
        stored = await admin.fetchval("select rolpassword from pg_authid where rolname = $1", role.name)
        superuser = await admin.fetchval("select rolsuper from pg_roles where rolname = $1", role.name)
    finally:
        await admin.close()
    assert stored.startswith("SCRAM-SHA-256$")  # a verifier, not md5 and not the password
    assert not role.found_in(stored)
    assert superuser is False
