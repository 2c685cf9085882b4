"""`opsbot run "backup …"` as cron runs it, and the same process SIGKILLed half-way through a dump:
no object that looks complete, no catalog entry marked good, and no password on pg_dump's argv."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.backup.runner import BackupRunner
from services.inventory import load_inventory
from services.locks import LocalLocks
from services.redaction import Redactor
from services.state import BackupState, open_state_store
from tests.fixtures.servers import PostgresServer
from tests.fixtures.wait import wait_until
from tests.scenario.test_backups import make_db

ROOT = Path(__file__).resolve().parents[2]
BIG_SQL = """
CREATE TABLE big AS
SELECT n, md5(n::text) || md5((n * 3)::text) || md5((n * 7)::text) AS pad FROM generate_series(1, 600000) n;
"""


def write_inventory(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(
        """
backups:
  destinations:
    local: {type: directory, path: backups}
  compression: gzip
services:
  shop:
    components:
      db: {type: postgres, dsn: "${SHOP_DB}"}
"""
    )
    return path


def env_for(tmp_path: Path, dsn: str) -> dict[str, str]:
    return {
        **os.environ,
        "OPSBOT_CONFIG": str(write_inventory(tmp_path)),
        "OPSBOT_STATE_DIR": str(tmp_path / "state"),
        "OPSBOT_LOG_FORMAT": "json",
        "SHOP_DB": dsn,
    }


def cmdlines_of_children(pid: int) -> list[str]:
    """The argv of every live descendant of ``pid`` (read from /proc)."""
    found: list[str] = []
    parents = {pid}
    for entry in sorted(Path("/proc").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 0):
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid in parents:
                parents.add(int(entry.name))
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError, IndexError):
            continue
    return found


async def test_opsbot_run_backs_up_and_exits_zero(tmp_path: Path, postgres_server: PostgresServer) -> None:
    dsn = await make_db(postgres_server, "CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2);")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "run", "backup shop db", env=env_for(tmp_path, dsn), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "Backup of shop" in out.decode() and "sha256" in out.decode()
    assert not postgres_server.scram_role().found_in(out + err)
    [dump] = list((tmp_path / "backups" / "shop" / "db").glob("*.dump.gz"))
    assert dump.with_name(dump.name + ".manifest.json").is_file()


async def test_a_backup_killed_half_way_leaves_nothing_that_looks_good(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    dsn = await make_db(postgres_server, BIG_SQL)
    env = env_for(tmp_path, dsn)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "run", "backup shop db", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    target = tmp_path / "backups" / "shop" / "db"
    argv: list[str] = []
    try:

        def writing() -> bool:
            argv.extend(c for c in cmdlines_of_children(proc.pid) if "pg_dump" in c)
            partial = list(target.glob("*.partial-*")) if target.is_dir() else []
            return bool(partial and partial[0].stat().st_size > 0)

        await wait_until(writing, "the dump starts writing", timeout=12)
        argv += [c for c in cmdlines_of_children(proc.pid) if "pg_dump" in c]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        await proc.wait()
    assert argv, "pg_dump was never seen running"
    assert not any(postgres_server.scram_role().found_in(line) for line in argv)
    leftovers = [p.name for p in target.iterdir()]
    assert all(".partial-" in name for name in leftovers)  # nothing under a final name, no manifest
    loaded = load_inventory(env["OPSBOT_CONFIG"], env=env)
    store = await open_state_store(None, default_path=tmp_path / "state" / "state.sqlite3")
    try:
        [record] = await store.list_backups()
        assert record.state is BackupState.RUNNING  # the process died before it could say anything
        runner = BackupRunner(store, loaded.inventory, LocalLocks(), Redactor(), base_dir=tmp_path)
        runner.clock = lambda: datetime.now(UTC) + timedelta(minutes=2)
        [swept] = await runner.sweep()
        assert swept.id == record.id and swept.state is BackupState.FAILED
        assert await store.list_backups(states=[BackupState.GOOD]) == []
    finally:
        await store.close()
