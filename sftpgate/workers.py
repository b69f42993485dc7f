"""Codec worker processes.

Conversion runs in separate processes so that a codec crash, a hang or a memory blow-up costs one
file, never the server, and so the SFTP event loop never waits on a codec. Each worker is a slot
with its own pipe: the pool always knows which job a dead or stuck process was running, which a
`concurrent.futures.ProcessPoolExecutor` (one broken pool fails every job in flight) cannot tell.
Workers run in the background (SCHED_IDLE): they get a core whenever the server leaves one free,
but never take a time slice from the SFTP event loop, so ingest keeps its speed while they
convert. Their disk I/O stays best-effort (lowest level), not the idle class the kernel would
derive from SCHED_IDLE, which CFQ and BFQ starve for as long as anything else reads or writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import multiprocessing
import os
import platform
import signal
import traceback
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")

WORKER_NICE = 10
WORKER_IO_LEVEL = 7  # best-effort, lowest of its eight levels
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "armv7l": 314, "i686": 289}  # syscall numbers
_IOPRIO_WHO_PROCESS, _IOPRIO_CLASS_BE = 1, 2
_PR_SET_PDEATHSIG = 1


class CodecWorkerError(Exception):
    """The worker died (crash, out of memory) or exceeded its time limit while on this job."""


def _die_with(service: int) -> None:
    """A worker ends when the service does, also after a SIGKILL of the service: an orphan
    would go on converting and write into .work/ behind the next start's back (Linux). The
    signal comes when the thread that started the worker ends, so slots are only ever started
    on the event-loop thread (CodecPool.start and _replace)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != service:  # the service died before prctl took effect
        os._exit(0)


def _run_in_background() -> None:
    """nice 10 alone still took time slices from the event loop whenever a codec was running:
    ingest while converting was 0.58–0.97 of idle ingest, under SCHED_IDLE 0.84–1.14
    (bench/README.md)."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICE)
    with contextlib.suppress(OSError, AttributeError):  # not on every platform
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    number = _IOPRIO_SET.get(platform.machine())
    if number is not None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).syscall(
                number, _IOPRIO_WHO_PROCESS, 0, _IOPRIO_CLASS_BE << 13 | WORKER_IO_LEVEL
            )


def _serve(conn: Connection, service: int, background: bool, preload: tuple[str, ...]) -> None:
    _die_with(service)
    # Ctrl-C reaches the whole process group; the service decides how to stop its workers, so a
    # worker interrupted mid-file never turns a good photo into an "unreadable" one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if background:
        _run_in_background()
    for module in preload:  # import the codecs now, not on the first file's clock
        importlib.import_module(module)
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:
            return
        try:
            reply = ("ok", fn(*args))
        except Exception as exc:  # the job's own failure travels back as a value
            reply = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}")
        try:
            conn.send(reply)
        except OSError:  # the service is gone (or replaced this worker): nobody to answer
            return


class _Slot:
    def __init__(
        self, ctx: multiprocessing.context.BaseContext, background: bool, preload: tuple[str, ...]
    ) -> None:
        self.conn, child = ctx.Pipe()
        self.process: BaseProcess = ctx.Process(  # type: ignore[attr-defined]
            target=_serve,
            args=(child, os.getpid(), background, preload),
            daemon=True,
            name="sftpgate-codec",
        )
        self.process.start()
        child.close()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class _Schedule(NamedTuple):
    """A worker process's scheduling so far, summed over its threads."""

    on_cpu: int  # ns
    waited: int  # ns runnable but waiting for a core, as the kernel has counted it so far
    runnable: bool  # a thread is running or waiting for a core right now


def _schedule_of(pid: int | None) -> _Schedule:
    run = wait = 0
    runnable = False
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"{task.path}/schedstat") as f:
                    on_cpu, waiting, _ = f.read().split()
                with open(f"{task.path}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                run, wait = run + int(on_cpu), wait + int(waiting)
                runnable = runnable or state == "R"
    return _Schedule(run, wait, runnable)


def _starved(job_start: _Schedule, period_start: _Schedule, now: _Schedule, limit: float) -> bool:
    """The time limit is meant for a codec that is stuck or too slow, not for one that spent the
    time waiting for a core (SCHED_IDLE: other work, Immich's own jobs say, kept both busy): a job
    gets another period while it has used less than `limit` of CPU and was kept from a core for
    the last one: it waited at least half of it, or it is runnable now and ran less than half.
    (The kernel adds a thread's waiting time only when the thread gets a core, so one that got
    none in the whole period shows no waiting at all.) A worker that slept (hung, stuck I/O) or
    used its CPU is stopped."""
    half = limit * 1e9 / 2
    if now.on_cpu - job_start.on_cpu >= limit * 1e9:
        return False
    ran, waited = now.on_cpu - period_start.on_cpu, now.waited - period_start.waited
    return waited >= half or (now.runnable and ran < half)


class Worker:
    """A worker process reserved by CodecPool.reserve; a crashed or stuck one is replaced."""

    def __init__(self, pool: CodecPool, slot: _Slot) -> None:
        self._pool = pool
        self.slot = slot

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float) -> T:
        """Run fn(*args) here. A job's own exception comes back as CodecWorkerError too."""
        slot = self.slot
        loop = asyncio.get_running_loop()
        try:
            slot.conn.send((fn, args))
            ready: asyncio.Future[None] = loop.create_future()
            fd = slot.conn.fileno()
            loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
            try:
                job_start = period_start = _schedule_of(slot.process.pid)
                while not (await asyncio.wait({ready}, timeout=timeout))[0]:
                    now = _schedule_of(slot.process.pid)
                    if not _starved(job_start, period_start, now, timeout):
                        raise TimeoutError
                    period_start = now
            finally:
                loop.remove_reader(fd)
            status, value = slot.conn.recv()
        except TimeoutError:
            self.slot = self._pool._replace(slot)
            raise CodecWorkerError(
                f"the optimizer took longer than {timeout:.0f} s and was stopped"
            ) from None
        except (EOFError, OSError, asyncio.CancelledError) as exc:
            self.slot = self._pool._replace(slot)
            if isinstance(exc, asyncio.CancelledError):
                raise
            code = slot.process.exitcode
            raise CodecWorkerError(f"the optimizer process died (exit code {code})") from None
        if status == "error":
            raise CodecWorkerError(value.splitlines()[0])
        return value  # type: ignore[no-any-return]


class CodecPool:
    def __init__(self, size: int, background: bool = True, preload: tuple[str, ...] = ()) -> None:
        self.size = max(1, size)
        self._background = background
        self._preload = preload
        # spawn: the service process has threads (sqlite, asyncio executors); forking it is unsafe.
        self._ctx = multiprocessing.get_context("spawn")
        self._free: asyncio.Queue[_Slot] = asyncio.Queue()
        self._all: set[_Slot] = set()

    async def start(self) -> None:
        for _ in range(self.size):
            slot = _Slot(self._ctx, self._background, self._preload)
            self._all.add(slot)
            self._free.put_nowait(slot)

    @property
    def pids(self) -> list[int]:
        return [s.process.pid for s in self._all if s.process.pid is not None]

    @contextlib.asynccontextmanager
    async def reserve(self) -> AsyncIterator[Worker]:
        """Wait for a free worker and keep it for the block: the caller knows the moment its job
        starts (the pipeline marks a file `optimizing` only then, not while it waits)."""
        worker = Worker(self, await self._free.get())
        try:
            yield worker
        finally:
            self._free.put_nowait(worker.slot)

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float) -> T:
        """Run fn(*args) in the next free worker."""
        async with self.reserve() as worker:
            return await worker.run(fn, *args, timeout=timeout)

    def _replace(self, slot: _Slot) -> _Slot:
        slot.kill()
        self._all.discard(slot)
        fresh = _Slot(self._ctx, self._background, self._preload)
        self._all.add(fresh)
        return fresh

    async def close(self) -> None:
        for slot in list(self._all):
            with contextlib.suppress(OSError):
                slot.conn.close()
        loop = asyncio.get_running_loop()
        for slot in list(self._all):
            await loop.run_in_executor(None, slot.process.join, 2)
            if slot.process.is_alive():
                slot.process.kill()
                await loop.run_in_executor(None, slot.process.join, 2)
        self._all.clear()
