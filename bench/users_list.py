"""How long does `/ops users` take over a users table of 100,000 rows? Target: under 1 s.

A private PostgreSQL cluster gets runbook 000's users table (id, student id, name, role, is_active, daily
and total token usage, a password hash never read) with ``--rows`` users, indexed as the app would be
(primary key, unique student id, role, is_active, total tokens). Then `/ops users` runs through the real
router (the console interface) with each filter: top-N in SQL plus one count, never every row.

    uv run python -m bench.users_list [--rows 100000] [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.common import percentile, summary
from bot.console import Console
from bot.container import build_container
from bot.logging import configure_logging
from bot.settings import Settings
from services.inventory import parse_inventory
from services.redaction import Redactor
from tests.fixtures.servers import postgres_cluster

TARGET = 1.0  # seconds
COMMANDS = (
    "users vcbl",
    "users vcbl --role admin",
    "users vcbl --inactive",
    "users vcbl --find 2024012345",
    "users vcbl --find kim%",
    "users vcbl --sort tokens --limit 100",
    "users vcbl --role user --inactive --find lee",
)

SCHEMA = """
create table users (
    id serial primary key,
    student_id varchar(20) unique not null,
    name text not null,
    role text not null default 'user',
    is_active boolean not null default true,
    daily_token_usage integer not null default 0,
    total_token_usage integer not null default 0,
    password_hash text not null
);
create index users_role on users (role);
create index users_active on users (is_active);
create index users_total_tokens on users (total_token_usage desc);
"""

FILL = """
insert into users (student_id, name, role, is_active, daily_token_usage, total_token_usage, password_hash)
select (2024000000 + g)::text,
       (array['kim', 'lee', 'park', 'choi', 'jung'])[1 + g % 5] || ' ' || g,
       case when g % 500 = 0 then 'admin' else 'user' end,
       g % 17 <> 0,
       ((g::bigint * 7919) % 50000)::int,
       ((g::bigint * 104729) % 5000000)::int,
       'scrypt:32768:8:1$' || md5(g::text)
from generate_series(1, $1::int) as g
"""


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    configure_logging("console", "WARNING", Redactor())
    with postgres_cluster() as server, tempfile.TemporaryDirectory(prefix="opsbot-bench-") as tmp:
        dsn = server.dsn(await server.create_database())
        started = time.perf_counter()
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(SCHEMA)
            await conn.execute(FILL, args.rows)
            await conn.execute("analyze users")
        finally:
            await conn.close()
        print(f"filled {args.rows:,} users in {time.perf_counter() - started:.1f} s")
        inventory = f"""
services:
  vcbl:
    components:
      db: {{type: postgres, dsn: '{dsn}', timeout: 10, users: {{}}}}
"""
        settings = Settings(OPSBOT_STATE_DIR=tmp, OPSBOT_CONFIG=str(Path(tmp) / "unused.yaml"))
        loaded = parse_inventory(inventory, "bench", env={})
        worst = 0.0
        async with build_container(settings, redactor=Redactor(), inventory=loaded) as container:
            console = Console(container, None, out=io.StringIO())
            for command in COMMANDS:
                reply = await console.execute(command)  # warm-up; also checks it answers
                if reply.outcome != "ok" or "Users of vcbl" not in reply.text:
                    raise SystemExit(f"/ops {command} did not list users: {reply.text}")
                seconds: list[float] = []
                for _ in range(args.runs):
                    began = time.perf_counter()
                    reply = await console.execute(command)
                    seconds.append(time.perf_counter() - began)
                worst = max(worst, percentile(seconds, 99))
                print(f"/ops {command}\n  {summary('', seconds).strip()}\n  → {reply.text}")
        verdict = "under" if worst < TARGET else "OVER"
        print(f"worst p99 {worst * 1000:.1f} ms over {args.rows:,} rows: {verdict} the {TARGET:g} s target")


if __name__ == "__main__":
    asyncio.run(main())
