"""Files and directories (uploads/, config files) as a streamed tar.

Members are named relative to each configured path's parent ("uploads/2024/a.png", "app.yml"),
symlinks are stored as links and never followed. A restore extracts with tarfile's "data" filter
(no absolute names, no "..", no device files) and, on top of it, refuses any member that would
land outside the configured paths, including through a symlink already on disk.
"""

from __future__ import annotations

import os
import sys
import tarfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, cast

from services.backup.base import CHUNK, BackupError, DumpInfo
from services.backup.bridge import read_stream, read_to_end, stream_from_writer


@dataclass
class _Tally:
    """What went into (or came out of) an archive: compared by check()."""

    members: int = 0
    files: int = 0
    bytes: int = 0
    names: list[str] = field(default_factory=list)

    def note(self, member: tarfile.TarInfo) -> tarfile.TarInfo:
        self.members += 1
        if member.isreg():
            self.files += 1
            self.bytes += member.size
        return member

    def stats(self) -> dict[str, int]:
        return {"files": self.files, "bytes": self.bytes, "members": self.members}


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class FilesSource:
    """Some files and directories, kept as they are in a tar archive."""

    kind = "files"
    extension = "tar"

    def __init__(self, paths: Sequence[Path], *, timeout: float) -> None:
        self._paths = [Path(os.path.abspath(path)) for path in paths]
        # Local disk reads have nothing to time out on; kept for the same constructor as other sources.
        self._timeout = timeout
        if not self._paths:
            raise BackupError("no files or directories are configured to back up")
        names = [path.name for path in self._paths]
        if "" in names:
            raise BackupError("the file system root cannot be backed up as files")
        if len(set(names)) != len(names):
            twice = next(name for name in names if names.count(name) > 1)
            raise BackupError(f"two configured paths are both called {twice}: an archive could not tell them apart")
        self._by_name = {path.name: path for path in self._paths}
        self._info = DumpInfo()

    def describe(self) -> str:
        return "files " + ", ".join(str(path) for path in self._paths)

    @property
    def info(self) -> DumpInfo:
        return self._info

    async def dump(self) -> AsyncIterator[bytes]:
        """A tar stream written by tarfile in a worker thread ("w|": never seeks, never whole in memory)."""
        for path in self._paths:
            if not (path.exists() or path.is_symlink()):
                raise BackupError(f"nothing to back up at {path}: no such file or directory")
        tally = _Tally()

        def produce(out: BinaryIO) -> None:
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for path in self._paths:
                    tar.add(path, arcname=path.name, recursive=True, filter=tally.note)

        try:
            async for chunk in stream_from_writer(produce, name="files-dump"):
                yield chunk
        except (OSError, tarfile.TarError) as exc:
            raise BackupError(f"cannot archive the files: {_reason(exc)}") from None
        self._info = DumpInfo(tools={"tarfile": f"Python {sys.version.split()[0]}"}, stats=tally.stats())

    async def check(self, chunks: AsyncIterator[bytes], stats: Mapping[str, Any]) -> str:
        """Every member's data is read (a cut archive fails); counts must equal the manifest's."""

        def survey(source: BinaryIO) -> _Tally:
            tally = _Tally()
            with tarfile.open(fileobj=source, mode="r|") as tar:
                for member in tar:
                    tally.note(member)
                    if member.isreg():
                        data = tar.extractfile(member)
                        if data is not None:
                            while data.read(CHUNK):
                                pass
                read_to_end(cast(BinaryIO, tar.fileobj), padding_only=True)
            return tally

        try:
            tally = await read_stream(chunks, survey, name="files-check")
        except (OSError, tarfile.TarError, ValueError) as exc:
            raise BackupError(f"the files archive is damaged: {_reason(exc)}") from None
        found = tally.stats()
        for key, value in found.items():
            if key in stats and stats[key] != value:
                raise BackupError(f"the files archive holds {value} {key}, its manifest says {stats[key]}")
        return f"archive reads to the end: {tally.files} files, {_human(tally.bytes)}"

    def _destination(self, member: tarfile.TarInfo) -> Path:
        """The parent directory ``member`` is extracted into; refuses names outside the configured paths."""
        parts = PurePosixPath(member.name).parts
        if not parts or parts[0] in ("/", "..") or ".." in parts:
            raise BackupError(f"the archive holds {member.name!r}, which is not inside a configured path")
        configured = self._by_name.get(parts[0])
        if configured is None or (len(parts) > 1 and not configured.is_dir() and configured.exists()):
            raise BackupError(f"the archive holds {member.name!r}, which is not inside a configured path")
        parent = configured.parent
        # Through symlinks already on disk (or extracted a moment ago) it must still land inside.
        landing = os.path.join(os.path.realpath(parent / os.path.dirname(member.name)), os.path.basename(member.name))
        if len(parts) > 1 and not _inside(landing, os.path.realpath(configured)):
            raise BackupError(f"the archive holds {member.name!r}, which would be written outside {configured}")
        return parent

    async def restore(self, chunks: AsyncIterator[bytes]) -> str:
        """Extract over the configured paths (files are overwritten; files not in the archive stay)."""
        for path in self._paths:
            if not path.parent.is_dir():
                raise BackupError(f"cannot restore {path}: the directory {path.parent} does not exist")

        def extract(source: BinaryIO) -> _Tally:
            tally = _Tally()
            with tarfile.open(fileobj=source, mode="r|") as tar:
                for member in tar:
                    parent = self._destination(member)
                    tar.extract(member, path=parent, filter="data")
                    tally.note(member)
                read_to_end(cast(BinaryIO, tar.fileobj), padding_only=True)
            return tally

        try:
            tally = await read_stream(chunks, extract, name="files-restore")
        except (OSError, tarfile.TarError, ValueError) as exc:
            raise BackupError(f"restoring the files failed: {_reason(exc)}") from None
        return f"restored {tally.files} files ({_human(tally.bytes)}) into {', '.join(map(str, self._paths))}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__
