import asyncpg
import redis.asyncio as aioredis
from pymongo import AsyncMongoClient


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
