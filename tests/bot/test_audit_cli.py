"""`opsbot audit verify|export` against SQLite and PostgreSQL state.

A few tests run the real process, as tests/bot/test_cli.py does; the rest call ``bot.cli.main`` in
this process (in a thread, since it runs its own event loop), because each `python -m bot.cli`
spends seconds importing ``bot.container``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from bot.audit_cli import EXPORT_FIELDS
from bot.cli import main
from services.state import GENESIS_HASH, AuditEvent, AuditRecord, chain_hash
from services.state.base import AUDIT_BATCH_SIZE
from tests.bot.test_cli import opsbot
from tests.fixtures.servers import free_port
from tests.state.conftest import Backend
from tests.state.test_store import forge_in_middle, forge_past_head, record


@dataclass(frozen=True)
class State:
    """A state database plus the environment that points the CLI at it (and its inventory nowhere)."""

    backend: Backend
    env: dict[str, str]


Run = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def audit(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """``audit(*args, env=...)``: run `opsbot audit ARGS` in-process; (exit code, stdout, stderr)."""

    def run_main(argv: list[str]) -> int:
        try:
            return main(argv)
        except SystemExit as exc:  # argparse and bad settings exit; the process would have too
            return int(exc.code or 0)

    async def run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
        for name in list(os.environ):
            if name.startswith(("SLACK_", "OPSBOT_")):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        code = await asyncio.to_thread(run_main, ["audit", *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(params=["sqlite", "postgres"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> State:
    nowhere = {"OPSBOT_CONFIG": str(tmp_path / "no-such-inventory.yaml")}
    if request.param == "sqlite":
        directory = tmp_path / "state"
        db = directory / "state.sqlite3"
        return State(Backend("sqlite", f"sqlite://{db}", db), {**nowhere, "OPSBOT_STATE_DIR": str(directory)})
    dsn = request.getfixturevalue("pg_dsn")
    return State(Backend("postgres", dsn, tmp_path / "unused.db"), {**nowhere, "OPSBOT_STATE_URL": dsn})


def varied(n: int) -> AuditRecord:
    """Records that exercise the export: no service, non-ASCII text, quotes and a newline."""
    if n % 3 == 0:
        return record(n, service=None, detail="백업 완료 ✓\nsecond line")
    if n % 3 == 1:
        return record(n, args=f"""shop --note "it's {n}\"""")
    return record(n, actor="U002", outcome="denied")


async def populate(state: State, count: int) -> list[AuditEvent]:
    store = await state.backend.open()
    try:
        return [await store.append_audit(varied(n)) for n in range(1, count + 1)]
    finally:
        await store.close()


async def test_the_real_process_verifies_and_exports(state: State) -> None:
    events = await populate(state, 5)
    code, out, err = await opsbot("audit", "export", env=state.env)
    assert (code, err) == (0, "")
    assert [json.loads(line)["hash"] for line in out.splitlines()] == [e.hash for e in events]

    await state.backend.allow_tampering()
    await state.backend.execute("DELETE FROM audit_events WHERE seq = 2")
    code, out, err = await opsbot("audit", "verify", env=state.env)
    assert (code, out) == (1, "")
    assert err.startswith("audit log BROKEN at event #2: ") and "Traceback" not in err


async def test_the_real_process_says_in_one_line_that_the_state_is_unreachable(tmp_path: Path) -> None:
    env = {
        "OPSBOT_CONFIG": str(tmp_path / "nowhere.yaml"),
        "OPSBOT_STATE_URL": f"postgresql://opsbot:db-Pa55-word@127.0.0.1:{free_port()}/opsbot",
    }
    code, out, err = await opsbot("audit", "verify", env=env)
    assert (code, out) == (1, "")
    assert err.startswith("opsbot: cannot open the state store (postgresql 127.0.0.1:")
    assert err.endswith("/opsbot): connection refused\n") and err.count("\n") == 1
    assert "db-Pa55-word" not in err


async def test_verify_an_intact_log(state: State, audit: Run) -> None:
    await populate(state, 0)  # an empty, migrated store
    code, out, err = await audit("verify", env=state.env)
    assert (code, out, err) == (0, "audit log intact: 0 events\n", "")

    events = await populate(state, 5)
    code, out, err = await audit("verify", env=state.env)
    assert (code, err) == (0, "")
    assert out == f"audit log intact: 5 events, head {events[-1].hash[:8]}…\n"


async def edit(backend: Backend, events: list[AuditEvent]) -> None:
    await backend.allow_tampering()
    await backend.execute("UPDATE audit_events SET args = 'shop --all' WHERE seq = 3")


async def delete(backend: Backend, events: list[AuditEvent]) -> None:
    await backend.allow_tampering()
    await backend.execute("DELETE FROM audit_events WHERE seq = 3")


async def insert_in_middle(backend: Backend, events: list[AuditEvent]) -> None:
    await forge_in_middle(backend, events, 3)


async def insert_past_head(backend: Backend, events: list[AuditEvent]) -> None:
    await forge_past_head(backend, events, chained=False)


async def append_chained_without_head(backend: Backend, events: list[AuditEvent]) -> None:
    await forge_past_head(backend, events, chained=True)


Tamper = Callable[[Backend, list[AuditEvent]], Awaitable[None]]


@pytest.mark.parametrize(
    ("tamper", "broken"),
    [
        (edit, 3),
        (delete, 3),
        (insert_in_middle, 4),  # the forged #3 is a valid link; the event after it no longer is
        (insert_past_head, 6),
        (append_chained_without_head, 6),
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
async def test_verify_names_the_first_broken_event(state: State, tamper: Tamper, broken: int, audit: Run) -> None:
    events = await populate(state, 5)
    await tamper(state.backend, events)
    code, out, err = await audit("verify", env=state.env)
    assert code == 1 and out == ""
    first, *hint = err.splitlines()
    assert first.startswith(f"audit log BROKEN at event #{broken}: ")
    assert f"An event was edited, removed or inserted at or before #{broken} (" in hint[0]
    assert "Traceback" not in err


def chain_of(lines: list[dict[str, Any]], prev: str = GENESIS_HASH) -> None:
    """Recompute every hash from the exported text alone, as an outside auditor would."""
    names = [f.name for f in dataclass_fields(AuditRecord)]
    for line in lines:
        assert line["prev_hash"] == prev, f"#{line['seq']} does not follow the line before it"
        recorded = AuditRecord(**{name: line[name] for name in names})
        assert chain_hash(prev, recorded, datetime.fromisoformat(line["ts"])) == line["hash"], f"#{line['seq']}"
        prev = line["hash"]


async def test_export_round_trips(state: State, tmp_path: Path, audit: Run) -> None:
    count = 2 * AUDIT_BATCH_SIZE + 3  # more than one batch
    events = await populate(state, count)

    code, out, err = await audit("export", env=state.env)
    assert (code, err) == (0, "")
    lines = [json.loads(text) for text in out.splitlines()]
    assert len(lines) == count
    assert all(tuple(line) == EXPORT_FIELDS for line in lines)
    assert [line["seq"] for line in lines] == list(range(1, count + 1))
    for line, event in zip(lines, events, strict=True):
        assert event.ts is not None
        assert datetime.fromisoformat(line["ts"]) == event.ts and line["ts"].endswith("+00:00")
        assert {**line, "ts": event.ts} == {name: getattr(event, name) for name in EXPORT_FIELDS}
    assert lines[2]["service"] is None and lines[2]["detail"] == "백업 완료 ✓\nsecond line"
    chain_of(lines)
    code, verified, _ = await audit("verify", env=state.env)
    assert code == 0 and verified.startswith(f"audit log intact: {count:,} events, head {lines[-1]['hash'][:8]}")

    code, out, err = await audit("export", "--since-seq", str(count - 4), env=state.env)
    assert (code, err) == (0, "")
    tail = [json.loads(text) for text in out.splitlines()]
    assert tail == lines[-4:]
    chain_of(tail, prev=lines[-5]["hash"])

    target = tmp_path / "audit.jsonl"
    code, out, err = await audit("export", "--output", str(target), env=state.env)
    assert (code, out) == (0, "")
    assert err == f"exported {count:,} audit event(s) (#1-#{count}) to {target}\n"
    assert [json.loads(text) for text in target.read_text(encoding="utf-8").splitlines()] == lines
    code, _, err = await audit("export", "-o", str(target), "--since-seq", str(count), env=state.env)
    assert code == 0 and err == f"exported 0 audit event(s) to {target}\n" and target.read_text() == ""


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def leftovers(directory: Path) -> list[str]:
    return [name for name in entries(directory) if name.endswith(".partial")]


async def test_export_to_a_file_is_all_or_nothing(tmp_path: Path, audit: Run) -> None:
    directory = tmp_path / "state"
    env = {"OPSBOT_STATE_DIR": str(directory), "OPSBOT_CONFIG": str(tmp_path / "nowhere.yaml")}
    db = directory / "state.sqlite3"
    state = State(Backend("sqlite", f"sqlite://{db}", db), env)
    await populate(state, 5)

    code, out, err = await audit("export", "-o", str(tmp_path / "missing" / "audit.jsonl"), env=env)
    assert (code, out) == (1, "")
    assert err == f"opsbot: cannot write {tmp_path / 'missing' / 'audit.jsonl'}: No such file or directory\n"
    assert not (tmp_path / "missing").exists()

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    code, _, err = await audit("export", "-o", str(occupied), env=env)
    assert code == 1 and err == f"opsbot: cannot replace {occupied}: Is a directory\n"
    assert occupied.is_dir() and entries(occupied) == [] and leftovers(tmp_path) == []

    # A row the store cannot read, after two good ones: the export fails part-way through.
    target = tmp_path / "audit.jsonl"
    target.write_text("the previous export\n")
    await state.backend.allow_tampering()
    await state.backend.execute("UPDATE audit_events SET ts = 'not a time' WHERE seq = 3")
    code, out, err = await audit("export", "--output", str(target), env=env)
    assert (code, out) == (1, "")
    assert err.count("\n") == 1
    assert err.startswith("opsbot: audit export failed after 2 event(s): ValueError: Invalid isoformat string")
    assert err.endswith(f"; {target} was not written\n")
    assert target.read_text() == "the previous export\n" and leftovers(tmp_path) == []

    code, out, err = await audit("export", env=env)
    assert code == 1 and len(out.splitlines()) == 2
    assert err.startswith("opsbot: audit export failed after 2 event(s)") and "the output is incomplete" in err
    code, out, err = await audit("verify", env=env)
    assert code == 1 and out == ""
    assert err.startswith("opsbot: cannot read the audit log to verify it: ValueError: Invalid isoformat string")


@pytest.mark.parametrize("action", ["verify", "export", "export-to-file"])
async def test_unreachable_postgres_state_is_one_line(tmp_path: Path, action: str, audit: Run) -> None:
    env = {
        "OPSBOT_CONFIG": str(tmp_path / "nowhere.yaml"),
        "OPSBOT_STATE_URL": f"postgresql://opsbot:db-Pa55-word@127.0.0.1:{free_port()}/opsbot",
    }
    args = ["export", "--output", str(tmp_path / "audit.jsonl")] if action == "export-to-file" else [action]
    code, out, err = await audit(*args, env=env)
    assert (code, out) == (1, "")
    assert err.count("\n") == 1
    assert err.startswith("opsbot: cannot open the state store (postgresql 127.0.0.1:")
    assert err.endswith("/opsbot): connection refused\n")
    assert "db-Pa55-word" not in err and entries(tmp_path) == []


async def test_missing_sqlite_state_is_not_created(tmp_path: Path, audit: Run) -> None:
    directory = tmp_path / "state"
    for args in (["verify"], ["export"]):
        code, out, err = await audit(*args, env={"OPSBOT_STATE_DIR": str(directory)})
        assert (code, out) == (1, "")
        assert err.startswith(f"opsbot: no state store at {directory / 'state.sqlite3'}: set OPSBOT_STATE_DIR")
    assert not directory.exists()
    missing = tmp_path / "elsewhere.db"
    code, _, err = await audit("verify", env={"OPSBOT_STATE_URL": f"sqlite://{missing}"})
    assert code == 1 and f"no state store at {missing}" in err and not missing.exists()


async def test_since_seq_must_be_a_seq(audit: Run) -> None:
    code, _, err = await audit("export", "--since-seq", "-1", env={})
    assert code == 2 and "must be 0 or more" in err
    code, _, err = await audit("export", "--since-seq", "three", env={})
    assert code == 2 and "not a whole number" in err
