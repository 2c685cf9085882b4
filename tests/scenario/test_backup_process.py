"""`opsbot run "backup …"` as cron runs it, and the same process SIGKILLed half-way through a dump:
no object that looks complete, no catalog entry marked good, and no password on pg_dump's argv.
Then, with no `serve` anywhere, the next `opsbot run` (of anything) fails the dead backup once its
heartbeat is older than `stall_timeout` and deletes its partial file, while a backup that another
`opsbot run` is still writing is left alone; `/ops backup list` sweeps the same way."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.state import AuditEvent, BackupRecord, BackupState, StateStore, open_state_store
from tests.fixtures.servers import PG_BIN, PostgresServer
from tests.fixtures.slack import FakeSlack
from tests.fixtures.wait import wait_until
from tests.scenario.test_backups import VIEWER, make_db, open_shop, texts

ROOT = Path(__file__).resolve().parents[2]
BIG_SQL = """
CREATE TABLE big AS
SELECT n, md5(n::text) || md5((n * 3)::text) || md5((n * 7)::text) AS pad FROM generate_series(1, 300000) n;
"""


STALL = 3.0  # the inventory's stall_timeout where a test waits for a heartbeat to go stale
# pg_dump whose output trickles out (so it never stalls, and the backup outlasts STALL) until a file
# named `release` appears beside it.
SLOW_PG_DUMP = """#!{python}
import os, subprocess, sys, time
real = os.path.join({pg_bin!r}, "pg_dump")
if "--version" in sys.argv:
    os.execv(real, [real, *sys.argv[1:]])
gate = os.path.join(os.path.dirname(os.path.abspath(__file__)), "release")
child = subprocess.Popen([real, *sys.argv[1:]], stdout=subprocess.PIPE)
while block := child.stdout.read(16384):
    sys.stdout.buffer.write(block)
    sys.stdout.buffer.flush()
    if not os.path.exists(gate):
        time.sleep(0.04)
sys.exit(child.wait())
"""


def write_inventory(tmp_path: Path, *, stall_timeout: float | None = None, pg_bin: Path | None = None) -> Path:
    path = tmp_path / "inventory.yaml"
    extra = f"  stall_timeout: {stall_timeout}\n" if stall_timeout is not None else ""
    extra += f'  pg_bin: "{pg_bin}"\n' if pg_bin is not None else ""
    path.write_text(
        f"""
backups:
  destinations:
    local: {{type: directory, path: backups}}
  compression: gzip
{extra}
services:
  shop:
    components:
      db: {{type: postgres, dsn: "${{SHOP_DB}}"}}
"""
    )
    return path


def env_for(
    tmp_path: Path, dsn: str, *, stall_timeout: float | None = None, pg_bin: Path | None = None
) -> dict[str, str]:
    return {
        **os.environ,
        "OPSBOT_CONFIG": str(write_inventory(tmp_path, stall_timeout=stall_timeout, pg_bin=pg_bin)),
        "OPSBOT_STATE_DIR": str(tmp_path / "state"),
        "OPSBOT_LOG_FORMAT": "json",
        "SHOP_DB": dsn,
    }


def slow_pg_bin(tmp_path: Path) -> Path:
    """A pg_bin directory whose pg_dump trickles (see SLOW_PG_DUMP); `release` it to finish."""
    directory = tmp_path / "pg_bin"
    directory.mkdir()
    wrapper = directory / "pg_dump"
    wrapper.write_text(SLOW_PG_DUMP.format(python=sys.executable, pg_bin=str(PG_BIN)))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    (directory / "pg_restore").symlink_to(Path(PG_BIN) / "pg_restore")
    return directory


async def opsbot_run(env: dict[str, str], text: str) -> tuple[int | None, str]:
    """`opsbot run TEXT` in a process of its own: its exit code and what it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "run", text, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode()


async def catalog(tmp_path: Path) -> StateStore:
    return await open_state_store(None, default_path=tmp_path / "state" / "state.sqlite3")


async def the_backup(tmp_path: Path) -> BackupRecord:
    store = await catalog(tmp_path)
    try:
        [record] = await store.list_backups()
        return record
    finally:
        await store.close()


async def sweep_events(tmp_path: Path) -> list[AuditEvent]:
    store = await catalog(tmp_path)
    try:
        return [e for e in reversed(await store.audit_events(limit=100)) if e.command == "backup sweep"]
    finally:
        await store.close()


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


async def test_a_backup_killed_half_way_leaves_nothing_that_looks_good_and_the_next_run_sweeps_it(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    dsn = await make_db(postgres_server, BIG_SQL)
    env = env_for(tmp_path, dsn, stall_timeout=STALL)
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
    leftovers = list(target.iterdir())
    assert leftovers and all(".partial-" in p.name for p in leftovers)  # nothing under a final name, no manifest
    record = await the_backup(tmp_path)
    assert record.state is BackupState.RUNNING  # the process died before it could say anything
    assert record.heartbeat_at is not None

    # No `serve` runs anywhere. Wait, on purpose, until the dead writer's heartbeat and its partial
    # file are older than stall_timeout; then any `opsbot run` fails the one and deletes the other.
    last = max([record.heartbeat_at] + [datetime.fromtimestamp(p.stat().st_mtime, UTC) for p in leftovers])
    await asyncio.sleep(max(0.0, (last + timedelta(seconds=STALL + 0.3) - datetime.now(UTC)).total_seconds()))
    code, out = await opsbot_run(env, "help")
    assert code == 0, out[-2000:]
    assert list(target.iterdir()) == []
    swept = await the_backup(tmp_path)
    assert swept.state is BackupState.FAILED
    assert swept.error.startswith("the process running it stopped: no heartbeat since ")
    failing, *deleting = await sweep_events(tmp_path)
    assert failing.args == record.id and failing.detail == f"marked {record.id} failed: {swept.error}"
    assert [e.detail.split(" (")[0] for e in deleting] == [f"deleted the partial {leftovers[0]}"]

    _, out = await opsbot_run(env, "backup list shop")
    assert f"{record.id}" in out and "failed: the process running it stopped: no heartbeat since" in out, out
    assert "· running" not in out
    assert len(await sweep_events(tmp_path)) == 2  # nothing more to do


async def test_a_backup_another_opsbot_run_is_writing_is_not_swept(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    dsn = await make_db(
        postgres_server,
        "CREATE TABLE big AS SELECT n, md5(n::text) || md5((n * 3)::text) || md5((n * 7)::text) AS pad"
        " FROM generate_series(1, 100000) n",
    )
    pg_bin = slow_pg_bin(tmp_path)
    env = env_for(tmp_path, dsn, stall_timeout=STALL, pg_bin=pg_bin)
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "run", "backup shop db", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    target = tmp_path / "backups" / "shop" / "db"
    try:
        partial = await wait_until(
            lambda: list(target.glob("*.partial-*")) if target.is_dir() else [], "the backup starts writing"
        )
        record = await the_backup(tmp_path)
        # Longer than stall_timeout since it started: only its heartbeat says it is alive.
        await asyncio.sleep(
            max(0.0, (record.started_at + timedelta(seconds=STALL + 0.3) - datetime.now(UTC)).total_seconds())
        )
        _, out = await opsbot_run(env, "backup list shop")
        assert writer.returncode is None, "the backup ended before the sweep could be tried on it"
        assert f"{record.id}" in out and "· running" in out, out
        assert (await the_backup(tmp_path)).state is BackupState.RUNNING
        assert partial[0].exists()
        assert await sweep_events(tmp_path) == []
        (pg_bin / "release").touch()
        out_bytes, _ = await asyncio.wait_for(writer.communicate(), 60)
    finally:
        if writer.returncode is None:
            writer.kill()
            await writer.wait()
    assert writer.returncode == 0, out_bytes.decode()[-2000:]
    done = await the_backup(tmp_path)
    assert done.state is BackupState.GOOD and (tmp_path / "backups" / done.key).is_file()


async def test_backup_list_fails_what_a_dead_process_left_running_and_deletes_its_partial_file(
    fake_slack: FakeSlack, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    async with open_shop(fake_slack, tmp_path, postgres_server) as shop:
        stale = datetime.now(UTC) - timedelta(minutes=10)  # the inventory's stall_timeout is 300 s
        backup_id = f"shop-db-{stale:%Y%m%d-%H%M%S}-dead"
        key = f"shop/db/{backup_id}.dump.zst"
        record = BackupRecord(
            id=backup_id, service="shop", component="db", source="postgres", trigger="scheduled",
            requested_by="cron", destination="local", key=key, location=str(shop.backups / key), codec="zstd",
            state=BackupState.RUNNING, started_at=stale, heartbeat_at=stale,
        )  # fmt: skip
        await shop.bot.container.store.create_backup(record)
        partial = shop.backups / f"{key}.partial-0123456789ab"
        partial.parent.mkdir(parents=True)
        partial.write_bytes(b"half a dump")
        os.utime(partial, (stale.timestamp(), stale.timestamp()))

        await shop.ask("backup list shop", VIEWER)
        [answer] = await shop.slack.wait_for(f"response_url/{VIEWER}")

        listing = texts(answer)
        assert f"`{backup_id}`" in listing and "failed: the process running it stopped: no heartbeat since" in listing
        assert not partial.exists()
        swept = await shop.bot.container.store.get_backup(backup_id)
        assert swept is not None and swept.state is BackupState.FAILED
        details = [e.detail for e in await shop.events("backup sweep")]  # type: ignore[attr-defined]
        assert len(details) == 2 and any(d.startswith(f"deleted the partial {partial} ") for d in details)
