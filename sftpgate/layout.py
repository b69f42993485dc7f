"""Where things live under data_dir, and the two file-system steps every stage shares."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from .accounts import UNDONE_FOLDER


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def watch(self) -> Path:
        return self.root / "watch"

    @property
    def undone(self) -> Path:
        return self.watch / UNDONE_FOLDER

    @property
    def staging(self) -> Path:
        return self.root / ".staging"

    @property
    def work(self) -> Path:
        return self.root / ".work"

    @property
    def ledger(self) -> Path:
        return self.root / "sftpgate.db"

    @property
    def control(self) -> Path:
        """The running service's control socket (control.py)."""
        return self.root / "sftpgate.sock"

    def user_root(self, user: str) -> Path:
        return self.watch / user

    def watch_file(self, user: str, path: str) -> Path:
        return self.watch / user / path

    def undone_file(self, user: str, path: str) -> Path:
        return self.undone / user / path

    def ensure(self, users: list[str]) -> None:
        for d in (self.watch, self.undone, self.staging, self.work):
            d.mkdir(parents=True, exist_ok=True)
        for user in users:
            self.user_root(user).mkdir(exist_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_durably(src: Path, dst: Path) -> None:
    """rename(2) src onto dst (same file system) and make the new directory entry durable."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def unlink_if_same(path: Path, inode: int | None) -> bool:
    """Delete `path` only if it is still the file we recorded: a newer upload may have replaced it."""
    try:
        if inode is None or path.stat().st_ino == inode:
            path.unlink()
            return True
    except FileNotFoundError:
        pass
    return False


LOCK_NAME = "sftpgate.lock"


class DataDirBusy(Exception):
    """Another sftpgate process (serve or import) holds the data folder."""


def lock_data_dir(root: Path) -> int:
    """Hold the data folder exclusively while the returned descriptor is open.

    One writer at a time (the service or an import): two would each believe they own the ledger's
    unfinished rows. The kernel drops the lock when the process dies, even by SIGKILL.
    """
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirBusy(f"{root} is in use by another sftpgate (serve or import)") from None
    return fd
