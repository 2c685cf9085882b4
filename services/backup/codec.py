"""Streaming compression of artifacts (zstd, gzip or none) and a byte meter for progress.

Compression runs one chunk at a time in a worker thread: zlib and zstd release the GIL, so a
multi-GB backup keeps the event loop free. Output is coalesced to about ``CHUNK`` bytes so the
stages after this one see few, large pieces.
"""

from __future__ import annotations

import asyncio
import hashlib
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Literal, Protocol

import zstandard

from services.backup.base import CHUNK, BackupError

Codec = Literal["zstd", "gzip", "none"]

DEFAULT_LEVEL: dict[Codec, int] = {"zstd": 3, "gzip": 6, "none": 0}
_SUFFIX: dict[Codec, str] = {"zstd": ".zst", "gzip": ".gz", "none": ""}
_GZIP_WBITS = 31  # zlib's "gzip header and trailer" mode: the output is a plain .gz file
# zstd can't cap the output of one decompress call, so it is fed slices this big: even a very
# compressible slice inflates to a bounded amount (zlib is capped exactly with max_length).
_ZSTD_SLICE = 128 << 10


def suffix(codec: Codec) -> str:
    """The file name suffix of a codec's output: ``".zst"``, ``".gz"`` or ``""``."""
    return _SUFFIX[codec]


async def close_stream(chunks: AsyncIterator[bytes]) -> None:
    """Close an async generator (or anything with ``aclose``) we stopped reading, so the source
    behind it kills its child process now rather than when the garbage collector gets to it."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


async def _coalesce(chunks: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
    """Join small pieces until at least ``size`` bytes; big pieces pass through without a copy."""
    pending: list[bytes] = []
    pending_size = 0
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            if not pending and len(chunk) >= size:
                yield chunk
                continue
            pending.append(chunk)
            pending_size += len(chunk)
            if pending_size >= size:
                yield b"".join(pending)
                pending.clear()
                pending_size = 0
        if pending:
            yield b"".join(pending)
    finally:
        await close_stream(chunks)


class _Output:
    """Collects output pieces and hands them out as one piece once there are ``CHUNK`` bytes."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self._size = 0

    def add(self, piece: bytes) -> None:
        if piece:
            self._pieces.append(piece)
            self._size += len(piece)

    def full(self) -> bool:
        return self._size >= CHUNK

    def take(self) -> bytes:
        data = self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces)
        self._pieces.clear()
        self._size = 0
        return data

    def __bool__(self) -> bool:
        return self._size > 0


class _Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


def _compressor(codec: Codec, level: int) -> _Compressor:
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj()
    return zlib.compressobj(level, zlib.DEFLATED, _GZIP_WBITS)


async def compress(chunks: AsyncIterator[bytes], codec: Codec, *, level: int | None = None) -> AsyncIterator[bytes]:
    """The chunks compressed with ``codec`` (zstd level 3 and gzip level 6 unless ``level`` says).

    The output is a complete .zst or .gz stream that ``zstd -d`` / ``gzip -d`` read.
    """
    source = _coalesce(chunks, CHUNK)
    try:
        if codec == "none":
            async for chunk in source:
                yield chunk
            return
        compressor = _compressor(codec, DEFAULT_LEVEL[codec] if level is None else level)
        out = _Output()
        async for chunk in source:
            out.add(await asyncio.to_thread(compressor.compress, chunk))
            if out.full():
                yield out.take()
        out.add(await asyncio.to_thread(compressor.flush))
        if out:
            yield out.take()
    finally:
        await close_stream(source)


class _Inflater(Protocol):
    """A streaming decompressor: ``feed`` yields output pieces of bounded size.

    Concatenated streams (several gzip members or zstd frames) are read one after the other, as
    ``gzip -d`` and ``zstd -d`` do.
    """

    def feed(self, data: bytes) -> Iterator[bytes]: ...

    @property
    def complete(self) -> bool:
        """True when the input so far ends exactly at the end of a stream."""
        ...


class _GzipInflater:
    def __init__(self) -> None:
        self._obj = zlib.decompressobj(_GZIP_WBITS)
        self._started = False

    @property
    def complete(self) -> bool:
        return self._started and self._obj.eof

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            self._started = True
            yield self._obj.decompress(data, CHUNK)  # at most CHUNK bytes out per call
            if not self._obj.eof:
                data = self._obj.unconsumed_tail
            elif data := self._obj.unused_data:
                self._obj = zlib.decompressobj(_GZIP_WBITS)


class _ZstdInflater:
    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._started = False

    @property
    def complete(self) -> bool:
        return self._started and self._obj.eof

    def feed(self, data: bytes) -> Iterator[bytes]:
        for start in range(0, len(data), _ZSTD_SLICE):
            piece = data[start : start + _ZSTD_SLICE]
            while piece:
                self._started = True
                yield self._obj.decompress(piece)
                piece = self._obj.unused_data if self._obj.eof else b""
                if piece:
                    self._obj = self._dctx.decompressobj()


def _pull(pieces: Iterator[bytes]) -> tuple[list[bytes], bool]:
    """Run a decompressor until it has about CHUNK bytes of output (one thread hop per CHUNK);
    also says whether its input is used up."""
    got: list[bytes] = []
    size = 0
    for piece in pieces:
        if piece:
            got.append(piece)
            size += len(piece)
            if size >= CHUNK:
                return got, False
    return got, True


async def decompress(chunks: AsyncIterator[bytes], codec: Codec) -> AsyncIterator[bytes]:
    """The original bytes of a stream made by :func:`compress`; BackupError if it is not valid."""
    source = _coalesce(chunks, CHUNK)
    try:
        if codec == "none":
            async for chunk in source:
                yield chunk
            return
        inflater: _Inflater = _ZstdInflater() if codec == "zstd" else _GzipInflater()
        out = _Output()
        async for chunk in source:
            pieces = inflater.feed(chunk)
            try:
                done = False
                while not done:
                    got, done = await asyncio.to_thread(_pull, pieces)
                    for piece in got:
                        out.add(piece)
                    if out.full():
                        yield out.take()
            except (zlib.error, zstandard.ZstdError) as exc:
                raise BackupError(f"The data is not valid {codec} data ({_reason(exc)}).") from exc
        if not inflater.complete:
            raise BackupError(f"The data is not valid {codec} data (it ends in the middle of the compressed stream).")
        if out:
            yield out.take()
    finally:
        await close_stream(source)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for noise in ("zstd decompressor error: ", "Error -3 while decompressing data: "):
        text = text.removeprefix(noise)
    return text[:120]


class Meter:
    """Passes a chunk stream through unchanged, counting its bytes (``size``, for progress) and,
    when asked, hashing them (``sha256``) — used on the raw artifact, before compression."""

    def __init__(self, chunks: AsyncIterator[bytes], *, sha256: bool = False) -> None:
        self._chunks = chunks
        self._hash = hashlib.sha256() if sha256 else None
        self.size = 0
        self.done = False  # the stream was read to its end

    def __aiter__(self) -> Meter:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self.done = True
            raise
        self.size += len(chunk)
        if self._hash is not None:
            # sha256 runs at over 1 GB/s: a 1 MiB chunk costs under a millisecond, less than
            # handing it to a thread would.
            self._hash.update(chunk)
        return chunk

    async def aclose(self) -> None:
        """Close the stream underneath (see :func:`close_stream`)."""
        await close_stream(self._chunks)

    @property
    def sha256(self) -> str | None:
        """Hex sha256 of the bytes seen so far, or None if hashing was not asked for."""
        return self._hash.hexdigest() if self._hash is not None else None
