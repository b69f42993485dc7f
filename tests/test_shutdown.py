"""A bounded shutdown and a clean failed start, on a real `sftpgate serve` child process.

SIGTERM with clients connected (one idle, one mid-upload) and an Immich upload in flight ends the
process with status 0 within `shutdown_grace_seconds`, closes the clients' connections, parks the
cut-off upload for a resume and leaves no codec worker behind. A start that fails half way (a port
taken) stops what it had started: one error line, no worker processes, the data folder free.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import asyncssh
import pytest
import yaml

from sftpgate.ledger import Ledger

from .conftest import PASSWORD, eventually, gate_config
from .test_crash import ServiceProcess, distinct_jpeg, free_port

GRACE_SECONDS = 4.0
# Python's own exit after the last log line, on a machine shared with other tests.
EXIT_MARGIN_SECONDS = 2.0
MOTION_PHOTO = "heic/samsung-s22-motionphoto-orient6-gps.heic"  # 3.6 MB, sent to Immich as is
CHUNK = 32 << 10
PACE_SECONDS = 0.02  # about 1.6 MB/s: the upload takes seconds, so SIGTERM finds it under way
TAG = "SFTPGATE_TEST_TAG"


def serve_config(
    tmp_path: Path, standin: object, host_keys_dir: Path, client_key: Path, sftp: int, metrics: int
) -> Path:
    config = gate_config(
        tmp_path, standin.url, host_keys_dir, client_key,  # type: ignore[attr-defined]
        sftp={"listen": f"127.0.0.1:{sftp}"}, metrics={"listen": f"127.0.0.1:{metrics}"},
    )  # fmt: skip
    doc = yaml.safe_load(config.read_text())
    doc["shutdown_grace_seconds"] = GRACE_SECONDS
    config.write_text(yaml.safe_dump(doc))
    return config


def codec_workers(tag: str) -> list[int]:
    """Codec worker processes (multiprocessing spawn children) that inherited the test's tag in
    their environment: also replacements started during the stop, and workers a service that is
    gone left behind (no longer its children)."""
    marker = f"{TAG}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return pids


def count_state(data: Path, state: str) -> int:
    ledger = Ledger(data / "sftpgate.db")
    try:
        return ledger.count_by_state().get(state, 0)
    finally:
        ledger.close()


def connect(port: int) -> asyncssh.SSHClientConnection:
    """A password login as the test user (await it, or use it with `async with`)."""
    return asyncssh.connect(
        "127.0.0.1", port, username="phone", password=PASSWORD, known_hosts=None
    )


async def upload_paced(sftp: asyncssh.SFTPClient, path: str, data: bytes) -> None:
    """Write like a phone on a slow uplink: a chunk, a pause, the next chunk."""
    async with sftp.open(path, "wb") as f:
        for offset in range(0, len(data), CHUNK):
            await f.write(data[offset : offset + CHUNK], offset)
            await asyncio.sleep(PACE_SECONDS)  # pacing the client, not synchronisation


@pytest.mark.timeout(240)
async def test_sigterm_with_clients_connected_exits_zero_within_the_grace_and_resumes(
    tmp_path, standin, corpus, host_keys_dir, client_key
):
    sftp_port, metrics_port = free_port(), free_port()
    config = serve_config(tmp_path, standin, host_keys_dir, client_key, sftp_port, metrics_port)
    service = ServiceProcess(config, tmp_path / "service.log", metrics_port)
    tag = uuid.uuid4().hex
    data = tmp_path / "data"
    motion = (corpus / MOTION_PHOTO).read_bytes()
    photo = distinct_jpeg((corpus / "jpeg/htc-desire-gps.jpg").read_bytes(), 0)
    await service.start(env={TAG: tag})
    try:
        assert service.proc is not None
        standin.state.delay_seconds = 60  # Immich holds the photo's upload past the grace
        async with (
            connect(sftp_port) as conn,
            conn.start_sftp_client() as sftp,
            sftp.open("IMG_0.jpg", "wb") as f,
        ):
            await f.write(photo)
        await eventually(
            lambda: count_state(data, "uploading") == 1, what="the photo's upload to Immich"
        )
        idle = await connect(sftp_port)
        idle_sftp = await idle.start_sftp_client()
        assert await idle_sftp.listdir(".")  # logged in, with a session open
        uploading = await connect(sftp_port)
        uploader_sftp = await uploading.start_sftp_client()
        uploader = asyncio.create_task(upload_paced(uploader_sftp, "motion.heic", motion))

        def under_way() -> bool:
            parts = list((data / ".staging").glob("*.part"))
            return any(p.stat().st_size >= 8 * CHUNK for p in parts)

        await eventually(under_way, what="the motion photo's part to grow in .staging/")
        assert not uploader.done()
        assert len(codec_workers(tag)) == 2

        started = time.monotonic()
        service.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(service.proc.wait(), GRACE_SECONDS + 30)
        took = time.monotonic() - started
        assert code == 0, service.log.read_text()[-3000:]
        assert took <= GRACE_SECONDS + EXIT_MARGIN_SECONDS, f"SIGTERM took {took:.1f} s"
        assert codec_workers(tag) == [], "codec workers left behind by the service"
        # Both clients were told: their connections are closed.
        await asyncio.wait_for(idle.wait_closed(), 5)
        with pytest.raises((asyncssh.Error, OSError)):
            await asyncio.wait_for(uploader, 5)
        uploading.close()
        parked = list((data / ".resume").glob("*.part"))
        assert len(parked) == 1, "the cut-off upload must be kept for a resume"
        arrived = parked[0].stat().st_size
        assert 0 < arrived < len(motion)
        assert parked[0].read_bytes() == motion[:arrived]

        standin.state.delay_seconds = 0
        await service.start(env={TAG: tag})
        async with connect(sftp_port) as conn, conn.start_sftp_client() as sftp:
            assert (await sftp.stat("motion.heic")).size == arrived  # the client sees the part
            # Resume (OpenSSH `reput`): append what is missing, from where the part ends.
            async with sftp.open("motion.heic", "ab") as f:
                await f.write(motion[arrived:], arrived)

        def delivered() -> bool:
            names = [a.original_file_name for a in standin.state.assets.values()]
            return "motion.heic" in names and "IMG_0.jxl" in names

        await eventually(delivered, timeout=90, what="both files to reach Immich")
        assert await service.terminate() == 0
    finally:
        await service.kill_if_running()
    names = sorted(a.original_file_name for a in standin.state.assets.values())
    assert names == ["IMG_0.jxl", "motion.heic"]
    (asset,) = [a for a in standin.state.assets.values() if a.original_file_name == "motion.heic"]
    assert asset.checksum == hashlib.sha1(motion).hexdigest()
    assert asset.path is not None and asset.path.read_bytes() == motion


@pytest.mark.parametrize("taken", ["sftp", "metrics"])
async def test_a_start_that_fails_half_way_stops_what_it_started(
    tmp_path, standin, host_keys_dir, client_key, taken
):
    """The SFTP listener starts after the ledger, the workers and the pipeline; the metrics one
    after the SFTP listener too."""
    sftp_port, metrics_port = free_port(), free_port()
    config = serve_config(tmp_path, standin, host_keys_dir, client_key, sftp_port, metrics_port)
    log = tmp_path / "service.log"
    tag = uuid.uuid4().hex
    port = sftp_port if taken == "sftp" else metrics_port
    with socket.socket() as holder, log.open("ab") as out:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sftpgate.main", "--config", str(config), "serve",
            stdout=out, stderr=out, env={**os.environ, TAG: tag},
        )  # fmt: skip
        try:
            code = await asyncio.wait_for(proc.wait(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = log.read_text()
    assert code != 0
    errors = [line for line in text.splitlines() if " error " in line]
    assert len(errors) == 1, text
    assert "start failed" in errors[0] and str(port) in errors[0], errors[0]
    assert "Traceback" not in text
    assert codec_workers(tag) == [], "codec workers left behind by the failed start"
    # The data folder is free again: a start on free ports serves.
    service = ServiceProcess(config, log, metrics_port)
    await service.start()
    try:
        assert await service.terminate() == 0
    finally:
        await service.kill_if_running()
