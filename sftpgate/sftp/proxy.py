"""PROXY protocol (v1 text and v2 binary headers) in front of the SSH server.

A TCP proxy (HAProxy `send-proxy-v2`, Traefik `proxyProtocol`) connects from its own address and
opens the stream with a header naming the real client. For connections from `sftp.proxy_protocol`
networks that header is required; from anywhere else it is refused, since trusting it from
anyone would let a client choose the address its bans are counted against.

The header is read here, before asyncssh sees a byte: `ProxyHeaderListener` is handed to
`asyncssh.listen(tunnel=...)`, whose tunnel interface lets it run the TCP listener itself and
start asyncssh's own connection for each client once the header is through. The connection then
sees a transport whose `peername` is the carried client, so bans, logs, metrics and `from=` in
authorized_keys all use it. After the hand-over the socket talks to asyncssh directly.

Parsed here rather than with the `proxy-protocol` package: it reads a v1 line without a length
bound, fails with struct errors on v2 address blocks shorter than their family, and reads from
an asyncio StreamReader, which cannot hand the rest of the stream to asyncssh.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from ..logs import event
from ..networks import Networks

V1_PREFIX = b"PROXY "
V1_MAX_BYTES = 107  # the longest v1 line the protocol allows, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_BYTES = 16
# Address block plus TLVs. TCP needs 12 (IPv4) or 36 (IPv6) bytes; proxies add a few TLVs
# (AWS, Azure and GCP ids, TLS facts). More than this is not a header a proxy sends for SSH.
V2_MAX_BLOCK = 2048
_V2_ADDRESS_BYTES = {0x1: 12, 0x2: 36, 0x3: 216}  # AF_INET, AF_INET6, AF_UNIX
# Proxies send the header with the connection; a listed address silent this long is refused.
HEADER_TIMEOUT_SECONDS = 10.0

_PORT = r"(0|[1-9][0-9]{0,4})"
_V1_TCP = re.compile(rb"PROXY (TCP4|TCP6) (\S+) (\S+) " + _PORT.encode() + b" " + _PORT.encode())


class ProxyHeaderError(ValueError):
    """The bytes cannot be (the start of) a valid PROXY header; the message says why."""


@dataclass(frozen=True)
class ProxyHeader:
    # The client as the proxy saw it; None when the proxy speaks for itself (v2 LOCAL, e.g. its
    # health checks) or does not know (v1 UNKNOWN, v2 UNSPEC or AF_UNIX): then the connection's
    # own address counts.
    source: tuple[str, int] | None
    length: int  # bytes the header took; the SSH stream starts right after


def looks_like_header(data: bytes) -> bool | None:
    """True when `data` starts with a PROXY signature, False when it cannot, None while too short
    to tell (SSH's own first line starts "SSH-", so one byte usually decides)."""
    for signature in (V1_PREFIX, V2_SIGNATURE):
        n = min(len(data), len(signature))
        if data[:n] == signature[:n]:
            return True if n == len(signature) else None
    return False


def parse_header(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`, None while it is incomplete, ProxyHeaderError when it
    is not one (missing, malformed, oversized, or claiming a length its content contradicts)."""
    start = looks_like_header(data)
    if start is False:
        raise ProxyHeaderError("missing PROXY header")
    if start is None:
        return None
    return _parse_v1(data) if data.startswith(V1_PREFIX) else _parse_v2(data)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\n", 0, V1_MAX_BYTES)
    if end < 0:
        if len(data) >= V1_MAX_BYTES:
            raise ProxyHeaderError(f"PROXY v1 header longer than {V1_MAX_BYTES} bytes")
        return None
    if data[end - 1 : end] != b"\r":
        raise ProxyHeaderError("PROXY v1 header does not end in CRLF")
    line = data[: end - 1]
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        return ProxyHeader(None, end + 1)
    m = _V1_TCP.fullmatch(line)
    if not m:
        raise ProxyHeaderError("malformed PROXY v1 header")
    family = ipaddress.IPv4Address if m.group(1) == b"TCP4" else ipaddress.IPv6Address
    try:
        source = family(m.group(2).decode("ascii"))
        family(m.group(3).decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError(
            f"PROXY v1 header has an invalid {m.group(1).decode()} address"
        ) from None
    ports = int(m.group(4)), int(m.group(5))
    if max(ports) > 65535:
        raise ProxyHeaderError("PROXY v1 header has a port above 65535")
    return ProxyHeader((str(source), ports[0]), end + 1)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_FIXED_BYTES:
        return None
    version, command = data[12] >> 4, data[12] & 0xF
    family, transport = data[13] >> 4, data[13] & 0xF
    length = int.from_bytes(data[14:16])
    if version != 2:
        raise ProxyHeaderError(f"PROXY v2 signature with version {version}")
    if command not in (0x0, 0x1):
        raise ProxyHeaderError(f"PROXY v2 header with unknown command {command}")
    if length > V2_MAX_BLOCK:
        raise ProxyHeaderError(f"PROXY v2 header claims {length} bytes, more than {V2_MAX_BLOCK}")
    if len(data) < V2_FIXED_BYTES + length:
        return None
    block = data[V2_FIXED_BYTES : V2_FIXED_BYTES + length]
    total = V2_FIXED_BYTES + length
    if command == 0x0:  # LOCAL: the proxy's own connection; the block is to be skipped
        return ProxyHeader(None, total)
    if family not in (0x0, *_V2_ADDRESS_BYTES) or transport not in (0x0, 0x1):
        raise ProxyHeaderError(
            f"PROXY v2 header for family {family}, transport {transport}: not a TCP stream"
        )
    needed = _V2_ADDRESS_BYTES.get(family, 0)
    if length < needed:
        raise ProxyHeaderError(
            f"PROXY v2 header claims {length} bytes, too few for its {needed}-byte addresses"
        )
    _check_tlvs(data[:total], V2_FIXED_BYTES + needed)
    if family == 0x1:
        return ProxyHeader(
            (str(ipaddress.IPv4Address(block[0:4])), int.from_bytes(block[8:10])), total
        )
    if family == 0x2:
        return ProxyHeader(
            (str(ipaddress.IPv6Address(block[0:16])), int.from_bytes(block[32:34])), total
        )
    return ProxyHeader(None, total)  # UNSPEC or a Unix socket: no IP address to carry


def _check_tlvs(header: bytes, start: int) -> None:
    """The bytes after the addresses must be whole TLVs (type, 2-byte length, value), so a
    length that swallowed the start of the SSH stream is caught rather than parsed as TLVs; a
    CRC32C TLV (HAProxy's `send-proxy-v2-options crc32c`) must match the header it came in."""
    at = start
    while at < len(header):
        if at + 3 > len(header) or at + 3 + int.from_bytes(header[at + 1 : at + 3]) > len(header):
            raise ProxyHeaderError("PROXY v2 header's TLVs do not add up to its length")
        kind, length = header[at], int.from_bytes(header[at + 1 : at + 3])
        if kind == PP2_TYPE_CRC32C:
            value = header[at + 3 : at + 3 + length]
            # The checksum covers the whole header with its own four bytes zeroed.
            zeroed = header[: at + 3] + bytes(length) + header[at + 3 + length :]
            if length != 4 or int.from_bytes(value) != crc32c(zeroed):
                raise ProxyHeaderError("PROXY v2 header's CRC32C does not match")
        at += 3 + length


PP2_TYPE_CRC32C = 0x03


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as the PROXY v2 CRC32C TLV carries it: headers are a few dozen
    bytes, so a table in Python costs microseconds per connection."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


class _CarriedTransport:
    """The socket's transport, with the client the header named as its peer."""

    def __init__(self, inner: asyncio.Transport, peername: tuple[str, int]) -> None:
        self._inner = inner
        self._peername = peername

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peername
        return self._inner.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _timed_out_reason(received: int) -> str:
    return (
        f"no complete PROXY header within {HEADER_TIMEOUT_SECONDS:g} s ({received} bytes received)"
    )


def _truncated_reason(received: int) -> str:
    return f"truncated PROXY header: the connection closed after {received} bytes"


def _log_refusal(peer: str, reason: str) -> None:
    event("connection refused", level=30, address=peer, reason=reason)


def carried_client(header: ProxyHeader, proxy: str) -> tuple[str, int] | None:
    """The client a header from `proxy` names, if it names one (logged at debug level)."""
    if header.source is not None:
        event("proxied connection", level=10, address=header.source[0], proxy=proxy)
    return header.source


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def read_header(sock: socket.socket, peer: str) -> ProxyHeader | None:
    """Read the PROXY header of a connection from a listed proxy off its (non-blocking) socket,
    and not one byte more, so the SSH stream can go on elsewhere (a connection process).

    None when the connection is refused (logged as `HeaderFront` logs it) or closed.
    """
    loop = asyncio.get_running_loop()
    taken = b""  # every byte read so far belongs to the header: it is incomplete
    try:
        async with asyncio.timeout(HEADER_TIMEOUT_SECONDS):
            while True:
                readable: asyncio.Future[None] = loop.create_future()
                loop.add_reader(sock.fileno(), _settle, readable)
                try:
                    await readable
                finally:
                    loop.remove_reader(sock.fileno())
                seen = sock.recv(V2_FIXED_BYTES + V2_MAX_BLOCK, socket.MSG_PEEK)
                if not seen:  # a listed proxy hanging up without a byte: a health check
                    if taken:
                        _log_refusal(peer, _truncated_reason(len(taken)))
                    return None
                header = parse_header(taken + seen)
                if header is not None:
                    sock.recv(header.length - len(taken))  # already here: returns them all
                    return header
                taken += sock.recv(len(seen))
    except TimeoutError:
        _log_refusal(peer, _timed_out_reason(len(taken)))
    except ProxyHeaderError as exc:
        _log_refusal(peer, str(exc))
    except OSError:  # reset by the peer
        pass
    return None


class HeaderFront(asyncio.Protocol):
    """Sits on one accepted socket until the PROXY question is settled, then hands it over.

    `carried`: the client a header read elsewhere named (`read_header`, in the process that
    accepted the socket): SSH starts at once, with that client as its peer.
    """

    def __init__(
        self,
        start_ssh: Callable[[], asyncio.Protocol],
        trusted: Networks,
        carried: tuple[str, int] | None = None,
    ) -> None:
        self._start_ssh = start_ssh
        self._trusted = trusted
        self._carried = carried
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._ssh: asyncio.Protocol | None = None
        self._peer = "?"
        self._expect_header = False
        self._done = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, only alike: no isinstance here
        stream = self._transport = cast(asyncio.Transport, transport)
        if self._carried is not None:
            self._ssh = self._start_ssh()
            self._ssh.connection_made(_CarriedTransport(stream, self._carried))
            self._pass_on(b"")
            return
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else "?"
        self._expect_header = self._peer in self._trusted
        if self._expect_header:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(HEADER_TIMEOUT_SECONDS, self._timed_out)
        else:
            # SSH starts at once (some clients wait for the server's banner before they send);
            # the first bytes are still checked for a header before asyncssh reads them.
            self._ssh = self._start_ssh()
            self._ssh.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._done:  # refused: the transport is closing
            return
        self._buffer += data
        if self._expect_header:
            try:
                header = parse_header(self._buffer)
            except ProxyHeaderError as exc:
                self._refuse(str(exc))
                return
            if header is not None:
                self._hand_over(header)
            return
        seen = looks_like_header(self._buffer)
        if seen:
            self._refuse("PROXY header from an address not in sftp.proxy_protocol")
        elif seen is False:
            self._pass_on(self._buffer)

    def _hand_over(self, header: ProxyHeader) -> None:
        assert self._transport is not None
        if self._timer is not None:
            self._timer.cancel()
        transport: Any = self._transport
        if (client := carried_client(header, self._peer)) is not None:
            transport = _CarriedTransport(self._transport, client)
        self._ssh = self._start_ssh()
        self._ssh.connection_made(transport)
        self._pass_on(self._buffer[header.length :])

    def _pass_on(self, rest: bytes) -> None:
        assert self._transport is not None and self._ssh is not None
        self._done = True
        self._buffer = b""
        self._transport.set_protocol(self._ssh)
        if rest:
            self._ssh.data_received(rest)

    def _refuse(self, reason: str) -> None:
        assert self._transport is not None
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        _log_refusal(self._peer, reason)
        self._transport.abort()

    def _timed_out(self) -> None:
        if not self._done:
            self._refuse(_timed_out_reason(len(self._buffer)))

    def eof_received(self) -> bool | None:
        return None  # close: without the header settled there is nothing to answer

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        # A listed proxy that connects and hangs up without a byte is a health check: no line.
        if not self._done and self._expect_header and self._buffer:
            _log_refusal(self._peer, _truncated_reason(len(self._buffer)))
        self._done = True
        if self._ssh is not None:
            self._ssh.connection_lost(exc)


class ProxyHeaderListener:
    """asyncssh's tunnel listener interface: `create_server(factory, host, port)` is called by
    `asyncssh.listen(tunnel=...)` with the factory of its own server connections."""

    def __init__(self, trusted: Networks) -> None:
        self.trusted = trusted

    async def create_server(
        self, session_factory: Callable[[str, int], Any], listen_host: str, listen_port: int
    ) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: HeaderFront(lambda: session_factory("", 0), self.trusted),
            listen_host,
            listen_port,
            backlog=100,  # asyncssh.listen's own default
        )
