"""Memory: the server's RSS during one large upload, and the ledger with many remembered files
(a codec worker's peak memory is measured by bench/codecs.py).

- Upload: one file of 5 GB (--quick: 256 MB) streamed by an asyncssh client from one reused
  256 KiB random block, 16 writes in flight (no file is written on the client side). VmRSS of the
  sftpgate process is sampled every 100 ms from /proc/PID/status.
- Ledger: 1,000,000 (--quick: 100,000) remembered files of one user, in 100 (10) folders of
  10,000, inserted with executemany on `Ledger`'s connection in large transactions. Reported:
  file size, `remembered_in_dir` for one folder of 10,000 (the issue wants < 100 ms),
  `remembered_dirs` of their parent, and a real SFTP listing (asyncssh readdir) of such a folder
  from an sftpgate serving that ledger.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    GB,
    MB,
    MIB,
    Bench,
    BenchError,
    Gate,
    Section,
    Standin,
    fmt,
    loadavg,
    median,
    poll,
    rss_bytes,
    spread,
)

BLOCK = 256 * 1024
IN_FLIGHT = 16
FOLDER_FILES = 10_000


class RssSampler:
    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), rss_bytes(self.pid)))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def _stream(bench: Bench, gate: Gate, total: int) -> dict[str, float]:
    import asyncssh

    block = os.urandom(BLOCK)
    async with (
        asyncssh.connect(
            "127.0.0.1",
            gate.port,
            username="phone",
            client_keys=[str(bench.client_key)],
            known_hosts=None,
        ) as conn,
        conn.start_sftp_client() as sftp,
    ):
        await asyncio.sleep(1.0)
        start_rss = rss_bytes(gate.pid)
        with RssSampler(gate.pid) as sampler:
            started = time.perf_counter()
            next_offset = 0

            async def writer(f: asyncssh.SFTPClientFile) -> None:
                nonlocal next_offset
                while next_offset < total:
                    offset = next_offset
                    next_offset += BLOCK
                    n = min(BLOCK, total - offset)
                    await f.write(block if n == BLOCK else block[:n], offset)

            async with sftp.open("big-stream.bin", "wb") as f:
                await asyncio.gather(*(writer(f) for _ in range(IN_FLIGHT)))
            seconds = time.perf_counter() - started
            await asyncio.sleep(1.0)
        end_rss = rss_bytes(gate.pid)
    peak = max(r for _, r in sampler.samples)
    return {
        "start": start_rss,
        "peak": peak,
        "end": end_rss,
        "growth": peak - start_rss,
        "mbps": total / seconds / MB,
        "samples": len(sampler.samples),
    }


def upload_rss(bench: Bench) -> dict[str, float]:
    total = 256 * MB if bench.quick else 5 * GB
    standin = Standin(bench)
    gate = Gate(bench, standin.url, name="gate-memory")
    try:
        result = asyncio.run(_stream(bench, gate, total))
        result["bytes"] = total

        def landed() -> bool:
            rows = gate.ledger("SELECT COUNT(*), COALESCE(MAX(size), 0) FROM originals")
            return bool(rows[0][0] == 1 and rows[0][1] == total)

        poll(landed, 60, "the streamed upload to be recorded")
        return result
    finally:
        gate.stop()
        standin.stop()
        shutil.rmtree(gate.dir, ignore_errors=True)


def _fill(db_path: Path, rows: int) -> float:
    from sftpgate.ledger import Ledger

    ledger = Ledger(db_path)
    db = ledger._db
    now = time.time()
    sql = (
        "INSERT INTO originals (user, path, state, outcome, sha1, size, mtime, inode,"
        " received_at, updated_at, asset_id) VALUES ('phone',?,'done','uploaded',?,?,?,NULL,?,?,?)"
    )

    def batch(lo: int, hi: int):  # type: ignore[no-untyped-def]
        for i in range(lo, hi):
            folder, n = divmod(i, FOLDER_FILES)
            yield (
                f"DCIM/{folder:03d}/IMG_{n:05d}.jpg",
                hashlib.sha1(i.to_bytes(8, "big")).hexdigest(),
                3_000_000 + i % 1_000_000,
                now - 86400 * (i % 300),
                now,
                now,
                f"00000000-0000-4000-8000-{i:012d}",
            )

    started = time.perf_counter()
    step = 100_000
    for lo in range(0, rows, step):
        db.execute("BEGIN")
        db.executemany(sql, batch(lo, min(rows, lo + step)))
        db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    seconds = time.perf_counter() - started
    ledger.close()
    return seconds


def _timed(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


async def _sftp_listing(bench: Bench, gate: Gate, path: str, n: int) -> tuple[list[float], int]:
    import asyncssh

    async with (
        asyncssh.connect(
            "127.0.0.1",
            gate.port,
            username="phone",
            client_keys=[str(bench.client_key)],
            known_hosts=None,
        ) as conn,
        conn.start_sftp_client() as sftp,
    ):
        times, count = [], 0
        for _ in range(n):
            t = time.perf_counter()
            names = await sftp.readdir(path)
            times.append(time.perf_counter() - t)
            count = len(names)
    return times, count


def ledger_scale(bench: Bench) -> dict[str, object]:
    from sftpgate.ledger import Ledger

    rows = 100_000 if bench.quick else 1_000_000
    data = bench.mkdtemp("ledger") / "data"
    db_path = data / "sftpgate.db"
    fill_seconds = _fill(db_path, rows)
    size = sum(p.stat().st_size for p in data.iterdir() if p.name.startswith("sftpgate.db"))
    folders = rows // FOLDER_FILES
    folder = f"DCIM/{folders // 2:03d}"
    since = time.time() - 365 * 86400
    ledger = Ledger(db_path)
    try:
        got = ledger.remembered_in_dir("phone", folder, since)
        if len(got) != FOLDER_FILES:
            raise BenchError(f"remembered_in_dir returned {len(got)} files, expected 10,000")
        reps = 5
        in_dir = _timed(lambda: ledger.remembered_in_dir("phone", folder, since), reps)
        dirs_parent = _timed(lambda: ledger.remembered_dirs("phone", "DCIM", since), reps)
        dirs_folder = _timed(lambda: ledger.remembered_dirs("phone", folder, since), reps)
        unfinished = _timed(ledger.count_unfinished, reps)
        by_state = _timed(ledger.count_by_state, reps)
    finally:
        ledger.close()
    standin = Standin(bench)
    gate = Gate(bench, standin.url, name="gate-ledger", data_dir=data)
    try:
        listing, count = asyncio.run(_sftp_listing(bench, gate, folder, 3))
        parent, parent_count = asyncio.run(_sftp_listing(bench, gate, "DCIM", 3))
    finally:
        gate.stop()
        standin.stop()
        shutil.rmtree(data.parent, ignore_errors=True)
        shutil.rmtree(gate.dir, ignore_errors=True)
    return {
        "rows": rows,
        "fill_seconds": fill_seconds,
        "size": size,
        "in_dir": in_dir,
        "dirs_parent": dirs_parent,
        "dirs_folder": dirs_folder,
        "unfinished": unfinished,
        "by_state": by_state,
        "listing": listing,
        "listing_count": count,
        "parent": parent,
        "parent_count": parent_count,
        "folders": folders,
    }


def run(bench: Bench) -> Section:
    up = upload_rss(bench)
    bench.log(f"memory: upload {up}")
    led = ledger_scale(bench)
    bench.log(f"memory: ledger {led}")
    bench.raw["memory"] = {"upload": up, "ledger": led}

    def ms(values: object) -> str:
        vals = [1000 * v for v in values]  # type: ignore[attr-defined]
        return fmt(median(vals), 1) + spread(vals, 1) + " ms"

    size = f"{up['bytes'] / GB:.2f} GB" if up["bytes"] >= GB else f"{up['bytes'] / MB:.0f} MB"
    rows = [
        [f"server RSS at start of a {size} upload", f"{up['start'] / MIB:.0f} MiB", ""],
        [
            "server RSS peak during it",
            f"{up['peak'] / MIB:.0f} MiB",
            f"{up['samples']:.0f} samples, 100 ms apart",
        ],
        ["server RSS growth (peak − start)", f"{up['growth'] / MIB:.1f} MiB", "target ≤ 50 MB"],
        [
            "server RSS after it",
            f"{up['end'] / MIB:.0f} MiB",
            f"upload ran at {up['mbps']:.0f} MB/s",
        ],
    ]
    n = f"{led['rows']:,}"
    rows += [
        [
            f"ledger with {n} remembered files: size",
            f"{led['size'] / MB:.0f} MB",
            f"filled in {led['fill_seconds']:.1f} s",
        ],
        [
            "remembered_in_dir, one folder of 10,000",
            ms(led["in_dir"]),
            "target < 100 ms; median of 5",
        ],
        [
            f"remembered_dirs of the parent ({led['folders']} folders over all rows)",
            ms(led["dirs_parent"]),
            "median of 5",
        ],
        ["remembered_dirs inside the 10,000-file folder", ms(led["dirs_folder"]), "median of 5"],
        [
            "count_unfinished (the queue gauges, twice per file)",
            ms(led["unfinished"]),
            f"median of 5; every state counted (count_by_state): {ms(led['by_state'])}",
        ],
        [
            "SFTP listing (asyncssh readdir) of the 10,000-file folder",
            ms(led["listing"]),
            f"{led['listing_count']} names (with . and ..); median of 3; end to end",
        ],
        [
            f"SFTP listing of the parent ({led['folders']} remembered folders)",
            ms(led["parent"]),
            f"{led['parent_count']} names; median of 3",
        ],
    ]
    notes = [
        "RSS: VmRSS of the sftpgate process (its codec workers are separate processes).",
        "A codec worker's peak (48 MP JPEG, 1080p video) is in the conversion section (codecs.py).",
        f"Load average after the section: {loadavg()}.",
    ]
    return Section(
        "memory",
        "Memory: server RSS during a big upload, ledger at scale",
        ["measurement", "value", "note"],
        rows,
        notes,
    )


if __name__ == "__main__":
    from run import main

    sys.exit(main([*sys.argv[1:], "--only", "memory"]))
