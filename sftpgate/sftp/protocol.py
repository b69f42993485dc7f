"""SSH and SFTP protocol fixes on top of asyncssh's server, installed once per process.

- WRITE with trailing bytes: rclone 1.60 (Go pkg/sftp) sends short writes whose packet length
  covers its whole buffer; OpenSSH ignores the excess, stock asyncssh fails the upload with
  SSH_FX_BAD_MESSAGE. We accept them like OpenSSH.
- limits@openssh.com advertises the server's configured write size (OpenSSH's 255 KiB, and a packet
  length 1 KiB above it, as asyncssh derives its own) instead of asyncssh's 4 MiB: the OpenSSH and
  asyncssh clients size their writes from it, and 4 MiB writes were slower (bench/README.md).
- CLOSE marks the file as closed *by the client*. asyncssh also calls `close()` for every handle
  left open when a connection drops; only a real CLOSE may finish an upload, so a client that
  disconnects mid-upload leaves nothing in watch/.
- OPENDIR of something that is not a directory fails at once, as with OpenSSH, rather than at the
  first READDIR.
- OPEN and OPENDIR fail with SSH_FX_FAILURE once a session holds `max_handles` handles, so a client
  cannot pile up file descriptors and memory; the client can close some and go on. The open-handle
  count limits@openssh.com reports (asyncssh: the process's file limit) is capped at that number.
- Every request counts as activity for the connection's idle time-out (server.py).
- Received data is handed to the SSH transport in pieces of at most RECEIVE_PIECE bytes. The
  transport keeps unparsed input in one bytes object and slices each packet off its front, which
  copies everything behind it: with a 256 KiB socket read of rclone's small packets that was a
  third of the event loop's time (bench/README.md). In small pieces the copy stays small.
- chacha20-poly1305@openssh.com, the OpenSSH client's default cipher, is checked and decrypted
  with one ChaCha20 stream per packet (block 0 gives the Poly1305 key, the payload starts at
  block 1, as the construction defines) and an incremental Poly1305, instead of two streams and a
  copy of the whole packet: the stock receive path was a fifth of the event loop's time.
- Replies are sent together: every reply the session produces while the event loop works through
  one batch of received requests goes out in one channel write (one SSH packet, one encryption,
  one socket send) once the loop comes round, instead of one each. Clients that keep many small
  WRITEs in flight (rclone: 64 × 32 KiB) get eight to sixteen STATUS replies per send. Order is
  kept; a batch goes out early at REPLY_BATCH_BYTES (READ data is not held back); a session that
  ends sends what is pending first.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
import textwrap
from typing import Any

import asyncssh
from asyncssh import connection as _connection
from asyncssh import sftp as _sftp
from asyncssh.crypto import chacha as _chacha
from asyncssh.misc import plural
from asyncssh.packet import Byte, UInt32
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20
from cryptography.hazmat.primitives.poly1305 import Poly1305

RECEIVE_PIECE = 64 << 10
REPLY_BATCH_BYTES = 256 << 10

# The overrides below replace private asyncssh methods, so they are tied to the asyncssh they were
# read against: `install()` refuses any other minor version, and tests/test_asyncssh_fence.py
# fails when the source of a replaced method no longer has the fingerprint recorded here (an
# upgrade must be read again, method by method, before these are updated).
TESTED_ASYNCSSH = ("2.24",)
REPLACED_FINGERPRINTS = {
    "SFTPServerHandler._process_write": "9a0511acf0e9263e",
    "SFTPServerHandler._process_close": "b55f4d1cb3396b10",
    "SFTPServerHandler._process_open": "250c690d53982fdd",
    "SFTPServerHandler._process_opendir": "36aac77e05cdb7b7",
    "SFTPServerHandler._process_limits": "fac1ad468c4e0398",
    "SFTPServerHandler._process_packet": "6c4ff62dbaa22dd0",
    "SFTPServerHandler._cleanup": "c22287e59d310303",
    "SFTPHandler.send_packet": "d5e2e96fafd22848",
    "ChachaCipher.verify_and_decrypt": "bff362dc0a0e2fe2",
    "SSHConnection.data_received": "3d62ee24589968be",
}


class UntestedAsyncssh(RuntimeError):
    """The installed asyncssh is not one the protocol overrides were checked against."""


def check_asyncssh_version() -> None:
    version = asyncssh.__version__
    minor = ".".join(version.split(".")[:2])
    if minor not in TESTED_ASYNCSSH:
        raise UntestedAsyncssh(
            f"asyncssh {version} is installed, but sftpgate's SFTP protocol layer was tested with"
            f" asyncssh {', '.join(TESTED_ASYNCSSH)}.x only; install a tested version"
        )


def replaced_methods() -> dict[str, Any]:
    """The stock asyncssh method behind each name in REPLACED_FINGERPRINTS (before install)."""
    server = _sftp.SFTPServerHandler
    return {
        "SFTPServerHandler._process_write": server._process_write,
        "SFTPServerHandler._process_close": server._process_close,
        "SFTPServerHandler._process_open": server._process_open,
        "SFTPServerHandler._process_opendir": server._process_opendir,
        "SFTPServerHandler._process_limits": server._process_limits,
        "SFTPServerHandler._process_packet": _stock.get("_process_packet", server._process_packet),
        "SFTPServerHandler._cleanup": _stock.get("_cleanup", server._cleanup),
        "SFTPHandler.send_packet": _sftp.SFTPHandler.send_packet,
        "ChachaCipher.verify_and_decrypt": _stock.get(
            "verify_and_decrypt", _chacha.ChachaCipher.verify_and_decrypt
        ),
        "SSHConnection.data_received": _stock.get(
            "data_received", _connection.SSHConnection.data_received
        ),
    }


def fingerprint(method: Any) -> str:
    """A short hash of a method's source, blind to indentation."""
    source = textwrap.dedent(inspect.getsource(method))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


_installed_write_size: list[int] = []
_stock: dict[str, Any] = {}


def install(max_write_bytes: int) -> None:
    check_asyncssh_version()
    handlers: dict[Any, Any] = _sftp.SFTPServerHandler._packet_handlers
    _installed_write_size[:] = [max_write_bytes]
    if handlers.get(_sftp.FXP_WRITE) is _process_write:
        return
    _stock["open"] = handlers[_sftp.FXP_OPEN]
    _stock["_process_packet"] = _sftp.SFTPServerHandler._process_packet
    _stock["_cleanup"] = _sftp.SFTPServerHandler._cleanup
    _stock["verify_and_decrypt"] = _chacha.ChachaCipher.verify_and_decrypt
    _stock["data_received"] = _connection.SSHConnection.data_received
    handlers[_sftp.FXP_WRITE] = _process_write
    handlers[_sftp.FXP_CLOSE] = _process_close
    handlers[_sftp.FXP_OPEN] = _process_open
    handlers[_sftp.FXP_OPENDIR] = _process_opendir
    handlers[b"limits@openssh.com"] = _process_limits
    _sftp.SFTPServerHandler._process_packet = _process_packet  # type: ignore[method-assign]
    _sftp.SFTPServerHandler.send_packet = _send_packet_batched  # type: ignore[method-assign]
    _sftp.SFTPServerHandler._cleanup = _cleanup  # type: ignore[method-assign]
    _chacha.ChachaCipher.verify_and_decrypt = chacha_verify_and_decrypt  # type: ignore[method-assign]
    _connection.SSHConnection.data_received = _data_received_in_pieces  # type: ignore[method-assign]


def _data_received_in_pieces(self: Any, data: bytes, datatype: Any = None) -> None:
    stock = _stock["data_received"]
    if len(data) <= RECEIVE_PIECE:
        stock(self, data)
        return
    view = memoryview(data)
    for start in range(0, len(data), RECEIVE_PIECE):
        if self._transport is None:  # a piece made the connection close: drop the rest
            return
        stock(self, view[start : start + RECEIVE_PIECE])


async def _process_packet(self: Any, pkttype: int, pktid: int, packet: Any) -> None:
    touch = getattr(self._server, "on_activity", None)
    if touch is not None:
        touch()
    await _stock["_process_packet"](self, pkttype, pktid, packet)


def _send_packet_batched(self: Any, pkttype: int, pktid: int | None, *args: bytes) -> None:
    writer = self._writer
    if not writer:
        raise _sftp.SFTPNoConnection("Connection not open")
    if writer.channel.is_closing():
        return
    payload = Byte(pkttype) + b"".join(args)
    self.log_sent_packet(pkttype, pktid, payload)
    pending: list[bytes] | None = getattr(self, "_pending_replies", None)
    if not pending:
        pending = self._pending_replies = []
        self._pending_bytes = 0
        asyncio.get_running_loop().call_soon(_send_pending_replies, self)
    pending.append(UInt32(len(payload)) + payload)
    self._pending_bytes += 4 + len(payload)
    if self._pending_bytes >= REPLY_BATCH_BYTES:  # READ data: no need to hold it back
        _send_pending_replies(self)


def _send_pending_replies(self: Any) -> None:
    pending: list[bytes] | None = getattr(self, "_pending_replies", None)
    if not pending:
        return
    self._pending_replies = None  # a new batch starts with the next reply
    writer = self._writer
    if writer and not writer.channel.is_closing():
        writer.write(b"".join(pending))


async def _cleanup(self: Any, exc: Exception | None) -> None:
    _send_pending_replies(self)
    await _stock["_cleanup"](self, exc)


def _check_handles(self: Any) -> None:
    limit = getattr(self._server, "max_handles", None)
    if limit is not None and len(self._file_handles) + len(self._dir_handles) >= limit:
        raise _sftp.SFTPFailure(f"Too many open handles (at most {limit} per session)")


async def _process_open(self: Any, packet: Any) -> Any:
    _check_handles(self)
    return await _stock["open"](self, packet)


async def _process_write(self: Any, packet: Any) -> object:
    handle = packet.get_string()
    offset = packet.get_uint64()
    data = packet.get_string()
    # No check_end(): trailing bytes after the data are ignored, as OpenSSH does.
    if self.logger.isEnabledFor(logging.DEBUG):  # upstream's log line; formatting it costs 4 µs
        self.logger.debug1(
            "Received write for %s at offset %d in handle %s",
            plural(len(data), "byte"),
            offset,
            handle.hex(),
        )
    file_obj = self._file_handles.get(handle)
    if not file_obj:
        raise _sftp.SFTPInvalidHandle("Invalid file handle")
    result = self._server.write(file_obj, offset, data)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _process_close(self: Any, packet: Any) -> None:
    handle = packet.get_string()
    if self._version < 6:  # as upstream: SFTP v6 lets CLOSE carry extensions
        packet.check_end()
    self.logger.debug1("Received close for handle %s", handle.hex())
    file_obj = self._file_handles.pop(handle, None)
    if file_obj:
        if hasattr(file_obj, "closed_by_client"):
            file_obj.closed_by_client = True
        result = self._server.close(file_obj)
        if inspect.isawaitable(result):
            await result
        return
    if self._dir_handles.pop(handle, None) is None:
        raise _sftp.SFTPInvalidHandle("Invalid file handle")


async def _process_opendir(self: Any, packet: Any) -> bytes:
    _check_handles(self)
    path = packet.get_string()
    if self._version < 6:
        packet.check_end()
    self.logger.debug1("Received opendir for %s", path)
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
    handles = os.sysconf("SC_OPEN_MAX") - 5  # asyncssh's count: the file limit, less a few
    limit = getattr(self._server, "max_handles", None)
    if limit is not None:
        handles = min(handles, limit)
    return _sftp.SFTPLimits(write + 1024, _sftp.MAX_SFTP_READ_LEN, write, handles)


_CHACHA_BLOCK_0 = bytes(64)
_CHACHA_COUNTER_0 = bytes(8)


def chacha_verify_and_decrypt(
    self: Any, header: bytes, data: bytes, nonce: bytes, tag: bytes
) -> bytes | None:
    """ChachaCipher.verify_and_decrypt with one key stream and no copy of the packet."""
    stream = Cipher(ChaCha20(self._key, _CHACHA_COUNTER_0 + nonce), mode=None).encryptor()
    mac = Poly1305(stream.update(_CHACHA_BLOCK_0)[:32])
    mac.update(header)
    mac.update(data)
    try:
        mac.verify(tag)
    except InvalidSignature:
        return None
    return stream.update(data)
