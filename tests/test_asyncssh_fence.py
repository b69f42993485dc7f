"""The asyncssh internals that sftp/protocol.py replaces are the ones it was written against."""

from __future__ import annotations

import pytest
from asyncssh.packet import PacketDecodeError, SSHPacket, String

from sftpgate.sftp import protocol


@pytest.mark.parametrize("name", sorted(protocol.REPLACED_FINGERPRINTS))
def test_every_replaced_asyncssh_method_is_the_one_the_override_was_written_against(name):
    stock = protocol.replaced_methods()[name]
    assert protocol.fingerprint(stock) == protocol.REPLACED_FINGERPRINTS[name], (
        f"asyncssh's {name} changed: read it again against sftp/protocol.py's override, then"
        " record its new fingerprint"
    )


def test_the_installed_asyncssh_is_a_tested_one():
    protocol.check_asyncssh_version()  # raises on an untested version


@pytest.mark.parametrize("version", ["2.25.0", "3.0.1", "2.23.9"])
def test_an_untested_asyncssh_stops_start_up_with_one_line_naming_it(version):
    with pytest.raises(protocol.UntestedAsyncssh) as info:
        protocol.check_asyncssh_version(version)
    message = str(info.value)
    assert f"asyncssh {version} is installed" in message and "2.24" in message
    assert "\n" not in message


class _Handler:
    """Just what the CLOSE override reads of asyncssh's SFTPServerHandler."""

    def __init__(self, version: int) -> None:
        self._version = version
        self._file_handles: dict[bytes, object] = {}
        self._dir_handles: dict[bytes, object] = {b"h": object()}
        self._server = None


@pytest.mark.parametrize(("version", "refused"), [(3, True), (6, False)])
async def test_close_with_trailing_bytes_is_refused_below_sftp_v6_as_upstream(version, refused):
    packet = SSHPacket(String(b"h") + b"trailing")
    if refused:
        with pytest.raises(PacketDecodeError):  # answered as SSH_FX_BAD_MESSAGE, as upstream
            await protocol._process_close(_Handler(version), packet)
    else:
        await protocol._process_close(_Handler(version), packet)
