"""`sftpgate status` and `sftpgate retry`: read and mend the ledger from the command line.

Both work while the service runs. `status` opens the ledger read-only (SQLite in WAL mode lets a
second process read beside the writer). `retry` writes, so it runs where the writer is: with no
service running it takes the data folder's lock and changes the ledger itself; with one running it
asks the service over the control socket (control.py) to do it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import Config
from .control import ask_service
from .immich.client import ImmichClient
from .immich.settings import inspect_immich
from .killpoints import kill_point
from .layout import DataDirBusy, Layout, lock_data_dir, move_durably
from .ledger import Ledger, Original, Outcome, State
from .notify import format_notification_status, notification_status


async def collect_status(config: Config) -> dict[str, Any]:
    layout = Layout(config.data_path)
    # Before the service's first start there is no ledger yet: nothing to count, and a reader
    # must not create one.
    states, outcomes, (original, sent), undone, waiting = {}, {}, (0, 0), [], []
    copies, copy_bytes, unmeasured = 0, 0, 0
    if layout.ledger.exists():
        ledger = Ledger(layout.ledger, readonly=True)
        try:
            states = ledger.count_by_state()
            outcomes = ledger.count_by_outcome()
            original, sent = ledger.bytes_saved()
            copies, copy_bytes, unmeasured = ledger.immich_copies()
            undone = [
                {
                    "user": r.user,
                    "path": r.path,
                    "stage": r.stage,
                    "reason": r.reason,
                    "attempts": r.attempts,
                    "file": r.undone_path,
                }
                for r in ledger.undone()
            ]
            waiting = [
                {
                    "user": r.user,
                    "path": r.path,
                    "state": r.state,
                    "attempts": r.attempts,
                    "reason": r.reason,
                }
                for r in ledger.unfinished()
                if r.attempts
            ]
        finally:
            ledger.close()
    async with ImmichClient(config.immich.url, timeout_seconds=10) as immich:
        immich_up = await immich.ping()
        report = await inspect_immich(immich, config) if immich_up else None
    return {
        "states": states,
        "outcomes": outcomes,
        "bytes_original": original,
        "bytes_sent": sent,
        "bytes_saved": original - sent,
        # Immich's own copies of converted videos: its conversion job's files beside them.
        "immich_video_copies": copies,
        "bytes_immich_copies": copy_bytes,
        "bytes_saved_after_immich_copies": original - sent - copy_bytes,
        "converted_videos_not_measured": unmeasured,
        "undone": undone,
        "retrying": waiting,
        "immich": {
            "url": config.immich.url,
            "reachable": immich_up,
            **(report.as_dict() if report else {}),
        },
        "notifications": notification_status(config),
    }


def format_status(s: dict[str, Any]) -> str:
    lines = ["originals by state:"]
    lines += [f"  {state:<11} {s['states'].get(state, 0):>8,}" for state in State]
    lines.append("finished by outcome:")
    lines += [f"  {o:<11} {s['outcomes'].get(o, 0):>8,}" for o in Outcome]
    saved = s["bytes_saved"]
    pct = 100 * saved / s["bytes_original"] if s["bytes_original"] else 0.0
    lines.append(
        f"bytes: {s['bytes_original']:,} received, {s['bytes_sent']:,} sent to Immich, {saved:,} saved ({pct:.1f}%)"
    )
    reach = "reachable" if s["immich"]["reachable"] else "NOT reachable"
    lines.append(f"immich: {s['immich']['url']} {reach}")
    lines += [f"  ! {finding}" for finding in s["immich"].get("findings", [])]
    if s["immich_video_copies"]:
        net = s["bytes_saved_after_immich_copies"]
        net_pct = 100 * net / s["bytes_original"] if s["bytes_original"] else 0.0
        lines.append(
            f"  after Immich's own copies: {net:,} saved ({net_pct:.1f}%); Immich keeps an H.264"
            f" copy of {s['immich_video_copies']:,} converted videos ({s['bytes_immich_copies']:,}"
            " bytes)"
        )
    if s["converted_videos_not_measured"]:
        lines.append(
            f"  {s['converted_videos_not_measured']:,} converted videos: Immich's own copy not"
            " measured yet (an hour after delivery; the key needs asset.view)"
        )
    if s["outcomes"].get(Outcome.UPLOADED):
        # Immich's app skips only bytes Immich knows, and it never knows a converted original.
        lines.append(
            "  converted files are new bytes to the Immich app: check that its backup (Backup >"
            " Backup albums) leaves out the folders this phone syncs here, or it sends them again"
        )
    lines += format_notification_status(s["notifications"])
    if s["retrying"]:
        lines.append(f"retrying ({len(s['retrying'])}):")
        lines += [
            f"  {r['user']}/{r['path']}: attempt {r['attempts']}, {r['reason']}"
            for r in s["retrying"]
        ]
    if s["undone"]:
        lines.append(f"undone ({len(s['undone'])}) — fix the cause, then `sftpgate retry [PATH]`:")
        lines += [f"  {u['file']}\n      {u['stage']}: {u['reason']}" for u in s["undone"]]
    return "\n".join(lines)


class RetryRefused(Exception):
    """The data folder is held by a process that takes no requests (an import)."""


def retry_undone(config: Config, paths: list[str]) -> list[str]:
    """Move matching undone originals back into watch/ and queue them afresh, here or in the
    running service; returns the client paths queued again."""
    layout = Layout(config.data_path)
    try:
        lock = lock_data_dir(layout.root)
    except DataDirBusy:
        reply = ask_service(layout.control, {"command": "retry", "paths": paths})
        if reply is None:
            raise RetryRefused(
                f"{layout.root} is in use by `sftpgate import`; retry once it has finished"
            ) from None
        return list(reply["queued"])
    try:
        ledger = Ledger(layout.ledger)
        try:
            return requeue_undone(ledger, layout, paths)
        finally:
            ledger.close()
    finally:
        os.close(lock)


def requeue_undone(ledger: Ledger, layout: Layout, paths: list[str]) -> list[str]:
    """The writer's half of `retry`: runs in the process that holds the data folder."""
    wanted = {str(Path(p).resolve()) for p in paths} | set(paths)
    moved: list[str] = []
    for row in ledger.undone():
        if not row.undone_path:
            continue
        src = Path(row.undone_path)
        names = {str(src), str(src.resolve()), f"{row.user}/{row.path}", row.path}
        if paths and not names & wanted:
            continue
        if not src.is_file():
            continue
        dst = layout.watch_file(row.user, row.path)
        if dst.exists():
            continue  # a newer upload of the same name is waiting; leave this one for later
        # The move comes first (rename keeps the inode): a crash before the commit leaves an
        # undone row whose file is back in watch/, which finish_interrupted_retries completes.
        move_durably(src, dst)
        kill_point("retry_move:after")
        src.with_name(src.name + ".error.json").unlink(missing_ok=True)
        ledger.requeue_undone(row.id, dst.stat().st_ino)
        moved.append(f"{row.user}/{row.path}")
    return moved


def finish_interrupted_retries(ledger: Ledger, layout: Layout) -> list[Original]:
    """Start-up: undone rows whose original a `retry` had moved back into watch/ before it
    was killed are queued, as that retry would have done."""
    requeued = []
    for row in ledger.undone():
        if not row.undone_path or Path(row.undone_path).exists():
            continue
        try:
            inode = layout.watch_file(row.user, row.path).stat().st_ino
        except FileNotFoundError:
            continue
        if inode == row.inode:
            Path(row.undone_path + ".error.json").unlink(missing_ok=True)
            ledger.requeue_undone(row.id, inode)
            requeued.append(row)
    return requeued
