"""Backups end to end: dump → compress → store → manifest → catalog → retention; verify; restore.

The runner holds no Slack or approval logic: handlers/backup.py asks it to act and renders what it
returns. Every backup is catalogued in the state store before its first byte is written and marked
``good`` only after its object and manifest are complete, so a crash at any point leaves either a
``good`` backup or one that is clearly not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar, cast

import aiohttp
import structlog

from services.audit import record_event
from services.backup import codec as codecs
from services.backup.base import BackupError, Destination, Partial, Source, Stored
from services.backup.cloudsql import BackupRun, CloudSqlAdmin, GoogleDefaultToken, StaticToken, TokenProvider
from services.backup.sources import STREAMED_TYPES, destination_for, source_for
from services.errors import CommandError
from services.failures import short_error
from services.inventory import CloudSqlComponent, Component, Inventory, Retention
from services.locks import ServiceLocks
from services.redaction import Redactor
from services.state import BackupRecord, BackupState, StateStore

log = structlog.get_logger(__name__)

PROGRESS_EVERY = 3.0  # seconds between progress reports of one backup
HEARTBEAT_EVERY = 30.0  # longest wait between two renewals of a running backup's heartbeat
PARTIALS_EVERY = timedelta(minutes=1)  # a process looks for left-behind partial objects at most this often
PARTIALS_TIMEOUT = 20.0  # seconds one destination may take to list and remove them (unreachable: next time)
SWEEPER = "opsbot"  # the audit log's actor for what the sweep does
MANIFEST_FORMAT = 1

_T = TypeVar("_T")


@dataclass(frozen=True)
class BackupProgress:
    """Where a running backup is: bytes read from the source so far, and for how long."""

    service: str
    component: str
    backup_id: str
    raw_bytes: int
    elapsed: float


ProgressCallback = Callable[[BackupProgress], Awaitable[None]]


@dataclass(frozen=True)
class Verification:
    """The outcome of re-reading a backup: ``ok`` and one line saying what was checked."""

    record: BackupRecord
    ok: bool
    summary: str


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_backup_id(service: str, component: str, at: datetime) -> str:
    return f"{service}-{component}-{at:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def lock_key(service: str, component: str) -> str:
    return f"backup:{service}:{component}"


def backup_id_of(key: str) -> str | None:
    """The backup id in an object key the runner made (``service/component/<id>.<ext>``), else None."""
    parts = key.split("/")
    if len(parts) != 3:
        return None
    service, component, name = parts
    backup_id = name.split(".", 1)[0]
    return backup_id if backup_id.startswith(f"{service}-{component}-") else None


def _opsbot_version() -> str:
    try:
        return metadata.version("opsbot")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _codec(name: str) -> codecs.Codec:
    if name not in ("zstd", "gzip", "none"):
        raise BackupError(f"The catalog names an unknown compression `{name[:20]}`.")
    return cast(codecs.Codec, name)


class BackupRunner:
    """Takes, lists, verifies, restores and prunes backups of the inventory's components."""

    def __init__(
        self,
        store: StateStore,
        inventory: Inventory,
        locks: ServiceLocks,
        redactor: Redactor,
        *,
        base_dir: Path,
        http: aiohttp.ClientSession | None = None,
        clock: Callable[[], datetime] = utcnow,
        progress_every: float = PROGRESS_EVERY,
        heartbeat_every: float | None = None,
    ) -> None:
        self.store = store
        self.inventory = inventory
        self.settings = inventory.backups
        self.locks = locks
        self.redactor = redactor
        self.clock = clock
        self.progress_every = progress_every
        self._heartbeat_every = heartbeat_every
        self._base_dir = base_dir
        self._destinations: dict[str, Destination] = {}
        self._http = http
        self._google_tokens: TokenProvider | None = None
        self._partials_swept: dict[str | None, datetime] = {}  # by service (None: all), when last looked

    # -- configuration -------------------------------------------------------------------------

    @property
    def stale_after(self) -> timedelta:
        """How long a running backup's heartbeat may go unrenewed before it is taken for dead."""
        return timedelta(seconds=self.settings.stall_timeout)

    @property
    def heartbeat_every(self) -> float:
        """Seconds between renewals: several per ``stale_after``, so one slow write is no death."""
        return self._heartbeat_every or min(self.settings.stall_timeout / 4, HEARTBEAT_EVERY)

    def destination(self, name: str) -> Destination:
        """The destination called ``name`` (opened on first use)."""
        if name not in self._destinations:
            spec = self.settings.destinations.get(name)
            if spec is None:
                raise CommandError(f"The backup destination `{name}` is no longer in the inventory.")
            self._destinations[name] = destination_for(name, spec, self._base_dir)
        return self._destinations[name]

    def destination_name(self, service: str) -> str:
        return self.inventory.services[service].backup.destination or self.settings.destination

    def retention(self, service: str) -> Retention:
        return self.inventory.services[service].backup.retention or self.settings.retention

    def expected_every(self, service: str) -> timedelta:
        hours = self.inventory.services[service].backup.expected_every_hours or self.settings.expected_every_hours
        return timedelta(hours=hours)

    def components(self, service: str) -> dict[str, Component]:
        """The components of ``service`` opsbot backs up: streamed ones and Cloud SQL instances."""
        return {
            name: spec
            for name, spec in self.inventory.services[service].components.items()
            if spec.type in STREAMED_TYPES or isinstance(spec, CloudSqlComponent)
        }

    def cloudsql(self, spec: CloudSqlComponent) -> CloudSqlAdmin:
        """A Cloud SQL Admin API client for one instance (the token: configured, or Google's default)."""
        if self._http is None:
            raise CommandError("Cloud SQL backups need the bot's HTTP session, which this bot was built without.")
        tokens: TokenProvider
        if spec.access_token is not None:
            tokens = StaticToken(spec.access_token.get_secret_value())
        else:
            self._google_tokens = self._google_tokens or GoogleDefaultToken(timeout=spec.timeout)
            tokens = self._google_tokens
        return CloudSqlAdmin(
            self._http, spec.project, spec.instance, tokens=tokens, api_url=str(spec.api_url),
            timeout=spec.timeout, operation_timeout=spec.operation_timeout, poll_every=spec.poll_seconds,
        )  # fmt: skip

    def describe(self, spec: Component) -> str:
        """Where a component's data lives, without credentials."""
        if isinstance(spec, CloudSqlComponent):
            return f"Cloud SQL instance {spec.project}:{spec.instance}"
        return self.redactor.redact(self.source(spec).describe())

    def source(self, spec: Component) -> Source:
        return source_for(spec, self.settings, self.redactor)

    # -- taking a backup -----------------------------------------------------------------------

    async def backup(
        self,
        service: str,
        component: str,
        *,
        trigger: str,
        requested_by: str,
        progress: ProgressCallback | None = None,
    ) -> BackupRecord:
        """Back up one component; return its ``good`` catalog record or raise BackupError/CommandError."""
        spec = self.components(service).get(component)
        if spec is None:
            raise CommandError(f"`{service}/{component}` is not a component opsbot can back up.")
        started = self.clock()
        backup_id = new_backup_id(service, component, started)
        key_lock = lock_key(service, component)
        holder = await self.locks.acquire(key_lock, backup_id)
        if holder is not None:
            raise CommandError(f"A backup of `{service}/{component}` is already running (`{holder}`); try again later.")
        try:
            if isinstance(spec, CloudSqlComponent):
                return await self._managed_backup(
                    service, component, spec, backup_id, started, trigger=trigger, requested_by=requested_by
                )
            return await self._backup_locked(
                service, component, spec, backup_id, started, trigger=trigger, requested_by=requested_by,
                progress=progress,
            )  # fmt: skip
        finally:
            await self.locks.release(key_lock, backup_id)

    async def _backup_locked(
        self,
        service: str,
        component: str,
        spec: Component,
        backup_id: str,
        started: datetime,
        *,
        trigger: str,
        requested_by: str,
        progress: ProgressCallback | None,
    ) -> BackupRecord:
        source = self.source(spec)
        destination = self.destination(self.destination_name(service))
        codec = self.settings.compression
        key = f"{service}/{component}/{backup_id}.{source.extension}{codecs.suffix(codec)}"
        record = BackupRecord(
            id=backup_id,
            service=service,
            component=component,
            source=source.kind,
            trigger=trigger,
            requested_by=requested_by,
            destination=destination.name,
            key=key,
            location=destination.location(key),
            codec=codec,
            state=BackupState.RUNNING,
            started_at=started,
            heartbeat_at=started,
        )
        await self.store.create_backup(record)
        log.info("backup_started", backup=backup_id, service=service, component=component, trigger=trigger)
        clock_start = time.monotonic()

        async def store_artifact() -> tuple[Stored, dict[str, Any], datetime]:
            raw = codecs.Meter(source.dump())
            ticker = asyncio.create_task(self._report(raw, record, clock_start, progress))
            try:
                stored = await destination.write(key, codecs.compress(raw, codec))
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            finished = self.clock()
            info = source.info
            manifest: dict[str, Any] = {
                "format": MANIFEST_FORMAT,
                "id": backup_id,
                "service": service,
                "component": component,
                "source": {"kind": source.kind, "where": self.redactor.redact(source.describe())},
                "trigger": trigger,
                "requested_by": requested_by,
                "key": key,
                "codec": codec,
                "size": stored.size,
                "sha256": stored.sha256,
                "raw_size": raw.size,
                "tools": {"opsbot": _opsbot_version(), **info.tools},
                "stats": info.stats,
                "started_at": started.isoformat(),
                "finished_at": finished.isoformat(),
                "duration_seconds": round(time.monotonic() - clock_start, 3),
            }
            await destination.put_manifest(key, json.dumps(manifest, indent=2, sort_keys=True).encode())
            return stored, manifest, finished

        try:
            stored, manifest, finished = await self._while_alive(backup_id, store_artifact())
        except BaseException as exc:
            message = self._failure(exc)
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self.store.finish_backup(backup_id, BackupState.FAILED, at=self.clock(), error=message)
                )
            log.warning("backup_failed", backup=backup_id, error=message)
            if isinstance(exc, CommandError | asyncio.CancelledError):
                raise
            if isinstance(exc, Exception):
                raise BackupError(f"The backup of `{service}/{component}` failed: {message}") from None
            raise
        done = await self.store.finish_backup(
            backup_id, BackupState.GOOD, at=finished, size=stored.size, sha256=stored.sha256, manifest=manifest
        )
        if done is None:  # the sweeper took it for dead: the object is complete, but say so
            raise BackupError(f"The backup `{backup_id}` finished, but the catalog had already marked it failed.")
        log.info("backup_finished", backup=backup_id, size=stored.size, seconds=manifest["duration_seconds"])
        try:
            await self.apply_retention(service, component)
        except Exception:
            log.warning("retention_failed", service=service, component=component, exc_info=True)
        return done

    async def _managed_backup(
        self,
        service: str,
        component: str,
        spec: CloudSqlComponent,
        backup_id: str,
        started: datetime,
        *,
        trigger: str,
        requested_by: str,
    ) -> BackupRecord:
        """An on-demand Cloud SQL backup: Google keeps the data; the catalog keeps its run id."""
        admin = self.cloudsql(spec)
        record = BackupRecord(
            id=backup_id, service=service, component=component, source="cloudsql", trigger=trigger,
            requested_by=requested_by, destination="cloudsql", key="", location=admin.describe(), codec="none",
            state=BackupState.RUNNING, started_at=started, heartbeat_at=started,
        )  # fmt: skip
        await self.store.create_backup(record)
        try:
            run = await self._while_alive(
                backup_id, admin.create_backup(f"opsbot {backup_id} ({trigger}, {requested_by})")
            )
        except BaseException as exc:
            message = self._failure(exc)
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self.store.finish_backup(backup_id, BackupState.FAILED, at=self.clock(), error=message)
                )
            if isinstance(exc, BackupError):
                raise BackupError(f"The backup of `{service}/{component}` failed: {message}") from None
            raise
        manifest = {"format": MANIFEST_FORMAT, "id": backup_id, "cloudsql": {"backup_run": run.id, "type": run.type}}
        done = await self.store.finish_backup(backup_id, BackupState.GOOD, at=self.clock(), manifest=manifest)
        if done is None:
            raise BackupError(f"The backup `{backup_id}` finished, but the catalog had already marked it failed.")
        return done

    async def _while_alive(self, backup_id: str, work: Coroutine[Any, Any, _T]) -> _T:
        """Run ``work`` while renewing the backup's heartbeat in the catalog, so other processes
        know it has a live writer. If the catalog stops calling it running (another process took it
        for dead: its heartbeat could not be written for a while), ``work`` is stopped."""
        task = asyncio.create_task(work)
        beat = asyncio.create_task(self._heartbeat(backup_id))
        try:
            await asyncio.wait({task, beat}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
                if task.cancelled():
                    raise BackupError("another process marked it failed (its heartbeat had stopped), so it was stopped")
            return task.result()
        finally:
            beat.cancel()
            if not task.done():  # we are cancelled: stop the work, and let its clean-up finish first
                task.cancel()
                await asyncio.wait({task})
            if not task.cancelled():
                task.exception()  # retrieved: when we are cancelled, nothing else looks at it
            await asyncio.wait({beat})

    async def _heartbeat(self, backup_id: str) -> None:
        """Renew the heartbeat every ``heartbeat_every`` seconds; return once the backup is no longer
        running in the catalog. A failed renewal is logged and tried again at the next beat."""
        while True:
            await asyncio.sleep(self.heartbeat_every)
            try:
                if not await self.store.renew_backup(backup_id, at=self.clock()):
                    log.warning("backup_no_longer_running", backup=backup_id)
                    return
            except Exception:
                log.warning("backup_heartbeat_failed", backup=backup_id, exc_info=True)

    def _failure(self, exc: BaseException) -> str:
        if isinstance(exc, CommandError):
            return self.redactor.redact(exc.message)
        if isinstance(exc, asyncio.CancelledError):
            return "cancelled (the bot is stopping or the request was abandoned)"
        return self.redactor.redact(short_error(exc)) if isinstance(exc, Exception) else type(exc).__name__

    async def _report(
        self, raw: codecs.Meter, record: BackupRecord, started: float, progress: ProgressCallback | None
    ) -> None:
        if progress is None:
            return
        while True:
            await asyncio.sleep(self.progress_every)
            update = BackupProgress(record.service, record.component, record.id, raw.size, time.monotonic() - started)
            try:
                await progress(update)
            except Exception:
                log.warning("backup_progress_failed", backup=record.id, exc_info=True)

    # -- the catalog ---------------------------------------------------------------------------

    async def get(self, backup_id: str) -> BackupRecord:
        """The catalogued backup ``backup_id``, or a clear refusal."""
        record = await self.store.get_backup(backup_id) if len(backup_id) <= 128 else None
        if record is None:
            raise CommandError(f"There is no backup `{backup_id[:80]}`; `/ops backup list <service>` shows them.")
        return record

    async def find(self, service: str, backup_id: str, component: str | None = None) -> BackupRecord:
        """A catalogued backup, or — for a number — a Cloud SQL backup run of the service's instance
        (automated runs are not in the catalog). Refuses clearly when neither exists."""
        record = await self.store.get_backup(backup_id) if len(backup_id) <= 128 else None
        if record is not None:
            return record
        instances = {
            name: spec
            for name, spec in self.components(service).items()
            if isinstance(spec, CloudSqlComponent) and component in (None, name)
        }
        if backup_id.isdigit() and len(instances) == 1:
            name, spec = next(iter(instances.items()))
            return self._run_record(service, name, spec, await self.cloudsql(spec).get_backup(backup_id))
        return await self.get(backup_id)

    def _run_record(self, service: str, component: str, spec: CloudSqlComponent, run: BackupRun) -> BackupRecord:
        return BackupRecord(
            id=run.id, service=service, component=component, source="cloudsql", trigger=run.type.lower(),
            requested_by="Cloud SQL", destination="cloudsql", key="",
            location=f"Cloud SQL instance {spec.project}:{spec.instance}", codec="none",
            state=BackupState.GOOD if run.status == "SUCCESSFUL" else BackupState.FAILED,
            started_at=run.started or self.clock(), finished_at=run.end_time, error=run.error or "",
            manifest={"cloudsql": {"backup_run": run.id, "type": run.type, "status": run.status}},
        )  # fmt: skip

    async def cloudsql_runs(self, service: str, *, limit: int = 10) -> dict[str, list[BackupRecord]]:
        """The Cloud SQL backup runs (automated and on-demand) of each instance of ``service``."""
        found: dict[str, list[BackupRecord]] = {}
        for name, spec in self.components(service).items():
            if isinstance(spec, CloudSqlComponent):
                runs = await self.cloudsql(spec).list_backups(limit=limit)
                found[name] = [self._run_record(service, name, spec, run) for run in runs]
        return found

    def _run_id(self, record: BackupRecord) -> str:
        run = (record.manifest or {}).get("cloudsql", {}).get("backup_run")
        if not run:
            raise BackupError(f"Backup `{record.id}` has no Cloud SQL backup run recorded.")
        return str(run)

    def _instance(self, record: BackupRecord) -> CloudSqlComponent:
        spec = self.components(record.service).get(record.component)
        if not isinstance(spec, CloudSqlComponent):
            raise CommandError(f"`{record.service}/{record.component}` is no longer a Cloud SQL component.")
        return spec

    async def listing(self, service: str, *, limit: int = 20) -> list[BackupRecord]:
        return await self.store.list_backups(service=service, limit=limit)

    async def newest_good(self, service: str, component: str) -> BackupRecord | None:
        found = await self.store.list_backups(service=service, component=component, states=[BackupState.GOOD], limit=1)
        return found[0] if found else None

    # -- verification --------------------------------------------------------------------------

    async def verify(self, backup_id: str) -> Verification:
        """Re-read a good backup: its sha256, its manifest, and its content (parsed and counted)."""
        record = await self.get(backup_id)
        if record.state is not BackupState.GOOD:
            raise CommandError(f"Backup `{record.id}` is {record.state.value}, not good: there is nothing to verify.")
        try:
            summary = await self._verify(record)
            ok = True
        except BackupError as exc:
            summary, ok = exc.message, False
        await self.store.record_backup_check(
            record.id, at=self.clock(), result=("ok: " if ok else "failed: ") + summary
        )
        log.info("backup_verified", backup=record.id, ok=ok, summary=summary)
        return Verification(await self.get(record.id), ok, summary)

    async def _verify(self, record: BackupRecord) -> str:
        if record.source == "cloudsql":
            run = await self.cloudsql(self._instance(record)).get_backup(self._run_id(record))
            if run.status != "SUCCESSFUL":
                raise BackupError(f"Cloud SQL reports backup run {run.id} as {run.status}.")
            return f"Cloud SQL reports backup run {run.id} SUCCESSFUL (Google keeps and checks its data)"
        destination = self.destination(record.destination)
        raw_manifest = await destination.read_manifest(record.key)
        if raw_manifest is None:
            raise BackupError(f"The manifest of `{record.id}` is missing at {record.location}.")
        try:
            manifest = json.loads(raw_manifest)
        except ValueError:
            raise BackupError(f"The manifest of `{record.id}` is not valid JSON.") from None
        if manifest.get("sha256") != record.sha256:
            raise BackupError(f"The manifest of `{record.id}` names a different sha256 than the catalog.")
        stored = codecs.Meter(destination.read(record.key), sha256=True)
        spec = self.inventory.services.get(record.service)
        component = spec.components.get(record.component) if spec else None
        content = "content not checked: the component is no longer in the inventory"
        plain = codecs.decompress(stored, _codec(record.codec))
        try:
            if component is not None and component.type == record.source:
                content = await self.source(component).check(plain, (record.manifest or {}).get("stats", {}))
            async for _ in plain:  # whatever the check did not need still counts for the hash
                pass
        finally:
            await codecs.close_stream(plain)
        if stored.size != record.size or stored.sha256 != record.sha256:
            raise BackupError(
                f"`{record.id}` does not match its checksum: the catalog has sha256 {record.sha256} "
                f"({record.size or 0:,} bytes), the stored object has {stored.sha256} ({stored.size:,} bytes)."
            )
        return f"sha256 matches ({stored.size:,} bytes); {content}"

    async def checksum(self, record: BackupRecord) -> None:
        """Raise BackupError unless the stored object still has the catalogued size and sha256."""
        stored = codecs.Meter(self.destination(record.destination).read(record.key), sha256=True)
        async for _ in stored:
            pass
        if stored.size != record.size or stored.sha256 != record.sha256:
            raise BackupError(
                f"`{record.id}` does not match its checksum (catalog sha256 {record.sha256}, "
                f"object {stored.sha256}): it was not restored."
            )

    # -- restore -------------------------------------------------------------------------------

    async def restore(self, record: BackupRecord) -> str:
        """Overwrite the component's data from a good backup whose checksum has just been checked."""
        if record.source == "cloudsql":
            return await self.cloudsql(self._instance(record)).restore(self._run_id(record))
        spec = self.components(record.service).get(record.component)
        if spec is None or spec.type != record.source:
            raise CommandError(f"`{record.service}/{record.component}` is no longer a {record.source} component.")
        await self.checksum(record)
        plain = codecs.decompress(self.destination(record.destination).read(record.key), _codec(record.codec))
        try:
            summary = await self.source(spec).restore(plain)
        finally:
            await codecs.close_stream(plain)
        log.info("backup_restored", backup=record.id, summary=summary)
        return summary

    # -- retention and sweeping ----------------------------------------------------------------

    async def apply_retention(self, service: str, component: str) -> list[str]:
        """Delete good backups the service's retention no longer keeps; never the newest good one."""
        rule = self.retention(service)
        if rule.keep_last is None and rule.keep_days is None:
            return []
        if isinstance(self.components(service).get(component), CloudSqlComponent):
            return []  # Cloud SQL applies its own retention to the runs it keeps
        good = await self.store.list_backups(
            service=service, component=component, states=[BackupState.GOOD], limit=100_000
        )
        now = self.clock()
        deleted: list[str] = []
        for index, record in enumerate(good):
            by_count = rule.keep_last is not None and index < rule.keep_last
            by_age = rule.keep_days is not None and now - record.started_at < timedelta(days=rule.keep_days)
            if index == 0 or by_count or by_age:
                continue
            try:
                await self.destination(record.destination).delete(record.key)
            except (BackupError, CommandError) as exc:
                log.warning("retention_delete_failed", backup=record.id, error=exc.message)
                continue
            if await self.store.delete_backup(record.id, at=now):
                deleted.append(record.id)
        if deleted:
            log.info("retention_applied", service=service, component=component, deleted=deleted)
        return deleted

    async def sweep(self, *, service: str | None = None) -> list[BackupRecord]:
        """Fail the running backups no process is writing any more, then remove the partial objects
        of backups that are not running; each step audited and logged. ``service``: only its own.

        Locks are per process without Redis, so "nobody here holds its lock" proves nothing. A
        backup is dead when its writer has not renewed the heartbeat for ``stall_timeout``: a live
        one renews it every ``heartbeat_every`` seconds, and a dump stuck that long is stopped anyway.
        """
        now = self.clock()
        request_id = secrets.token_hex(6)
        failed: list[BackupRecord] = []
        for record in await self.store.list_backups(service=service, states=[BackupState.RUNNING], limit=1000):
            beat = record.heartbeat_at or record.started_at  # rows from before heartbeats: their start
            if now - beat < self.stale_after or await self._held_here(record):
                continue
            error = f"the process running it stopped: no heartbeat since {beat:%Y-%m-%d %H:%M:%S} UTC"
            done = await self.store.finish_backup(record.id, BackupState.FAILED, at=now, error=error)
            if done is not None:
                log.warning("backup_interrupted", backup=record.id, heartbeat=beat.isoformat())
                await self._audit(request_id, record.service, record.id, f"marked {record.id} failed: {error}")
                failed.append(done)
        await self._sweep_partials(now, service, request_id)
        return failed

    async def sweep_quietly(self) -> None:
        """:meth:`sweep` for a process that came to do something else (``opsbot run``, the console):
        a failure is logged, never raised, so the command still runs and answers."""
        try:
            await self.sweep()
        except Exception:
            log.exception("backup_sweep_failed")

    async def _held_here(self, record: BackupRecord) -> bool:
        """Whether the backup's own lock is held for it (by this process; with Redis, by any)."""
        try:
            return await self.locks.holder(lock_key(record.service, record.component)) == record.id
        except CommandError:  # the lock service is not answering: no proof either way, so wait
            return True

    async def _sweep_partials(self, now: datetime, service: str | None, request_id: str) -> None:
        """Look through every destination for partial objects to remove (at most every PARTIALS_EVERY)."""
        looked = [at for scope, at in self._partials_swept.items() if scope in (service, None)]
        if looked and timedelta(0) <= now - max(looked) < PARTIALS_EVERY:
            return
        self._partials_swept[service] = now
        prefix = f"{service}/" if service else ""
        for name in self.settings.destinations:
            try:
                async with asyncio.timeout(PARTIALS_TIMEOUT):
                    await self._remove_partials(self.destination(name), prefix, now, request_id)
            except Exception:  # unreachable or unreadable: the next sweep tries again
                log.warning("backup_partials_sweep_failed", destination=name, exc_info=True)

    async def _remove_partials(self, destination: Destination, prefix: str, now: datetime, request_id: str) -> None:
        """Remove the partial objects untouched for ``stall_timeout`` whose backup is not running."""
        for partial in await destination.partials(prefix):
            backup_id = backup_id_of(partial.key)
            if backup_id is None or now - partial.modified < self.stale_after:
                continue  # not a name the runner gives, or written to lately
            record = await self.store.get_backup(backup_id)
            if record is not None and record.state is BackupState.RUNNING:
                continue  # a live writer's, or a dead one's that the heartbeat rule fails first
            why = f"backup {backup_id} is {record.state.value}" if record else f"backup {backup_id} is not catalogued"
            await destination.remove_partial(partial)
            done = "aborted" if destination.kind == "s3" else "deleted"
            log.warning("backup_partial_removed", destination=destination.name, location=partial.location, why=why)
            await self._audit(
                request_id, partial.key.split("/", 1)[0], backup_id, self._partial_line(done, partial, now, why)
            )

    def _partial_line(self, done: str, partial: Partial, now: datetime, why: str) -> str:
        idle = int((now - partial.modified).total_seconds())
        return f"{done} the partial {partial.location} (untouched for {idle} s; {why})"

    async def _audit(self, request_id: str, service: str, args: str, detail: str) -> None:
        await record_event(
            self.store, self.redactor, request_id=request_id, actor=SWEEPER, command="backup sweep",
            args=args, channel="", outcome="ok", service=service, detail=detail,
        )  # fmt: skip

    async def close(self) -> None:
        for destination in self._destinations.values():
            with contextlib.suppress(Exception):
                await destination.close()
        self._destinations.clear()
