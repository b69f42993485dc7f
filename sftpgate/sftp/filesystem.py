"""The file system one SFTP user sees: its own tree, jailed in watch/<user>/.

Uploads never write into watch/ directly. Opening a file for writing creates a part in .staging/;
the SHA-1 is updated as the bytes arrive; the client's CLOSE fsyncs the part and hands it to the
intake, which renames it into watch/<user>/<path>. Files that went on to Immich stay visible
("remembered") with the size and mtime the client gave them, so sync apps never send them again.

The jail: every client path is normalised against "/" (so `..` cannot climb out), must not contain
NUL, and may not pass through a symbolic link; symlink and hard-link requests are refused.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh import SFTPAttrs, SFTPName

from ..intake import Intake, Upload
from ..layout import Layout
from ..ledger import Remembered

MAX_PATH_BYTES = 4096
_FILE_MODE = 0o100644
_DIR_MODE = 0o040755


class UploadFile:
    """An open upload: a part in .staging/ plus the running SHA-1 of what arrived in order."""

    def __init__(self, path: str, staged: Path, fd: int, mtime: float | None) -> None:
        self.path = path
        self.staged = staged
        self.fd = fd
        self.mtime = mtime
        self.atime = mtime
        self.closed_by_client = False  # set by protocol.py when the CLOSE request arrives
        self._sha1: Any = hashlib.sha1()
        self._hashed = 0  # bytes fed to the hash; a write anywhere else disables it
        self._hash_valid = True
        self.size = 0

    def start_from(self, size: int) -> None:
        """The part begins with `size` bytes copied from an existing file (resume, append)."""
        self._hash_valid = size == 0
        self.size = size

    def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)
        if self._hash_valid:
            if offset == self._hashed:
                self._sha1.update(data)
                self._hashed += len(data)
            else:
                self._hash_valid = False
        self.size = max(self.size, offset + len(data))

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        if size != self._hashed:
            self._hash_valid = False
        self.size = size

    @property
    def sha1(self) -> str | None:
        return self._sha1.hexdigest() if self._hash_valid and self._hashed == self.size else None


class GateSFTPServer(asyncssh.SFTPServer):
    def __init__(self, chan: asyncssh.SSHServerChannel, layout: Layout, intake: Intake) -> None:
        self.user: str = chan.get_extra_info("username")
        self.layout = layout
        self.intake = intake
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

    # -- uploads ------------------------------------------------------------------------------

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
        if pflags & asyncssh.FXF_EXCL and (exists or await self.intake.remembered(self.user, rel)):
            raise asyncssh.SFTPFileAlreadyExists("File already exists")
        if not pflags & asyncssh.FXF_CREAT and not exists:
            raise asyncssh.SFTPNoSuchFile("No such file")
        staged = self.layout.staging / f"{uuid.uuid4().hex}.part"
        fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        mtime = float(attrs.mtime) if attrs.mtime is not None else None
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
            raise _sftp_error(exc) from None

    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        if isinstance(file_obj, UploadFile):
            return os.pread(file_obj.fd, size, offset)
        return super().read(file_obj, offset, size)  # type: ignore[return-value]

    async def close(self, file_obj: object) -> None:
        if not isinstance(file_obj, UploadFile):
            super().close(file_obj)
            return
        loop = asyncio.get_running_loop()
        try:
            if not file_obj.closed_by_client:
                return  # the connection dropped mid-upload: the part is discarded below
            try:
                await loop.run_in_executor(None, os.fsync, file_obj.fd)
            except OSError as exc:
                raise _sftp_error(exc) from None
            os.close(file_obj.fd)
            file_obj.fd = -1
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
                raise _sftp_error(exc) from None
        finally:
            if file_obj.fd >= 0:
                os.close(file_obj.fd)
                file_obj.fd = -1
            file_obj.staged.unlink(missing_ok=True)

    def fstat(self, file_obj: object) -> SFTPAttrs:
        if isinstance(file_obj, UploadFile):
            attrs = SFTPAttrs.from_local(os.fstat(file_obj.fd))
            if file_obj.mtime is not None:
                attrs.mtime, attrs.mtime_ns = int(file_obj.mtime), None
            return attrs
        return SFTPAttrs.from_local(os.fstat(file_obj.fileno()))  # type: ignore[attr-defined]

    def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        if not isinstance(file_obj, UploadFile):
            super().fsetstat(file_obj, attrs)
            return
        if attrs.size is not None and attrs.size != file_obj.size:
            file_obj.truncate(attrs.size)
        if attrs.mtime is not None:
            file_obj.mtime = float(attrs.mtime)

    # -- what the client sees -----------------------------------------------------------------

    async def stat(self, path: bytes) -> SFTPAttrs:
        rel, local = self._local(path)
        try:
            return SFTPAttrs.from_local(local.stat())
        except FileNotFoundError:
            pass
        except NotADirectoryError:
            raise asyncssh.SFTPNoSuchFile("No such file") from None
        remembered = await self.intake.remembered(self.user, rel)
        if remembered is not None:
            return _remembered_attrs(remembered)
        _, dirs = await self.intake.remembered_in_dir(self.user, posixpath.dirname(rel))
        if posixpath.basename(rel) in dirs:
            return _dir_attrs(time.time())
        raise asyncssh.SFTPNoSuchFile("No such file")

    lstat = stat  # symbolic links are never followed nor shown, so stat and lstat agree

    async def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        rel, local = self._local(path)
        for dot in (b".", b".."):
            yield SFTPName(dot, attrs=_dir_attrs(time.time()))
        present: set[str] = set()
        if local.is_dir():
            for entry in os.scandir(local):
                if entry.is_symlink():
                    continue
                present.add(entry.name)
                yield SFTPName(
                    entry.name.encode(),
                    attrs=SFTPAttrs.from_local(entry.stat(follow_symlinks=False)),
                )
        files, dirs = await self.intake.remembered_in_dir(self.user, rel)
        for name, remembered in files.items():
            if name not in present:
                yield SFTPName(name.encode(), attrs=_remembered_attrs(remembered))
        for name in sorted(dirs - present - set(files)):
            yield SFTPName(name.encode(), attrs=_dir_attrs(time.time()))

    async def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        rel, local = self._local(path)
        if local.exists():
            super().setstat(path, attrs)
            if attrs.mtime is not None and local.is_file():
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

    async def remove(self, path: bytes) -> None:
        rel, local = self._local(path)
        if local.is_file():
            local.unlink()
            await self.intake.removed(self.user, rel)
            await self.intake.forget(self.user, rel)
            return
        if await self.intake.forget(self.user, rel):
            return
        raise asyncssh.SFTPNoSuchFile("No such file")

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
            os.replace(old_local, new_local)
            if new_local.is_file():
                await self.intake.renamed(self.user, old_rel, new_rel)
            return
        if await self.intake.remembered(self.user, old_rel):
            await self.intake.renamed(self.user, old_rel, new_rel)
            return
        raise asyncssh.SFTPNoSuchFile("No such file")

    posix_rename = rename

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


def _dir_attrs(now: float) -> SFTPAttrs:
    t = int(now)
    return SFTPAttrs(
        type=asyncssh.FILEXFER_TYPE_DIRECTORY, permissions=_DIR_MODE, atime=t, mtime=t, nlink=2
    )


def _sftp_error(exc: OSError) -> asyncssh.SFTPError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return asyncssh.SFTPFailure("No space left on the server's disk")
    return asyncssh.SFTPFailure(f"Write failed: {exc.strerror or exc}")
