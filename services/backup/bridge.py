"""Bridges between the event loop and the blocking libraries backups use (tarfile, sqlite3, bson).

Those libraries want a file object and block; the pipeline wants async chunks. A worker thread runs
the blocking side and talks to the loop through a small bounded queue, so memory stays near
CHUNK times QUEUE_DEPTH and neither side outruns the other. When one side stops (error, ``aclose``,
cancellation) the queue is *aborted*: the thread's next read or write raises BrokenPipeError, so no
thread is left waiting for a partner that has gone. Every worker is joined before a bridge returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import os
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Generic, TypeVar

from services.backup.base import CHUNK, QUEUE_DEPTH

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

T = TypeVar("T")

TEMP_PREFIX = "opsbot-backup-"
"""Every temporary file or directory a backup makes starts with this (tests look for leftovers)."""


class _Channel(Generic[T]):
    """A bounded FIFO between one worker thread and the event loop, in either direction.

    ``close()`` says the writer is done (the reader still gets what is queued); ``abort()`` says
    stop now: the thread's blocking calls raise BrokenPipeError, the loop's calls return at once.
    """

    def __init__(self, depth: int = QUEUE_DEPTH) -> None:
        self._loop = asyncio.get_running_loop()
        self._depth = depth
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._aborted = False
        self._changed = asyncio.Event()  # the loop side sleeps on this; the thread sets it

    def _wake_loop(self) -> None:
        # The loop may already be gone when a late thread finishes; nobody is waiting then.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._changed.set)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._wake_loop()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._items.clear()
            self._cond.notify_all()
        self._wake_loop()

    # --- worker thread side ---

    def put_blocking(self, item: T) -> None:
        with self._cond:
            while len(self._items) >= self._depth and not self._aborted:
                self._cond.wait()
            if self._aborted:
                raise BrokenPipeError("the reading side of the backup stream has stopped")
            self._items.append(item)
        self._wake_loop()

    def get_blocking(self) -> T | None:
        """The next item, or None once the writer has closed and everything queued was read."""
        with self._cond:
            while not self._items and not self._closed and not self._aborted:
                self._cond.wait()
            if self._aborted:
                raise BrokenPipeError("the writing side of the backup stream has stopped")
            item = self._items.popleft() if self._items else None
        self._wake_loop()
        return item

    # --- event loop side ---

    async def put(self, item: T) -> bool:
        """Queue ``item``, waiting for room; False if the channel was aborted (the thread has gone)."""
        while True:
            self._changed.clear()  # before looking: a change made after the look sets it again
            with self._cond:
                if self._aborted:
                    return False
                if len(self._items) < self._depth:
                    self._items.append(item)
                    self._cond.notify_all()
                    return True
            await self._changed.wait()

    async def get(self) -> T | None:
        """The next item; None at the end or once aborted (the caller then asks the worker why)."""
        while True:
            self._changed.clear()
            with self._cond:
                if self._aborted:
                    return None
                if self._items:
                    item = self._items.popleft()
                    self._cond.notify_all()
                    return item
                if self._closed:
                    return None
            await self._changed.wait()


class _ChannelWriter(io.RawIOBase):
    """The file a worker writes to: each write becomes queued chunks of at most CHUNK bytes."""

    def __init__(self, channel: _Channel[bytes]) -> None:
        super().__init__()
        self._channel = channel

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK):
            self._channel.put_blocking(bytes(view[start : start + CHUNK]))
        return len(view)


class _ChannelReader(io.RawIOBase):
    """The file a worker reads from, fed with chunks by the event loop."""

    def __init__(self, channel: _Channel[bytes]) -> None:
        super().__init__()
        self._channel = channel
        self._pending = memoryview(b"")
        self._at_end = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        while not self._pending:
            if self._at_end:
                return 0
            item = self._channel.get_blocking()
            if item is None:
                self._at_end = True
                return 0
            self._pending = memoryview(item)
        target = memoryview(buffer).cast("B")
        size = min(len(target), len(self._pending))
        target[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a worker's or feeder's exception as seen: it is reported through another path."""
    if not future.cancelled():
        future.exception()


def _start_worker(work: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run ``work`` in a thread of its own and return a future for its outcome.

    A dedicated thread, not the default executor: a worker may wait a long time on its queue, and
    a few of them must not starve the short ``to_thread`` calls the rest of the pipeline makes.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    future.add_done_callback(_retrieve)
    context = contextvars.copy_context()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result = context.run(work)
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(settle, None, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=f"opsbot-{name}", daemon=True).start()
    return future


async def _join(worker: asyncio.Future[Any]) -> None:
    """Wait until the worker thread has ended; its outcome is not ours to report here.

    Shielded, so a second cancellation while waiting leaves the (already aborted) worker to finish
    on its own instead of cancelling the future it will set.
    """
    with contextlib.suppress(Exception):
        await asyncio.shield(worker)


async def in_thread(work: Callable[[], T], *, stop: Callable[[], None] | None = None, name: str = "worker") -> T:
    """``work()`` in a thread of its own. If the caller is cancelled, ``stop()`` asks the work to end
    (a flag it polls, ``sqlite3.Connection.interrupt``) and the thread is awaited before re-raising,
    so nothing it still holds (a temporary file) is removed under its feet."""
    worker = _start_worker(work, name)
    try:
        return await asyncio.shield(worker)
    except asyncio.CancelledError:
        if stop is not None:
            stop()
        await _join(worker)
        raise


async def stream_from_writer(produce: Callable[[BinaryIO], None], *, name: str = "writer") -> AsyncIterator[bytes]:
    """``produce(out)`` runs in a worker thread; what it writes to ``out`` comes out as chunks.

    Its exception propagates to the reader. If the reader stops early, the producer's next write
    raises BrokenPipeError and the thread ends before this generator finishes closing.
    """
    channel: _Channel[bytes] = _Channel()

    def work() -> None:
        out = io.BufferedWriter(_ChannelWriter(channel), buffer_size=CHUNK)
        try:
            produce(out)
            out.flush()
        except BaseException:
            channel.abort()
            raise
        finally:
            with contextlib.suppress(OSError, ValueError):  # after an abort the flush in close() fails
                out.close()
            channel.close()

    worker = _start_worker(work, name)
    try:
        while (chunk := await channel.get()) is not None:
            yield chunk
        await worker  # the producer's own exception, if it had one
    finally:
        channel.abort()
        await _join(worker)


async def _close_input(chunks: AsyncIterable[bytes]) -> None:
    closer = getattr(chunks, "aclose", None)
    if closer is not None:
        await closer()


async def parse_stream(
    chunks: AsyncIterable[bytes], parse: Callable[[BinaryIO], Iterator[T]], *, name: str = "reader"
) -> AsyncIterator[T]:
    """Run the blocking ``parse(source)`` in a worker thread, ``source`` being a file fed from
    ``chunks``, and yield what it yields (at most QUEUE_DEPTH items wait between the two).

    ``chunks`` is read to its end or closed. An error of ``chunks`` wins over the parser's (which
    then only saw its input break off); if the consumer stops early, the parser's next read or
    yield raises BrokenPipeError and the thread ends before this generator finishes closing.
    """
    inbox: _Channel[bytes] = _Channel()
    outbox: _Channel[T] = _Channel()

    def work() -> None:
        source = io.BufferedReader(_ChannelReader(inbox), buffer_size=CHUNK)
        try:
            for item in parse(source):
                outbox.put_blocking(item)
        except BaseException:
            outbox.abort()
            raise
        finally:
            inbox.abort()  # nobody reads any more: the feeder stops at its next chunk
            outbox.close()
            source.close()

    async def feed() -> None:
        try:
            async for chunk in chunks:
                if chunk and not await inbox.put(chunk):
                    return
            inbox.close()
        except BaseException:
            inbox.abort()
            raise
        finally:
            await _close_input(chunks)

    worker = _start_worker(work, name)
    feeder = asyncio.create_task(feed(), name=f"opsbot-{name}-feeder")
    feeder.add_done_callback(_retrieve)
    try:
        while (item := await outbox.get()) is not None:
            yield item
        await asyncio.wait([worker])
        if feeder.done() and not feeder.cancelled() and (broken := feeder.exception()) is not None:
            raise broken
        await worker
    finally:
        inbox.abort()
        outbox.abort()
        feeder.cancel()
        await _join(worker)
        await asyncio.wait([feeder])  # its outcome was taken above, or does not matter any more


async def read_stream(chunks: AsyncIterable[bytes], consume: Callable[[BinaryIO], T], *, name: str = "reader") -> T:
    """Run the blocking ``consume(source)`` in a worker thread over ``chunks`` and return its result."""

    def parse(source: BinaryIO) -> Iterator[T]:
        yield consume(source)

    results = [item async for item in parse_stream(chunks, parse, name=name)]
    return results[0]


def read_to_end(source: BinaryIO, *, padding_only: bool = False) -> None:
    """Read ``source`` to its end (so the stream feeding it is consumed). With ``padding_only``, what
    is left must be zeros: a tar reader stops quietly at a damaged header, this makes it loud."""
    while block := source.read(CHUNK):
        if padding_only and block.strip(b"\0"):
            raise ValueError("there is data after the end of the archive (a damaged header?)")


@contextlib.asynccontextmanager
async def private_dir() -> AsyncIterator[Path]:
    """A temporary directory only this user can read (0700), removed with everything in it."""
    path = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
    try:
        yield path
    finally:
        # Removed by this thread, even when cancelled, so no copy of the data is left behind.
        shutil.rmtree(path, ignore_errors=True)


async def write_file(path: Path, chunks: AsyncIterable[bytes]) -> int:
    """Write ``chunks`` to a new private file (writes in a thread); return the number of bytes."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    total = 0
    with os.fdopen(descriptor, "wb") as out:
        async for chunk in chunks:
            await asyncio.to_thread(out.write, chunk)
            total += len(chunk)
    return total


@contextlib.asynccontextmanager
async def spooled(chunks: AsyncIterable[bytes], *, suffix: str = "") -> AsyncIterator[Path]:
    """``chunks`` written to a private temporary file, for tools that need a real file (sqlite3);
    the file, and anything made next to it (a -journal), is removed on exit."""
    async with private_dir() as directory:
        path = directory / f"artifact{suffix}"
        try:
            await write_file(path, chunks)
        finally:
            await _close_input(chunks)
        yield path


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    """A file's bytes as chunks of CHUNK, each read in a thread."""
    with path.open("rb") as source:
        while chunk := await asyncio.to_thread(source.read, CHUNK):
            yield chunk
