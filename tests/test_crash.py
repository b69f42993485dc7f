"""Nothing lost, nothing twice — under SIGKILL at random instants.

A real `sftpgate serve` process receives a stream of distinct photos from a real SFTP client that
behaves like a sync app (on a broken connection it reconnects and sends the file again). The test
kills the service with SIGKILL at random moments — mid-upload, mid-rename, mid-conversion,
mid-HTTP request, between Immich's answer and the ledger commit — and restarts it each time.
At the end every photo whose upload the client completed is in Immich exactly once.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest

from sftpgate.ledger import Ledger

from .conftest import PASSWORD, eventually, gate_config

KILLS = int(os.environ.get("SFTPGATE_CRASH_KILLS", "30"))
FILES = int(os.environ.get("SFTPGATE_CRASH_FILES", "60"))
SOURCES = [
    "jpeg/canon-t2i-adobergb-gps-small.jpg",
    "jpeg/htc-desire-gps.jpg",
    "jpeg/nikon-d5000-gps-xmp.jpeg",
    "jpeg/apple-iphone5-orient3-gps.jpg",  # 2.3 MB: long enough to be killed mid-upload
]
# A phone sends its camera roll over a while, not in one burst: spread the uploads over the kills.
UPLOAD_GAP_SECONDS = (0.1, 0.6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def distinct_jpeg(data: bytes, n: int) -> bytes:
    """The same photo with a COM segment naming it: a different SHA-1, still a valid JPEG."""
    comment = f"sftpgate crash test photo {n}".encode()
    return data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]


class ServiceProcess:
    """`sftpgate serve` as a child process that the test starts and kills by its own PID."""

    def __init__(self, config: Path, log: Path, metrics_port: int) -> None:
        self.config = config
        self.log = log
        self.metrics_port = metrics_port
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sftpgate.main", "--config", str(self.config), "serve",
                stdout=log, stderr=log, env={**os.environ, **(env or {})},
            )  # fmt: skip

        async def healthy() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(
                    f"sftpgate exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(
                        f"http://127.0.0.1:{self.metrics_port}/healthz",
                        timeout=aiohttp.ClientTimeout(total=1),
                    ) as r,
                ):
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(healthy, timeout=60, what="sftpgate to start")

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def kill_if_running(self) -> None:
        """Cleanup after a failed assertion: never leave a service behind."""
        if self.proc is not None and self.proc.returncode is None:
            await self.kill()

    async def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 30)


def service_process(
    tmp_path: Path, standin: Any, host_keys_dir: Path, client_key: Path
) -> tuple[ServiceProcess, int]:
    """A not yet started `sftpgate serve` on free loopback ports with one codec worker, and its
    SFTP port."""
    sftp_port, metrics_port = free_port(), free_port()
    config = gate_config(
        tmp_path, standin.url, host_keys_dir, client_key,
        sftp={"listen": f"127.0.0.1:{sftp_port}"},
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
        optimize={"workers": 1},
    )  # fmt: skip
    return ServiceProcess(config, tmp_path / "service.log", metrics_port), sftp_port


async def sync_app(
    port: int,
    photos: dict[str, bytes],
    completed: set[str],
    stop: asyncio.Event,
    rng: random.Random,
) -> None:
    """Upload every photo; on any failure reconnect and send the current photo again."""
    pending = list(photos)
    while pending and not stop.is_set():
        try:
            async with (
                asyncssh.connect(
                    "127.0.0.1",
                    port,
                    username="phone",
                    password=PASSWORD,
                    known_hosts=None,
                    connect_timeout=5,
                ) as conn,
                conn.start_sftp_client() as sftp,
            ):
                while pending:
                    name = pending[0]
                    async with sftp.open(name, "wb") as f:
                        await f.write(photos[name])
                    completed.add(name)  # CLOSE was acknowledged: the upload is complete
                    pending.pop(0)
                    await asyncio.sleep(rng.uniform(*UPLOAD_GAP_SECONDS))  # pacing, see above
        except (OSError, asyncssh.Error):
            await asyncio.sleep(0.05)  # the service is restarting: back off briefly, then retry


@pytest.mark.timeout(120 + KILLS * 10)
async def test_sigkill_at_random_instants_loses_nothing_and_duplicates_nothing(
    tmp_path, standin, corpus, host_keys_dir, client_key
):
    rng = random.Random(20261124)
    sources = [(corpus / s).read_bytes() for s in SOURCES]
    photos = {f"IMG_{n:04d}.jpg": distinct_jpeg(sources[n % len(sources)], n) for n in range(FILES)}
    standin.state.delay_seconds = 0.02  # widens the window between Immich's answer and our commit
    service, sftp_port = service_process(tmp_path, standin, host_keys_dir, client_key)
    completed: set[str] = set()
    stop = asyncio.Event()
    await service.start()
    client = asyncio.create_task(sync_app(sftp_port, photos, completed, stop, random.Random(7)))
    ledger_path = tmp_path / "data" / "sftpgate.db"
    killed_while = {"uploading from the client": 0, "work in the pipeline": 0}
    try:
        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(0.05, 0.8))  # a random instant to kill at
            await service.kill()
            killed_while["uploading from the client"] += not client.done()
            ledger = Ledger(ledger_path)
            counts = ledger.count_by_state()
            ledger.close()
            killed_while["work in the pipeline"] += any(
                counts.get(s) for s in ("queued", "optimizing", "uploading")
            )
            await service.start()
        await asyncio.wait_for(client, 120)
        data = tmp_path / "data"

        def all_finished() -> bool:
            ledger = Ledger(data / "sftpgate.db")
            try:
                counts = ledger.count_by_state()
            finally:
                ledger.close()
            return not any(counts.get(s) for s in ("received", "queued", "optimizing", "uploading"))

        await eventually(
            all_finished, timeout=180, what="the queue to drain after the last restart"
        )
        assert await service.terminate() == 0
    finally:
        stop.set()
        client.cancel()
        await service.kill_if_running()

    assert completed == set(photos), "the sync app could not finish its uploads"
    # The kills must have hit real work, or this test would prove nothing.
    assert killed_while["uploading from the client"] >= KILLS // 2, killed_while
    assert killed_while["work in the pipeline"] >= KILLS // 2, killed_while
    by_name: dict[str, list[str]] = {}
    for asset in standin.state.assets.values():
        by_name.setdefault(asset.original_file_name, []).append(asset.id)
    waiting = {
        p.name
        for p in (data / "watch").rglob("*")
        if p.is_file() and not p.name.endswith(".error.json")
    }
    for name in photos:
        jxl = Path(name).with_suffix(".jxl").name
        count = len(by_name.get(jxl, [])) + len(by_name.get(name, []))
        assert count == 1 or (count == 0 and name in waiting), f"{name}: {count} assets in Immich"
    assert sum(len(v) for v in by_name.values()) == len(photos) - len(waiting & set(photos))
    assert not list((data / ".work").iterdir()), "optimized files left behind"


def _codec_workers(service_pid: int) -> list[int]:
    """The service's codec worker processes (multiprocessing spawn children, not its tracker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == service_pid and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def test_codec_workers_end_with_a_killed_service_even_mid_conversion(
    tmp_path, standin, corpus, host_keys_dir, client_key
):
    """An orphaned worker would go on converting after a SIGKILL of the service and write into
    .work/ behind the next start's back; the workers must die with the service."""
    service, sftp_port = service_process(tmp_path, standin, host_keys_dir, client_key)
    await service.start()
    try:
        assert service.proc is not None
        workers = await eventually(lambda: _codec_workers(service.proc.pid), what="a codec worker")
        async with (
            asyncssh.connect(
                "127.0.0.1", sftp_port, username="phone", password=PASSWORD, known_hosts=None
            ) as conn,
            conn.start_sftp_client() as sftp,
        ):
            await sftp.put(str(corpus / "video/apple-iphone5-1080p-gps.mov"), "clip.mov")

        def converting() -> bool:
            ledger = Ledger(tmp_path / "data" / "sftpgate.db")
            try:
                return bool(ledger.count_by_state().get("optimizing"))
            finally:
                ledger.close()

        await eventually(converting, what="the video conversion to start")
        await service.kill()
        # The conversion alone takes far longer than this: only dying with the service passes.
        await eventually(
            lambda: not any(_alive(pid) for pid in workers),
            timeout=3,
            what="the codec worker to end with the service",
        )
    finally:
        await service.kill_if_running()
