"""`sftpgate status` and `sftpgate retry`: read and mend the ledger from the command line.

Both work while the service runs: SQLite in WAL mode lets a second process read, and the few
writes of `retry` wait for the service's transactions (busy timeout).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .config import Config
from .immich.client import ImmichClient
from .layout import Layout, move_durably
from .ledger import Ledger
from .notify import format_notification_status, notification_status


async def collect_status(config: Config) -> dict[str, Any]:
    layout = Layout(config.data_path)
    ledger = Ledger(layout.ledger)
    try:
        states = ledger.count_by_state()
        outcomes = ledger.count_by_outcome()
        original, sent = ledger.bytes_saved()
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
    return {
        "states": states,
        "outcomes": outcomes,
        "bytes_original": original,
        "bytes_sent": sent,
        "bytes_saved": original - sent,
        "undone": undone,
        "retrying": waiting,
        "immich": {"url": config.immich.url, "reachable": immich_up},
        "notifications": notification_status(config),
    }


def format_status(s: dict[str, Any]) -> str:
    order = ("received", "queued", "optimizing", "uploading", "done", "undone")
    lines = ["originals by state:"]
    lines += [f"  {state:<11} {s['states'].get(state, 0):>8,}" for state in order]
    lines.append("finished by outcome:")
    lines += [
        f"  {o:<11} {s['outcomes'].get(o, 0):>8,}"
        for o in ("uploaded", "kept", "duplicate", "undone")
    ]
    saved = s["bytes_saved"]
    pct = 100 * saved / s["bytes_original"] if s["bytes_original"] else 0.0
    lines.append(
        f"bytes: {s['bytes_original']:,} received, {s['bytes_sent']:,} sent to Immich, {saved:,} saved ({pct:.1f}%)"
    )
    reach = "reachable" if s["immich"]["reachable"] else "NOT reachable"
    lines.append(f"immich: {s['immich']['url']} {reach}")
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


def retry_undone(config: Config, paths: list[str]) -> list[str]:
    """Move matching undone originals back into watch/ and queue them afresh."""
    layout = Layout(config.data_path)
    ledger = Ledger(layout.ledger)
    wanted = {str(Path(p).resolve()) for p in paths} | set(paths)
    moved: list[str] = []
    try:
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
            move_durably(src, dst)
            src.with_name(src.name + ".error.json").unlink(missing_ok=True)
            ledger.update(
                row.id,
                state="queued",
                outcome=None,
                attempts=0,
                first_failure_at=None,
                next_attempt_at=time.time(),
                stage=None,
                reason=None,
                work_path=None,
                upload_sha1=None,
                inode=dst.stat().st_ino,
                undone_path=None,
            )
            moved.append(f"{row.user}/{row.path}")
    finally:
        ledger.close()
    return moved
