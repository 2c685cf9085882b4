"""File deletion under declared roots: find old files, then delete exactly the ones a plan listed.

One service for every command that deletes files (cleanup of old uploads and temp files, log
cleanup, the temp files of a reset). The rules, all enforced with directory file descriptors so a
link swapped in between two steps cannot redirect a walk or a deletion:

- A root is an absolute directory. Links among its parents are the host's own layout and are
  resolved; the root itself must not be a link (its target could change between plan and run).
- Below the root nothing is followed: every directory is opened with ``O_NOFOLLOW`` relative to
  its parent's descriptor, a symbolic link is never followed, never deleted through and never
  deleted itself; it is skipped and reported. Directories on another file system are not entered.
- Paths are relative to the root; one with ``..``, an absolute one or an empty part is refused.
- A plan lists each file with its size, modification time and inode; the run deletes a file only
  if all three are unchanged and it is still a regular file, and reports every other one.
"""

from __future__ import annotations

import errno
import fnmatch
import heapq
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath

from services.errors import CommandError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
SHOWN_SKIPS = 50  # skipped entries remembered by a scan (all are counted)


class RootRefused(CommandError):
    """A root (or a directory under it) cannot be used: missing, not a directory, or a link."""


@dataclass(frozen=True)
class PlannedFile:
    """One file as the plan saw it; the run deletes it only if it is still exactly this."""

    path: str  # relative to the root, "/"-separated
    size: int
    mtime_ns: int
    inode: int

    def stored(self) -> list[str | int]:
        return [self.path, self.size, self.mtime_ns, self.inode]

    @classmethod
    def from_stored(cls, value: Sequence[str | int]) -> PlannedFile:
        path, size, mtime_ns, inode = value
        return cls(str(path), int(size), int(mtime_ns), int(inode))


@dataclass(frozen=True)
class FileScan:
    """The files under a root that a rule selects, oldest first (at most the scan's limit)."""

    root: str  # the root as opened: parents' links resolved
    root_id: str  # "device:inode" of the root directory
    files: tuple[PlannedFile, ...]
    total: int  # every eligible file, also beyond the limit
    total_bytes: int
    skipped: tuple[str, ...]  # "path: why", at most SHOWN_SKIPS
    skipped_total: int

    @property
    def size(self) -> int:
        """Bytes of the planned files."""
        return sum(f.size for f in self.files)

    def more(self) -> str:
        """`` (the oldest N of M; ask again for the rest)`` when the scan's limit cut the plan short."""
        if self.total <= len(self.files):
            return ""
        return f" (the oldest {len(self.files):,} of {self.total:,}; ask again for the rest)"

    def sample(self, n: int) -> str:
        """The first ``n`` planned paths, ``…`` when there are more."""
        return ", ".join(f.path for f in self.files[:n]) + (", …" if len(self.files) > n else "")

    def left_alone(self, n: int) -> str:
        """`` (K left alone: path: why; …)`` for the files the scan refused, or nothing."""
        if not self.skipped_total:
            return ""
        shown = "; ".join(self.skipped[:n]) + (" …" if self.skipped_total > n else "")
        return f" ({self.skipped_total:,} left alone: {shown})"


@dataclass
class FileDeletion:
    """What a run did with the planned files of one root."""

    deleted: list[str] = field(default_factory=list)
    freed: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: why" — changed, gone, a link now, refused


def clean_relative(path: str) -> PurePosixPath:
    """``path`` as a relative path that stays inside its root; RootRefused otherwise."""
    if path in ("", "."):
        return PurePosixPath()
    pure = PurePosixPath(path)
    if pure.is_absolute() or "\\" in path or "\0" in path:
        raise RootRefused(f"`{path}` is not a path relative to its root")
    if any(part in ("..", "") for part in path.split("/")) or ".." in pure.parts:
        raise RootRefused(f"`{path}` leaves its root")
    return PurePosixPath(*[p for p in pure.parts if p != "."])


def _why(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def open_root(root: Path) -> tuple[int, str]:
    """A descriptor of the root directory (the caller closes it) and the root's resolved path."""
    if not root.is_absolute() or not root.name or root.name in (".", ".."):
        raise RootRefused(f"the root `{root}` must be an absolute directory below /")
    parent = os.path.realpath(root.parent)  # the host's own layout (/var → /private/var)
    shown = os.path.join(parent, root.name)
    try:
        parent_fd = os.open(parent, _DIR_FLAGS)
    except OSError as exc:
        raise RootRefused(f"cannot open the parent of the root `{shown}`: {_why(exc)}") from None
    try:
        return _open_dir(parent_fd, root.name, shown), shown
    finally:
        os.close(parent_fd)


def _open_dir(parent_fd: int, name: str, shown: str) -> int:
    """Open the directory ``name`` of ``parent_fd`` without following a link."""
    try:
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as exc:
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise RootRefused(f"`{shown}` is a symbolic link; opsbot never follows links") from None
        if exc.errno == errno.ENOENT:
            raise RootRefused(f"`{shown}` does not exist") from None
        if exc.errno == errno.ENOTDIR:
            raise RootRefused(f"`{shown}` is not a directory") from None
        raise RootRefused(f"cannot open `{shown}`: {_why(exc)}") from None


def _identity(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def root_identity(root: Path) -> tuple[str, str]:
    """The root's resolved path and ``device:inode``: a plan's fact (a replaced root is drift)."""
    fd, shown = open_root(root)
    try:
        return shown, _identity(fd)
    finally:
        os.close(fd)


@contextmanager
def _descend(root_fd: int, shown: str, relative: PurePosixPath) -> Iterator[int]:
    """A descriptor of ``root/relative``, each step opened without following a link."""
    fd = os.dup(root_fd)
    try:
        walked = shown
        for part in relative.parts:
            walked = f"{walked}/{part}"
            child = _open_dir(fd, part, walked)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def scan(
    root: Path,
    *,
    under: str = "",
    match: str = "*",
    older_than: datetime,
    recursive: bool = True,
    limit: int = 1000,
) -> FileScan:
    """Regular files under ``root/under`` whose name matches and whose mtime is before ``older_than``.

    Blocking: run it in a thread. Links and other file systems are skipped and reported.
    """
    relative = clean_relative(under)
    cutoff_ns = int(older_than.timestamp() * 1_000_000_000)
    root_fd, shown = open_root(root)
    keep: list[tuple[int, int, PlannedFile]] = []  # heap of the oldest `limit`: its top is the newest kept
    stack: list[tuple[int, PurePosixPath]] = []
    total = total_bytes = skipped_total = seen = 0
    skipped: list[str] = []

    def skip(path: str, why: str) -> None:
        nonlocal skipped_total
        skipped_total += 1
        if len(skipped) < SHOWN_SKIPS:
            skipped.append(f"{path}: {why}")

    try:
        root_id = _identity(root_fd)
        device = os.fstat(root_fd).st_dev
        with _descend(root_fd, shown, relative) as start_fd:
            stack.append((os.dup(start_fd), relative))
            while stack:
                dir_fd, here = stack.pop()
                try:
                    with os.scandir(dir_fd) as entries:
                        listed = list(entries)
                except OSError as exc:
                    skip(str(here) or ".", f"cannot list: {_why(exc)}")
                    os.close(dir_fd)
                    continue
                try:
                    for entry in sorted(listed, key=lambda e: e.name):
                        path = str(here / entry.name)
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue  # gone since it was listed
                        if stat.S_ISLNK(st.st_mode):
                            if fnmatch.fnmatchcase(entry.name, match) or _points_to_dir(dir_fd, entry.name):
                                skip(path, "a symbolic link, not followed")
                            continue
                        if stat.S_ISDIR(st.st_mode):
                            if not recursive:
                                continue
                            if st.st_dev != device:
                                skip(path, "on another file system, not entered")
                                continue
                            try:
                                stack.append((_open_dir(dir_fd, entry.name, f"{shown}/{path}"), here / entry.name))
                            except RootRefused as exc:
                                skip(path, exc.message)
                            continue
                        if not stat.S_ISREG(st.st_mode) or not fnmatch.fnmatchcase(entry.name, match):
                            continue
                        if st.st_mtime_ns >= cutoff_ns:
                            continue
                        total += 1
                        total_bytes += st.st_size
                        seen += 1  # of equal mtimes, the first found is kept
                        item = (-st.st_mtime_ns, -seen, PlannedFile(path, st.st_size, st.st_mtime_ns, st.st_ino))
                        if len(keep) < limit:
                            heapq.heappush(keep, item)
                        elif limit and item > keep[0]:
                            heapq.heapreplace(keep, item)
                finally:
                    os.close(dir_fd)
    finally:
        for dir_fd, _ in stack:
            os.close(dir_fd)
        os.close(root_fd)
    files = tuple(p for _, _, p in sorted(keep, key=lambda i: (i[2].mtime_ns, i[2].path)))
    return FileScan(shown, root_id, files, total, total_bytes, tuple(skipped), skipped_total)


def _points_to_dir(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def delete_planned(root: Path, root_id: str, files: Sequence[PlannedFile]) -> FileDeletion:
    """Delete exactly these files under ``root``, each only if it is unchanged since the plan.

    Blocking: run it in a thread. Raises RootRefused if the root is gone or is not the one planned.
    """
    root_fd, shown = open_root(root)
    result = FileDeletion()
    opened: dict[PurePosixPath, int | str] = {}  # directory → descriptor, or why it cannot be used
    try:
        if _identity(root_fd) != root_id:
            raise RootRefused(f"the root `{shown}` is not the directory the plan saw (it was replaced)")
        opened[PurePosixPath()] = os.dup(root_fd)
        for planned in files:
            try:
                relative = clean_relative(planned.path)
            except RootRefused as exc:
                result.skipped.append(f"{planned.path}: {exc.message}")
                continue
            if not relative.parts:
                result.skipped.append(f"{planned.path}: not a file")
                continue
            dir_fd = _dir_of(opened, relative.parent, shown)
            if isinstance(dir_fd, str):
                result.skipped.append(f"{planned.path}: {dir_fd}")
                continue
            name = relative.name
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                result.skipped.append(f"{planned.path}: already gone")
                continue
            except OSError as exc:
                result.skipped.append(f"{planned.path}: cannot check it: {_why(exc)}")
                continue
            if not stat.S_ISREG(st.st_mode):
                result.skipped.append(f"{planned.path}: no longer a regular file (a link or directory now)")
                continue
            if (st.st_size, st.st_mtime_ns, st.st_ino) != (planned.size, planned.mtime_ns, planned.inode):
                result.skipped.append(f"{planned.path}: changed since the plan, kept")
                continue
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                result.skipped.append(f"{planned.path}: already gone")
                continue
            except OSError as exc:
                result.skipped.append(f"{planned.path}: cannot delete it: {_why(exc)}")
                continue
            result.deleted.append(planned.path)
            result.freed += st.st_size
    finally:
        for value in opened.values():
            if isinstance(value, int):
                os.close(value)
        os.close(root_fd)
    return result


def _dir_of(opened: dict[PurePosixPath, int | str], directory: PurePosixPath, shown: str) -> int | str:
    """The descriptor of a directory under the root (opened step by step, cached), or why not."""
    if directory in opened:
        return opened[directory]
    parent = _dir_of(opened, directory.parent, shown)
    if isinstance(parent, str):
        opened[directory] = parent
        return parent
    try:
        value: int | str = _open_dir(parent, directory.name, f"{shown}/{directory}")
    except RootRefused as exc:
        value = exc.message
    opened[directory] = value
    return value
