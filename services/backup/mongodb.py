"""MongoDB backups made natively with PyMongo's async client, in mongodump's layout inside a tar.

No mongodump on the bot's host is needed, and the result still restores with mongorestore:
``<database>/<collection>.bson`` holds the documents' raw BSON back to back (RawBSONDocument, so
nothing is decoded and re-encoded) and ``<database>/<collection>.metadata.json`` the options and
indexes as mongodump writes them: canonical extended JSON, keys in the server's order, read back at
dump time to the same BSON bytes or the dump fails (mongodump checks the same). A tar header needs
the member's size first, so each collection is spooled to a private temporary file (disk, not
memory), then streamed. Like mongodump without --oplog, each collection is read as it is at the
time; collections are not one snapshot together.
"""

from __future__ import annotations

import asyncio
import json
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeVar, cast

import bson
import pymongo
from bson import json_util
from bson.binary import UUID_SUBTYPE, Binary
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.raw_bson import RawBSONDocument
from bson.son import SON
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure, PyMongoError

from services.backup.base import CHUNK, BackupError, DumpInfo
from services.backup.bridge import file_chunks, parse_stream, private_dir, read_stream, read_to_end
from services.failures import mongo_problem, short_error
from services.inventory import secrets_in
from services.redaction import Redactor

T = TypeVar("T")

_RAW: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)
# Options and indexes stay raw too (no DBRef made of a {"$ref": ...} filter, nothing reordered);
# values read from them for the JSON may be dates outside Python's range.
_META: CodecOptions[RawBSONDocument] = CodecOptions(
    document_class=RawBSONDocument, datetime_conversion=DatetimeConversion.DATETIME_AUTO
)
_JSON_IN = json_util.JSONOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO)
# A check decodes every document fully; dates outside Python's range must not count as damage.
_FULL: CodecOptions[dict[str, Any]] = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO)
_BATCH_BYTES = 4 * CHUNK  # raw BSON per insert_many during a restore
_BATCH_DOCS = 10_000
_METADATA_LIMIT = 16 << 20  # a metadata file bigger than this is not one we wrote
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_BSON = ".bson"
_METADATA = ".metadata.json"


def _member_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = int(time.time())
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % _BLOCK)


def _split_member(name: str) -> tuple[str, str]:
    """``("shop/users.bson")`` → ``("users", ".bson")``; ValueError for anything else."""
    directory, _, rest = name.partition("/")
    for suffix in (_METADATA, _BSON):
        if directory and rest.endswith(suffix) and len(rest) > len(suffix):
            return rest[: -len(suffix)], suffix
    raise ValueError(f"unexpected member {name!r} (not <database>/<collection>.bson or .metadata.json)")


def _hosts(uri: str) -> str:
    """The host list of a MongoDB URI, without scheme, credentials or options."""
    rest = uri.split("://", 1)[-1]
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    return authority.rpartition("@")[2] or "localhost"


def _json_object(document: dict[str, Any]) -> Any:
    """One JSON object of a metadata file as its BSON value.

    json_util alone would change two kinds of plain documents: ``{"$regex": "…"}`` (the query
    operator, in a validator say) into a regular expression, which canonical extended JSON writes
    as ``$regularExpression``; and ``{"$ref": …, "$id": …}`` into a DBRef, re-encoded with its keys
    in DBRef's order. Canonical extended JSON has neither, so both stay documents as written.
    """
    if isinstance(document.get("$regex"), str) or "$ref" in document:
        return document
    if isinstance(pointer := document.get("$dbPointer"), dict):  # mongodump writes its DBRef inside
        document["$dbPointer"] = json_util.object_hook(pointer, _JSON_IN)
    return json_util.object_hook(document, _JSON_IN)


def _parse_metadata(data: bytes | str) -> Any:
    """A ``.metadata.json`` file as written by :func:`_metadata` (or mongodump)."""
    return json.loads(data, object_hook=_json_object)


def _metadata(name: str, listed: Mapping[str, Any] | None, indexes: Sequence[RawBSONDocument]) -> bytes:
    """mongodump's ``<collection>.metadata.json`` from listCollections' entry and listIndexes' specs.

    Keys and their order as mongodump writes them (empty options and a missing UUID left out),
    compact canonical extended JSON. Raises BackupError if the JSON does not read back to the
    same BSON bytes, as mongodump refuses to write it then.
    """
    document: dict[str, Any] = {}
    listed = listed or {}
    if options := listed.get("options"):
        document["options"] = options
    document["indexes"] = list(indexes)
    uuid = (listed.get("info") or {}).get("uuid")
    if isinstance(uuid, Binary) and uuid.subtype == UUID_SUBTYPE:
        document["uuid"] = uuid.hex()
    document["collectionName"] = name
    document["type"] = listed.get("type") or "collection"
    text = json_util.dumps(
        document, json_options=json_util.CANONICAL_JSON_OPTIONS, separators=(",", ":"), ensure_ascii=False
    )
    if bson.encode(_parse_metadata(text)) != bson.encode(document):
        raise BackupError(
            f"cannot write the options and indexes of MongoDB collection {name} as extended JSON without "
            "changing them (deprecated BSON types such as symbol, undefined and DBPointer have no exact form; "
            "mongodump refuses them too)"
        )
    return text.encode()


@dataclass
class _Progress:
    """How far a restore got, for its summary or its error message."""

    started: set[str] = field(default_factory=set)
    documents: int = 0
    current: str = ""


@dataclass(frozen=True)
class _Event:
    """What the tar parser (a worker thread) hands to the event loop during a restore."""

    collection: str
    metadata: dict[str, Any] | None = None
    documents: list[RawBSONDocument] | None = None


def _archive_files(source: BinaryIO) -> Iterator[tuple[tarfile.TarInfo, str, str, IO[bytes]]]:
    """The regular files of a dump archive, read once in order: (member, collection, suffix, data).
    The archive's end padding is checked after the last one."""
    with tarfile.open(fileobj=source, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            collection, suffix = _split_member(member.name)
            data = tar.extractfile(member)
            if data is not None:
                yield member, collection, suffix, data
        read_to_end(cast(BinaryIO, tar.fileobj), padding_only=True)


def _restore_events(source: BinaryIO) -> Iterator[_Event]:
    """Runs in a worker thread: the archive as metadata and batches of raw documents."""
    for member, collection, suffix, data in _archive_files(source):
        if suffix == _METADATA:
            if member.size > _METADATA_LIMIT:
                raise ValueError(f"{member.name} is too big for a metadata file")
            yield _Event(collection, metadata=_parse_metadata(data.read()))
            continue
        batch: list[RawBSONDocument] = []
        size = 0
        for document in bson.decode_file_iter(data, _RAW):
            batch.append(document)
            size += len(document.raw)
            if size >= _BATCH_BYTES or len(batch) >= _BATCH_DOCS:
                yield _Event(collection, documents=batch)
                batch, size = [], 0
        yield _Event(collection, documents=batch)


def _survey(source: BinaryIO) -> tuple[dict[str, int], set[str]]:
    """Runs in a worker thread: every document decoded, every metadata parsed; counts per collection."""
    counts: dict[str, int] = {}
    described: set[str] = set()
    for member, collection, suffix, data in _archive_files(source):
        if suffix == _METADATA:
            document = _parse_metadata(data.read(_METADATA_LIMIT))
            if not isinstance(document, dict) or not isinstance(document.get("indexes", []), list):
                raise ValueError(f"{member.name} is not collection metadata")
            described.add(collection)
        else:
            counts[collection] = sum(1 for _ in bson.decode_file_iter(data, _FULL))
    return counts, described


class MongoSource:
    """One MongoDB database (or some of its collections), dumped and restored with PyMongo."""

    kind = "mongodb"
    extension = "tar"

    def __init__(
        self,
        uri: str,
        database: str,
        *,
        timeout: float,
        redactor: Redactor,
        collections: Sequence[str] | None = None,
    ) -> None:
        self._uri = uri
        self._database = database
        self._timeout = timeout
        self._collections = list(collections) if collections else None
        self._redactor = Redactor(secrets_in(uri))
        self._outer_redactor = redactor
        self._info = DumpInfo()

    def describe(self) -> str:
        return f"MongoDB database {self._database} on {_hosts(self._uri)}"

    @property
    def info(self) -> DumpInfo:
        return self._info

    def _client(self) -> AsyncMongoClient[dict[str, Any]]:
        milliseconds = max(1, int(self._timeout * 1000))
        try:
            return AsyncMongoClient(
                self._uri,
                serverSelectionTimeoutMS=milliseconds,
                connectTimeoutMS=milliseconds,
                socketTimeoutMS=milliseconds,
                appname="opsbot-backup",
            )
        except (PyMongoError, ValueError, TypeError) as exc:
            raise BackupError(f"cannot use the MongoDB URI: {self._problem(exc)}") from None

    def _problem(self, exc: BaseException) -> str:
        """Why MongoDB failed, as a phrase without the URI's password."""
        return mongo_problem(exc, self._timeout, self._redactor, self._outer_redactor)

    async def _names(self, database: AsyncDatabase[dict[str, Any]]) -> list[str]:
        """Collections to dump: the configured ones, else every plain collection but system.*."""
        found: dict[str, str] = {}
        for entry in await _listed(database):
            found[str(entry["name"])] = str(entry.get("type", "collection"))
        if self._collections is not None:
            missing = [name for name in self._collections if name not in found]
            if missing:
                raise BackupError(f"collection {missing[0]} does not exist in MongoDB database {self._database}")
            return self._collections
        return sorted(name for name, kind in found.items() if kind == "collection" and not name.startswith("system."))

    async def _spool(self, database: AsyncDatabase[dict[str, Any]], name: str, path: Path) -> int:
        """The collection's documents as raw BSON into ``path`` (written in CHUNK pieces by a thread)."""
        # PyMongo types the collection with the database's document class, not the codec's.
        collection = cast("AsyncCollection[RawBSONDocument]", database.get_collection(name, codec_options=_RAW))
        count = 0
        buffer = bytearray()
        with path.open("wb") as out:
            cursor = collection.find({})
            try:
                async for document in cursor:
                    buffer += document.raw
                    count += 1
                    if len(buffer) >= CHUNK:
                        full, buffer = buffer, bytearray()
                        await asyncio.to_thread(out.write, full)
            finally:
                await cursor.close()
            if buffer:
                await asyncio.to_thread(out.write, buffer)
        return count

    async def _describe_collection(self, database: AsyncDatabase[dict[str, Any]], name: str) -> bytes:
        """The collection's metadata file, from listCollections and listIndexes read as raw BSON."""
        entries = await _listed(database, name)
        try:
            indexes = await _raw_cursor(database, SON([("listIndexes", name), ("cursor", {})]))
        except OperationFailure as exc:
            if exc.code != 26:  # NamespaceNotFound: dropped since it was listed; mongodump goes on too
                raise
            indexes = []
        return _metadata(name, entries[0] if entries else None, indexes)

    async def dump(self) -> AsyncIterator[bytes]:
        """The tar stream, one collection after the other; metadata before documents."""
        client = self._client()
        database = client[self._database]
        counts: dict[str, int] = {}
        written = 0
        try:
            names = await self._driver(f"cannot read MongoDB database {self._database}", self._names(database))
            async with private_dir() as directory:
                spool = directory / "collection.bson"
                for name in names:
                    doing = f"cannot read MongoDB collection {name}"
                    metadata = await self._driver(doing, self._describe_collection(database, name))
                    counts[name] = await self._driver(doing, self._spool(database, name, spool))
                    described = _member_header(f"{self._database}/{name}{_METADATA}", len(metadata))
                    described += metadata + _padding(len(metadata))
                    size = spool.stat().st_size
                    head = _member_header(f"{self._database}/{name}{_BSON}", size)
                    written += len(described) + len(head)
                    yield described + head
                    async for chunk in file_chunks(spool):
                        written += len(chunk)
                        yield chunk
                    spool.unlink()
                    if tail := _padding(size):
                        written += len(tail)
                        yield tail
            end = b"\0" * (2 * _BLOCK)
            yield end + b"\0" * (-(written + len(end)) % _RECORD)
        finally:
            await client.close()
            # An error's traceback keeps this frame alive; without the client in it, it does not
            # keep PyMongo's topology either (nor a socket PyMongo leaked there, PYTHON-3923).
            del client, database
        self._info = DumpInfo(tools={"pymongo": pymongo.version}, stats={"collections": counts})

    async def check(self, chunks: AsyncIterator[bytes], stats: Mapping[str, Any]) -> str:
        """Every document decodes, every metadata file parses, counts equal the manifest's."""
        try:
            counts, described = await read_stream(chunks, _survey, name="mongo-check")
        except (OSError, tarfile.TarError, ValueError, bson.errors.BSONError) as exc:
            raise BackupError(f"the MongoDB archive is damaged: {short_error(exc)}") from None
        if missing := sorted(set(counts) - described):
            raise BackupError(f"the MongoDB archive has no metadata for collection {missing[0]}")
        expected = stats.get("collections")
        if expected is not None and dict(expected) != counts:
            differ = sorted(set(expected) ^ set(counts)) or sorted(
                name for name in counts if counts[name] != expected[name]
            )
            name = differ[0]
            raise BackupError(
                f"collection {name} has {counts.get(name, 0)} documents in the archive, "
                f"its manifest says {dict(expected).get(name, 0)}"
            )
        return f"archive decodes: {len(counts)} collections, {sum(counts.values()):,} documents"

    async def restore(self, chunks: AsyncIterator[bytes]) -> str:
        """Each collection in the archive is dropped, refilled in batches, then indexed.

        Not atomic across collections (MongoDB has no such transaction for DDL): if it fails half
        way, the collections restored so far stay restored and the message says which one failed.
        """
        client = self._client()
        progress = _Progress()
        try:
            doing = f"restoring MongoDB database {self._database} failed"
            await self._driver(doing, self._restore_into(client[self._database], chunks, progress), progress)
        finally:
            await client.close()
            del client  # as in dump(): an error's traceback must not keep the driver's state alive
        collections = len(progress.started)
        return (
            f"restored {collections} collection{'' if collections == 1 else 's'} "
            f"({progress.documents:,} documents) into {self.describe()}"
        )

    async def _restore_into(
        self, database: AsyncDatabase[dict[str, Any]], chunks: AsyncIterator[bytes], progress: _Progress
    ) -> None:
        indexes: dict[str, list[Any]] = {}
        try:
            async for event in parse_stream(chunks, _restore_events, name="mongo-restore"):
                progress.current = event.collection
                if event.collection not in progress.started:
                    await database.drop_collection(event.collection)
                    options = (event.metadata or {}).get("options") or {}
                    await database.command(SON([("create", event.collection), *dict(options).items()]))
                    progress.started.add(event.collection)
                if event.metadata is not None:
                    indexes[event.collection] = list(event.metadata.get("indexes") or [])
                if event.documents:
                    await database[event.collection].insert_many(
                        event.documents, ordered=True, bypass_document_validation=True
                    )
                    progress.documents += len(event.documents)
        except (OSError, tarfile.TarError, ValueError, bson.errors.BSONError) as exc:
            raise BackupError(f"cannot read the MongoDB archive: {short_error(exc)}") from None
        for name, specs in indexes.items():
            progress.current = name
            wanted = [_index_spec(spec) for spec in specs if spec.get("name") != "_id_"]
            if wanted:
                await database.command(SON([("createIndexes", name), ("indexes", wanted)]))

    async def _driver(self, doing: str, operation: Awaitable[T], progress: _Progress | None = None) -> T:
        """Await ``operation``; a driver error becomes "<doing>: <why>" (at collection X)."""
        try:
            return await operation
        except PyMongoError as exc:
            problem = self._problem(exc)
        where = f" at collection {progress.current}" if progress is not None and progress.current else ""
        # Raised outside the except block, so the driver's exception is not kept as its context:
        # its frames can hold the socket of a connect attempt PyMongo never closed (PYTHON-3923).
        raise BackupError(f"{doing}{where}: {problem}")


async def _raw_cursor(database: AsyncDatabase[dict[str, Any]], command: SON[str, Any]) -> list[RawBSONDocument]:
    """Every document of a command's cursor, undecoded.

    list_collections() and list_indexes() decode fully (a validator's date outside Python's range
    fails them, a {"$ref": ...} filter becomes a DBRef); the first batch decodes with the command's
    codec options and a getMore with the database's, hence both.
    """
    raw = database.with_options(codec_options=_META)
    return await (await raw.cursor_command(command, codec_options=_META)).to_list()


async def _listed(database: AsyncDatabase[dict[str, Any]], name: str | None = None) -> list[RawBSONDocument]:
    """listCollections' entries (of collection ``name`` only, if given)."""
    command = SON([("listCollections", 1), ("cursor", {})])
    if name is not None:
        command["filter"] = {"name": name}
    return await _raw_cursor(database, command)


def _index_spec(spec: Mapping[str, Any]) -> SON[str, Any]:
    """An index as listIndexes gave it, ready for createIndexes (mongorestore drops "ns" too)."""
    return SON((key, value) for key, value in spec.items() if key != "ns")
