"""Compression and the two destinations, against a real directory and a real S3 endpoint (moto).

Data is generated on the fly (random letters: compressible, but real work for the compressor) and
never held whole in memory by the code under test.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import itertools
import os
import random
import shutil
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from services.backup.base import CHUNK, BackupError, Destination, manifest_key
from services.backup.codec import Codec, Meter, compress, decompress, suffix
from services.backup.directory import LocalDirectory
from services.backup.s3 import S3Destination
from tests.fixtures.aws import FAKE_SECRET_ACCESS_KEY, aws_client
from tests.fixtures.servers import free_port
from tests.fixtures.wait import wait_until

MiB = 1 << 20
PART = 5 * MiB  # S3's smallest part: objects of 12 MiB take several
_LETTERS = bytes(b"abcdefghijklmnopqrstuvwxyz012345"[i % 32] for i in range(256))
# Uneven piece sizes, so coalescing and part boundaries are exercised, not just 1 MiB steps.
_SIZES = (MiB, 300_000, 17, 2 * MiB + 5, 64 << 10, 1)
CODECS: list[Codec] = ["zstd", "gzip", "none"]


def pieces(total: int, seed: int = 1) -> Iterator[bytes]:
    rng = random.Random(seed)
    sent = 0
    for size in itertools.cycle(_SIZES):
        if sent >= total:
            return
        size = min(size, total - sent)
        yield rng.randbytes(size).translate(_LETTERS)
        sent += size


def digest_of(total: int, seed: int = 1) -> str:
    h = hashlib.sha256()
    for piece in pieces(total, seed):
        h.update(piece)
    return h.hexdigest()


class Source:
    """An async chunk stream that can fail or hang after ``stop_after`` bytes, and knows if it was closed."""

    def __init__(self, total: int, *, seed: int = 1, stop_after: int | None = None, hang: bool = False) -> None:
        self.total, self.seed, self.stop_after, self.hang = total, seed, stop_after, hang
        self.reached = asyncio.Event()
        self.closed = False

    async def stream(self) -> AsyncIterator[bytes]:
        sent = 0
        try:
            for piece in pieces(self.total, self.seed):
                if self.stop_after is not None and sent >= self.stop_after:
                    self.reached.set()
                    if self.hang:
                        await asyncio.Event().wait()
                    raise RuntimeError("the source broke half-way")
                yield piece
                sent += len(piece)
                await asyncio.sleep(0)
        finally:
            self.closed = True


async def collect(chunks: AsyncIterator[bytes]) -> tuple[int, str, list[int]]:
    """Size, sha256 and piece sizes of a stream."""
    h = hashlib.sha256()
    sizes: list[int] = []
    async for chunk in chunks:
        h.update(chunk)
        sizes.append(len(chunk))
    return sum(sizes), h.hexdigest(), sizes


async def from_bytes(data: bytes, step: int = 4096) -> AsyncIterator[bytes]:
    for start in range(0, len(data), step):
        yield data[start : start + step]


@pytest.fixture(params=["directory", "s3"])
async def destination(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    dest: LocalDirectory | S3Destination
    if request.param == "directory":
        dest = LocalDirectory("local", tmp_path / "backups")
    else:
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        dest = S3Destination("offsite", bucket, prefix="opsbot/", endpoint_url=endpoint, part_size=PART, timeout=10)
    yield dest
    await dest.close()


def s3_state(dest: S3Destination) -> tuple[list[str], list[str]]:
    """All object keys and all pending multipart uploads in the destination's bucket."""
    client = aws_client("s3", dest._endpoint_url or "")
    try:
        objects = client.list_objects_v2(Bucket=dest.bucket).get("Contents", [])
        uploads = client.list_multipart_uploads(Bucket=dest.bucket).get("Uploads", [])
        return [o["Key"] for o in objects], [u["Key"] for u in uploads]
    finally:
        client.close()


async def assert_nothing_left(dest: Destination) -> None:
    assert await dest.keys("") == []
    if isinstance(dest, LocalDirectory):
        leftovers = [p for p in dest.root.rglob("*") if p.is_file()] if dest.root.exists() else []
        assert leftovers == [], "a partial file was left behind"
    else:
        assert isinstance(dest, S3Destination)
        objects, uploads = s3_state(dest)
        assert objects == []
        assert uploads == [], "a multipart upload was left pending"


KEY = "shop/db/shop-db-20261122-013000-ab12.dump"


@pytest.mark.parametrize("codec", CODECS)
async def test_round_trip(destination: Destination, codec: Codec) -> None:
    total = 12 * MiB + 12345
    key = KEY + suffix(codec)
    source = Source(total)
    raw = Meter(source.stream(), sha256=True)
    stored_sizes: list[int] = []

    async def watched(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            stored_sizes.append(len(chunk))
            yield chunk

    stored = await destination.write(key, watched(compress(raw, codec)))

    assert raw.done and raw.size == total
    assert raw.sha256 == digest_of(total)
    assert stored.key == key and stored.size == sum(stored_sizes)
    assert all(size >= CHUNK for size in stored_sizes[:-1]), f"tiny pieces: {stored_sizes[:10]}"
    if codec == "none":
        assert stored.size == total
    else:
        assert stored.size < total * 0.8  # random letters carry 5 bits a byte
    size, sha, _ = await collect(destination.read(key))
    assert (size, sha) == (stored.size, stored.sha256)
    size, sha, _ = await collect(decompress(destination.read(key), codec))
    assert (size, sha) == (total, digest_of(total))
    assert await destination.keys("shop/") == [key]
    if isinstance(destination, S3Destination):
        client = aws_client("s3", destination._endpoint_url or "")
        try:
            tags = client.get_object_tagging(Bucket=destination.bucket, Key=f"opsbot/{key}")["TagSet"]
        finally:
            client.close()
        assert {"Key": "sha256", "Value": stored.sha256} in tags
        assert destination.location(key) == f"s3://{destination.bucket}/opsbot/{key}"
    else:
        assert isinstance(destination, LocalDirectory)
        assert destination.location(key) == str(destination.root / key)


async def test_small_and_empty_objects(destination: Destination) -> None:
    empty = await destination.write("a/empty", from_bytes(b""))
    assert (empty.size, empty.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert await collect(destination.read("a/empty")) == (0, hashlib.sha256(b"").hexdigest(), [])
    small = await destination.write("a/small", from_bytes(b"hello backup"))
    assert small.sha256 == hashlib.sha256(b"hello backup").hexdigest()
    assert (await collect(destination.read("a/small")))[1] == small.sha256
    assert await destination.keys("a/") == ["a/empty", "a/small"]
    if isinstance(destination, S3Destination):
        client = aws_client("s3", destination._endpoint_url or "")
        try:
            head = client.head_object(Bucket=destination.bucket, Key="opsbot/a/small")
        finally:
            client.close()
        assert head["Metadata"]["sha256"] == small.sha256


@pytest.mark.parametrize("codec", ["zstd", "gzip"])
async def test_empty_stream_compresses_to_a_valid_file(codec: Codec) -> None:
    compressed = b"".join([c async for c in compress(from_bytes(b""), codec)])
    assert compressed  # a header and a trailer, not nothing
    assert [c async for c in decompress(from_bytes(compressed), codec)] == []


async def test_files_are_readable_by_standard_tools(tmp_path: Path) -> None:
    dest = LocalDirectory("local", tmp_path / "b")
    total = 6 * MiB + 7
    expected = digest_of(total, seed=2)
    gz = await dest.write("x.tar.gz", compress(Source(total, seed=2).stream(), "gzip"))
    zst = await dest.write("x.tar.zst", compress(Source(total, seed=2).stream(), "zstd"))
    gz_path, zst_path = Path(dest.location(gz.key)), Path(dest.location(zst.key))
    assert hashlib.sha256(await asyncio.to_thread(gz_path.read_bytes)).hexdigest() == gz.sha256

    def gunzip_digest() -> str:
        h = hashlib.sha256()
        with gzip.open(gz_path, "rb") as f:
            while block := f.read(MiB):
                h.update(block)
        return h.hexdigest()

    assert await asyncio.to_thread(gunzip_digest) == expected

    for tool, path in (("gzip", gz_path), ("zstd", zst_path)):
        if shutil.which(tool) is None:
            continue
        done = await asyncio.to_thread(subprocess.run, [tool, "-d", "-c", str(path)], capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert hashlib.sha256(done.stdout).hexdigest() == expected


async def test_concatenated_streams_decode_like_the_cli_tools() -> None:
    for codec in ("zstd", "gzip"):
        one = b"".join([c async for c in compress(from_bytes(b"first "), codec)])
        two = b"".join([c async for c in compress(from_bytes(b"second"), codec)])
        out = b"".join([c async for c in decompress(from_bytes(one + two, step=7), codec)])
        assert out == b"first second"


@pytest.mark.parametrize("codec", ["zstd", "gzip"])
async def test_corrupt_data_is_refused(codec: Codec) -> None:
    with pytest.raises(BackupError, match=f"not valid {codec} data"):
        await collect(decompress(from_bytes(b"this is not compressed at all" * 100), codec))

    good = b"".join([c async for c in compress(Source(2 * MiB, seed=3).stream(), codec)])
    truncated = good[:-10]
    with pytest.raises(BackupError, match=f"not valid {codec} data"):
        await collect(decompress(from_bytes(truncated, step=CHUNK), codec))

    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(BackupError, match=f"not valid {codec} data"):
        await collect(decompress(from_bytes(bytes(flipped), step=CHUNK), codec))

    with pytest.raises(BackupError, match=f"not valid {codec} data"):
        await collect(decompress(from_bytes(b""), codec))


async def test_an_error_half_way_leaves_nothing(destination: Destination) -> None:
    source = Source(12 * MiB, stop_after=7 * MiB)  # past the first 5 MiB part
    with pytest.raises(RuntimeError, match="broke half-way"):
        await destination.write(KEY, source.stream())
    assert source.reached.is_set()
    await assert_nothing_left(destination)


async def test_a_compressed_stream_failing_half_way_leaves_nothing(destination: Destination) -> None:
    source = Source(24 * MiB, stop_after=16 * MiB)
    with pytest.raises(RuntimeError, match="broke half-way"):
        await destination.write(KEY + ".zst", compress(source.stream(), "zstd"))
    await assert_nothing_left(destination)


async def test_a_cancelled_write_leaves_nothing(destination: Destination) -> None:
    source = Source(12 * MiB, stop_after=7 * MiB, hang=True)
    task = asyncio.create_task(destination.write(KEY, source.stream()))
    await asyncio.wait_for(source.reached.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.closed
    await assert_nothing_left(destination)


def in_progress(dest: Destination) -> bool:
    """A partial file exists, or a multipart upload is pending."""
    if isinstance(dest, LocalDirectory):
        return any(".partial-" in p.name for p in dest.root.rglob("*"))
    assert isinstance(dest, S3Destination)
    return bool(s3_state(dest)[1])


async def test_cancelled_while_compressing_leaves_nothing(destination: Destination) -> None:
    source = Source(256 * MiB)
    task = asyncio.create_task(destination.write(KEY + ".gz", compress(source.stream(), "gzip")))

    async def writing() -> bool:  # S3: the first part is out
        assert not task.done()
        return await asyncio.to_thread(in_progress, destination)

    await wait_until(writing, "the write is in progress", timeout=20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.closed
    await assert_nothing_left(destination)


async def test_keys_manifests_and_delete(destination: Destination) -> None:
    keys = ["shop/db/shop-db-20261121.dump.zst", "shop/db/shop-db-20261122.dump.zst", "shop/files/f.tar.gz"]
    for key in keys:
        await destination.write(key, from_bytes(key.encode()))
    await destination.put_manifest(keys[0], b'{"ok": true}')
    await destination.put_manifest(keys[0], b'{"ok": "again"}')  # replaced atomically
    if isinstance(destination, LocalDirectory):
        (destination.root / "shop/db/shop-db-20261123.dump.zst.partial-0123456789ab").write_bytes(b"half")
    else:
        assert isinstance(destination, S3Destination)
        client = aws_client("s3", destination._endpoint_url or "")
        try:
            client.create_multipart_upload(Bucket=destination.bucket, Key="opsbot/shop/db/shop-db-20261123.dump.zst")
        finally:
            client.close()

    assert await destination.keys("") == sorted(keys)
    assert await destination.keys("shop/db/") == keys[:2]
    assert await destination.keys("shop/db/shop-db-2026112") == keys[:2]  # a string prefix, as in S3
    assert await destination.keys("shop/db/shop-db-20261122") == keys[1:2]
    assert await destination.keys("nothing/") == []
    assert await destination.read_manifest(keys[0]) == b'{"ok": "again"}'
    assert await destination.read_manifest(keys[1]) is None

    await destination.delete(keys[0])
    await destination.delete(keys[0])  # already gone: fine
    assert await destination.keys("shop/") == keys[1:]
    assert await destination.read_manifest(keys[0]) is None
    with pytest.raises(BackupError, match=r"no such object|no backup"):
        await collect(destination.read(keys[0]))


async def test_directory_permissions(tmp_path: Path) -> None:
    dest = LocalDirectory("local", tmp_path / "backups")
    await dest.write("shop/db/x.dump", from_bytes(b"secret rows"))
    await dest.put_manifest("shop/db/x.dump", b"{}")
    for path in (dest.root, dest.root / "shop", dest.root / "shop/db"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for path in (dest.root / "shop/db/x.dump", dest.root / "shop/db" / manifest_key("x.dump")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "a/../../b", "a//b", "./a", "", "a/"])
async def test_keys_that_could_escape_are_refused(tmp_path: Path, key: str) -> None:
    dest = LocalDirectory("local", tmp_path / "backups")
    with pytest.raises(ValueError, match="backup key"):
        await dest.write(key, from_bytes(b"x"))
    with pytest.raises(ValueError, match="backup key"):
        await collect(dest.read(key))
    s3 = S3Destination("offsite", "bucket")
    try:
        with pytest.raises(ValueError, match="backup key"):
            s3.location(key)
    finally:
        await s3.close()
    assert os.listdir(tmp_path) == []  # not even the root was created


async def test_listing_prefix_may_not_escape(tmp_path: Path) -> None:
    dest = LocalDirectory("local", tmp_path / "backups")
    with pytest.raises(ValueError, match="backup key"):
        await dest.keys("../")
    assert await dest.keys("") == []


async def test_missing_bucket_is_one_clear_sentence(moto_endpoint: str) -> None:
    dest = S3Destination("offsite", "no-such-bucket-here", endpoint_url=moto_endpoint, part_size=PART, timeout=10)
    source = Source(MiB)
    try:
        with pytest.raises(BackupError) as caught:
            await dest.write("a/b.dump", source.stream())
        with pytest.raises(BackupError, match="does not exist"):
            await dest.keys("")
    finally:
        await dest.close()
    message = caught.value.message
    assert message == "Writing s3://no-such-bucket-here/a/b.dump failed: the bucket no-such-bucket-here does not exist."
    assert FAKE_SECRET_ACCESS_KEY not in message
    assert source.closed  # the source's stream was closed, not left for the garbage collector


async def test_unreachable_endpoint_is_one_clear_sentence() -> None:
    port = free_port()  # nothing listens there
    dest = S3Destination("offsite", "bucket", endpoint_url=f"http://127.0.0.1:{port}", timeout=2)
    started = time.monotonic()
    try:
        with pytest.raises(BackupError) as caught:
            await dest.write("a/b.dump", from_bytes(b"data"))
    finally:
        await dest.close()
    assert caught.value.message == (
        f"Writing s3://bucket/a/b.dump failed: could not connect to http://127.0.0.1:{port} (connection refused)."
    )
    assert FAKE_SECRET_ACCESS_KEY not in caught.value.message
    assert time.monotonic() - started < 15


async def test_credentials_in_the_endpoint_url_never_show() -> None:
    port = free_port()
    url = f"http://backup:hunter2-secret@127.0.0.1:{port}/x?token=abc"
    dest = S3Destination("offsite", "bucket", endpoint_url=url, timeout=2)
    try:
        with pytest.raises(BackupError) as caught:
            await dest.write("a/b.dump", from_bytes(b"data"))
    finally:
        await dest.close()
    message = caught.value.message
    assert message.startswith("Writing s3://bucket/a/b.dump failed: ")
    assert f"127.0.0.1:{port}" in message
    for secret in ("hunter2", "backup:", "token", FAKE_SECRET_ACCESS_KEY):
        assert secret not in message


async def test_part_size_below_the_s3_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="part_size"):
        S3Destination("offsite", "bucket", part_size=MiB)


async def test_meter_counts_and_hashes() -> None:
    meter = Meter(from_bytes(b"abc" * 1000, step=100), sha256=True)
    assert await collect(meter) == (3000, hashlib.sha256(b"abc" * 1000).hexdigest(), [100] * 30)
    assert meter.done and meter.size == 3000 and meter.sha256 == hashlib.sha256(b"abc" * 1000).hexdigest()
    plain = Meter(from_bytes(b"abc"))
    await collect(plain)
    assert plain.size == 3 and plain.sha256 is None


@pytest.mark.parametrize(("codec", "total"), [("zstd", 64 * MiB), ("gzip", 32 * MiB)])
async def test_the_event_loop_stays_responsive_while_compressing(codec: Codec, total: int) -> None:
    # 16 MiB pieces: compressing one on the loop would block it for 0.2 s (zstd) to 0.7 s (gzip).
    block = await asyncio.to_thread(lambda: b"".join(pieces(16 * MiB, seed=4)))

    async def big_pieces() -> AsyncIterator[bytes]:
        for _ in range(total // len(block)):
            yield block

    worst = 0.0
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst, ticks
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            worst = max(worst, now - last)
            ticks += 1
            last = now

    tick_task = asyncio.create_task(ticker())
    try:
        size, _, _ = await collect(compress(big_pieces(), codec))
    finally:
        stop.set()
        await tick_task
    assert 0 < size < total
    assert ticks > 10
    assert worst < 0.25, f"the event loop was blocked for {worst:.3f} s"


async def test_partials_are_listed_with_their_last_write_and_removed_one_by_one(destination: Destination) -> None:
    """What a killed writer leaves: listed under the key it was for (a manifest's too), removable,
    and never among the complete objects."""
    await destination.write(KEY, from_bytes(b"complete"))
    started = time.time()
    if isinstance(destination, LocalDirectory):
        (destination.root / f"{KEY}.gz.partial-0123456789ab").write_bytes(b"half")
        (destination.root / f"{KEY}.manifest.json.partial-ba9876543210").write_bytes(b"{")
        (destination.root / "shop/db/x.partial-notrandomhex").write_bytes(b"not one of ours")
    else:
        assert isinstance(destination, S3Destination)
        client = aws_client("s3", destination._endpoint_url or "")
        try:
            upload = client.create_multipart_upload(Bucket=destination.bucket, Key=f"opsbot/{KEY}.gz")
            client.upload_part(
                Bucket=destination.bucket, Key=f"opsbot/{KEY}.gz", UploadId=upload["UploadId"], PartNumber=1, Body=b"x"
            )
        finally:
            client.close()

    found = await destination.partials("shop/")
    assert await destination.partials("blog/") == []
    expected = [f"{KEY}.gz", KEY] if isinstance(destination, LocalDirectory) else [f"{KEY}.gz"]
    assert [p.key for p in found] == expected
    assert all(abs(p.modified.timestamp() - started) < 60 for p in found)  # the last write, not some other time
    for partial in found:
        await destination.remove_partial(partial)
    assert await destination.partials("") == []
    if isinstance(destination, LocalDirectory):  # a name no writer gives is an object like any other
        assert await destination.keys("") == sorted([KEY, "shop/db/x.partial-notrandomhex"])
        with pytest.raises(ValueError, match="is not a partial file"):
            await destination.remove_partial(replace(found[0], ref=KEY))
        assert (destination.root / KEY).exists()
    else:
        assert await destination.keys("") == [KEY]
        assert s3_state(destination)[1] == []
