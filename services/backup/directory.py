"""A local directory as a backup destination (the embedded default).

An object is written to ``<key>.partial-<random>`` beside its final name, fsynced and renamed, so
``<key>`` only ever names a complete file. Files are 0600 and directories 0700: backups hold
whole databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import re
import secrets
import stat
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, TypeVar

from services.backup.base import CHUNK, BackupError, Partial, Stored, manifest_key
from services.backup.codec import close_stream

_PARTIAL = re.compile(r"\.partial-[0-9a-f]{12}$")
_MANIFEST_SUFFIX = manifest_key("")
_T = TypeVar("_T")


def check_key(key: str, *, prefix: bool = False) -> str:
    """A key is a relative path of plain names ("shop/db/x.dump.zst"); anything that could reach
    outside the destination ("..", an absolute path) is refused with ValueError. With ``prefix``
    an empty key and a trailing "/" are allowed."""
    if "\\" in key or "\0" in key:
        raise ValueError(f"backup key {key!r} contains a backslash or NUL")
    if key.startswith("/"):
        raise ValueError(f"backup key {key!r} must be relative")
    parts = key.split("/")
    if prefix and parts[-1] == "":
        parts = parts[:-1]
    if not parts and prefix:
        return key
    if not parts or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"backup key {key!r} must be a relative path without '.', '..' or empty parts")
    return key


def _opener(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _makedirs(root: Path, directory: Path) -> None:
    """mkdir -p with mode 0700 on every level (Path.mkdir(parents=True) ignores mode for parents)."""
    missing: list[Path] = []
    current = directory
    while not current.is_dir():
        missing.append(current)
        if current == root or current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: fsync the directory that holds the new name."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _blocking(func: Callable[..., _T], *args: object) -> _T:
    """Run file work in a thread; if cancelled, let the thread finish with the file first so the
    clean-up that follows never closes a file a thread is still writing."""
    future = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled() and future.exception() is None:
            result = future.result()
            if isinstance(result, io.IOBase):
                result.close()  # opened just as we were cancelled: nobody else will close it
        raise


class LocalDirectory:
    """Backups as files under ``root``."""

    kind = "directory"

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = Path(root).absolute()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*PurePosixPath(check_key(key)).parts)

    def location(self, key: str) -> str:
        """The absolute path of the object."""
        return str(self._path(key))

    async def write(self, key: str, chunks: AsyncIterator[bytes]) -> Stored:
        """Stream to a partial file, then fsync and rename it to its key (see module docstring)."""
        final = self._path(key)
        partial = final.with_name(f"{final.name}.partial-{secrets.token_hex(6)}")
        digest = hashlib.sha256()
        size = 0

        def start() -> IO[bytes]:
            _makedirs(self.root, final.parent)
            return open(partial, "xb", opener=_opener)

        def put(file: IO[bytes], chunk: bytes) -> None:
            digest.update(chunk)
            file.write(chunk)

        def finish(file: IO[bytes]) -> None:
            file.flush()
            os.fsync(file.fileno())
            file.close()
            os.replace(partial, final)
            _fsync_dir(final.parent)

        file: IO[bytes] | None = None
        try:
            file = await _blocking(start)
            async for chunk in chunks:
                await _blocking(put, file, chunk)
                size += len(chunk)
            await _blocking(finish, file)
        except BaseException as exc:
            # Synchronous on purpose: a second cancellation must not skip it, and it is two syscalls.
            if file is not None:
                with contextlib.suppress(OSError):
                    file.close()
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            await close_stream(chunks)
            if isinstance(exc, OSError):
                raise BackupError(f"Could not write {final}: {exc.strerror or type(exc).__name__}.") from None
            raise
        return Stored(key=key, size=size, sha256=digest.hexdigest())

    async def put_manifest(self, key: str, data: bytes) -> None:
        """Write ``<key>.manifest.json`` through a temporary file, fsync and rename."""
        final = self._path(manifest_key(key))
        partial = final.with_name(f"{final.name}.partial-{secrets.token_hex(6)}")

        def put() -> None:
            _makedirs(self.root, final.parent)
            try:
                with open(partial, "xb", opener=_opener) as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(partial, final)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            _fsync_dir(final.parent)

        await _blocking(put)

    async def read(self, key: str) -> AsyncIterator[bytes]:
        """The file's bytes in chunks of CHUNK; BackupError if there is no such object."""
        path = self._path(key)

        def start() -> IO[bytes]:
            return open(path, "rb")

        try:
            file = await _blocking(start)
        except FileNotFoundError:
            raise BackupError(f"There is no backup {key} in {self.root}.") from None
        except OSError as exc:
            raise BackupError(f"Could not open {path}: {exc.strerror or type(exc).__name__}.") from None
        try:
            while chunk := await _blocking(file.read, CHUNK):
                yield chunk
        finally:
            file.close()

    async def read_manifest(self, key: str) -> bytes | None:
        """The manifest of ``key``, or None if it has none."""
        path = self._path(manifest_key(key))
        try:
            return await _blocking(path.read_bytes)
        except FileNotFoundError:
            return None

    async def delete(self, key: str) -> None:
        """Remove the object and its manifest; missing ones are fine."""
        paths = [self._path(key), self._path(manifest_key(key))]

        def remove() -> None:
            for path in paths:
                path.unlink(missing_ok=True)

        await _blocking(remove)

    async def keys(self, prefix: str) -> list[str]:
        """Complete objects whose key starts with ``prefix`` (a string prefix, as in S3), sorted."""
        top = self._top(prefix)  # walk only the directory the prefix names

        def walk() -> list[str]:
            found: list[str] = []
            for parent, dirs, files in os.walk(top):
                dirs.sort()
                base = Path(parent).relative_to(self.root).as_posix()
                for name in files:
                    if _PARTIAL.search(name) or name.endswith(_MANIFEST_SUFFIX):
                        continue
                    key = name if base == "." else f"{base}/{name}"
                    if key.startswith(prefix):
                        found.append(key)
            return sorted(found)

        return await _blocking(walk)

    def _top(self, prefix: str) -> Path:
        """The deepest directory ``prefix`` names (its last part may be the start of a name)."""
        check_key(prefix, prefix=True)
        directory = prefix.rpartition("/")[0]
        return self.root.joinpath(*PurePosixPath(directory).parts) if directory else self.root

    async def partials(self, prefix: str) -> list[Partial]:
        """The ``….partial-*`` files (objects and manifests) whose key starts with ``prefix``; their
        time is the file's mtime, which a live writer moves with every chunk."""
        top = self._top(prefix)

        def walk() -> list[Partial]:
            found: list[Partial] = []
            for parent, dirs, files in os.walk(top):
                dirs.sort()
                base = Path(parent).relative_to(self.root).as_posix()
                for name in files:
                    match = _PARTIAL.search(name)
                    if match is None:
                        continue
                    ref = name if base == "." else f"{base}/{name}"
                    key = ref[: len(ref) - len(match.group())].removesuffix(_MANIFEST_SUFFIX)
                    if not key.startswith(prefix):
                        continue
                    try:
                        info = os.lstat(os.path.join(parent, name))
                    except FileNotFoundError:  # its writer renamed or removed it just now
                        continue
                    if stat.S_ISREG(info.st_mode):
                        path = str(Path(parent, name))
                        found.append(Partial(key, ref, path, datetime.fromtimestamp(info.st_mtime, UTC)))
            return sorted(found, key=lambda p: p.ref)

        return await _blocking(walk)

    async def remove_partial(self, partial: Partial) -> None:
        """Delete one partial file; a name that is not a partial one is refused (ValueError)."""
        if _PARTIAL.search(partial.ref) is None:
            raise ValueError(f"{partial.ref!r} is not a partial file")
        path = self._path(partial.ref)
        await _blocking(lambda: path.unlink(missing_ok=True))

    async def close(self) -> None:
        """Nothing to release."""
