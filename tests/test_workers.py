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

from sftpgate.workers import WORKER_NICE, CodecPool, CodecWorkerError


def crash() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)  # what a codec bug looks like from outside


def hang() -> None:
    time.sleep(3600)


def fail() -> None:
    raise RuntimeError("JPEG bitstream reconstruction data could not be represented")


def spin(cpu_seconds: float) -> float:
    """Busy for `cpu_seconds` of CPU time; returns the wall time that took."""
    wall, cpu = time.monotonic(), time.process_time()
    while time.process_time() - cpu < cpu_seconds:
        pass
    return time.monotonic() - wall


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


async def test_a_worker_starved_of_cpu_is_not_stopped_by_the_time_limit():
    """Workers run under SCHED_IDLE, so while other work keeps every core busy they get none.
    The time limit is for stuck or slow codecs: a starved one finishes its file once the cores
    are free (a hang, above, is still stopped)."""
    pool = CodecPool(1)
    await pool.start()
    await pool.run(spin, 0.0, timeout=30)  # the worker is up and waiting for a job
    # One more busy process than cores, each ending by itself after 5 s (limit periods end at
    # 2, 4 and 6 s: the job needs 0.3 s of CPU once the cores are free, and is done by 6 s).
    hog = "import time\nend = time.monotonic() + 5\nprint(flush=True)\nwhile time.monotonic() < end: pass"
    hogs = [
        subprocess.Popen([sys.executable, "-c", hog], stdout=subprocess.PIPE)
        for _ in range((os.cpu_count() or 1) + 1)
    ]
    for p in hogs:  # each one is spinning before the job is sent
        assert p.stdout is not None and p.stdout.readline() == b"\n"
    started = time.monotonic()
    try:
        await pool.run(spin, 0.3, timeout=2)
        took = time.monotonic() - started
    finally:
        for p in hogs:
            p.kill()
            p.wait()
        await pool.close()
    assert took > 2, "the job was not starved past its limit: this test proved nothing"
