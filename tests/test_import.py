"""`sftpgate import DIR`: an existing folder through the same pipeline.

The command runs as a user runs it — a child process with a config file — against the stand-in
Immich in this test's event loop, on real photos from the media corpus.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pty
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

from sftpgate.ledger import Ledger

from .conftest import gate_config

IMPORT_TIMEOUT = 240.0


async def sftpgate(*args: str, timeout: float = IMPORT_TIMEOUT) -> tuple[int, str, str]:
    """Run the CLI in a child process without blocking the stand-in's event loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sftpgate.main", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def snapshot(root: Path) -> dict[str, tuple[str, int, int, int]]:
    """Every entry below root: content hash, size, mtime and mode — what "untouched" means."""
    out: dict[str, tuple[str, int, int, int]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[p.relative_to(root).as_posix()] = (digest, st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def distinct_jpeg(data: bytes, n: int) -> bytes:
    """The same photo with a COM segment naming it: another SHA-1, still a valid JPEG."""
    comment = f"sftpgate import test photo {n}".encode()
    return data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def stems(standin) -> list[str]:
    return sorted(Path(a.original_file_name).stem for a in standin.state.assets.values())


@pytest.fixture
def config(tmp_path: Path, standin, host_keys_dir: Path, client_key: Path) -> Path:
    return gate_config(tmp_path, standin.url, host_keys_dir, client_key)


@pytest.fixture
def old_phone(tmp_path: Path, corpus: Path) -> Path:
    """An old backup: the corpus JPEGs in DCIM/Camera with their mtimes, plus files to leave."""
    src = tmp_path / "old-phone"
    camera = src / "DCIM" / "Camera"
    camera.mkdir(parents=True)
    for f in sorted((corpus / "jpeg").iterdir()):
        shutil.copy2(f, camera / f.name)
    (src / "DCIM" / ".thumbnails").mkdir()
    (src / "DCIM" / ".thumbnails" / "t.jpg").write_bytes(b"a thumbnail cache")
    (camera / ".nomedia").write_bytes(b"")
    (camera / "IMG_half.jpg.part").write_bytes(b"an upload that never finished")
    return src


async def test_keep_sends_every_photo_once_and_never_changes_the_folder(
    config: Path, old_phone: Path, standin, tmp_path: Path
):
    before = snapshot(old_phone)
    photos = files_in(old_phone / "DCIM" / "Camera")
    photos = [p for p in photos if p.endswith((".jpg", ".jpeg")) and not p.startswith(".")]

    code, out, err = await sftpgate("--config", str(config), "import", str(old_phone), "--keep")

    assert code == 0, out + err
    assert snapshot(old_phone) == before, "--keep must leave the folder exactly as it was"
    assert stems(standin) == sorted(Path(p).stem for p in photos)
    assert f"finished: {len(photos)} of {len(photos)} files" in out
    # Not a terminal: one plain line per file, naming its outcome and path.
    for p in photos:
        assert any(line.split()[1:2] == [f"DCIM/Camera/{p}"] for line in out.splitlines()), p
    watch = tmp_path / "data" / "watch" / "phone"
    assert files_in(watch) == [], "nothing is left in watch/ once Immich confirmed"
    ledger = Ledger(tmp_path / "data" / "sftpgate.db")
    try:
        rows = list(ledger.iter_all())
    finally:
        ledger.close()
    assert sorted(r.path for r in rows) == sorted(f"DCIM/Camera/{p}" for p in photos)
    assert {r.outcome for r in rows} <= {"uploaded", "kept"}
    by_path = {r.path: r for r in rows}
    for p in photos:  # the photo's own mtime, not the import's time (the date of last resort)
        original = (old_phone / "DCIM" / "Camera" / p).stat().st_mtime
        assert by_path[f"DCIM/Camera/{p}"].mtime == pytest.approx(original, abs=1e-6)

    uploads = standin.state.uploads_received
    code, out, err = await sftpgate("--config", str(config), "import", str(old_phone), "--keep")
    assert code == 0, out + err
    assert standin.state.uploads_received == uploads, "a second run sends nothing"
    assert sum(line.startswith("skipped ") for line in out.splitlines()) == len(photos)
    assert snapshot(old_phone) == before


async def test_without_keep_originals_leave_only_after_immich_confirmed(
    config: Path, corpus: Path, standin, tmp_path: Path
):
    src = tmp_path / "landing"
    (src / "upload").mkdir(parents=True)
    good = ["htc-desire-gps.jpg", "canon-a85-orient8.jpg"]
    for name in good:
        shutil.copy2(corpus / "jpeg" / name, src / "upload" / name)
    damaged = (corpus / "jpeg" / "htc-desire-gps.jpg").read_bytes()[:5000]
    (src / "upload" / "IMG_damaged.jpg").write_bytes(damaged)

    code, out, err = await sftpgate("--config", str(config), "import", str(src))

    assert code == 1, out + err  # one file is undone: scripts get to know
    assert files_in(src) == [], "moved into the pipeline: nothing left in the folder"
    assert stems(standin) == sorted(Path(n).stem for n in good)
    undone = tmp_path / "data" / "watch" / "undone" / "phone" / "upload"
    assert (undone / "IMG_damaged.jpg").read_bytes() == damaged
    assert (undone / "IMG_damaged.jpg.error.json").is_file()
    assert "undone (1)" in out and "sftpgate retry" in out
    assert files_in(tmp_path / "data" / "watch" / "phone") == []


@pytest.mark.parametrize("keep", [True, False], ids=["keep", "move"])
async def test_interrupted_by_sigkill_then_resumed_every_photo_exactly_once(
    config: Path, corpus: Path, standin, tmp_path: Path, keep: bool
):
    src = tmp_path / "backup"
    src.mkdir()
    base = (corpus / "jpeg" / "canon-t2i-adobergb-gps-small.jpg").read_bytes()
    count = 24
    for n in range(count):
        (src / f"IMG_{n:04d}.jpg").write_bytes(distinct_jpeg(base, n))
    before = snapshot(src)
    # Immich answers slowly, so the kill lands with most of the folder still to do.
    standin.state.delay_seconds = 0.3

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sftpgate.main", "--config", str(config), "import", str(src),
        *(["--keep"] if keep else []),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(IMPORT_TIMEOUT):
        while True:  # the first photo Immich confirmed: the import is in full swing
            line = (await proc.stdout.readline()).decode()
            assert line, "the import ended before any photo was delivered"
            if line.startswith(("uploaded", "kept")):
                break
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    ledger = Ledger(tmp_path / "data" / "sftpgate.db")
    try:
        done_at_kill = sum(1 for r in ledger.iter_all() if r.state == "done")
    finally:
        ledger.close()
    assert 0 < done_at_kill < count, "killed in the middle of the run"

    standin.state.delay_seconds = 0.0
    flags = ["--keep"] if keep else []
    code, out, err = await sftpgate("--config", str(config), "import", str(src), *flags)

    assert code == 0, out + err
    assert stems(standin) == [f"IMG_{n:04d}" for n in range(count)], "each photo exactly once"
    if keep:
        assert "skipped " in out, "what the killed run delivered is skipped by its SHA-1"
        assert snapshot(src) == before
    else:
        assert files_in(src) == []
    data = tmp_path / "data"
    assert files_in(data / "watch" / "phone") == []
    assert not list((data / ".staging").glob("import-*")), "the half copy of the kill is gone"


async def test_from_another_file_system_the_source_goes_only_after_its_copy_is_recorded(
    config: Path, corpus: Path, standin, tmp_path: Path
):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second file system (/dev/shm) to move across")
    src = Path(tempfile.mkdtemp(prefix="sftpgate-import-", dir=shm))
    try:
        shutil.copy2(corpus / "jpeg" / "htc-desire-gps.jpg", src / "IMG_1.jpg")
        mtime = (src / "IMG_1.jpg").stat().st_mtime
        code, out, err = await sftpgate("--config", str(config), "import", str(src))
        assert code == 0, out + err
        assert files_in(src) == []
        assert stems(standin) == ["IMG_1"]
        ledger = Ledger(tmp_path / "data" / "sftpgate.db")
        try:
            (row,) = list(ledger.iter_all())
        finally:
            ledger.close()
        assert row.mtime == pytest.approx(mtime, abs=1e-6), "the copy keeps the photo's mtime"
    finally:
        shutil.rmtree(src)


async def test_ctrl_c_parks_the_work_and_a_second_run_finishes_it(
    config: Path, corpus: Path, standin, tmp_path: Path
):
    """Ctrl-C reaches the whole process group, codec workers included: no photo may end in
    undone/ because of it, and the next run delivers the rest."""
    src = tmp_path / "roll"
    src.mkdir()
    base = (corpus / "jpeg" / "htc-desire-gps.jpg").read_bytes()
    count = 12
    for n in range(count):
        (src / f"IMG_{n:04d}.jpg").write_bytes(distinct_jpeg(base, n))
    standin.state.delay_seconds = 0.3
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sftpgate.main", "--config", str(config), "import", str(src), "--keep",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(IMPORT_TIMEOUT):
        while not (await proc.stdout.readline()).startswith((b"uploaded", b"kept")):
            pass
        os.killpg(proc.pid, signal.SIGINT)
        rest = (await proc.stdout.read()).decode()
        await proc.wait()
    assert proc.returncode == 130, rest
    assert "run the same command again" in rest
    ledger = Ledger(tmp_path / "data" / "sftpgate.db")
    try:
        states = ledger.count_by_state()
    finally:
        ledger.close()
    assert "undone" not in states, "an interrupted conversion is parked, not undone"

    standin.state.delay_seconds = 0.0
    code, out, err = await sftpgate("--config", str(config), "import", str(src), "--keep")
    assert code == 0, out + err
    assert stems(standin) == [f"IMG_{n:04d}" for n in range(count)]


async def test_on_a_terminal_a_progress_bar_shows(config: Path, corpus: Path, standin, tmp_path):
    src = tmp_path / "few"
    src.mkdir()
    shutil.copy2(corpus / "jpeg" / "htc-desire-gps.jpg", src / "a.jpg")
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sftpgate.main", "--config", str(config), "import", str(src), "--keep",
        stdout=slave, stderr=slave, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []

    def read_all() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    async with asyncio.timeout(IMPORT_TIMEOUT):
        await asyncio.gather(asyncio.to_thread(read_all), proc.wait())
    os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, screen
    assert "100%" in screen and "1/1" in screen and "1 uploaded" in screen
    assert len(standin.state.assets) == 1


async def test_refusals_name_the_problem(
    tmp_path: Path, standin, gate, host_keys_dir: Path, client_key: Path
):
    # The service (the `gate` fixture, same data_dir) answers on this config's metrics port.
    config = gate_config(
        tmp_path,
        standin.url,
        host_keys_dir,
        client_key,
        metrics={"listen": f"127.0.0.1:{gate.metrics_port}"},
    )
    src = tmp_path / "photos"
    src.mkdir()
    code, _, err = await sftpgate("--config", str(config), "import", str(src), "--user", "nobody")
    assert code == 2 and "not a configured user" in err
    code, _, err = await sftpgate("--config", str(config), "import", str(tmp_path / "data"))
    assert code == 2 and "overlaps data_dir" in err
    code, _, err = await sftpgate("--config", str(config), "import", str(tmp_path / "missing"))
    assert code == 2 and "not a folder" in err
    # Two pipelines on one ledger would both work the same rows: not while the service runs.
    code, _, err = await sftpgate("--config", str(config), "import", str(src))
    assert code == 2 and "sftpgate serve is running" in err


async def test_a_second_import_on_the_same_data_dir_waits_its_turn(config: Path, tmp_path: Path):
    import fcntl

    data = tmp_path / "data"
    data.mkdir()
    src = tmp_path / "photos"
    src.mkdir()
    with (data / "sftpgate.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running import holds it
        code, _, err = await sftpgate("--config", str(config), "import", str(src))
    assert code == 2 and "in use by another sftpgate" in err
    code, out, err = await sftpgate("--config", str(config), "import", str(src))
    assert code == 0 and "finished: 0 of 0 files" in out, out + err
