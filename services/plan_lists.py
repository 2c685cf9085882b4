"""Large plans: id lists too long for an approval row, kept beside it as files named by their hash.

A plan that deletes 500,000 queue jobs carries only the list's reference (its sha256), its length and
a sample; the list itself is a gzip'd JSON file in the state directory. The reference is part of the
plan's facts, so the fingerprint covers the exact list, and a file that went missing or was changed
is refused at run time instead of deleting something else.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from services.errors import CommandError

KEEP_SECONDS = 14 * 86400  # longer than any approval waits and runs
_REF = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class PlanList:
    """A saved id list: its reference (sha256 of the list), its length and its first ids."""

    ref: str
    count: int
    sample: tuple[str, ...]


def list_ref(ids: Sequence[str]) -> str:
    """sha256 of the list in a canonical form: the same ids in the same order give the same ref."""
    return hashlib.sha256(json.dumps(list(ids), separators=(",", ":")).encode()).hexdigest()


class PlanLists:
    """The directory where large plans keep their id lists."""

    def __init__(self, root: Path, *, sample: int = 20) -> None:
        self.root = root
        self.sample_size = sample

    def _path(self, ref: str) -> Path:
        return self.root / f"{ref}.json.gz"

    def writer(self) -> PlanListWriter:
        """A list saved as it is found, batch by batch (one too long to hold in memory); the same file and
        reference as ``save`` of the whole list. Use ``async with``: a list not finished is discarded."""
        return PlanListWriter(self)

    async def save(self, ids: Sequence[str]) -> PlanList:
        """Write the list (atomically, once per distinct list) and return its reference."""
        ids = [str(i) for i in ids]
        ref = list_ref(ids)
        await asyncio.to_thread(self._write, ref, ids)
        return PlanList(ref, len(ids), tuple(ids[: self.sample_size]))

    def _write(self, ref: str, ids: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(ref)
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".plan-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=5) as out:
                    out.write(json.dumps(ids, separators=(",", ":")).encode())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        self._sweep()

    def _sweep(self) -> None:
        """Drop lists older than any approval can be (best effort)."""
        cutoff = time.time() - KEEP_SECONDS
        for old in self.root.glob("*.json.gz"):
            with contextlib.suppress(OSError):
                if old.stat().st_mtime < cutoff:
                    old.unlink()

    async def load(self, ref: str) -> list[str]:
        """The list saved under ``ref``; a clear refusal when it is missing or not what was saved."""
        if not _REF.match(ref):
            raise CommandError("The plan's id list reference is not valid; ask for a new plan.")
        return await asyncio.to_thread(self._read, ref)

    def _read(self, ref: str) -> list[str]:
        try:
            with gzip.open(self._path(ref), "rb") as f:
                ids = json.loads(f.read())
        except FileNotFoundError:
            raise CommandError(
                f"The plan's id list ({ref[:12]}…) is not in this bot's state directory any more; ask for a new plan."
            ) from None
        except (OSError, ValueError, EOFError) as exc:
            raise CommandError(f"The plan's id list ({ref[:12]}…) cannot be read ({type(exc).__name__}).") from None
        if not isinstance(ids, list) or list_ref([str(i) for i in ids]) != ref:
            raise CommandError(f"The plan's id list ({ref[:12]}…) is not the list that was approved.")
        return [str(i) for i in ids]

    async def present(self, ref: str) -> str:
        """A fact for drift checks: ``"N ids"`` when the list is there and intact, else why not."""
        try:
            return f"{len(await self.load(ref))} ids"
        except CommandError as exc:
            return exc.message


class PlanListWriter:
    """One id list streamed to the state directory: the canonical JSON (as ``list_ref`` hashes it) is
    gzip'd into a temporary file while its sha256 is computed, then renamed to its reference."""

    def __init__(self, lists: PlanLists) -> None:
        self._lists = lists
        self._hash = hashlib.sha256(b"[")
        self._count = 0
        self._sample: list[str] = []
        self._tmp: str | None = None
        self._raw: IO[bytes] | None = None
        self._out: gzip.GzipFile | None = None

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self._open)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._out is not None:
            await asyncio.to_thread(self._discard)

    @property
    def count(self) -> int:
        return self._count

    def _open(self) -> None:
        self._lists.root.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self._lists.root, prefix=".plan-", suffix=".tmp")
        self._raw = os.fdopen(fd, "wb")
        self._out = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=5)
        self._out.write(b"[")

    async def add(self, ids: Sequence[str]) -> None:
        """Append these ids, in order."""
        if not ids:
            return
        if self._out is None:
            raise RuntimeError("this id list is finished (or was never opened with `async with`)")
        texts = [str(i) for i in ids]
        head = b"," if self._count else b""
        chunk = head + b",".join(json.dumps(t).encode() for t in texts)
        self._hash.update(chunk)
        self._count += len(texts)
        room = self._lists.sample_size - len(self._sample)
        if room > 0:
            self._sample += texts[:room]
        await asyncio.to_thread(self._out.write, chunk)

    async def finish(self) -> PlanList:
        """Close the list and keep it under its reference."""
        if self._out is None:
            raise RuntimeError("this id list is finished (or was never opened with `async with`)")
        self._hash.update(b"]")
        ref = self._hash.hexdigest()
        await asyncio.to_thread(self._close, ref)
        return PlanList(ref, self._count, tuple(self._sample))

    def _close(self, ref: str) -> None:
        out, raw, tmp = self._out, self._raw, self._tmp
        self._out = self._raw = self._tmp = None
        if out is None or raw is None or tmp is None:
            raise RuntimeError("this id list is already finished")
        try:
            out.write(b"]")
            out.close()
            raw.close()
            path = self._lists._path(ref)
            if path.exists():
                os.unlink(tmp)  # the same list was saved before
            else:
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._lists._sweep()

    def _discard(self) -> None:
        out, raw, tmp = self._out, self._raw, self._tmp
        self._out = self._raw = self._tmp = None
        with contextlib.suppress(OSError, ValueError):
            if out is not None:
                out.close()
            if raw is not None:
                raw.close()
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
