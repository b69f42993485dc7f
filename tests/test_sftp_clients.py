"""Real SFTP clients against a running sftpgate: OpenSSH sftp/scp, paramiko, asyncssh, rclone 1.60,
lftp, and a FolderSync-like request sequence. Each test checks what the server received (the
ledger's SHA-1, size and mtime per path) and what the client sees afterwards.

Test files are random bytes, so the pipeline quickly sets them aside in undone/ (not a photo); the
SFTP side must show them exactly as delivered files (remembered), which is what these tests need.
Also here: the helpers the other SFTP test files share (a gate with extra `sftp:` keys, a server
in its own process for memory and log checks, client command lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from sftpgate.ledger import Outcome, State

from .conftest import PASSWORD, eventually, finished, gate_config

# -- shared helpers --------------------------------------------------------------------------


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (see .ci for the Debian packages)")
    return path


async def run(
    *cmd: str,
    timeout: float = 60,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client to completion (bounded), without blocking the server in this event loop."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode or 0, out.decode(), err.decode())


def ssh_options(key: Path | None = None, known_hosts: Path | None = None) -> list[str]:
    opts = ["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]
    if known_hosts is None:
        opts += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    else:
        opts += ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}"]
    if key is not None:
        opts += ["-i", str(key), "-o", "IdentitiesOnly=yes"]
    return opts


async def sftp_batch(
    port: int,
    key: Path,
    commands: str,
    cwd: Path,
    user: str = "phone",
    extra: tuple[str, ...] = (),
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """OpenSSH `sftp -b`: every command must succeed unless it starts with `-`."""
    need("sftp")
    batch = cwd / "batch.txt"
    batch.write_text(commands)
    result = await run(
        "sftp", "-b", str(batch), "-P", str(port), *ssh_options(key), *extra, f"{user}@127.0.0.1",
        cwd=cwd, timeout=120,
    )  # fmt: skip
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def connect(port: int, user: str = "phone", **kwargs: Any) -> Any:
    kwargs.setdefault("password", PASSWORD)
    return asyncssh.connect(
        "127.0.0.1", port, username=user, known_hosts=None, client_keys=kwargs.pop("keys", None),
        **kwargs,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def running_gate(
    tmp_path: Path, standin: Any, host_keys_dir: Path, client_key: Path, **sftp: Any
) -> AsyncIterator[Any]:
    """A started service whose `sftp:` section has the given keys on top of the test config."""
    from sftpgate.config import load_config
    from sftpgate.server import Service

    service = Service(
        load_config(gate_config(tmp_path, standin.url, host_keys_dir, client_key, sftp=sftp))
    )
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def ledger_rows(gate: Any) -> dict[tuple[str, str], Any]:
    """The latest ledger row per (user, path): what the server recorded for each upload."""
    rows = await gate.db(lambda db: list(db.iter_all()))
    return {(r.user, r.path): r for r in rows}


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def make_files(folder: Path, sizes: dict[str, int], mtime: int = 1_600_000_000) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, size in sizes.items():
        data = os.urandom(size)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        os.utime(folder / name, (mtime, mtime))
        out[name] = data
    return out


class ServerProcess:
    """`sftpgate serve` in its own process: its memory and its log are its own."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ServerProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sftpgate.main", "--config", str(self.config), "serve",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        started = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(started))
        self.port = await asyncio.wait_for(started, 60)
        return self

    async def _read(self, started: asyncio.Future[int]) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.lines.append(text)
            m = re.search(r'started\b.*?\bsftp_port"?[=:]\s*(\d+)', text)  # text or JSON log
            if m and not started.done():
                started.set_result(int(m.group(1)))
        if not started.done():
            started.set_exception(AssertionError("server exited:\n" + "\n".join(self.lines)))

    def rss_bytes(self) -> int:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        assert m
        return int(m.group(1)) * 1024

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await self._reader


async def sample_rss(server: ServerProcess, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], server.rss_bytes())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)  # a sampling period, not synchronisation


# -- OpenSSH sftp ----------------------------------------------------------------------------


async def test_openssh_sftp_tree_temp_name_chmod_put_p_rename_and_ls(gate, client_key, tmp_path):
    local = tmp_path / "local"
    tree = make_files(local / "Camera", {"2024/07/IMG_0001.bin": 300_000, "b.bin": 5_000})
    single = make_files(local, {"single.bin": 70_000}, mtime=1_500_000_000)["single.bin"]
    commands = (
        "mkdir Up\nmkdir Up/x\nmkdir Up/x/y\n"
        "put -R Camera Up/x/y\n"  # creates Up/x/y/Camera/2024/07 on the way (mkdir -p)
        "put -p single.bin single.bin.tmp\n"  # times preserved: FSETSTAT before CLOSE
        "chmod 600 single.bin.tmp\n"
        "ls -l single.bin.tmp\n"
        "rename single.bin.tmp single.bin\n"
        "ls -l Up/x/y/Camera/2024/07\n"
    )
    out = (await sftp_batch(gate.sftp.port, client_key, commands, local)).stdout
    assert re.search(r"-rw-------\s.*\s70000 .*single\.bin\.tmp", out), out
    assert re.search(r"\s300000 .*IMG_0001\.bin", out), out
    await gate.pipeline.wait_for(finished(3), timeout=60)
    rows = await ledger_rows(gate)
    for name, data in tree.items():
        row = rows[("phone", f"Up/x/y/Camera/{name}")]
        assert (row.sha1, row.size) == (sha1(data), len(data))
    row = rows[("phone", "single.bin")]
    assert (row.sha1, row.mtime) == (sha1(single), 1_500_000_000)
    assert ("phone", "single.bin.tmp") not in rows  # the rename finished it under its final name
    # Delivered and gone from disk, the client still sees its files with the sizes it sent.
    out = (
        await sftp_batch(gate.sftp.port, client_key, "ls -l\nls -l Up/x/y/Camera\n", local)
    ).stdout
    assert re.search(r"\s70000 .*single\.bin", out) and re.search(r"\s5000 .*b\.bin", out), out


async def test_openssh_reput_resumes_an_upload_cut_off_mid_way(gate, client_key, tmp_path):
    data = make_files(tmp_path, {"video.bin": 24_000_000})["video.bin"]
    batch = tmp_path / "put.txt"
    batch.write_text("put video.bin\n")
    # 40 Mbit/s: the upload takes ~5 s, so it is surely cut off part-way.
    proc = await asyncio.create_subprocess_exec(
        need("sftp"), "-l", "40000", "-b", str(batch), "-P", str(gate.sftp.port),
        *ssh_options(client_key), "phone@127.0.0.1",
        cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    staging = gate.layout.staging

    def arrived() -> int:
        return sum(p.stat().st_size for p in staging.iterdir())

    await eventually(lambda: arrived() >= 2_000_000, what="some bytes to arrive")
    os.killpg(proc.pid, signal.SIGKILL)  # the phone loses Wi-Fi
    await proc.wait()
    part = await eventually(lambda: gate.sftp.parts.get("phone", "video.bin"), what="a kept part")
    assert 2_000_000 <= part.size < len(data)
    assert not (gate.layout.watch / "phone" / "video.bin").exists()
    assert await gate.db(lambda db: db.count_by_state()) == {}  # nothing for the pipeline yet
    out = await sftp_batch(
        gate.sftp.port, client_key, "ls -l video.bin\nreput video.bin\n", tmp_path
    )
    assert re.search(rf"\s{part.size} .*video\.bin", out.stdout), out.stdout
    await gate.pipeline.wait_for(finished(1), timeout=60)
    row = (await ledger_rows(gate))[("phone", "video.bin")]
    assert (row.sha1, row.size) == (sha1(data), len(data))
    assert not any((gate.layout.root / ".resume").iterdir())


@pytest.mark.parametrize(
    "cipher",
    ["chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com", "aes256-ctr"],
)
async def test_each_cipher_delivers_the_bytes_and_their_sha1(gate, client_key, tmp_path, cipher):
    """Large enough for several background hashing jobs and fdatasyncs (UploadFile); the SHA-1
    the server recorded while the bytes arrived must be the file's."""
    from sftpgate.sftp.filesystem import UploadFile

    size = 3 * max(UploadFile.HASH_CHUNK, UploadFile.SYNC_EVERY) + 12_345
    data = make_files(tmp_path, {"clip.mov": size})["clip.mov"]
    await sftp_batch(gate.sftp.port, client_key, "put clip.mov\n", tmp_path, extra=("-c", cipher))
    await gate.pipeline.wait_for(finished(1), timeout=60)
    row = (await ledger_rows(gate))[("phone", "clip.mov")]
    assert (row.sha1, row.size) == (sha1(data), size)


async def test_offering_only_aes_gcm_makes_openssh_clients_use_it(
    tmp_path, standin, host_keys_dir, client_key
):
    """`sftp.ciphers`: the client's own order picks the cipher, so an OpenSSH client that
    prefers chacha20-poly1305 uses AES-GCM once that is all the server offers, and a client that
    allows chacha20 only cannot connect."""
    data = make_files(tmp_path, {"IMG_0001.JPG": 70_000})
    only_gcm = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
    async with running_gate(tmp_path, standin, host_keys_dir, client_key, ciphers=only_gcm) as g:
        result = await sftp_batch(
            g.sftp.port, client_key, "put IMG_0001.JPG\n", tmp_path, extra=("-v",)
        )
        assert "client->server cipher: aes128-gcm@openssh.com" in result.stderr, result.stderr
        refused = await sftp_batch(
            g.sftp.port, client_key, "ls\n", tmp_path,
            extra=("-v", "-c", "chacha20-poly1305@openssh.com"), check=False,
        )  # fmt: skip
        assert refused.returncode != 0
        assert "no matching cipher" in refused.stderr, refused.stderr
        await g.pipeline.wait_for(finished(1), timeout=60)
        row = (await ledger_rows(g))[("phone", "IMG_0001.JPG")]
        assert (row.sha1, row.size) == (sha1(data["IMG_0001.JPG"]), 70_000)


async def test_openssh_put_f_flushes_each_file_and_delivers_it(gate, client_key, tmp_path):
    """`sftp -f` sends fsync@openssh.com before each CLOSE; it is answered while the part's own
    background sync may still run, and the file is delivered once, whole."""
    from sftpgate.sftp.filesystem import UploadFile

    data = make_files(tmp_path, {"a.mov": 3 * UploadFile.SYNC_EVERY + 7, "b.jpg": 1000})
    result = await sftp_batch(
        gate.sftp.port, client_key, "put a.mov\nput b.jpg\n", tmp_path, extra=("-f", "-vvv")
    )
    sent = result.stderr.count("Sending SSH2_FXP_EXTENDED(fsync@openssh.com)")
    assert sent == 2, "the server offers the extension and the client uses it for each file"
    await gate.pipeline.wait_for(finished(2), timeout=60)
    rows = await ledger_rows(gate)
    for name, content in data.items():
        assert (rows[("phone", name)].sha1, rows[("phone", name)].size) == (
            sha1(content),
            len(content),
        )


def test_the_chacha20_receive_path_matches_asyncssh_and_refuses_a_forged_packet():
    from asyncssh.crypto.chacha import ChachaCipher

    from sftpgate.sftp.protocol import chacha_verify_and_decrypt

    cipher = ChachaCipher(os.urandom(64))
    for size in (0, 16, 1000, 32768, 262144):
        nonce, header, payload = os.urandom(8), os.urandom(4), os.urandom(size)
        packet, tag = cipher.encrypt_and_sign(header, payload, nonce)
        enc_header, enc_payload = packet[:4], packet[4:]
        assert chacha_verify_and_decrypt(cipher, enc_header, enc_payload, nonce, tag) == payload
        forged = bytes([enc_header[0] ^ 1]) + enc_header[1:]
        assert chacha_verify_and_decrypt(cipher, forged, enc_payload, nonce, tag) is None
        assert chacha_verify_and_decrypt(cipher, enc_header, enc_payload, nonce, bytes(16)) is None


class RawSFTPSession(asyncssh.SSHClientSession[bytes]):
    """The sftp subsystem as bytes; each `data_received` is one SSH CHANNEL_DATA packet."""

    def __init__(self) -> None:
        self.packets = 0
        self.buffer = b""
        self.arrived = asyncio.Event()

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.packets += 1
        self.buffer += data
        self.arrived.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.arrived.set()

    async def message(self) -> tuple[int, int, bytes]:
        """(type, request id, rest) of the next SFTP message from the server."""
        while len(self.buffer) < 4 or len(self.buffer) < 4 + int.from_bytes(self.buffer[:4]):
            self.arrived.clear()
            await self.arrived.wait()
        size = int.from_bytes(self.buffer[:4])
        body, self.buffer = self.buffer[4 : 4 + size], self.buffer[4 + size :]
        return body[0], int.from_bytes(body[1:5]), body[5:]


def sftp_message(kind: int, request_id: int, *fields: bytes) -> bytes:
    body = bytes([kind]) + request_id.to_bytes(4) + b"".join(fields)
    return len(body).to_bytes(4) + body


def sftp_string(value: bytes) -> bytes:
    return len(value).to_bytes(4) + value


async def test_replies_to_a_batch_of_requests_travel_together_in_order_even_at_the_end(
    gate, tmp_path
):
    """rclone keeps 64 small WRITEs in flight: their replies go out in a few channel packets, not
    one each, in request order; a session that sends EOF right behind its requests still gets
    every reply before the channel closes."""
    init, version, open_, close, write, realpath = 1, 2, 3, 4, 6, 16
    status, handle_reply, name = 101, 102, 104
    pieces = [os.urandom(4096) for _ in range(32)]
    async with connect(gate.sftp.port) as conn:
        channel, raw = await conn.create_session(RawSFTPSession, subsystem="sftp", encoding=None)
        channel.write(sftp_message(init, 3))
        assert (await raw.message())[:2] == (version, 3)
        flags = (0x02 | 0x08 | 0x10).to_bytes(4)  # WRITE | CREAT | TRUNC
        channel.write(sftp_message(open_, 1, sftp_string(b"burst.bin"), flags, bytes(4)))
        kind, _, rest = await raw.message()
        assert kind == handle_reply
        handle = rest[4 : 4 + int.from_bytes(rest[:4])]
        requests = [
            sftp_message(write, 2 + i, sftp_string(handle), (i * 4096).to_bytes(8), sftp_string(p))
            for i, p in enumerate(pieces)
        ]
        requests.append(sftp_message(close, 34, sftp_string(handle)))
        requests += [sftp_message(realpath, 35 + i, sftp_string(b".")) for i in range(8)]
        before = raw.packets
        channel.write(b"".join(requests))
        channel.write_eof()
        async with asyncio.timeout(30):
            replies = [await raw.message() for _ in requests]
            await channel.wait_closed()
    assert [(kind, rid) for kind, rid, _ in replies] == [(status, rid) for rid in range(2, 35)] + [
        (name, rid) for rid in range(35, 43)
    ]
    assert all(rest[:4] == bytes(4) for _, _, rest in replies[:33])  # SSH_FX_OK
    assert raw.packets - before <= 8, f"{raw.packets - before} packets for {len(requests)} replies"
    await gate.pipeline.wait_for(finished(1), timeout=60)
    row = (await ledger_rows(gate))[("phone", "burst.bin")]
    assert row.sha1 == sha1(b"".join(pieces))


async def test_scp_in_sftp_mode_works_and_stays_in_the_jail(gate, client_key, tmp_path):
    """OpenSSH ≥ 9 `scp` speaks SFTP; it must succeed (exit status 0) and land inside the jail.
    Legacy `scp -O` is an exec request and is refused (test_sftp_security.py)."""
    data = make_files(tmp_path, {"a.bin": 10_000})["a.bin"]
    for target in ("a.bin", "../../../escaped.bin"):
        result = await run(
            need("scp"), "-P", str(gate.sftp.port), *ssh_options(client_key),
            str(tmp_path / "a.bin"), f"phone@127.0.0.1:{target}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    await gate.pipeline.wait_for(finished(2), timeout=60)
    rows = await ledger_rows(gate)
    assert rows[("phone", "a.bin")].sha1 == rows[("phone", "escaped.bin")].sha1 == sha1(data)
    assert (
        not (tmp_path / "escaped.bin").exists() and not (tmp_path.parent / "escaped.bin").exists()
    )


# -- paramiko and asyncssh -------------------------------------------------------------------


async def test_paramiko_put_confirm_listdir_rename_chmod_utime(gate, tmp_path):
    import paramiko

    files = make_files(tmp_path, {"IMG_1.bin": 100_000, "IMG_2.bin": 3_000})

    def session() -> dict[str, Any]:
        transport = paramiko.Transport(("127.0.0.1", gate.sftp.port))
        try:
            transport.connect(username="phone", password=PASSWORD)
            sftp = paramiko.SFTPClient.from_transport(transport)
            assert sftp is not None
            sftp.mkdir("P")
            sftp.put(str(tmp_path / "IMG_1.bin"), "P/IMG_1.bin", confirm=True)
            sftp.put(str(tmp_path / "IMG_2.bin"), "P/IMG_2.bin.part", confirm=True)
            sftp.chmod("P/IMG_2.bin.part", 0o640)
            sftp.utime("P/IMG_2.bin.part", (1_400_000_000, 1_400_000_000))
            mode = sftp.stat("P/IMG_2.bin.part").st_mode
            sftp.posix_rename("P/IMG_2.bin.part", "P/IMG_2.bin")
            return {"mode": mode, "names": sorted(sftp.listdir("P")), "cwd": sftp.normalize(".")}
        finally:
            transport.close()

    seen = await asyncio.to_thread(session)  # paramiko blocks; the server runs in this loop
    assert seen["mode"] & 0o777 == 0o640
    assert seen["names"] == ["IMG_1.bin", "IMG_2.bin"]
    assert seen["cwd"] == "/"
    await gate.pipeline.wait_for(finished(2), timeout=60)
    rows = await ledger_rows(gate)
    assert rows[("phone", "P/IMG_1.bin")].sha1 == sha1(files["IMG_1.bin"])
    assert (rows[("phone", "P/IMG_2.bin")].sha1, rows[("phone", "P/IMG_2.bin")].mtime) == (
        sha1(files["IMG_2.bin"]),
        1_400_000_000,
    )


async def test_asyncssh_client_makedirs_put_preserve_and_rename_over_existing(gate, tmp_path):
    files = make_files(tmp_path, {"one.bin": 1_000_000, "two.bin": 2_000}, mtime=1_300_000_000)
    async with connect(gate.sftp.port) as conn, conn.start_sftp_client() as sftp:
        await sftp.makedirs("A/B/C")
        await sftp.put(str(tmp_path / "one.bin"), "A/B/C/one.bin.tmp", preserve=True)
        await sftp.put(str(tmp_path / "two.bin"), "A/B/C/other.bin.tmp")
        await sftp.rename("A/B/C/one.bin.tmp", "A/B/C/final.bin")
        # posix-rename over an existing name replaces it (sync apps rename over the old file).
        await sftp.posix_rename("A/B/C/other.bin.tmp", "A/B/C/final.bin")
        assert (await sftp.stat("A/B/C/final.bin")).size == 2_000
        assert await sftp.exists("A/B/C") and await sftp.isdir("A/B")
        assert await sftp.realpath("A/B/../B/C") == "/A/B/C"
    await gate.pipeline.wait_for(finished(1), timeout=60)
    rows = await ledger_rows(gate)
    assert rows[("phone", "A/B/C/final.bin")].sha1 == sha1(files["two.bin"])


async def test_asyncssh_resume_continues_the_part_and_survives_a_restart(
    tmp_path, standin, host_keys_dir, client_key
):
    data = os.urandom(3_000_000)
    half = 1_234_567
    async with running_gate(tmp_path, standin, host_keys_dir, client_key) as gate:
        conn = await connect(gate.sftp.port)
        sftp = await conn.start_sftp_client()
        f = await sftp.open("clip.bin", "wb")
        await f.write(data[:half], 0)
        conn.abort()
        await eventually(lambda: gate.sftp.parts.get("phone", "clip.bin"), what="a kept part")
        async with connect(gate.sftp.port) as conn, conn.start_sftp_client() as sftp:
            names = {n.filename: n.attrs.size for n in await sftp.readdir(".")}
            assert names["clip.bin"] == half  # the listing shows what arrived
            # A new upload with TRUNC of another cut-off part starts afresh.
            g = await sftp.open("other.bin", "wb")
            await g.write(b"x" * 1000, 0)
        await eventually(lambda: gate.sftp.parts.get("phone", "other.bin"), what="second part")
    # Restart: the parts are found again, without their running hash.
    async with running_gate(tmp_path, standin, host_keys_dir, client_key) as gate:
        async with connect(gate.sftp.port) as conn, conn.start_sftp_client() as sftp:
            assert (await sftp.stat("clip.bin")).size == half
            async with sftp.open(
                "clip.bin", asyncssh.FXF_WRITE | asyncssh.FXF_APPEND, encoding=None
            ) as f:
                await f.write(data[half:], half)
            async with sftp.open("other.bin", "wb") as g:  # TRUNC: the old part is dropped
                await g.write(b"y" * 10, 0)
        await gate.pipeline.wait_for(finished(2), timeout=60)
        rows = await ledger_rows(gate)
        assert rows[("phone", "clip.bin")].sha1 == sha1(data)
        assert rows[("phone", "other.bin")].sha1 == sha1(b"y" * 10)
        assert not any((gate.layout.root / ".resume").iterdir())


# -- rclone and lftp -------------------------------------------------------------------------


def rclone_args(port: int, key: Path) -> list[str]:
    # The settings a user without a shell on the server needs (no md5sum/sha1sum commands).
    return [
        "--sftp-host", "127.0.0.1", "--sftp-port", str(port), "--sftp-user", "phone",
        "--sftp-key-file", str(key), "--sftp-shell-type", "none",
        "--sftp-md5sum-command", "none", "--sftp-sha1sum-command", "none",
        "--sftp-disable-hashcheck", "--retries", "1", "--low-level-retries", "1", "-v",
    ]  # fmt: skip


async def rclone_copy_twice(gate: Any, client_key: Path, tmp_path: Path) -> None:
    """rclone copies a camera folder (four transfers at once, each on its own connection; the
    mtime set by path after CLOSE), and a second copy finds it all there and sends nothing."""
    need("rclone")
    # 4,096- and 8,192-byte tails make rclone 1.60 send WRITE packets with trailing bytes.
    files = make_files(tmp_path / "DCIM", {"a.bin": 200_000 + 4096, "b.bin": 8192, "c.bin": 333})
    env = {**os.environ, "RCLONE_CONFIG": str(tmp_path / "none.conf")}
    args = [need("rclone"), "copy", "--transfers", "4", str(tmp_path / "DCIM"), ":sftp:Camera"]
    first = await run(*args, *rclone_args(gate.sftp.port, client_key), env=env)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("Copied (new)") == 3, first.stderr
    await gate.pipeline.wait_for(finished(3), timeout=60)
    rows = await ledger_rows(gate)
    for name, data in files.items():
        row = rows[("phone", f"Camera/{name}")]
        assert (row.sha1, row.mtime) == (sha1(data), 1_600_000_000)  # SETSTAT after CLOSE
    received = gate.metrics.received_files._value.get()
    second = await run(*args, *rclone_args(gate.sftp.port, client_key), env=env)
    assert second.returncode == 0, second.stderr
    assert "Copied" not in second.stderr and "nothing to transfer" in second.stderr
    assert gate.metrics.received_files._value.get() == received


async def test_rclone_copies_a_camera_folder_and_a_second_sync_sends_nothing(
    gate, client_key, tmp_path
):
    await rclone_copy_twice(gate, client_key, tmp_path)


async def test_lftp_mirror_uploads_and_a_second_mirror_sends_nothing(gate, client_key, tmp_path):
    need("lftp")
    files = make_files(tmp_path / "cam", {"IMG_1.bin": 100_000, "IMG 2.bin": 1_000})
    connect_program = "ssh -a -x " + " ".join(ssh_options(client_key))
    script = (
        f"set sftp:connect-program '{connect_program}'; set net:max-retries 1; "
        f"open -u phone, -p {gate.sftp.port} sftp://127.0.0.1; mirror -R --verbose cam L"
    )
    first = await run(need("lftp"), "-c", script, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    await gate.pipeline.wait_for(finished(2), timeout=60)
    rows = await ledger_rows(gate)
    for name, data in files.items():
        row = rows[("phone", f"L/{name}")]
        assert (row.sha1, row.mtime) == (sha1(data), 1_600_000_000)  # FSETSTAT before CLOSE
    second = await run(need("lftp"), "-c", script, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "Transferring" in first.stdout and "Transferring" not in second.stdout, second.stdout
    assert gate.metrics.received_files._value.get() == 2


# -- a FolderSync-like client ----------------------------------------------------------------


async def foldersync_like(sftp: Any, local: Path, remote: str) -> list[str]:
    """One sync pass as FolderSync-style apps do it: list; per file stat, open CREAT|TRUNC under
    a temporary name, 32 KiB writes, fstat, close, setstat(mtime), stat, rename. A file whose
    name, size and mtime are already in the listing is skipped. Returns what was uploaded."""
    try:
        listing = {n.filename: n.attrs for n in await sftp.readdir(remote)}
    except asyncssh.SFTPNoSuchFile:
        await sftp.mkdir(remote)
        listing = {}
    uploaded = []
    for f in sorted(local.iterdir()):
        st = f.stat()
        seen = listing.get(f.name)
        if seen is not None and (seen.size, seen.mtime) == (st.st_size, int(st.st_mtime)):
            continue
        target, temp = f"{remote}/{f.name}", f"{remote}/{f.name}.tmp"
        with contextlib.suppress(asyncssh.SFTPNoSuchFile):
            await sftp.stat(target)
        data = f.read_bytes()
        flags = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC
        async with sftp.open(temp, flags, encoding=None) as h:
            for off in range(0, len(data), 32768):
                await h.write(data[off : off + 32768], off)
            assert (await h.stat()).size == len(data)
        await sftp.setstat(temp, asyncssh.SFTPAttrs(atime=int(st.st_mtime), mtime=int(st.st_mtime)))
        assert (await sftp.stat(temp)).size == len(data)
        await sftp.rename(temp, target)
        uploaded.append(f.name)
    return uploaded


async def test_foldersync_like_sync_then_the_same_sync_uploads_nothing(gate, tmp_path):
    camera = tmp_path / "Camera"
    files = make_files(camera, {"IMG_1.bin": 150_000, "IMG_2.bin": 32768 * 3, "IMG_3.bin": 1})
    async with connect(gate.sftp.port) as conn, conn.start_sftp_client() as sftp:
        assert await foldersync_like(sftp, camera, "Camera") == sorted(files)
        await gate.pipeline.wait_for(finished(3), timeout=60)
        assert not any((gate.layout.watch / "phone" / "Camera").iterdir())  # all delivered
        assert await foldersync_like(sftp, camera, "Camera") == []
        # The comparison can fail: a changed file goes again, and only that one.
        (camera / "IMG_3.bin").write_bytes(b"changed")
        os.utime(camera / "IMG_3.bin", (1_700_000_000, 1_700_000_000))
        assert await foldersync_like(sftp, camera, "Camera") == ["IMG_3.bin"]
    rows = await ledger_rows(gate)
    assert rows[("phone", "Camera/IMG_1.bin")].sha1 == sha1(files["IMG_1.bin"])
    assert all(not path.endswith(".tmp") for _, path in rows)


# -- names, trees, big folders, big files ----------------------------------------------------

NAMES = [
    "IMG 0001 (copy).bin",
    unicodedata.normalize("NFC", "Café Ünïcödé.bin"),
    unicodedata.normalize("NFD", "Café Ünïcödé.bin"),
    "📷 Urlaub 🏖️ 2024.bin",
    "日本語の名前.bin",
]


async def test_names_with_spaces_nfc_nfd_and_emoji_stay_byte_exact(gate, client_key, tmp_path):
    assert NAMES[1].encode() != NAMES[2].encode()  # two different names on a POSIX disk
    local = tmp_path / "names"
    files = make_files(local, {n: 1000 + i for i, n in enumerate(NAMES)})
    async with connect(gate.sftp.port) as conn, conn.start_sftp_client() as sftp:
        await sftp.mkdir("Ü 📁")
        for name in NAMES[:3]:
            await sftp.put(str(local / name), f"Ü 📁/{name}")
    # The same through OpenSSH's sftp, with its own quoting.
    commands = "".join(f'put "{n}" "Ü 📁/{n}"\n' for n in NAMES[3:])
    await sftp_batch(gate.sftp.port, client_key, commands, local)
    await gate.pipeline.wait_for(finished(len(NAMES)), timeout=60)
    rows = await ledger_rows(gate)
    for name in NAMES:
        assert rows[("phone", f"Ü 📁/{name}")].sha1 == sha1(files[name])
    async with connect(gate.sftp.port) as conn, conn.start_sftp_client(path_encoding=None) as sftp:
        listed = {n.filename: n.attrs.size for n in await sftp.readdir("Ü 📁".encode())}
    for i, name in enumerate(NAMES):
        assert listed[name.encode()] == 1000 + i


async def test_a_deep_tree_uploads_and_lists(gate, tmp_path):
    deep = "/".join(f"level{i:02d}" for i in range(60))
    async with connect(gate.sftp.port) as conn, conn.start_sftp_client() as sftp:
        await sftp.makedirs(deep)
        async with sftp.open(f"{deep}/leaf.bin", "wb") as f:
            await f.write(b"leaf")
        await gate.pipeline.wait_for(finished(1), timeout=60)
        assert (await sftp.stat(f"{deep}/leaf.bin")).size == 4
        assert await sftp.listdir(deep.rsplit("/", 1)[0]) == [".", "..", "level59"]
        assert [n for n in await sftp.listdir(deep) if n == "leaf.bin"]


async def test_ten_thousand_files_in_one_folder_list_quickly(gate, client_key, tmp_path):
    """10,000 files on disk and 10,000 remembered (delivered) ones, listed by asyncssh and by
    OpenSSH `ls -l`. The on-disk ones sit in a dot-folder, which the intake never adopts."""
    n = 10_000
    on_disk = gate.layout.watch / "phone" / ".many"
    on_disk.mkdir()
    for i in range(n):
        (on_disk / f"IMG_{i:05d}.jpg").write_bytes(b"x")

    def remember(db: Any) -> None:
        # Delivered rows, written straight into the SQLite file in one transaction: the state
        # machine has no step that creates a finished upload out of nothing.
        now = time.time()
        db._db.execute("BEGIN")
        db._db.executemany(
            "INSERT INTO originals (user, path, state, outcome, sha1, size, mtime, received_at,"
            " updated_at) VALUES ('phone', ?, ?, ?, ?, ?, 1600000000, ?, ?)",
            [
                (
                    f"many/IMG_{i:05d}.jpg",
                    State.DONE,
                    Outcome.UPLOADED,
                    f"{i:040x}",
                    1000 + i,
                    now,
                    now,
                )
                for i in range(n)
            ],
        )
        db._db.execute("COMMIT")

    await gate.db(remember)
    timings = {}
    async with connect(gate.sftp.port) as conn, conn.start_sftp_client() as sftp:
        for folder in (".many", "many"):
            started = time.monotonic()
            names = await sftp.readdir(folder)
            timings[folder] = time.monotonic() - started
            assert len(names) == n + 2
        assert {x.filename: x.attrs.size for x in names}["IMG_09999.jpg"] == 10_999
        started = time.monotonic()
        for i in range(0, n, 500):  # stat of names that do not exist: no listing behind them
            with pytest.raises(asyncssh.SFTPNoSuchFile):
                await sftp.stat(f"many/new_{i}.jpg")
        timings["20 stats"] = time.monotonic() - started
    started = time.monotonic()
    out = await sftp_batch(gate.sftp.port, client_key, "ls -l many\n", tmp_path)
    timings["openssh ls -l"] = time.monotonic() - started
    assert out.stdout.count("IMG_") == n
    print("listing times (s):", {k: round(v, 3) for k, v in timings.items()})
    assert timings[".many"] < 5 and timings["many"] < 5 and timings["openssh ls -l"] < 10
    assert timings["20 stats"] < 1


async def upload_big_file_with_flat_memory(
    tmp_path: Path, standin: Any, host_keys_dir: Path, client_key: Path, size: int
) -> dict[str, float]:
    """A sparse file of `size` bytes through OpenSSH sftp to a server in its own process, whose
    RSS is sampled every 50 ms. A temporary name keeps the pipeline out of the measurement."""
    config = gate_config(tmp_path, standin.url, host_keys_dir, client_key)
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        f.truncate(size)
    async with ServerProcess(config) as server:
        await sftp_batch(server.port, client_key, "put big.bin warmup.tmp\n", tmp_path)
        big.unlink()
        with big.open("wb") as f:
            f.truncate(size)
        baseline = server.rss_bytes()
        peak, stop = [baseline], asyncio.Event()
        sampler = asyncio.create_task(sample_rss(server, peak, stop))
        started = time.monotonic()
        await sftp_batch(server.port, client_key, "put big.bin big.bin.tmp\n", tmp_path)
        seconds = time.monotonic() - started
        stop.set()
        await sampler
    landed = tmp_path / "data" / "watch" / "phone" / "big.bin.tmp"
    assert landed.stat().st_size == size
    stats = {
        "seconds": seconds,
        "baseline_mib": baseline / 2**20,
        "peak_growth_mib": (peak[0] - baseline) / 2**20,
    }
    print(f"{size / 2**20:.0f} MiB upload:", {k: round(v, 1) for k, v in stats.items()})
    return stats


async def test_half_gigabyte_upload_keeps_server_memory_flat(
    tmp_path, standin, host_keys_dir, client_key
):
    stats = await upload_big_file_with_flat_memory(
        tmp_path, standin, host_keys_dir, client_key, 512 * 2**20
    )
    assert stats["peak_growth_mib"] < 48


@pytest.mark.slow
async def test_five_gigabyte_upload_keeps_server_memory_flat(
    tmp_path, standin, host_keys_dir, client_key, request
):
    # About two minutes on 2 cores: only when asked for with `-m slow`.
    markexpr = request.config.getoption("markexpr", "") or ""
    if "slow" not in markexpr or "not slow" in markexpr:
        pytest.skip("5 GB upload: run with `pytest -m slow`")
    stats = await upload_big_file_with_flat_memory(
        tmp_path, standin, host_keys_dir, client_key, 5 * 2**30
    )
    assert stats["peak_growth_mib"] < 48
