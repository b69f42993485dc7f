"""Intake: finished uploads enter the watched folder and the ledger here.

Two doors lead in: the SFTP server hands over a closed upload (`finalize_upload`), and the folder
scan adopts files that reached `watch/<user>/` some other way or while the service was down
(`scan_watch`). Both end in `_admit`: a photo whose bytes this user already delivered is recorded
as a duplicate and not sent again; anything else is recorded as queued and the pipeline is woken.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .killpoints import kill_point
from .layout import Layout, move_durably, unlink_if_same
from .ledger import LedgerThread, Original, Outcome, Remembered, State
from .logs import file_event
from .metrics import Metrics

_HASH_CHUNK = 1 << 20
ABANDONED_SECONDS = 86400.0


def _files_below(top: str, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(POSIX path below `top`, full path) of each regular file; symlinks are not followed and
    hidden folders not entered; a folder that vanishes meanwhile is skipped, as os.walk does."""
    try:
        entries = list(os.scandir(top))
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if not entry.name.startswith("."):
                yield from _files_below(entry.path, f"{prefix}{entry.name}/")
        elif entry.is_file(follow_symlinks=False):
            yield prefix + entry.name, entry.path


def _with_stat(files: list[tuple[str, str, str]]) -> list[tuple[str, str, Path, os.stat_result]]:
    """The files that are still regular files, with their lstat."""
    out = []
    for user, path, full in files:
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            out.append((user, path, Path(full), st))
    return out


def sha1_of_file(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Upload:
    """A closed upload, still in .staging/: where it goes and what the client told us about it."""

    user: str
    path: str  # the client's path below its root, POSIX, no leading /
    staged: Path
    size: int
    sha1: str | None  # None when the writes were not sequential (the hash is then computed here)
    mtime: float | None  # the client's mtime (open attrs or fsetstat), else None


class Intake:
    def __init__(
        self,
        layout: Layout,
        db: LedgerThread,
        metrics: Metrics,
        users: list[str],
        temp_patterns: tuple[str, ...],
        remember_days: int,
        settle_seconds: float,
        wake: Callable[[], None],
    ) -> None:
        self.layout = layout
        self.db = db
        self.metrics = metrics
        self.users = users
        # One regular expression for all patterns: a scan asks this of every file in watch/.
        self._temporary_name = re.compile("|".join(map(fnmatch.translate, temp_patterns)) or "(?!)")
        self.remember_seconds = remember_days * 86400.0
        self.settle_seconds = settle_seconds
        self.wake = wake

    def is_temporary(self, path: str) -> bool:
        """A temporary name is not queued until it is renamed to a final one."""
        name = path.rsplit("/", 1)[-1]
        return bool(self._temporary_name.match(name)) or any(
            part.startswith(".") for part in path.split("/")
        )

    # -- from the SFTP server -----------------------------------------------------------------

    async def finalize_upload(self, up: Upload) -> None:
        """Move a closed upload from .staging/ into watch/ and record it."""
        loop = asyncio.get_running_loop()
        sha1 = up.sha1 or await loop.run_in_executor(None, sha1_of_file, up.staged)
        mtime = up.mtime if up.mtime is not None else time.time()
        temporary = self.is_temporary(up.path)
        # A duplicate is recognised before it touches watch/, so a re-sent copy can never replace
        # an original that a worker is about to read.
        if not temporary:
            earlier = await self._earlier_delivery(up.user, sha1, up.size)
            if earlier is not None:
                await self._record_duplicate(up.user, up.path, sha1, up.size, mtime, earlier)
                up.staged.unlink(missing_ok=True)
                return
        # The file carries the client's mtime, so a rescan after a crash between the rename and
        # the ledger insert below still knows it.
        os.utime(up.staged, (mtime, mtime))
        target = self.layout.watch_file(up.user, up.path)
        kill_point("move_into_watch:before")
        await loop.run_in_executor(None, move_durably, up.staged, target)
        inode = target.stat().st_ino
        # Either insert also drops a waiting row of the same path in its transaction: the newer
        # bytes are the ones to deliver (work already under way is protected by its inode).
        if temporary:
            await self.db(
                lambda db: db.record_received(
                    user=up.user, path=up.path, sha1=sha1, size=up.size, mtime=mtime, inode=inode
                )
            )
            file_event(
                "received",
                user=up.user,
                path=up.path,
                stage="receive",
                outcome="waiting for rename",
                size=up.size,
            )
            return
        await self._queue(up.user, up.path, sha1, up.size, mtime, inode)

    async def rename(self, user: str, old: str, new: str) -> None:
        """The client renames a file or folder in watch/ (RENAME and posix-rename both replace an
        existing target): follow it, and finish a temporary upload.

        Each case is one ledger step, so at no instant is the file in watch/ under its new name
        without a row naming that path (a folder scan in between would adopt it a second time).
        """
        source, target = self.layout.watch_file(user, old), self.layout.watch_file(user, new)
        row = await self.db(lambda db: db.active_for_path(user, old))
        if row is not None and row.state == State.RECEIVED and not self.is_temporary(new):
            await self._finish_temporary(row, new, source, target)
            return
        os.replace(source, target)
        if row is not None:
            await self.db(lambda db: db.follow_rename(row.id, user, new))
        elif target.is_file():
            await self.rename_remembered(user, old, new)

    async def _finish_temporary(self, row: Original, new: str, source: Path, target: Path) -> None:
        earlier = await self._earlier_delivery(row.user, row.sha1, row.size)
        if earlier is not None:
            # A re-sent copy is recognised before it touches its new name: the file there may be
            # the very original of `earlier` that a worker is reading. The copy goes first; a
            # kill before the ledger step leaves a received row without its file, which start-up
            # drops.
            await asyncio.get_running_loop().run_in_executor(
                None, unlink_if_same, source, row.inode
            )
            await self.db(lambda db: db.rename_to_duplicate(row.id, row.user, new, earlier))
            self._log_duplicate(row.user, new, earlier)
            return
        os.replace(source, target)
        await self.db(lambda db: db.rename_to_final(row.id, row.user, new))
        file_event(
            "queued", user=row.user, path=new, stage="receive", outcome="queued", size=row.size
        )
        self.wake()

    async def rename_remembered(self, user: str, old: str, new: str) -> None:
        """A delivered file the client still sees under its old name is renamed."""
        await self.db(lambda db: db.rename_remembered(user, old, new))

    async def set_mtime(self, user: str, path: str, mtime: float) -> bool:
        return await self.db(lambda db: db.set_mtime(user, path, mtime))

    async def removed(self, user: str, path: str) -> None:
        """The client removed a file that was still waiting in watch/: nothing left to deliver."""
        row = await self.db(lambda db: db.active_for_path(user, path))
        if row is not None and row.state in (State.RECEIVED, State.QUEUED):
            await self.db(lambda db: db.remove_waiting(row.id))
            file_event(
                "removed",
                user=user,
                path=path,
                stage="receive",
                outcome="removed by the client before delivery",
            )

    async def forget(self, user: str, path: str) -> bool:
        return await self.db(lambda db: db.forget(user, path))

    async def remembered(self, user: str, path: str) -> Remembered | None:
        since = time.time() - self.remember_seconds
        return await self.db(lambda db: db.remembered(user, path, since))

    async def remembered_in_dir(
        self, user: str, directory: str
    ) -> tuple[dict[str, Remembered], set[str]]:
        since = time.time() - self.remember_seconds
        files = await self.db(lambda db: db.remembered_in_dir(user, directory, since))
        dirs = await self.db(lambda db: db.remembered_dirs(user, directory, since))
        return files, dirs

    # -- shared -------------------------------------------------------------------------------

    async def _admit(
        self,
        user: str,
        path: str,
        target: Path,
        sha1: str,
        size: int,
        mtime: float,
        inode: int | None,
    ) -> None:
        """A complete original already in watch/ (scanned, or copied in by `import`)."""
        earlier = await self._earlier_delivery(user, sha1, size)
        if earlier is not None:
            await self._record_duplicate(user, path, sha1, size, mtime, earlier)
            await asyncio.get_running_loop().run_in_executor(None, unlink_if_same, target, inode)
            return
        await self._queue(user, path, sha1, size, mtime, inode)

    async def _earlier_delivery(self, user: str, sha1: str, size: int) -> Original | None:
        """Count a complete original, and find an earlier original of this user with the same
        bytes (reinstalled phone, reset sync database, renamed file): it is not sent again."""
        self.metrics.received_files.inc()
        self.metrics.received_bytes.inc(size)
        return await self.db(lambda db: db.delivered_with_sha1(user, sha1))

    async def _record_duplicate(
        self, user: str, path: str, sha1: str, size: int, mtime: float, earlier: Original
    ) -> None:
        await self.db(
            lambda db: db.record_duplicate(
                user=user, path=path, sha1=sha1, size=size, mtime=mtime, same_as=earlier
            )
        )
        self._log_duplicate(user, path, earlier)

    def _log_duplicate(self, user: str, path: str, earlier: Original) -> None:
        self.metrics.processed_files.labels(outcome=Outcome.DUPLICATE).inc()
        file_event(
            "duplicate",
            user=user,
            path=path,
            stage="receive",
            outcome="duplicate",
            same_as=earlier.path,
        )

    async def _queue(
        self, user: str, path: str, sha1: str, size: int, mtime: float, inode: int | None
    ) -> None:
        await self.db(
            lambda db: db.record_queued(
                user=user, path=path, sha1=sha1, size=size, mtime=mtime, inode=inode
            )
        )
        file_event("queued", user=user, path=path, stage="receive", outcome="queued", size=size)
        self.wake()

    async def remove_abandoned(self, max_age_seconds: float = ABANDONED_SECONDS) -> int:
        """Forget temporary-name uploads never renamed within a day: the client still has the
        data and will send it again; keeping them would only fill the disk."""
        rows = await self.db(lambda db: db.abandoned_temporaries(time.time() - max_age_seconds))
        for row in rows:
            # The file goes first: a crash before the row's removal leaves a received row
            # without its file, which start-up drops; the other order could leave a file that
            # no row names and no scan takes (a temporary name).
            unlink_if_same(self.layout.watch_file(row.user, row.path), row.inode)
            await self.db(lambda db, r=row: db.drop_abandoned(r.id))
            file_event(
                "abandoned",
                user=row.user,
                path=row.path,
                stage="receive",
                outcome="temporary upload removed after a day",
            )
        return len(rows)

    # -- the folder scan ----------------------------------------------------------------------

    async def scan_watch(self, settle: bool = True) -> int:
        """Adopt complete files in watch/ that the ledger does not know; return how many.

        With `settle`, a file is adopted only once nothing has touched it for `settle_seconds`:
        its ctime moves with every write and every mtime change, so a file still being copied in
        by Samba, FTP or `cp -p` (which sets an old mtime at the end) is never taken half-written.
        """
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, self._walk_watch)
        known = await self.db(lambda db: db.active_paths())
        # Only files the ledger does not know are looked at: a scan during a long backlog must
        # not stat every file still waiting.
        new = [(u, p, f) for u, p, f in found if u in self.users and (u, p) not in known]
        candidates = await loop.run_in_executor(None, _with_stat, new)
        adopted = 0
        for user, path, full, st in candidates:
            if settle and time.time() - st.st_ctime < self.settle_seconds:
                continue
            if full.parent == self.layout.watch:  # a file dropped directly into watch/
                target = self.layout.watch_file(user, path)
                if target.exists():
                    continue
                await loop.run_in_executor(None, move_durably, full, target)
                full = target
            sha1 = await loop.run_in_executor(None, sha1_of_file, full)
            after = full.stat()
            if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                continue  # changed while hashing: the next scan takes it
            file_event(
                "adopted",
                user=user,
                path=path,
                stage="receive",
                outcome="found in watch/",
                size=st.st_size,
            )
            await self._admit(user, path, full, sha1, st.st_size, st.st_mtime, st.st_ino)
            adopted += 1
        return adopted

    def _walk_watch(self) -> list[tuple[str, str, str]]:
        """(user, path, full path) of the regular files in watch/, temporaries left out; names
        only (the directory entries say which are files), no stat."""
        out: list[tuple[str, str, str]] = []
        default_user = self.users[0]
        for entry in os.scandir(self.layout.watch):
            if entry.name.startswith(".") or entry.name == self.layout.undone.name:
                continue
            if entry.is_file(follow_symlinks=False):
                out.append((default_user, entry.name, entry.path))
            elif entry.is_dir(follow_symlinks=False):
                out.extend(
                    (entry.name, rel, full)
                    for rel, full in _files_below(entry.path)
                    if not self.is_temporary(rel)
                )
        return out
