"""Does the SSH crypto release the GIL? `python bench/gil.py [--quick]`

Decrypting incoming SSH packets on a second thread, beside the event loop, can only pay if the
call that decrypts releases the GIL. For each call asyncssh (with sftpgate's protocol layer) makes
per received packet, and for SHA-1 as a known reference, this runs the call in a loop for ~0.5 s
on one thread and on two threads at once (each with its own key and buffers), on packets of
32 KiB (rclone's writes), 64 KiB and 256 KiB (OpenSSH `sftp`'s), and prints MB/s, the
two-thread/one-thread ratio (≈ 2 on two idle cores: the call runs without the GIL; ≈ 1: it holds
it) and the cost per packet. The last rows run asyncssh's real receive path (`data_received` →
`_recv_pkthdr` → `_recv_packet`, fed in sftpgate's 64 KiB pieces, ending at a stub channel) to
show the Python around the crypto. Prints one markdown table; nothing is started, nothing is
written.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/gil.py` from anywhere finds sftpgate
    sys.path.insert(0, str(ROOT))

import asyncssh  # noqa: E402
import cryptography  # noqa: E402
from asyncssh.connection import SSHConnection, SSHServerConnection  # noqa: E402
from asyncssh.crypto.chacha import ChachaCipher  # noqa: E402
from asyncssh.encryption import Encryption, get_encryption  # noqa: E402
from asyncssh.packet import Byte, SSHPacket, String, UInt32  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from sftpgate.sftp.protocol import RECEIVE_PIECE, chacha_verify_and_decrypt  # noqa: E402

KIB = 1 << 10
SIZES = (32 * KIB, 64 * KIB, 256 * KIB)
MSG_CHANNEL_DATA = 94
GCM = {"aes128-gcm": 16, "aes256-gcm": 32}
# A receive-path pass replays this many bytes of packets: enough that resetting the connection
# between passes is noise, small enough to stay in the CPU's caches like a socket read does.
PASS_BYTES = 1 << 20

# One call on one thread's own buffers; returns the payload bytes it processed.
Work = Callable[[], int]


@dataclass
class Row:
    call: str
    size: int
    make: Callable[[int, int], Work]  # (size, seed) -> a thread's own work
    path_of: str | None = None  # receive path rows: the bare-crypto row they contain


# -- the calls ------------------------------------------------------------------------------------


def _gcm_keys(name: str, seed: int) -> tuple[bytes, bytes]:
    rnd = _rand(seed)
    return rnd(GCM[name]), rnd(12)


def _rand(seed: int) -> Callable[[int], bytes]:
    # Distinct bytes per thread (no shared cache lines); their values do not matter to the speed.
    r = random.Random(seed)
    return r.randbytes


def aesgcm_decrypt(name: str) -> Callable[[int, int], Work]:
    """GCMCipher.verify_and_decrypt's library call, as asyncssh makes it: a new AESGCM per packet."""

    def make(size: int, seed: int) -> Work:
        key, nonce = _gcm_keys(name, seed)
        header = size.to_bytes(4, "big")  # the clear packet length, GCM's associated data
        sealed = AESGCM(key).encrypt(nonce, _rand(seed + 1)(size), header)

        def work() -> int:
            AESGCM(key).decrypt(nonce, sealed, header)
            return size

        return work

    return make


def _chacha_packet(size: int, seed: int) -> tuple[ChachaCipher, bytes, bytes, bytes, bytes]:
    cipher = ChachaCipher(_rand(seed)(64))
    nonce = (7).to_bytes(8, "big")
    sealed, tag = cipher.encrypt_and_sign(size.to_bytes(4, "big"), _rand(seed + 1)(size), nonce)
    return cipher, sealed[:4], sealed[4:], nonce, tag


def chacha_sftpgate(size: int, seed: int) -> Work:
    """sftpgate's receive path for chacha20-poly1305: one ChaCha20 stream, incremental Poly1305."""
    cipher, header, data, nonce, tag = _chacha_packet(size, seed)

    def work() -> int:
        if chacha_verify_and_decrypt(cipher, header, data, nonce, tag) is None:
            raise AssertionError("tag did not verify")
        return size

    return work


def chacha_stock(size: int, seed: int) -> Work:
    """Stock asyncssh's: Poly1305.verify_tag of header + data, then a second ChaCha20 stream."""
    cipher, header, data, nonce, tag = _chacha_packet(size, seed)

    def work() -> int:
        if cipher.verify_and_decrypt(header, data, nonce, tag) is None:
            raise AssertionError("tag did not verify")
        return size

    return work


def sha1_update(size: int, seed: int) -> Work:
    """How sftpgate hashes an upload: one running SHA-1 per file, updated chunk by chunk."""
    h = hashlib.sha1()
    chunk = _rand(seed)(size)

    def work() -> int:
        h.update(chunk)
        return size

    return work


def python_loop(size: int, seed: int) -> Work:
    """A reference that holds the GIL throughout: a bytecode loop over the packet's 8-byte words."""
    words = memoryview(_rand(seed)(size)).cast("Q")

    def work() -> int:
        x = 0
        for w in words:
            x ^= w
        return size

    return work


def gcm_decrypt_packet(size: int, seed: int) -> Work:
    """asyncssh's GCMEncryption.decrypt_packet: the AESGCM call plus its Python (two joins of the
    packet's bytes, the IV update)."""
    key, iv = _gcm_keys("aes128-gcm", seed)
    packets, _ = _sealed_stream(b"aes128-gcm@openssh.com", key, iv, size, 1)
    blocksize = 16
    first, rest, mac = packets[0][:blocksize], packets[0][blocksize:-16], packets[0][-16:]

    def work() -> int:
        # A fresh object per call keeps the IV at the one the packet was sealed with.
        enc = get_encryption(b"aes128-gcm@openssh.com", key, iv)
        if enc.decrypt_packet(0, first, rest, 4, mac) is None:
            raise AssertionError("tag did not verify")
        return size

    return work


# -- asyncssh's receive path, without a socket ------------------------------------------------------


class _StubChannel:
    """Where `_recv_packet` hands a CHANNEL_DATA packet: takes the data out, as a channel does."""

    def __init__(self) -> None:
        self.received = 0

    def log_received_packet(self, pkttype: int, seq: int, packet: Any, note: str = "") -> None:
        pass

    def process_packet(self, pkttype: int, seq: int, packet: SSHPacket) -> bool:
        packet.get_string()
        packet.check_end()
        self.received += 1
        return True


def _sealed_stream(
    alg: bytes, key: bytes, iv: bytes, size: int, count: int
) -> tuple[list[bytes], int]:
    """`count` CHANNEL_DATA packets of `size` data bytes, framed and sealed as asyncssh's
    send_packet does (an AEAD cipher: a 1-byte clear header in the padding sum)."""
    enc: Encryption = get_encryption(alg, key, iv)
    blocksize = 16 if b"gcm" in alg else 8
    out = []
    data = _rand(size)(size)
    for seq in range(count):
        payload = Byte(MSG_CHANNEL_DATA) + UInt32(0) + String(data)
        padlen = -(1 + len(payload)) % blocksize
        if padlen < 4:
            padlen += blocksize
        packet = Byte(padlen) + payload + bytes(padlen)
        sealed, mac = enc.encrypt_packet(seq, UInt32(len(packet)), packet)
        out.append(sealed + mac)
    return out, blocksize


def receive_path(alg: bytes) -> Callable[[int, int], Work]:
    """SSHConnection.data_received on a connection object with only the receive state set: the
    transport's real per-packet Python (header, slicing of the input buffer, decrypt, payload
    slice, SSHPacket, dispatch by type and channel, sequence update) around the crypto."""

    def make(size: int, seed: int) -> Work:
        rnd = _rand(seed)
        key = rnd(64 if b"chacha" in alg else int(alg[3:6]) // 8)
        iv = rnd(12)
        count = max(4, PASS_BYTES // size)
        packets, blocksize = _sealed_stream(alg, key, iv, size, count)
        stream = b"".join(packets)
        pieces = [
            memoryview(stream)[i : i + RECEIVE_PIECE] for i in range(0, len(stream), RECEIVE_PIECE)
        ]
        channel = _StubChannel()
        conn: Any = object.__new__(SSHServerConnection)
        conn._reset_keepalive_timer = lambda: None  # no event loop here; once per read anyway
        vars(conn).update(
            _kex=None,
            _ignore_first_kex=False,
            _strict_kex=False,
            _auth=None,
            _auth_complete=True,
            _decompressor=None,
            _decompress_after_auth=False,
            _channels={0: channel},
            _transport=object(),
            _max_recv_pktlen=1 << 20,
            _recv_blocksize=blocksize,
            _recv_macsize=16,
            _pktlen=0,
        )

        def work() -> int:
            enc = get_encryption(alg, key, iv)  # IV and sequence back to the stream's start
            if b"chacha" in alg:  # what sftpgate's protocol layer installs for chacha20
                cipher = enc._cipher  # type: ignore[attr-defined]
                cipher.verify_and_decrypt = types.MethodType(chacha_verify_and_decrypt, cipher)
            conn._recv_encryption = enc
            conn._recv_seq = 0
            conn._inpbuf = b""
            conn._packet = b""
            conn._recv_handler = conn._recv_pkthdr
            before = channel.received
            for piece in pieces:  # sftpgate hands asyncssh its input in 64 KiB pieces
                SSHConnection.data_received(conn, piece)
            if channel.received - before != count:  # _recv_data turns errors into a log line
                raise AssertionError(f"{channel.received - before} of {count} packets received")
            return count * size

        return work

    return make


# -- measuring ------------------------------------------------------------------------------------


def _spin(work: Work, seconds: float, barrier: threading.Barrier) -> tuple[int, float, float]:
    barrier.wait()
    start = time.perf_counter()
    deadline = start + seconds
    done = 0
    while True:
        done += work()
        end = time.perf_counter()
        if end >= deadline:
            return done, start, end


def throughput(works: list[Work], seconds: float, pool: ThreadPoolExecutor) -> float:
    """MB/s of len(works) threads running their work at once: all bytes over the wall time from
    the first start to the last end."""
    barrier = threading.Barrier(len(works))
    futures = [pool.submit(_spin, w, seconds, barrier) for w in works]
    results = [f.result() for f in futures]
    total = sum(r[0] for r in results)
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    return total / wall / 1e6


def releases_gil(work: Work, seconds: float = 0.1) -> bool:
    """Whether a waiting Python thread gets the GIL while `work` runs, whatever the machine's load.

    With a switch interval far above the test's length, the interpreter never asks the running
    thread to hand over the GIL, so the waiting thread can only get it when the call itself
    releases it (Py_BEGIN_ALLOW_THREADS, pyo3's allow_threads). Unlike the two-thread speed-up,
    this does not need an idle core: the waiter only needs to be scheduled once.
    """
    ran: list[float] = []
    go = threading.Event()

    def waiter() -> None:
        go.wait()  # blocked without the GIL; on waking it must take the GIL to go on
        ran.append(time.perf_counter())

    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.01)  # the waiter is inside go.wait()
        go.set()
        start = time.perf_counter()
        while not ran and time.perf_counter() - start < seconds:
            work()
        end = time.perf_counter()
        thread.join()  # releases the GIL: a waiter still waiting runs now, after `end`
    finally:
        sys.setswitchinterval(old)
    return ran[0] < end


def rows() -> list[Row]:
    out = []
    for size in SIZES:
        out += [
            Row("`AESGCM.decrypt` aes128-gcm", size, aesgcm_decrypt("aes128-gcm")),
            Row("`AESGCM.decrypt` aes256-gcm", size, aesgcm_decrypt("aes256-gcm")),
            Row(
                "chacha20-poly1305, sftpgate's (`Cipher(ChaCha20)` + `Poly1305`)",
                size,
                chacha_sftpgate,
            ),
            Row("chacha20-poly1305, stock asyncssh's", size, chacha_stock),
            Row("`hashlib.sha1().update` (releases the GIL above 2047 bytes)", size, sha1_update),
            Row("reference: a Python loop over the packet (holds the GIL)", size, python_loop),
            Row("asyncssh `GCMEncryption.decrypt_packet` aes128-gcm", size, gcm_decrypt_packet),
            Row(
                "asyncssh receive path, aes128-gcm",
                size,
                receive_path(b"aes128-gcm@openssh.com"),
                path_of="`AESGCM.decrypt` aes128-gcm",
            ),
            Row(
                "asyncssh receive path, chacha20-poly1305 (sftpgate's)",
                size,
                receive_path(b"chacha20-poly1305@openssh.com"),
                path_of="chacha20-poly1305, sftpgate's (`Cipher(ChaCha20)` + `Poly1305`)",
            ),
        ]
    return out


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _size(n: int) -> str:
    return f"{n // KIB} KiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1 run of 0.05 s per cell (CI)")
    parser.add_argument("--runs", type=int, help="runs per cell, median reported (default 5)")
    parser.add_argument("--seconds", type=float, help="length of one run (default 0.5)")
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 5)
    seconds = args.seconds or (0.05 if args.quick else 0.5)

    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"Machine: {os.cpu_count()} CPUs · Python {sys.version.split()[0]} · "
        f"asyncssh {asyncssh.__version__} · cryptography {cryptography.__version__} · {date} · "
        f"load average at start {_loadavg()} · {runs} run(s) of {seconds} s per cell\n",
        flush=True,
    )
    table = rows()
    one_us: dict[tuple[str, int], float] = {}
    lines = [
        "| call | packet | 1 thread MB/s | 2 threads MB/s | 2 threads / 1 thread | another thread runs Python during the call | µs per packet (1 thread) | of which Python around the crypto, µs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for row in table:
            works = [row.make(row.size, seed) for seed in (1, 1000)]
            for w in works:  # warm up: first-call costs (imports, allocator growth) out of the runs
                w()
            released = "yes" if releases_gil(works[0]) else "no"
            single, double, ratios = [], [], []
            for _ in range(runs):  # interleaved, so a change in the machine's load hits both
                one = throughput(works[:1], seconds, pool)
                two = throughput(works, seconds, pool)
                single.append(one)
                double.append(two)
                ratios.append(two / one)
            one_mb, two_mb = statistics.median(single), statistics.median(double)
            us = row.size / one_mb  # bytes / (MB/s) = µs
            one_us[(row.call, row.size)] = us
            python = f"{us - one_us[(row.path_of, row.size)]:.1f}" if row.path_of else ""
            spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if runs > 1 else ""
            lines.append(
                f"| {row.call} | {_size(row.size)} | {one_mb:,.0f} | {two_mb:,.0f} | "
                f"{statistics.median(ratios):.2f}×{spread} | {released} | {us:.1f} | {python} |"
            )
    print("\n".join(lines))
    print(
        f"\n- Medians of {runs} interleaved run(s) of {seconds} s (ratio: min–max in brackets); "
        "each thread has its own key and buffers; 2 threads: all bytes over the wall time from "
        "the first start to the last end (≈ 2 needs two idle cores: compare with SHA-1's row).\n"
        "- Another thread runs Python during the call: with the switch interval at 100 s, a "
        "waiting Python thread gets the GIL only if the call releases it (independent of load).\n"
        "- Receive path: asyncssh's own `data_received`/`_recv_pkthdr`/`_recv_packet` on a "
        "connection with only its receive state set, fed ~1 MiB of sealed CHANNEL_DATA packets "
        f"in {RECEIVE_PIECE // KIB} KiB pieces, ending at a stub channel that takes the data "
        "out; the channel, SFTP and file layers above it are not included.\n"
        f"- Load average at end {_loadavg()}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
