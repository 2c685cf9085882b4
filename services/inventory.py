"""The inventory: services, their components, roles and the ops channel, loaded from YAML."""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterator, Mapping
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from services.alerts.models import (
    AlertRule,
    CpuRule,
    DiskRule,
    MemoryRule,
    ProviderIncidentRule,
    QueueBacklogRule,
    QueueFailureRateRule,
)
from services.errors import InventoryError
from services.figures.thresholds import FigureThreshold, check_thresholds
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
    thresholds: dict[str, FigureThreshold] = Field(
        default_factory=dict,
        description="`/ops status` thresholds by figure name, e.g. {cpu_pct: {warning: 70, critical: 90}}; "
        "default the runbooks' (CPU, memory > 80 %, error rate > 5 %, p95 > 1 s, disk ≥ 80/90 %).",
    )

    @field_validator("thresholds")
    @classmethod
    def _known_figures(cls, value: dict[str, FigureThreshold]) -> dict[str, FigureThreshold]:
        check_thresholds(value)
        return value


_API_PATH = r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]{0,199}$"
JsonField = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
_KEY = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
JsonPath = Annotated[str, StringConstraints(pattern=rf"^{_KEY}(\.{_KEY}){{0,4}}$")]


class AdminLogin(_Model):
    """How the bot logs in to an app's admin API for a JWT (runbook 000's `/api/auth/login`)."""

    path: str = Field(pattern=_API_PATH, description="Login path, e.g. /api/auth/login (POSTed as JSON).")
    method: Literal["POST"] = "POST"
    user_field: JsonField = Field("username", description="Body field of the user name.")
    password_field: JsonField = Field("password", description="Body field of the password.")
    token_field: JsonPath | None = Field(
        None, description="Where the JWT is in the answer (dotted); default `access_token`, else `token`."
    )


class AdminCredentials(_Model):
    """The admin user and password, from the environment (`${VAR}`). The password is a secret: never
    shown, logged or audited. The user name is not masked (a name like `admin` would hide that word in
    every message); it is still never shown by `/ops api`."""

    user: str = Field(max_length=200)
    password: SecretStr


class AdminEndpoint(_Model):
    """One admin read: `GET path`, shown as a table of the declared columns."""

    path: str = Field(pattern=_API_PATH, description="e.g. /api/admin/prompts")
    columns: list[JsonPath] = Field(min_length=1, max_length=8, description="Fields of each item shown, in order.")
    list_field: JsonPath | None = Field(
        None, description="Where the list is in the answer (dotted); default the answer itself or its one list."
    )
    total_field: JsonPath | None = Field(None, description="Where the answer says its total count (default `total`).")


class AdminApi(_Model):
    """An app's admin HTTP API read by `/ops api <service> <endpoint>` with a JWT the bot obtains itself."""

    login: AdminLogin
    credentials: AdminCredentials
    endpoints: dict[Name, AdminEndpoint] = Field(min_length=1, max_length=20)


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
    admin_api: AdminApi | None = Field(None, description="The app's admin API, read by `/ops api` (runbook 000).")

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
    users: UsersTable | None = Field(None, description="The app's users table `/ops users` reads (runbook 000).")


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


_USER_COLUMN = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
SECRET_COLUMN = re.compile(r"pass(word|wd)?|hash|secret|salt|otp|api_?key|private", re.IGNORECASE)
"""Column names that may hold credentials: never shown by `/ops users`."""
_ADMIN_ARG_FIELDS = frozenset({"student_id", "name"})


class UsersTable(_Model):
    """The app's users table (runbook 000): what `/ops users` lists and (de)activates, and the app's own
    Cloud Run job that `/ops users create-admin` executes."""

    table: str = Field("users", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")
    id_column: str = Field("id", pattern=_USER_COLUMN)
    student_id_column: str = Field("student_id", pattern=_USER_COLUMN)
    name_column: str = Field("name", pattern=_USER_COLUMN)
    role_column: str = Field("role", pattern=_USER_COLUMN)
    active_column: str = Field("is_active", pattern=_USER_COLUMN, description="A boolean column.")
    daily_tokens_column: str | None = Field("daily_token_usage", pattern=_USER_COLUMN)
    total_tokens_column: str | None = Field("total_token_usage", pattern=_USER_COLUMN)
    shown: list[Annotated[str, StringConstraints(pattern=_USER_COLUMN)]] | None = Field(
        None,
        max_length=12,
        description="Columns `/ops users` shows (default: id, student id, name, role, active, tokens); never "
        "one named like a password, hash or secret.",
    )
    create_admin_job: Annotated[
        CloudRunJobRef | None, BeforeValidator(_job_ref, json_schema_input_type=str | CloudRunJobRef | None)
    ] = Field(None, description="The app's Cloud Run job that creates an admin (on the service's cloudrun component).")
    create_admin_args: list[str] = Field(
        default_factory=lambda: ["create-admin", "{student_id}", "{name}"],
        min_length=1,
        max_length=20,
        description="The job's container args for one execution; placeholders {student_id} and {name} only.",
    )
    password_env: str = Field(
        "ADMIN_PASSWORD",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        description="The env var the one-time password is passed in (only in the execution's overrides).",
    )

    def columns_shown(self) -> list[str]:
        """The declared columns, or the default set."""
        if self.shown is not None:
            return list(self.shown)
        base = [self.id_column, self.student_id_column, self.name_column, self.role_column, self.active_column]
        return base + [c for c in (self.daily_tokens_column, self.total_tokens_column) if c is not None]

    @model_validator(mode="after")
    def _safe(self) -> UsersTable:
        named = [self.id_column, self.student_id_column, self.name_column, self.role_column, self.active_column]
        leaked = [c for c in [*named, *self.columns_shown()] if SECRET_COLUMN.search(c)]
        if leaked:
            raise ValueError(f"column {leaked[0]!r} looks like a password, hash or secret and may not be shown")
        for arg in self.create_admin_args:
            fields = {f for _, f, _, _ in string.Formatter().parse(arg) if f is not None}
            if not fields <= _ADMIN_ARG_FIELDS:
                raise ValueError(
                    f"create_admin_args: {arg[:40]!r} uses {sorted(fields - _ADMIN_ARG_FIELDS)}; only {{student_id}} "
                    "and {name} may be used (the password goes only in password_env)"
                )
        return self


QueueName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]


class QueueSettings(_Model):
    """Bull or BullMQ job queues kept in a Redis (runbook 001), read and cleaned by `/ops queue`."""

    library: Literal["bull", "bullmq"] = Field(
        description="The Node library writing them: bull (4.x) or bullmq (5.x or 6.x)."
    )
    prefix: str = Field(
        "bull", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Key prefix (the library's `prefix` option)."
    )
    names: list[QueueName] = Field(
        default_factory=list, description="Queue names; empty: found with a bounded SCAN for <prefix>:*:id."
    )


MAX_KEY_PREFIXES = 20
KEY_PREFIX = re.compile(r"^[A-Za-z0-9_{}][A-Za-z0-9_{}:./|-]{0,99}$")


class RedisComponent(ComponentBase):
    type: Literal["redis"]
    url: SecretStr = Field(description="redis://[:password@]host:port/db, usually ${VAR}.")
    memory_warning_pct: float = Field(80.0, gt=0, le=100)
    memory_critical_pct: float = Field(95.0, gt=0, le=100)
    queues: QueueSettings | None = Field(None, description="Bull/BullMQ queues in this Redis, for `/ops queue`.")
    key_prefixes: list[str] = Field(
        default_factory=list,
        max_length=MAX_KEY_PREFIXES,
        description="Key prefixes whose keys `/ops stats` counts with a bounded SCAN, e.g. `cache:` or `yt:job:`.",
    )

    @field_validator("key_prefixes")
    @classmethod
    def _plain_prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if not KEY_PREFIX.match(prefix):
                raise ValueError(
                    f"{prefix[:40]!r} is not a key prefix: letters, digits and _ {{ }} : . / | - only "
                    "(no wildcards or spaces), at most 100 characters"
                )
        repeated = sorted({p for p in value if value.count(p) > 1})
        if repeated:
            raise ValueError(f"{repeated[0]!r} is listed twice")
        return value

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


SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)
"""Setting names that look like secrets: never shown or changed by `/ops config`."""
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class EnvSetting(_Model):
    """One environment variable `/ops config set` may change: its values by a choice list or a pattern."""

    choices: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] | None = Field(
        None, min_length=1, description="The values allowed, e.g. [claude, openai, gemini]."
    )
    pattern: str | None = Field(
        None, max_length=500, description="A regular expression the whole value must match, e.g. ^[0-9]{1,7}$."
    )
    description: str = Field("", max_length=300)

    @model_validator(mode="after")
    def _one_rule(self) -> EnvSetting:
        if (self.choices is None) == (self.pattern is None):
            raise ValueError("give exactly one of `choices` or `pattern`")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern: not a regular expression: {exc}") from None
        return self


def _env_settings(value: dict[str, EnvSetting]) -> dict[str, EnvSetting]:
    for key in value:
        if not ENV_NAME.fullmatch(key):
            raise ValueError(f"{key[:80]!r} is not an environment variable name")
        if SECRET_NAME.search(key):
            raise ValueError(
                f"{key}: looks like a secret (…KEY, …SECRET, …TOKEN, …PASSWORD); secrets are never settings"
            )
    return value


EnvSettings = Annotated[dict[str, EnvSetting], AfterValidator(_env_settings)]
SETTINGS_HELP = (
    "Environment variables `/ops config` shows and `/ops config set` may change: "
    "KEY: {choices: [...]} or {pattern: ...}, with an optional description."
)


class CloudRunJobRef(_Model):
    """A Cloud Run job beside a service (runbook 000's `vcbl-chatbot-migrate`); project and region default
    to the service's."""

    job: str = Field(pattern=r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$", description="The Cloud Run job's name.")
    project: str | None = Field(None, pattern=r"^[a-z][a-z0-9:.-]{3,62}$")
    region: str | None = Field(None, pattern=r"^[a-z]+-[a-z]+[0-9]$")
    timeout: float = Field(
        1800.0, gt=0, le=86400, description="Seconds an execution may take before the bot stops following it."
    )
    poll_seconds: float = Field(5.0, gt=0, le=60, description="Seconds between reads of a running execution.")


def _job_ref(value: Any) -> Any:
    return {"job": value} if isinstance(value, str) else value


class CloudRunComponent(DeployComponent):
    type: Literal["cloudrun"]
    project: str = Field(pattern=r"^[a-z][a-z0-9:.-]{3,62}$")
    region: str = Field(pattern=r"^[a-z]+-[a-z]+[0-9]$")
    service: str = Field(pattern=r"^[a-z]([-a-z0-9]{0,47}[a-z0-9])?$")
    migrate_job: Annotated[
        CloudRunJobRef | None, BeforeValidator(_job_ref, json_schema_input_type=str | CloudRunJobRef | None)
    ] = Field(
        None, description="The job `/ops migrate` executes: a name, or {job, project, region, timeout, poll_seconds}."
    )
    settings: EnvSettings = Field(default_factory=dict, description=SETTINGS_HELP)


class LambdaComponent(DeployComponent):
    type: Literal["lambda"]
    function: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    alias: str = Field("live", pattern=r"^[A-Za-z_-][A-Za-z0-9_-]{0,127}$")
    region: str = Field("us-east-1", pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
    endpoint_url: AnyHttpUrl | None = Field(None, description="For a Lambda-compatible endpoint (tests: moto).")
    log_group: str | None = Field(
        None,
        pattern=r"^[.\-_/#A-Za-z0-9]{1,512}$",
        description="The CloudWatch log group `/ops logs` reads (default: /aws/lambda/<function>).",
    )
    settings: EnvSettings = Field(default_factory=dict, description=SETTINGS_HELP)


class RenderComponent(DeployComponent):
    type: Literal["render"]
    service_id: str = Field(pattern=r"^srv-[a-z0-9]+$")
    api_key: SecretStr
    owner_id: str | None = Field(
        None,
        pattern=r"^(tea|usr)-[a-z0-9]+$",
        description="The workspace (tea-…) or user (usr-…) owning the service: Render's /v1/logs needs it.",
    )
    api_url: AnyHttpUrl = Field(AnyHttpUrl("https://api.render.com/v1"), description="Render API base URL.")
    poll_seconds: float = Field(5.0, gt=0, le=60, description="Seconds between checks of a running deploy.")
    settings: EnvSettings = Field(default_factory=dict, description=SETTINGS_HELP)


class ComposeDisk(_Model):
    """A filesystem inside a compose service, read with `docker compose exec <service> df -P <path>` (a
    stack on another machine, reached through DOCKER_HOST, where the bot's own `host` cannot look)."""

    service: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$", max_length=64)
    path: str = Field(
        pattern=r"^/[A-Za-z0-9._/@+-]*$", max_length=200, description="An absolute path in the container."
    )


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
    disks: list[ComposeDisk] = Field(
        default_factory=list, max_length=20, description="Filesystems `/ops status` reads inside services with df."
    )


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


_HOST_NAME = re.compile(
    r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*$")


class TlsComponent(ComponentBase):
    """A TLS endpoint whose certificate is verified and watched for expiry (runbook 001)."""

    type: Literal["tls"]
    host: str = Field(max_length=253, description="Host name or IP address to connect to (no scheme, no port).")
    port: int = Field(443, ge=1, le=65535)
    server_name: str | None = Field(
        None, max_length=253, description="Name sent as SNI and checked against the certificate (default: host)."
    )
    ca_file: Path | None = Field(
        None, description="Absolute path of a PEM file of extra CAs to trust (a private CA), besides the system's."
    )
    warning_days: int = Field(21, ge=1, le=3650, description="Days left at or under which it is a warning.")
    critical_days: int = Field(7, ge=0, le=3650, description="Days left at or under which it is critical.")
    warning_lifetime_share: float = Field(
        1 / 3, gt=0, lt=1, description="Short-lived certificates: under this share of the lifetime left is a warning."
    )
    critical_lifetime_share: float = Field(
        0.1, gt=0, lt=1, description="Short-lived certificates: under this share of the lifetime left is critical."
    )

    @field_validator("host", "server_name")
    @classmethod
    def _plain_host(cls, value: str | None) -> str | None:
        if value is not None and not (_HOST_NAME.match(value) or _IPV6.match(value)):
            raise ValueError(f"{value[:60]!r} is not a host name or IP address (no scheme, path or port: use `port`)")
        return value

    @field_validator("ca_file")
    @classmethod
    def _absolute_ca_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError(f"{value}: must be an absolute path")
        return value

    @model_validator(mode="after")
    def _thresholds_in_order(self) -> TlsComponent:
        if self.critical_days >= self.warning_days:
            raise ValueError("critical_days must be below warning_days")
        if self.critical_lifetime_share >= self.warning_lifetime_share:
            raise ValueError("critical_lifetime_share must be below warning_lifetime_share")
        return self


STATUSPAGE_PATHS = {"statuspage": "/api/v2/summary.json", "incidentio": "/api/v1/summary", "rss": "/history.rss"}
"""Where each page format answers, below the page's URL (see services/probes/statuspage.py for the sources)."""


class StatuspageComponent(ComponentBase):
    """A provider's public status page (runbook 002): Render, Anthropic, Notion (Atlassian Statuspage), OpenAI
    (incident.io). Shown under "third parties"; part of the service's overall status only if ``affects``."""

    type: Literal["statuspage"]
    url: AnyHttpUrl = Field(description="The status page, e.g. https://status.render.com")
    format: Literal["statuspage", "incidentio", "rss"] = Field(
        "statuspage",
        description="statuspage: Atlassian Statuspage /api/v2/summary.json; incidentio: an incident.io page's "
        "/api/v1/summary; rss: the page's RSS or Atom feed (/history.rss).",
    )
    path: str | None = Field(
        None, max_length=200, description="Path of the answer below `url` (default by format: see `format`)."
    )
    components: list[Annotated[str, StringConstraints(min_length=1, max_length=100)]] = Field(
        default_factory=list,
        max_length=50,
        description="Names of the page's components that matter, e.g. [\"API\"]; empty: the page's overall status.",
    )
    affects: bool = Field(
        False, description="Count the provider's status in the service's own overall status (default: shown only)."
    )

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be a path starting with /")
        return value

    @field_validator("components")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        folded = [name.strip().casefold() for name in value]
        repeated = sorted({name for name, key in zip(value, folded, strict=True) if folded.count(key) > 1})
        if repeated:
            raise ValueError(f"{repeated[0]!r} is listed twice")
        return [name.strip() for name in value]

    @property
    def endpoint(self) -> str:
        """The URL polled: the page's URL and the format's path."""
        return str(self.url).rstrip("/") + (self.path or STATUSPAGE_PATHS[self.format])


class HostComponent(ComponentBase):
    """The machine the bot runs on (runbook 001's stack runs beside it): use of each declared filesystem,
    sizes of declared directories (uploads/, temp dirs) and memory, measured with Python's own calls."""

    type: Literal["host"]
    mounts: list[Path] = Field(
        default_factory=lambda: [Path("/")], max_length=20, description="Absolute paths, one on each filesystem."
    )
    directories: list[Path] = Field(
        default_factory=list, max_length=20, description="Absolute directories whose total size is shown."
    )
    memory: bool = Field(True, description="Show the host's memory use (from /proc/meminfo).")
    walk_seconds: float = Field(
        3.0, gt=0, le=60, description="Deadline of one directory walk; a walk cut off says `at least`."
    )
    walk_files: int = Field(1_000_000, ge=1, le=100_000_000, description="Entries one directory walk counts at most.")

    @field_validator("mounts", "directories")
    @classmethod
    def _absolute_paths(cls, value: list[Path]) -> list[Path]:
        for path in value:
            if not path.is_absolute():
                raise ValueError(f"{str(path)[:80]}: must be an absolute path")
        if len(set(value)) != len(value):
            raise ValueError("a path is listed twice")
        return value

    @model_validator(mode="after")
    def _walk_within_timeout(self) -> HostComponent:
        if self.walk_seconds >= self.timeout:
            raise ValueError(f"walk_seconds ({self.walk_seconds:g}) must be below timeout ({self.timeout:g})")
        return self


LOG_GLOB = re.compile(r"[*?\[]")


class LogfileComponent(ComponentBase):
    """Log files on the bot's host (runbook 004's `log/app.log`): one file or a glob, with its rotated
    files (`app.log.1`, `app.log.2.gz`, `app.log-20260101.gz`), read by `/ops logs` and `/ops traffic`."""

    type: Literal["logfile"]
    path: Path = Field(
        description="Absolute path of the live file, or a glob in its last part (`/srv/shop/log/*.log`); "
        "rotated files beside it are read too. Links are never followed."
    )
    format: Literal["json", "text", "nginx_combined"] = Field(
        "json", description="json (one object a line), text (level and time found by pattern) or nginx_combined."
    )
    rotated: bool = Field(True, description="Also read the rotated files (`<name>.1`, `<name>.2.gz`, `<name>-DATE`).")
    level_field: str = Field("level", min_length=1, max_length=64, description="json: the level's field.")
    time_field: str = Field("timestamp", min_length=1, max_length=64, description="json: the timestamp's field.")
    message_field: str = Field("message", min_length=1, max_length=64, description="json: the message's field.")
    level_pattern: str = Field(
        r"\b(?P<level>CRITICAL|FATAL|ERROR|ERR|WARNING|WARN|INFO|DEBUG)\b",
        max_length=300,
        description="text: a regular expression whose group `level` is the line's level.",
    )
    time_pattern: str = Field(
        r"^\[?(?P<time>\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?)",
        max_length=300,
        description="text: a regular expression whose group `time` is the line's timestamp.",
    )
    time_format: str = Field(
        "iso", min_length=1, max_length=64, description="text: `iso`, or a strptime pattern of the `time` group."
    )
    timezone: str = Field("UTC", description="Zone of timestamps written without an offset.")

    @field_validator("path")
    @classmethod
    def _declared_path(cls, value: Path) -> Path:
        if not value.is_absolute() or ".." in value.parts or value == Path(value.anchor):
            raise ValueError(f"{str(value)[:80]!r} must be an absolute file path without ..")
        if any(LOG_GLOB.search(part) for part in value.parts[:-1]):
            raise ValueError(f"{str(value)[:80]!r}: a glob may only be in the file name, not in a directory")
        return value

    @field_validator("level_pattern", "time_pattern")
    @classmethod
    def _pattern(cls, value: str, info: Any) -> str:
        group = "level" if info.field_name == "level_pattern" else "time"
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        if group not in compiled.groupindex:
            raise ValueError(f"needs a named group `(?P<{group}>…)`")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Asia/Seoul)") from None
        return value


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
    | CloudSqlComponent
    | TlsComponent
    | StatuspageComponent
    | HostComponent
    | LogfileComponent,
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


TableName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")]
ColumnName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")]


class PayloadId(_Model):
    """The chunk id is kept in a payload field of each point (the point id is something else)."""

    payload: FieldPath = Field(description="Payload field holding the chunk id, e.g. chunk_id.")


def _vector_id(value: Any) -> Any:
    if value == "same_id" or isinstance(value, PayloadId):
        return value
    if isinstance(value, dict) and set(value) == {"payload"}:
        return value
    raise ValueError("must be same_id (the point id is the chunk id) or {payload: <field>} (a payload field holds it)")


VectorIdMapping = Annotated[Literal["same_id"] | PayloadId, BeforeValidator(_vector_id)]


class ChunkVectors(_Model):
    """A chunk table and the Qdrant collection holding one vector per chunk: compared as id sets."""

    table: TableName = Field(description="The chunk table, optionally schema-qualified.")
    id_column: ColumnName = Field("id", description="Its id column (integer, bigint, uuid or text).")
    collection: CollectionName = Field(description="One of the qdrant component's collections.")
    vector_id: VectorIdMapping = Field(
        "same_id", description="same_id (the point id is the chunk id) or {payload: <field>}."
    )


class IntegritySettings(_Model):
    """What `/ops integrity` checks for a service (runbook 003's check-data)."""

    database: Name = Field(description="The postgres component holding the tables.")
    qdrant: Name | None = Field(None, description="The qdrant component whose collections are checked.")
    required_tables: list[TableName] = Field(default_factory=list, description="Tables that must exist.")
    chunks: list[ChunkVectors] = Field(default_factory=list, description="Chunk tables compared with collections.")
    jobs: Name | None = Field(
        None,
        description="A postgres component whose `jobs:` table is checked for stale processing jobs "
        "(default: the database component's, if it declares one).",
    )
    stale_after_minutes: int = Field(
        1440, gt=0, le=525_600, description="A job in processing for longer than this is stale (runbook 003: 1 day)."
    )
    page_size: int = Field(5000, ge=100, le=100_000, description="Ids read per page or Qdrant scroll request.")
    deadline_seconds: float = Field(600.0, gt=0, le=7200, description="The whole check must end within this.")


def _redis_pattern(value: str) -> str:
    """A Redis glob with a literal prefix: never one that matches the whole key space."""
    if not re.fullmatch(r"[A-Za-z0-9_{}:./|-][A-Za-z0-9_{}:./|*?\[\]^-]{0,199}", value):
        raise ValueError(
            f"{value[:40]!r} is not a key pattern: it starts with a literal character (letters, digits, "
            "_ { } : . / | -; never a wildcard, so it cannot match every key), then those or * ? [ ], "
            "at most 200 characters"
        )
    if value.count("[") != value.count("]") or re.search(r"\[[^\]]*\[|\][^\[]*\]", value.replace("[]", "")):
        raise ValueError(f"{value[:40]!r}: its [ ] brackets do not pair up")
    if value.startswith("opsbot:"):
        raise ValueError(f"{value[:40]!r}: keys under opsbot: are the bot's own (its locks)")
    return value


KeyPattern = Annotated[str, BeforeValidator(_redis_pattern)]
_DURATION = re.compile(r"^\s*(\d{1,6})\s*(s|m|min|h|d)\s*$")


def _duration(value: Any) -> Any:
    """``30m``, ``1h``, ``2d`` (or seconds as a number) as a timedelta."""
    if isinstance(value, str):
        match = _DURATION.match(value.lower())
        if match is None:
            raise ValueError(f"{value[:20]!r} is not a duration: a number and a unit, like 30m, 1h or 2d")
        unit = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}[match.group(2)]
        return timedelta(seconds=int(match.group(1)) * unit)
    return value


class ResetFiles(_Model):
    """A temp directory a reset empties of the files matching ``match`` (through services/files.py)."""

    path: Path = Field(description="An absolute directory below /; links are never followed.")
    match: str = Field("*", min_length=1, max_length=100, pattern=r"^[^/\\]+$", description="File-name pattern.")
    recursive: bool = Field(True, description="Also the files in the directories below (the directories stay).")

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute() or ".." in value.parts or value == Path(value.anchor):
            raise ValueError(f"{str(value)[:80]!r} must be an absolute directory below / (without ..)")
        return value


class ResetTargets(_Model):
    """What one kind of reset empties, by component."""

    tables: dict[Name, list[TableName]] = Field(
        default_factory=dict,
        description="Tables per postgres component, emptied with DELETE in this order (referencing tables first), "
        "in one transaction per database.",
    )
    jobs: list[Name] = Field(
        default_factory=list,
        description="Postgres components whose `jobs:` table (the job queue) is emptied, before their other tables.",
    )
    collections: dict[Name, list[CollectionName]] = Field(
        default_factory=dict,
        description="Qdrant collections per qdrant component, emptied point by point (config and indexes kept).",
    )
    redis: dict[Name, list[KeyPattern]] = Field(
        default_factory=dict, description="Key patterns per redis component, removed with SCAN + UNLINK."
    )
    files: list[ResetFiles] = Field(default_factory=list, description="Temp directories emptied of their files.")

    @property
    def empty(self) -> bool:
        return not (self.tables or self.jobs or self.collections or self.redis or self.files)


class ResetSettings(_Model):
    """What `/ops reset soft|hard` empties (runbook 003): soft, and for hard also `hard:`."""

    soft: ResetTargets = Field(default_factory=ResetTargets, description="What a soft reset empties.")
    hard: ResetTargets = Field(
        default_factory=ResetTargets, description="What a hard reset empties besides the soft targets (after them)."
    )
    keep: list[Annotated[str, StringConstraints(min_length=1, max_length=100)]] = Field(
        default_factory=list, description="What a soft reset keeps, e.g. [channels]: shown in its plan."
    )
    backup_max_age: Annotated[timedelta, BeforeValidator(_duration)] = Field(
        timedelta(hours=1),
        description="A hard reset needs a good, verified backup of each backed-up component younger than this.",
    )
    require_snapshot: bool = Field(
        False, description="Stop before deleting anything when Qdrant cannot snapshot a collection (default: go on, "
        "saying the vectors can only be rebuilt by re-indexing).",
    )  # fmt: skip
    count_seconds: float = Field(5.0, gt=0, le=120, description="Longest exact count(*) of one table in a plan.")

    @field_validator("backup_max_age")
    @classmethod
    def _sensible_age(cls, value: timedelta) -> timedelta:
        if not timedelta(minutes=1) <= value <= timedelta(days=30):
            raise ValueError("must be between 1 minute and 30 days")
        return value


# Cost allocation tags: AWS allows keys of up to 128 characters and values of up to 256.
CostTagKey = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")]
CostTagValue = Annotated[str, StringConstraints(max_length=256, pattern=r"^[^\x00-\x1f]*$")]
AwsAccountId = Annotated[str, StringConstraints(pattern=r"^[0-9]{12}$")]


def _tag_values(value: Any) -> Any:
    """``{Project: work-logging}`` is ``{Project: [work-logging]}``."""
    if isinstance(value, dict):
        return {k: [v] if isinstance(v, str) else v for k, v in value.items()}
    return value


class CostSettings(_Model):
    """What `/ops cost` reads from Cost Explorer for a service (runbook 002): its costs are those carrying the
    declared cost allocation tags and/or booked to the declared linked accounts."""

    tags: Annotated[dict[CostTagKey, list[CostTagValue]], BeforeValidator(_tag_values)] = Field(
        default_factory=dict,
        description="Cost allocation tags (activated in Billing) and their values, e.g. {Project: work-logging}.",
    )
    accounts: list[AwsAccountId] = Field(default_factory=list, description="Linked account ids (12 digits).")
    metric: Literal["UnblendedCost", "BlendedCost"] = Field(
        "UnblendedCost", description="The figure shown per AWS service (both totals are shown)."
    )
    top: int = Field(8, ge=1, le=20, description="AWS services listed by name; the rest are summed.")
    anomaly_floor: float = Field(
        1.0, ge=0, description="A day below this amount (USD) is never an anomaly, whatever its ratio."
    )
    timeout: float = Field(20.0, gt=0, le=120, description="Seconds one Cost Explorer read may take.")
    endpoint_url: AnyHttpUrl | None = Field(None, description="A Cost Explorer-compatible endpoint (tests: moto).")

    @model_validator(mode="after")
    def _scoped(self) -> CostSettings:
        if not self.tags and not self.accounts:
            raise ValueError("declare `tags` and/or `accounts`: the account's whole bill is not one service's cost")
        for key, values in self.tags.items():
            if not values:
                raise ValueError(f"tag {key!r} needs at least one value")
        return self


class Service(_Model):
    description: str = ""
    runbook: str | None = Field(None, description="Which runbook this service follows.")
    components: dict[Name, Component] = Field(min_length=1)
    backup: ServiceBackup = Field(default_factory=ServiceBackup)
    cleanup: CleanupSettings = Field(default_factory=CleanupSettings, description="Files `/ops cleanup` deletes.")
    integrity: IntegritySettings | None = Field(None, description="What `/ops integrity` compares (runbook 003).")
    reset: ResetSettings | None = Field(None, description="What `/ops reset soft|hard` empties (runbook 003).")
    cost: CostSettings | None = Field(None, description="What `/ops cost` reads from Cost Explorer (runbook 002).")


class Roles(_Model):
    """Slack user IDs (U…/W…) or user-group IDs (S…) per role; "*" means everyone."""

    viewer: list[SlackId] = Field(default_factory=list)
    operator: list[SlackId] = Field(default_factory=list)
    approver: list[SlackId] = Field(default_factory=list)
    admin: list[SlackId] = Field(default_factory=list)
    read: dict[Name, list[SlackId]] = Field(
        default_factory=dict,
        description="Per-service read permission for sensitive reads (logs; users and usage): who may read each "
        "listed service, besides admins. A service not listed: operators and up may read it, viewers may not.",
    )

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


class PreApproval(_Model):
    """A command one schedule may run without a click, below a ceiling (DESIGN: pre-approved schedules).

    Above the ceiling the plan is posted for approval like any other; the run is audited as approved
    by ``schedule:<name>``.
    """

    command: str = Field(
        min_length=1, max_length=40, description='The command it may run, by its verb: "cleanup", "queue clean".'
    )
    max_items: int = Field(
        ge=1, le=100_000_000, description="Most items (documents, files, jobs, points) a run may delete unasked."
    )
    max_share_pct: float | None = Field(
        None,
        gt=0,
        le=100,
        description="And at most this share of what it deletes from (a collection); a plan that cannot say "
        "what share it is, is posted for approval.",
    )

    @field_validator("command")
    @classmethod
    def _one_space(cls, value: str) -> str:
        return " ".join(value.split())


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
        default_factory=dict,
        validate_default=True,
        description='Policy per command, by its verb, e.g. "jobs reset-stuck"; `reset soft` and `reset hard` are '
        "critical (two approvers) unless their rule sets `critical` or `approvers`.",
    )
    schedules: dict[Name, PreApproval] = Field(
        default_factory=dict,
        description="Pre-approved schedules, by schedule name: the one command each may run without a click, "
        "below its ceiling.",
    )

    @field_validator("commands")
    @classmethod
    def _critical_by_default(cls, value: dict[str, ApprovalRule]) -> dict[str, ApprovalRule]:
        merged = dict(value)
        for verb in CRITICAL_BY_DEFAULT:
            rule = merged.get(verb)
            if rule is None:
                merged[verb] = ApprovalRule(critical=True)
            elif not {"critical", "approvers"} & rule.model_fields_set:
                merged[verb] = rule.model_copy(update={"critical": True})
        return merged


CRITICAL_BY_DEFAULT = ("reset soft", "reset hard")
"""Commands that need two approvers unless the inventory's approvals.commands says otherwise."""


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

    @model_validator(mode="after")
    def _preapproved_schedules_exist(self) -> Inventory:
        names = {s.name for s in self.schedules}
        unknown = sorted(set(self.approvals.schedules) - names)
        if unknown:
            raise ValueError(
                f"approvals.schedules names no schedule of this inventory: {', '.join(unknown)} "
                f"(the schedules are: {', '.join(sorted(names)) or 'none'})"
            )
        return self

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
        "tls",
        "statuspage",
        "host",
    }
)


def _loc(loc: tuple[int | str, ...]) -> str:
    """Dotted path of a validation error, without the union tag pydantic inserts after a component or a rule."""
    out: list[str] = []
    for i, part in enumerate(map(str, loc)):
        if part in _TAGS and i >= 2 and loc[i - 2] == "components":  # the tag right after the component's name
            continue
        if i >= 2 and loc[i - 2] == "alerts" and isinstance(loc[i - 1], int):  # the rule's `kind`
            continue
        out.append(part)
    return ".".join(out)


def _has_jobs_table(spec: Component | None) -> bool:
    return isinstance(spec, PostgresComponent) and spec.jobs is not None


def _reset_problems(name: str, service: Service) -> list[str]:
    """A reset section must name components of its own service, of the right types, each target once."""
    spec = service.reset
    if spec is None:
        return []
    where = f"services.{name}.reset"
    components = service.components
    known = ", ".join(sorted(components))
    problems: list[str] = []
    if spec.soft.empty and spec.hard.empty:
        problems.append(f"{where}: declares nothing to empty (`soft:` and `hard:` are both empty)")

    def check(path: str, component: str, kind: type[ComponentBase], label: str) -> Component | None:
        found = components.get(component)
        if found is None:
            problems.append(f"{path}: {component!r} is not a component of {name} (components: {known})")
            return None
        if not isinstance(found, kind):
            problems.append(f"{path}: {component!r} is a {found.type} component, not {label}")
            return None
        return found

    tables: dict[str, list[str]] = {}
    patterns: dict[str, list[str]] = {}
    collections: dict[str, list[str]] = {}
    directories: list[str] = []
    for mode, targets in (("soft", spec.soft), ("hard", spec.hard)):
        for component in targets.jobs:
            found = check(f"{where}.{mode}.jobs", component, PostgresComponent, "postgres")
            if isinstance(found, PostgresComponent):
                if found.jobs is None:
                    problems.append(f"{where}.{mode}.jobs: the postgres component {component!r} has no `jobs:` table")
                else:
                    tables.setdefault(component, []).append(found.jobs.table)
        for component, names in targets.tables.items():
            if check(f"{where}.{mode}.tables.{component}", component, PostgresComponent, "postgres"):
                tables.setdefault(component, []).extend(names)
        for component, names in targets.collections.items():
            found = check(f"{where}.{mode}.collections.{component}", component, QdrantComponent, "qdrant")
            if isinstance(found, QdrantComponent):
                problems += [
                    f"{where}.{mode}.collections.{component}: {c!r} is not one of the collections of {component!r}: "
                    f"{', '.join(found.collections)}"
                    for c in names
                    if c not in found.collections
                ]
                collections.setdefault(component, []).extend(names)
        for component, names in targets.redis.items():
            if check(f"{where}.{mode}.redis.{component}", component, RedisComponent, "redis"):
                patterns.setdefault(component, []).extend(names)
        directories += [f"{d.path}|{d.match}" for d in targets.files]
    for kind, listed in (("table", tables), ("collection", collections), ("key pattern", patterns)):
        for component, names in listed.items():
            problems += [
                f"{where}: the {kind} {n!r} of {component!r} is listed twice (soft, hard and jobs together)"
                for n in sorted({n for n in names if names.count(n) > 1})
            ]
    problems += [
        f"{where}.files: {d.split('|')[0]!r} with match {d.split('|')[1]!r} is listed twice"
        for d in sorted({d for d in directories if directories.count(d) > 1})
    ]
    soft_tables = {t.split(".")[-1] for names in spec.soft.tables.values() for t in names}
    problems += [
        f"{where}.keep: {kept!r} is kept, but `soft.tables` empties it" for kept in spec.keep if kept in soft_tables
    ]
    return problems


def _integrity_problems(name: str, service: Service) -> list[str]:
    """An integrity section must name components of its own service, of the right types."""
    spec = service.integrity
    if spec is None:
        return []
    where = f"services.{name}.integrity"
    components = service.components
    known = ", ".join(sorted(components))

    def wrong(field: str, component: str | None, kind: type[ComponentBase], label: str) -> str | None:
        if component is None:
            return None
        found = components.get(component)
        if found is None:
            return f"{where}.{field}: {component!r} is not a component of {name} (components: {known})"
        if not isinstance(found, kind):
            return f"{where}.{field}: {component!r} is a {found.type} component, not {label}"
        return None

    problems = [
        p
        for p in (
            wrong("database", spec.database, PostgresComponent, "postgres"),
            wrong("qdrant", spec.qdrant, QdrantComponent, "qdrant"),
            wrong("jobs", spec.jobs, PostgresComponent, "postgres"),
        )
        if p is not None
    ]
    jobs = components.get(spec.jobs) if spec.jobs is not None else None
    if isinstance(jobs, PostgresComponent) and jobs.jobs is None:
        problems.append(f"{where}.jobs: the postgres component {spec.jobs!r} declares no `jobs:` table")
    qdrant = components.get(spec.qdrant) if spec.qdrant is not None else None
    for index, chunk in enumerate(spec.chunks):
        if spec.qdrant is None:
            problems.append(f"{where}.chunks.{index}: comparing with a collection needs `qdrant:` (a qdrant component)")
        elif isinstance(qdrant, QdrantComponent) and chunk.collection not in qdrant.collections:
            problems.append(
                f"{where}.chunks.{index}.collection: {chunk.collection!r} is not one of the collections of "
                f"{spec.qdrant!r}: {', '.join(qdrant.collections)}"
            )
    pairs = [(c.table, c.collection) for c in spec.chunks]
    problems += [
        f"{where}.chunks: {table} against {collection} is declared twice"
        for table, collection in sorted(set(pairs))
        if pairs.count((table, collection)) > 1
    ]
    return problems


FIGURE_RULE_TYPES: Mapping[str, frozenset[str]] = {
    "cpu": frozenset({"compose", "cloudrun", "cloudsql"}),
    "memory": frozenset({"host", "compose", "cloudrun", "cloudsql"}),
    "disk": frozenset({"host", "compose", "cloudsql"}),
}
"""Component types whose figure source measures what a cpu, memory or disk rule reads."""


def _alert_problems(service: str, component: str, spec: Component) -> list[str]:
    """Rules that cannot work where they sit: queue rules need a redis with `queues:`; one name per rule."""
    where = f"services.{service}.components.{component}.alerts"
    problems: list[str] = []
    names: set[str] = set()
    for index, rule in enumerate(spec.alerts):
        if rule.alert_name in names:
            problems.append(
                f"{where}.{index}.name: an earlier rule of this component is already called {rule.alert_name!r}; "
                "give each rule its own `name`"
            )
        names.add(rule.alert_name)
        if isinstance(rule, CpuRule | MemoryRule | DiskRule):
            if spec.type not in FIGURE_RULE_TYPES[rule.kind]:
                problems.append(
                    f"{where}.{index}: a {rule.kind} rule needs a component whose {rule.kind} figures opsbot reads "
                    f"({', '.join(sorted(FIGURE_RULE_TYPES[rule.kind]))}), not a {spec.type} component"
                )
            elif isinstance(spec, ComposeComponent) and rule.kind == "disk" and not spec.disks:
                problems.append(f"{where}.{index}: a disk rule on a compose component needs `disks:` to read")
            continue
        if isinstance(rule, ProviderIncidentRule) and not isinstance(spec, StatuspageComponent):
            problems.append(
                f"{where}.{index}: a provider_incident rule reads a provider's status page, so it belongs on a "
                f"statuspage component, not on a {spec.type} component"
            )
        if not isinstance(rule, QueueFailureRateRule | QueueBacklogRule):
            continue
        if not isinstance(spec, RedisComponent):
            problems.append(
                f"{where}.{index}: a {rule.kind} rule reads Bull/BullMQ queues, so it belongs on a redis "
                f"component with `queues:`, not on a {spec.type} component"
            )
        elif spec.queues is None:
            problems.append(
                f"{where}.{index}: a {rule.kind} rule needs `queues:` on this redis component "
                "(the library and prefix of its queues)"
            )
        elif rule.queue is not None and spec.queues.names and rule.queue not in spec.queues.names:
            problems.append(
                f"{where}.{index}.queue: {rule.queue!r} is not one of the declared queues: "
                f"{', '.join(spec.queues.names)}"
            )
    return problems


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
    for name, service in inventory.services.items():
        problems += _integrity_problems(name, service)
        problems += _reset_problems(name, service)
    for s, c, spec in inventory.components():
        problems += _alert_problems(s, c, spec)
    seen: set[str] = set()
    for index, schedule in enumerate(inventory.schedules):
        if schedule.name in seen:
            problems.append(f"schedules.{index}.name: {schedule.name!r} is used by an earlier schedule")
        seen.add(schedule.name)
    problems += [
        f"services.{s}.components.{c}.users.create_admin_job: {s} has no cloudrun component to run it on"
        for s, c, spec in inventory.components()
        if isinstance(spec, PostgresComponent)
        and spec.users is not None
        and spec.users.create_admin_job is not None
        and not any(isinstance(other, CloudRunComponent) for other in inventory.services[s].components.values())
    ]
    problems += [
        f"roles.read.{name}: there is no service called {name!r}"
        for name in inventory.roles.read
        if name not in inventory.services
    ]
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
    """SecretStr values, also inside dicts and lists (HTTP headers) and nested models (admin_api credentials)."""
    if isinstance(value, SecretStr):
        yield value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _secret_fields(getattr(value, name))
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
