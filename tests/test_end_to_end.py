"""The whole path with real parts: real SFTP clients → sftpgate → real codecs → the Immich stand-in.

Each test runs a real service (asyncssh server, worker processes, SQLite ledger) and talks to it
over 127.0.0.1 with a real client, then checks what Immich stored and what is left on disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import asyncssh
import pillow_jxl
import pytest
import yaml

from .conftest import PASSWORD, eventually, finished
from .readers import photo_metadata, sidecar_dates

# Convertible JPEGs that carry what must survive: GPS, orientation, Adobe RGB ICC, XMP.
JPEGS = [
    "jpeg/apple-iphone4-gps.jpg",
    "jpeg/canon-a85-orient8.jpg",
    "jpeg/canon-eos7d-adobergb-xmp.jpg",
    "jpeg/nikon-d5000-gps-xmp.jpeg",
]


async def sftp_batch(
    port: int, key: Path, commands: str, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run the OpenSSH `sftp` client in batch mode against the service."""
    if shutil.which("sftp") is None:
        pytest.skip("the OpenSSH sftp client is not installed (apt-get install openssh-client)")
    batch = cwd / "batch.txt"
    batch.write_text(commands)
    proc = await asyncio.create_subprocess_exec(
        "sftp", "-b", str(batch), "-P", str(port), "-i", str(key),
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
        "phone@127.0.0.1",
        cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    result = subprocess.CompletedProcess(["sftp"], proc.returncode or 0, out.decode(), err.decode())
    assert result.returncode == 0, result.stderr
    return result


def connect(service, **kwargs) -> asyncssh.SSHClientConnection:
    return asyncssh.connect(
        "127.0.0.1",
        service.sftp.port,
        username="phone",
        password=PASSWORD,
        known_hosts=None,
        **kwargs,
    )


def stored_assets(standin) -> list:
    return list(standin.state.assets.values())


async def metrics_text(service) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{service.metrics_port}/metrics") as r,
    ):
        assert r.status == 200
        return await r.text()


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


async def test_openssh_sftp_client_delivers_jpegs_once_as_bit_exact_jxl(
    gate, standin, corpus, client_key, tmp_path
):
    files = [corpus / f for f in JPEGS]
    commands = "mkdir DCIM\n" + "".join(f'put "{f}" DCIM/\n' for f in files)
    await sftp_batch(gate.sftp.port, client_key, commands, tmp_path)
    await gate.pipeline.wait_for(finished(len(files)), timeout=120)

    assets = {a.original_file_name: a for a in stored_assets(standin)}
    assert sorted(assets) == sorted(f.with_suffix(".jxl").name for f in files)
    for f in files:
        asset = assets[f.with_suffix(".jxl").name]
        stored = Path(asset.path)
        is_jpeg, _, reconstructed, _, _ = pillow_jxl.Decoder()(stored.read_bytes())
        assert is_jpeg and reconstructed == f.read_bytes(), (
            f"{f.name} does not reconstruct bit-exact"
        )
        assert stored.stat().st_size < f.stat().st_size
        assert photo_metadata(stored) == photo_metadata(f), f"metadata of {f.name} changed"
        assert not (gate.layout.watch / "phone" / "DCIM" / f.name).exists()
    text = await metrics_text(gate)
    assert metric(text, "sftpgate_processed_files_total", '{outcome="uploaded"}') == len(files)
    assert metric(text, "sftpgate_received_files_total") == len(files)
    assert metric(text, "sftpgate_received_bytes_total") == sum(f.stat().st_size for f in files)
    assert metric(text, "sftpgate_stored_bytes_total") == sum(a.size for a in assets.values())
    assert metric(text, "sftpgate_processed_files_total", '{outcome="undone"}') == 0


async def test_asyncssh_client_upload_is_remembered_in_listings(gate, standin, corpus):
    src = corpus / "jpeg/htc-desire-gps.jpg"
    async with connect(gate) as conn, conn.start_sftp_client() as sftp:
        await sftp.mkdir("Camera")
        await sftp.put(str(src), "Camera/IMG_0001.jpg")
        await sftp.setstat(
            "Camera/IMG_0001.jpg", asyncssh.SFTPAttrs(atime=1_500_000_000, mtime=1_500_000_000)
        )
        await gate.pipeline.wait_for(finished(1), timeout=60)
        assert not (gate.layout.watch / "phone/Camera/IMG_0001.jpg").exists()
        # Delivered and deleted here, yet the client still sees its file as it left it.
        attrs = await sftp.stat("Camera/IMG_0001.jpg")
        assert attrs.size == src.stat().st_size
        names = {n.filename: n.attrs for n in await sftp.readdir("Camera")}
        assert names["IMG_0001.jpg"].size == src.stat().st_size
    (asset,) = stored_assets(standin)
    assert asset.original_file_name == "IMG_0001.jxl"
    # EXIF DateTimeOriginal without offset, read in the config's zone, in both fields: Immich
    # sets the stored file's mtime from fileModifiedAt. The embedded date needs no sidecar.
    taken = datetime.fromisoformat("2011-05-06T09:59:48+02:00")
    assert datetime.fromisoformat(asset.file_created_at) == taken
    assert datetime.fromisoformat(asset.file_modified_at) == taken
    assert asset.sidecar is None


def still(path: Path, colour: str) -> Path:
    """A small generated picture without any embedded date (the format follows the suffix)."""
    from PIL import Image

    image = Image.linear_gradient("L").resize((96, 64)).convert("RGB")
    image.paste(colour, (0, 0, 32, 32))
    image.save(path)
    return path


async def test_a_date_from_the_name_or_the_mtime_reaches_immich_in_both_fields_and_a_sidecar(
    gate, standin, corpus, tmp_path
):
    berlin = ZoneInfo("Europe/Berlin")  # the test config's timezone
    mtime = 1_500_000_000  # 2017-07-14 04:40:00 in Berlin, set by the client before CLOSE
    uploads = {
        # No embedded date: the name's date, read in the configured zone.
        "WhatsApp/IMG-20230415-WA0007.jpg": (
            still(tmp_path / "whatsapp.jpg", "red"),
            datetime(2023, 4, 15, 12, 0, tzinfo=berlin),
            "2023:04:15 12:00:00.000+02:00",
        ),
        "Screenshots/Screenshot_20240102-131415.png": (
            still(tmp_path / "screenshot.png", "green"),
            datetime(2024, 1, 2, 13, 14, 15, tzinfo=berlin),
            "2024:01:02 13:14:15.000+01:00",
        ),
        # Neither an embedded date nor one in the name: the client's mtime.
        "Edits/export.png": (
            still(tmp_path / "export.png", "blue"),
            datetime.fromtimestamp(mtime, berlin),
            "2017:07:14 04:40:00.000+02:00",
        ),
        # An embedded date always wins, even over a name that has one: no sidecar.
        "Camera/IMG_20200101_120000.jpg": (
            corpus / "jpeg/htc-desire-gps.jpg",
            datetime(2011, 5, 6, 9, 59, 48, tzinfo=berlin),
            None,
        ),
    }
    async with connect(gate) as conn, conn.start_sftp_client() as sftp:
        for name, (src, _, _) in uploads.items():
            await sftp.makedirs(str(Path(name).parent), exist_ok=True)
            async with sftp.open(name, "wb") as f:
                await f.write(src.read_bytes())
                await f.setstat(asyncssh.SFTPAttrs(atime=mtime, mtime=mtime))
    await gate.pipeline.wait_for(finished(len(uploads)), timeout=120)

    assets = {Path(a.original_file_name).stem: a for a in stored_assets(standin)}
    assert sorted(assets) == sorted(Path(name).stem for name in uploads)
    for name, (_, taken, sidecar_date) in uploads.items():
        asset = assets[Path(name).stem]
        for sent in (asset.file_created_at, asset.file_modified_at):
            assert datetime.fromisoformat(sent) == taken, name
            assert datetime.fromisoformat(sent).utcoffset() == taken.utcoffset(), name
        # What Immich falls back on without an embedded date: the stored file's mtime.
        assert Path(asset.path).stat().st_mtime == taken.timestamp(), name
        if sidecar_date is None:
            assert asset.sidecar is None, name
        else:
            assert asset.sidecar is not None, name
            assert sidecar_dates(asset.sidecar)["XMP:DateTimeOriginal"] == sidecar_date, name


async def test_upload_in_progress_is_invisible_and_a_dropped_connection_leaves_nothing(
    gate, corpus
):
    data = (corpus / "jpeg/apple-iphone4-gps.jpg").read_bytes()
    conn = await connect(gate)
    sftp = await conn.start_sftp_client()
    f = await sftp.open("half.jpg", "wb")
    await f.write(data[: len(data) // 2])
    staged = list(gate.layout.staging.iterdir())
    assert len(staged) == 1 and staged[0].stat().st_size == len(data) // 2
    assert not (gate.layout.watch / "phone" / "half.jpg").exists()
    assert await gate.intake.scan_watch(settle=False) == 0  # the pipeline cannot see it
    assert await gate.db(lambda db: db.count_by_state()) == {}
    conn.abort()  # the phone loses Wi-Fi mid-upload
    await eventually(
        lambda: not any(gate.layout.staging.iterdir()), what="the part to be discarded"
    )
    assert list((gate.layout.watch / "phone").iterdir()) == []
    assert await gate.db(lambda db: db.count_by_state()) == {}


def test_a_finished_upload_given_an_old_mtime_is_not_taken_for_a_stale_part(gate):
    """CLOSE gives the staged file the client's mtime just before it moves into watch/; the
    clean-up of day-old parts, running at that moment, must not delete it."""
    from sftpgate.server import _remove_stale_parts

    staged = gate.layout.staging / "upload.part"
    staged.write_bytes(b"the bytes of a photo")
    os.utime(staged, (1_500_000_000, 1_500_000_000))  # 2017, as FolderSync sends it
    _remove_stale_parts(gate.layout)
    assert staged.read_bytes() == b"the bytes of a photo"


async def test_files_that_landed_while_stopped_are_delivered_after_restart(
    tmp_path, standin, corpus, host_keys_dir, client_key
):
    from sftpgate.config import load_config
    from sftpgate.server import Service

    from .conftest import gate_config

    config = load_config(gate_config(tmp_path, standin.url, host_keys_dir, client_key))
    first = Service(config)
    await first.start()
    await first.stop()
    landed = first.layout.watch / "phone" / "Trip" / "IMG_0002.jpg"
    landed.parent.mkdir(parents=True)
    shutil.copyfile(corpus / "jpeg/canon-sx60-orient6.jpg", landed)
    second = Service(config)
    await second.start()
    try:
        await second.pipeline.wait_for(finished(1), timeout=60)
    finally:
        await second.stop()
    (asset,) = stored_assets(standin)
    assert asset.original_file_name == "IMG_0002.jxl"
    assert not landed.exists()


async def test_files_waiting_for_a_worker_stay_queued_until_one_takes_them(
    tmp_path, standin, corpus, host_keys_dir, client_key, monkeypatch
):
    """The dispatcher keeps a file waiting at each worker; the ledger (and `sftpgate status`)
    says `optimizing` only for files a worker is converting. Files waiting for a worker are
    `queued` and due: the dispatcher must not take them for work still to come and ask the
    ledger again every 50 ms until they are done (it did, two queries each time)."""
    from sftpgate.config import load_config
    from sftpgate.ledger import Ledger
    from sftpgate.server import Service

    from .conftest import gate_config

    config = load_config(
        gate_config(tmp_path, standin.url, host_keys_dir, client_key, optimize={"workers": 1})
    )
    first = Service(config)
    await first.start()
    await first.stop()
    for name in JPEGS:
        shutil.copyfile(corpus / name, first.layout.watch / "phone" / Path(name).name)
    seen: list[dict[str, int]] = []

    def record(counts: dict[str, int]) -> bool:
        seen.append(counts)
        return finished(len(JPEGS))(counts)

    dispatcher_queries = 0

    def counted(query):
        def run(*args, **kwargs):
            nonlocal dispatcher_queries
            dispatcher_queries += 1
            return query(*args, **kwargs)

        return run

    monkeypatch.setattr(Ledger, "due", counted(Ledger.due))
    monkeypatch.setattr(Ledger, "next_due_time", counted(Ledger.next_due_time))
    second = Service(config)
    await second.start()
    try:
        await second.pipeline.wait_for(record, timeout=120)
    finally:
        await second.stop()
    # One converting, and at most one more whose worker just finished while its output is
    # hashed; without the reservation all four were `optimizing` at once.
    assert max(c.get("optimizing", 0) for c in seen) <= 2, seen
    # One look at the start, then two queries per finished file (what is due, when is the
    # next): 7-8 here; the polling made 21-23 in the ~1 s these four conversions take.
    assert dispatcher_queries <= 3 * len(JPEGS), dispatcher_queries
    assert len(stored_assets(standin)) == len(JPEGS)


async def test_corrupt_files_end_in_undone_with_a_sidecar_and_their_bytes(gate, standin, corpus):
    bad = ["bad/truncated-half.jpg", "bad/random-bytes.jpg", "bad/html-named.jpg"]
    async with connect(gate) as conn, conn.start_sftp_client() as sftp:
        for name in bad:
            await sftp.put(str(corpus / name), Path(name).name)
    await gate.pipeline.wait_for(finished(len(bad)), timeout=60)
    assert stored_assets(standin) == []
    for name in bad:
        kept = gate.layout.undone / "phone" / Path(name).name
        assert kept.read_bytes() == (corpus / name).read_bytes()
        sidecar = json.loads(kept.with_name(kept.name + ".error.json").read_text())
        assert sidecar["stage"] == "optimize"
        assert sidecar["reason"] and sidecar["attempts"] == 1
        assert re.search(r"[+-]\d\d:\d\d$", sidecar["time"]), "the time carries an offset"
    text = await metrics_text(gate)
    assert metric(text, "sftpgate_processed_files_total", '{outcome="undone"}') == len(bad)
    assert metric(text, "sftpgate_undone_files") == len(bad)


async def test_immich_errors_never_delete_the_original(gate, standin, corpus):
    src = corpus / "jpeg/apple-iphone4-gps.jpg"
    standin.state.fail_next = [500, 503, 500]
    async with connect(gate) as conn, conn.start_sftp_client() as sftp:
        await sftp.put(str(src), "IMG_0003.jpg")
    original = gate.layout.watch / "phone" / "IMG_0003.jpg"
    # After each failure the original is still there and the row waits for a retry.
    await eventually(lambda: gate.metrics.retries._value.get() >= 1, what="a retry")
    assert original.read_bytes() == src.read_bytes()
    await gate.pipeline.wait_for(finished(1), timeout=60)
    assert len(stored_assets(standin)) == 1
    assert not original.exists()
    assert list(gate.layout.undone.rglob("*")) == [] or not any(
        p.is_file() for p in gate.layout.undone.rglob("*")
    )
    text = await metrics_text(gate)
    assert metric(text, "sftpgate_retries_total") == 3
    assert metric(text, "sftpgate_processed_files_total", '{outcome="uploaded"}') == 1


async def test_same_bytes_under_another_name_are_not_sent_again(gate, standin, corpus):
    src = corpus / "jpeg/nikon-d5000-gps-xmp.jpeg"
    async with connect(gate) as conn, conn.start_sftp_client() as sftp:
        await sftp.put(str(src), "first.jpeg")
        await gate.pipeline.wait_for(finished(1), timeout=60)
        await sftp.put(str(src), "renamed copy.jpeg")
        await gate.pipeline.wait_for(finished(2), timeout=60)
        assert {n for n in await sftp.listdir(".") if not n.startswith(".")} == {
            "first.jpeg",
            "renamed copy.jpeg",
        }
    assert len(stored_assets(standin)) == 1
    assert standin.state.counters()["uploads_received"] == 1
    text = await metrics_text(gate)
    assert metric(text, "sftpgate_processed_files_total", '{outcome="duplicate"}') == 1


async def test_health_endpoints(gate, standin):
    base = f"http://127.0.0.1:{gate.metrics_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200
        async with http.get(f"{base}/readyz") as r:
            assert r.status == 200
        standin.state.down = True
        async with http.get(f"{base}/readyz") as r:
            assert r.status == 503
            assert "Immich" in (await r.json())["reason"]
    text = await metrics_text(gate)
    for name in (
        "sftpgate_sftp_sessions",
        "sftpgate_sftp_auth_failures_total",
        "sftpgate_original_bytes_total",
        "sftpgate_queue_files",
        "sftpgate_immich_up",
        'sftpgate_build_info{version="',
    ):
        assert name in text
    assert "phone" not in text and "test-api-key" not in text


async def test_wrong_password_is_refused_and_counted(gate):
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(
            "127.0.0.1", gate.sftp.port, username="phone", password="wrong", known_hosts=None,
            preferred_auth="password",
        )  # fmt: skip
    assert gate.metrics.sftp_auth_failures._value.get() >= 1


async def test_sha1_is_computed_while_bytes_arrive(tmp_path):
    """The hash that follows the writes equals a hash of the file: over several hashing jobs,
    from bytes already in the part (append, resume after a restart) and after a resume that
    hands over a running hash; a write anywhere but the end gives the hash up (None)."""
    import os

    from sftpgate.sftp.filesystem import UploadFile

    data = os.urandom(2 * UploadFile.HASH_CHUNK + 300_000)
    step = 261_120  # the OpenSSH client's write size
    part = tmp_path / "part"
    up = UploadFile("x.jpg", part, os.open(part, os.O_RDWR | os.O_CREAT), None)
    for off in range(0, len(data), step):
        up.write(off, data[off : off + step])
    await up.catch_up()
    assert up.sha1 == hashlib.sha1(data).hexdigest()
    state = up.sha1_state()
    up.release()

    again = UploadFile("x.jpg", part, os.open(part, os.O_RDWR), None)
    again.start_from(part.stat().st_size)  # nothing known about these bytes: hashed from 0
    again.write(len(data), b"tail")
    await again.catch_up()
    assert again.sha1 == hashlib.sha1(data + b"tail").hexdigest()
    again.release()

    resumed = UploadFile("x.jpg", part, os.open(part, os.O_RDWR), None)
    os.truncate(part, len(data))
    resumed.start_from(len(data), state)
    resumed.write(len(data), b"more")
    await resumed.catch_up()
    assert resumed.sha1 == hashlib.sha1(data + b"more").hexdigest()
    resumed.write(0, b"x")  # a rewrite: the running hash no longer describes the file
    await resumed.catch_up()
    assert resumed.sha1 is None
    resumed.release()
    assert resumed.fd == -1


async def test_the_part_is_flushed_while_bytes_arrive_and_closed_after_its_jobs(tmp_path):
    """Flushing does not wait for CLOSE (nor for the hash): SYNC_EVERY bytes start a sync job;
    and a part released while its jobs still run keeps its descriptor until they end (closed
    early, the sync would fail with EBADF, or flush whatever file got the number next)."""
    import os

    from sftpgate.sftp.filesystem import UploadFile

    part = tmp_path / "part"
    fd = os.open(part, os.O_RDWR | os.O_CREAT)
    up = UploadFile("x.jpg", part, fd, None)
    data = os.urandom(UploadFile.SYNC_EVERY)
    up.write(0, data)
    up.release()
    os.fstat(fd)  # still open: the sync job's end reaches the loop only when the test awaits
    await up.flushed()
    assert up.sync_error is None
    assert up.fd == -1 and part.read_bytes() == data

    up = UploadFile("x.jpg", part, os.open(part, os.O_RDWR | os.O_TRUNC), None)
    step = 261_120
    for off in range(0, 3 * UploadFile.SYNC_EVERY, step):
        up.write(off, data[:step])
        await up.flushed()  # a client slower than the disk: each flush ends before the next write
    assert up.size - up.synced < UploadFile.SYNC_EVERY, "the part waits for CLOSE to be flushed"
    up.release()


async def test_album_per_first_folder_and_a_per_user_immich_account(
    tmp_path, standin, corpus, host_keys_dir, client_key
):
    from sftpgate.config import load_config
    from sftpgate.server import Service

    from .conftest import gate_config

    alice_key = "alice-own-immich-key-0123"
    alice_id = standin.state.add_user(alice_key)
    config = gate_config(
        tmp_path, standin.url, host_keys_dir, client_key, immich={"album": "{folder}"}
    )
    doc = yaml.safe_load(config.read_text())
    doc["sftp"]["users"].append(
        {"name": "alice", "password": "alice pw", "immich_api_key": alice_key}
    )
    config.write_text(yaml.safe_dump(doc))
    service = Service(load_config(config))
    await service.start()
    try:
        async with connect(service) as conn, conn.start_sftp_client() as sftp:
            await sftp.makedirs("Holidays/Day1")
            await sftp.put(str(corpus / "jpeg/htc-desire-gps.jpg"), "Holidays/Day1/IMG_1.jpg")
            await sftp.put(
                str(corpus / "jpeg/canon-a85-orient8.jpg"), "IMG_root.jpg"
            )  # no folder: no album
        async with (
            asyncssh.connect(
                "127.0.0.1",
                service.sftp.port,
                username="alice",
                password="alice pw",
                known_hosts=None,
            ) as conn,
            conn.start_sftp_client() as sftp,
        ):
            await sftp.mkdir("Holidays")
            await sftp.put(str(corpus / "jpeg/nikon-d5000-gps-xmp.jpeg"), "Holidays/IMG_2.jpeg")
        await service.pipeline.wait_for(finished(3), timeout=60)
    finally:
        await service.stop()
    assets = {a.original_file_name: a for a in stored_assets(standin)}
    albums = list(standin.state.albums.values())
    assert sorted((al.name, al.owner_id == alice_id) for al in albums) == [
        ("Holidays", False),
        ("Holidays", True),
    ]
    in_albums = {asset_id for al in albums for asset_id in al.asset_ids}
    assert assets["IMG_1.jxl"].id in in_albums and assets["IMG_2.jxl"].id in in_albums
    assert assets["IMG_root.jxl"].id not in in_albums
    assert assets["IMG_2.jxl"].owner_id == alice_id != assets["IMG_1.jxl"].owner_id
