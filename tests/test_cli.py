"""The command line, run as a user runs it: `sftpgate demo`, `status`, `retry`, `optimize`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import asyncssh

from .conftest import API_KEY, PASSWORD


def sftpgate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sftpgate.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def sftpgate_async(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI without blocking the event loop the service under test runs on."""
    return await asyncio.to_thread(sftpgate, *args)


def test_demo_runs_the_whole_pipeline_and_reports_each_file():
    result = sftpgate("demo", timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("DCIM/")}
    assert "uploaded" in rows["DCIM/Camera/IMG_20240601_143456.jpg"]
    assert "IMG_20240601_143456.jxl" in rows["DCIM/Camera/IMG_20240601_143456.jpg"]
    assert (
        "kept" in rows["DCIM/Screenshots/Screenshot_20240902.png"]
        or "uploaded" in rows["DCIM/Screenshots/Screenshot_20240902.png"]
    )
    assert "duplicate" in rows["DCIM/Camera/IMG_20240601_143456"]  # "(copy).jpg" splits on space
    assert "undone" in rows["DCIM/Camera/IMG_damaged.jpg"]


async def test_status_shows_undone_with_reason_and_retry_delivers_after_the_fix(
    gate, standin, corpus, tmp_path
):
    config = str(tmp_path / "config.yaml")
    standin.state.permissions[API_KEY] = frozenset()  # a key without asset.upload: 403, permanent
    src = corpus / "jpeg/htc-desire-gps.jpg"
    async with (
        asyncssh.connect(
            "127.0.0.1", gate.sftp.port, username="phone", password=PASSWORD, known_hosts=None
        ) as conn,
        conn.start_sftp_client() as sftp,
    ):
        await sftp.put(str(src), "IMG_0100.jpg")
    await gate.pipeline.wait_for(lambda c: c.get("undone", 0) == 1, timeout=60)
    kept = gate.layout.undone / "phone" / "IMG_0100.jpg"
    assert kept.read_bytes() == src.read_bytes()

    status = await sftpgate_async("--config", config, "status")
    assert status.returncode == 0, status.stderr
    assert "undone      " in status.stdout and "asset.upload" in status.stdout
    report = json.loads((await sftpgate_async("--config", config, "status", "--json")).stdout)
    assert report["states"]["undone"] == 1
    assert report["undone"][0]["stage"] == "upload"
    assert report["immich"]["reachable"] is True

    del standin.state.permissions[API_KEY]  # the person fixes the key
    retry = await sftpgate_async("--config", config, "retry", str(kept))
    assert retry.returncode == 0, retry.stderr
    assert "queued again: phone/IMG_0100.jpg" in retry.stdout
    assert not kept.exists() and not kept.with_name("IMG_0100.jpg.error.json").exists()
    await gate.pipeline.wait_for(lambda c: c.get("done", 0) == 1, timeout=60)
    (asset,) = standin.state.assets.values()
    assert asset.original_file_name == "IMG_0100.jxl"
    assert (await sftpgate_async("--config", config, "retry")).stdout.startswith("nothing to retry")


def test_optimize_reports_kind_decision_sizes_and_metadata(corpus):
    files = [corpus / "jpeg/canon-eos7d-adobergb-xmp.jpg", corpus / "bad/zero-byte.jpg"]
    result = sftpgate("--config", "/nonexistent.yaml", "optimize", "--json", *map(str, files))
    assert result.returncode == 1  # one file is unreadable
    jpeg, empty = json.loads(result.stdout)
    assert jpeg["kind"] == "jpeg" and jpeg["decision"] == "converted"
    assert jpeg["bytes_after"] < jpeg["bytes_before"]
    assert {"EXIF", "XMP", "ICC"} <= set(jpeg["metadata_kept"])
    assert jpeg["captured_at"].startswith("2010-12-12T12:41:35")
    assert empty["decision"] == "unreadable" and empty["reason"]
    text = sftpgate("optimize", str(files[0]))
    assert text.returncode == 0
    assert "jpeg, converted" in text.stdout and "saved" in text.stdout
    assert not any(Path("/tmp").glob("sftpgate-optimize-*")), "optimize leaves nothing behind"


async def test_a_second_sftpgate_on_the_same_data_folder_is_refused(gate, tmp_path):
    result = await sftpgate_async("--config", str(tmp_path / "config.yaml"), "serve")
    assert result.returncode == 2
    assert "in use by another sftpgate" in result.stderr


async def test_status_reads_a_ledger_from_before_an_upgrade_without_changing_it(
    tmp_path, standin, host_keys_dir, client_key
):
    """`status` after an upgrade, before the new service has started: the ledger lacks the
    columns added since, and a reader must neither fail nor add them."""
    import sqlite3

    from sftpgate.ledger import Ledger

    from .conftest import gate_config

    config = gate_config(tmp_path, standin.url, host_keys_dir, client_key)
    ledger_path = tmp_path / "data" / "sftpgate.db"
    ledger = Ledger(ledger_path)
    ledger.record_queued(
        user="phone", path="IMG_0001.jpg", sha1="0" * 40, size=1, mtime=0.0, inode=1
    )
    ledger.close()
    added = ("live_photo_video", "burst_id", "burst_primary", "immich_copy_bytes")
    with sqlite3.connect(ledger_path) as db:  # as the release before the columns were added
        db.execute("DROP INDEX originals_burst")
        for column in added:
            db.execute(f"ALTER TABLE originals DROP COLUMN {column}")
    result = await sftpgate_async("--config", str(config), "status", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["states"] == {"queued": 1}
    with sqlite3.connect(ledger_path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_xinfo(originals)")}
    assert not columns & set(added)
