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
