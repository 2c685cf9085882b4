"""docker compose projects on the bot's host (runbooks 001 and 003): ps, restart, pause, stop, start,
and runbook 003's safe-stop / safe-start around the jobs table.

Every call runs the ``docker compose`` CLI with its arguments as a list, never through a shell,
in its own process group with a bounded output and a timeout; a call that overruns or is
cancelled is killed, group and all, and reaped before the error is raised. Service names are
checked against compose's own pattern (and the inventory's list) before anything runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.deploy.base import DeployError, Progress
from services.errors import CommandError
from services.inventory import ComposeComponent
from services.jobs import JobsClient

log = logging.getLogger(__name__)

SERVICE_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
"""Compose's own rule for service names; anything else (``-v``, ``web; rm -rf /``) is refused."""
PROJECT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")

STOPPED_MESSAGE = "Service stopped during processing"
"""The error_message runbook 003's graceful shutdown gives the jobs it puts back to pending."""

_STDOUT_LIMIT = 4 * 1024 * 1024  # bytes of `ps --format json` kept; more is refused, not held
_STDERR_LIMIT = 64 * 1024  # compose writes its progress here too: keep the tail, where errors are
_MESSAGE_LIMIT = 300  # characters of docker's own error quoted to the user
_CHUNK = 64 * 1024
_REAP_SECONDS = 5.0

# The child's environment: what docker needs to find its daemon, config and plugins, and none of
# the bot's own secrets (Slack tokens, database passwords). A project's variables come from its
# own .env file in the project directory, as they do when compose is run by hand there.
_INHERITED = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "TZ",
        "TMPDIR",
        "XDG_RUNTIME_DIR",
        "SSH_AUTH_SOCK",
    }
)
_INHERITED_PREFIXES = ("DOCKER_", "COMPOSE_", "BUILDKIT_")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_ERROR_WORDS = re.compile(r"error|no such|not found|denied|cannot|can't|failed|invalid|unknown|refused", re.IGNORECASE)


@dataclass(frozen=True)
class ServiceState:
    """One container of the project as ``docker compose ps`` reports it."""

    service: str
    name: str  # the container's name, e.g. shop-web-1
    state: str  # running | paused | exited | restarting | created | dead | removing
    status: str  # compose's own words: "Up 3 hours (healthy)", "Exited (0) 2 minutes ago"
    health: str  # healthy | unhealthy | starting | "" (no healthcheck)
    exit_code: int | None = None

    def describe(self) -> str:
        """ "web running (healthy)", "worker exited (1)"."""
        text = f"{self.service} {self.state}"
        if self.health:
            text += f" ({self.health})"
        elif self.state == "exited" and self.exit_code:
            text += f" ({self.exit_code})"
        return text


@dataclass(frozen=True)
class _Output:
    stdout: bytes
    stdout_overflow: bool


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _state(item: Any) -> ServiceState:
    if not isinstance(item, dict):
        raise DeployError("`docker compose ps` printed something other than a list of containers.")
    state = _text(item.get("State")).strip().lower()
    code = item.get("ExitCode")
    exit_code = code if isinstance(code, int) and not isinstance(code, bool) else None
    status = _text(item.get("Status")).strip()
    if not status:  # compose before 2.21 has no Status field
        status = f"{state} ({exit_code})" if state == "exited" and exit_code is not None else state
    return ServiceState(
        service=_text(item.get("Service")),
        name=_text(item.get("Name")),
        state=state,
        status=status,
        health=_text(item.get("Health")).strip().lower(),
        exit_code=exit_code,
    )


def parse_ps(text: str) -> list[ServiceState]:
    """The containers in ``docker compose ps --format json`` output, sorted by service and name.

    Compose before 2.21 prints one JSON array; since 2.21 one JSON object per line.
    """
    text = text.strip()
    if not text:
        return []
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
        items: list[Any] = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError:
                raise DeployError("`docker compose ps` did not print JSON; is compose v2 installed?") from None
    if whole is not None:
        items = whole if isinstance(whole, list) else [whole]
    states = [_state(item) for item in items]
    return sorted(states, key=lambda s: (s.service, s.name))


def _problem(stderr: bytes, returncode: int | None) -> str:
    """docker's own explanation, one line: the last line that looks like an error, else the last line."""
    text = _ANSI.sub("", stderr.decode("utf-8", "replace"))
    lines = [_CONTROL.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    chosen = next((line for line in reversed(lines) if _ERROR_WORDS.search(line)), lines[-1] if lines else "")
    if not chosen:
        code = returncode
        chosen = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return chosen if len(chosen) <= _MESSAGE_LIMIT else chosen[: _MESSAGE_LIMIT - 1] + "…"


async def _read_head(stream: asyncio.StreamReader | None, limit: int) -> tuple[bytes, bool]:
    """The first ``limit`` bytes and whether there was more; reads to the end so the child never blocks."""
    if stream is None:
        return b"", False
    kept = bytearray()
    overflow = False
    while chunk := await stream.read(_CHUNK):
        room = limit - len(kept)
        if len(chunk) > room:
            overflow = True
        kept += chunk[: max(room, 0)]
    return bytes(kept), overflow


async def _read_tail(stream: asyncio.StreamReader | None, limit: int) -> bytes:
    """The last ``limit`` bytes; reads to the end."""
    if stream is None:
        return b""
    kept = bytearray()
    while chunk := await stream.read(_CHUNK):
        kept += chunk
        if len(kept) > limit:
            del kept[: len(kept) - limit]
    return bytes(kept)


def _kill_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL the child's whole process group: ``docker compose`` runs the compose plugin as a child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()


async def _reap(process: asyncio.subprocess.Process, readers: Sequence[asyncio.Task[Any]]) -> None:
    """Wait for the killed child and its pipes (Python 3.11's wait() needs the pipes closed)."""
    _, stuck = await asyncio.wait(readers, timeout=_REAP_SECONDS) if readers else (set(), set())
    for task in stuck:  # pragma: no cover - a grandchild that left the group holds a pipe open
        task.cancel()
    for task in readers:  # seen here, so never "exception was never retrieved"
        if task.done() and not task.cancelled():
            task.exception()
    try:
        async with asyncio.timeout(_REAP_SECONDS):
            await process.wait()
    except TimeoutError:  # pragma: no cover - see above
        log.warning("docker process %d did not go away after SIGKILL", process.pid)


class ComposeProject:
    """One compose project on the bot's host, driven through the ``docker compose`` CLI."""

    kind = "compose"

    def __init__(
        self,
        project_dir: Path,
        *,
        project_name: str | None = None,
        services: Sequence[str] = (),
        docker: str = "docker",
        timeout: float = 120.0,
    ) -> None:
        if project_name is not None and not PROJECT_NAME.fullmatch(project_name):
            raise DeployError(
                f"The compose project name {_shown(project_name)} is not valid "
                "(lower-case letters, digits, `_` and `-`, starting with a letter or digit)."
            )
        for service in services:
            if not SERVICE_NAME.fullmatch(service):
                raise DeployError(f"The inventory lists {_shown(service)}, which is not a valid compose service name.")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        # Absolute, so the directory can never be read as an option.
        self._dir = Path(os.path.abspath(project_dir))
        self._name = project_name
        self._services = tuple(dict.fromkeys(services))
        self._docker = docker
        self._timeout = timeout

    @classmethod
    def for_component(cls, spec: ComposeComponent, *, docker: str = "docker", timeout: float = 120.0) -> ComposeProject:
        """The project an inventory ``type: compose`` component names (its probe timeout is too short here)."""
        return cls(
            spec.project_dir, project_name=spec.project_name, services=spec.services, docker=docker, timeout=timeout
        )

    @property
    def label(self) -> str:
        """The project's name as compose sees it: -p, else the directory's name."""
        return self._name or self._dir.name

    def describe(self) -> str:
        """ "compose project shop in /srv/shop"."""
        return f"compose project {self.label} in {self._dir}"

    # -- reading ---------------------------------------------------------------------------------

    async def ps(self) -> list[ServiceState]:
        """Every container of the project, stopped ones too."""
        out = await self._run("ps", "--all", "--format", "json")
        if out.stdout_overflow:
            raise DeployError(f"`docker compose ps` printed more than {_STDOUT_LIMIT // (1024 * 1024)} MiB; refused.")
        return parse_ps(out.stdout.decode("utf-8", "replace"))

    # -- lifecycle -------------------------------------------------------------------------------

    async def restart(self, service: str | None = None, *, progress: Progress | None = None) -> str:
        """Restart one service or all; returns a summary with their state afterwards."""
        return await self._lifecycle("restart", "Restarting", "Restarted", service, progress)

    async def pause(self, service: str | None = None, *, progress: Progress | None = None) -> str:
        """Freeze one service or all (memory kept, no CPU): runbook 003's short maintenance."""
        return await self._lifecycle("pause", "Pausing", "Paused", service, progress)

    async def unpause(self, service: str | None = None, *, progress: Progress | None = None) -> str:
        """Resume paused containers."""
        return await self._lifecycle("unpause", "Resuming", "Resumed", service, progress)

    async def stop(self, service: str | None = None, *, progress: Progress | None = None) -> str:
        """Stop containers without removing them."""
        return await self._lifecycle("stop", "Stopping", "Stopped", service, progress)

    async def start(self, service: str | None = None, *, progress: Progress | None = None) -> str:
        """Start the project's existing (stopped) containers."""
        return await self._lifecycle("start", "Starting", "Started", service, progress)

    async def safe_stop(
        self,
        jobs: JobsClient | None,
        *,
        grace: float,
        poll_every: float = 2.0,
        progress: Progress | None = None,
    ) -> str:
        """Runbook 003's safe-stop: wait up to ``grace`` seconds for jobs in processing, put the rest
        back to pending, stop every service, then catch any job picked up while it was stopping."""
        if grace < 0:
            raise ValueError("grace must not be negative")
        if poll_every <= 0:
            raise ValueError("poll_every must be positive")
        if jobs is None:
            return await self.stop(progress=progress)
        table = jobs.spec.table
        loop = asyncio.get_running_loop()
        try:
            first = remaining = await jobs.processing_count()
            deadline = loop.time() + grace
            reported: int | None = None
            while remaining > 0 and (left := deadline - loop.time()) > 0:
                if remaining != reported:
                    await _say(progress, f"{remaining} job(s) still processing, waiting up to {math.ceil(left)} s")
                    reported = remaining
                await asyncio.sleep(min(poll_every, left))
                remaining = await jobs.processing_count()
            reset = await jobs.reset_processing(STOPPED_MESSAGE)
        except CommandError as exc:
            if isinstance(exc, DeployError):
                raise
            raise DeployError(f"Did not stop {self.describe()}: {exc.message}") from None
        if reset:
            await _say(progress, f"Reset {len(reset)} job(s) in `{table}` to pending: {_ids(reset)}")
        try:
            stopped = await self.stop(progress=progress)
        except DeployError as exc:
            if not reset:
                raise
            raise DeployError(
                f"Reset {len(reset)} job(s) to pending ({_ids(reset)}), but the stop failed: {exc.message}"
            ) from None
        try:
            # A worker may have picked a reset job up again before it was stopped.
            late = await jobs.reset_processing(STOPPED_MESSAGE)
        except CommandError as exc:
            raise DeployError(
                f"{stopped} But the jobs table `{table}` could not be checked after the stop: {exc.message}"
            ) from None
        finished = max(0, first - remaining)
        parts = [stopped]
        if first == 0:
            parts.append(f"No job was processing in `{table}`.")
        else:
            parts.append(f"{finished} of {first} job(s) in processing finished within the {grace:g} s grace period.")
        if reset:
            parts.append(f"Reset {len(reset)} job(s) to pending: {_ids(reset)}.")
        if late:
            parts.append(f"Reset {len(late)} job(s) picked up during the stop: {_ids(late)}.")
        return " ".join(parts)

    async def safe_start(self, jobs: JobsClient | None, *, progress: Progress | None = None) -> str:
        """Runbook 003's safe-start: start every service, then put jobs stuck in processing for longer
        than the table's threshold back to pending."""
        started = await self.start(progress=progress)
        if jobs is None:
            return started
        minutes = jobs.spec.stuck_after_minutes
        message = f"Reset by opsbot at start: stuck in processing for over {minutes} min"
        reset: list[str] = []
        try:
            while True:
                summary = await jobs.summary()
                if not summary.stuck:
                    break
                done = await jobs.reset_stuck([job.id for job in summary.stuck], message=message)
                reset += done
                if not done or summary.stuck_total <= len(summary.stuck):
                    break
        except CommandError as exc:
            raise DeployError(
                f"{started} But the stuck jobs in `{jobs.spec.table}` could not be reset: {exc.message}"
            ) from None
        if not reset:
            return f"{started} No job was stuck in processing for over {minutes} min."
        return f"{started} Reset {len(reset)} job(s) stuck for over {minutes} min to pending: {_ids(reset)}."

    # -- internals -------------------------------------------------------------------------------

    def _check_service(self, service: str) -> str:
        if not SERVICE_NAME.fullmatch(service):
            raise DeployError(
                f"{_shown(service)} is not a valid compose service name "
                "(letters, digits, `_`, `.` and `-`, starting with a letter or digit)."
            )
        if self._services and service not in self._services:
            known = ", ".join(self._services)
            raise DeployError(f"{_shown(service)} is not a service of {self.label} in the inventory ({known}).")
        return service

    async def _lifecycle(
        self, command: str, doing: str, done: str, service: str | None, progress: Progress | None
    ) -> str:
        targets = [self._check_service(service)] if service is not None else []
        what = service if service is not None else "all services"
        await _say(progress, f"{doing} {what} of compose project {self.label}…")
        await self._run(command, *targets)
        summary = f"{done} {what} of compose project {self.label}"
        try:
            states = await self.ps()
        except DeployError as exc:
            # The action itself succeeded; a failed look afterwards must not report it as failed.
            return f"{summary}; could not read the state afterwards: {exc.message}"
        shown = [s for s in states if service is None or s.service == service]
        if not shown:
            return f"{summary}; no containers."
        return f"{summary}; now {', '.join(s.describe() for s in shown)}."

    def _program(self) -> str:
        env_path = os.environ.get("PATH", os.defpath)
        found = shutil.which(self._docker, path=env_path)
        if found is None:
            raise DeployError("docker is not installed on the bot's host")
        return found

    def _env(self) -> dict[str, str]:
        env = {
            key: value for key, value in os.environ.items() if key in _INHERITED or key.startswith(_INHERITED_PREFIXES)
        }
        env["LC_ALL"] = "C"  # messages in English, so they read the same in Slack for everyone
        return env

    async def _run(self, *args: str) -> _Output:
        """``docker compose --project-directory DIR [-p NAME] ARGS…``: its stdout, or DeployError."""
        if not self._dir.is_dir():
            raise DeployError(f"The compose project directory {self._dir} does not exist on the bot's host.")
        argv = ["compose", "--project-directory", str(self._dir)]
        if self._name is not None:
            argv += ["-p", self._name]
        return await self._exec([*argv, *args], " ".join(["docker compose", *args]), cwd=self._dir)

    async def docker(self, *args: str) -> bytes:
        """``docker ARGS…`` (not compose: stats, inspect): its whole stdout, or DeployError."""
        shown = " ".join(["docker", *args[:3]])
        out = await self._exec(list(args), shown)
        if out.stdout_overflow:
            raise DeployError(f"`{shown}` printed more than {_STDOUT_LIMIT // 1024} KiB; refused.")
        return out.stdout

    async def _exec(self, args: list[str], shown: str, *, cwd: Path | None = None) -> _Output:
        """docker with ``args``, as an argument list in its own process group, output bounded, killed with
        its group on timeout or cancel; its stdout, or DeployError saying what failed."""
        try:
            process = await asyncio.create_subprocess_exec(
                self._program(),
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env(),
                cwd=cwd,
                start_new_session=True,  # its own process group, killed as one; no Ctrl-C meant for the bot
            )
        except FileNotFoundError:
            raise DeployError("docker is not installed on the bot's host") from None
        except OSError as exc:
            raise DeployError(f"docker could not be started: {exc.strerror or type(exc).__name__}") from None
        stdout = asyncio.create_task(_read_head(process.stdout, _STDOUT_LIMIT))
        stderr = asyncio.create_task(_read_tail(process.stderr, _STDERR_LIMIT))
        log.info("running %s in %s", shown, cwd or ".")
        try:
            async with asyncio.timeout(self._timeout):
                # asyncio.wait leaves the readers running when it is cut short: _reap drains them.
                await asyncio.wait([stdout, stderr])
                returncode = await process.wait()
        except TimeoutError:
            _kill_group(process)
            await asyncio.shield(_reap(process, [stdout, stderr]))
            log.warning("%s did not finish within %g s; killed it", shown, self._timeout)
            raise DeployError(f"`{shown}` did not finish within {self._timeout:g} s; stopped it.") from None
        except BaseException:
            _kill_group(process)  # cancelled: leave no docker process behind
            await asyncio.shield(_reap(process, [stdout, stderr]))
            raise
        out, overflow = stdout.result()
        err = stderr.result()
        if returncode != 0:
            problem = _problem(err, returncode)
            log.warning("%s failed (exit %s): %s", shown, returncode, problem)
            raise DeployError(f"`{shown}` failed: {problem}")
        return _Output(out, overflow)

    async def stream(
        self,
        *args: str,
        on_line: Callable[[bytes], None],
        timeout: float,  # noqa: ASYNC109  # a budget after which what was read stands, not an error
        max_bytes: int,
        max_line: int = 16 * 1024,
    ) -> StreamEnd:
        """``docker compose … ARGS…`` with its stdout handed to ``on_line`` line by line as it comes (each cut
        to ``max_line`` bytes, without the newline), never held whole. After ``timeout`` seconds or
        ``max_bytes`` bytes the child is killed with its group and reaped, and what was read stands
        (``StreamEnd.stopped`` says why); a failed run is DeployError with docker's own reason."""
        if not self._dir.is_dir():
            raise DeployError(f"The compose project directory {self._dir} does not exist on the bot's host.")
        argv = ["compose", "--project-directory", str(self._dir)]
        if self._name is not None:
            argv += ["-p", self._name]
        shown = " ".join(["docker compose", *args[:1]])
        try:
            process = await asyncio.create_subprocess_exec(
                self._program(),
                *argv,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env(),
                cwd=self._dir,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise DeployError("docker is not installed on the bot's host") from None
        except OSError as exc:
            raise DeployError(f"docker could not be started: {exc.strerror or type(exc).__name__}") from None
        stderr = asyncio.create_task(_read_tail(process.stderr, _STDERR_LIMIT))
        read = 0
        stopped = ""

        async def pump() -> None:
            # Reads to the end even once stopped (discarding), so the pipe closes and the child is reaped.
            nonlocal read, stopped
            if process.stdout is None:
                return
            pending = bytearray()
            while chunk := await process.stdout.read(_CHUNK):
                if stopped:
                    continue
                read += len(chunk)
                pending += chunk
                while (end := pending.find(b"\n")) >= 0:
                    on_line(bytes(pending[: min(end, max_line)]))
                    del pending[: end + 1]
                if len(pending) > max_line:  # a line without end: keep its head, drop the rest as it comes
                    del pending[max_line:]
                if read >= max_bytes:
                    stopped = "bytes"
                    _kill_group(process)
            if pending and not stopped:
                on_line(bytes(pending))

        reader = asyncio.create_task(pump())
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait([reader, stderr])
                returncode = await process.wait()
        except TimeoutError:
            stopped = "timeout"
            _kill_group(process)
            await asyncio.shield(_reap(process, [reader, stderr]))
        except BaseException:
            stopped = "cancelled"
            _kill_group(process)
            await asyncio.shield(_reap(process, [reader, stderr]))
            raise
        if reader.done() and not reader.cancelled():
            reader.result()  # on_line's own failure, if any
        if stopped:
            log.info("%s stopped (%s) after %d bytes", shown, stopped, read)
            return StreamEnd(read, stopped)
        if returncode != 0:
            problem = _problem(stderr.result(), returncode)
            log.warning("%s failed (exit %s): %s", shown, returncode, problem)
            raise DeployError(f"`{shown}` failed: {problem}")
        return StreamEnd(read, "")


@dataclass(frozen=True)
class StreamEnd:
    """How a :meth:`ComposeProject.stream` ended: bytes of stdout read, and ``stopped`` ("timeout",
    "bytes") when the bot cut it short, "" when docker finished by itself."""

    bytes_read: int
    stopped: str


def _shown(value: str) -> str:
    """A name as the user gave it, quoted and cut short, for error messages."""
    cut = value if len(value) <= 60 else value[:59] + "…"
    return "`" + re.sub(r"[\x00-\x1f\x7f]", "?", cut).replace("`", "'") + "`"


def _ids(ids: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(ids[:limit])
    return shown if len(ids) <= limit else f"{shown} and {len(ids) - limit} more"


async def _say(progress: Progress | None, note: str) -> None:
    if progress is not None:
        await progress(note)
