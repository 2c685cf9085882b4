"""PostgreSQL backups with the real tools: pg_dump's custom format out, pg_restore back in.

The password never reaches a command line (other users of the host can read those in /proc): the
child gets the DSN without it in ``--dbname`` and the password in its environment (PGPASSWORD),
which only its own user can read. The archive is not compressed here (``--compress=0``): the
pipeline compresses every artifact the same way afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from services.backup.base import CHUNK, BackupError, DumpInfo
from services.inventory import secrets_in
from services.redaction import Redactor

_STDERR_KEPT = 8192  # bytes of a tool's stderr kept for the error message (the rest is read and dropped)
_MESSAGE_LIMIT = 300  # characters of a tool's error quoted to the user
_INHERITED = ("PATH", "HOME", "TMPDIR", "TZ", "USER", "LOGNAME")  # what a child keeps of our environment
_NOT_INHERITED_PG = ("PGPASSWORD", "PGCONNECT_TIMEOUT")  # set from the DSN and the timeout instead
_ENTRY = re.compile(rb"^\d+; \d+ \d+ (.*)$")  # one line of `pg_restore --list`: "215; 1259 16388 TABLE public t me"


@dataclass(frozen=True)
class _Target:
    """The DSN split into what may be shown (argv, messages) and the password."""

    dbname: str  # the DSN without its password, for --dbname
    password: str | None
    host: str
    port: int
    database: str


def _split(dsn: str) -> _Target:
    """Take the password out of a postgresql:// URL (from user:password@ or ?password=)."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise BackupError("the PostgreSQL connection string is not a postgresql:// URL")
    try:
        port = parts.port or 5432
    except ValueError:
        raise BackupError("the PostgreSQL connection string has an invalid port") from None
    password = unquote(parts.password) if parts.password is not None else None
    query = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "password":
            password = value
        else:
            query.append((key, value))
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}@{hostinfo}" if user else hostinfo
    # Built by hand: urlunsplit drops an empty host ("postgresql:///db?host=/run/pg"), libpq needs "//".
    dbname = f"{parts.scheme}://{netloc}{parts.path}" + (f"?{urlencode(query)}" if query else "")
    host = parts.hostname or dict(query).get("host", "localhost")
    database = unquote(parts.path.lstrip("/")) or unquote(user) or "postgres"
    return _Target(dbname, password or None, host, port, database)


def _counts(listing_lines: list[bytes]) -> dict[str, int]:
    """Entries of a `pg_restore --list` by the kinds a check compares."""
    entries = tables = table_data = 0
    for line in listing_lines:
        found = _ENTRY.match(line)
        if not found:
            continue
        entries += 1
        rest = found.group(1)
        if rest.startswith(b"TABLE DATA "):
            table_data += 1
        elif rest.startswith(b"TABLE ") and not rest.startswith(b"TABLE ATTACH "):
            tables += 1
    return {"entries": entries, "tables": tables, "table_data": table_data}


def _pipe(stream: asyncio.StreamReader | None) -> asyncio.StreamReader:
    if stream is None:  # pragma: no cover - every caller asked for a pipe
        raise RuntimeError("the child was started without this pipe")
    return stream


async def _keep_head(stream: asyncio.StreamReader) -> bytes:
    """Read a stream to its end, keeping its first bytes (the child must never block on a full pipe)."""
    kept = bytearray()
    while piece := await stream.read(65536):
        if len(kept) < _STDERR_KEPT:
            kept += piece[: _STDERR_KEPT - len(kept)]
    return bytes(kept)


async def _listing(stream: asyncio.StreamReader) -> dict[str, int]:
    lines = []
    async for line in stream:
        if _ENTRY.match(line.rstrip(b"\n")):
            lines.append(line.rstrip(b"\n"))
    return _counts(lines)


class _Child:
    """One pg_dump / pg_restore process whose stderr is read as it comes.

    ``close()`` kills it if it still runs, closes its pipes and reaps it, so a cancelled backup
    leaves no process and no open transport behind.
    """

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self._stderr = asyncio.create_task(_keep_head(_pipe(process.stderr)))
        self._listing: asyncio.Task[dict[str, int]] | None = None

    def count_listing(self) -> None:
        """Read this `pg_restore --list` child's stdout as it comes, counting TOC entries."""
        self._listing = asyncio.create_task(_listing(_pipe(self.process.stdout)))

    async def listing(self) -> dict[str, int]:
        if self._listing is None:  # pragma: no cover - a programming error
            raise RuntimeError("count_listing() was not called")
        return await self._listing

    @classmethod
    async def start(cls, argv: list[str], env: dict[str, str], *, stdin: int, stdout: int) -> _Child:
        name = Path(argv[0]).name
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=stdin,
                stdout=stdout,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # a Ctrl-C meant for the bot is not delivered to the child
            )
        except OSError as exc:
            raise BackupError(f"{name} could not be started: {exc.strerror or type(exc).__name__}") from None
        return cls(name, process)

    async def send(self, chunk: bytes, stall_timeout: float) -> bool:
        """Write to the child's stdin; False once it has stopped reading (exited)."""
        stdin = self.process.stdin
        if stdin is None or stdin.is_closing():
            return False
        try:
            stdin.write(chunk)
            async with asyncio.timeout(stall_timeout):
                await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return False
        except TimeoutError:
            raise BackupError(f"{self.name} stopped reading its input for {stall_timeout:g} s") from None
        return True

    def end_input(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()

    async def finish(self, seconds: float) -> int:
        """Wait for the child to exit on its own within ``seconds``."""
        try:
            async with asyncio.timeout(seconds):
                return await self.process.wait()
        except TimeoutError:
            raise BackupError(f"{self.name} did not finish within {seconds:g} s; stopped it") from None

    async def problem(self, redact: Callable[[str], str]) -> str:
        """The child's own explanation, one line, secrets masked: "connection to server ... refused"."""
        text = (await self._stderr).decode("utf-8", "replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        chosen = next((line for line in lines if "error:" in line), lines[0] if lines else "")
        chosen = re.sub(rf"^{re.escape(self.name)}: (error: )?", "", chosen)
        if not chosen:
            code = self.process.returncode
            chosen = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        chosen = redact(chosen)
        return chosen if len(chosen) <= _MESSAGE_LIMIT else chosen[: _MESSAGE_LIMIT - 1] + "…"

    async def close(self) -> None:
        process = self.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        self.end_input()
        # Shielded: a second cancellation must not leave a zombie or an unclosed transport.
        await asyncio.shield(self._reap())

    async def _reap(self) -> None:
        # Python 3.11's Process.wait() returns only once every pipe is closed, so the (killed)
        # child's output is read to its end first; that also closes the transport.
        readers = [self._stderr] if self._listing is None else [self._stderr, self._listing]
        if self.process.stdout is not None and self._listing is None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    while await self.process.stdout.read(CHUNK):
                        pass
        _, stuck = await asyncio.wait(readers, timeout=5)
        for task in stuck:  # pragma: no cover - a grandchild holding the pipe open
            task.cancel()
        for task in readers:  # seen here, so never "exception was never retrieved"
            if task.done() and not task.cancelled():
                task.exception()
        await self.process.wait()


class PostgresSource:
    """One PostgreSQL database, dumped with pg_dump (custom format) and restored with pg_restore."""

    kind = "postgres"
    extension = "dump"

    def __init__(
        self,
        dsn: str,
        *,
        timeout: float,
        redactor: Redactor,
        pg_bin: str | Path | None = None,
        stall_timeout: float = 300.0,
    ) -> None:
        self._target = _split(dsn)
        self._timeout = timeout
        self._stall_timeout = stall_timeout
        self._pg_bin = Path(pg_bin) if pg_bin is not None else None
        self._redactor = Redactor(secrets_in(dsn) | ({self._target.password} if self._target.password else set()))
        self._outer_redactor = redactor
        self._info = DumpInfo()

    def describe(self) -> str:
        """ "PostgreSQL database shop on 10.0.0.3:5432"."""
        return f"PostgreSQL database {self._target.database} on {self._target.host}:{self._target.port}"

    @property
    def info(self) -> DumpInfo:
        return self._info

    def _redact(self, text: str) -> str:
        return self._outer_redactor.redact(self._redactor.redact(text))

    def _program(self, name: str) -> str:
        if self._pg_bin is not None:
            candidate = self._pg_bin / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
            raise BackupError(f"{name} is not installed on the bot's host (not found in {self._pg_bin})")
        found = shutil.which(name)
        if found is None:
            raise BackupError(f"{name} is not installed on the bot's host")
        return found

    def _env(self) -> dict[str, str]:
        """The child's environment: no secrets of the bot, the password of this DSN only."""
        env = {key: value for key, value in os.environ.items() if key in _INHERITED}
        env.update(
            {key: value for key, value in os.environ.items() if key.startswith("PG") and key not in _NOT_INHERITED_PG}
        )
        env["LC_ALL"] = "C"  # messages in English, so they read the same in Slack for everyone
        env["PGCONNECT_TIMEOUT"] = str(max(2, math.ceil(self._timeout)))  # libpq's minimum is 2 s
        env.setdefault("PGAPPNAME", "opsbot-backup")
        if self._target.password is not None:
            env["PGPASSWORD"] = self._target.password
        return env

    async def _version(self, program: str) -> str:
        argv = [program, "--version"]
        child = await _Child.start(argv, self._env(), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(self._timeout):
                out = await _pipe(child.process.stdout).read(4096)
                await child.process.wait()
        except TimeoutError:
            raise BackupError(f"{child.name} --version did not answer within {self._timeout:g} s") from None
        finally:
            await child.close()
        found = re.search(r"\)\s*(\d+(?:\.\d+)*)", out.decode("utf-8", "replace"))
        return found.group(1) if found else out.decode("utf-8", "replace").strip()[:40]

    async def _read(self, stream: asyncio.StreamReader) -> bytes:
        """Up to CHUNK bytes of pg_dump's output; b"" at its end. Kills on a stall (see dump)."""
        buffer = bytearray()
        while len(buffer) < CHUNK:
            try:
                async with asyncio.timeout(self._stall_timeout):
                    piece = await stream.read(CHUNK - len(buffer))
            except TimeoutError:
                raise BackupError(
                    f"pg_dump sent nothing for {self._stall_timeout:g} s (a lock it waits for?); stopped it"
                ) from None
            if not piece:
                break
            buffer += piece
        return bytes(buffer)

    async def dump(self) -> AsyncIterator[bytes]:
        """pg_dump's custom-format archive. Its table of contents is also fed to `pg_restore --list`
        (which stops reading after it) to count entries for the manifest."""
        pg_dump = self._program("pg_dump")
        pg_restore = self._program("pg_restore")
        version = await self._version(pg_dump)
        env = self._env()
        argv = [pg_dump, "--format=custom", "--compress=0", "--no-password", f"--dbname={self._target.dbname}"]
        dump = await _Child.start(argv, env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE)
        lister: _Child | None = None
        try:
            lister = await _Child.start(
                [pg_restore, "--list"], env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
            lister.count_listing()
            output = _pipe(dump.process.stdout)
            listening = True
            while chunk := await self._read(output):
                if listening:
                    listening = await lister.send(chunk, self._stall_timeout)
                yield chunk
            code = await dump.finish(self._timeout)
            if code != 0:
                raise BackupError(f"pg_dump failed: {await dump.problem(self._redact)}")
            lister.end_input()
            if await lister.finish(self._timeout) != 0:
                raise BackupError(f"the dump's table of contents is unreadable: {await lister.problem(self._redact)}")
            counts = await lister.listing()
        finally:
            await dump.close()
            if lister is not None:
                await lister.close()
        self._info = DumpInfo(tools={"pg_dump": version}, stats={"database": self._target.database, **counts})

    async def _feed(self, chunks: AsyncIterable[bytes], main: _Child, lister: _Child) -> None:
        """Each chunk to ``main`` (until it stops reading) and to ``lister`` (until it has the TOC)."""
        listening = True
        try:
            async for chunk in chunks:
                if not await main.send(chunk, self._stall_timeout):
                    return  # it exited early; its exit code and stderr say why
                if listening:
                    listening = await lister.send(chunk, self._stall_timeout)
        finally:
            closer = getattr(chunks, "aclose", None)
            if closer is not None:
                await closer()
        main.end_input()
        lister.end_input()

    async def _run_with_listing(self, argv: list[str], chunks: AsyncIterable[bytes]) -> tuple[_Child, dict[str, int]]:
        """Run ``argv`` over the artifact, tee'd to `pg_restore --list`. Returns the finished child."""
        pg_restore = self._program("pg_restore")
        env = self._env()
        main = await _Child.start(argv, env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
        lister: _Child | None = None
        try:
            lister = await _Child.start(
                [pg_restore, "--list"], env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
            lister.count_listing()
            await self._feed(chunks, main, lister)
            # After the last byte pg_restore may still build indexes: no progress to watch, so the
            # stall timeout bounds that tail too.
            await main.finish(self._stall_timeout)
            lister.end_input()
            listed = await lister.finish(self._timeout) == 0
            counts = await lister.listing() if listed else {}
            return main, counts
        finally:
            await main.close()
            if lister is not None:
                await lister.close()

    async def restore(self, chunks: AsyncIterator[bytes]) -> str:
        """pg_restore in one transaction: on any error (or if the input breaks off) nothing changes."""
        argv = [
            self._program("pg_restore"),
            "--clean",
            "--if-exists",
            "--no-owner",
            "--no-privileges",
            "--single-transaction",
            "--exit-on-error",
            "--no-password",
            f"--dbname={self._target.dbname}",
        ]
        main, counts = await self._run_with_listing(argv, chunks)
        if main.process.returncode != 0:
            raise BackupError(
                f"pg_restore failed, database {self._target.database} is unchanged: {await main.problem(self._redact)}"
            )
        tables = counts.get("tables", 0)
        return f"restored {tables} table{'' if tables == 1 else 's'} into {self.describe()}"

    async def check(self, chunks: AsyncIterator[bytes], stats: Mapping[str, Any]) -> str:
        """pg_restore reads the whole archive (to /dev/null) and lists its TOC; counts must match."""
        argv = [self._program("pg_restore"), f"--file={os.devnull}"]
        main, counts = await self._run_with_listing(argv, chunks)
        if main.process.returncode != 0:
            raise BackupError(f"the PostgreSQL archive is damaged: {await main.problem(self._redact)}")
        if not counts:
            raise BackupError("the PostgreSQL archive's table of contents could not be listed")
        for key in ("entries", "tables", "table_data"):
            if key in stats and stats[key] != counts[key]:
                raise BackupError(
                    f"the PostgreSQL archive has {counts[key]} {key.replace('_', ' ')} entries, "
                    f"its manifest says {stats[key]}"
                )
        return (
            f"archive reads to the end: {counts['entries']} entries, {counts['tables']} tables, "
            f"{counts['table_data']} with data"
        )
