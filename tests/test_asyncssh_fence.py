"""The asyncssh internals that sftp/protocol.py replaces are the ones it was written against, and
the overrides answer malformed requests as upstream does (a real asyncssh server on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from sftpgate.sftp import protocol

from .test_sftp_clients import RawSFTPSession, sftp_message, sftp_string

INIT, VERSION, OPEN, CLOSE, WRITE, OPENDIR, EXTENDED = 1, 2, 3, 4, 6, 11, 200
STATUS, HANDLE, EXTENDED_REPLY = 101, 102, 201
FX_OK, FX_BAD_MESSAGE = 0, 5
MAX_HANDLES = 7


@pytest.mark.parametrize("name", sorted(protocol.REPLACED_FINGERPRINTS))
def test_every_replaced_asyncssh_method_is_the_one_the_override_was_written_against(name):
    protocol.install(261_120)  # what install() saved is what the overrides call
    stock = protocol.replaced_methods()[name]
    assert protocol.fingerprint(stock) == protocol.REPLACED_FINGERPRINTS[name], (
        f"asyncssh's {name} changed: read it again against sftp/protocol.py's override, then"
        " record its new fingerprint"
    )


def test_the_installed_asyncssh_is_a_tested_one():
    protocol.check_asyncssh_version()  # raises on an untested version


@pytest.mark.parametrize("version", ["2.25.0", "3.0.1", "2.23.9"])
def test_install_refuses_an_untested_asyncssh_with_one_line_naming_it(version, monkeypatch):
    protocol.install(261_120)  # refused also when an earlier start installed the overrides
    monkeypatch.setattr(asyncssh, "__version__", version)
    with pytest.raises(protocol.UntestedAsyncssh) as info:
        protocol.install(261_120)
    message = str(info.value)
    assert f"asyncssh {version} is installed" in message and "2.24" in message
    assert "\n" not in message


class _LimitedSFTPServer(asyncssh.SFTPServer):
    max_handles = MAX_HANDLES  # read by the OPEN/OPENDIR handle check and limits@openssh.com


class _NoAuthServer(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False


@contextlib.asynccontextmanager
async def raw_sftp(root: Path) -> AsyncIterator[tuple[Any, RawSFTPSession]]:
    """An SFTP v3 session, as bytes, with asyncssh's own file server behind the overrides."""
    protocol.install(261_120)
    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        server_factory=_NoAuthServer,
        sftp_factory=lambda chan: _LimitedSFTPServer(chan, chroot=os.fsencode(root)),
    )
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect(
            "127.0.0.1", port, username="u", known_hosts=None, client_keys=None
        ) as conn:
            channel, raw = await conn.create_session(
                RawSFTPSession, subsystem="sftp", encoding=None
            )
            channel.write(sftp_message(INIT, 3))
            assert (await raw.message())[:2] == (VERSION, 3)
            yield channel, raw
    finally:
        server.close()
        await server.wait_closed()


async def request(
    channel: Any, raw: RawSFTPSession, kind: int, *fields: bytes
) -> tuple[int, bytes]:
    channel.write(sftp_message(kind, 9, *fields))
    reply, request_id, rest = await raw.message()
    assert request_id == 9
    return reply, rest


def status(rest: bytes) -> int:
    return int.from_bytes(rest[:4])


async def test_close_and_opendir_with_trailing_bytes_are_refused_below_sftp_v6_as_upstream(
    tmp_path,
):
    flags = (0x02 | 0x08).to_bytes(4)  # WRITE | CREAT
    async with raw_sftp(tmp_path) as (channel, raw):
        kind, rest = await request(channel, raw, OPEN, sftp_string(b"a.bin"), flags, bytes(4))
        assert kind == HANDLE
        handle = sftp_string(rest[4 : 4 + int.from_bytes(rest[:4])])
        # WRITE is the one request whose excess is ignored on purpose (rclone).
        kind, rest = await request(channel, raw, WRITE, handle, bytes(8), sftp_string(b"x"), b"!")
        assert (kind, status(rest)) == (STATUS, FX_OK)
        kind, rest = await request(channel, raw, CLOSE, handle, b"trailing")
        assert (kind, status(rest)) == (STATUS, FX_BAD_MESSAGE)
        # Refused before it touched the handle: the file is still open and closes properly.
        kind, rest = await request(channel, raw, CLOSE, handle)
        assert (kind, status(rest)) == (STATUS, FX_OK)
        kind, rest = await request(channel, raw, OPENDIR, sftp_string(b"."), b"trailing")
        assert (kind, status(rest)) == (STATUS, FX_BAD_MESSAGE)
        kind, _ = await request(channel, raw, OPENDIR, sftp_string(b"."))
        assert kind == HANDLE
    assert (tmp_path / "a.bin").read_bytes() == b"x"


async def test_limits_reports_the_write_size_and_the_sessions_handle_limit(tmp_path):
    async with raw_sftp(tmp_path) as (channel, raw):
        kind, rest = await request(channel, raw, EXTENDED, sftp_string(b"limits@openssh.com"))
    assert kind == EXTENDED_REPLY
    packet, read, write, handles = (int.from_bytes(rest[i : i + 8]) for i in range(0, 32, 8))
    assert (packet, read, write) == (261_120 + 1024, 4 << 20, 261_120)
    assert handles == min(os.sysconf("SC_OPEN_MAX") - 5, MAX_HANDLES)
