"""Codec worker processes: a crash or a hang costs exactly that one file, never the pool or the
server, and workers run at a lower CPU priority than the server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from sftpgate.workers import WORKER_NICE, CodecPool, CodecWorkerError, _Schedule, _starved


def crash() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)  # what a codec bug looks like from outside


def hang() -> None:
    time.sleep(3600)


def fail() -> None:
    raise RuntimeError("JPEG bitstream reconstruction data could not be represented")


def priority_and_pid() -> tuple[tuple[int, int], int]:
    return (os.nice(0), os.sched_getscheduler(0)), os.getpid()


async def test_crash_hang_and_error_fail_only_their_job():
    pool = CodecPool(2, preload=("json",))
    await pool.start()
    try:
        pids_before = set(pool.pids)
        with pytest.raises(CodecWorkerError, match="died"):
            await pool.run(crash, timeout=30)
        with pytest.raises(CodecWorkerError, match="longer than 1 s"):
            await pool.run(hang, timeout=1)
        with pytest.raises(CodecWorkerError, match="RuntimeError: JPEG bitstream"):
            await pool.run(fail, timeout=30)
        # Meanwhile and afterwards, the pool serves other jobs at full size.
        results = await asyncio.gather(*(pool.run(priority_and_pid, timeout=30) for _ in range(6)))
        # In the background: a codec never takes a time slice from the SFTP event loop.
        assert {priority for priority, _ in results} == {(WORKER_NICE, os.SCHED_IDLE)}
        # Their disk I/O is best-effort, not the idle class CFQ and BFQ would starve.
        for pid in pool.pids:
            io = subprocess.run(["ionice", "-p", str(pid)], capture_output=True, text=True)
            assert io.stdout.strip() == "best-effort: prio 7", io.stdout + io.stderr
        assert len(pool.pids) == 2
        assert len(set(pool.pids) - pids_before) == 2, (
            "the crashed and the stuck worker were replaced"
        )
    finally:
        await pool.close()
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids_before)


@pytest.mark.parametrize(
    ("ran", "waited", "runnable", "starved"),
    [
        (0.0, 2.0, False, True),  # runnable the whole 2 s period, then given a core just now
        (0.0, 0.0, True, True),  # given no core at all: the kernel has not counted the wait yet
        (0.5, 1.2, True, True),  # waited more than half the period, used less than the limit
        (0.0, 0.0, False, False),  # asleep: hung, or stuck on I/O
        (2.0, 0.0, False, False),  # busy the whole period: too slow
        (1.9, 0.0, True, False),  # spinning: had a core nearly all the period
        (1.6, 1.2, True, False),  # waited, but has used its 2 s of CPU since the job began
    ],
)
def test_the_time_limit_spares_only_a_worker_that_waited_for_a_core(ran, waited, runnable, starved):
    """Workers run under SCHED_IDLE: while other work keeps every core busy they get none, and
    the time limit is for stuck or slow codecs, not starved ones (a hang, above, is stopped)."""
    second = 10**9
    job_start, period_start = _Schedule(0, 0, True), _Schedule(second // 2, 0, True)
    now = _Schedule(period_start.on_cpu + int(ran * second), int(waited * second), runnable)
    assert _starved(job_start, period_start, now, limit=2.0) is starved


def spin_for_cpu(seconds: float) -> float:
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    return time.process_time() - start


HOG = """
import sys, time
print("spinning", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
"""


async def test_a_worker_starved_by_busy_processes_finishes_its_job_past_the_time_limit():
    """Every core busy with ordinary processes (Immich's own jobs, say) for three times the
    limit: the SCHED_IDLE worker gets no CPU meanwhile, and is not stopped for it."""
    pool = CodecPool(1)
    await pool.start()
    hogs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOG, "3", stdout=asyncio.subprocess.PIPE
        )
        for _ in os.sched_getaffinity(0)
    ]
    try:
        for hog in hogs:  # each one spins from this line on
            assert hog.stdout is not None
            assert await asyncio.wait_for(hog.stdout.readline(), 30) == b"spinning\n"
        started = time.monotonic()
        used = await pool.run(spin_for_cpu, 0.2, timeout=1)
        assert used >= 0.2
        # It did wait past the limit for a core (without that, this test would prove nothing).
        assert time.monotonic() - started > 1.5
    finally:
        for hog in hogs:
            if hog.returncode is None:
                hog.kill()
            await hog.wait()
        await pool.close()
