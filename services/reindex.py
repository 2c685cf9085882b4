"""Rebuild a MongoDB collection's indexes by dropping and re-creating each from its own spec.

MongoDB's ``reIndex`` command is deprecated and works on a standalone server only. Instead each
index but ``_id_`` (which cannot be dropped) is dropped and created again from the spec listIndexes
gave, read as raw BSON so that nothing in it is decoded and re-encoded differently: key order and
directions, a partial filter's types, a collation, text weights, a TTL all go back byte for byte
(only the legacy ``ns`` field, which createIndexes refuses, is left out, as mongorestore does).
Between the drop and the create of one index the collection is without it; a create that fails
is reported with the spec to re-create by hand.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bson import encode, json_util
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.raw_bson import RawBSONDocument
from bson.son import SON
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from services.cleanup import MongoAccess
from services.errors import CommandError

_RAW: CodecOptions[RawBSONDocument] = CodecOptions(
    document_class=RawBSONDocument, datetime_conversion=DatetimeConversion.DATETIME_AUTO
)
_SHOWN = json_util.JSONOptions(json_mode=json_util.JSONMode.RELAXED)


@dataclass(frozen=True)
class IndexSpec:
    """One index as listIndexes returned it, undecoded."""

    raw: RawBSONDocument

    @property
    def name(self) -> str:
        return str(self.raw["name"])

    @property
    def rebuildable(self) -> bool:
        return self.name != "_id_"

    def digest(self) -> str:
        return hashlib.sha256(self.raw.raw).hexdigest()[:16]

    def describe(self) -> str:
        """``createdAt_-1_status_1 {"createdAt": -1, "status": 1} unique``, for people."""
        key = json_util.dumps(self.raw.get("key"), json_options=_SHOWN)
        options = {k: v for k, v in self.raw.items() if k not in ("v", "key", "name", "ns")}
        shown = " ".join(
            k if v is True else f"{k}={json_util.dumps(v, json_options=_SHOWN)}" for k, v in options.items()
        )
        return f"{self.name} {key}" + (f" {shown}" if shown else "")

    def create_spec(self) -> RawBSONDocument | SON[str, Any]:
        """The spec for createIndexes: as listed, without the legacy ``ns``."""
        if "ns" not in self.raw:
            return self.raw
        return SON((key, value) for key, value in self.raw.items() if key != "ns")


def index_facts(specs: list[IndexSpec]) -> dict[str, str]:
    """A plan's facts: each index by name with the hash of its spec's bytes."""
    return {f"index {spec.name}": spec.digest() for spec in specs}


async def _list(database: AsyncDatabase[dict[str, Any]], collection: str) -> list[IndexSpec]:
    raw = database.with_options(codec_options=_RAW)
    command = SON([("listIndexes", collection), ("cursor", {})])
    cursor = await raw.cursor_command(command, codec_options=_RAW)
    return [IndexSpec(document) for document in await cursor.to_list()]


@dataclass(frozen=True)
class Rebuilt:
    """The indexes before and after a rebuild."""

    before: list[IndexSpec]
    after: list[IndexSpec]

    def differences(self) -> list[str]:
        """Indexes whose spec is not the same bytes after as before, by name."""
        after = {spec.name: spec for spec in self.after}
        lines = []
        for spec in self.before:
            now = after.get(spec.name)
            if now is None:
                lines.append(f"{spec.name}: missing after the rebuild")
            elif encode(now.create_spec()) != encode(spec.create_spec()):  # a 4.2 server adds "ns" back
                lines.append(f"{spec.name}: now {now.describe()}")
        return lines


class IndexRebuilder:
    """Lists and rebuilds the indexes of the collections of one MongoDB component."""

    def __init__(self, access: MongoAccess) -> None:
        self.access = access

    async def indexes(self, collection: str) -> list[IndexSpec]:
        """The collection's indexes; CommandError naming the known collections if it does not exist."""
        database = self.access.database_name
        async with self.access.database(f"Cannot read the indexes of `{collection}` in MongoDB {database}") as db:
            names = await db.list_collection_names()
            if collection not in names:
                known = ", ".join(f"`{n}`" for n in sorted(names)[:20] if not n.startswith("system.")) or "none"
                raise CommandError(
                    f"MongoDB database {database} has no collection `{collection}`; its collections: {known}."
                )
            return await _list(db, collection)

    async def observe(self, collection: str) -> Mapping[str, str]:
        return index_facts(await self.indexes(collection))

    async def rebuild(
        self, collection: str, planned: list[str], progress: Callable[[str], Awaitable[None]] | None = None
    ) -> Rebuilt:
        """Drop and re-create each planned index (by name) from its current spec, one after the other."""
        database = self.access.database_name
        done: list[str] = []
        async with self.access.database(f"Cannot rebuild the indexes of `{collection}` in MongoDB {database}") as db:
            before = await _list(db, collection)
            by_name = {spec.name: spec for spec in before}
            for name in planned:
                spec = by_name.get(name)
                if spec is None or not spec.rebuildable:
                    continue
                if progress is not None:
                    await progress(f"Rebuilding index {name} ({len(done) + 1} of {len(planned)})…")
                so_far = (
                    f"Rebuilt before it: {', '.join(done) or 'none'}; "
                    f"not touched: {', '.join(n for n in planned if n != name and n not in done) or 'none'}."
                )
                try:
                    await db.command(SON([("dropIndexes", collection), ("index", name)]))
                except PyMongoError as exc:
                    raise CommandError(
                        f"dropping index {name} of `{collection}` failed ({self.access.problem(exc)}); "
                        f"it may or may not still be there. {so_far}"
                    ) from None
                try:
                    await db.command(SON([("createIndexes", collection), ("indexes", [spec.create_spec()])]))
                except PyMongoError as exc:
                    spec_json = json_util.dumps(spec.raw, json_options=json_util.CANONICAL_JSON_OPTIONS)
                    raise CommandError(
                        f"index {name} of `{collection}` was dropped and re-creating it failed "
                        f"({self.access.problem(exc)}); re-create it by hand from its spec: {spec_json}. {so_far}"
                    ) from None
                done.append(name)
            after = await _list(db, collection)
        return Rebuilt(before, after)
