"""Behind a TCP proxy or a NAT: PROXY protocol headers name the client for bans, logs and
metrics, and `sftp.ban_allowlist` addresses are never banned. A relay written here plays the
proxy: it writes the header, then pipes the bytes of a real SSH client both ways."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftpgate.sftp.proxy import (
    V1_MAX_BYTES,
    V2_MAX_BLOCK,
    V2_SIGNATURE,
    ProxyHeaderError,
    crc32c,
    parse_header,
)

from .conftest import PASSWORD, eventually
from .test_sftp_clients import connect, running_gate


def v1(source: str, port: int = 50000, family: str = "TCP4", dest: str = "127.0.0.1") -> bytes:
    return f"PROXY {family} {source} {dest} {port} 2222\r\n".encode()


def v2(source: str, port: int = 50000, tlvs: bytes = b"", command: int = 0x1) -> bytes:
    ip = ipaddress.ip_address(source)
    dest = ipaddress.ip_address("127.0.0.1" if ip.version == 4 else "::1")
    block = ip.packed + dest.packed + port.to_bytes(2) + (2222).to_bytes(2) + tlvs
    family = 0x11 if ip.version == 4 else 0x21
    return V2_SIGNATURE + bytes([0x20 | command, family]) + len(block).to_bytes(2) + block


def with_crc32c(header: bytes, corrupt: bool = False) -> bytes:
    """The v2 header with a CRC32C TLV, as HAProxy's `send-proxy-v2-options crc32c` sends it: the
    checksum of the whole header with its own four bytes zeroed (`corrupt`: one bit off)."""
    blank = header[:14] + (int.from_bytes(header[14:16]) + 7).to_bytes(2) + header[16:]
    blank += b"\x03\x00\x04" + bytes(4)
    return blank[:-4] + (crc32c(blank) ^ corrupt).to_bytes(4)


@contextlib.asynccontextmanager
async def relay(
    target_port: int, header: bytes, bind: str = "127.0.0.1"
) -> AsyncIterator[tuple[int, list[int]]]:
    """A proxy on a port of its own: for each client it connects to the gate from `bind`, sends
    `header`, then copies both ways. Yields its port and the client ports it has relayed."""
    served: list[int] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(writer.get_extra_info("peername")[1])
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", target_port, local_addr=(bind, 0)
        )
        up_writer.write(header)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        writer.close()
        up_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], served
    finally:
        server.close()


async def login(port: int, password: str = PASSWORD, **kw: Any) -> None:
    async with connect(port, password=password, **kw) as conn, conn.start_sftp_client() as sftp:
        assert await sftp.realpath(".") == "/"


async def refused_raw(port: int, data: bytes, bind: str = "127.0.0.1", close: bool = False) -> None:
    """Send `data` from `bind` and wait until the server hangs up (it must, without SSH)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(bind, 0))
    writer.write(data)
    if close:
        writer.close()
        return
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(65536), 20):
            pass
    writer.close()


def logged(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    """The fields of every `name` event logged so far."""
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == name]


def refusals(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return logged(caplog, "connection refused")


def failures(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return logged(caplog, "login failed")


def banning_gate(
    tmp_path: Path, standin: Any, host_keys_dir: Path, client_key: Path, **sftp: Any
) -> contextlib.AbstractAsyncContextManager[Any]:
    """A gate that bans an address at its second failed login, with no delay worth waiting for."""
    return running_gate(
        tmp_path, standin, host_keys_dir, client_key,
        failed_login_delay_seconds=0.05, ban_after_failures=2, ban_seconds=600, **sftp,
    )  # fmt: skip


async def test_bans_logs_and_metrics_use_the_address_in_a_v1_or_v2_header(
    tmp_path, standin, host_keys_dir, client_key, caplog
):
    caplog.set_level(logging.INFO, logger="sftpgate")
    async with banning_gate(
        tmp_path, standin, host_keys_dir, client_key, proxy_protocol=["127.0.0.1/32"]
    ) as gate:
        port = gate.sftp.port
        async with (
            relay(port, v1("203.0.113.7")) as (guesser, _),
            relay(port, v2("2001:db8::9")) as (phone, _),
            relay(port, v2("198.51.100.4", tlvs=b"\x04\x00\x02ab")) as (other, _),
        ):
            await login(phone)  # through the proxy, the right password works
            for _ in range(2):
                with pytest.raises(asyncssh.PermissionDenied):
                    await login(guesser, password="guess")
            assert [f["address"] for f in failures(caplog)] == ["203.0.113.7"] * 2
            assert gate.metrics.sftp_auth_failures._value.get() == 2
            # The guesser is banned, even with the right password now...
            with pytest.raises((asyncssh.Error, OSError)):
                await login(guesser)
            assert {"address": "203.0.113.7", "reason": "too many failed logins"} in logged(
                caplog, "login refused"
            )
            # ...while other phones behind the same proxy are not, whichever header version.
            await login(phone)
            await login(other)
            async with (
                connect(phone) as conn,
                conn.start_sftp_client() as sftp,
                sftp.open("IMG_1.jpg.tmp", "wb") as f,
            ):
                await f.write(b"bytes through the proxy")
            assert (gate.layout.watch / "phone" / "IMG_1.jpg.tmp").read_bytes() == (
                b"bytes through the proxy"
            )


async def test_a_header_from_elsewhere_or_none_from_a_proxy_is_refused(
    tmp_path, standin, host_keys_dir, client_key, caplog
):
    caplog.set_level(logging.INFO, logger="sftpgate")
    async with running_gate(
        tmp_path, standin, host_keys_dir, client_key, proxy_protocol=["127.0.0.1"],
        failed_login_delay_seconds=0.05,
    ) as gate:  # fmt: skip
        port = gate.sftp.port
        # From the proxy's address without a header: refused, even a real SSH client.
        with pytest.raises((asyncssh.Error, OSError)):
            await login(port)
        # From an address that is not a proxy, a header is refused; plain SSH is served.
        async with relay(port, v1("203.0.113.7"), bind="127.0.0.2") as (spoofer, _):
            with pytest.raises((asyncssh.Error, OSError)):
                await login(spoofer)
        await refused_raw(port, v2("203.0.113.8"), bind="127.0.0.3")
        await login(port, local_addr=("127.0.0.4", 0))
        await eventually(lambda: len(refusals(caplog)) == 3, what="three refusals")
        first, second, third = refusals(caplog)
        assert first == {"address": "127.0.0.1", "reason": "missing PROXY header"}
        assert second["address"] == "127.0.0.2" and "not in sftp.proxy_protocol" in second["reason"]
        assert third["address"] == "127.0.0.3" and "not in sftp.proxy_protocol" in third["reason"]
        assert not failures(caplog)  # refusals are not failed logins


@pytest.mark.parametrize(
    ("data", "close", "reason"),
    [
        (v1("203.0.113.7")[:20], True, "truncated PROXY header: the connection closed after 20"),
        (b"PROXY TCP4 " + b"1" * 200 + b"\r\n", False, f"longer than {V1_MAX_BYTES} bytes"),
        (b"PROXY TCP4 203.0.113.7 127.0.0.1 50000\r\n", False, "malformed PROXY v1 header"),
        (b"PROXY TCP6 203.0.113.7 127.0.0.1 1 2\r\n", False, "invalid TCP6 address"),
        (
            V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x01\x02\x03\x04",
            False,
            "claims 4 bytes, too few for its 12-byte addresses",
        ),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", False, f"more than {V2_MAX_BLOCK}"),
        # Claims 20 bytes where 12 were sent: the 8 it takes from the SSH line are no TLVs.
        (
            V2_SIGNATURE + b"\x21\x11\x00\x14" + v2("203.0.113.7")[16:] + b"SSH-2.0-x\r\n",
            False,
            "TLVs do not add up to its length",
        ),
        (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), False, "not a TCP stream"),
        (with_crc32c(v2("203.0.113.7"), corrupt=True), False, "CRC32C does not match"),
    ],
    ids=[
        "truncated",
        "oversized-v1",
        "v1-fields",
        "v1-family",
        "v2-short",
        "v2-huge",
        "v2-lie",
        "udp",
        "v2-crc32c",
    ],
)
async def test_malformed_headers_get_a_clear_line_and_the_server_goes_on(
    tmp_path, standin, host_keys_dir, client_key, caplog, data, close, reason
):
    caplog.set_level(logging.INFO, logger="sftpgate")
    async with running_gate(
        tmp_path, standin, host_keys_dir, client_key, proxy_protocol=["127.0.0.1/8"]
    ) as gate:  # fmt: skip
        port = gate.sftp.port
        await refused_raw(port, data, close=close)
        await eventually(lambda: refusals(caplog), what="the refusal's log line")
        (line,) = refusals(caplog)
        assert line["address"] == "127.0.0.1" and reason in line["reason"], line
        async with relay(port, v2("198.51.100.4")) as (proxied, _):
            await login(proxied)


async def test_a_proxy_health_check_is_silent_and_a_local_command_uses_the_proxy_address(
    tmp_path, standin, host_keys_dir, client_key, caplog
):
    caplog.set_level(logging.INFO, logger="sftpgate")
    local = V2_SIGNATURE + b"\x20\x00\x00\x00"  # LOCAL: the proxy's own connection
    async with running_gate(
        tmp_path, standin, host_keys_dir, client_key, proxy_protocol=["127.0.0.0/8"],
        failed_login_delay_seconds=0.05,
    ) as gate:  # fmt: skip
        port = gate.sftp.port
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()  # a TCP check: connect, hang up
        async with relay(port, local, bind="127.0.0.5") as (checker, _):
            with pytest.raises(asyncssh.PermissionDenied):
                await login(checker, password="guess")
        assert [f["address"] for f in failures(caplog)] == ["127.0.0.5"]
        assert not refusals(caplog)


# -- never banned ------------------------------------------------------------------------------


async def test_failures_from_the_allowlist_are_counted_but_never_ban(
    tmp_path, standin, host_keys_dir, client_key, caplog
):
    caplog.set_level(logging.INFO, logger="sftpgate")
    async with banning_gate(
        tmp_path, standin, host_keys_dir, client_key, ban_allowlist=["127.0.0.1/32"]
    ) as gate:
        port = gate.sftp.port
        for bind in ("127.0.0.1", "127.0.0.2"):
            for _ in range(3):
                with pytest.raises((asyncssh.PermissionDenied, asyncssh.Error, OSError)):
                    await login(port, password="guess", local_addr=(bind, 0))
        await login(port, local_addr=("127.0.0.1", 0))  # the allowlisted address still gets in
        with pytest.raises((asyncssh.Error, OSError)):
            await login(port, local_addr=("127.0.0.2", 0))  # the other one is banned
        lines = failures(caplog)
        assert [f["address"] for f in lines] == ["127.0.0.1"] * 3 + ["127.0.0.2"] * 2
        assert all(f.get("ban", "").startswith("never") for f in lines[:3])
        assert not any("ban" in f for f in lines[3:])
        assert gate.metrics.sftp_auth_failures._value.get() == 5


# -- the parser ------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
tlv = st.binary(max_size=40).map(lambda b: bytes([0xE0]) + len(b).to_bytes(2) + b)
headers = st.one_of(
    st.builds(lambda a, p: (v1(a, p), a, p), ipv4, ports),
    st.builds(lambda a, p: (v1(a, p, "TCP6", "::1"), a, p), ipv6, ports),
    st.builds(lambda a, p, t: (v2(a, p, b"".join(t)), a, p), ipv4 | ipv6, ports, st.lists(tlv)),
    st.builds(lambda a, p: (with_crc32c(v2(a, p)), a, p), ipv4 | ipv6, ports),
)


@settings(max_examples=400, deadline=None, database=None)
@given(headers, st.binary(max_size=64))
def test_every_valid_header_is_read_exactly_and_every_prefix_waits(
    case: tuple[bytes, str, int], after: bytes
) -> None:
    header, address, port = case
    parsed = parse_header(header + after)
    assert parsed is not None
    assert parsed.length == len(header)
    assert parsed.source == (str(ipaddress.ip_address(address)), port)
    for cut in range(len(header)):
        assert parse_header(header[:cut]) is None  # truncated: more is needed, never a guess


def mutations() -> st.SearchStrategy[bytes]:
    def flip(data: bytes, at: int, value: int) -> bytes:
        at %= len(data)
        return data[:at] + bytes([value]) + data[at + 1 :]

    tails = st.binary(max_size=300)
    return st.one_of(
        tails,
        tails.map(lambda b: V2_SIGNATURE + b),
        tails.map(lambda b: b"PROXY " + b),
        st.builds(
            lambda c, at, v: flip(c[0], at, v), headers, st.integers(0, 500), st.integers(0, 255)
        ),
    )


@settings(max_examples=1500, deadline=None, database=None)
@given(mutations())
def test_garbage_is_waited_for_or_refused_never_misread(data: bytes) -> None:
    """Whatever arrives: wait for more (bounded), a clear refusal, or a header that fits."""
    try:
        parsed = parse_header(data)
    except ProxyHeaderError as exc:
        assert str(exc)
        return
    if parsed is None:  # still incomplete: only ever within the size limits
        assert len(data) < max(V1_MAX_BYTES, 16 + V2_MAX_BLOCK)
        if data.startswith(b"PROXY "):
            assert len(data) < V1_MAX_BYTES and b"\n" not in data
        return
    assert parsed.length <= len(data)
    assert parsed.length <= (V1_MAX_BYTES if data.startswith(b"P") else 16 + V2_MAX_BLOCK)
    if parsed.source is not None:
        ipaddress.ip_address(parsed.source[0])
        assert 0 <= parsed.source[1] <= 65535


def test_a_crc32c_tlv_must_match_its_header() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # CRC-32C's check value
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720, B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    good = with_crc32c(v2("203.0.113.7"))
    parsed = parse_header(good + b"SSH-2.0-x\r\n")
    assert parsed is not None and parsed.source == ("203.0.113.7", 50000)
    assert parsed.length == len(good)
    other_source = good[:16] + bytes([good[16] ^ 1]) + good[17:]  # 202.0.113.7, same checksum
    for bad in (other_source, with_crc32c(v2("203.0.113.7"), corrupt=True)):
        with pytest.raises(ProxyHeaderError, match="CRC32C does not match"):
            parse_header(bad)


def test_claimed_lengths_above_the_limit_are_refused_before_they_arrive() -> None:
    for length in (V2_MAX_BLOCK + 1, 65535):
        with pytest.raises(ProxyHeaderError, match="more than"):
            parse_header(V2_SIGNATURE + b"\x21\x11" + length.to_bytes(2))
    assert parse_header(V2_SIGNATURE + b"\x21\x11" + V2_MAX_BLOCK.to_bytes(2)) is None
