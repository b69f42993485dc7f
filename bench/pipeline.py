"""Pipeline: a burst of corpus-like photos from 2 parallel clients into a stand-in Immich.

The burst (~1 GB; --quick ~20 MB) is made of distinct copies of the corpus JPEGs of 0.5 MB and
more (a COM segment after SOI makes each copy's SHA-1 unique, so the ledger's dedupe skips
nothing), plus a few corpus videos when sftpgate converts video (otherwise photos only). Two
OpenSSH `sftp -b` clients upload one half each. Measured, each rep with a fresh sftpgate and a fresh
stand-in:

- burst: first byte → every file has its asset id (done in the ledger);
- ingest alone: the same upload into an sftpgate whose `sftp.temp_patterns` is ["*"], so every
  upload waits for a rename and nothing is processed;
- optimize alone: sftpgate's own CodecPool (2 workers in the background, SCHED_IDLE) running
  `optimize_file` on every file;
- upload alone: sftpgate's ImmichClient sending the optimized files, `retry.upload_concurrency`
  (2) at a time.

Overlap efficiency = slowest stage alone / burst (1.0: the burst takes no longer than its slowest
stage). Every stage is CPU work, so the burst can be no shorter than the machine's CPU seconds of
the stages alone (/proc/stat, all processes) spread over all cores: that bound, and the best overlap
it allows, are printed beside it.

Latency: CLOSE of a single 3.5 MB 12 MP JPEG → its asset id in the stand-in (polled every
20 ms), with the optimize and upload stage times from sftpgate's /metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CORPUS,
    MB,
    Bench,
    BenchError,
    Gate,
    Section,
    Standin,
    cpu_seconds,
    distinct_jpeg,
    distinct_mp4,
    fmt,
    loadavg,
    machine_busy_seconds,
    median,
    poll,
    spread,
)

LATENCY_JPEG = "jpeg/apple-iphone6s-livephoto.jpg"  # 3.5 MB, 12 MP: the corpus' largest
MIN_PHOTO_BYTES = 500_000


@dataclass
class Burst:
    dirs: list[Path]  # one folder per client
    files: list[Path]
    bytes: int
    videos: int


def video_conversion_available(bench: Bench) -> bool:
    """Does sftpgate convert video yet? Ask its optimizer about one short 1080p clip."""
    from sftpgate.config import OptimizeConfig
    from sftpgate.optimize import optimize_file

    work = bench.mkdtemp("video-probe")
    try:
        result = optimize_file(
            CORPUS / "video/android6-1080p-gps.mp4", work, OptimizeConfig(), "UTC"
        )
        return result.decision == "converted"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def make_burst(bench: Bench, target_bytes: int, videos_wanted: int) -> Burst:
    photos = [p for p in sorted((CORPUS / "jpeg").iterdir()) if p.stat().st_size >= MIN_PHOTO_BYTES]
    sources = [p.read_bytes() for p in photos]
    root = bench.mkdtemp("burst")
    dirs = [root / "a", root / "b"]
    for d in dirs:
        d.mkdir()
    files: list[Path] = []
    total = 0
    videos = 0
    if videos_wanted:
        # The first corpus videos by name: 1080p and smaller clips, a Live Photo .mov (kept).
        for n, v in enumerate(sorted((CORPUS / "video").iterdir())[:videos_wanted]):
            p = dirs[n % 2] / f"VID_{n:05d}{v.suffix.lower()}"
            p.write_bytes(distinct_mp4(v.read_bytes(), n))
            files.append(p)
            total += p.stat().st_size
            videos += 1
    n = 0
    while total < target_bytes:
        p = dirs[n % 2] / f"IMG_{n:05d}.jpg"
        p.write_bytes(distinct_jpeg(sources[n % len(sources)], n))
        files.append(p)
        total += p.stat().st_size
        n += 1
    return Burst(dirs, files, total, videos)


def start_clients(bench: Bench, gate: Gate, burst: Burst) -> list[subprocess.Popen[bytes]]:
    """Two OpenSSH sftp clients, one half of the burst each, into burst/ (default cipher)."""
    (gate.user_root() / "burst").mkdir(exist_ok=True)
    procs = []
    for d in burst.dirs:
        batch = d.with_suffix(".batch")
        batch.write_text(f"put {d}/* burst/\n")
        argv = [
            "sftp", "-q", "-F", "/dev/null", "-b", str(batch), "-P", str(gate.port),
            "-i", str(bench.client_key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "phone@127.0.0.1",
        ]  # fmt: skip
        procs.append(bench.start(argv, d.with_suffix(".log")))
    return procs


def wait_clients(bench: Bench, procs: list[subprocess.Popen[bytes]], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise BenchError("an sftp client did not finish in time") from None
        finally:
            bench.stop(p)
        if p.returncode != 0:
            raise BenchError(f"an sftp client exited with {p.returncode}")
    return time.perf_counter()


def own_cpu_seconds() -> float:
    """This benchmark process's CPU (all threads), without its children."""
    return cpu_seconds(os.getpid(), children=False)


def start_meter() -> Callable[[], tuple[float, float]]:
    """Wall seconds and the machine's CPU seconds since this call."""
    wall, cpu = time.perf_counter(), machine_busy_seconds()
    return lambda: (time.perf_counter() - wall, machine_busy_seconds() - cpu)


def final_count(gate: Gate) -> tuple[int, int]:
    done, undone = gate.ledger(
        "SELECT COALESCE(SUM(state = 'done'), 0), COALESCE(SUM(state = 'undone'), 0)"
        " FROM originals WHERE user = 'phone'"
    )[0]
    return int(done), int(undone)


def burst_run(bench: Bench, burst: Burst, timeout: float) -> dict[str, float]:
    standin = Standin(bench)
    gate = Gate(bench, standin.url, name="gate-burst")
    try:
        n = len(burst.files)
        service, workers, immich = gate.cpu(), gate.workers_cpu(), standin.cpu()
        started, meter = time.perf_counter(), start_meter()
        procs = start_clients(bench, gate, burst)
        ingest_end = wait_clients(bench, procs, timeout)

        def finished() -> bool:
            done, undone = final_count(gate)
            return done + undone >= n

        poll(finished, timeout, "the burst to reach Immich", interval=0.05)
        total, cpu = meter()
        service, workers = gate.cpu() - service, gate.workers_cpu() - workers
        immich = standin.cpu() - immich
        done, undone = final_count(gate)
        assets = standin.counters()["created"]
        return {
            "total": total,
            "total_cpu": cpu,
            "service_cpu": service,
            "workers_cpu": workers,
            "standin_cpu": immich,
            "ingest_in_burst": ingest_end - started,
            "done": done,
            "undone": undone,
            "assets": assets,
        }
    finally:
        gate.stop()
        standin.stop()
        shutil.rmtree(gate.dir, ignore_errors=True)


def ingest_alone(bench: Bench, burst: Burst, timeout: float) -> tuple[float, float, float]:
    standin = Standin(bench)
    gate = Gate(bench, standin.url, name="gate-ingest", sftp={"temp_patterns": ["*"]})
    try:
        service, meter = gate.cpu(), start_meter()
        wait_clients(bench, start_clients(bench, gate, burst), timeout)
        spent = (*meter(), gate.cpu() - service)
        rows = gate.ledger("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM originals")[0]
        if tuple(rows) != (len(burst.files), burst.bytes):
            raise BenchError(f"ingest alone: ledger has {rows}, sent {len(burst.files)} files")
        return spent
    finally:
        gate.stop()
        standin.stop()
        shutil.rmtree(gate.dir, ignore_errors=True)


@dataclass
class Optimized:
    send: Path  # what goes to Immich: the .jxl, or the original when kept
    name: str
    sha1: str


async def _optimize_alone(
    files: list[Path], work: Path
) -> tuple[tuple[float, float, float], list[Optimized]]:
    """(seconds, machine CPU, the codec workers' CPU) and what to send."""
    from sftpgate.config import OptimizeConfig
    from sftpgate.optimize import optimize_file
    from sftpgate.workers import CodecPool

    cfg = OptimizeConfig()
    pool = CodecPool(2)
    await pool.start()
    try:
        warm = CORPUS / "jpeg/canon-t2i-adobergb-gps-small.jpg"  # imports, not timed
        for r in await asyncio.gather(
            *(pool.run(optimize_file, warm, work, cfg, "UTC", timeout=60) for _ in range(2))
        ):
            if r.output:
                Path(r.output).unlink(missing_ok=True)
        workers = sum(cpu_seconds(pid, children=False) for pid in pool.pids)
        meter = start_meter()
        results = await asyncio.gather(
            *(pool.run(optimize_file, f, work, cfg, "UTC", timeout=3600) for f in files)
        )
        workers = sum(cpu_seconds(pid, children=False) for pid in pool.pids) - workers
        spent = (*meter(), workers)
    finally:
        await pool.close()
    out = []
    for f, r in zip(files, results, strict=True):
        send = Path(r.output) if r.output else f
        name = f.with_suffix(r.extension).name if r.output and r.extension else f.name
        out.append(Optimized(send, name, hashlib.sha1(send.read_bytes()).hexdigest()))
    return spent, out


async def _upload_alone(
    standin: Standin, items: list[Optimized]
) -> tuple[float, float, float, float]:
    """(seconds, machine CPU, this process's CPU as the client, the stand-in's CPU)."""
    from common import API_KEY

    from sftpgate.immich.client import ImmichClient

    now = datetime.now(UTC)
    slots = asyncio.Semaphore(2)  # retry.upload_concurrency's default
    async with ImmichClient(standin.url) as client:
        await client.server_major()  # the version probe, not timed

        async def one(item: Optimized) -> None:
            async with slots:
                await client.upload_asset(
                    item.send,
                    api_key=API_KEY,
                    filename=item.name,
                    created_at=now,
                    modified_at=now,
                    checksum=item.sha1,
                )

        client_cpu, immich, meter = own_cpu_seconds(), standin.cpu(), start_meter()
        await asyncio.gather(*(one(i) for i in items))
        return (*meter(), own_cpu_seconds() - client_cpu, standin.cpu() - immich)


async def _latency(bench: Bench, gate: Gate, standin: Standin, n: int) -> list[dict[str, float]]:
    import asyncssh

    data = (CORPUS / LATENCY_JPEG).read_bytes()
    out = []
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
        for i in range(n):
            await asyncio.sleep(1.0)  # the pipeline is idle
            before = standin.counters()["created"]
            opt0 = gate.metric('sftpgate_stage_duration_seconds_sum{stage="optimize"}')
            up0 = gate.metric('sftpgate_stage_duration_seconds_sum{stage="upload"}')
            async with sftp.open(f"IMG_L{i:03d}.jpg", "wb") as f:
                await f.write(distinct_jpeg(data, 900_000 + i))
            closed = time.perf_counter()  # CLOSE acknowledged
            deadline = closed + 60
            while standin.counters()["created"] <= before:
                if time.perf_counter() > deadline:
                    raise BenchError("the latency photo did not reach Immich within 60 s")
                await asyncio.sleep(0.02)
            seconds = time.perf_counter() - closed
            await asyncio.sleep(0.2)  # the stage metrics are observed right after
            out.append(
                {
                    "seconds": seconds,
                    "optimize": gate.metric('sftpgate_stage_duration_seconds_sum{stage="optimize"}')
                    - opt0,
                    "upload": gate.metric('sftpgate_stage_duration_seconds_sum{stage="upload"}')
                    - up0,
                }
            )
    return out


def run(bench: Bench) -> Section:
    videos = video_conversion_available(bench)
    target = 20 * MB if bench.quick else 1000 * MB
    burst = make_burst(bench, target, (1 if bench.quick else 4) if videos else 0)
    timeout = 120.0 if bench.quick else 3600.0
    samples: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    def add_stage(stage: str, spent: tuple[float, ...], *parts: str) -> None:
        """Seconds, machine CPU, then the CPU of each named process."""
        add(stage, spent[0])
        add(f"{stage}_cpu", spent[1])
        for part, value in zip(parts, spent[2:], strict=True):
            add(f"{stage}_{part}_cpu", value)

    try:
        for rep in range(bench.reps):
            b = burst_run(bench, burst, timeout)
            for k, v in b.items():
                add(k, v)
            bench.log(f"pipeline rep {rep + 1}: burst {b}")
            add_stage("ingest", ingest_alone(bench, burst, timeout), "service")
            work = Path(tempfile.mkdtemp(prefix="optimized-", dir=bench.tmp))
            spent, optimized = asyncio.run(_optimize_alone(burst.files, work))
            add_stage("optimize", spent, "workers")
            standin = Standin(bench)
            try:
                add_stage(
                    "upload", asyncio.run(_upload_alone(standin, optimized)), "client", "standin"
                )
            finally:
                standin.stop()
            if rep == 0:
                sent = sum(o.send.stat().st_size for o in optimized)
                bench.raw["pipeline_bytes_sent"] = sent
            shutil.rmtree(work, ignore_errors=True)
            bench.log(
                f"pipeline rep {rep + 1}: ingest {samples['ingest'][-1]:.1f} s, optimize "
                f"{samples['optimize'][-1]:.1f} s, upload {samples['upload'][-1]:.1f} s"
            )
        standin = Standin(bench)
        gate = Gate(bench, standin.url, name="gate-latency")
        try:
            lat = asyncio.run(_latency(bench, gate, standin, 1 if bench.quick else 5))
        finally:
            gate.stop()
            standin.stop()
    finally:
        shutil.rmtree(burst.dirs[0].parent, ignore_errors=True)
    bench.raw["pipeline"] = {"samples": samples, "latency": lat}
    return _section(bench, burst, samples, lat, videos)


def _section(
    bench: Bench,
    burst: Burst,
    s: dict[str, list[float]],
    lat: list[dict[str, float]],
    videos: bool,
) -> Section:
    # Per rep: sum and max of the stages measured alone, and overlap efficiency.
    stage_sum = [i + o + u for i, o, u in zip(s["ingest"], s["optimize"], s["upload"], strict=True)]
    stage_max = [
        max(i, o, u) for i, o, u in zip(s["ingest"], s["optimize"], s["upload"], strict=True)
    ]
    overlap = [m / t for m, t in zip(stage_max, s["total"], strict=True)]
    cores = os.cpu_count() or 1
    stage_cpu = [
        i + o + u
        for i, o, u in zip(s["ingest_cpu"], s["optimize_cpu"], s["upload_cpu"], strict=True)
    ]
    cpu_bound = [c / cores for c in stage_cpu]
    best_overlap = [m / max(m, b) for m, b in zip(stage_max, cpu_bound, strict=True)]
    vs_bound = [t / b for t, b in zip(s["total"], cpu_bound, strict=True)]
    vs_sum = [t / m for t, m in zip(s["total"], stage_sum, strict=True)]
    mbps = [burst.bytes / MB / t for t in s["total"]]

    def row(what: str, values: list[float], digits: int = 1, note: str = "") -> list[str]:
        return [what, fmt(median(values), digits) + spread(values, digits), note]

    n = len(burst.files)
    kinds = f"{n - burst.videos} photos" + (f" + {burst.videos} videos" if burst.videos else "")
    rows = [
        row(
            f"burst: first byte → last asset id, s ({kinds}, {burst.bytes / MB:,.0f} MB)",
            s["total"],
            note=f"{median(mbps):.1f} MB/s end to end; {int(median(s['assets']))} assets created, "
            f"{int(median(s['undone']))} undone",
        ),
        row("… of which ingest (both clients done), s", s["ingest_in_burst"]),
        row("ingest alone, s", s["ingest"], note="2 × `sftp -b`, nothing processed"),
        row("optimize alone, s", s["optimize"], note="CodecPool(2) running optimize_file"),
        row("upload alone, s", s["upload"], note="ImmichClient, 2 at a time, to the stand-in"),
        row("sum of the stages alone, s", stage_sum),
        row("slowest stage alone, s", stage_max),
        row("overlap efficiency = slowest stage / burst", overlap, 2, "target ≥ 0.9"),
        row("burst / sum of the stages", vs_sum, 2, "1.0 = no overlap at all"),
        row(
            "machine CPU of the stages alone, core-s",
            stage_cpu,
            note=f"ingest {median(s['ingest_cpu']):.0f} / optimize {median(s['optimize_cpu']):.0f}"
            f" / upload {median(s['upload_cpu']):.0f} (/proc/stat, every process)",
        ),
        row("machine CPU of the burst, core-s", s["total_cpu"]),
        row(
            f"CPU bound on the burst = stages' CPU / {cores} cores, s",
            cpu_bound,
            note="no schedule finishes sooner",
        ),
        row(
            "best overlap the cores allow = slowest stage / max(slowest stage, CPU bound)",
            best_overlap,
            2,
        ),
        row("burst / CPU bound", vs_bound, 2, "1.0 = the cores never idle"),
        row(
            "… codec workers' CPU in the burst, core-s",
            s["workers_cpu"],
            note=f"optimize alone: {median(s['optimize_workers_cpu']):.1f}",
        ),
        row(
            "… sftpgate's own threads in the burst, core-s",
            s["service_cpu"],
            note=f"ingest alone: {median(s['ingest_service_cpu']):.1f}; upload alone's client: "
            f"{median(s['upload_client_cpu']):.1f}",
        ),
        row(
            "… stand-in Immich in the burst, core-s",
            s["standin_cpu"],
            note=f"upload alone: {median(s['upload_standin_cpu']):.1f}",
        ),
        row(
            f"latency CLOSE → asset id, s ({(CORPUS / LATENCY_JPEG).stat().st_size / MB:.1f} MB "
            "12 MP JPEG)",
            [x["seconds"] for x in lat],
            2,
            "target ≤ 1.5 s",
        ),
        row("… of which optimize (worker), s", [x["optimize"] for x in lat], 2),
        row("… of which upload to Immich, s", [x["upload"] for x in lat], 2),
    ]
    sent = bench.raw.get("pipeline_bytes_sent", 0)
    notes = [
        f"Medians of {bench.reps} rep(s), each with a fresh sftpgate and stand-in (min–max in "
        f"brackets); latency: median of {len(lat)}.",
        f"The burst's bytes sent to Immich after optimizing: {sent / MB:,.0f} MB of "
        f"{burst.bytes / MB:,.0f} MB.",
        "Videos: "
        + (
            "included (sftpgate converts video)."
            if videos
            else "none — sftpgate does not convert video yet, so the burst is photos only."
        ),
        f"Load average after the section: {loadavg()}.",
    ]
    return Section(
        "pipeline",
        "Pipeline: a burst from 2 clients into a stand-in Immich, vs its stages alone",
        ["measurement", "median (min–max)", "note"],
        rows,
        notes,
    )


if __name__ == "__main__":
    from run import main

    sys.exit(main([*sys.argv[1:], "--only", "pipeline"]))
