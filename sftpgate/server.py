"""The service lifecycle: start every stage, serve, shut down cleanly.

Start order follows the data: ledger (and crash recovery) → codec workers → Immich client →
pipeline → intake rescan of watch/ → SFTP listener → metrics. Shutdown runs the other way, so no
upload is accepted that nothing will process, and work in flight is parked in the ledger. It ends
within `shutdown_grace_seconds`: SFTP connections are closed (cut-off uploads parked for a
resume), uploads to Immich get what is left of the grace, less a reserve for closing the workers.
A start that fails half way stops, the same way, what it had started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import watchfiles
from aiohttp import web

from .config import Config, parse_listen
from .control import ControlServer
from .immich.client import ImmichClient
from .intake import Intake
from .layout import DataDirBusy, Layout, lock_data_dir
from .ledger import Ledger, LedgerThread, State
from .logs import event
from .metrics import Metrics, health_app
from .notify import Notifier, Totals
from .pipeline import Pipeline
from .sftp.processes import ConnectionProcesses
from .sftp.server import SftpGateway
from .status import requeue_undone
from .workers import CodecPool

STALE_PART_SECONDS = 86400.0
# Of the shutdown grace, what is kept for the steps after the pipeline: the Immich client and the
# codec workers (one cut off mid-conversion is replaced by a fresh process, which is then joined).
CLEANUP_RESERVE_SECONDS = 2.0


class Service:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.layout = Layout(config.data_path)
        self.metrics = Metrics()
        self.notifier = Notifier(config, self.metrics)
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics_port: int | None = None
        self._running = contextlib.AsyncExitStack()  # how to stop what start() started
        self._deadline: float | None = None  # when the shutdown grace ends (loop time)

    async def start(self) -> None:
        cfg = self.config
        users = [u.name for u in cfg.sftp.users]
        async with contextlib.AsyncExitStack() as started:
            self._lock = lock_data_dir(self.layout.root)
            started.callback(os.close, self._lock)
            self.layout.ensure(users)
            _remove_stale_parts(self.layout)
            stages = await start_stages(cfg, self.layout, self.metrics, self.notifier)
            self.db, self.pool, self.immich = stages.db, stages.pool, stages.immich
            self.pipeline, self.intake = stages.pipeline, stages.intake
            started.push_async_callback(stages.close)
            self.notifier.start(lambda: stages.db(_digest_totals))
            # Stopped after the pipeline, so its last undone files are still told.
            started.push_async_callback(self.notifier.stop)
            self._tasks.append(asyncio.create_task(self.pipeline.run()))
            self._tasks.append(asyncio.create_task(self._scan_forever()))
            started.push_async_callback(self._stop_work)
            self.control = ControlServer(self.layout.control, {"retry": self._retry})
            started.push_async_callback(self.control.stop)
            await self.control.start()
            gateway = ConnectionProcesses if cfg.sftp.processes else SftpGateway
            self.sftp = gateway(cfg, self.layout, self.intake, self.metrics)
            started.push_async_callback(self._stop_sftp)
            await self.sftp.start()
            if cfg.metrics.listen:
                await self._start_metrics(started)
            self._running = started.pop_all()
        event(
            "started",
            sftp_port=self.sftp.port,
            metrics_port=self.metrics_port,
            data_dir=str(self.layout.root),
        )

    async def _start_metrics(self, started: contextlib.AsyncExitStack) -> None:
        host, port = parse_listen(self.config.metrics.listen)
        runner = web.AppRunner(health_app(self.metrics, self.ready), access_log=None)
        await runner.setup()
        started.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        self.metrics_port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def ready(self) -> tuple[bool, str]:
        try:
            await self.db(lambda db: db.count_unfinished())
        except Exception as exc:
            return False, f"ledger not readable: {exc}"
        if not os.access(self.layout.root, os.W_OK):
            return False, "data_dir is not writable"
        if not await self.immich.ping():
            return False, "Immich does not answer"
        report = self.pipeline.immich_report
        if report is not None and report.lacks_upload:
            return False, "an Immich API key lacks the asset.upload permission"
        return True, "ok"

    async def _retry(self, request: dict[str, Any]) -> dict[str, Any]:
        """`sftpgate retry` beside the running service: the change is made by the ledger's
        writer, here."""
        paths = [str(p) for p in request.get("paths", [])]
        queued = await self.db(lambda db: requeue_undone(db, self.layout, paths))
        for client_path in queued:
            event("retry", path=client_path, outcome="queued again")
        await self.pipeline.refresh_gauges()
        self.pipeline.wake()
        return {"queued": queued}

    async def _scan_forever(self) -> None:
        """Pick up files that reach watch/ without the SFTP server (a share, a cp).

        inotify (through watchfiles) tells when something changed, so a copied-in file is taken
        as soon as it has settled; the periodic scan stays for file systems without inotify (NFS,
        some FUSE shares) and also removes abandoned temporaries and stale parts.
        """
        changed = asyncio.Event()
        notifier = asyncio.create_task(self._watch_changes(changed))
        interval = self.config.watch.scan_interval_seconds
        settle = self.config.watch.settle_seconds
        loop = asyncio.get_running_loop()
        next_scan = loop.time() + interval
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_scan - loop.time())):
                        await changed.wait()
                if changed.is_set():
                    changed.clear()
                    # Look again once the change can have settled.
                    next_scan = min(next_scan, loop.time() + settle + 0.1)
                    continue
                try:
                    await self.intake.scan_watch()
                    await self.intake.remove_abandoned()
                    _remove_stale_parts(self.layout)
                except OSError as exc:
                    event("scan failed", level=30, error=str(exc))
                next_scan = loop.time() + interval
        finally:
            notifier.cancel()

    async def _watch_changes(self, changed: asyncio.Event) -> None:
        try:
            # A removal brings nothing to adopt, and each delivered original is one.
            async for _ in watchfiles.awatch(
                self.layout.watch, watch_filter=_not_a_removal, recursive=True, debounce=200
            ):
                changed.set()
        except (OSError, RuntimeError) as exc:  # no inotify here (limits, file system): poll only
            event("inotify unavailable", level=30, error=str(exc), outcome="polling watch/ instead")

    async def stop(self) -> None:
        """Stop what start() started, in the reverse order, within `shutdown_grace_seconds`."""
        self._deadline = None
        await self._running.aclose()
        event("stopped")

    def _grace_left(self) -> float:
        """Seconds of the shutdown grace left for a step, less the reserve for the last steps; the
        grace starts with the first step that asks (a stop, or a start that failed)."""
        loop = asyncio.get_running_loop()
        grace = self.config.shutdown_grace_seconds
        if self._deadline is None:
            self._deadline = loop.time() + grace
        reserve = min(CLEANUP_RESERVE_SECONDS, grace / 4)
        return max(0.0, self._deadline - loop.time() - reserve)

    async def _stop_sftp(self) -> None:
        await self.sftp.stop(self._grace_left())

    async def _stop_work(self) -> None:
        await self.pipeline.stop(self._grace_left())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop within `shutdown_grace_seconds`. A start that
        fails ends the process with status 1 and one line saying why (DataDirBusy is the
        caller's to report)."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
        except DataDirBusy:
            raise
        except Exception as exc:
            # What had started is stopped by now: no worker processes left, the lock released.
            event("start failed", level=40, error=str(exc) or repr(exc), outcome="exiting")
            raise SystemExit(1) from None
        await stop.wait()
        event("stopping", reason="signal", grace_seconds=self.config.shutdown_grace_seconds)
        await self.stop()


@dataclass
class Stages:
    """The stages every entry point shares (serve, import): ledger, workers, Immich, pipeline."""

    db: LedgerThread
    pool: CodecPool
    immich: ImmichClient
    pipeline: Pipeline
    intake: Intake

    async def close(self) -> None:
        """Release the Immich client, the workers and the ledger (the pipeline has stopped)."""
        try:
            await self.immich.close()
            await self.pool.close()
        finally:
            self.db.close()


async def start_stages(
    config: Config, layout: Layout, metrics: Metrics, notifier: Notifier | None = None
) -> Stages:
    """Open the ledger, start the workers, finish what a crash interrupted, and adopt files that
    landed in watch/ while nothing was running (they are complete: no need to let them settle)."""
    async with contextlib.AsyncExitStack() as started:  # a step that fails undoes the earlier ones
        db = LedgerThread(Ledger(layout.ledger))
        started.callback(db.close)
        workers = config.optimize.workers or os.cpu_count() or 1
        pool = CodecPool(workers, preload=("sftpgate.optimize",))
        started.push_async_callback(pool.close)
        await pool.start()
        immich = ImmichClient(config.immich.url, timeout_seconds=config.immich.timeout_seconds)
        started.push_async_callback(immich.close)
        pipeline = Pipeline(config, layout, db, pool, immich, metrics, notifier)
        intake = Intake(
            layout,
            db,
            metrics,
            [u.name for u in config.sftp.users],
            config.sftp.temp_patterns,
            config.sftp.remember_days,
            config.watch.settle_seconds,
            pipeline.wake,
        )
        await pipeline.recover()
        await intake.scan_watch(settle=False)
        started.pop_all()
    return Stages(db, pool, immich, pipeline, intake)


def _digest_totals(db: Ledger) -> Totals:
    """The running totals the daily digest subtracts from the previous day's."""
    original, sent = db.bytes_saved()
    return {
        **db.count_by_outcome(),
        "bytes_original": original,
        "bytes_sent": sent,
        "undone_now": db.count_unfinished().get(State.UNDONE, 0),
    }


def _not_a_removal(change: watchfiles.Change, path: str) -> bool:
    return change != watchfiles.Change.deleted


def _remove_stale_parts(layout: Layout) -> None:
    """Parts of uploads a client abandoned more than a day ago (the client still has the data).

    Age is the ctime: a finished upload is given the client's mtime, often years old, just
    before it moves into watch/, and only the ctime says when the part was last written.
    """
    if not layout.staging.is_dir():
        return
    cutoff = time.time() - STALE_PART_SECONDS
    for part in layout.staging.iterdir():
        with contextlib.suppress(FileNotFoundError):
            if part.stat().st_ctime < cutoff:
                part.unlink()
