"""A sync app with parallel transfers, on folders of files that share a stem (movie.avi, movie.mpeg,
movie_mp4.mp4, …): every transfer looks at the folder, creates it if it was missing, stats the file,
uploads it as name.tmp, renames it to its name and sets its mtime. Each file reaches Immich exactly
once and the ledger keeps no unfinished row. A request refused because of an OSError is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path

import aiohttp
import asyncssh
import pytest

from sftpgate.ledger import Ledger

from .conftest import PASSWORD, eventually
from .test_crash import distinct_jpeg

TRANSFERS = 3
MTIME = 1_600_000_000
JPEG = "jpeg/htc-desire-gps.jpg"
# Per folder, the same stem in several kinds; the JPEGs made distinct per folder (a JPEG with the
# same bytes in two folders would rightly be a duplicate, not sent twice).
OTHER_KINDS = {
    "hello.png": "png/screenshot-phone-p3-xmp.png",
    "hello.gif": "gif/static-simple.gif",
    "hello.heic": "heic/apple-iphone8-tiny.heic",
    "hello_mp4.mp4": "video/android6-1080p-gps.mp4",
    "hello.3gp": "video/legacy-phone-mpeg4-amr.3gp",
}


def connect(port: int) -> asyncssh.SSHClientConnection:
    """A password login as the test user (await it, or use it with `async with`)."""
    return asyncssh.connect(
        "127.0.0.1", port, username="phone", password=PASSWORD, known_hosts=None
    )


def tree(corpus: Path) -> dict[str, dict[str, bytes]]:
    jpeg = (corpus / JPEG).read_bytes()
    folders: dict[str, dict[str, bytes]] = {}
    for n, folder in enumerate(("movie1", "movie2")):
        names = ("hello.jpg", "hello.jpeg", "hello_jpg.jpg")
        folders[folder] = {name: distinct_jpeg(jpeg, 10 * n + i) for i, name in enumerate(names)}
    folders["movie1"].update({name: (corpus / f).read_bytes() for name, f in OTHER_KINDS.items()})
    return folders


async def folder_missing(sftp: asyncssh.SFTPClient, folder: str) -> bool:
    try:
        await sftp.stat(folder)
    except asyncssh.SFTPNoSuchFile:
        return True
    return False


async def transfer(sftp: asyncssh.SFTPClient, path: str, data: bytes) -> None:
    """One file as the sync app sends it."""
    with contextlib.suppress(asyncssh.SFTPNoSuchFile):
        await sftp.stat(path)  # compared with the local file; new here
    temp = f"{path}.tmp"
    flags = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC
    async with sftp.open(temp, flags, encoding=None) as f:
        for offset in range(0, len(data), 32768):
            await f.write(data[offset : offset + 32768], offset)
    await sftp.posix_rename(temp, path)
    await sftp.setstat(path, asyncssh.SFTPAttrs(atime=MTIME, mtime=MTIME))


async def sync(sessions: list[asyncssh.SFTPClient], folders: dict[str, dict[str, bytes]]) -> None:
    for folder, files in folders.items():
        # Every transfer looks at the folder before any creates it: all find it missing.
        missing = await asyncio.gather(*(folder_missing(s, folder) for s in sessions))
        await asyncio.gather(
            *(s.mkdir(folder) for s, m in zip(sessions, missing, strict=True) if m)
        )
        await asyncio.gather(
            *(
                transfer(sessions[i % len(sessions)], f"{folder}/{name}", data)
                for i, (name, data) in enumerate(files.items())
            )
        )


async def queue_gauge(port: int) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    match = re.search(r"^sftpgate_queue_files (\S+)$", text, re.M)
    assert match is not None, "sftpgate_queue_files is missing from /metrics"
    return float(match.group(1))


async def test_parallel_transfers_of_same_stem_files_arrive_once_and_leave_no_row(
    gate, standin, corpus
):
    folders = tree(corpus)
    paths = {f"{folder}/{name}" for folder, files in folders.items() for name in files}
    async with contextlib.AsyncExitStack() as stack:
        sessions = []
        for _ in range(TRANSFERS):
            conn = await stack.enter_async_context(connect(gate.sftp.port))
            sessions.append(await stack.enter_async_context(conn.start_sftp_client()))
        await sync(sessions, folders)

    def counts() -> dict[str, int]:
        ledger = Ledger(gate.layout.ledger)
        try:
            return {state: n for state, n in ledger.count_by_state().items() if n}
        finally:
            ledger.close()

    async def all_finished() -> bool:
        unfinished = set(counts()) - {"done", "undone"}
        return not unfinished and await queue_gauge(gate.metrics_port) == 0

    await eventually(all_finished, timeout=120, what="every upload to be finished")
    # One row per file, none left for a temporary name, none twice; and the bytes of each file
    # once in Immich.
    assert counts() == {"done": len(paths)}
    assert len(standin.state.assets) == len(paths)


async def test_a_request_refused_because_of_an_os_error_is_logged(gate, caplog):
    async with connect(gate.sftp.port) as conn, conn.start_sftp_client() as sftp:
        await sftp.mkdir("Full")
        async with sftp.open("Full/x.bin.tmp", "wb") as f:
            await f.write(b"x")
        with caplog.at_level(logging.INFO, logger="sftpgate"), pytest.raises(asyncssh.SFTPError):
            await sftp.rmdir("Full")  # it holds a file
    lines = [r for r in caplog.records if r.getMessage() == "request refused"]
    assert len(lines) == 1
    fields = lines[0].fields  # type: ignore[attr-defined]
    assert fields["user"] == "phone" and fields["path"] == "Full"
    assert fields["operation"] == "rmdir" and fields["errno"] == "ENOTEMPTY"
    assert fields["error"] == "Directory not empty"
