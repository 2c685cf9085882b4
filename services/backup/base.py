"""What every backup source and destination provides, and the error they raise.

A *source* turns one component (a PostgreSQL database, a MongoDB database, an SQLite file, some
files) into a stream of bytes — the artifact — and back. A *destination* stores a compressed
artifact under a key, visible only once complete, with its manifest written last. Neither knows
about Slack, the catalog or approvals; services/backup/runner.py ties them together.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from services.errors import CommandError

CHUNK = 1 << 20  # bytes per read/write: big enough to be cheap, small enough to keep memory flat
QUEUE_DEPTH = 4  # chunks buffered between two stages of a pipeline (memory bound: CHUNK x depth)


class BackupError(CommandError):
    """A backup, verification or restore failed; the message is one plain sentence, no secrets."""

    def __init__(self, message: str) -> None:
        super().__init__(message, outcome="error")


@dataclass
class DumpInfo:
    """What a source learned while dumping; it goes into the manifest.

    ``tools``: names and versions of what made the artifact ({"pg_dump": "15.19"}).
    ``stats``: content counts a verification can check again, e.g. {"collections": {"users": 120}},
    {"files": 42, "bytes": 1234}, {"pages": 10}. Must be JSON-serialisable.
    """

    tools: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


class Source(Protocol):
    """One component that can be dumped to a byte stream and restored from one.

    A source object is made for one operation and not shared, so it may keep state between
    ``dump()`` and ``info``.
    """

    kind: str  # "postgres", "mongodb", "sqlite", "files"
    extension: str  # artifact file extension before compression: "dump", "tar", "sqlite"

    def describe(self) -> str:
        """Where the data lives, for people and the manifest, without credentials
        (e.g. "PostgreSQL database shop on 10.0.0.3:5432")."""
        ...

    def dump(self) -> AsyncIterator[bytes]:
        """The artifact as chunks (an async generator). Consistent (one snapshot), streamed (never
        whole in memory). If the consumer stops early (aclose / cancellation), every child process
        is killed and temporary files removed. Raises BackupError on failure."""
        ...

    @property
    def info(self) -> DumpInfo:
        """Available once ``dump()`` has been read to the end."""
        ...

    async def restore(self, chunks: AsyncIterator[bytes]) -> str:
        """Overwrite the component's data with an artifact made by ``dump()``; return a one-line
        summary ("restored 12 tables"). Raises BackupError; never leaves a half-written target
        where the engine allows avoiding it (PostgreSQL: one transaction)."""
        ...

    async def check(self, chunks: AsyncIterator[bytes], stats: Mapping[str, Any]) -> str:
        """Check an artifact's content without touching the component: it parses, and its counts
        match ``stats`` (the manifest's). Return a one-line summary; raise BackupError if bad."""
        ...


@dataclass(frozen=True)
class Stored:
    """An object a destination has written completely."""

    key: str
    size: int  # bytes stored (compressed)
    sha256: str  # hex digest of the stored bytes


@dataclass(frozen=True)
class Partial:
    """An unfinished object a writer left behind: a ``….partial-*`` file or an S3 multipart upload."""

    key: str  # the key of the object it was to become (a manifest's partial: the object's key)
    ref: str  # what removes it: the file's path relative to the root, or the upload id
    location: str  # for people: the file's path, or "multipart upload … of s3://…"
    modified: datetime  # the last time its writer added to it (UTC)


class Destination(Protocol):
    """Where artifacts are kept: a local directory or an S3 bucket."""

    name: str  # the inventory's name for it, e.g. "local"
    kind: str  # "directory" | "s3"

    def location(self, key: str) -> str:
        """A human-readable address of an object: a path or s3://bucket/key."""
        ...

    async def write(self, key: str, chunks: AsyncIterator[bytes]) -> Stored:
        """Store the chunks under ``key``, hashing as they pass. The object is invisible under
        ``key`` until every byte is written (temporary name + rename; S3: multipart upload completed
        only at the end). On any error or cancellation the partial object is removed (or the
        multipart upload aborted) and the exception propagates."""
        ...

    async def put_manifest(self, key: str, data: bytes) -> None:
        """Write ``<key>.manifest.json`` atomically. Called last: an object without a manifest is
        not a good backup."""
        ...

    def read(self, key: str) -> AsyncIterator[bytes]:
        """The stored bytes of ``key`` as chunks; BackupError if it does not exist."""
        ...

    async def read_manifest(self, key: str) -> bytes | None:
        """The manifest written for ``key``, or None."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object and its manifest (missing ones are not an error)."""
        ...

    async def keys(self, prefix: str) -> list[str]:
        """Keys of complete objects under ``prefix`` (manifests and partial uploads excluded)."""
        ...

    async def partials(self, prefix: str) -> list[Partial]:
        """Unfinished objects under ``prefix``: what writers are writing or a killed one left."""
        ...

    async def remove_partial(self, partial: Partial) -> None:
        """Delete a partial file or abort a multipart upload (gone already is not an error)."""
        ...

    async def close(self) -> None:
        """Release clients and thread pools."""
        ...


def manifest_key(key: str) -> str:
    return f"{key}.manifest.json"
