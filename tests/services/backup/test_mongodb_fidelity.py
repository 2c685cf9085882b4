"""MongoDB backups keep every BSON type, option and index byte for byte (issue 12).

The dump and restore run for real (MongoSource, the real AsyncMongoClient, its codec) against
``RawMongo`` (tests/fixtures/raw_mongo.py): a MongoDB wire-protocol double on loopback that never
parses what it stores. It keeps the documents of an insert as the bytes that arrived in the OP_MSG,
serves a find with those bytes,
answers listCollections and listIndexes with the options and index specs a test gives it as BSON
(written as MongoDB 7 returns them), and records every command as it arrived. So "the bytes that
come out of a restore equal the bytes that went into the dump" is checked where nothing can hide
a difference: on the wire, on both sides of the product.

MongoDB test server (nx-27017): what it cannot prove
----------------------------------------------------
nx-27017 keeps documents as JSON in SQLite, so a round trip through it says nothing about BSON
fidelity. It refuses Decimal128, NaN and ±infinity, regular expressions, timestamps, MinKey/MaxKey
and DBRefs; a date outside Python's range breaks its reply (PyMongo sees a ProtocolError); it hands
back a small Int64 as an Int32, every Binary subtype (UUIDs included) as subtype 0 and Code as a
string, and sorts an integer _id as text. It rewrites index names (``idx_<collection>_<fields>``)
and directions (all ascending), drops sparse, partialFilterExpression and collation from indexes
(unique and expireAfterSeconds stay), keeps no collection options (validator, validationLevel,
collation, capped) and reports the collection UUID as a string of zeros. So it cannot show that a
dump keeps index names, directions and options or collection options, nor that a restore re-creates
them: those are proved here against RawMongo. What nx-27017 still proves, here and in
test_sources.py, is that the same code works against a server that is not ours: batches and getMore,
the documents it can hold coming back byte for byte, a restore's drop/create/insert/createIndexes.
"""

from __future__ import annotations

import asyncio
import io
import struct
import tarfile
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from bson import (
    Binary,
    Code,
    DBRef,
    Decimal128,
    Int64,
    MaxKey,
    MinKey,
    ObjectId,
    Regex,
    Timestamp,
    encode,
)
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from bson.datetime_ms import DatetimeMS
from bson.raw_bson import RawBSONDocument
from bson.son import SON
from pymongo import AsyncMongoClient

from services.backup.base import BackupError
from services.backup.mongodb import MongoSource
from services.redaction import Redactor
from tests.fixtures.raw_mongo import RawMongo, options_of

RAW: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)


# --- BSON made by hand ------------------------------------------------------------------------------


def cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def bson_string(text: str) -> bytes:
    data = cstring(text)
    return struct.pack("<i", len(data)) + data


def element(kind: int, key: str, value: bytes = b"") -> bytes:
    return bytes([kind]) + cstring(key) + value


def with_elements(document: bytes, *elements: bytes) -> bytes:
    """``document`` with ``elements`` appended: how to write types PyMongo no longer encodes."""
    body = document[4:-1] + b"".join(elements)
    return struct.pack("<i", len(body) + 5) + body + b"\0"


# Deprecated types: PyMongo decodes them (to None, str, DBRef) but cannot encode them, so a backup
# that decoded and re-encoded documents would change them.
UNDEFINED = element(0x06, "undefined")
SYMBOL = element(0x0E, "symbol", bson_string("a symbol"))
DB_POINTER = element(0x0C, "dbPointer", bson_string("users") + ObjectId("65f0c0ffee000000000000d1").binary)

# Every element type of the BSON spec, by its type byte.
ALL_TYPES = {
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B,
    0x0C, 0x0D, 0x0E, 0x0F, 0x10, 0x11, 0x12, 0x13, 0xFF, 0x7F,
}  # fmt: skip
_FIXED = {0x01: 8, 0x06: 0, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16, 0xFF: 0, 0x7F: 0}


def _int32(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<i", data, at)[0])


def element_types(document: bytes) -> tuple[set[int], set[int]]:
    """The element types and Binary subtypes in a BSON document, nested ones included: what a
    fixture really holds, read from its bytes (decoding would hide the deprecated types)."""
    types: set[int] = set()
    subtypes: set[int] = set()

    def walk(start: int, end: int) -> None:
        at = start + 4
        while at < end - 1:
            kind = document[at]
            types.add(kind)
            at = document.index(b"\0", at + 1) + 1
            if kind in _FIXED:
                at += _FIXED[kind]
            elif kind in (0x02, 0x0D, 0x0E):
                at += 4 + _int32(document, at)
            elif kind == 0x0C:
                at += 4 + _int32(document, at) + 12
            elif kind in (0x03, 0x04):
                walk(at, at + _int32(document, at))
                at += _int32(document, at)
            elif kind == 0x05:
                subtypes.add(document[at + 4])
                at += 5 + _int32(document, at)
            elif kind == 0x0B:
                at = document.index(b"\0", document.index(b"\0", at) + 1) + 1
            elif kind == 0x0F:
                code_end = at + 8 + _int32(document, at + 4)
                walk(code_end, at + _int32(document, at))
                at += _int32(document, at)
            else:
                raise AssertionError(f"unknown BSON type {kind:#x} at byte {at}")

    walk(0, len(document))
    return types, subtypes


U = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")


def every_bson_type() -> bytes:
    """One document with every BSON type, keys deliberately not sorted, some of them unicode."""
    document = SON(
        [
            ("_id", ObjectId("65f0c0ffee00000000000001")),
            ("zeta", "keys are not sorted"),
            ("décimal", Decimal128("-1234567890.123456789012345678901234")),
            ("decimal_nan", Decimal128("NaN")),
            ("decimal_neg_zero", Decimal128("-0E-10")),
            ("int64_small", Int64(1)),  # an Int64 that fits an Int32 must stay an Int64
            ("int64_min", Int64(-(2**63))),
            ("int32", 1),
            ("int32_min", -(2**31)),
            ("double_whole", 1.0),  # not the Int32 1
            ("double_neg_zero", -0.0),
            ("double_nan", float("nan")),
            ("double_inf", float("inf")),
            ("double_neg_inf", float("-inf")),
            ("double_tiny", 5e-324),
            ("object_id", ObjectId("65f0c0ffee00000000000002")),
            ("date_ms", datetime(2024, 2, 29, 23, 59, 59, 999000, tzinfo=UTC)),
            ("date_epoch_negative", datetime(1969, 12, 31, 23, 59, 59, 1000, tzinfo=UTC)),
            ("date_before_year_1", DatetimeMS(-62135596800001)),
            ("date_after_9999", DatetimeMS(253402300800000)),
            ("binary_generic", Binary(b"\x00\xffbytes\x00", 0)),
            ("binary_old", Binary(b"old binary", 2)),
            ("uuid_python_legacy", Binary.from_uuid(U, UuidRepresentation.PYTHON_LEGACY)),
            ("uuid_java_legacy", Binary.from_uuid(U, UuidRepresentation.JAVA_LEGACY)),
            ("uuid_csharp_legacy", Binary.from_uuid(U, UuidRepresentation.CSHARP_LEGACY)),
            ("uuid_standard", Binary.from_uuid(U, UuidRepresentation.STANDARD)),
            ("md5", Binary(bytes(range(16)), 5)),
            ("encrypted", Binary(b"\x06ciphertext", 6)),
            ("user_defined", Binary(b"user defined", 128)),
            ("regex", Regex("^a.*b$", "imsux")),
            ("regex_plain", Regex("x", 0)),
            ("timestamp", Timestamp(1700000000, 7)),
            ("min", MinKey()),
            ("max", MaxKey()),
            ("code", Code("function () { return 1; }")),
            ("code_with_scope", Code("function () { return x; }", SON([("x", Int64(1)), ("a", [1.5])]))),
            ("dbref", DBRef("users", ObjectId("65f0c0ffee00000000000003"), "otherdb", extra="kept")),
            ("null", None),
            ("true", True),
            ("false", False),
            ("nested", [[1, [Int64(2), [3.0, []]]], SON([("b", 1), ("a", SON([("y", []), ("x", {})]))])]),
            ("日本語のキー", "ünïcødé ✓ 𝄞 \u2028"),
            ("", "an empty key"),
            ("a", "sorted order would put me first"),
        ]
    )
    return with_elements(encode(document), UNDEFINED, SYMBOL, DB_POINTER)


def documents_of_every_kind() -> list[bytes]:
    """The document above, other kinds of _id, and enough small ones that a find needs getMore."""
    other_ids = [
        encode(SON([("_id", Binary.from_uuid(U, UuidRepresentation.PYTHON_LEGACY)), ("kind", "legacy uuid _id")])),
        encode(SON([("_id", Binary.from_uuid(U, UuidRepresentation.STANDARD)), ("kind", "uuid _id")])),
        encode(SON([("_id", Int64(7)), ("kind", "Int64 _id")])),
        encode(SON([("_id", 7), ("kind", "Int32 _id, not the Int64 one")])),
        encode(SON([("_id", 7.0), ("kind", "double _id")])),
        encode(SON([("_id", Decimal128("7.00")), ("kind", "Decimal128 _id")])),
        encode(SON([("_id", SON([("b", 1), ("a", 2)])), ("kind", "document _id")])),
    ]
    many = [encode(SON([("_id", i), ("n", Int64(i)), ("v", i / 7)])) for i in range(1000, 1250)]
    return [every_bson_type(), *other_ids, *many]


def source_for(uri: str, database: str) -> MongoSource:
    return MongoSource(uri, database, timeout=5.0, redactor=Redactor())


async def feed(data: bytes, size: int = 7_000) -> AsyncIterator[bytes]:
    """An archive as a stream, in pieces that do not line up with anything inside it."""
    for start in range(0, len(data), size):
        await asyncio.sleep(0)
        yield data[start : start + size]


async def dump(source: MongoSource) -> bytes:
    return b"".join([chunk async for chunk in source.dump()])


def members(archive: bytes) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar:
            data = tar.extractfile(member)
            assert data is not None
            yield member.name, data.read()


# --- documents ---------------------------------------------------------------------------------------


def test_the_fixture_holds_every_bson_type() -> None:
    types, subtypes = element_types(every_bson_type())

    assert types == ALL_TYPES
    assert subtypes == {0, 2, 3, 4, 5, 6, 128}


async def test_documents_of_every_bson_type_are_dumped_and_restored_byte_for_byte(raw_mongo: RawMongo) -> None:
    documents = documents_of_every_kind()
    raw_mongo.seed("src", "things", documents)
    source = source_for(raw_mongo.uri, "src")

    archive = await dump(source)

    files = dict(members(archive))
    assert list(files) == ["src/things.metadata.json", "src/things.bson"]
    assert files["src/things.bson"] == b"".join(documents)  # mongodump's .bson: raw documents back to back
    assert [command.name for command in raw_mongo.commands("src")] == [
        "listCollections",
        "listCollections",
        "listIndexes",
        "find",
        "getMore",  # 101 documents come in the first batch
    ]
    assert source.info.stats == {"collections": {"things": len(documents)}}
    assert await source.check(feed(archive), source.info.stats) == (
        f"archive decodes: 1 collections, {len(documents):,} documents"
    )

    summary = await source_for(raw_mongo.uri, "dst").restore(feed(archive))

    assert summary.startswith(f"restored 1 collection ({len(documents):,} documents) into MongoDB database dst")
    inserted = [
        document for command in raw_mongo.commands("dst") if command.name == "insert" for document in command.documents
    ]
    assert inserted == documents  # the bytes PyMongo put on the wire are the bytes that were dumped


# --- options and indexes ----------------------------------------------------------------------------

# As MongoDB 7 answers listCollections and listIndexes (a collation spelled out in full, "v": 2).
FRENCH = SON(
    [
        ("locale", "fr"),
        ("caseLevel", False),
        ("caseFirst", "off"),
        ("strength", 2),
        ("numericOrdering", False),
        ("alternate", "non-ignorable"),
        ("maxVariable", "punct"),
        ("normalization", False),
        ("backwards", False),
        ("version", "57.1"),
    ]
)
OPTIONS = SON(
    [
        (
            "validator",
            SON(
                [
                    (
                        "$and",
                        [
                            # The $regex query operator, not a regular expression.
                            SON([("sku", SON([("$regex", "^[A-Z]{3}-"), ("$options", "i")]))]),
                            SON([("name", Regex("^\\S", "u"))]),
                            SON([("price", SON([("$gte", Decimal128("0.00"))]))]),
                            SON([("stock", SON([("$lte", Int64(1_000_000))]))]),
                            SON([("opened", SON([("$gte", DatetimeMS(-62135596800001))]))]),
                            # A filter shaped like a DBRef, keys not in DBRef's order.
                            SON([("owner", SON([("$id", 1), ("$ref", "users")]))]),
                        ],
                    )
                ]
            ),
        ),
        ("validationLevel", "moderate"),
        ("validationAction", "warn"),
    ]
)
INDEXES = [
    SON([("v", 2), ("key", SON([("_id", 1)])), ("name", "_id_")]),
    SON(
        [
            ("v", 2),
            ("key", SON([("zeta", -1), ("alpha", 1), ("score", -1.0)])),
            ("name", "by zeta, then alpha"),
            ("unique", True),
            (
                "partialFilterExpression",
                SON(
                    [
                        ("alpha", SON([("$gt", Int64(5))])),
                        ("when", SON([("$lt", datetime(2030, 1, 1, 0, 0, 0, 123000, tzinfo=UTC))])),
                    ]
                ),
            ),
        ]
    ),
    SON([("v", 2), ("key", SON([("name", 1)])), ("name", "name_fr"), ("collation", FRENCH)]),
    SON([("v", 2), ("key", SON([("email", 1)])), ("name", "email_1"), ("sparse", True)]),
    SON([("v", 2), ("key", SON([("expiresAt", 1)])), ("name", "expiresAt_1"), ("expireAfterSeconds", 3600)]),
    SON(
        [("v", 2), ("key", SON([("location", "2dsphere")])), ("name", "location_2dsphere"), ("2dsphereIndexVersion", 3)]
    ),
    SON(
        [
            ("v", 2),
            ("key", SON([("_fts", "text"), ("_ftsx", 1)])),
            ("name", "body_text"),
            ("weights", SON([("title", 10), ("body", 1)])),
            ("default_language", "english"),
            ("language_override", "language"),
            ("textIndexVersion", 3),
        ]
    ),
    SON(
        [
            ("v", 2),
            ("key", SON([("$**", 1)])),
            ("name", "$**_1"),
            ("wildcardProjection", SON([("secret", 0)])),
            ("hidden", True),
        ]
    ),
    # From a MongoDB 4.2 server: a v1 index that still names its namespace.
    SON([("v", 1), ("key", SON([("legacy", Int64(1))])), ("name", "legacy_1"), ("ns", "shop.orders")]),
]
COLLECTION_UUID = Binary.from_uuid(U, UuidRepresentation.STANDARD)


def without_ns(spec: SON[str, Any]) -> SON[str, Any]:
    return SON((key, value) for key, value in spec.items() if key != "ns")


def seed_shop(server: RawMongo) -> list[bytes]:
    orders = [encode(SON([("_id", 1), ("sku", "ABC-1")])), encode(SON([("_id", 2), ("sku", "ABC-2")]))]
    server.seed(
        "shop",
        "orders",
        orders,
        options=encode(OPTIONS),
        indexes=[encode(spec) for spec in INDEXES],
        collection_uuid=COLLECTION_UUID,
    )
    server.seed("shop", "plain")
    return orders


# mongodump's <collection>.metadata.json (mongo-tools mongodump/metadata_dump.go): compact canonical
# extended JSON of {options (left out when empty), indexes, uuid (hex; left out without one),
# collectionName, type}, every document in the server's key order.
ORDERS_METADATA = (
    '{"options":{"validator":{"$and":['
    '{"sku":{"$regex":"^[A-Z]{3}-","$options":"i"}},'
    '{"name":{"$regularExpression":{"pattern":"^\\\\S","options":"u"}}},'
    '{"price":{"$gte":{"$numberDecimal":"0.00"}}},'
    '{"stock":{"$lte":{"$numberLong":"1000000"}}},'
    '{"opened":{"$gte":{"$date":{"$numberLong":"-62135596800001"}}}},'
    '{"owner":{"$id":{"$numberInt":"1"},"$ref":"users"}}'
    ']},"validationLevel":"moderate","validationAction":"warn"},'
    '"indexes":['
    '{"v":{"$numberInt":"2"},"key":{"_id":{"$numberInt":"1"}},"name":"_id_"},'
    '{"v":{"$numberInt":"2"},'
    '"key":{"zeta":{"$numberInt":"-1"},"alpha":{"$numberInt":"1"},"score":{"$numberDouble":"-1.0"}},'
    '"name":"by zeta, then alpha","unique":true,'
    '"partialFilterExpression":{"alpha":{"$gt":{"$numberLong":"5"}},"when":{"$lt":{"$date":{"$numberLong":"1893456000123"}}}}},'
    '{"v":{"$numberInt":"2"},"key":{"name":{"$numberInt":"1"}},"name":"name_fr","collation":{"locale":"fr",'
    '"caseLevel":false,"caseFirst":"off","strength":{"$numberInt":"2"},"numericOrdering":false,'
    '"alternate":"non-ignorable","maxVariable":"punct","normalization":false,"backwards":false,"version":"57.1"}},'
    '{"v":{"$numberInt":"2"},"key":{"email":{"$numberInt":"1"}},"name":"email_1","sparse":true},'
    '{"v":{"$numberInt":"2"},"key":{"expiresAt":{"$numberInt":"1"}},"name":"expiresAt_1",'
    '"expireAfterSeconds":{"$numberInt":"3600"}},'
    '{"v":{"$numberInt":"2"},"key":{"location":"2dsphere"},"name":"location_2dsphere",'
    '"2dsphereIndexVersion":{"$numberInt":"3"}},'
    '{"v":{"$numberInt":"2"},"key":{"_fts":"text","_ftsx":{"$numberInt":"1"}},"name":"body_text",'
    '"weights":{"title":{"$numberInt":"10"},"body":{"$numberInt":"1"}},"default_language":"english",'
    '"language_override":"language","textIndexVersion":{"$numberInt":"3"}},'
    '{"v":{"$numberInt":"2"},"key":{"$**":{"$numberInt":"1"}},"name":"$**_1",'
    '"wildcardProjection":{"secret":{"$numberInt":"0"}},"hidden":true},'
    '{"v":{"$numberInt":"1"},"key":{"legacy":{"$numberLong":"1"}},"name":"legacy_1","ns":"shop.orders"}'
    "],"
    '"uuid":"00112233445566778899aabbccddeeff","collectionName":"orders","type":"collection"}'
)
PLAIN_METADATA = (
    '{"indexes":[{"v":{"$numberInt":"2"},"key":{"_id":{"$numberInt":"1"}},"name":"_id_"}],'
    '"collectionName":"plain","type":"collection"}'
)


async def test_metadata_json_is_written_as_mongodump_writes_it(raw_mongo: RawMongo) -> None:
    orders = seed_shop(raw_mongo)
    source = source_for(raw_mongo.uri, "shop")

    files = dict(members(await dump(source)))

    assert list(files) == [
        "shop/orders.metadata.json",
        "shop/orders.bson",
        "shop/plain.metadata.json",
        "shop/plain.bson",
    ]
    assert files["shop/orders.metadata.json"].decode() == ORDERS_METADATA
    assert files["shop/plain.metadata.json"].decode() == PLAIN_METADATA
    assert files["shop/orders.bson"] == b"".join(orders)
    assert files["shop/plain.bson"] == b""


async def test_restore_recreates_options_and_indexes_with_the_same_bson(raw_mongo: RawMongo) -> None:
    orders = seed_shop(raw_mongo)
    archive = await dump(source_for(raw_mongo.uri, "shop"))

    summary = await source_for(raw_mongo.uri, "restored").restore(feed(archive))

    assert summary.startswith("restored 2 collections (2 documents) into MongoDB database restored")
    sent = raw_mongo.commands("restored")
    # Each collection dropped and created with its options, filled, and indexed once all data is in.
    assert [(command.name, command.body[command.name]) for command in sent] == [
        ("drop", "orders"),
        ("create", "orders"),
        ("insert", "orders"),
        ("drop", "plain"),
        ("create", "plain"),
        ("createIndexes", "orders"),
    ]
    _, create, insert, _, create_plain, create_indexes = sent
    assert list(create.body) == ["create", "validator", "validationLevel", "validationAction", "$db"]
    assert options_of(create.body) == encode(OPTIONS)  # the $regex operator, the $id-first filter, the old date
    assert list(create_plain.body) == ["create", "$db"]
    assert insert.documents == orders
    assert list(create_indexes.body) == ["createIndexes", "indexes", "$db"]
    # The specs as listIndexes gave them, byte for byte: names, key order and direction (-1 and
    # -1.0), unique, sparse, TTL, partial filter, collation, hidden, "v"; only a 4.2 spec's "ns" goes,
    # as mongorestore drops it, and _id_ comes with the collection.
    assert [spec.raw for spec in create_indexes.body["indexes"]] == [encode(without_ns(s)) for s in INDEXES[1:]]


async def test_metadata_extended_json_would_change_fails_the_dump(raw_mongo: RawMongo) -> None:
    validator = encode(SON([("validator", SON([("tag", "x")]))]))
    raw_mongo.seed("odd", "tags", [encode({"_id": 1})], options=with_elements(validator, SYMBOL))

    with pytest.raises(BackupError, match=r"^cannot write the options and indexes of MongoDB collection tags as"):
        await dump(source_for(raw_mongo.uri, "odd"))
    assert [command.name for command in raw_mongo.commands("odd")] == [
        "listCollections",
        "listCollections",
        "listIndexes",
    ]


# --- nx-27017: the documents it can hold ------------------------------------------------------------


async def test_documents_nx_27017_can_hold_come_back_byte_for_byte(mongo_uri: str) -> None:
    """The same dump and restore against a server that is not ours; batches of 101 and getMore."""
    documents = [
        encode(
            SON(
                [
                    ("_id", i),
                    ("zeta", "keys are not sorted"),
                    ("int64", Int64(2**40 + i)),
                    ("double_neg_zero", -0.0),
                    ("date_ms", datetime(2024, 2, 29, 23, 59, 59, 999000, tzinfo=UTC)),
                    ("binary", Binary(b"\x00\xff" * i, 0)),
                    ("null", None),
                    ("true", True),
                    ("日本語のキー", "ünïcødé ✓"),
                    ("", "an empty key"),
                    ("nested", [1, SON([("b", 2.5), ("a", [None, "x", {}])])]),
                ]
            )
        )
        for i in range(250)
    ]
    client: AsyncMongoClient[RawBSONDocument] = AsyncMongoClient(
        mongo_uri, document_class=RawBSONDocument, serverSelectionTimeoutMS=5000
    )
    try:
        name = f"fidelity_{uuid.uuid4().hex[:8]}"
        await client[name].things.insert_many([RawBSONDocument(document) for document in documents])

        archive = await dump(source_for(mongo_uri, name))
        await source_for(mongo_uri, f"{name}_back").restore(feed(archive))

        assert dict(members(archive))[f"{name}/things.bson"] == b"".join(documents)
        # Ordered here: nx-27017 sorts an integer _id as text (0, 1, 10, 11, …, 2).
        back = sorted([document async for document in client[f"{name}_back"].things.find()], key=lambda d: d["_id"])
        assert [document.raw for document in back] == documents
    finally:
        await client.close()
