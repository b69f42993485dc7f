"""SFTP protocol fixes on top of asyncssh's server handler, installed once per process.

- WRITE with trailing bytes: rclone 1.60 (Go pkg/sftp) sends short writes whose packet length
  covers its whole buffer; OpenSSH ignores the excess, stock asyncssh fails the upload with
  SSH_FX_BAD_MESSAGE (notes/sftp-bench.md §7). We accept them like OpenSSH.
- limits@openssh.com advertises the server's configured write size (OpenSSH's 255 KiB) instead of
  asyncssh's 4 MiB: the OpenSSH and asyncssh clients size their writes from it, and 4 MiB writes
  were slower (notes/sftp-bench.md §5).
- CLOSE marks the file as closed *by the client*. asyncssh also calls `close()` for every handle
  left open when a connection drops; only a real CLOSE may finish an upload, so a client that
  disconnects mid-upload leaves nothing in watch/.
- OPENDIR of something that is not a directory fails at once, as with OpenSSH, rather than at the
  first READDIR.
"""

from __future__ import annotations

import inspect
from typing import Any

from asyncssh import sftp as _sftp

_installed_write_size: list[int] = []


def install(max_write_bytes: int) -> None:
    handlers: dict[Any, Any] = _sftp.SFTPServerHandler._packet_handlers
    _installed_write_size[:] = [max_write_bytes]
    if handlers.get(_sftp.FXP_WRITE) is _process_write:
        return
    handlers[_sftp.FXP_WRITE] = _process_write
    handlers[_sftp.FXP_CLOSE] = _process_close
    handlers[_sftp.FXP_OPENDIR] = _process_opendir
    handlers[b"limits@openssh.com"] = _process_limits


async def _process_write(self: Any, packet: Any) -> None:
    handle = packet.get_string()
    offset = packet.get_uint64()
    data = packet.get_string()
    # No check_end(): trailing bytes after the data are ignored, as OpenSSH does.
    file_obj = self._file_handles.get(handle)
    if not file_obj:
        raise _sftp.SFTPInvalidHandle("Invalid file handle")
    result = self._server.write(file_obj, offset, data)
    if inspect.isawaitable(result):
        await result


async def _process_close(self: Any, packet: Any) -> None:
    handle = packet.get_string()
    file_obj = self._file_handles.get(handle)
    if file_obj is not None and hasattr(file_obj, "closed_by_client"):
        file_obj.closed_by_client = True
    try:
        result = self._server.close(file_obj) if file_obj is not None else None
        if inspect.isawaitable(result):
            await result
    finally:
        if file_obj is not None:
            self._file_handles.pop(handle, None)
    if file_obj is not None:
        return
    if self._dir_handles.pop(handle, None) is None:
        raise _sftp.SFTPInvalidHandle("Invalid file handle")


async def _process_opendir(self: Any, packet: Any) -> bytes:
    path = packet.get_string()
    attrs = self._server.stat(path)
    if inspect.isawaitable(attrs):
        attrs = await attrs
    attrs = await self._server.convert_attrs(attrs)
    if attrs.type != _sftp.FILEXFER_TYPE_DIRECTORY:
        raise _sftp.SFTPNoSuchFile("Not a directory")
    handle: bytes = self._get_next_handle()
    self._dir_handles[handle] = self._server.scandir(path)
    return handle


async def _process_limits(self: Any, packet: Any) -> Any:
    packet.check_end()
    write = _installed_write_size[0]
    return _sftp.SFTPLimits(write + 1024, _sftp.MAX_SFTP_READ_LEN, write, 1024)
