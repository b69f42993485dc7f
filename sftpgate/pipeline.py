"""The pipeline: queued originals → optimizer (worker processes) → Immich → cleanup.

The ledger is the queue. The dispatcher takes due rows oldest first and runs each through
`_deliver`; optimizing is bounded by the worker pool, uploading by `retry.upload_concurrency`, so
the two stages overlap. Each step commits its state before acting (see ledger.py), which makes
`recover()` after a crash a matter of finishing what each row says it was doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import Callable
from datetime import datetime, tzinfo
from pathlib import Path, PurePosixPath
from zoneinfo import ZoneInfo

from .config import Config
from .immich.client import ImmichClient, PermanentImmichError, TransientImmichError
from .immich.settings import ImmichReport, inspect_immich
from .intake import sha1_of_file
from .killpoints import kill_point
from .layout import Layout, fsync_dir, move_durably, unlink_if_same
from .ledger import (
    WAITING_STATES,
    Ledger,
    LedgerThread,
    Original,
    Outcome,
    State,
    TransitionError,
)
from .logs import event, file_event
from .metrics import Metrics
from .notify import Notifier
from .optimize import OptimizeResult, optimize_file
from .optimize.dates import upload_date
from .optimize.video import PlayedAsIs
from .stacks import Stacker
from .status import finish_interrupted_retries
from .workers import CodecPool, CodecWorkerError

IMMICH_INSPECT_SECONDS = 3600.0
# Immich's conversion job runs within minutes of an upload; an hour later its copy is there.
IMMICH_COPY_SETTLE_SECONDS = 3600.0
FIRST_INSPECTION_WAIT_SECONDS = 10.0


def album_name(template: str, path: str) -> str | None:
    """The album for a client path: `{parent}` is the folder the file is in (as the Immich CLI
    and immich-go name albums), `{folder}` the first folder of the path; None for no album (no
    template, or a file at the top when the template names a folder)."""
    folders = PurePosixPath(path).parts[:-1]
    if not template:
        return None
    if not folders:
        return None if "{folder}" in template or "{parent}" in template else template
    return template.replace("{folder}", folders[0]).replace("{parent}", folders[-1])


class Pipeline:
    def __init__(
        self,
        config: Config,
        layout: Layout,
        db: LedgerThread,
        pool: CodecPool,
        immich: ImmichClient,
        metrics: Metrics,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier(config)  # one without targets tells no one
        self.layout = layout
        self.db = db
        self.pool = pool
        self.immich = immich
        self.metrics = metrics
        # None: the server's local zone, with the right DST offset for each moment.
        self.tz: tzinfo | None = ZoneInfo(config.timezone) if config.timezone else None
        self._wakeup = asyncio.Event()
        self._immich_up = asyncio.Event()
        self._upload_slots = asyncio.Semaphore(config.retry.upload_concurrency)
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._albums: dict[tuple[str, str], str] = {}
        self._stopping = False
        self._progress = asyncio.Event()  # set whenever an original finishes or is retried
        self.immich_report: ImmichReport | None = None  # what Immich does with the uploads
        self._inspected = asyncio.Event()  # the first look at Immich's settings is done
        self._copies_unmeasured: str | None = None  # why Immich's video copies were not measured
        self._created = time.monotonic()
        self.stacker = Stacker(config, db, immich)

    # -- lifecycle ----------------------------------------------------------------------------

    def wake(self) -> None:
        self._wakeup.set()
        self._progress.set()

    async def recover(self) -> None:
        """Finish what a crash interrupted: one function per state the row was left in, each
        safe to run twice (docs/ledger.md says what each finds)."""
        recover = {
            State.RECEIVED: self._recover_received,
            State.QUEUED: self._recover_waiting,
            State.OPTIMIZING: self._recover_optimizing,
            State.UPLOADING: self._recover_uploading,
        }
        for row in await self.db(lambda db: finish_interrupted_retries(db, self.layout)):
            file_event("retry", user=row.user, path=row.path, stage="receive", outcome="queued")
        for row in await self.db(lambda db: db.unfinished()):
            await recover[row.state](row)
        # Optimized files nobody waits for any more (their row finished or was removed).
        wanted = {r.work_path for r in await self.db(lambda db: db.unfinished()) if r.work_path}
        for leftover in self.layout.work.iterdir():
            if str(leftover) not in wanted:
                leftover.unlink(missing_ok=True)
        await self.refresh_gauges()

    async def _recover_received(self, row: Original) -> None:
        """A temporary upload waits for its rename unless its file is gone."""
        if not _same_file(self.layout.watch_file(row.user, row.path), row.inode):
            await self._drop_lost(row)

    async def _recover_waiting(self, row: Original) -> bool:
        """Queued, or the common part of optimizing and uploading: finish a move to undone/
        that was decided, drop a row whose bytes are gone; True if the row goes on."""
        if row.undone_path:
            await self._complete_undone(row)
            return False
        has_original = _same_file(self.layout.watch_file(row.user, row.path), row.inode)
        if not has_original and not _work_ready(row):
            await self._drop_lost(row)
            return False
        return True

    async def _recover_optimizing(self, row: Original) -> None:
        """The conversion was cut off: it runs again."""
        if await self._recover_waiting(row):
            await self.db(lambda db: db.park(row.id))

    async def _recover_uploading(self, row: Original) -> None:
        """Immich confirmed: finish the cleanup. Otherwise the same bytes are sent again, and
        Immich's checksum check answers "duplicate" if the first send had reached it."""
        if row.asset_id:
            await self._finish_done(row)
        elif await self._recover_waiting(row):
            await self.db(lambda db: db.park(row.id))

    async def _drop_lost(self, row: Original) -> None:
        await self.db(lambda db: db.drop_lost(row.id))
        file_event(
            "lost",
            level=30,
            user=row.user,
            path=row.path,
            stage=row.state,
            outcome="original no longer in watch/ (removed, or replaced by a newer upload)",
        )

    async def run(self) -> None:
        """Dispatch due originals until stopped."""
        watcher = asyncio.create_task(self._watch_immich())
        inspector = asyncio.create_task(self._inspect_immich())
        stacks = asyncio.create_task(self._catch_up_stacks())
        # One file waits at each worker besides the one it converts, so a worker starts its next
        # file the moment it finishes, not after the dispatcher's ledger round trips.
        capacity = 2 * self.pool.size + self.config.retry.upload_concurrency
        try:
            while not self._stopping:
                self._wakeup.clear()
                # A safety net only: a new file, a finished one and a stop each wake the loop.
                timeout = 5.0
                free = capacity - len(self._in_flight)
                if free > 0:
                    now = time.time()
                    rows = await self.db(
                        lambda db, n=now, f=free: db.due(n, f, list(self._in_flight))
                    )
                    for row in rows:
                        task = asyncio.create_task(self._deliver(row))
                        self._in_flight[row.id] = task
                        task.add_done_callback(lambda _, rid=row.id: self._task_done(rid))
                if len(self._in_flight) < capacity:
                    # Files in flight stay `queued` while they wait for a worker, due already:
                    # counting them would wake this loop every 50 ms for a whole backlog.
                    next_due = await self.db(lambda db: db.next_due_time(list(self._in_flight)))
                    if next_due is not None:
                        timeout = min(timeout, max(0.05, next_due - time.time()))
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wakeup.wait()
        finally:
            watcher.cancel()
            inspector.cancel()
            stacks.cancel()

    def _task_done(self, row_id: int) -> None:
        self._in_flight.pop(row_id, None)
        self._wakeup.set()

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop taking work; give uploads in flight a moment, then park the rest."""
        self._stopping = True
        self._wakeup.set()
        tasks = list(self._in_flight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def wait_for(
        self,
        condition: Callable[[dict[str, int]], bool],
        timeout: float,
        count: Callable[[Ledger], dict[str, int]] = Ledger.count_by_state,
    ) -> dict[str, int]:
        """Wait until `condition(counts by state)` holds; for the demo, tests and `import`
        (which counts only unfinished rows: every state reads all remembered rows)."""
        async with asyncio.timeout(timeout):
            while True:
                self._progress.clear()
                counts = await self.db(count)
                if condition(counts):
                    return counts
                await self._progress.wait()

    async def refresh_gauges(self) -> None:
        try:
            counts = await self.db(lambda db: db.count_unfinished())
            self.metrics.queue_files.set(sum(counts.get(s, 0) for s in WAITING_STATES))
            self.metrics.undone_files.set(counts.get(State.UNDONE, 0))
        finally:
            # Only now: whoever wakes on progress (import, the demo, tests) reads fresh gauges.
            self._progress.set()

    async def _watch_immich(self) -> None:
        """Pause uploads while Immich does not answer its ping; resume by itself."""
        while True:
            up = await self.immich.ping()
            self.metrics.immich_up.set(1 if up else 0)
            self.notifier.immich_ping(up)
            if up and not self._immich_up.is_set():
                self._immich_up.set()
                event("immich up", outcome="uploads resume")
            elif not up and self._immich_up.is_set():
                self._immich_up.clear()
                event("immich down", level=30, outcome="uploads paused")
            elif not up and not self._immich_up.is_set():
                self.metrics.immich_up.set(0)
            await asyncio.sleep(self.config.retry.ping_interval_seconds)  # polling interval

    # -- one original -------------------------------------------------------------------------

    async def _deliver(self, row: Original) -> None:
        try:
            await self.refresh_gauges()
            if not (row.upload_sha1 and _work_ready(row)):
                fixed = await self._optimize(row)
                # Undone, back in the queue for a retry, or dropped (its original was replaced).
                if fixed is None or fixed.state != State.UPLOADING:
                    return
                row = fixed
            await self._upload(row)
        except asyncio.CancelledError:
            # Parked by a shutdown: the row says what to redo at the next start.
            await asyncio.shield(self.db(lambda db: db.park(row.id)))
            raise
        except Exception as exc:  # a bug must cost one file a retry, never the dispatcher
            file_event(
                "internal error",
                level=40,
                user=row.user,
                path=row.path,
                stage=row.state,
                outcome="retry",
                error=repr(exc),
            )
            fresh = await self._reload(row)
            if fresh is not None and fresh.state in WAITING_STATES:
                await self._retry_later(fresh, "internal", f"internal error: {exc!r}")
        finally:
            with contextlib.suppress(Exception):
                await self.refresh_gauges()

    async def _optimize(self, row: Original) -> Original | None:
        src = self.layout.watch_file(row.user, row.path)
        # Whether Immich would re-encode a converted video is known within moments of the start
        # when Immich answers; until then, and only in those first moments, a file waits for it.
        remaining = FIRST_INSPECTION_WAIT_SECONDS - (time.monotonic() - self._created)
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._inspected.wait()
        # Up to one file per worker waits here for its turn; it stays `queued` until it has one.
        async with self.pool.reserve() as worker:
            # The worker starts at once; the ledger's commit (an fsync) runs beside it. Either way
            # a crash leaves the row queued or optimizing, and both are converted again.
            marked = asyncio.ensure_future(self.db(lambda db: db.start_optimizing(row.id)))
            started = time.monotonic()
            try:
                result: OptimizeResult = await worker.run(
                    optimize_file,
                    src,
                    self.layout.work,
                    self.config.optimize,
                    self.config.timezone,
                    self._played_as_is(),
                    timeout=self.config.optimize.time_limit_seconds,
                )
            except CodecWorkerError as exc:
                result = _unreadable(row, str(exc))
            finally:
                try:
                    await marked
                    taken = True
                except TransitionError:  # removed or overwritten by the client meanwhile
                    taken = False
        self.metrics.stage_duration.labels(stage="optimize").observe(time.monotonic() - started)
        if not taken:
            if result.output:
                Path(result.output).unlink(missing_ok=True)
            return None

        if result.decision == "retry":  # the disk, not the file: keep the original, try later
            await self._retry_later(row, "optimize", result.reason)
            return await self._reload(row)
        if result.decision == "unreadable" and self.config.optimize.on_error != "upload-original":
            await self._undone(row, "optimize", result.reason, kind=result.kind)
            return await self._reload(row)
        if result.decision == "converted" and result.output:
            send = Path(result.output)
            upload_sha1 = await asyncio.get_running_loop().run_in_executor(None, sha1_of_file, send)
            name = str(
                PurePosixPath(PurePosixPath(row.path).name).with_suffix(result.extension or "")
            )
            work_path: str | None = str(send)
        else:
            upload_sha1, name, work_path = row.sha1, PurePosixPath(row.path).name, None
        captured = result.captured_at.isoformat() if result.captured_at else None
        await self.db(
            lambda db: db.fix_bytes(
                row.id,
                kind=result.kind,
                reason=result.reason,
                work_path=work_path,
                upload_name=name,
                upload_sha1=upload_sha1,
                bytes_out=result.bytes_out if work_path else row.size,
                captured_at=captured,
                live_photo_video=result.live_photo_video,
                burst_id=result.burst.id if result.burst else None,
                burst_primary=bool(result.burst and result.burst.primary),
            )
        )
        file_event(
            "optimized",
            user=row.user,
            path=row.path,
            stage="optimize",
            kind=result.kind,
            outcome=result.decision,
            reason=result.reason,
            bytes_in=result.bytes_in,
            bytes_out=result.bytes_out,
            seconds=round(result.seconds, 3),
        )
        return await self._reload(row)

    async def _upload(self, row: Original) -> None:
        send = Path(row.work_path) if row.work_path else self.layout.watch_file(row.user, row.path)
        if row.state != State.UPLOADING:
            await self.db(lambda db: db.resume_upload(row.id))
        await self._immich_up.wait()
        # Immich sets the asset's date from the stored file's metadata, else from the stored
        # file's mtime, which it takes from fileModifiedAt: so both fields carry the chosen date,
        # and a date that is not embedded in the file goes along in an XMP sidecar too.
        taken = upload_date(
            datetime.fromisoformat(row.captured_at) if row.captured_at else None,
            PurePosixPath(row.path).name,
            _aware(row.mtime, self.tz),
            self.config.timezone,
        )
        started = time.monotonic()
        async with self._upload_slots:
            try:
                outcome = await self.immich.upload_asset(
                    send,
                    api_key=self.config.api_key_for(row.user),
                    filename=row.upload_name or PurePosixPath(row.path).name,
                    created_at=taken.when,
                    modified_at=taken.when,
                    checksum=row.upload_sha1 or row.sha1,
                    sidecar_date=None if taken.source == "content" else taken.when,
                )
            except TransientImmichError as exc:
                self.notifier.immich_upload(refused=True)
                if not await self.immich.ping():
                    self._immich_up.clear()  # pause every upload until the watcher sees Immich back
                await self._retry_later(row, "upload", str(exc), getattr(exc, "retry_after", None))
                return
            except PermanentImmichError as exc:
                self.notifier.immich_upload(refused=exc.status in (401, 403))
                await self._undone(row, "upload", str(exc))
                return
        self.notifier.immich_upload(refused=False)
        self.metrics.stage_duration.labels(stage="upload").observe(time.monotonic() - started)
        if outcome.status == "duplicate" and await self._in_immich_trash(row):
            await self._undone(
                row,
                "upload",
                "already in Immich's trash, which Immich empties later: restore it in Immich "
                "(then `sftpgate retry` it), or delete this file",
            )
            return
        # The asset id is committed before anything is deleted.
        await self.db(lambda db: db.confirm_asset(row.id, outcome.asset_id))
        await self._add_to_album(row, outcome.asset_id)
        confirmed = await self._reload(row)
        assert confirmed is not None  # only start-up drops rows in flight
        await self._finish_done(confirmed, immich_status=outcome.status)

    async def _finish_done(self, row: Original, immich_status: str | None = None) -> None:
        outcome = Outcome.UPLOADED if row.work_path else Outcome.KEPT
        original, converted = self.layout.watch_file(row.user, row.path), row.work_path

        def remove_files() -> None:  # freeing a file's blocks takes milliseconds: not on the loop
            unlink_if_same(original, row.inode)
            kill_point("delete_original:after")
            if converted:
                Path(converted).unlink(missing_ok=True)

        await asyncio.get_running_loop().run_in_executor(None, remove_files)
        await self.db(lambda db: db.finish(row.id, outcome))
        await self.stacker.after_delivery(row)
        self.metrics.processed_files.labels(outcome=outcome).inc()
        self.metrics.original_bytes.inc(row.size)
        self.metrics.stored_bytes.inc(row.bytes_out or row.size)
        file_event(
            "delivered",
            user=row.user,
            path=row.path,
            stage="upload",
            outcome=outcome,
            asset=row.asset_id,
            immich=immich_status,
            bytes_in=row.size,
            bytes_out=row.bytes_out,
        )

    async def _add_to_album(self, row: Original, asset_id: str) -> None:
        name = album_name(self.config.immich.album, row.path)
        # Immich hides a Live Photo's video once linked to its photo; in an album it would show.
        if name is None or row.live_photo_video:
            return
        api_key = self.config.api_key_for(row.user)
        try:
            album_id = self._albums.get((api_key, name))
            if album_id is None:
                album_id = await self.immich.find_or_create_album(api_key, name)
                self._albums[(api_key, name)] = album_id
            await self.immich.add_to_album(api_key, album_id, [asset_id])
        except (TransientImmichError, PermanentImmichError) as exc:
            # The photo is in Immich; a missing album entry is not worth a second upload.
            file_event(
                "album failed",
                level=30,
                user=row.user,
                path=row.path,
                stage="upload",
                outcome="not in album",
                album=name,
                error=str(exc),
            )

    async def _in_immich_trash(self, row: Original) -> bool:
        """Whether the asset a duplicate answer named is in the trash (and the configuration
        keeps such originals); a failed check counts as not trashed, as before the check."""
        if self.config.immich.trashed_duplicates != "undone":
            return False
        api_key = self.config.api_key_for(row.user)
        try:
            _, trashed = await self.immich.existing_asset(api_key, row.upload_sha1 or row.sha1)
        except (TransientImmichError, PermanentImmichError) as exc:
            file_event(
                "trash check failed",
                level=30,
                user=row.user,
                path=row.path,
                stage="upload",
                outcome="treated as delivered",
                error=str(exc),
            )
            return False
        return trashed

    async def _catch_up_stacks(self) -> None:
        await self._immich_up.wait()
        await self.stacker.catch_up()

    def _played_as_is(self) -> PlayedAsIs | None:
        """What Immich plays as it is, when it would re-encode a converted video and the
        configuration says to keep such videos instead."""
        report = self.immich_report
        if (
            report is None
            or not report.retranscodes_video
            or self.config.optimize.video.when_immich_retranscodes != "keep"
        ):
            return None
        return PlayedAsIs(report.accepted_video_codecs or ())

    async def _inspect_immich(self) -> None:
        """What Immich will do with the uploads, at start and hourly: each finding is logged
        once, when it first appears, and kept for `status`, /readyz and the metrics."""
        told: set[str] = set()
        while True:
            await self._immich_up.wait()
            try:
                report = await inspect_immich(self.immich, self.config)
            except Exception as exc:  # an answer this code does not expect costs the check only
                event("immich settings", level=30, outcome="not read", error=repr(exc))
                self._inspected.set()
                await asyncio.sleep(IMMICH_INSPECT_SECONDS)  # polling interval
                continue
            self.immich_report = report
            self._inspected.set()
            retranscodes = report.retranscodes_video
            self.metrics.immich_retranscodes_video.set(
                -1 if retranscodes is None else int(retranscodes)
            )
            self.metrics.immich_missing_permissions.set(report.missing_permissions)
            findings = report.sentences()
            for finding in findings:
                if finding not in told:
                    event("immich settings", level=30, outcome=finding)
            told = set(findings)
            await self.measure_immich_copies()
            await asyncio.sleep(IMMICH_INSPECT_SECONDS)  # polling interval

    async def measure_immich_copies(
        self, settled_seconds: float = IMMICH_COPY_SETTLE_SECONDS
    ) -> int:
        """Record the size of the copy Immich's own conversion job stored of each converted
        video delivered at least `settled_seconds` ago (0 when it made none), for the bytes
        saved after Immich's copies; return how many were measured. Immich plays its copy if
        it made one, else the original, so the size it plays tells which (permission
        asset.view; without it nothing is measured, said once)."""
        rows = await self.db(lambda db: db.videos_to_measure(time.time() - settled_seconds))
        for measured, row in enumerate(rows):
            try:
                played = await self.immich.video_playback_bytes(
                    self.config.api_key_for(row.user), str(row.asset_id)
                )
            except (TransientImmichError, PermanentImmichError) as exc:
                if str(exc) != self._copies_unmeasured:
                    file_event(
                        "immich copy not measured",
                        level=30,
                        user=row.user,
                        path=row.path,
                        stage="upload",
                        outcome="measured at the next inspection",
                        error=str(exc),
                    )
                self._copies_unmeasured = str(exc)
                return measured  # the others would be refused the same way
            copy = 0 if played == row.bytes_out else played
            await self.db(lambda db, r=row, c=copy: db.record_immich_copy(r.id, c))
        self._copies_unmeasured = None
        return len(rows)

    async def _retry_later(
        self, row: Original, stage: str, reason: str, retry_after: float | None = None
    ) -> None:
        now = time.time()
        first = row.first_failure_at or now
        if now - first >= self.config.retry.give_up_after:
            await self._undone(row, stage, f"gave up after {row.attempts + 1} attempts: {reason}")
            return
        r = self.config.retry
        delay = min(r.max_delay_seconds, r.first_delay_seconds * 2**row.attempts)
        delay = max(retry_after or 0.0, delay * random.uniform(0.5, 1.5))
        await self.db(
            lambda db: db.retry_later(
                row.id,
                attempts=row.attempts + 1,
                first_failure_at=first,
                next_attempt_at=now + delay,
                stage=stage,
                reason=reason,
            )
        )
        self.metrics.retries.inc()
        file_event(
            "retry later",
            level=30,
            user=row.user,
            path=row.path,
            stage=stage,
            outcome="retry",
            reason=reason,
            in_seconds=round(delay, 1),
        )

    async def _undone(
        self, row: Original, stage: str, reason: str, kind: str | None = None
    ) -> None:
        """Keep the original in watch/undone/<user>/ with a sidecar a person can act on."""
        dst = _free_name(self.layout.undone_file(row.user, row.path))
        # Where it goes and why are committed first: from here on start-up finishes the move.
        await self.db(
            lambda db: db.choose_undone_path(
                row.id, str(dst), stage, reason, kind or row.kind, row.attempts + 1
            )
        )
        decided = await self._reload(row)
        assert decided is not None  # only start-up drops rows in flight
        await self._complete_undone(decided)

    async def _complete_undone(self, row: Original) -> None:
        """Sidecar, move and commit of a decided move to undone/ (again after a crash)."""
        assert row.undone_path is not None
        loop = asyncio.get_running_loop()
        src, dst = self.layout.watch_file(row.user, row.path), Path(row.undone_path)
        if not _same_file(src, row.inode) and not _same_file(dst, row.inode):
            await self._drop_lost(row)
            return
        sidecar = {
            "stage": row.stage,
            "reason": row.reason,
            "time": _aware(time.time(), self.tz).isoformat(timespec="seconds"),
            "attempts": row.attempts,
            "user": row.user,
            "path": row.path,
            "kind": row.kind,
            "size": row.size,
            "sha1": row.sha1,
        }
        await loop.run_in_executor(None, _write_sidecar, dst, sidecar)
        kill_point("undone_sidecar:after")
        if _same_file(src, row.inode) and not dst.exists():
            await loop.run_in_executor(None, move_durably, src, dst)
        if row.work_path:
            Path(row.work_path).unlink(missing_ok=True)
        await self.db(lambda db: db.mark_undone(row.id))
        self.metrics.processed_files.labels(outcome=Outcome.UNDONE).inc()
        file_event(
            "undone",
            level=30,
            user=row.user,
            path=row.path,
            stage=row.stage,
            outcome="undone",
            reason=row.reason,
            kept_in=str(dst),
        )
        self.notifier.file_undone(row.user, row.path, row.reason or "")

    async def _reload(self, row: Original) -> Original | None:
        return await self.db(lambda db: db.get(row.id))


def _unreadable(row: Original, reason: str) -> OptimizeResult:
    return OptimizeResult(
        kind=row.kind or "unknown",
        decision="unreadable",
        reason=reason,
        output=None,
        extension=None,
        bytes_in=row.size,
        bytes_out=row.size,
        captured_at=None,
        metadata_kept=(),
        seconds=0.0,
    )


def _same_file(path: Path, inode: int | None) -> bool:
    try:
        return inode is None or path.stat().st_ino == inode
    except FileNotFoundError:
        return False


def _work_ready(row: Original) -> bool:
    """The bytes to upload are fixed: either the original itself or an optimized file on disk."""
    return row.upload_sha1 is not None and (row.work_path is None or Path(row.work_path).is_file())


def _free_name(path: Path) -> Path:
    """undone/ never overwrites: a second failure of the same name gets ' (2)', ' (3)', ..."""
    candidate, n = path, 2
    while candidate.exists() or candidate.with_name(candidate.name + ".error.json").exists():
        candidate = path.with_name(f"{path.stem} ({n}){path.suffix}")
        n += 1
    return candidate


def _write_sidecar(original: Path, doc: dict[str, object]) -> None:
    target = original.with_name(original.name + ".error.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)


def _aware(timestamp: float, tz: tzinfo | None) -> datetime:
    """Immich needs an offset on every date (v3 rejects naive ones)."""
    return (
        datetime.fromtimestamp(timestamp, tz)
        if tz
        else datetime.fromtimestamp(timestamp).astimezone()
    )
