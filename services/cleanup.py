"""Old MongoDB documents of runbook 001 (failed image-generation jobs older than 30 days), deleted
exactly as planned.

A plan lists the ``_id`` of every document it will delete (the oldest ``limit`` of those a rule
selects, so the approval row stays bounded; the rest wait for the next request). The run deletes
``{rule filter with the plan's cutoff} AND _id in (planned ids)``, in batches: a document that
became eligible after the plan is not in the list, and one that stopped matching (retried, its
status changed) is not deleted. Ids travel as canonical extended JSON, so every BSON type of ``_id``
comes back as itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import json_util
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    PyMongoError,
    ServerSelectionTimeoutError,
)

from services.errors import CommandError
from services.failures import mongo_problem
from services.inventory import DocumentCleanupRule, MongoComponent, secrets_in
from services.redaction import Redactor

DELETE_BATCH = 500  # ids per deleteMany
_JSON = json_util.JSONOptions(json_mode=json_util.JSONMode.CANONICAL, tz_aware=True, tzinfo=UTC)


def encode_id(value: Any) -> str:
    """An ``_id`` as compact canonical extended JSON (its BSON type kept)."""
    return json_util.dumps(value, json_options=_JSON, separators=(",", ":"))


def decode_id(text: str) -> Any:
    return json_util.loads(text, json_options=_JSON)


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 of a plan's id list: the fingerprint of a list that does not fit in the facts."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def cutoff_of(rule: DocumentCleanupRule, now: datetime) -> datetime:
    """The instant before which a document is old enough, in whole milliseconds (BSON dates)."""
    cutoff = now.astimezone(UTC) - timedelta(days=rule.older_than_days)
    return cutoff.replace(microsecond=cutoff.microsecond // 1000 * 1000)


def rule_filter(rule: DocumentCleanupRule, cutoff: datetime) -> dict[str, Any]:
    """The rule as a MongoDB filter: each ``match`` field equal (or one of a list), the time field older."""
    query: dict[str, Any] = {key: {"$in": list(value)} if isinstance(value, list) else value
                             for key, value in rule.match.items()}  # fmt: skip
    query[rule.time_field] = {"$lt": cutoff}
    return query


def describe_rule(rule: DocumentCleanupRule) -> str:
    """``imagegenerationjobs where status = failed and createdAt older than 30 days``."""
    parts = [
        f"{key} in ({', '.join(map(str, value))})" if isinstance(value, list) else f"{key} = {value}"
        for key, value in rule.match.items()
    ]
    parts.append(f"{rule.time_field} older than {rule.older_than_days} days")
    return f"{rule.collection} where {' and '.join(parts)}"


@dataclass(frozen=True)
class DocumentScan:
    """What a rule selects now: the oldest ``limit`` ids and how many there are in all."""

    ids: tuple[str, ...]
    total: int
    cutoff: datetime
    oldest: datetime | None
    newest: datetime | None  # of the listed ids


class DeletionInterrupted(CommandError):
    """MongoDB failed part way through a deletion; says exactly what is known to be done."""

    def __init__(self, message: str, *, deleted: int, uncertain: int, untouched: int) -> None:
        super().__init__(message)
        self.deleted = deleted
        self.uncertain = uncertain
        self.untouched = untouched


class MongoAccess:
    """One MongoDB component: a short-lived client per call and plain sentences for its errors."""

    def __init__(self, spec: MongoComponent, redactor: Redactor | None = None) -> None:
        self.spec = spec
        self._uri = spec.uri.get_secret_value()
        self._scrubber = Redactor(secrets_in(self._uri))
        self._redactor = redactor

    @property
    def database_name(self) -> str:
        return self.spec.database

    def problem(self, exc: BaseException) -> str:
        """Why MongoDB failed, as a phrase without the URI's password."""
        return mongo_problem(exc, self.spec.timeout, self._scrubber, self._redactor)

    @asynccontextmanager
    async def database(self, doing: str) -> AsyncIterator[AsyncDatabase[dict[str, Any]]]:
        """The database; a driver error inside becomes CommandError("<doing>: <why>")."""
        milliseconds = max(1, int(self.spec.timeout * 1000))
        try:
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
                self._uri,
                serverSelectionTimeoutMS=milliseconds,
                connectTimeoutMS=milliseconds,
                socketTimeoutMS=milliseconds,
                appname="opsbot",
                tz_aware=True,
            )
        except (PyMongoError, ValueError, TypeError) as exc:
            raise CommandError(f"{doing}: {self.problem(exc)}") from None
        problem: str | None = None
        try:
            yield client[self.spec.database]
        except PyMongoError as exc:
            problem = self.problem(exc)
        finally:
            await client.close()
            del client  # an error's traceback must not keep the driver's state alive (PYTHON-3923)
        if problem is not None:
            raise CommandError(f"{doing}: {problem}")

    async def collection_names(self) -> list[str]:
        async with self.database(f"Cannot list the collections of MongoDB database {self.spec.database}") as db:
            return sorted(await db.list_collection_names())


def _utc(value: Any) -> datetime | None:
    return value.astimezone(UTC) if isinstance(value, datetime) else None


class DocumentCleaner:
    """Finds and deletes the documents of one component's cleanup rules."""

    def __init__(self, access: MongoAccess) -> None:
        self.access = access

    async def scan(self, rule: DocumentCleanupRule, *, now: datetime, limit: int) -> DocumentScan:
        """The oldest ``limit`` documents the rule selects (by its time field, then ``_id``) and the total.

        CommandError if the collection does not exist or MongoDB fails.
        """
        cutoff = cutoff_of(rule, now)
        query = rule_filter(rule, cutoff)
        database = self.access.database_name
        async with self.access.database(f"Cannot read `{rule.collection}` in MongoDB database {database}") as db:
            if rule.collection not in await db.list_collection_names():
                raise CommandError(f"MongoDB database {database} has no collection `{rule.collection}`")
            collection = db[rule.collection]
            total = await collection.count_documents(query)
            cursor = collection.find(query, {"_id": 1, rule.time_field: 1})
            found = await cursor.sort([(rule.time_field, 1), ("_id", 1)]).limit(limit).to_list()
        times = [t for t in (_utc(d.get(rule.time_field)) for d in found) if t is not None]
        return DocumentScan(
            ids=tuple(encode_id(d["_id"]) for d in found),
            total=max(total, len(found)),
            cutoff=cutoff,
            oldest=min(times, default=None),
            newest=max(times, default=None),
        )

    async def delete(
        self,
        rule: DocumentCleanupRule,
        ids: Sequence[str],
        cutoff: datetime,
        *,
        progress: Callable[[int], Awaitable[None]] | None = None,
        batch: int = DELETE_BATCH,
    ) -> int:
        """Delete these documents if they still match the rule at the plan's cutoff; how many were deleted.

        Batches of ``batch`` ids, one deleteMany each (not retried: a multi-document delete is not a
        retryable write). On a failure, DeletionInterrupted says what was deleted for certain, what
        may or may not have been (the batch in flight), and what was not touched.
        """
        values = [decode_id(i) for i in ids]
        base = rule_filter(rule, cutoff)
        deleted = done = in_flight = 0
        where = f"`{rule.collection}` in MongoDB database {self.access.database_name}"
        try:
            async with self.access.database(f"Cannot remove documents of {where}") as db:
                collection = db[rule.collection]
                for start in range(0, len(values), batch):
                    chunk = values[start : start + batch]
                    in_flight = len(chunk)
                    try:
                        result = await collection.delete_many({**base, "_id": {"$in": chunk}})
                    except ServerSelectionTimeoutError:
                        in_flight = 0  # no server was found: the delete was never sent
                        raise
                    deleted += result.deleted_count
                    done, in_flight = start + len(chunk), 0
                    if progress is not None:
                        await progress(deleted)
        except CommandError as exc:
            untouched = len(values) - done - in_flight
            text = (
                f"deleting from {where} failed ({exc.message.partition(': ')[2] or exc.message}): "
                f"{deleted:,} of {len(values):,} planned document(s) deleted"
            )
            if in_flight:
                text += f"; a batch of {in_flight:,} was in flight, so those may or may not be deleted"
            if untouched:
                text += f"; the other {untouched:,} were not touched"
            raise DeletionInterrupted(text, deleted=deleted, uncertain=in_flight, untouched=untouched) from None
        return deleted
