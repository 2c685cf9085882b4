"""Which component types can be backed up, and the source or destination object for each."""

from __future__ import annotations

from pathlib import Path

from services.backup.base import Destination, Source
from services.inventory import (
    BackupSettings,
    Component,
    DestinationSpec,
    DirectoryDestination,
    FilesComponent,
    MongoComponent,
    PostgresComponent,
    SqliteComponent,
)
from services.redaction import Redactor

# Component types whose data opsbot dumps itself (a stream through a destination). Cloud SQL
# instances are backed up by Google (services/backup/cloudsql.py) and handled apart.
STREAMED_TYPES = frozenset({"postgres", "mongodb", "sqlite", "files"})
MANAGED_TYPES = frozenset({"cloudsql"})
BACKUP_TYPES = STREAMED_TYPES | MANAGED_TYPES


def source_for(spec: Component, settings: BackupSettings, redactor: Redactor) -> Source:
    """A fresh source for one dump, verification or restore of ``spec`` (modules load on first use)."""
    if isinstance(spec, PostgresComponent):
        from services.backup.postgres import PostgresSource

        pg_bin = str(settings.pg_bin) if settings.pg_bin else None
        return PostgresSource(
            spec.dsn.get_secret_value(),
            timeout=spec.timeout,
            redactor=redactor,
            pg_bin=pg_bin,
            stall_timeout=settings.stall_timeout,
        )
    if isinstance(spec, MongoComponent):
        from services.backup.mongodb import MongoSource

        return MongoSource(spec.uri.get_secret_value(), spec.database, timeout=spec.timeout, redactor=redactor)
    if isinstance(spec, SqliteComponent):
        from services.backup.sqlite import SqliteSource

        return SqliteSource(spec.path, timeout=spec.timeout)
    if isinstance(spec, FilesComponent):
        from services.backup.files import FilesSource

        return FilesSource(spec.paths, timeout=spec.timeout)
    raise TypeError(f"{spec.type} components are not backed up by a stream")


def destination_for(name: str, spec: DestinationSpec, base_dir: Path) -> Destination:
    """The destination called ``name``; relative directory paths are taken from ``base_dir``."""
    if isinstance(spec, DirectoryDestination):
        from services.backup.directory import LocalDirectory

        root = spec.path if spec.path.is_absolute() else base_dir / spec.path
        return LocalDirectory(name, root)
    from services.backup.s3 import S3Destination

    return S3Destination(
        name,
        spec.bucket,
        prefix=spec.prefix,
        region=spec.region,
        endpoint_url=str(spec.endpoint_url).rstrip("/") if spec.endpoint_url else None,
        part_size=spec.part_size_mb << 20,
        timeout=spec.timeout,
    )
