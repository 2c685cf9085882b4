"""File deletion under declared roots, against real directories with real symbolic links."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.files import FileScan, PlannedFile, RootRefused, clean_relative, delete_planned, root_identity, scan

NOW = datetime.now(UTC)
CUTOFF = NOW - timedelta(days=30)


def make(path: Path, *, days: float, data: bytes = b"x") -> Path:
    """A file last modified ``days`` ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    moment = (NOW - timedelta(days=days)).timestamp()
    os.utime(path, (moment, moment))
    return path


def paths(found: FileScan) -> list[str]:
    return [f.path for f in found.files]


@pytest.fixture
def uploads(tmp_path: Path) -> Path:
    root = tmp_path / "uploads"
    make(root / "generated" / "a.png", days=40)
    make(root / "generated" / "b.png", days=35, data=b"bb")
    make(root / "generated" / "new.png", days=2)
    make(root / "generated" / "notes.txt", days=90)
    make(root / "generated" / "2024" / "c.png", days=45)
    return root


def test_a_scan_lists_old_matching_files_oldest_first(uploads: Path) -> None:
    found = scan(uploads, under="generated", match="*.png", older_than=CUTOFF)

    assert paths(found) == ["generated/2024/c.png", "generated/a.png", "generated/b.png"]
    assert found.total == 3 and found.total_bytes == 4
    assert found.root == str(uploads) and found.skipped == ()
    shallow = scan(uploads, under="generated", match="*.png", older_than=CUTOFF, recursive=False)
    assert paths(shallow) == ["generated/a.png", "generated/b.png"]


def test_the_limit_keeps_the_oldest_and_still_counts_all(uploads: Path) -> None:
    found = scan(uploads, match="*.png", older_than=CUTOFF, limit=2)

    assert paths(found) == ["generated/2024/c.png", "generated/a.png"]
    assert found.total == 3


def test_links_are_never_followed_nor_planned(uploads: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    secret = make(outside / "secret.png", days=400)
    make(outside / "deep" / "old.png", days=400)
    (uploads / "generated" / "escape.png").symlink_to(secret)  # a file link pointing outside
    (uploads / "generated" / "elsewhere").symlink_to(outside)  # a directory link pointing outside
    (uploads / "generated" / "inner.png").symlink_to(uploads / "generated" / "a.png")  # a link inside
    os.utime(uploads / "generated" / "escape.png", (0, 0), follow_symlinks=False)

    found = scan(uploads, under="generated", match="*.png", older_than=CUTOFF)

    assert paths(found) == ["generated/2024/c.png", "generated/a.png", "generated/b.png"]
    assert sorted(found.skipped) == [
        "generated/elsewhere: a symbolic link, not followed",
        "generated/escape.png: a symbolic link, not followed",
        "generated/inner.png: a symbolic link, not followed",
    ]
    assert found.skipped_total == 3


def test_a_root_that_is_a_link_is_refused(uploads: Path, tmp_path: Path) -> None:
    link = tmp_path / "uploads-link"
    link.symlink_to(uploads)

    with pytest.raises(RootRefused, match="is a symbolic link; opsbot never follows links"):
        scan(link, match="*.png", older_than=CUTOFF)
    with pytest.raises(RootRefused, match="is a symbolic link"):
        root_identity(link)


def test_links_among_the_parents_of_a_root_are_the_hosts_layout(uploads: Path, tmp_path: Path) -> None:
    (tmp_path / "srv").symlink_to(tmp_path)

    found = scan(tmp_path / "srv" / "uploads", under="generated", match="a.png", older_than=CUTOFF)

    assert found.root == str(uploads) and paths(found) == ["generated/a.png"]


def test_a_directory_under_the_root_that_is_a_link_is_refused(uploads: Path, tmp_path: Path) -> None:
    make(tmp_path / "outside" / "x.png", days=400)
    (uploads / "cache").symlink_to(tmp_path / "outside")

    with pytest.raises(RootRefused, match="cache` is a symbolic link"):
        scan(uploads, under="cache", older_than=CUTOFF)


@pytest.mark.parametrize("path", ["../etc", "a/../../b", "/etc", "a//b", "a\\b"])
def test_a_path_that_leaves_its_root_is_refused(path: str) -> None:
    with pytest.raises(RootRefused):
        clean_relative(path)


def test_missing_roots_and_files_as_roots_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RootRefused, match="does not exist"):
        scan(tmp_path / "nope", older_than=CUTOFF)
    make(tmp_path / "file", days=1)
    with pytest.raises(RootRefused, match="is not a directory"):
        scan(tmp_path / "file", older_than=CUTOFF)
    with pytest.raises(RootRefused, match="absolute directory below /"):
        scan(Path("/"), older_than=CUTOFF)


def test_the_run_deletes_exactly_the_unchanged_planned_files(uploads: Path, tmp_path: Path) -> None:
    found = scan(uploads, match="*.png", older_than=CUTOFF)
    generated = uploads / "generated"
    # After the plan: one file grows, one is touched, one appears old enough, one becomes a link.
    (generated / "b.png").write_bytes(b"bbbb")
    os.utime(generated / "b.png", ns=(found.files[2].mtime_ns, found.files[2].mtime_ns))
    make(generated / "late.png", days=60)
    outside = make(tmp_path / "outside.png", days=400)
    (generated / "2024" / "c.png").unlink()
    (generated / "2024" / "c.png").symlink_to(outside)

    done = delete_planned(uploads, found.root_id, found.files)

    assert done.deleted == ["generated/a.png"] and done.freed == 1
    assert done.skipped == [
        "generated/2024/c.png: no longer a regular file (a link or directory now)",
        "generated/b.png: changed since the plan, kept",
    ]
    assert not (generated / "a.png").exists()
    assert (generated / "b.png").read_bytes() == b"bbbb" and (generated / "late.png").exists()
    assert outside.exists() and (generated / "2024" / "c.png").is_symlink()


def test_a_file_touched_after_the_plan_is_kept(uploads: Path) -> None:
    found = scan(uploads, under="generated", match="a.png", older_than=CUTOFF)
    os.utime(uploads / "generated" / "a.png")  # same size, new mtime

    done = delete_planned(uploads, found.root_id, found.files)

    assert done.deleted == [] and done.skipped == ["generated/a.png: changed since the plan, kept"]


def test_a_directory_swapped_for_a_link_after_the_plan_deletes_nothing_through_it(
    uploads: Path, tmp_path: Path
) -> None:
    found = scan(uploads, under="generated", match="*.png", older_than=CUTOFF)
    outside = tmp_path / "outside"
    (uploads / "generated").rename(outside)  # same files, same inodes, now outside the root
    (uploads / "generated").symlink_to(outside)

    done = delete_planned(uploads, found.root_id, found.files)

    assert done.deleted == []
    assert {line.split(": ", 1)[1] for line in done.skipped} == {f"`{uploads}/generated` is a symbolic link; "
                                                                   "opsbot never follows links"}  # fmt: skip
    assert sorted(p.name for p in outside.rglob("*.png")) == ["a.png", "b.png", "c.png", "new.png"]


def test_a_root_replaced_after_the_plan_is_refused(uploads: Path, tmp_path: Path) -> None:
    found = scan(uploads, match="*.png", older_than=CUTOFF)
    uploads.rename(tmp_path / "old-uploads")
    make(uploads / "generated" / "a.png", days=40)

    with pytest.raises(RootRefused, match="not the directory the plan saw"):
        delete_planned(uploads, found.root_id, found.files)
    assert (uploads / "generated" / "a.png").exists()


def test_planned_paths_that_leave_the_root_are_refused_at_run_time(uploads: Path, tmp_path: Path) -> None:
    victim = make(tmp_path / "victim.png", days=400)
    st = victim.stat()
    forged = PlannedFile("../victim.png", st.st_size, st.st_mtime_ns, st.st_ino)

    done = delete_planned(uploads, root_identity(uploads)[1], [forged])

    assert done.deleted == [] and done.skipped == ["../victim.png: `../victim.png` leaves its root"]
    assert victim.exists()
