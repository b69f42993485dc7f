"""Faults we can produce on one machine: Immich down or failing, connections cut,
temporary names, files arriving through a share, SIGTERM, a full disk."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import asyncssh
import pytest

from sftpgate.config import load_config
from sftpgate.ledger import Ledger
from sftpgate.server import Service

from .conftest import PASSWORD, eventually, finished, gate_config
from .test_crash import ServiceProcess, distinct_jpeg, free_port

PHOTO = "jpeg/htc-desire-gps.jpg"


def connect(service: Service) -> asyncssh.SSHClientConnection:
    return asyncssh.connect(
        "127.0.0.1", service.sftp.port, username="phone", password=PASSWORD, known_hosts=None
    )


@contextlib.asynccontextmanager
async def running(tmp_path: Path, standin, host_keys_dir: Path, client_key: Path, **sections: dict):
    service = Service(
        load_config(gate_config(tmp_path, standin.url, host_keys_dir, client_key, **sections))
    )
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def upload_photos(service: Service, corpus: Path, count: int) -> dict[str, bytes]:
    base = (corpus / PHOTO).read_bytes()
    photos = {f"IMG_{n:03d}.jpg": distinct_jpeg(base, n) for n in range(count)}
    async with connect(service) as conn, conn.start_sftp_client() as sftp:
        for name, data in photos.items():
            async with sftp.open(name, "wb") as f:
                await f.write(data)
    return photos


def no_undone(service: Service) -> bool:
    return not any(p.is_file() for p in service.layout.undone.rglob("*"))


async def test_immich_down_for_a_while_pauses_and_everything_arrives_after(gate, standin, corpus):
    standin.state.down = True
    await eventually(
        lambda: gate.metrics.immich_up._value.get() == 0, what="sftpgate_immich_up to drop to 0"
    )
    photos = await upload_photos(gate, corpus, 4)
    # The outage itself: ten ping intervals (minutes in real life, compressed here).
    await asyncio.sleep(10 * gate.config.retry.ping_interval_seconds)
    assert gate.metrics.immich_up._value.get() == 0
    assert all((gate.layout.watch / "phone" / n).is_file() for n in photos), (
        "originals must wait in watch/"
    )
    assert (await gate.db(lambda db: db.count_by_state())).get("done", 0) == 0
    assert no_undone(gate)
    standin.state.down = False
    await gate.pipeline.wait_for(lambda c: c.get("done", 0) == len(photos), timeout=60)
    assert gate.metrics.immich_up._value.get() == 1
    assert len(standin.state.assets) == len(photos)
    assert no_undone(gate)


async def test_5xx_and_connections_reset_mid_body_deliver_exactly_once(gate, standin, corpus):
    standin.state.fail_next = [500, 502, 429]
    standin.state.retry_after_seconds = 0
    standin.state.drop_next = 2
    standin.state.drop_after_commit_next = 2  # Immich stored it but the answer was lost
    photos = await upload_photos(gate, corpus, 6)
    await gate.pipeline.wait_for(lambda c: c.get("done", 0) == len(photos), timeout=90)
    names = sorted(a.original_file_name for a in standin.state.assets.values())
    assert names == sorted(Path(n).with_suffix(".jxl").name for n in photos)
    assert standin.state.created == len(
        photos
    )  # the answers lost after commit made no second asset
    assert gate.metrics.retries._value.get() >= 7
    assert no_undone(gate)


async def test_a_file_goes_to_undone_only_after_give_up_after(
    tmp_path, standin, corpus, host_keys_dir, client_key
):
    standin.state.fail_next = [500] * 1000
    async with running(
        tmp_path, standin, host_keys_dir, client_key, retry={"give_up_after": "1s"}
    ) as service:
        await upload_photos(service, corpus, 1)
        await service.pipeline.wait_for(finished(1), timeout=60)
        sidecar = json.loads(
            (service.layout.undone / "phone" / "IMG_000.jpg.error.json").read_text()
        )
    assert sidecar["stage"] == "upload"
    assert "500" in sidecar["reason"] and "gave up after" in sidecar["reason"]
    assert sidecar["attempts"] >= 2


async def test_temporary_names_wait_for_the_rename(gate, standin, corpus):
    data = (corpus / PHOTO).read_bytes()
    async with connect(gate) as conn, conn.start_sftp_client() as sftp:
        for temp in ("IMG_1.jpg.part", "IMG_2.jpg.a1b2c3.partial", ".IMG_3.jpg", "IMG_4.jpg.tmp"):
            async with sftp.open(temp, "wb") as f:
                await f.write(distinct_jpeg(data, len(temp)))
        counts = await gate.db(lambda db: db.count_by_state())
        assert counts == {"received": 4}, "nothing under a temporary name may be queued"
        await sftp.rename("IMG_1.jpg.part", "IMG_1.jpg")
        await sftp.posix_rename("IMG_2.jpg.a1b2c3.partial", "IMG_2.jpg")
        # rclone ≥ 1.63 and FolderSync rename over a final name that already exists.
        async with sftp.open("IMG_4.jpg", "wb") as f:
            await f.write(b"an older version")
        await sftp.posix_rename("IMG_4.jpg.tmp", "IMG_4.jpg")
        # The older IMG_4.jpg ("an older version") may be undone or replaced before its turn;
        # what counts is that the three photos arrive and nothing is left waiting.
        expected = ["IMG_1.jxl", "IMG_2.jxl", "IMG_4.jxl"]
        await eventually(
            lambda: sorted(a.original_file_name for a in standin.state.assets.values()) == expected,
            timeout=60, what="the three renamed photos in Immich",
        )  # fmt: skip
        await gate.pipeline.wait_for(
            lambda c: not any(c.get(s) for s in ("queued", "optimizing", "uploading")), timeout=60
        )
        names = sorted(await sftp.listdir("."))
    assert sorted(a.original_file_name for a in standin.state.assets.values()) == expected
    assert (gate.layout.watch / "phone" / ".IMG_3.jpg").is_file()  # dot-files are never processed
    assert {"IMG_1.jpg", "IMG_2.jpg", "IMG_4.jpg"} <= set(names)
    assert await gate.intake.remove_abandoned(max_age_seconds=0) == 1  # after a day: .IMG_3.jpg
    assert not (gate.layout.watch / "phone" / ".IMG_3.jpg").exists()


async def test_a_file_copied_into_watch_is_taken_only_once_it_has_settled(gate, standin, corpus):
    data = (corpus / "jpeg/apple-iphone5-orient3-gps.jpg").read_bytes()
    target = gate.layout.watch / "phone" / "from-share" / "IMG_5.jpg"
    target.parent.mkdir()
    chunk = len(data) // 8
    with target.open("wb") as f:  # a slow Samba copy: a chunk every 0.1 s, settle time is 0.3 s
        for i in range(0, len(data), chunk):
            f.write(data[i : i + chunk])
            f.flush()
            assert await gate.db(lambda db: db.count_by_state()) == {}, (
                "taken while still being written"
            )
            await asyncio.sleep(0.1)  # the writer's pace is the fault under test
    await gate.pipeline.wait_for(finished(1), timeout=60)
    (asset,) = standin.state.assets.values()
    assert asset.original_file_name == "IMG_5.jxl"
    row = next(iter(await gate.db(lambda db: list(db.iter_all()))))
    assert row.size == len(data) and row.path == "from-share/IMG_5.jpg"


async def test_only_regular_files_in_watch_are_taken_and_a_fifo_stops_no_scan(
    gate, standin, corpus
):
    """A FIFO (or socket, device) in a share is not a photo: hashing it would wait for a writer
    forever and stop every later scan. Symlinks are not followed either."""
    folder = gate.layout.watch / "phone" / "from-share"
    folder.mkdir()
    fifo = folder / "pipe.jpg"
    os.mkfifo(fifo)
    (folder / "link.jpg").symlink_to(corpus / PHOTO)
    data = (corpus / PHOTO).read_bytes()
    try:
        (folder / "IMG_6.jpg").write_bytes(distinct_jpeg(data, 6))
        await gate.pipeline.wait_for(finished(1), timeout=30)
        (folder / "IMG_7.jpg").write_bytes(distinct_jpeg(data, 7))  # the scans still run
        await gate.pipeline.wait_for(finished(2), timeout=30)
    finally:
        with contextlib.suppress(OSError):  # let a reader stuck on the FIFO go (ENXIO: none)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    names = sorted(a.original_file_name for a in standin.state.assets.values())
    assert names == ["IMG_6.jxl", "IMG_7.jxl"]
    assert fifo.exists() and (folder / "link.jpg").is_symlink()
    assert no_undone(gate)


async def test_inotify_notices_a_copied_file_long_before_the_periodic_scan(
    tmp_path, standin, corpus, host_keys_dir, client_key
):
    watch = {"settle_seconds": 0.3, "scan_interval_seconds": 3600}  # the periodic scan never comes
    async with running(tmp_path, standin, host_keys_dir, client_key, watch=watch) as service:
        await asyncio.to_thread(
            shutil.copyfile, corpus / PHOTO, service.layout.watch / "phone" / "IMG_cp.jpg"
        )
        await service.pipeline.wait_for(finished(1), timeout=30)
    assert [a.original_file_name for a in standin.state.assets.values()] == ["IMG_cp.jxl"]


async def test_sigterm_parks_work_and_exits_zero(
    tmp_path, standin, corpus, host_keys_dir, client_key
):
    sftp_port, metrics_port = free_port(), free_port()
    config = gate_config(
        tmp_path, standin.url, host_keys_dir, client_key,
        sftp={"listen": f"127.0.0.1:{sftp_port}"}, metrics={"listen": f"127.0.0.1:{metrics_port}"},
    )  # fmt: skip
    service = ServiceProcess(config, tmp_path / "service.log", metrics_port)
    await service.start()
    try:
        standin.state.delay_seconds = 30  # an upload is in flight when the signal comes
        base = (corpus / "jpeg/apple-iphone5-orient3-gps.jpg").read_bytes()
        async with (
            asyncssh.connect(
                "127.0.0.1", sftp_port, username="phone", password=PASSWORD, known_hosts=None
            ) as conn,
            conn.start_sftp_client() as sftp,
        ):
            for n in range(3):
                async with sftp.open(f"IMG_{n}.jpg", "wb") as f:
                    await f.write(distinct_jpeg(base, n))

        def uploading() -> bool:
            ledger = Ledger(tmp_path / "data" / "sftpgate.db")
            try:
                return ledger.count_by_state().get("uploading", 0) >= 1
            finally:
                ledger.close()

        await eventually(uploading, what="an upload to be in flight")
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await service.terminate() == 0
        assert loop.time() - started < 15, "SIGTERM must finish or park work within seconds"
        assert "stopped" in (tmp_path / "service.log").read_text()
        standin.state.delay_seconds = 0
        await service.start()
        data = tmp_path / "data"
        await eventually(
            lambda: not any(p.is_file() for p in (data / "watch" / "phone").rglob("*")), timeout=60,
            what="the parked files to be delivered after the restart",
        )  # fmt: skip
        assert await service.terminate() == 0
    finally:
        await service.kill_if_running()
    assert sorted(a.original_file_name for a in standin.state.assets.values()) == [
        "IMG_0.jxl",
        "IMG_1.jxl",
        "IMG_2.jxl",
    ]


@contextlib.contextmanager
def tmpfs(mount: Path, size: str):
    """A small tmpfs at `mount`; the test is skipped (with the reason) where mounting is not allowed."""
    mount.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a small file system here ({result.stderr.strip() or 'not root'})"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 24 MiB tmpfs mounted as the data folder."""
    with tmpfs(tmp_path / "data", "24m") as mount:
        yield mount


async def test_conversion_output_that_cannot_be_written_is_retried_not_undone(
    tmp_path, standin, corpus, host_keys_dir, client_key
):
    with tmpfs(tmp_path / "data" / ".work", "64k") as work:  # smaller than any converted photo
        async with running(tmp_path, standin, host_keys_dir, client_key) as service:
            await upload_photos(service, corpus, 1)
            await eventually(
                lambda: service.metrics.retries._value.get() >= 1, what="a retry after ENOSPC"
            )
            (row,) = await service.db(lambda db: list(db.iter_all()))
            assert (
                row.state == "queued" and row.stage == "optimize" and "No space left" in row.reason
            )
            assert (service.layout.watch / "phone" / "IMG_000.jpg").is_file(), (
                "the original stays untouched"
            )
            assert no_undone(service)
            subprocess.run(
                ["mount", "-o", "remount,size=16m", str(work)], check=True
            )  # space is freed
            await service.pipeline.wait_for(lambda c: c.get("done", 0) == 1, timeout=60)
    assert [a.original_file_name for a in standin.state.assets.values()] == ["IMG_000.jxl"]


async def test_a_full_disk_fails_the_upload_and_the_server_goes_on(
    small_disk, tmp_path, standin, corpus, host_keys_dir, client_key
):
    async with running(tmp_path, standin, host_keys_dir, client_key) as service:
        big = os.urandom(40 * 1024 * 1024)
        async with connect(service) as conn, conn.start_sftp_client() as sftp:
            with pytest.raises(asyncssh.SFTPFailure, match="No space left"):
                async with sftp.open("VID_huge.mp4", "wb") as f:
                    await f.write(big)
            assert not (service.layout.watch / "phone" / "VID_huge.mp4").exists()
            await eventually(
                lambda: not any(service.layout.staging.iterdir()), what="the part to be removed"
            )
            # Same connection, next file: the server keeps serving.
            await sftp.put(str(corpus / PHOTO), "IMG_ok.jpg")
        await service.pipeline.wait_for(finished(1), timeout=60)
    assert [a.original_file_name for a in standin.state.assets.values()] == ["IMG_ok.jxl"]
