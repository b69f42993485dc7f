"""The file system one SFTP user sees: its own tree, jailed in watch/<user>/.

Uploads never write into watch/ directly. Opening a file for writing creates a part in .staging/;
the SHA-1 is updated as the bytes arrive; the client's CLOSE fsyncs the part and hands it to the
intake, which renames it into watch/<user>/<path>. Files that went on to Immich stay visible
("remembered") with the size and mtime the client gave them, so sync apps never send them again.

The jail: every client path is normalised against "/" (so `..` cannot climb out), must not contain
NUL, and may not pass through a symbolic link; symlink and hard-link requests are refused.
Clients cannot chown, cannot take their own or the server's access away with chmod (owner read
and write always stay, group/other write never comes), and cannot remove their root.

Resume: an upload cut off before the client's CLOSE is parked in data_dir/.resume/ (PartStore) for
`sftp.resume_keep_seconds`. It shows in stat and listings with the size that arrived, and an open
for writing without TRUNC (OpenSSH `reput`, lftp `put -c`: WRITE|APPEND|CREAT) continues it; an
open with TRUNC or a remove drops it. Nothing of it is in watch/ until a CLOSE finishes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import hashlib
import inspect
import json
import os
import posixpath
import shutil
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncssh
from asyncssh import SFTPAttrs, SFTPName

from ..intake import Intake, Upload
from ..killpoints import kill_point
from ..layout import Layout
from ..ledger import Remembered
from ..logs import event, file_event

MAX_PATH_BYTES = 4096
_FILE_MODE = 0o100644
_DIR_MODE = 0o040755


class UploadFile:
    """An open upload: a part in .staging/ plus the running SHA-1 of what arrived in order.

    The event loop only writes. Two jobs on the loop's executor follow behind it: one reads what
    arrived back from the page cache, HASH_CHUNK at a time, and hashes it; the other fdatasyncs
    the part whenever SYNC_EVERY new bytes are waiting. These calls release the GIL, so hashing
    (a fifth of the loop's time when it hashed each WRITE itself) runs on the other core, and
    the fsync the client waits for at CLOSE has only the last bytes left: its cost is the disk
    flushing what it was sent (12 ms for a 5 MiB photo here, 1.1 s for 1 GiB at the end), and a
    job that flushes while the rest still arrives takes that off the client's clock. The sync
    job does not wait for the hash (a flush waiting behind hashing left up to 3 MiB of a photo
    for CLOSE). The hash stays valid while every write continues where the last one ended.
    """

    HASH_CHUNK = 2 << 20
    SYNC_EVERY = 1 << 20

    def __init__(self, path: str, staged: Path, fd: int, mtime: float | None) -> None:
        self.path = path
        self.staged = staged
        self.fd = fd
        self.mtime = mtime
        self.atime = mtime
        self.closed_by_client = False  # set by protocol.py when the CLOSE request arrives
        self.failed: asyncssh.SFTPError | None = None  # a write failed: the bytes have a hole
        self.size = 0
        self._sha1: Any = hashlib.sha1()
        self._hashed = 0  # bytes [0, _hashed) of the part are in the hash
        self._hash_valid = True
        self._hashing: asyncio.Future[None] | None = None  # the job hashing the next bytes
        self.synced = 0  # bytes [0, synced) are on disk
        self._syncing: asyncio.Future[None] | None = None  # the job flushing them
        self.sync_error: OSError | None = None  # a background fdatasync failed: fail the upload

    def start_from(self, size: int, sha1: tuple[Any, int] | None = None) -> None:
        """The part begins with `size` bytes already there (append, resume); `sha1` is the
        running hash of its first bytes when it is known (else they are hashed from 0)."""
        self.size = size
        if sha1 is not None and sha1[1] <= size:
            self._sha1, self._hashed = sha1
        self._follow()

    def write(self, offset: int, data: bytes) -> None:
        # pwrite may write less than asked when the disk fills up, without an error: finish the
        # write or fail it, never let a short write become a truncated "complete" upload.
        view, done = memoryview(data), 0
        while done < len(data):
            written = os.pwrite(self.fd, view[done:], offset + done)
            if written == 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            done += written
        if offset != self.size:
            self._hash_valid = False  # a rewrite or a hole: hashed again from the file at CLOSE
        self.size = max(self.size, offset + len(data))
        kill_point("upload_write:after")
        self._follow()

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        if size != self.size:
            self._hash_valid = False
        self.size = size

    def _follow(self, final: bool = False) -> None:
        """Start a hashing job when enough new bytes arrived (any at all when `final`), and, while
        bytes arrive (not `final`: CLOSE flushes the rest itself), a sync job when SYNC_EVERY
        bytes are not on disk yet."""
        loop = asyncio.get_running_loop()
        syncing = self._syncing is not None and not self._syncing.done()
        unsynced = self.size - self.synced
        if not (final or syncing or self.sync_error) and unsynced >= self.SYNC_EVERY:
            self._syncing = loop.run_in_executor(None, self._sync_part, self.fd, self.size)
        if not self._hash_valid or (self._hashing is not None and not self._hashing.done()):
            return
        if self.size - self._hashed >= (1 if final else self.HASH_CHUNK):
            self._hashing = loop.run_in_executor(None, self._hash_part, self.fd, self.size)

    def _hash_part(self, fd: int, end: int) -> None:
        """On an executor thread: hash the part's bytes from `_hashed` to `end`. Never raises:
        the loop reads the outcome."""
        try:
            while self._hashed < end:
                chunk = os.pread(fd, min(self.HASH_CHUNK, end - self._hashed), self._hashed)
                if not chunk:
                    raise OSError(errno.EIO, "The part is shorter than what was written")
                self._sha1.update(chunk)
                self._hashed += len(chunk)
        except OSError:
            self._hash_valid = False  # hashed again from the file, if it is delivered

    def _sync_part(self, fd: int, end: int) -> None:
        """On an executor thread: put the part's first `end` bytes on disk. Never raises."""
        try:
            os.fdatasync(fd)
        except OSError as exc:  # after a failed sync the bytes may be gone: never deliver
            self.sync_error = exc
        self.synced = end

    async def flushed(self) -> None:
        """Wait for a sync job under way: an error it met is reported to it alone (the kernel
        tells each failure once per open file), so CLOSE must see its outcome."""
        if self._syncing is not None:
            await self._syncing

    async def catch_up(self) -> None:
        """Hash everything written so far (before the part is finished or parked)."""
        while self._hash_valid and self._hashed < self.size:
            self._follow(final=True)
            if self._hashing is not None:
                await self._hashing

    def sha1_state(self) -> tuple[Any, int] | None:
        """The running hash and how many bytes it covers, to continue it after a resume
        (call after `catch_up`)."""
        if self._hash_valid and (self._hashing is None or self._hashing.done()):
            return self._sha1.copy(), self._hashed
        return None

    @property
    def sha1(self) -> str | None:
        """The part's SHA-1 (call after `catch_up`); None when it must be hashed from the file."""
        caught_up = self._hashed == self.size and (self._hashing is None or self._hashing.done())
        return self._sha1.hexdigest() if self._hash_valid and caught_up else None

    def release(self) -> None:
        """Close the part's descriptor, after the jobs that may still use it (a close now could
        hand the number to another file while a job reads or syncs it)."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        jobs = [job for job in (self._hashing, self._syncing) if job is not None and not job.done()]
        if self._hashing in jobs:
            self._hash_valid = False
        if jobs:
            asyncio.gather(*jobs).add_done_callback(lambda _: os.close(fd))
        else:
            os.close(fd)


@dataclass
class Part:
    """An upload cut off mid-way, waiting in .resume/ for the same user and path."""

    user: str
    path: str
    file: Path
    size: int
    touched: float  # time of the last byte (shown as its mtime; it expires from here)
    mtime: float | None  # the client's mtime, if it gave one
    sha1: tuple[Any, int] | None  # running hash and bytes it covers; after a restart None


class PartStore:
    """Resumable parts: data_dir/.resume/<key>.part with <key>.json naming its user and path.

    The directory is the store, not this object's memory: every SFTP process (the service, or
    each of its connection processes) sees the same parts, because a reconnecting client may
    land on another process than the one that parked its upload. The key is derived from user
    and path, so one path has at most one part, and `take` claims it with one rename, which only
    one process can win. The running hash of a part parked here is kept in memory as a shortcut
    for a resume on the same process; elsewhere the part is hashed again from its first byte.
    """

    def __init__(self, directory: Path, keep_seconds: float) -> None:
        self.directory = directory
        self.keep_seconds = keep_seconds
        self._hashes: dict[tuple[str, str], tuple[tuple[Any, int], int]] = {}

    def _key(self, user: str, path: str) -> Path:
        digest = hashlib.sha256(f"{user}\0{path}".encode()).hexdigest()[:32]
        return self.directory / f"{digest}.part"

    def load(self) -> None:
        """At start: give parts kept under older names their key's name, and drop expired and
        orphaned files (and claims a crash cut short)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for meta in sorted(self.directory.glob("*.json"), key=lambda p: p.stat().st_mtime):
            file = meta.with_suffix(".part")
            doc = _read_meta(meta)
            if doc is None or not file.is_file():
                self._unlink(meta, file)
                continue
            target = self._key(doc["user"], doc["path"])
            if target != file:  # the newer of two for one path wins (sorted by age)
                os.replace(file, target)
                os.replace(meta, target.with_suffix(".json"))
        for file in self.directory.glob("*.part"):
            if not file.with_suffix(".json").is_file():
                file.unlink(missing_ok=True)
        for claim in self.directory.glob("*.taking"):
            claim.unlink(missing_ok=True)
        self.expire()

    def _parts(self) -> Iterator[Part]:
        for meta in self.directory.glob("*.json"):
            if (part := self._read(meta.with_suffix(".part"))) is not None:
                yield part

    def _read(self, file: Path) -> Part | None:
        doc = _read_meta(file.with_suffix(".json"))
        try:
            st = file.stat()
        except OSError:
            return None
        if doc is None:
            return None
        user, path = doc["user"], doc["path"]
        known = self._hashes.get((user, path))
        sha1 = known[0] if known is not None and known[1] == st.st_size else None
        return Part(user, path, file, st.st_size, st.st_mtime, doc.get("mtime"), sha1)

    def expire(self) -> None:
        cutoff = time.time() - self.keep_seconds
        for part in list(self._parts()):
            if part.touched < cutoff:
                self.discard(part.user, part.path)

    def park(self, upload: UploadFile, user: str) -> bool:
        """Keep the part of a cut-off upload; False when resuming is off or nothing arrived."""
        if self.keep_seconds <= 0 or upload.size == 0:
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        file = self._key(user, upload.path)
        meta = file.with_suffix(".json")
        # The names stay a pair at every instant another process may look: the old pair goes
        # first, the metadata comes last.
        self._unlink(meta, file)
        os.replace(upload.staged, file)
        tmp = meta.with_name(f".{meta.name}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps({"user": user, "path": upload.path, "mtime": upload.mtime}))
        os.replace(tmp, meta)
        if (sha1 := upload.sha1_state()) is not None:
            self._hashes[(user, upload.path)] = (sha1, upload.size)
        return True

    def get(self, user: str, path: str) -> Part | None:
        return self._read(self._key(user, path))

    def take(self, user: str, path: str) -> Part | None:
        """Remove the part from the store for continuing it; the caller now owns its file."""
        part = self.get(user, path)
        if part is None:
            return None
        claim = part.file.with_name(f"{part.file.stem}.{uuid.uuid4().hex}.taking")
        try:
            os.rename(part.file, claim)  # of two processes taking one part, one wins
        except FileNotFoundError:
            return None
        part.file.with_suffix(".json").unlink(missing_ok=True)
        self._hashes.pop((user, path), None)
        return dataclasses.replace(part, file=claim)

    def discard(self, user: str, path: str) -> bool:
        file = self._key(user, path)
        self._hashes.pop((user, path), None)
        existed = file.is_file()
        self._unlink(file.with_suffix(".json"), file)
        return existed

    def in_dir(self, user: str, directory: str) -> dict[str, Part]:
        return {
            posixpath.basename(p.path): p
            for p in self._parts()
            if p.user == user and posixpath.dirname(p.path) == directory
        }

    @staticmethod
    def _unlink(*files: Path) -> None:
        for f in files:
            f.unlink(missing_ok=True)


def _read_meta(meta: Path) -> dict[str, Any] | None:
    """A part's metadata, or None when it is gone or unreadable."""
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(doc, dict) and isinstance(doc.get("user"), str)):
        return None
    return doc if isinstance(doc.get("path"), str) else None


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _logs_refusals(method: _Method) -> _Method:
    """A request this method refuses because of an OSError gets its log line (asyncssh answers
    with the status code of the errno, and by itself logs nothing above debug)."""
    operation = method.__name__

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def logged_async(self: GateSFTPServer, target: object, *args: Any) -> Any:
            try:
                return await method(self, target, *args)
            except OSError as exc:
                self.refused(operation, target, exc, *args[:1])
                raise

        return cast(_Method, logged_async)

    @functools.wraps(method)
    def logged(self: GateSFTPServer, target: object, *args: Any) -> Any:
        try:
            return method(self, target, *args)
        except OSError as exc:
            self.refused(operation, target, exc, *args[:1])
            raise

    return cast(_Method, logged)


class GateSFTPServer(asyncssh.SFTPServer):
    def __init__(
        self,
        chan: asyncssh.SSHServerChannel,
        layout: Layout,
        intake: Intake,
        *,
        parts: PartStore | None = None,
        max_handles: int = 256,
        on_activity: Callable[[], None] | None = None,
    ) -> None:
        self.user: str = chan.get_extra_info("username")
        self.layout = layout
        self.intake = intake
        self.parts = parts or PartStore(layout.root / ".resume", 0)
        self.parts.expire()
        self.max_handles = max_handles  # checked in protocol.py on OPEN and OPENDIR
        self.on_activity = on_activity  # called by protocol.py for every request
        # Set once asyncssh has closed (and so finished or parked) every file of the session.
        self.ended = asyncio.Event()
        root = layout.user_root(self.user)
        root.mkdir(parents=True, exist_ok=True)
        self.root = os.path.realpath(root)
        super().__init__(chan, chroot=self.root.encode())

    # -- the jail -----------------------------------------------------------------------------

    def client_path(self, path: bytes) -> str:
        """The normalised path below the user's root ("" is the root), or an SFTP error."""
        if b"\0" in path or len(path) > MAX_PATH_BYTES:
            raise asyncssh.SFTPNoSuchFile("Invalid path")
        try:
            text = path.decode("utf-8")
        except UnicodeDecodeError:
            raise asyncssh.SFTPNoSuchFile("Path is not valid UTF-8") from None
        return posixpath.normpath(posixpath.join("/", text)).lstrip("/")

    def map_path(self, path: bytes) -> bytes:
        rel = self.client_path(path)
        local = os.path.join(self.root, rel) if rel else self.root
        # Nothing on the way may be a symbolic link (one placed by a share of watch/, say).
        probe = self.root
        for part in rel.split("/") if rel else ():
            probe = os.path.join(probe, part)
            if os.path.islink(probe):
                raise asyncssh.SFTPPermissionDenied("Symbolic links are not followed")
        return local.encode()

    def _local(self, path: bytes) -> tuple[str, Path]:
        rel = self.client_path(path)
        return rel, Path(self.map_path(path).decode())

    def _shown(self, target: object) -> str | None:
        """The client's path of a request's target: a path, an upload, a file open for reading."""
        if isinstance(target, UploadFile):
            return target.path
        name = target if isinstance(target, bytes) else getattr(target, "name", None)
        if isinstance(name, bytes):
            with contextlib.suppress(asyncssh.SFTPError):
                return self.client_path(name)
        if isinstance(name, str):
            return os.path.relpath(name, self.root)
        return None

    def refused(
        self, operation: str, target: object, exc: OSError, other: object = None
    ) -> asyncssh.SFTPError:
        """Log a request refused because of an OSError (one line), and return the SFTP error that
        tells the client what went wrong without naming server paths."""
        file_event(
            "request refused",
            level=30,
            user=self.user,
            path=self._shown(target) or "?",
            stage="receive",
            outcome="refused",
            operation=operation,
            to=self._shown(other) if isinstance(other, bytes) else None,
            error=exc.strerror or str(exc),
            errno=errno.errorcode.get(exc.errno or 0),
        )
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return asyncssh.SFTPFailure("No space left on the server's disk")
        return asyncssh.SFTPFailure(f"Write failed: {exc.strerror or exc}")

    # -- uploads ------------------------------------------------------------------------------

    @_logs_refusals
    async def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> object:
        rel, local = self._local(path)
        if not pflags & asyncssh.FXF_WRITE:
            if not local.exists() and await self.intake.remembered(self.user, rel):
                raise asyncssh.SFTPPermissionDenied(
                    "This file was delivered to Immich; its bytes are no longer here"
                )
            return super().open(path, pflags, attrs)
        if not rel:
            raise asyncssh.SFTPFailure("Cannot write to the root folder itself")
        if local.is_dir():
            raise asyncssh.SFTPFailure("Is a directory")
        if not local.parent.is_dir():
            raise asyncssh.SFTPNoSuchFile("No such folder")
        exists = local.is_file()
        parked = self.parts.get(self.user, rel) is not None
        if pflags & asyncssh.FXF_EXCL and (
            exists or parked or await self.intake.remembered(self.user, rel)
        ):
            raise asyncssh.SFTPFileAlreadyExists("File already exists")
        if not pflags & asyncssh.FXF_CREAT and not (exists or parked):
            raise asyncssh.SFTPNoSuchFile("No such file")
        staged = self.layout.staging / f"{uuid.uuid4().hex}.part"
        mtime = float(attrs.mtime) if attrs.mtime is not None else None
        if pflags & asyncssh.FXF_TRUNC:
            self.parts.discard(self.user, rel)
        elif (part := self.parts.take(self.user, rel)) is not None:
            # Resume: the cut-off part is what the client saw in stat; it continues from there.
            os.replace(part.file, staged)
            fd = os.open(staged, os.O_RDWR | os.O_CLOEXEC)
            upload = UploadFile(rel, staged, fd, mtime if mtime is not None else part.mtime)
            upload.start_from(os.fstat(fd).st_size, part.sha1)
            return upload
        fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        upload = UploadFile(rel, staged, fd, mtime)
        if exists and not pflags & asyncssh.FXF_TRUNC:
            # Append or resume onto a waiting original: the part starts as a copy of it.
            loop = asyncio.get_running_loop()
            with local.open("rb") as src, open(os.dup(fd), "wb", closefd=True) as dst:
                await loop.run_in_executor(None, shutil.copyfileobj, src, dst)
            upload.start_from(local.stat().st_size)
        return upload

    def write(self, file_obj: object, offset: int, data: bytes) -> None:
        if not isinstance(file_obj, UploadFile):
            raise asyncssh.SFTPPermissionDenied("File not open for writing")
        try:
            file_obj.write(offset, data)
        except OSError as exc:
            # One line per failed upload: the writes already in flight fail the same way.
            if file_obj.failed is None:
                file_obj.failed = self.refused("write", file_obj, exc)
            raise file_obj.failed from None

    @_logs_refusals
    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        if isinstance(file_obj, UploadFile):
            return os.pread(file_obj.fd, size, offset)
        return super().read(file_obj, offset, size)  # type: ignore[return-value]

    @_logs_refusals
    async def close(self, file_obj: object) -> None:
        if not isinstance(file_obj, UploadFile):
            super().close(file_obj)
            return
        loop = asyncio.get_running_loop()
        try:
            if file_obj.failed is not None:
                # A write failed (disk full): these bytes must never be delivered, and a client
                # that ignored the WRITE error hears it again at CLOSE.
                if file_obj.closed_by_client:
                    raise file_obj.failed
                return
            if not file_obj.closed_by_client:
                # The connection dropped mid-upload: keep the part for a resume (or discard it
                # below). Nothing reaches watch/ without the client's CLOSE.
                await file_obj.catch_up()
                await file_obj.flushed()
                if file_obj.sync_error is None:  # bytes that failed to sync are never resumed
                    self.parts.park(file_obj, self.user)
                return
            try:
                # Hashing the last bytes and flushing the part to disk are independent; the
                # client waits for its CLOSE answer, so they run at the same time.
                await asyncio.gather(
                    file_obj.catch_up(), loop.run_in_executor(None, os.fsync, file_obj.fd)
                )
                await file_obj.flushed()
            except OSError as exc:
                raise self.refused("close", file_obj, exc) from None
            if file_obj.sync_error is not None:
                raise self.refused("close", file_obj, file_obj.sync_error)
            file_obj.release()
            upload = Upload(
                user=self.user,
                path=file_obj.path,
                staged=file_obj.staged,
                size=file_obj.size,
                sha1=file_obj.sha1,
                mtime=file_obj.mtime,
            )
            try:
                await self.intake.finalize_upload(upload)
            except OSError as exc:
                raise self.refused("close", file_obj, exc) from None
            except Exception as exc:  # the ledger's "database or disk is full", say
                event("upload failed", level=40, user=self.user, path=file_obj.path, error=str(exc))
                raise asyncssh.SFTPFailure("The server could not record the upload") from None
        finally:
            file_obj.release()
            file_obj.staged.unlink(missing_ok=True)

    def fstat(self, file_obj: object) -> SFTPAttrs:
        if isinstance(file_obj, UploadFile):
            attrs = SFTPAttrs.from_local(os.fstat(file_obj.fd))
            if file_obj.mtime is not None:
                attrs.mtime, attrs.mtime_ns = int(file_obj.mtime), None
            return attrs
        return SFTPAttrs.from_local(os.fstat(file_obj.fileno()))  # type: ignore[attr-defined]

    @_logs_refusals
    def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        if not isinstance(file_obj, UploadFile):
            fd = file_obj.fileno()  # type: ignore[attr-defined]
            _apply_attrs(fd, os.fstat(fd), attrs)
            return
        if attrs.size is not None and attrs.size != file_obj.size:
            file_obj.truncate(attrs.size)
        if attrs.mtime is not None:
            file_obj.mtime = float(attrs.mtime)

    @_logs_refusals
    async def fsync(self, file_obj: object) -> None:
        # fsync@openssh.com (`sftp -f`): off the loop, like the fsync at CLOSE, and after a
        # background sync under way, whose error only it would hear.
        loop = asyncio.get_running_loop()
        if not isinstance(file_obj, UploadFile):
            await loop.run_in_executor(None, super().fsync, file_obj)
            return
        try:
            await loop.run_in_executor(None, os.fsync, file_obj.fd)
            await file_obj.flushed()
        except OSError as exc:
            raise self.refused("fsync", file_obj, exc) from None
        if file_obj.sync_error is not None:
            raise self.refused("fsync", file_obj, file_obj.sync_error)

    # -- what the client sees -----------------------------------------------------------------

    @_logs_refusals
    async def stat(self, path: bytes) -> SFTPAttrs:
        rel, local = self._local(path)
        try:
            return SFTPAttrs.from_local(local.stat())
        except FileNotFoundError:
            pass
        except NotADirectoryError:
            raise asyncssh.SFTPNoSuchFile("No such file") from None
        part = self.parts.get(self.user, rel)
        if part is not None:
            return _part_attrs(part)
        remembered = await self.intake.remembered(self.user, rel)
        if remembered is not None:
            return _remembered_attrs(remembered)
        # A folder that only remembered files keep alive. Asked of the path itself, so a stat of
        # a missing file in a folder of 10,000 remembered ones reads no rows.
        files, dirs = await self.intake.remembered_in_dir(self.user, rel)
        if files or dirs:
            return _dir_attrs(time.time())
        raise asyncssh.SFTPNoSuchFile("No such file")

    lstat = stat  # symbolic links are never followed nor shown, so stat and lstat agree

    async def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        rel, local = self._local(path)
        for dot in (b".", b".."):
            yield SFTPName(dot, attrs=_dir_attrs(time.time()))
        parts = self.parts.in_dir(self.user, rel)
        for name, part in parts.items():
            yield SFTPName(name.encode(), attrs=_part_attrs(part))
        present: set[str] = set(parts)
        if local.is_dir():
            try:
                entries = list(os.scandir(local))
            except OSError as exc:
                self.refused("scandir", path, exc)
                raise
            for entry in entries:
                if entry.is_symlink() or entry.name in present:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # delivered meanwhile: the remembered files below show it
                present.add(entry.name)
                yield SFTPName(entry.name.encode(), attrs=SFTPAttrs.from_local(st))
        files, dirs = await self.intake.remembered_in_dir(self.user, rel)
        for name, remembered in files.items():
            if name not in present:
                yield SFTPName(name.encode(), attrs=_remembered_attrs(remembered))
        for name in sorted(dirs - present - set(files)):
            yield SFTPName(name.encode(), attrs=_dir_attrs(time.time()))

    @_logs_refusals
    async def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        rel, local = self._local(path)
        part = self.parts.get(self.user, rel)
        if part is not None and not local.exists():
            if attrs.mtime is not None:
                part.mtime = float(attrs.mtime)
            return
        # A file in watch/ may leave at any instant (a worker delivers it, or moves it to
        # undone/), so it is changed through a descriptor: once open, what it names stays, and a
        # file gone before the open is the ledger's to answer for.
        try:
            fd = os.open(local, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            fd = None
        if fd is not None:
            try:
                st = os.fstat(fd)
                _apply_attrs(fd, st, attrs)
            finally:
                os.close(fd)
            if attrs.mtime is not None and stat.S_ISREG(st.st_mode):
                await self.intake.set_mtime(self.user, rel, float(attrs.mtime))
            return
        if attrs.mtime is not None and await self.intake.set_mtime(
            self.user, rel, float(attrs.mtime)
        ):
            return
        if await self.intake.remembered(self.user, rel):
            return  # permissions/size on a remembered file: accepted, nothing to change
        raise asyncssh.SFTPNoSuchFile("No such file")

    lsetstat = setstat

    @_logs_refusals
    async def remove(self, path: bytes) -> None:
        rel, local = self._local(path)
        dropped = self.parts.discard(self.user, rel)  # rclone removes what failed to upload
        if not local.is_dir():
            try:
                local.unlink()
            except (FileNotFoundError, NotADirectoryError):
                pass  # not in watch/, or a worker took it just now: the ledger's to answer
            else:
                await self.intake.removed(self.user, rel)
                await self.intake.forget(self.user, rel)
                return
        if await self.intake.forget(self.user, rel) or dropped:
            return
        raise asyncssh.SFTPNoSuchFile("No such file")

    @_logs_refusals
    def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        rel, local = self._local(path)
        if not rel:
            raise asyncssh.SFTPFileAlreadyExists("The root folder exists")
        try:
            os.mkdir(local, 0o700)
        except FileExistsError:
            if local.is_dir():
                # A sync app with parallel transfers stats the folder in each of them, finds it
                # missing, and each creates it: the later ones find it made. What they asked
                # for holds, and an error there would fail the upload that asked.
                return
            raise
        os.chmod(local, _safe_mode(attrs.permissions if attrs.permissions is not None else 0o755))

    @_logs_refusals
    def rmdir(self, path: bytes) -> None:
        rel, local = self._local(path)
        if not rel:
            raise asyncssh.SFTPPermissionDenied("Cannot remove the root folder")
        os.rmdir(local)

    @_logs_refusals
    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        old_rel, old_local = self._local(oldpath)
        new_rel, new_local = self._local(newpath)
        if not old_rel or not new_rel:
            raise asyncssh.SFTPPermissionDenied("Cannot rename the root folder")
        if old_local.exists():
            if new_local.is_dir():
                raise asyncssh.SFTPFailure("Target is a directory")
            if not new_local.parent.is_dir():
                raise asyncssh.SFTPNoSuchFile("No such folder")
            # Rename onto an existing name replaces it, as posix-rename does: sync apps upload
            # under a temporary name and rename over the old file.
            try:
                await self.intake.rename(self.user, old_rel, new_rel)
                return
            except FileNotFoundError:
                pass  # a worker took it on just now: it is a remembered file
        if await self.intake.remembered(self.user, old_rel):
            await self.intake.rename_remembered(self.user, old_rel, new_rel)
            return
        raise asyncssh.SFTPNoSuchFile("No such file")

    posix_rename = rename

    def exit(self) -> None:
        # Report exit status 0 like OpenSSH's internal-sftp: scp in SFTP mode (OpenSSH ≥ 9)
        # treats a session that ends without one as failed, after a good upload.
        with contextlib.suppress(Exception):
            self._chan.exit(0)
        self.ended.set()

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        raise asyncssh.SFTPPermissionDenied("Symbolic links are not allowed")

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        raise asyncssh.SFTPPermissionDenied("Hard links are not allowed")

    def readlink(self, path: bytes) -> bytes:
        raise asyncssh.SFTPNoSuchFile("Not a symbolic link")


def _remembered_attrs(r: Remembered) -> SFTPAttrs:
    t = int(r.mtime)
    return SFTPAttrs(
        type=asyncssh.FILEXFER_TYPE_REGULAR,
        size=r.size,
        permissions=_FILE_MODE,
        atime=t,
        mtime=t,
        nlink=1,
    )


def _part_attrs(part: Part) -> SFTPAttrs:
    t = int(part.touched)
    return SFTPAttrs(
        type=asyncssh.FILEXFER_TYPE_REGULAR,
        size=part.size,
        permissions=_FILE_MODE,
        atime=t,
        mtime=t,
        nlink=1,
    )


def _safe_mode(mode: int, is_dir: bool = True) -> int:
    """What a client's chmod may do: owner access stays, nobody else gets write, no setuid."""
    return (mode & 0o755) | (0o700 if is_dir else 0o600)


def _apply_attrs(target: str | int, st: os.stat_result, attrs: SFTPAttrs) -> None:
    """setstat/fsetstat on a real file: times, a safe mode; never an owner or a new size."""
    if attrs.size is not None and attrs.size != st.st_size and not stat.S_ISDIR(st.st_mode):
        raise asyncssh.SFTPPermissionDenied(
            "An uploaded file cannot be resized in place; upload it again"
        )
    if attrs.permissions is not None:
        mode = _safe_mode(attrs.permissions, stat.S_ISDIR(st.st_mode))
        if isinstance(target, int):
            os.fchmod(target, mode)
        else:
            os.chmod(target, mode)
    if attrs.atime is not None or attrs.mtime is not None:
        atime = float(attrs.atime) if attrs.atime is not None else st.st_atime
        mtime = float(attrs.mtime) if attrs.mtime is not None else st.st_mtime
        os.utime(target, (atime, mtime))


def _dir_attrs(now: float) -> SFTPAttrs:
    t = int(now)
    return SFTPAttrs(
        type=asyncssh.FILEXFER_TYPE_DIRECTORY, permissions=_DIR_MODE, atime=t, mtime=t, nlink=2
    )
