"""`sftpgate import DIR`: run an existing folder of photos through the pipeline.

A previous atmoz/sftp landing zone or an old phone backup goes through exactly what an SFTP upload
goes through: each file is placed atomically in `watch/<user>/<its path below DIR>`, admitted by
the intake (`Intake._admit`: SHA-1 duplicate check, ledger row), optimized by the codec workers,
uploaded by the pipeline, and deleted from watch/ only after Immich confirmed (or kept in
watch/undone/ with its reason). The service's pieces are started here in-process, without the
SFTP listener and without the periodic folder scan: this command is the only writer of watch/
while it runs, so no scan can adopt a file between its placement and its admission.

Why a copy into watch/ and not reading DIR in place: the pipeline deletes or moves the file it
was given, so it must own that directory entry. A hard link would share the inode, and anything
that changes the inode (the container entrypoint's chown on a PUID change) would change the
original too; it also fails across the bind mounts a container sees. So with `--keep` every file
is copied (hashed on the way, fsynced, its mtime kept) and DIR is only ever read. Without
`--keep` a file is moved (a rename on the same file system, else copy + fsync + delete), which is
what an SFTP upload amounts to. Only a small window of files is in watch/ at a time, so an import
of a 500 GB library never needs 500 GB more disk.

Resumable: a file whose SHA-1 the ledger already holds for this user (delivered, on its way, or
undone) is skipped, so a second run after an interruption — even a SIGKILL — sends each photo
exactly once. Whatever the killed run had placed is finished by the same recovery the service
runs at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import signal
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import aiohttp

from .config import Config, parse_listen
from .intake import Intake, sha1_of_file
from .layout import DataDirBusy, Layout, fsync_dir, lock_data_dir, move_durably
from .ledger import ACTIVE_STATES, FINAL_STATES, WAITING_STATES, Ledger, Original, Outcome
from .logs import file_event
from .metrics import Metrics
from .server import start_stages

if TYPE_CHECKING:
    from tqdm import tqdm

_CHUNK = 1 << 20
# Our own parts in .staging/ carry this prefix, so a restarted import removes only its own.
_PART_PREFIX = "import-"


class ImportRefused(Exception):
    """The import cannot start; the message says why and what to do."""


@dataclass
class _Report:
    """What happened, for the progress display and the summary."""

    total: int
    outcomes: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    undone: list[str] = field(default_factory=list)
    not_imported: list[str] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return sum(self.outcomes.values()) + self.skipped

    def postfix(self, compact: bool = False) -> str:
        """The counts so far; `compact` (for the bar) leaves out the zeros."""
        counts = [*((k, self.outcomes[k]) for k in ("uploaded", "kept", "duplicate", "undone"))]
        counts.append(("skipped", self.skipped))
        parts = [f"{n} {name}" for name, n in counts if n or not compact]
        return ", ".join([*parts, f"saved {_mb(self.bytes_in - self.bytes_out)}"])


class _Display:
    """A tqdm bar on a terminal; otherwise one plain line per file (logs, `docker compose run`)."""

    def __init__(self, out: TextIO, total: int, tty: bool) -> None:
        self.out = out
        self.bar: tqdm[None] | None = None
        if tty:
            from tqdm import tqdm

            try:
                size = os.get_terminal_size(out.fileno())
            except (OSError, ValueError):
                size = os.terminal_size((0, 0))
            sized = size.columns > 0 and size.lines > 0
            # Follow the terminal's width; a terminal that reports no size (tqdm then draws
            # nothing at all) gets a fixed one.
            self.bar = tqdm(
                total=total,
                unit="file",
                file=out,
                dynamic_ncols=sized,
                ncols=None if sized else 100,
                nrows=None if sized else 24,
            )

    def line(self, text: str, *, always: bool = False) -> None:
        """A per-file line: printed when there is no bar; with a bar only if `always`."""
        if self.bar is None:
            print(text, file=self.out, flush=True)
        elif always:
            self.bar.write(text, file=self.out)

    def advance(self, report: _Report) -> None:
        if self.bar is not None:
            self.bar.n = report.finished
            self.bar.set_postfix_str(report.postfix(compact=True), refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _mb(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} bytes"


def _sha1_and_copy(src: Path, part: Path, atime_ns: int, mtime_ns: int) -> str:
    """Copy src to part while hashing what was read; durable, with the original's times."""
    h = hashlib.sha1()
    with src.open("rb") as fi, part.open("xb") as fo:
        while chunk := fi.read(_CHUNK):
            h.update(chunk)
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    # The mtime is the photo's date of last resort and what SFTP listings show: keep it.
    os.utime(part, ns=(atime_ns, mtime_ns))
    return h.hexdigest()


def list_files(source: Path, intake: Intake) -> list[tuple[str, Path]]:
    """(path below DIR, file) of every regular file to import, in a stable order.

    Hidden folders and files and temporary upload names are left out, as the intake does for
    uploads; symlinks are not followed (they could point back into data_dir or loop).
    """
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(source).as_posix()
            if intake.is_temporary(rel) or full.is_symlink() or not full.is_file():
                continue
            out.append((rel, full))
    return out


async def _service_answers(config: Config) -> bool:
    """Is `sftpgate serve` running with this config? Its /metrics names sftpgate_build_info."""
    if not config.metrics.listen:
        return False
    host, port = parse_listen(config.metrics.listen)
    if port == 0:
        return False
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/metrics"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
            http.get(url) as resp,
        ):
            return resp.status == 200 and "sftpgate_build_info" in await resp.text()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


def _check_folders(source: Path, data: Path) -> None:
    if not source.is_dir():
        raise ImportRefused(f"{source}: not a folder")
    if source == data or data in source.parents or source in data.parents:
        # Importing data_dir into itself would feed watch/ back into watch/.
        raise ImportRefused(f"{source}: overlaps data_dir {data}; import from another folder")


def _take_lock(layout: Layout) -> int:
    try:
        return lock_data_dir(layout.root)
    except DataDirBusy as exc:
        raise ImportRefused(f"{exc}; wait for it to finish or stop it first") from None


class Importer:
    def __init__(
        self,
        config: Config,
        source: Path,
        user: str,
        keep: bool,
        out: TextIO,
        tty: bool,
    ) -> None:
        self.config = config
        self.source = source
        self.user = user
        self.keep = keep
        self.out = out
        self.tty = tty
        self.layout = Layout(config.data_path)
        self.metrics = Metrics()
        self.pending: dict[int, str] = {}  # ledger row id -> path below DIR
        self.interrupted = asyncio.Event()

    # -- lifecycle: the service's start-up, less the SFTP listener and the folder scan --------

    async def _start(self) -> None:
        cfg = self.config
        users = [u.name for u in cfg.sftp.users]
        self.layout.ensure(users)
        for part in self.layout.staging.glob(f"{_PART_PREFIX}*"):
            part.unlink(missing_ok=True)  # a killed import's half copy; its source is still there
        # Workers ignore Ctrl-C themselves; this process stops them (see `interrupted`).
        self.stages = await start_stages(cfg, self.layout, self.metrics)
        self.db, self.pipeline, self.intake = (
            self.stages.db,
            self.stages.pipeline,
            self.stages.intake,
        )
        self.runner = asyncio.create_task(self.pipeline.run())

    async def _stop(self) -> None:
        await self.pipeline.stop(self.config.shutdown_grace_seconds)
        self.runner.cancel()
        await asyncio.gather(self.runner, return_exceptions=True)
        await self.stages.close()

    # -- the import ---------------------------------------------------------------------------

    async def run(self) -> int:
        await self._start()
        try:
            return await self._import()
        finally:
            await asyncio.shield(self._stop())

    async def _import(self) -> int:
        files = list_files(self.source, self.intake)
        # Undone rows are not "delivered", but importing their bytes again would only end in
        # undone/ a second time: `sftpgate retry` is the way back for them.
        self.undone_sha1 = {
            r.sha1 for r in await self.db(lambda db: db.undone()) if r.user == self.user
        }
        report = _Report(total=len(files))
        mode = "keeping originals" if self.keep else "moving originals into the pipeline"
        print(
            f"importing {len(files)} files from {self.source} as user {self.user} ({mode})",
            file=self.out,
            flush=True,
        )
        self.display = _Display(self.out, len(files), self.tty)
        # Enough files in flight to keep every worker and upload slot busy, few enough that watch/
        # never holds more than a handful of copies.
        window = max(4, 2 * (self.stages.pool.size + self.config.retry.upload_concurrency))
        try:
            todo = files
            while todo and not self.interrupted.is_set():
                deferred: list[tuple[str, Path]] = []
                for rel, full in todo:
                    await self._wait(report, lambda n: n < window)
                    if self.interrupted.is_set():
                        break
                    if not await self._one(rel, full, report):
                        deferred.append((rel, full))
                await self._wait(report, lambda n: n == 0, drain=True)
                if len(deferred) == len(todo):  # no progress possible: report and stop
                    report.not_imported = [rel for rel, _ in deferred]
                    break
                todo = deferred
        finally:
            self.display.close()
        return self._summary(report)

    async def _one(self, rel: str, full: Path, report: _Report) -> bool:
        """Place one file and admit it; False when it has to wait for a later round."""
        loop = asyncio.get_running_loop()
        try:
            st = full.stat()
            sha1 = await loop.run_in_executor(None, sha1_of_file, full)
        except FileNotFoundError:
            self.display.line(f"gone      {rel}  (removed while importing)")
            report.skipped += 1
            self.display.advance(report)
            return True
        earlier = await self.db(lambda db: db.delivered_with_sha1(self.user, sha1))
        if earlier is not None or sha1 in self.undone_sha1:
            # Already in the ledger (an earlier run, an SFTP upload): never sent twice.
            where = earlier.path if earlier else "undone/"
            if earlier is not None and not self.keep:
                # Its bytes are delivered, or durably in watch/ and queued: the source may go.
                await loop.run_in_executor(None, _unlink_durably, full)
            report.skipped += 1
            file_event(
                "import skipped",
                user=self.user,
                path=rel,
                stage="receive",
                outcome="already in the ledger",
                same_as=where,
                source=str(full),
            )
            self.display.line(f"skipped   {rel}  (already in the ledger as {where})")
            self.display.advance(report)
            return True
        target = self.layout.watch_file(self.user, rel)
        busy = await self.db(lambda db: db.active_for_path(self.user, rel))
        if busy is not None or target.exists():
            return False  # another file of this name is still on its way: after it
        delete_source = False
        if self.keep:
            placed = await loop.run_in_executor(None, self._copy_in, full, target, st, sha1)
        else:
            try:
                await loop.run_in_executor(None, move_durably, full, target)
                placed = True
                moved = target.stat()
                if (moved.st_size, moved.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                    # Written to while we hashed it: hash what is in watch/ now.
                    st = moved
                    sha1 = await loop.run_in_executor(None, sha1_of_file, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                placed = await loop.run_in_executor(None, self._copy_in, full, target, st, sha1)
                delete_source = placed
        if not placed:
            return False  # changed while we read it: take it in the next round
        inode = target.stat().st_ino
        await self.intake._admit(self.user, rel, target, sha1, st.st_size, st.st_mtime, inode)
        if delete_source:
            # Only now: the copy is durable in watch/ and its ledger row is committed.
            await loop.run_in_executor(None, _unlink_durably, full)
        row = await self.db(lambda db: db.active_for_path(self.user, rel))
        if row is None:  # recognised as a duplicate by the intake: already finished
            report.outcomes["duplicate"] += 1
            self.display.line(f"duplicate {rel}")
            self.display.advance(report)
        else:
            self.pending[row.id] = rel
        return True

    def _copy_in(self, full: Path, target: Path, st: os.stat_result, sha1: str) -> bool:
        part = self.layout.staging / f"{_PART_PREFIX}{uuid.uuid4().hex}.part"
        try:
            copied = _sha1_and_copy(full, part, st.st_atime_ns, st.st_mtime_ns)
            after = full.stat()
            if copied != sha1 or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                return False
            move_durably(part, target)
            return True
        finally:
            part.unlink(missing_ok=True)

    async def _wait(
        self, report: _Report, enough: Callable[[int], bool], drain: bool = False
    ) -> None:
        """Report finished files; return once `enough(our files in flight)` holds (with `drain`,
        also nothing else queued: originals a killed run left behind are finished in this run
        too, though their sources were skipped as known) or on an interrupt."""
        while True:
            await self._collect(report)
            counts = await self.db(Ledger.count_unfinished)
            others = sum(counts.get(s, 0) for s in WAITING_STATES)
            if self.interrupted.is_set() or (enough(len(self.pending)) and not (drain and others)):
                return
            # Woken by any change of state in the ledger; the timeout only refreshes the display.
            with contextlib.suppress(TimeoutError):
                await self.pipeline.wait_for(
                    lambda c, b=counts: c != b, timeout=2.0, count=Ledger.count_unfinished
                )

    async def _collect(self, report: _Report) -> None:
        for row_id, rel in list(self.pending.items()):
            row: Original | None = await self.db(lambda db, i=row_id: db.get(i))
            if row is not None and row.state in ACTIVE_STATES:
                continue
            del self.pending[row_id]
            self._finished(rel, row, report)
        self.display.advance(report)

    def _finished(self, rel: str, row: Original | None, report: _Report) -> None:
        if row is None or row.state not in FINAL_STATES:
            report.outcomes["lost"] += 1
            self.display.line(f"lost      {rel}  (vanished from watch/)", always=True)
            return
        outcome = row.outcome or row.state
        report.outcomes[outcome] += 1
        if outcome == Outcome.UNDONE:
            report.undone.append(f"{row.undone_path or rel}\n      {row.stage}: {row.reason}")
            self.display.line(f"undone    {rel}  {row.stage}: {row.reason}")
            return
        if outcome in (Outcome.UPLOADED, Outcome.KEPT):
            report.bytes_in += row.size
            report.bytes_out += row.bytes_out or row.size
        self.display.line(
            f"{outcome:<9} {rel}  {row.size:,} → {(row.bytes_out or row.size):,} bytes"
            f"  asset {row.asset_id}"
        )

    def _summary(self, report: _Report) -> int:
        o = report.outcomes
        print(
            f"{'interrupted' if self.interrupted.is_set() else 'finished'}: "
            f"{report.finished} of {report.total} files — {report.postfix()}",
            file=self.out,
            flush=True,
        )
        if self.interrupted.is_set():
            print("run the same command again to continue where it stopped", file=self.out)
            return 130
        if report.not_imported:
            print(
                f"not imported ({len(report.not_imported)}): a file of the same name in"
                f" watch/{self.user}/ is still waiting; run the command again later:",
                file=self.out,
            )
            for rel in report.not_imported:
                print(f"  {rel}", file=self.out)
        if report.undone:
            print(
                f"undone ({len(report.undone)}), kept with their reason — fix the cause, then"
                " `sftpgate retry`:",
                file=self.out,
            )
            for line in report.undone:
                print(f"  {line}", file=self.out)
        return 1 if (o["undone"] or o["lost"] or report.not_imported) else 0


def _unlink_durably(path: Path) -> None:
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)


async def run_import(
    config: Config,
    source: Path,
    *,
    user: str | None = None,
    keep: bool = False,
    out: TextIO | None = None,
) -> int:
    """Import `source` for `user` (default: the first configured user); the exit code."""
    out = out or sys.stdout
    names = [u.name for u in config.sftp.users]
    name = user or names[0]
    if name not in names:
        raise ImportRefused(f"--user {name}: not a configured user ({', '.join(names)})")
    source = source.expanduser().resolve()
    layout = Layout(config.data_path)
    _check_folders(source, layout.root.resolve())
    if await _service_answers(config):
        raise ImportRefused(
            f"sftpgate serve is running on {config.metrics.listen} with this configuration;"
            " stop it first (docker compose stop sftpgate), then import"
        )
    layout.root.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(layout)
    tty = out.isatty()
    importer = Importer(config, source, name, keep, out, tty)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, importer.interrupted.set)
    try:
        with contextlib.ExitStack() as stack:
            if tty:  # log lines go above the bar instead of tearing it
                from tqdm.contrib.logging import logging_redirect_tqdm

                stack.enter_context(logging_redirect_tqdm())
            return await importer.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        os.close(lock)  # releases the flock


def quiet_logging_level(config_level: str, verbose: bool) -> str:
    """Per-file info lines would tear the progress bar: warnings and worse unless --verbose."""
    if verbose:
        return config_level
    return max(config_level.upper(), "WARNING", key=logging.getLevelName).lower()
