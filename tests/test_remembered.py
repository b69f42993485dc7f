"""Remembered files: a delivered photo stays in the client's view with the size and mtime
the client gave it, so a sync app never sends it again; `remove` forgets it; it expires after
`sftp.remember_days`."""

from __future__ import annotations

import time

import asyncssh
import pytest

from .conftest import PASSWORD, finished

PHOTO = "jpeg/htc-desire-gps.jpg"
MTIME = 1_600_000_000


def connect(service) -> asyncssh.SSHClientConnection:
    return asyncssh.connect(
        "127.0.0.1", service.sftp.port, username="phone", password=PASSWORD, known_hosts=None
    )


async def deliver(gate, sftp, corpus, name: str) -> None:
    await sftp.put(str(corpus / PHOTO), name)
    await sftp.setstat(name, asyncssh.SFTPAttrs(atime=MTIME, mtime=MTIME))
    await gate.pipeline.wait_for(finished(1), timeout=60)
    assert not (gate.layout.watch / "phone" / name).exists()


async def test_delivered_files_keep_their_size_and_mtime_and_setstat_works(gate, corpus):
    size = (corpus / PHOTO).stat().st_size
    async with connect(gate) as conn, conn.start_sftp_client() as sftp:
        await sftp.mkdir("DCIM")
        await deliver(gate, sftp, corpus, "DCIM/IMG_1.jpg")
        for attrs in (await sftp.stat("DCIM/IMG_1.jpg"), await sftp.lstat("DCIM/IMG_1.jpg")):
            assert (attrs.size, attrs.mtime) == (size, MTIME)
        (entry,) = [n for n in await sftp.readdir("DCIM") if n.filename == "IMG_1.jpg"]
        assert (entry.attrs.size, entry.attrs.mtime) == (size, MTIME)
        # A sync app that preserves times sets them again after the fact.
        await sftp.setstat("DCIM/IMG_1.jpg", asyncssh.SFTPAttrs(atime=MTIME + 60, mtime=MTIME + 60))
        assert (await sftp.stat("DCIM/IMG_1.jpg")).mtime == MTIME + 60
        # Reading the bytes back is refused with a reason: they live in Immich now.
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.open("DCIM/IMG_1.jpg", "rb")


async def test_a_setstat_meeting_the_file_as_it_leaves_watch_lands_on_the_ledger(
    gate, corpus, monkeypatch
):
    """rclone sets the mtime by path right after CLOSE, while a worker may be moving the file
    on (to Immich, or to undone/). The file goes at the worst instant here, just before its
    times change, and the request still succeeds: the ledger keeps the time."""
    import os

    name = "IMG_9.jpg.partial"  # a temporary name: nothing takes it but the test
    watched = gate.layout.watch / "phone" / name
    real_utime = os.utime
    taken: list[str] = []

    def utime_as_the_file_leaves(target, *args, **kwargs):
        if watched.exists():
            os.replace(watched, watched.with_name("taken"))  # what a worker does
            taken.append(name)
        return real_utime(target, *args, **kwargs)

    async with connect(gate) as conn, conn.start_sftp_client() as sftp:
        await sftp.put(str(corpus / PHOTO), name)
        monkeypatch.setattr(os, "utime", utime_as_the_file_leaves)
        await sftp.setstat(name, asyncssh.SFTPAttrs(atime=MTIME, mtime=MTIME))
        monkeypatch.undo()
        assert taken == [name]
        assert (await sftp.stat(name)).mtime == MTIME
    row = await gate.db(lambda db: db.active_for_path("phone", name))
    assert row is not None and row.mtime == MTIME


async def test_remove_forgets_and_never_touches_immich(gate, standin, corpus):
    async with connect(gate) as conn, conn.start_sftp_client() as sftp:
        await deliver(gate, sftp, corpus, "IMG_2.jpg")
        await sftp.remove("IMG_2.jpg")
        assert "IMG_2.jpg" not in await sftp.listdir(".")
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await sftp.stat("IMG_2.jpg")
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await sftp.remove("IMG_2.jpg")
    assert len(standin.state.assets) == 1  # the photo is still in Immich


async def test_remembered_files_expire_after_remember_days(gate, corpus):
    async with connect(gate) as conn, conn.start_sftp_client() as sftp:
        await deliver(gate, sftp, corpus, "IMG_3.jpg")
        assert "IMG_3.jpg" in await sftp.listdir(".")
        days = gate.config.sftp.remember_days
        long_ago = time.time() - (days + 1) * 86400
        await gate.db(
            lambda db: db._db.execute("UPDATE originals SET received_at = ?", (long_ago,))
        )
        assert "IMG_3.jpg" not in await sftp.listdir(".")
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await sftp.stat("IMG_3.jpg")


async def test_a_sync_that_compares_listings_sends_nothing_the_second_time(gate, standin, corpus):
    """A naive one-way sync: upload every local file whose name, size or mtime differs remotely."""
    local = {
        f"IMG_{n}.jpg": corpus / p
        for n, p in enumerate(["jpeg/htc-desire-gps.jpg", "jpeg/canon-a85-orient8.jpg"])
    }

    async def sync(sftp: asyncssh.SFTPClient) -> int:
        remote = {n.filename: n.attrs for n in await sftp.readdir("Camera")}
        sent = 0
        for name, path in local.items():
            st = path.stat()
            attrs = remote.get(name)
            if attrs is None or attrs.size != st.st_size or attrs.mtime != int(st.st_mtime):
                await sftp.put(str(path), f"Camera/{name}", preserve=True)
                sent += 1
        return sent

    async with connect(gate) as conn, conn.start_sftp_client() as sftp:
        await sftp.mkdir("Camera")
        assert await sync(sftp) == 2
        await gate.pipeline.wait_for(lambda c: c.get("done", 0) == 2, timeout=60)
        assert not any(p.is_file() for p in (gate.layout.watch / "phone" / "Camera").iterdir())
        assert await sync(sftp) == 0
    assert standin.state.uploads_received == 2


def test_listing_queries_see_only_their_folder_also_in_a_ledger_made_before_the_folder_column(
    tmp_path,
):
    """remembered_in_dir / remembered_dirs read the indexed `folder` column: direct files only,
    subfolders found by seeking past each one (names that sort around "/" included), forgotten
    files left out; a ledger written before the column existed gets it on opening."""
    import sqlite3

    from sftpgate.ledger import _SCHEMA, Ledger

    db_file = tmp_path / "old.db"
    old = sqlite3.connect(db_file)
    old.executescript(_SCHEMA)  # the table as earlier releases created it
    paths = [
        "top.jpg", "DCIM/a.jpg", "DCIM/Camera/b.jpg", "DCIM/Camera/sub/c.jpg", "DCIM 2/d.jpg",
        "DCIM-x/e.jpg", "DCIM/Ω/f.jpg", "DCIM/gone/g.jpg", "DCIMx.jpg",
    ]  # fmt: skip
    now = time.time()
    for path in paths:
        old.execute(
            "INSERT INTO originals (user, path, state, sha1, size, mtime, received_at, updated_at,"
            " forgotten) VALUES ('phone', ?, 'done', ?, 1, 1.0, ?, ?, ?)",
            (path, "0" * 40, now, now, int(path.startswith("DCIM/gone/"))),
        )
    old.commit()
    old.close()

    ledger = Ledger(db_file)
    try:
        assert set(ledger.remembered_in_dir("phone", "", 0)) == {"top.jpg", "DCIMx.jpg"}
        assert ledger.remembered_dirs("phone", "", 0) == {"DCIM", "DCIM 2", "DCIM-x"}
        assert set(ledger.remembered_in_dir("phone", "DCIM", 0)) == {"a.jpg"}
        assert ledger.remembered_dirs("phone", "DCIM", 0) == {"Camera", "Ω"}
        assert ledger.remembered_dirs("phone", "DCIM/Camera", 0) == {"sub"}
        assert set(ledger.remembered_in_dir("phone", "DCIM/Camera/sub", 0)) == {"c.jpg"}
        assert ledger.remembered_dirs("phone", "DCIM/gone", 0) == set()
        assert ledger.remembered_in_dir("phone", "DCIM", now + 1) == {}  # expired
        plan = " ".join(
            str(row)
            for row in ledger._db.execute(
                "EXPLAIN QUERY PLAN SELECT folder FROM originals WHERE user = 'phone'"
                " AND folder > 'DCIM/' AND folder < 'DCIN' ORDER BY folder LIMIT 1"
            )
        )
        assert "originals_user_folder" in plan
    finally:
        ledger.close()


def test_the_queue_gauges_do_not_read_every_remembered_row(tmp_path):
    """The pipeline refreshes its queue and undone gauges twice per file; counting every state
    read all remembered rows (119 ms at 1,000,000). The unfinished states are counted from the
    state index alone: far fewer SQLite steps than there are delivered files."""
    from sftpgate.ledger import Ledger

    ledger = Ledger(tmp_path / "sftpgate.db")
    try:
        now = time.time()
        ledger._db.executemany(
            "INSERT INTO originals (user, path, state, sha1, size, mtime, received_at, updated_at)"
            " VALUES ('phone', ?, ?, ?, 1, 1.0, ?, ?)",
            [
                (f"DCIM/{state}-{i}.jpg", state, "0" * 40, now, now)
                for state, n in [
                    ("done", 20_000),
                    ("received", 1),
                    ("queued", 3),
                    ("optimizing", 2),
                    ("uploading", 1),
                    ("undone", 4),
                ]
                for i in range(n)
            ],
        )
        ledger._db.commit()
        steps = 0

        def count_step() -> int:
            nonlocal steps
            steps += 1
            return 0

        ledger._db.set_progress_handler(count_step, 1)
        unfinished = ledger.count_unfinished()
        ledger._db.set_progress_handler(None, 1)
        assert unfinished == {
            "received": 1,
            "queued": 3,
            "optimizing": 2,
            "uploading": 1,
            "undone": 4,
        }
        assert unfinished == {k: v for k, v in ledger.count_by_state().items() if k != "done"}
        assert steps < 2_000, f"{steps} SQLite steps for 11 unfinished rows among 20,000 done"
    finally:
        ledger.close()
