"""The inventory: services, their components, roles and the ops channel, loaded from YAML."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from services.alerts.models import AlertRule
from services.errors import InventoryError
from services.schedules import ScheduleSpec

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
SlackId = Annotated[str, StringConstraints(pattern=r"^(\*|[UWS][A-Z0-9]{2,})$")]


class Role(StrEnum):
    """Roles, from least to most trusted; each includes the rights of those before it."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    APPROVER = "approver"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ComponentBase(_Model):
    description: str = ""
    timeout: float = Field(5.0, gt=0, le=120, description="Seconds a single probe may take.")
    alerts: list[AlertRule] = Field(
        default_factory=list,
        description="Alert rules the watcher evaluates (default for probed types: ServiceDown after 1 min).",
    )


class HttpComponent(ComponentBase):
    """An HTTP app with liveness, readiness and detail endpoints (runbooks 000, 002, 004)."""

    type: Literal["http"]
    url: AnyHttpUrl = Field(description="Base URL of the app, e.g. https://shop.example.com")
    liveness: str | None = Field("/healthz", description="Liveness path; null to skip.")
    readiness: str | None = Field("/ready", description="Readiness path (/ready or /readiness); null to skip.")
    detail: str | None = Field("/health", description="Detail path answering JSON with a `components` map.")
    metrics: str | None = Field(None, description="Prometheus metrics path, e.g. /metrics.")
    expected_status: int = Field(200, ge=100, le=599)
    slow_ms: int = Field(2000, gt=0, description="Answers slower than this are a warning.")
    sleeps: bool = Field(False, description="The host sleeps when idle (Render free tier): a slow success is 'waking'.")
    headers: dict[str, SecretStr] = Field(default_factory=dict, description="Extra request headers.")

    @field_validator("liveness", "readiness", "detail", "metrics")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be a path starting with /")
        return value


class PostgresComponent(ComponentBase):
    type: Literal["postgres"]
    dsn: SecretStr = Field(description="postgresql://user:password@host:port/db, usually ${VAR}.")
    jobs: JobsTable | None = None


class JobsTable(_Model):
    """The jobs-table convention of runbook 003."""

    table: str = Field(
        "jobs",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$",
        description="Table name, optionally schema-qualified: jobs or ops.jobs.",
    )
    status_column: str = Field("status", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    started_column: str = Field("started_at", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    stuck_after_minutes: int = Field(60, gt=0)
    id_column: str = Field(
        "id", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$", description="Primary-key column naming each job."
    )
    error_column: str | None = Field(
        "error_message",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$",
        description="Column given the reason when a stuck job is reset; null if the table has none.",
    )
    processing_value: str = Field(
        "processing", min_length=1, max_length=64, description="Status of a job being worked on."
    )
    pending_value: str = Field("pending", min_length=1, max_length=64, description="Status a stuck job is reset to.")

    @model_validator(mode="after")
    def _distinct_statuses(self) -> JobsTable:
        if self.processing_value == self.pending_value:
            raise ValueError("processing_value and pending_value must differ")
        return self


QueueName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]


class QueueSettings(_Model):
    """Bull or BullMQ job queues kept in a Redis (runbook 001), read and cleaned by `/ops queue`."""

    library: Literal["bull", "bullmq"] = Field(description="The Node library writing them: bull (4.x) or bullmq (5.x).")
    prefix: str = Field(
        "bull", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Key prefix (the library's `prefix` option)."
    )
    names: list[QueueName] = Field(
        default_factory=list, description="Queue names; empty: found with a bounded SCAN for <prefix>:*:id."
    )


class RedisComponent(ComponentBase):
    type: Literal["redis"]
    url: SecretStr = Field(description="redis://[:password@]host:port/db, usually ${VAR}.")
    memory_warning_pct: float = Field(80.0, gt=0, le=100)
    memory_critical_pct: float = Field(95.0, gt=0, le=100)
    queues: QueueSettings | None = Field(None, description="Bull/BullMQ queues in this Redis, for `/ops queue`.")

    @model_validator(mode="after")
    def _thresholds_in_order(self) -> RedisComponent:
        if self.memory_warning_pct >= self.memory_critical_pct:
            raise ValueError("memory_warning_pct must be below memory_critical_pct")
        return self


CollectionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,119}$")]
FieldPath = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,7}$")
]
MatchValue = Annotated[str, StringConstraints(max_length=200)] | int | bool


class DocumentCleanupRule(_Model):
    """Documents `/ops cleanup` deletes: those equal to `match` whose `time_field` is older than N days."""

    name: Name
    collection: CollectionName
    match: dict[FieldPath, MatchValue | list[MatchValue]] = Field(
        default_factory=dict, description="Field equal to a value, or one of a list, e.g. {status: failed}."
    )
    time_field: FieldPath = Field("createdAt", description="A date field; documents older than the limit are deleted.")
    older_than_days: int = Field(ge=1, le=3650)

    @model_validator(mode="after")
    def _plain_rule(self) -> DocumentCleanupRule:
        if self.collection.startswith("system."):
            raise ValueError(f"{self.collection}: system collections are not cleaned up")
        if "_id" in self.match:
            raise ValueError("match may not name _id (a plan deletes by the ids it lists)")
        if self.time_field in self.match:
            raise ValueError(f"{self.time_field} is both the time field and in match")
        return self


class MongoComponent(ComponentBase):
    type: Literal["mongodb"]
    uri: SecretStr = Field(description="mongodb://user:password@host:port, usually ${VAR}.")
    database: str = Field(min_length=1)
    collections: list[str] = Field(default_factory=list, description="Collections whose counts are shown.")
    cleanup: list[DocumentCleanupRule] = Field(default_factory=list, description="Rules of `/ops cleanup`.")


class QdrantComponent(ComponentBase):
    type: Literal["qdrant"]
    url: str | None = Field(None, description="Server URL, e.g. http://qdrant:6333.")
    path: Path | None = Field(None, description="Local-mode storage directory (embedded Qdrant).")
    api_key: SecretStr | None = None
    collections: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_location(self) -> QdrantComponent:
        if (self.url is None) == (self.path is None):
            raise ValueError("set exactly one of url or path")
        return self


class SqliteComponent(ComponentBase):
    type: Literal["sqlite"]
    path: Path = Field(description="The database file.")


class DeployComponent(ComponentBase):
    """A platform opsbot deploys to, rolls back and restarts (runbooks 000, 002, 003)."""

    settle_seconds: float = Field(
        10.0, ge=0, le=600, description="Seconds to let a rollback or restart settle before the health checks run."
    )
    operation_timeout: float = Field(
        600.0, gt=0, le=3600, description="Seconds to wait for a deploy, rollback or restart to finish."
    )


class CloudRunComponent(DeployComponent):
    type: Literal["cloudrun"]
    project: str = Field(pattern=r"^[a-z][a-z0-9:.-]{3,62}$")
    region: str = Field(pattern=r"^[a-z]+-[a-z]+[0-9]$")
    service: str = Field(pattern=r"^[a-z]([-a-z0-9]{0,47}[a-z0-9])?$")


class LambdaComponent(DeployComponent):
    type: Literal["lambda"]
    function: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    alias: str = Field("live", pattern=r"^[A-Za-z_-][A-Za-z0-9_-]{0,127}$")
    region: str = Field("us-east-1", pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
    endpoint_url: AnyHttpUrl | None = Field(None, description="For a Lambda-compatible endpoint (tests: moto).")


class RenderComponent(DeployComponent):
    type: Literal["render"]
    service_id: str = Field(pattern=r"^srv-[a-z0-9]+$")
    api_key: SecretStr
    api_url: AnyHttpUrl = Field(AnyHttpUrl("https://api.render.com/v1"), description="Render API base URL.")
    poll_seconds: float = Field(5.0, gt=0, le=60, description="Seconds between checks of a running deploy.")


class ComposeComponent(DeployComponent):
    type: Literal["compose"]
    project_dir: Path
    project_name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    services: list[str] = Field(default_factory=list)
    docker: str = Field("docker", description="The docker CLI to run (a name on PATH or an absolute path).")
    jobs: str | None = Field(
        None, description="A postgres component of the same service whose jobs table safe-stop/safe-start use."
    )
    grace_seconds: float = Field(60.0, ge=0, le=3600, description="safe-stop: how long in-flight jobs may finish.")


class FilesComponent(ComponentBase):
    """Files and directories kept as they are (uploads/, config files): backed up as a tar."""

    type: Literal["files"]
    paths: list[Path] = Field(min_length=1, description="Absolute files or directories to back up.")

    @field_validator("paths")
    @classmethod
    def _absolute(cls, value: list[Path]) -> list[Path]:
        for path in value:
            if not path.is_absolute():
                raise ValueError(f"{path}: must be an absolute path")
        return value


class CloudSqlComponent(ComponentBase):
    """A Cloud SQL instance whose managed backups opsbot lists, creates and restores (runbook 000)."""

    type: Literal["cloudsql"]
    project: str = Field(pattern=r"^[a-z][a-z0-9:.-]{3,62}$")
    instance: str = Field(pattern=r"^[a-z][a-z0-9-]{0,97}$")
    api_url: AnyHttpUrl = Field(
        AnyHttpUrl("https://sqladmin.googleapis.com"), description="Cloud SQL Admin API base URL."
    )
    access_token: SecretStr | None = Field(
        None, description="OAuth access token, usually ${VAR}; default: Google application default credentials."
    )
    operation_timeout: float = Field(1800.0, gt=0, description="Seconds to wait for a backup or restore operation.")
    poll_seconds: float = Field(2.0, gt=0, le=60, description="Seconds between checks of a running operation.")


Component = Annotated[
    HttpComponent
    | PostgresComponent
    | RedisComponent
    | MongoComponent
    | QdrantComponent
    | SqliteComponent
    | CloudRunComponent
    | LambdaComponent
    | RenderComponent
    | ComposeComponent
    | FilesComponent
    | CloudSqlComponent,
    Field(discriminator="type"),
]


class Retention(_Model):
    """Which good backups of one component to keep; a backup is kept if either rule keeps it, and the
    newest good backup is always kept."""

    keep_last: int | None = Field(7, ge=1, le=10000, description="Keep the newest N good backups.")
    keep_days: int | None = Field(None, ge=1, le=36500, description="Keep good backups younger than N days.")


class DirectoryDestination(_Model):
    type: Literal["directory"]
    path: Path = Field(description="Directory for backups; relative paths are relative to the inventory file.")


class S3Destination(_Model):
    type: Literal["s3"]
    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    prefix: str = Field("", pattern=r"^([A-Za-z0-9._-]+/)*$", description='Key prefix ending in "/", e.g. "opsbot/".')
    region: str | None = None
    endpoint_url: AnyHttpUrl | None = Field(None, description="For S3-compatible stores (MinIO, R2, …).")
    part_size_mb: int = Field(8, ge=5, le=512, description="Multipart upload part size.")
    timeout: float = Field(30.0, gt=0, le=600, description="Seconds one S3 request may take.")


DestinationSpec = Annotated[DirectoryDestination | S3Destination, Field(discriminator="type")]


def _default_destinations() -> dict[str, DestinationSpec]:
    return {"local": DirectoryDestination(type="directory", path=Path("backups"))}


class BackupSettings(_Model):
    """Where backups go, how they are compressed, how many are kept and how often one is expected."""

    destinations: dict[Name, DestinationSpec] = Field(
        default_factory=_default_destinations, description="Named places backups are written to."
    )
    destination: Name = Field("local", description="The destination used unless a service names another.")
    compression: Literal["zstd", "gzip", "none"] = "zstd"
    retention: Retention = Field(default_factory=Retention)
    expected_every_hours: float = Field(
        26.0, gt=0, description="/ops backup list warns when the newest good backup is older than this."
    )
    stall_timeout: float = Field(300.0, gt=0, description="Seconds a dump may go without producing a byte.")
    pg_bin: Path | None = Field(None, description="Directory of pg_dump/pg_restore (default: found on PATH).")

    @model_validator(mode="after")
    def _known_destination(self) -> BackupSettings:
        if self.destination not in self.destinations:
            known = sorted(self.destinations)
            raise ValueError(f"destination {self.destination!r} is not one of destinations: {known}")
        return self


class ServiceBackup(_Model):
    """A service's own backup policy; unset fields keep the inventory-wide `backups:` setting."""

    destination: Name | None = None
    retention: Retention | None = None
    expected_every_hours: float | None = Field(None, gt=0)


def _inside_root(path: str) -> str:
    """A path relative to its root that cannot leave it."""
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or ".." in parts:
        raise ValueError(f"{path!r} leaves its root (use a path relative to the root, without ..)")
    return path


class FileCleanupRule(_Model):
    """Files `/ops cleanup` deletes: regular files under a declared root older than N days."""

    name: Name
    root: Name = Field(description="One of this service's cleanup roots.")
    path: Annotated[str, StringConstraints(max_length=300)] = Field(
        "", description="A directory under the root, relative to it (empty: the root itself)."
    )
    match: str = Field("*", min_length=1, max_length=100, pattern=r"^[^/\\]+$", description="File-name pattern.")
    older_than_days: int = Field(ge=1, le=3650)
    recursive: bool = Field(True, description="Also look in the directories below.")

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        return _inside_root(value)


class CleanupSettings(_Model):
    """Directories `/ops cleanup` may delete files in, and its file rules."""

    roots: dict[Name, Path] = Field(default_factory=dict, description="Absolute directories, by name.")
    files: list[FileCleanupRule] = Field(default_factory=list)

    @field_validator("roots")
    @classmethod
    def _absolute_roots(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name, root in value.items():
            if not root.is_absolute() or ".." in root.parts or root == Path(root.anchor):
                raise ValueError(f"{name}: {str(root)!r} must be an absolute directory below / (without ..)")
        return value

    @model_validator(mode="after")
    def _declared_roots(self) -> CleanupSettings:
        for rule in self.files:
            if rule.root not in self.roots:
                raise ValueError(
                    f"file rule {rule.name!r}: root {rule.root!r} is not one of roots: {sorted(self.roots)}"
                )
        return self


class Service(_Model):
    description: str = ""
    runbook: str | None = Field(None, description="Which runbook this service follows.")
    components: dict[Name, Component] = Field(min_length=1)
    backup: ServiceBackup = Field(default_factory=ServiceBackup)
    cleanup: CleanupSettings = Field(default_factory=CleanupSettings, description="Files `/ops cleanup` deletes.")


class Roles(_Model):
    """Slack user IDs (U…/W…) or user-group IDs (S…) per role; "*" means everyone."""

    viewer: list[SlackId] = Field(default_factory=list)
    operator: list[SlackId] = Field(default_factory=list)
    approver: list[SlackId] = Field(default_factory=list)
    admin: list[SlackId] = Field(default_factory=list)

    def members(self, role: Role) -> list[str]:
        return list(getattr(self, role.value))


class HealthSettings(_Model):
    deadline: float = Field(10.0, gt=0, le=300, description="Overall deadline of one /ops health.")


ChannelId = Annotated[str, StringConstraints(pattern=r"^[CG][A-Z0-9]{2,}$")]


class ApprovalRule(_Model):
    """Approval policy for one risk level or one command; unset fields keep the broader setting."""

    approver_role: Literal["approver", "admin"] | None = Field(None, description="Who may approve.")
    self_approve: bool | None = Field(
        None, description="May requesters approve their own request? Default: no for destructive, yes for change."
    )
    approvers: int | None = Field(None, ge=1, le=5, description="Distinct approvers needed (default 1, 2 if critical).")
    critical: bool | None = Field(None, description="Critical commands need two approvers unless `approvers` says.")
    expiry_minutes: int | None = Field(None, ge=1, le=1440, description="Minutes a request waits for approval.")


class ApprovalSettings(_Model):
    """Who approves what, how many, for how long, and where destructive commands may be asked for."""

    expiry_minutes: int = Field(15, ge=1, le=1440, description="Default minutes a request waits for approval.")
    channels: list[ChannelId] = Field(
        default_factory=list, description="Channels where destructive commands may be requested (empty: any)."
    )
    risk: dict[Literal["change", "destructive"], ApprovalRule] = Field(
        default_factory=dict, description="Policy per risk level."
    )
    commands: dict[str, ApprovalRule] = Field(
        default_factory=dict, description='Policy per command, by its verb, e.g. "jobs reset-stuck".'
    )


class AlertSettings(_Model):
    """The watcher: how often it probes, how long results are kept, the rule every component gets."""

    interval_seconds: float = Field(60.0, ge=5, le=3600, description="Seconds between two rounds of probes.")
    history_days: int = Field(35, ge=1, le=400, description="Days of probe results kept for digests and charts.")
    down_by_default: bool = Field(
        True, description="A probed component without rules of its own gets ServiceDown (down for 1 min)."
    )
    enabled: bool = Field(True, description="Run the watcher in `opsbot serve`.")


class Inventory(_Model):
    """The whole inventory file."""

    ops_channel: str | None = Field(None, pattern=r"^[CG][A-Z0-9]{2,}$", description="Channel ID.")
    timezone: str = "UTC"
    roles: Roles = Field(default_factory=Roles)
    health: HealthSettings = Field(default_factory=HealthSettings)
    approvals: ApprovalSettings = Field(default_factory=ApprovalSettings)
    backups: BackupSettings = Field(default_factory=BackupSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    schedules: list[ScheduleSpec] = Field(
        default_factory=list, description="Commands run on a cron schedule: digests, backups, checks, keep-alives."
    )
    services: dict[Name, Service] = Field(min_length=1)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Asia/Seoul)") from None
        return value

    def components(self) -> Iterator[tuple[str, str, Component]]:
        for service_name, service in self.services.items():
            for component_name, component in service.components.items():
                yield service_name, component_name, component


PostgresComponent.model_rebuild()

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(node: Any, path: str, env: Mapping[str, str], problems: list[str], used: set[str]) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string, collecting missing variables."""
    if isinstance(node, dict):
        return {k: _expand(v, f"{path}.{k}" if path else str(k), env, problems, used) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, f"{path}.{i}", env, problems, used) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            used.add(env[name])
            return env[name]
        if default is not None:
            return default
        problems.append(f"{path}: missing env var {name}")
        return ""

    return _VAR.sub(replace, node)


_TAGS = frozenset(
    {
        "http",
        "postgres",
        "redis",
        "mongodb",
        "qdrant",
        "sqlite",
        "cloudrun",
        "lambda",
        "render",
        "compose",
        "files",
        "cloudsql",
    }
)


def _loc(loc: tuple[int | str, ...]) -> str:
    """Dotted path of a validation error, without the union tag pydantic inserts after a component."""
    out: list[str] = []
    for part in map(str, loc):
        if part in _TAGS and len(out) >= 2 and out[-2] == "components":
            continue
        out.append(part)
    return ".".join(out)


def _has_jobs_table(spec: Component | None) -> bool:
    return isinstance(spec, PostgresComponent) and spec.jobs is not None


def _cross_checks(inventory: Inventory) -> list[str]:
    """Problems no single field shows: settings that contradict each other."""
    deadline = inventory.health.deadline
    destinations = inventory.backups.destinations
    problems = [
        f"services.{s}.components.{c}.jobs: {spec.jobs!r} is not a postgres component of {s} with a jobs table"
        for s, c, spec in inventory.components()
        if isinstance(spec, ComposeComponent)
        and spec.jobs is not None
        and not _has_jobs_table(inventory.services[s].components.get(spec.jobs))
    ]
    for name, service in inventory.services.items():
        rules = [
            r.name for spec in service.components.values() if isinstance(spec, MongoComponent) for r in spec.cleanup
        ]
        rules += [r.name for r in service.cleanup.files]
        problems += [
            f"services.{name}.cleanup: the rule name {rule!r} is used twice"
            for rule in sorted(set(rules))
            if rules.count(rule) > 1
        ]
    seen: set[str] = set()
    for index, schedule in enumerate(inventory.schedules):
        if schedule.name in seen:
            problems.append(f"schedules.{index}.name: {schedule.name!r} is used by an earlier schedule")
        seen.add(schedule.name)
    problems += [
        f"services.{name}.backup.destination: {service.backup.destination!r} is not one of "
        f"backups.destinations: {sorted(destinations)}"
        for name, service in inventory.services.items()
        if service.backup.destination is not None and service.backup.destination not in destinations
    ]
    return problems + [
        f"services.{s}.components.{c}.timeout: {spec.timeout:g} s is longer than health.deadline "
        f"({deadline:g} s), so /ops health would always cut it off"
        for s, c, spec in inventory.components()
        if spec.timeout > deadline
    ]


def _secret_fields(value: Any) -> Iterator[SecretStr]:
    """SecretStr values, also inside dicts and lists (HTTP headers)."""
    if isinstance(value, SecretStr):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _secret_fields(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _secret_fields(item)


def secrets_in(value: str) -> set[str]:
    """The secret parts of a configured value: the whole value, and a URL's password if any."""
    found = {value} if value else set()
    try:
        password = urlsplit(value).password
    except ValueError:
        password = None
    if password:
        found.add(password)
    return found


class LoadedInventory(BaseModel):
    """A validated inventory plus the secret strings it was built from (for redaction)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    inventory: Inventory
    source: str
    secrets: frozenset[str]


def parse_inventory(text: str, source: str, env: Mapping[str, str] | None = None) -> LoadedInventory:
    """Parse and validate inventory YAML; raise InventoryError listing every problem by path."""
    env = os.environ if env is None else env
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "file"
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise InventoryError(source, [f"{where}: {problem}"]) from None
    if not isinstance(raw, dict):
        raise InventoryError(source, ["(top level): expected a mapping with `services:`"])
    problems: list[str] = []
    used: set[str] = set()
    expanded = _expand(raw, "", env, problems, used)
    inventory: Inventory | None = None
    try:
        inventory = Inventory.model_validate(expanded)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            path = _loc(error["loc"]) or "(top level)"
            if any(p.startswith(path + ":") for p in problems):
                continue  # already reported as a missing variable
            problems.append(f"{path}: {error['msg'].removeprefix('Value error, ')}")
    if inventory is not None:
        problems += _cross_checks(inventory)
    if problems or inventory is None:
        raise InventoryError(source, problems)
    secrets: set[str] = set()
    for expanded_value in used:
        secrets |= secrets_in(expanded_value)
    for _, _, component in inventory.components():
        for field in type(component).model_fields:
            for secret in _secret_fields(getattr(component, field)):
                secrets |= secrets_in(secret.get_secret_value())
    return LoadedInventory(inventory=inventory, source=source, secrets=frozenset(secrets))


def load_inventory(path: str | Path, env: Mapping[str, str] | None = None) -> LoadedInventory:
    """Read an inventory file; a missing or unreadable file is reported like any other problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InventoryError(str(path), [f"(file): cannot read: {exc.strerror or exc}"]) from None
    return parse_inventory(text, str(path), env)


def inventory_schema() -> dict[str, Any]:
    """JSON Schema of the inventory, for editors."""
    return Inventory.model_json_schema()
